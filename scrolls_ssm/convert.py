"""Seed a ScrollsSSM model from a pretrained checkpoint, swapping the encoder's mixers layer by layer.

Two families of checkpoints:
- BART and LED give a `ScrollsSSMForConditionalGeneration`. Kept: the shared embeddings, the whole decoder, the LM
  head (tied) and logits bias, and for every encoder layer its FFN and both layer norms; `attention` layers also keep
  their q/k/v/out projections. New: the mixers of the other kinds (their own initialization) and learned positions
  beyond the checkpoint's, which are the pretrained ones tiled (as LED was made from BART).
- T5 (and Flan-T5, T5 v1.1), mT5, umT5 and LongT5 give a `ScrollsSSMT5ForConditionalGeneration`. Kept: the shared
  embeddings, the whole decoder, the LM head, the encoder's final norm, and for every encoder layer its FFN sublayer
  and its pre-attention norm; `attention` layers keep their q/k/v/o projections (and LongT5's global-token norm), and
  the relative position bias goes to the first `attention` layer (umT5: each layer keeps its own). There is no
  position table to extend: the T5 family has none.
"""

from __future__ import annotations

import os

import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    BartConfig,
    BartForConditionalGeneration,
    LEDForConditionalGeneration,
    LongT5ForConditionalGeneration,
    MT5ForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5Config,
    T5ForConditionalGeneration,
    UMT5ForConditionalGeneration,
)

from .modeling.configuration_scrolls_ssm import ScrollsSSMConfig
from .modeling.configuration_scrolls_ssm_t5 import T5_FAMILIES, ScrollsSSMT5Config
from .modeling.modeling_scrolls_ssm import ScrollsSSMForConditionalGeneration
from .modeling.modeling_scrolls_ssm_t5 import ScrollsSSMT5ForConditionalGeneration

# model_type -> (model class, parameter prefix, example checkpoints for error messages)
SUPPORTED_FAMILIES = {
    "bart": (BartForConditionalGeneration, "model", "facebook/bart-base, facebook/bart-large"),
    "led": (LEDForConditionalGeneration, "led", "allenai/led-base-16384, allenai/led-large-16384"),
    "t5": (T5ForConditionalGeneration, "", "google-t5/t5-base, google/flan-t5-base, google/t5-v1_1-base"),
    "mt5": (MT5ForConditionalGeneration, "", "google/mt5-base"),
    "umt5": (UMT5ForConditionalGeneration, "", "google/umt5-base"),
    "longt5": (LongT5ForConditionalGeneration, "", "google/long-t5-tglobal-base, google/long-t5-local-base"),
}
# BART's learned positions start at row 2 (a fairseq legacy); LED's start at row 0.
_BART_POSITION_OFFSET = 2


def _unsupported(model_type: str) -> ValueError:
    supported = "; ".join(f"{family} ({examples})" for family, (_, _, examples) in SUPPORTED_FAMILIES.items())
    return ValueError(
        f"swap_encoder cannot convert a checkpoint of model_type={model_type!r}. Supported families: {supported}."
    )


