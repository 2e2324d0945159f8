"""Bidirectional Mamba-2 (state-space duality) as an encoder mixer.

Dao and Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State Space
Duality". Mamba-2 restricts the state matrix to a scalar per head (A_t = -exp(A_log) * dt_t), which turns the scan
into chunked matrix products (ops_ssd.py): far cheaper than Mamba-1 on a CPU. One input projection gives the gate z,
the SSM input x, B, C (shared by each of `mamba2_ngroups` groups of heads) and dt; x, B, C pass a causal depthwise
convolution; a gated RMSNorm (RMSNorm(y * SiLU(z))) and an output projection follow.

Bidirectional: each row's real tokens are reversed (pads stay at the end, so nothing flows from a pad into a real
position) and the reversed copy runs in the same batch as the original, through the same weights; the two
directions' outputs are added before the gated norm.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .configuration_scrolls_ssm import ScrollsSSMConfig
from .mixer_base import set_optim_hint
from .mixer_mamba import gather_positions, reverse_real_tokens
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
    """Mamba-2 over the sequence and over its per-row reversal, batched together; added, gated, normed, projected."""

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
        conv_width = self.d_inner + 2 * self.groups * self.d_state  # x, B and C are convolved together
        # (z, xBC, dt) in one projection
        self.in_proj = nn.Linear(config.d_model, self.d_inner + conv_width + self.heads, bias=False)
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
        batch, length, _ = hidden_states.shape
        bc_width = self.groups * self.d_state
        z, xBC, dt = self.in_proj(hidden_states).split([self.d_inner, self.d_inner + 2 * bc_width, self.heads], dim=-1)
        reverse = reverse_real_tokens(attention_mask, batch, length, hidden_states.device)

        def both_directions(x: torch.Tensor) -> torch.Tensor:
            # (batch, L, channels) -> (batch, channels, L) -> (2 * batch, channels, L): original rows, then reversed
            x = x.transpose(1, 2)
            return torch.cat([x, gather_positions(x, reverse)])

        xBC = causal_conv1d(both_directions(xBC), self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu")
        x, B, C = xBC.transpose(1, 2).split([self.d_inner, bc_width, bc_width], dim=-1)  # (2 * batch, L, .)
        dt = F.softplus(both_directions(dt).transpose(1, 2).float() + self.dt_bias.float())  # (2 * batch, L, heads)
        x = x.unflatten(-1, (self.heads, self.head_dim))  # (2 * batch, L, d_inner) -> (2 * batch, L, heads, head_dim)
        B, C = (t.unflatten(-1, (self.groups, self.d_state)) for t in (B, C))  # (2 * batch, L, groups, N)
        y, _ = mamba2_scan(x, dt, -torch.exp(self.A_log.float()), B, C, self.chunk_size)
        y = y + x * self.D[:, None].to(x.dtype)
        y = y.flatten(2).transpose(1, 2)  # (2 * batch, L, heads, head_dim) -> (2 * batch, d_inner, L)
        y = y[:batch] + gather_positions(y[batch:], reverse)  # the reversed rows back in order, then added
        return self.out_proj(self.norm(y.transpose(1, 2), z))  # (batch, d_inner, L) -> (batch, L, d_inner)
