"""The contract every encoder token mixer follows.

A mixer is an `nn.Module` built as `Mixer(config, layer_idx)` and called as

    mixer(hidden_states, attention_mask) -> hidden_states
    hidden_states: (batch, seq, d_model)   attention_mask: (batch, seq), 1 = token, 0 = padding

- Bidirectional: every position may see every real position. Encoders only: no cache, no step().
- Padding-exact: outputs at real positions never depend on what sits at padded positions (inputs are right
  padded; a scan that runs backwards starts on the pads, so SSM inputs are zeroed there after every projection or
  convolution that adds a bias).
- The block (`modeling_scrolls_ssm.ScrollsSSMEncoderBlock`) owns the norm, the residual and the FFN; the mixer only
  mixes tokens.
- A mixer that needs more than transformers' generic init (state-space parameters, dt biases, ...) implements
  `init_mixer_weights()`. It runs after its submodules got the generic init and must write tensors through
  `transformers.initialization` so that weights loaded from a checkpoint are left alone.
- Parameters that want their own optimizer treatment (state-space parameters: own learning rate, no weight decay)
  are named with `set_optim_hint(mixer, "log_dt", lr=...)`; `optim_hints(model)` collects them for the optimizer
  builder. The hint lives on the module, keyed by name, because loading a checkpoint replaces Parameter objects.
"""

from __future__ import annotations

import torch
from torch import nn


def zero_padding(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Zeroes padded positions of a (batch, seq, ...) tensor so nothing leaks from them into a scan."""
    if attention_mask is None:
        return hidden_states
    mask = attention_mask.to(hidden_states.dtype)
    return hidden_states * mask.view(*mask.shape, *([1] * (hidden_states.dim() - 2)))


def set_optim_hint(module: nn.Module, name: str, lr: float | None = None, weight_decay: float = 0.0) -> None:
    """Puts `module.<name>` (a parameter, possibly of a submodule: "dt_proj.bias") in its own optimizer group with
    this learning rate (None: the run's) and weight decay."""
    hint = {"weight_decay": weight_decay}
    if lr is not None:
        hint["lr"] = lr
    module.__dict__.setdefault("_optim_hints", {})[name] = hint


def optim_hints(model: nn.Module) -> dict[str, dict]:
    """`{parameter name in model: hint}` for every parameter marked with `set_optim_hint`."""
    return {
        f"{prefix}.{name}" if prefix else name: hint
        for prefix, module in model.named_modules()
        for name, hint in module.__dict__.get("_optim_hints", {}).items()
    }
