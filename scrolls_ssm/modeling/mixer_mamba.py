"""Bidirectional Mamba (selective state spaces) as an encoder mixer.

Gu and Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces". Made bidirectional as in
Vision Mamba (Zhu et al. 2024) and Caduceus (Schiff et al. 2024): one input projection (x and the gate z) and one
output projection are shared; a forward and a backward direction each own their depthwise causal convolution,
x_proj (dt, B, C), dt_proj, A_log and D, and their outputs are added before the gate.

The backward direction runs its convolution and scan from the end of the sequence (`reverse=True`: on a CPU the
compiled scan walks the steps backwards in place, nothing is copied). A right-padded row meets its pads first there,
so the pads' inputs are zeroed before the convolution and after it: the convolution reads zeros past the last real
token, and the scan's state stays zero until the last real token, however the pads were filled. Real positions then
get exactly what the reversed real tokens alone would give.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .configuration_scrolls_ssm import ScrollsSSMConfig
from .mixer_base import set_optim_hint
from .ops import causal_conv1d, selective_scan


class MambaDirection(nn.Module):
    """One direction of the mixer: causal depthwise conv, SiLU, selective scan with input-dependent dt, B, C."""

    def __init__(self, config: ScrollsSSMConfig, d_inner: int, dt_rank: int):
        super().__init__()
        self.d_state = config.mamba_d_state
        self.dt_rank = dt_rank
        self.dt_min, self.dt_max = config.ssm_dt_min, config.ssm_dt_max
        width = config.mamba_d_conv
        self.conv1d = nn.Conv1d(d_inner, d_inner, width, groups=d_inner)  # applied causally by ops.causal_conv1d
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner)  # its bias is the scan's delta_bias
        self.A_log = nn.Parameter(torch.empty(d_inner, self.d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        set_optim_hint(self, "A_log", lr=config.ssm_lr)
        set_optim_hint(self, "dt_proj.bias", lr=config.ssm_lr)
        set_optim_hint(self, "D")  # no weight decay, the run's learning rate
        self.init_mixer_weights()

    def init_mixer_weights(self) -> None:
        """Mamba's init: A = -(1..N) per channel (S4D-Real), D = 1, dt log-uniform via the inverse softplus bias."""
        d_inner = self.D.shape[0]
        init.copy_(self.A_log, torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand(d_inner, -1))
        init.ones_(self.D)
        std = self.dt_rank**-0.5
        init.uniform_(self.dt_proj.weight, -std, std)
        log_dt = torch.rand(d_inner) * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min)
        dt = torch.exp(log_dt).clamp(min=1e-4)
        init.copy_(self.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))  # softplus(bias) = dt
        # nn.Conv1d's own default, written through `init` so loaded weights are kept.
        init.kaiming_uniform_(self.conv1d.weight, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.conv1d.weight.shape[-1])
        init.uniform_(self.conv1d.bias, -bound, bound)

    def forward(self, x: torch.Tensor, reverse: bool = False, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x (batch, d_inner, L) -> y (batch, d_inner, L), D skip included, gate not applied.

        `reverse` runs from the end of the sequence; `keep` (batch, L), 1 at real tokens and 0 at pads, zeroes the
        pads' inputs to the convolution and to the scan (the reverse direction needs it; the forward one does not:
        its pads come after every real token)."""
        x = causal_conv1d(x, self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu", reverse=reverse, keep=keep)
        dt, B, C = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # (batch, L, d_inner) -> (batch, d_inner, L)
        return selective_scan(
            x,
            dt.to(x.dtype),
            -torch.exp(self.A_log.float()),
            B.transpose(1, 2).to(x.dtype),  # (batch, L, N) -> (batch, N, L)
            C.transpose(1, 2).to(x.dtype),
            D=self.D.float(),
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            reverse=reverse,
        )


class BiMambaMixer(nn.Module):
    """Shared in/out projections around a forward and a backward `MambaDirection`, gated by SiLU(z)."""

    def __init__(self, config: ScrollsSSMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        d_inner = config.mamba_expand * config.d_model
        dt_rank = config.mamba_dt_rank or math.ceil(config.d_model / 16)
        self.in_proj = nn.Linear(config.d_model, 2 * d_inner, bias=False)
        self.forward_ssm = MambaDirection(config, d_inner, dt_rank)
        self.backward_ssm = MambaDirection(config, d_inner, dt_rank)
        self.out_proj = nn.Linear(d_inner, config.d_model, bias=False)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        # x and z as two products on halves of in_proj's weight: the backward of one product split in two would
        # concatenate their (batch, E, L) gradients, a slow strided copy.
        x, z = (F.linear(hidden_states, weight).transpose(1, 2) for weight in self.in_proj.weight.chunk(2))
        keep = None if attention_mask is None else attention_mask.to(x.dtype)
        y = self.forward_ssm(x) + self.backward_ssm(x, reverse=True, keep=keep)
        # (batch, E, L) -> (batch, L, E) -> (batch, L, d_model)
        return GatedProjection.apply(y.transpose(1, 2), z.transpose(1, 2), self.out_proj.weight)


class GatedProjection(torch.autograd.Function):
    """out_proj(y * silu(z)), keeping only y and z for backward (the gate and the gated product are recomputed there):
    two (batch, L, E) tensors per layer instead of four, a quarter of what a Mamba layer holds at 16K tokens.

    Under autocast the product runs in autocast's dtype, as `F.linear` does; the backward casts to match.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y, z, weight)
        return F.linear(y * F.silu(z), weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        y, z, weight = ctx.saved_tensors
        gate = torch.sigmoid(z)
        silu = z * gate
        grad_gated = grad @ weight.to(grad.dtype)
        grad_weight = (grad.flatten(0, -2).t() @ (y * silu).to(grad.dtype).flatten(0, -2)).to(weight.dtype)
        grad_gated = grad_gated.to(y.dtype)
        grad_y = grad_gated * silu
        grad_z = grad_gated * y * gate * (1 + z * (1 - gate))
        return grad_y, grad_z.to(z.dtype), grad_weight
