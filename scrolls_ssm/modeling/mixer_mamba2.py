"""Bidirectional Mamba-2 (state-space duality) as an encoder mixer.

Dao and Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State Space
Duality". Mamba-2 restricts the state matrix to a scalar per head (A_t = -exp(A_log) * dt_t), which turns the scan
into chunked matrix products (ops_ssd.py): far cheaper than Mamba-1 on a CPU. One input projection gives the gate z,
the SSM input x, B, C (shared by each of `mamba2_ngroups` groups of heads) and dt; x, B, C pass a causal depthwise
convolution; a gated RMSNorm (RMSNorm(y * SiLU(z))) and an output projection follow.

Bidirectional: the same weights run over the sequence and over its reversal, and the two directions' outputs are
added before the gated norm. The reversal is a plain flip of the whole padded row, not a per-row reordering: before
it, the pads' convolution inputs and step sizes are zeroed, so in the reversed direction the pads (now in front of
the real tokens) add nothing to the state, decay nothing and show the convolution only zeros, exactly as if the
row's real tokens had been reversed alone. (In the forward direction right-padding never reaches a real position.)
Each direction runs as its own batch: no gathers, no stacking of the two into one batch and back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .configuration_scrolls_ssm import ScrollsSSMConfig
from .mixer_base import set_optim_hint
from .ops import causal_conv1d, mamba2_scan


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * SiLU(z)) * weight, in float32: Mamba-2's output norm, which gates before normalizing."""

    def __init__(self, width: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(width))
        self.init_mixer_weights()

    def init_mixer_weights(self) -> None:
        init.ones_(self.weight)

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        gated = y.float() * F.silu(z.float())
        normed = gated * torch.rsqrt(gated.square().mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(y.dtype)


class BiMamba2Mixer(nn.Module):
    """Mamba-2 over the sequence and over its reversal, one batch each; added, gated, normed, projected."""

    def __init__(self, config: ScrollsSSMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.d_inner = config.mamba2_expand * config.d_model
        self.d_state = config.mamba2_d_state
        self.head_dim = config.mamba2_headdim
        self.heads = self.d_inner // self.head_dim
        self.groups = config.mamba2_ngroups
        self.chunk_size = config.mamba2_chunk_size
        self.dt_min, self.dt_max = config.ssm_dt_min, config.ssm_dt_max
        self.bc_width = self.groups * self.d_state
        conv_width = self.d_inner + 2 * self.bc_width  # x, B and C are convolved together
        # (z, xBC, dt) in one projection
        self.in_proj = nn.Linear(config.d_model, self.d_inner + conv_width + self.heads, bias=False)
        self.in_proj_parts = (self.d_inner, conv_width, self.heads)
        # applied causally by ops.causal_conv1d
        self.conv1d = nn.Conv1d(conv_width, conv_width, config.mamba2_d_conv, groups=conv_width)
        self.dt_bias = nn.Parameter(torch.empty(self.heads))
        self.A_log = nn.Parameter(torch.empty(self.heads))
        self.D = nn.Parameter(torch.empty(self.heads))
        set_optim_hint(self, "dt_bias", lr=config.ssm_lr)
        set_optim_hint(self, "A_log", lr=config.ssm_lr)
        set_optim_hint(self, "D")  # no weight decay, the run's learning rate
        self.norm = GatedRMSNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, config.d_model, bias=False)
        self.init_mixer_weights()

    def init_mixer_weights(self) -> None:
        """Mamba-2's init: A uniform in [1, 16] per head, D = 1, dt log-uniform via the inverse-softplus bias."""
        init.copy_(self.A_log, torch.log(torch.empty(self.heads).uniform_(1, 16)))
        init.ones_(self.D)
        log_dt = torch.rand(self.heads) * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min)
        dt = torch.exp(log_dt).clamp(min=1e-4)
        init.copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        # nn.Conv1d's own default, written through `init` so loaded weights are kept.
        init.kaiming_uniform_(self.conv1d.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.conv1d.weight.shape[-1])
        init.uniform_(self.conv1d.bias, -bound, bound)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        # The input projection as three products with slices of its weight, so that each part comes out contiguous
        # (the convolution then keeps xBC channels-last; a split of one product would leave strided views).
        z, xBC, dt = (F.linear(hidden_states, weight) for weight in self.in_proj.weight.split(self.in_proj_parts))
        dt = F.softplus(dt.float() + self.dt_bias.float())  # (batch, L, heads), the positive step sizes
        y = self._direction(xBC, dt)
        if attention_mask is not None:  # pads: no convolution input, no step (no input to the state, no decay)
            real = attention_mask[..., None].bool()
            xBC, dt = xBC.masked_fill(~real, 0.0), dt.masked_fill(~real, 0.0)
        y = y + self._direction(xBC.flip(1), dt.flip(1)).flip(1)
        return self.out_proj(self.norm(y, z))

    def _direction(self, xBC: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        """One causal pass: (batch, L, conv width) and dt (batch, L, heads) -> y + D x, (batch, L, d_inner)."""
        xBC = causal_conv1d(xBC.transpose(1, 2), self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu")
        x, B, C = xBC.transpose(1, 2).split([self.d_inner, self.bc_width, self.bc_width], dim=-1)
        x = x.unflatten(-1, (self.heads, self.head_dim))  # (batch, L, heads, head_dim)
        B, C = (t.unflatten(-1, (self.groups, self.d_state)) for t in (B, C))  # (batch, L, groups, N)
        y, _ = mamba2_scan(x, dt, -torch.exp(self.A_log.float()), B, C, self.chunk_size)
        return (y + x * self.D[:, None].to(x.dtype)).flatten(2)
