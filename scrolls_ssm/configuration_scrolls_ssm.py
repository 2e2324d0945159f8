"""Configuration of an encoder-decoder whose encoder token mixers are chosen layer by layer.

This file is copied next to saved checkpoints for `trust_remote_code` users: it imports only from `transformers`,
`huggingface_hub` and the standard library.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import BartConfig

# The kinds of encoder token mixer. `mixers.MIXERS` maps each to its class; a test keeps the two in step. The list
# lives here, free of torch, so that a config can be validated without building a model.
MIXER_KINDS: tuple[str, ...] = ("attention", "s4d", "mamba", "mamba2", "gss")


def _require(condition: bool, field: str, value: object, expected: str) -> None:
    if not condition:
        raise ValueError(f"ScrollsSSMConfig.{field}={value!r} is invalid: expected {expected}.")


@strict
class ScrollsSSMConfig(BartConfig):
    r"""A [`BartConfig`] whose encoder mixes tokens with a per-layer choice of mixer.

    Everything BART has keeps its meaning (`d_model`, `encoder_ffn_dim`, the decoder, ...). Added fields:

    - `encoder_layer_types`: one mixer kind per encoder layer (see `MIXER_KINDS`); `None` means all `attention`,
      which is plain BART. Hybrids are lists such as `["gss", "gss", "gss", "attention"] * 3`.
    - `max_source_positions`: the encoder's length limit (learned positions are kept up to this length). It is
      separate from `max_position_embeddings`, which stays the decoder's limit.
    - `attention_window`: `None` for full attention in `attention` layers; an int `w` for block-local attention,
      where each block of `w` tokens attends to itself and its two neighbouring blocks.
    - `ssm_*` and `<kind>_*`: hyper-parameters of the state-space mixers, read only by the layers of that kind.

    Example:
    ```python
    >>> from scrolls_ssm import ScrollsSSMConfig
    >>> config = ScrollsSSMConfig(encoder_layers=2, encoder_layer_types=["s4d", "attention"])
    ```
    """

    model_type = "scrolls_ssm"

    encoder_layer_types: list[str] | None = None
    max_source_positions: int = 16384
    attention_window: int | None = None

    def __post_init__(self, **kwargs):
        if self.encoder_layer_types is None:
            self.encoder_layer_types = ["attention"] * self.encoder_layers
        self.encoder_layer_types = list(self.encoder_layer_types)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Checks run at construction by `@strict`: every error names the field, the value and what is valid."""
        super().validate_architecture()
        types = self.encoder_layer_types
        _require(
            len(types) == self.encoder_layers,
            "encoder_layer_types",
            types,
            f"one entry per encoder layer ({self.encoder_layers} entries, as `encoder_layers`={self.encoder_layers}); "
            "change one of the two so they agree",
        )
        for index, kind in enumerate(types):
            _require(kind in MIXER_KINDS, f"encoder_layer_types[{index}]", kind, f"one of {list(MIXER_KINDS)}")
        _require(
            isinstance(self.max_source_positions, int) and self.max_source_positions >= 1,
            "max_source_positions",
            self.max_source_positions,
            "an int >= 1",
        )
        _require(
            self.attention_window is None or (isinstance(self.attention_window, int) and self.attention_window >= 1),
            "attention_window",
            self.attention_window,
            "None (full attention) or an int >= 1 (block-local attention)",
        )
        _require(
            self.d_model % self.encoder_attention_heads == 0,
            "encoder_attention_heads",
            self.encoder_attention_heads,
            f"a divisor of d_model={self.d_model}",
        )


__all__ = ["MIXER_KINDS", "ScrollsSSMConfig"]
