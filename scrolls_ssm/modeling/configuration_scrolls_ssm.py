"""Configuration of an encoder-decoder whose encoder token mixers are chosen layer by layer.

This file is copied next to saved checkpoints for `trust_remote_code` users: it imports only from `transformers`,
`huggingface_hub` and the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass

from huggingface_hub.dataclasses import strict
from transformers import BartConfig

# The kinds of encoder token mixer. `mixers.MIXERS` maps each to its class; a test keeps the two in step. The list
# lives here, free of torch, so that a config can be validated without building a model.
MIXER_KINDS: tuple[str, ...] = ("attention", "s4d", "mamba", "mamba2", "gss")
ENCODER_POSITIONS: tuple[str, ...] = ("learned", "none")


@dataclass
class MixerFields:
    """The encoder layout and the hyper-parameters of the state-space mixers, shared by every model family's config.

    Each family's config (`ScrollsSSMConfig` for BART / LED, `ScrollsSSMT5Config` for the T5 family) inherits these
    fields and calls `_validate_mixer_fields()` from its `validate_architecture`. The mixers read only these fields
    and `d_model`, so every mixer runs unchanged in every family.
    """

    encoder_layer_types: list[str] | None = None
    # State-space mixers (docs/mixers.md). dt, A and their kin train with `ssm_lr` and no weight decay.
    ssm_lr: float | None = 1e-3  # learning rate of the SSM dynamics parameters; None: the run's learning rate
    ssm_dt_min: float = 0.001  # step sizes dt are initialized log-uniformly in [ssm_dt_min, ssm_dt_max]
    ssm_dt_max: float = 0.1
    s4d_d_state: int = 64  # N of S4D (and GSS): N/2 complex conjugate-pair modes per channel
    s4d_init: str = "lin"  # imaginary parts of A: "lin" (S4D-Lin, pi * n) or "inv" (S4D-Inv)
    mamba_d_state: int = 16  # N of Mamba-1
    mamba_d_conv: int = 4  # width of Mamba-1's causal depthwise convolution
    mamba_expand: int = 2  # Mamba-1's inner width is mamba_expand * d_model
    mamba_dt_rank: int | None = None  # rank of the dt projection; None: ceil(d_model / 16)
    mamba2_d_state: int = 64  # N of Mamba-2
    mamba2_headdim: int = 64  # Mamba-2 head size; must divide mamba2_expand * d_model
    # Groups of heads that share B and C (Mamba-2's ngroups); must divide the head count. With one group per attention
    # head and mamba2_d_state = the attention's head size, weight reuse maps each head's K and Q exactly.
    mamba2_ngroups: int = 1
    mamba2_expand: int = 2  # Mamba-2's inner width is mamba2_expand * d_model
    mamba2_d_conv: int = 4  # width of Mamba-2's causal depthwise convolution
    mamba2_chunk_size: int = 64  # SSD chunk length (<= 256); 64 measured fastest on CPU at 16K (docs/mixers.md)
    gss_d_state: int = 64  # N of GSS's S4D-style SSM
    gss_expansion: int = 2  # GSS's gated width is gss_expansion * d_model
    gss_ssm_dim: int | None = None  # width the GSS SSM runs at; None: d_model // 4 (the paper's reduction)

    def _default_layout(self, layers: int) -> None:
        """`encoder_layer_types=None` means every one of the `layers` layers is `attention`; any sequence becomes a
        list. Called first in each family's `__post_init__`."""
        if self.encoder_layer_types is None:
            self.encoder_layer_types = ["attention"] * layers
        self.encoder_layer_types = list(self.encoder_layer_types)

    def _keep_registered_auto_class(self) -> None:
        """Called last in each family's `__post_init__`. Built from another config's dict (`to_dict()` carries
        `_auto_class: None`, which the base class sets as an attribute), the instance attribute would hide the class
        attribute that `register_for_auto_class` set, and `save_pretrained` would write no `AutoConfig` into
        `auto_map`: trust_remote_code users could not load the model."""
        if self.__dict__.get("_auto_class", ...) is None:
            del self.__dict__["_auto_class"]

    def _require(self, condition: bool, field: str, value: object, expected: str) -> None:
        """Raise a ValueError naming the config class, the field, the value and what is valid, unless `condition`."""
        if not condition:
            raise ValueError(f"{type(self).__name__}.{field}={value!r} is invalid: expected {expected}.")

    def _validate_mixer_fields(self, layers_field: str, layers: int):
        """`encoder_layer_types` against the layer count (`layers_field`=`layers`), then the ranges of the `ssm_*` /
        `<kind>_*` fields; shape constraints only where a layer of that kind exists."""
        types = self.encoder_layer_types
        self._require(
            len(types) == layers,
            "encoder_layer_types",
            types,
            f"one entry per encoder layer ({layers} entries, as `{layers_field}`={layers}); change one of the two so "
            "they agree",
        )
        for index, kind in enumerate(types):
            self._require(kind in MIXER_KINDS, f"encoder_layer_types[{index}]", kind, f"one of {list(MIXER_KINDS)}")
        self._require(self.ssm_lr is None or self.ssm_lr > 0, "ssm_lr", self.ssm_lr, "None or a learning rate > 0")
        self._require(
            0 < self.ssm_dt_min <= self.ssm_dt_max,
            "ssm_dt_min",
            self.ssm_dt_min,
            f"0 < ssm_dt_min <= ssm_dt_max (= {self.ssm_dt_max})",
        )
        for field in ("s4d_d_state", "gss_d_state"):
            value = getattr(self, field)
            self._require(
                value >= 2 and value % 2 == 0, field, value, "an even int >= 2 (states come in conjugate pairs)"
            )
        self._require(self.s4d_init in ("lin", "inv"), "s4d_init", self.s4d_init, "'lin' (S4D-Lin) or 'inv' (S4D-Inv)")
        for field in (
            "mamba_d_state",
            "mamba_d_conv",
            "mamba_expand",
            "mamba2_d_state",
            "mamba2_headdim",
            "mamba2_ngroups",
            "mamba2_expand",
            "mamba2_d_conv",
            "gss_expansion",
        ):
            self._require(getattr(self, field) >= 1, field, getattr(self, field), "an int >= 1")
        self._require(
            self.mamba_dt_rank is None or self.mamba_dt_rank >= 1,
            "mamba_dt_rank",
            self.mamba_dt_rank,
            "None (ceil(d_model / 16)) or an int >= 1",
        )
        inner = self.mamba2_expand * self.d_model
        self._require(
            "mamba2" not in self.encoder_layer_types or inner % self.mamba2_headdim == 0,
            "mamba2_headdim",
            self.mamba2_headdim,
            f"a divisor of mamba2_expand * d_model = {self.mamba2_expand} * {self.d_model} = {inner}",
        )
        heads = inner // self.mamba2_headdim
        self._require(
            "mamba2" not in self.encoder_layer_types or heads % self.mamba2_ngroups == 0,
            "mamba2_ngroups",
            self.mamba2_ngroups,
            f"a divisor of the Mamba-2 head count mamba2_expand * d_model / mamba2_headdim = {heads}",
        )
        self._require(
            1 <= self.mamba2_chunk_size <= 256,
            "mamba2_chunk_size",
            self.mamba2_chunk_size,
            "an int in [1, 256] (longer chunks lose float32 precision in the decays)",
        )
        self._require(
            self.gss_ssm_dim is None or self.gss_ssm_dim >= 1,
            "gss_ssm_dim",
            self.gss_ssm_dim,
            "None (d_model // 4) or an int >= 1",
        )


