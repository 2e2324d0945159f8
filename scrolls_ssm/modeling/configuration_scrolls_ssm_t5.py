"""Configuration of a T5-family encoder-decoder (T5, Flan-T5, mT5, umT5, LongT5) whose encoder mixers are chosen
layer by layer.

This file is copied next to saved checkpoints for `trust_remote_code` users: it imports only from `transformers`,
`huggingface_hub`, the standard library and its sibling config file.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import T5Config

from .configuration_scrolls_ssm import MixerFields

# The checkpoints a T5-family model can be built from, by their `model_type`. Each keeps its own attention and decoder
# classes (transformers' T5, mT5, umT5 and LongT5 modules, reused as they are).
T5_FAMILIES: tuple[str, ...] = ("t5", "mt5", "umt5", "longt5")
# How `attention` layers attend: T5's full attention, LongT5's local attention (a sliding window of `local_radius`
# tokens either side) or LongT5's transient-global attention (local + one summary token per `global_block_size`).
T5_ATTENTION_TYPES: tuple[str, ...] = ("full", "local", "transient-global")


@strict
class ScrollsSSMT5Config(MixerFields, T5Config):
    r"""A [`T5Config`] whose encoder mixes tokens with a per-layer choice of mixer.

    Everything T5 has keeps its meaning (`d_model`, `d_kv`, `d_ff`, `num_heads`, `feed_forward_proj`, the relative
    position buckets, the decoder, ...). Added fields:

    - `t5_family`: the checkpoint family the model was built from (`"t5"` also covers Flan-T5 and T5 v1.1); it picks
      transformers' attention and decoder classes, so an all-`attention` model computes what the original does.
    - `encoder_layer_types`: one mixer kind per encoder layer (`num_layers` entries); `None` means all `attention`.
    - `encoder_attention_type`: `"full"` (T5, mT5, umT5), `"local"` or `"transient-global"` (LongT5's two kinds;
      `"local"` also gives any family a sliding window of `local_radius` tokens either side).
    - `local_radius`, `global_block_size`: LongT5's window radius and global block length.
    - `tie_word_embeddings`: whether the LM head is the shared embedding (T5 v1.0: yes; T5 v1.1 / Flan-T5 / mT5
      checkpoints have their own output layer). As in `T5Config`, `False` alone also means no output scaling
      (`scale_decoder_outputs`); a swap sets both from the checkpoint.
    - `max_source_positions`: `None` (no limit: T5 encoders have relative positions, state-space mixers none) or an
      int that inputs may not exceed; a limit only, it can be raised when loading.
    - `ssm_*` and `<kind>_*`: hyper-parameters of the state-space mixers (as in `ScrollsSSMConfig`).

    The relative position bias of T5, mT5 and LongT5 is one table shared by all attention layers: here it lives in the
    first `attention` layer. umT5 has one table per layer, and so does every `attention` layer here.

    Example:
    ```python
    >>> from scrolls_ssm import ScrollsSSMT5Config
    >>> config = ScrollsSSMT5Config(num_layers=2, encoder_layer_types=["s4d", "attention"])
    ```
    """

    model_type = "scrolls_ssm_t5"
    attribute_map = {**T5Config.attribute_map, "encoder_layers": "num_layers", "encoder_attention_heads": "num_heads"}

    t5_family: str = "t5"
    encoder_attention_type: str = "full"
    local_radius: int = 127
    global_block_size: int = 16
    max_source_positions: int | None = None
    decoder_start_token_id: int | None = 0

    def __post_init__(self, **kwargs):
        self._default_layout(self.num_layers)
        # T5Config reads `tie_word_embeddings=False` (T5 v1.1, Flan-T5) as "no output scaling", then sets it to True.
        # Here it keeps its own meaning too, whether the LM head is the shared embedding: v1.1 checkpoints have an
        # output layer of their own, which transformers' T5 keeps by not tying weights that differ in the checkpoint.
        # A saved config holds both, already resolved: the saved `scale_decoder_outputs` wins over the re-derivation.
        scale = kwargs.pop("scale_decoder_outputs", None)
        tie = kwargs.get("tie_word_embeddings", None) is not False
        super().__post_init__(**kwargs)
        if scale is not None:
            self.scale_decoder_outputs = bool(scale)
        self.tie_word_embeddings = tie
        self._keep_registered_auto_class()

    def validate_architecture(self):
        """Checks run at construction by `@strict`: every error names the field, the value and what is valid."""
        super().validate_architecture()
        self._require(self.t5_family in T5_FAMILIES, "t5_family", self.t5_family, f"one of {list(T5_FAMILIES)}")
        self._require(
            self.encoder_attention_type in T5_ATTENTION_TYPES,
            "encoder_attention_type",
            self.encoder_attention_type,
            f"one of {list(T5_ATTENTION_TYPES)}",
        )
        self._require(
            self.encoder_attention_type != "transient-global" or self.t5_family == "longt5",
            "encoder_attention_type",
            self.encoder_attention_type,
            "'full' or 'local' (transient-global attention keeps LongT5's global weights: only LongT5 models have it)",
        )
        self._require(
            self.encoder_attention_type == "full" or self.t5_family != "umt5",
            "encoder_attention_type",
            self.encoder_attention_type,
            "'full' for umT5 (its per-layer position tables are built for full attention)",
        )
        for field in ("local_radius", "global_block_size"):
            self._require(getattr(self, field) >= 1, field, getattr(self, field), "an int >= 1")
        self._require(
            self.max_source_positions is None
            or (isinstance(self.max_source_positions, int) and self.max_source_positions >= 1),
            "max_source_positions",
            self.max_source_positions,
            "None (no limit) or an int >= 1",
        )
        self._validate_mixer_fields("num_layers", self.num_layers)


__all__ = ["T5_ATTENTION_TYPES", "T5_FAMILIES", "ScrollsSSMT5Config"]
