"""Gated State Space (GSS) as an encoder mixer.

Mehta, Gupta, Cutkosky and Neyshabur 2022, "Long Range Language Modeling via Gated State Spaces". The SSM runs at a
reduced width H (d_model / 4 by default) and a multiplicative gate at a wide width F carries most of the capacity:

    v = GELU(W_v x)             (F)     u = GELU(W_u x)             (H)
    y = SSM(u)                  (H)     out = W_o ((W_c y) * v)     (d_model)

The paper's SSM is DSS; here it is the bidirectional S4D convolution of mixer_s4d.py (same family: a diagonal SSM
applied as an FFT convolution), which makes GSS cheap at 16K: its FFTs run over H channels instead of d_model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_scrolls_ssm import ScrollsSSMConfig
from .mixer_base import zero_padding
from .mixer_s4d import BidirectionalS4D


class GSSMixer(nn.Module):
    """Reduced-width bidirectional S4D between GELU projections, gated multiplicatively at width F."""

    def __init__(self, config: ScrollsSSMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        gated_width = config.gss_expansion * config.d_model
        ssm_width = config.gss_ssm_dim or max(1, config.d_model // 4)
        self.gate_proj = nn.Linear(config.d_model, gated_width)  # W_v
        self.ssm_in_proj = nn.Linear(config.d_model, ssm_width)  # W_u
        self.ssm = BidirectionalS4D(ssm_width, config.gss_d_state, config)
        self.ssm_out_proj = nn.Linear(ssm_width, gated_width)  # W_c
        self.out_proj = nn.Linear(gated_width, config.d_model)  # W_o

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        gate = F.gelu(self.gate_proj(hidden_states))  # (batch, L, F)
        # The projection's bias makes pads non-zero, and the backward half of the SSM reads every later position.
        u = zero_padding(F.gelu(self.ssm_in_proj(hidden_states)), attention_mask)  # (batch, L, H)
        y = self.ssm(u.transpose(1, 2)).transpose(1, 2)  # (batch, L, H) -> (batch, H, L) -> back
        return self.out_proj(self.ssm_out_proj(y) * gate)
