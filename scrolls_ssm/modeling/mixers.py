"""`MIXERS`: the one table that maps an `encoder_layer_types` entry to its mixer class (contract: mixer_base.py)."""

from __future__ import annotations

from torch import nn

from .configuration_scrolls_ssm import ScrollsSSMConfig
from .mixer_attention import AttentionMixer
from .mixer_gss import GSSMixer
from .mixer_mamba import BiMambaMixer
from .mixer_mamba2 import BiMamba2Mixer
from .mixer_s4d import S4DMixer

MIXERS: dict[str, type[nn.Module]] = {
    "attention": AttentionMixer,
    "s4d": S4DMixer,
    "mamba": BiMambaMixer,
    "mamba2": BiMamba2Mixer,
    "gss": GSSMixer,
}


def build_mixer(config: ScrollsSSMConfig, layer_idx: int) -> nn.Module:
    """The mixer of encoder layer `layer_idx`, as `config.encoder_layer_types` names it."""
    kind = config.encoder_layer_types[layer_idx]
    if kind not in MIXERS:
        raise ValueError(
            f"encoder_layer_types[{layer_idx}]={kind!r} is not a known mixer kind; valid kinds: {sorted(MIXERS)}."
        )
    return MIXERS[kind](config, layer_idx)