def swap_encoder(
    model_or_path: PreTrainedModel | str | os.PathLike,
    encoder_layer_types: list[str],
    max_source_positions: int = 16384,
    return_tokenizer: bool = False,
    **config_overrides,
) -> ScrollsSSMForConditionalGeneration | tuple[ScrollsSSMForConditionalGeneration, PreTrainedTokenizerBase]:
    """Build a model of this toolkit from a BART, LED or T5-family checkpoint.

    Args:
        model_or_path: a BART, LED, T5 (Flan-T5, T5 v1.1), mT5, umT5 or LongT5 `...ForConditionalGeneration`, or a
            local path or Hub id of one (`facebook/bart-base`, `allenai/led-base-16384`, `google/flan-t5-base`,
            `google/long-t5-tglobal-base`, ...).
        encoder_layer_types: one mixer kind per encoder layer, e.g. `["s4d"] * 5 + ["attention"]`.
        max_source_positions: the new encoder length limit. BART / LED: learned positions are tiled up to it. T5
            family: a limit only (there is no position table); `None` means none.
        return_tokenizer: also load the checkpoint's tokenizer (only with a path), with `model_max_length` set to
            `max_source_positions`, and return `(model, tokenizer)`.
        **config_overrides: other config fields, e.g. `attention_window=1024`, `s4d_d_state=64`. For the T5 family,
            `attention_window=w` makes `attention` layers LongT5's local attention with radius w.

    Returns a `ScrollsSSMForConditionalGeneration` for BART / LED, a `ScrollsSSMT5ForConditionalGeneration` for the
    T5 family. With every layer `attention` (and, for BART, inputs no longer than the checkpoint's positions), the
    result computes exactly what the checkpoint computes.
    """
    if isinstance(model_or_path, (str, os.PathLike)):
        source_config = AutoConfig.from_pretrained(model_or_path)
        if source_config.model_type not in SUPPORTED_FAMILIES:
            raise _unsupported(source_config.model_type)
        source = SUPPORTED_FAMILIES[source_config.model_type][0].from_pretrained(model_or_path)
    elif isinstance(model_or_path, PreTrainedModel):
        if return_tokenizer:
            raise ValueError("return_tokenizer=True needs a path or Hub id to load the tokenizer from, not a model.")
        source = model_or_path
    else:
        raise TypeError(
            f"model_or_path must be a BART-family model or a path / Hub id, not {type(model_or_path).__name__}."
        )
    family = source.config.model_type
    if family not in SUPPORTED_FAMILIES or not isinstance(source, SUPPORTED_FAMILIES[family][0]):
        raise _unsupported(family if family in SUPPORTED_FAMILIES else f"{family} ({type(source).__name__})")

    if family in T5_FAMILIES:
        head, shared = source.get_output_embeddings().weight, source.get_input_embeddings().weight
        tied_head = head.shape == shared.shape and torch.equal(head, shared)
        config = _scrolls_t5_config(
            source.config, encoder_layer_types, max_source_positions, config_overrides, tied_head
        )
        model = ScrollsSSMT5ForConditionalGeneration(config)
        state = _convert_t5_state_dict(source, config)
    else:
        config = _scrolls_config(source.config, encoder_layer_types, max_source_positions, config_overrides)
        model = ScrollsSSMForConditionalGeneration(config)
        state = _convert_state_dict(source, config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    new_mixer_params = {
        name
        for name in model.state_dict()
        if ".encoder.layers." in name
        and ".mixer." in name
        and config.encoder_layer_types[_layer_of(name)] != "attention"
    }
    tied = {"model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"}
    assert not unexpected and set(missing) <= new_mixer_params | tied, (missing, unexpected)
    model.tie_weights()
    model.to(next(source.parameters()).dtype)
    if return_tokenizer:
        return model, load_tokenizer(model_or_path, max_source_positions)
    return model


def load_tokenizer(
    name_or_path: str | os.PathLike, max_source_positions: int | None = 16384
) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, allowed to produce up to `max_source_positions` tokens (None: no limit)."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    tokenizer.model_max_length = max_source_positions if max_source_positions is not None else int(1e30)
    return tokenizer


def _layer_of(param_name: str) -> int:
    return int(param_name.split(".encoder.layers.")[1].split(".")[0])


def _scrolls_config(source_config, encoder_layer_types, max_source_positions, overrides) -> ScrollsSSMConfig:
    """The source's architecture, in the fields BART and ScrollsSSM share, plus the new encoder layout."""
    fields = {
        name: getattr(source_config, name)
        for name in BartConfig.__dataclass_fields__
        if hasattr(source_config, name) and name not in ("max_position_embeddings", "attention_window")
    }
    if source_config.model_type == "led":
        fields["max_position_embeddings"] = source_config.max_decoder_position_embeddings
    else:
        fields["max_position_embeddings"] = source_config.max_position_embeddings
    return ScrollsSSMConfig(
        **fields,
        encoder_layer_types=list(encoder_layer_types),
        max_source_positions=max_source_positions,
        **overrides,
    )


def tile_positions(pretrained: torch.Tensor, length: int) -> torch.Tensor:
    """(n, d) learned positions -> (length, d), repeating the pretrained table as often as needed."""
    repeats = -(-length // pretrained.shape[0])
    return pretrained.repeat(repeats, 1)[:length]


def _convert_state_dict(source: PreTrainedModel, config: ScrollsSSMConfig) -> dict[str, torch.Tensor]:
    family = source.config.model_type
    prefix = SUPPORTED_FAMILIES[family][1]
    offset = 0 if family == "led" else _BART_POSITION_OFFSET
    source_state = source.state_dict()
    state: dict[str, torch.Tensor] = {}
    for name, tensor in source_state.items():
        if not name.startswith(f"{prefix}."):
            state[name] = tensor  # lm_head.weight, final_logits_bias
            continue
        name = "model." + name[len(prefix) + 1 :]
        if name.startswith("model.encoder.layers."):
            mapped = _encoder_layer_param(name, config)
            if mapped is not None:
                state[mapped] = tensor
        elif name == "model.encoder.embed_positions.weight" and config.encoder_positions == "none":
            continue  # an encoder without a position table: the pretrained one is dropped
        elif name.endswith("embed_positions.weight"):
            limit = config.max_source_positions if ".encoder." in name else config.max_position_embeddings
            positions = tile_positions(tensor[offset:], limit)
            # Rows before the offset are never looked up; keep BART's so a plain BART round-trips exactly.
            head = (
                tensor[:_BART_POSITION_OFFSET]
                if offset
                else positions.new_zeros(_BART_POSITION_OFFSET, positions.shape[1])
            )
            state[name] = torch.cat([head, positions])
        else:
            state[name] = tensor
    return state


# Encoder-layer parameters that survive a swap, source name -> ours. `None` drops the parameter.
_ATTENTION_NAMES = {
    "self_attn.q_proj": "mixer.q_proj",  # BART
    "self_attn.k_proj": "mixer.k_proj",
    "self_attn.v_proj": "mixer.v_proj",
    "self_attn.out_proj": "mixer.out_proj",
    "self_attn.longformer_self_attn.query": "mixer.q_proj",  # LED's local attention
    "self_attn.longformer_self_attn.key": "mixer.k_proj",
    "self_attn.longformer_self_attn.value": "mixer.v_proj",
    "self_attn.output": "mixer.out_proj",
}
_BLOCK_NAMES = {
    "self_attn_layer_norm": "mixer_layer_norm",
    "fc1": "fc1",
    "fc2": "fc2",
    "final_layer_norm": "final_layer_norm",
}


def _encoder_layer_param(name: str, config: ScrollsSSMConfig) -> str | None:
    # name: model.encoder.layers.{i}.{module path}.{weight|bias}
    head, rest = name.split(".encoder.layers.")
    index, module_path = rest.split(".", 1)
    module, param = module_path.rsplit(".", 1)
    layer = f"{head}.encoder.layers.{index}"
    if module in _BLOCK_NAMES:
        return f"{layer}.{_BLOCK_NAMES[module]}.{param}"
    if module in _ATTENTION_NAMES and config.encoder_layer_types[int(index)] == "attention":
        return f"{layer}.{_ATTENTION_NAMES[module]}.{param}"
    return None  # attention weights of a layer that now has another mixer, LED's global projections


def _scrolls_t5_config(
    source_config, encoder_layer_types, max_source_positions, overrides, tied_lm_head: bool = True
) -> ScrollsSSMT5Config:
    """The source's T5-family architecture plus the new encoder layout. `attention_window=w` (the toolkit's key for
    local attention) becomes LongT5's local attention with radius w: each token sees w tokens either side.
    `tied_lm_head`: whether the source's LM head is its shared embedding (False for T5 v1.1 / Flan-T5 / mT5 weights;
    transformers' T5 keeps such an output layer, and so does the swapped model)."""
    family = source_config.model_type
    fields = {
        name: getattr(source_config, name) for name in T5Config.__dataclass_fields__ if hasattr(source_config, name)
    }
    # T5 checkpoints start decoding from the pad token; their configs say so, a bare T5Config may not.
    fields["decoder_start_token_id"] = getattr(source_config, "decoder_start_token_id", None)
    if fields["decoder_start_token_id"] is None:
        fields["decoder_start_token_id"] = source_config.pad_token_id
    # mT5's own model never scales its decoder output; T5, umT5 and LongT5 do when their config says so.
    fields["scale_decoder_outputs"] = bool(getattr(source_config, "scale_decoder_outputs", False))
    fields["tie_word_embeddings"] = tied_lm_head
    if family == "longt5":
        fields["local_radius"] = source_config.local_radius
        fields["global_block_size"] = source_config.global_block_size
        fields["encoder_attention_type"] = source_config.encoder_attention_type
    overrides = dict(overrides)
    overrides.pop("encoder_positions", None)  # BART's position-table switch: a T5-family encoder has no table
    window = t5_attention_window(overrides.pop("attention_window", None), fields.get("encoder_attention_type"))
    fields.update(window)
    return ScrollsSSMT5Config(
        **fields,
        t5_family=family,
        encoder_layer_types=list(encoder_layer_types),
        max_source_positions=max_source_positions,
        **overrides,
    )


def t5_attention_window(window: int | None, attention_type: str | None = None) -> dict:
    """The T5-family config fields for the toolkit's `attention_window`: none for None; else LongT5's local attention
    with radius `window` (each token sees `window` tokens either side), or that radius for the local part of an
    `attention_type` that is already local or transient-global."""
    if window is None:
        return {}
    kind = attention_type if attention_type in ("local", "transient-global") else "local"
    return {"local_radius": window, "encoder_attention_type": kind}


_T5_ATTENTION_MODULES = ("SelfAttention", "LocalSelfAttention", "TransientGlobalSelfAttention")
_T5_POSITION_TABLES = ("relative_attention_bias", "global_relative_attention_bias")


def _convert_t5_state_dict(source: PreTrainedModel, config: ScrollsSSMT5Config) -> dict[str, torch.Tensor]:
    """T5-family parameter names -> ours. The encoder's `block.{i}.layer.0` (norm + attention) becomes
    `layers.{i}.mixer_layer_norm` / `layers.{i}.mixer`, `block.{i}.layer.1` (the FFN sublayer) becomes `layers.{i}.ff`;
    the relative position tables of block 0 move to the first attention layer (umT5: every block keeps its own)."""
    attention_layers = [i for i, kind in enumerate(config.encoder_layer_types) if kind == "attention"]
    state: dict[str, torch.Tensor] = {}
    for name, tensor in source.state_dict().items():
        if name == "encoder.embed_tokens.weight" or name == "decoder.embed_tokens.weight":
            continue  # tied to shared
        if not name.startswith("encoder.block."):
            state[name if name == "lm_head.weight" else f"model.{name}"] = tensor
            continue
        index, _, sublayer, rest = name[len("encoder.block.") :].split(".", 3)  # {i}.layer.{0|1}.{rest}
        layer = int(index)
        if sublayer == "1":
            state[f"model.encoder.layers.{layer}.ff.{rest}"] = tensor
            continue
        module, path = rest.split(".", 1)
        if module == "layer_norm":
            state[f"model.encoder.layers.{layer}.mixer_layer_norm.{path}"] = tensor
        elif module in _T5_ATTENTION_MODULES:
            if path.startswith("global_") and config.encoder_attention_type != "transient-global":
                continue  # LongT5's global-token weights, unused by full or local attention
            if path.split(".")[0] in _T5_POSITION_TABLES and config.t5_family != "umt5":
                layer = attention_layers[0] if attention_layers else None
            if layer is not None and config.encoder_layer_types[layer] == "attention":
                state[f"model.encoder.layers.{layer}.mixer.{path}"] = tensor
    return state
