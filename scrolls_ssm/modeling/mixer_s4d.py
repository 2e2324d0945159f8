"""Bidirectional S4D as an encoder mixer.

Gu, Gupta, Goel and Ré 2022, "On the Parameterization and Initialization of Diagonal State Space Models" (S4D).
Each of the d_model channels runs its own diagonal SSM with N/2 complex modes, turned into a length-L convolution
kernel (zero-order hold) and applied with one FFT. Bidirectional as in the S4 repository: the two directions share
dt and A (the dynamics) and have their own C (what each direction reads out), i.e. one kernel with two channels.
Then a D skip, GELU, and a GLU output projection, as in the paper's S4D layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import initialization as init

from .configuration_scrolls_ssm import ScrollsSSMConfig
from .mixer_base import set_optim_hint, zero_padding
from .ops import fft_conv, s4d_kernel


class BidirectionalS4D(nn.Module):
    """Per-channel bidirectional S4D convolution plus D skip: (batch, H, L) -> (batch, H, L).

    The input must be zero at padded positions: the anti-causal half reaches every later position, pads included.
    Shared by `S4DMixer` and `GSSMixer`.
    """

    def __init__(self, channels: int, d_state: int, config: ScrollsSSMConfig):
        super().__init__()
        self.init_kind = config.s4d_init
        self.dt_min, self.dt_max = config.ssm_dt_min, config.ssm_dt_max
        half = d_state // 2
        # The dynamics (dt, A) learn with their own rate and no weight decay, as in the S4 repository.
        self.log_dt = nn.Parameter(torch.empty(channels))
        self.log_A_real = nn.Parameter(torch.empty(channels, half))
        self.A_imag = nn.Parameter(torch.empty(channels, half))
        for name in ("log_dt", "log_A_real", "A_imag"):
            set_optim_hint(self, name, lr=config.ssm_lr)
        # C of the forward and of the backward direction, complex stored as (real, imag) pairs.
        self.C = nn.Parameter(torch.empty(2, channels, half, 2))
        self.D = nn.Parameter(torch.empty(channels))
        self.init_mixer_weights()

    def init_mixer_weights(self) -> None:
        """S4D-Lin (A_n = -1/2 + i pi n) or S4D-Inv (A_n = -1/2 + i N/pi (N/(2n+1) - 1)); log-uniform dt."""
        channels, half = self.A_imag.shape
        n = torch.arange(half, dtype=torch.float32)
        if self.init_kind == "lin":
            imag = math.pi * n
        else:
            state = 2 * half
            imag = state / math.pi * (state / (2 * n + 1) - 1)
        init.copy_(self.A_imag, imag.expand(channels, half))
        init.constant_(self.log_A_real, math.log(0.5))
        init.uniform_(self.log_dt, math.log(self.dt_min), math.log(self.dt_max))
        init.normal_(self.C, std=0.5**0.5)  # a unit-variance complex normal
        init.normal_(self.D)

    def kernel(self, length: int) -> torch.Tensor:
        """The (2, H, length) convolution kernel: forward direction first, backward second."""
        A = torch.complex(-torch.exp(self.log_A_real.float()), self.A_imag.float())  # (H, N/2)
        return s4d_kernel(self.log_dt, A, torch.view_as_complex(self.C.float()), length)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (u.requires_grad or self.log_dt.requires_grad):
            # The kernel, the spectra and the 2L-long convolution output are recomputed in backward instead of kept:
            # at 16K tokens they are most of the layer's activation memory, and cheap to redo (docs/benchmarks.md).
            y = checkpoint(self._convolve, u, use_reentrant=False)
        else:
            y = self._convolve(u)
        return y + u * self.D[:, None].to(u.dtype)

    def _convolve(self, u: torch.Tensor) -> torch.Tensor:
        return fft_conv(u, self.kernel(u.shape[-1]), bidirectional=True)  # float32 FFTs, u's dtype back


class S4DMixer(nn.Module):
    """Bidirectional S4D over d_model channels, GELU, then a GLU projection back to d_model."""

    def __init__(self, config: ScrollsSSMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.ssm = BidirectionalS4D(config.d_model, config.s4d_d_state, config)
        self.output_proj = nn.Linear(config.d_model, 2 * config.d_model)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        u = zero_padding(hidden_states, attention_mask).transpose(1, 2)  # (batch, L, d) -> (batch, d, L)
        y = F.gelu(self.ssm(u)).transpose(1, 2)  # (batch, d, L) -> (batch, L, d)
        return F.glu(self.output_proj(y), dim=-1)