@strict
class ScrollsSSMConfig(MixerFields, BartConfig):
    r"""A [`BartConfig`] whose encoder mixes tokens with a per-layer choice of mixer.

    Everything BART has keeps its meaning (`d_model`, `encoder_ffn_dim`, the decoder, ...). Added fields:

    - `encoder_layer_types`: one mixer kind per encoder layer (see `MIXER_KINDS`); `None` means all `attention`,
      which is plain BART. Hybrids are lists such as `["gss", "gss", "gss", "attention"] * 3`.
    - `max_source_positions`: the encoder's length limit (learned positions are kept up to this length). It is
      separate from `max_position_embeddings`, which stays the decoder's limit.
    - `encoder_positions`: `"learned"` (BART's absolute position table, the default and what a converted checkpoint
      has) or `"none"`: no position table, the mixers alone tell tokens apart by place (state-space and convolution
      layers do; full attention layers do not, so use it with a state-space layer first). A model trained on short
      inputs then meets no untrained position on long ones, and `max_source_positions` is only a limit that can be
      raised without retraining.
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

    max_source_positions: int = 16384
    encoder_positions: str = "learned"
    attention_window: int | None = None

    def __post_init__(self, **kwargs):
        self._default_layout(self.encoder_layers)
        super().__post_init__(**kwargs)
        self._keep_registered_auto_class()

    def validate_architecture(self):
        """Checks run at construction by `@strict`: every error names the field, the value and what is valid."""
        super().validate_architecture()
        self._require(
            isinstance(self.max_source_positions, int) and self.max_source_positions >= 1,
            "max_source_positions",
            self.max_source_positions,
            "an int >= 1",
        )
        self._require(
            self.encoder_positions in ENCODER_POSITIONS,
            "encoder_positions",
            self.encoder_positions,
            f"one of {list(ENCODER_POSITIONS)}",
        )
        self._require(
            self.attention_window is None or (isinstance(self.attention_window, int) and self.attention_window >= 1),
            "attention_window",
            self.attention_window,
            "None (full attention) or an int >= 1 (block-local attention)",
        )
        self._require(
            self.d_model % self.encoder_attention_heads == 0,
            "encoder_attention_heads",
            self.encoder_attention_heads,
            f"a divisor of d_model={self.d_model}",
        )
        self._validate_mixer_fields("encoder_layers", self.encoder_layers)


__all__ = ["MIXER_KINDS", "MixerFields", "ScrollsSSMConfig"]
