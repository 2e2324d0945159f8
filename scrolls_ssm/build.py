"""From a run config to the tokenizer, the model and the optimizer.

This is where the model section of the run config meets transformers and the Hub, so errors from there are turned
into `RunConfigError`s naming the key: an invalid `ScrollsSSMConfig` field (`model.encoder_layer_types`,
`model.config.<field>`), a checkpoint path that does not exist, or a Hub id that cannot be fetched offline.
"""

from __future__ import annotations

import difflib
import inspect
import re
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import torch
from huggingface_hub.errors import HFValidationError, StrictDataclassError
from huggingface_hub.utils import validate_repo_id
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    BartConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5Config,
)

from .config import ModelConfig, RunConfig, RunConfigError
from .convert import load_tokenizer, swap_encoder, t5_attention_window
from .errors import hub_unreachable, offline_note, one_line, reach_hub_hint
from .modeling.configuration_scrolls_ssm import ScrollsSSMConfig
from .modeling.configuration_scrolls_ssm_t5 import ScrollsSSMT5Config
from .modeling.modeling_scrolls_ssm import ScrollsSSMForConditionalGeneration
from .modeling.modeling_scrolls_ssm_t5 import ScrollsSSMT5ForConditionalGeneration
from .optim import ssm_param_groups

_Loaded = TypeVar("_Loaded")
# ScrollsSSMConfig fields that have a model.* key of their own.
_OWN_KEYS = {name: f"model.{name}" for name in ("encoder_layer_types", "max_source_positions", "attention_window")}


def _load_pretrained(key: str, name: str, load: Callable[[str], _Loaded]) -> _Loaded:
    """`load(name)` for a run-config key that names a local folder or a Hub id, with errors that name the key."""
    if not Path(name).expanduser().exists():
        try:
            validate_repo_id(name)
        except HFValidationError:
            raise RunConfigError(
                f"{key}={name!r}: no such folder (and not a Hub id of the form owner/name either). Fix: give the "
                "folder of a saved checkpoint (written by save_pretrained) or a Hub id such as facebook/bart-base."
            ) from None
    try:
        return load(name)
    except Exception as error:
        if not hub_unreachable(error):
            raise
        raise RunConfigError(
            f"{key}={name!r}: could not reach the Hugging Face Hub{offline_note()} to download it, and it is neither "
            f"in the local Hub cache nor a local folder. Fix: set {key} to a local folder holding the checkpoint "
            f"(fetch it where the Hub is reachable with `hf download {name} --local-dir DIR`, or save_pretrained), "
            f"{reach_hub_hint()}."
        ) from error


def _dotted_key(field: str) -> str:
    """The run-config key of a ScrollsSSMConfig field: `model.<field>` for those with their own key, else
    `model.config.<field>`."""
    return _OWN_KEYS.get(field, f"model.config.{field}")


def _config_field_error(error: StrictDataclassError) -> RunConfigError:
    """A ScrollsSSMConfig validation error, reworded to name the run-config key."""
    text = " ".join(str(error.__cause__ or error).split())
    text, named = re.subn(r"ScrollsSSM(?:T5)?Config\.(\w+)", lambda match: _dotted_key(match.group(1)), text)
    if not named:  # a type error of the strict dataclass: "Field 'd_model' with value 'x' doesn't match ..."
        field = re.search(r"[Ff]ield '(\w+)'", str(error))
        text = f"{_dotted_key(field.group(1)) if field else 'model.config'}: {text}"
    return RunConfigError(text)


# model.family -> the config class a from-scratch model is built from
_FAMILY_CONFIGS = {"bart": ScrollsSSMConfig, "t5": ScrollsSSMT5Config}
# Fields this toolkit adds to each family's transformers config: the only model.config keys allowed with model.base.
_ADDED_FIELDS = (set(ScrollsSSMConfig.__dataclass_fields__) - set(BartConfig.__dataclass_fields__)) | (
    set(ScrollsSSMT5Config.__dataclass_fields__) - set(T5Config.__dataclass_fields__)
)


def _check_config_keys(model_cfg: ModelConfig) -> None:
    """model.config holds fields of the family's config only; with model.base, only those the checkpoint does not
    fix (the mixer fields and their kin)."""
    swapping = bool(model_cfg.base and not model_cfg.init_from)
    config_cls = _FAMILY_CONFIGS[model_cfg.family]
    families = _FAMILY_CONFIGS.values() if swapping else [config_cls]  # with model.base, either family's fields
    fields = sorted({name for cls in families for name in cls.__dataclass_fields__ if not name.startswith("_")})
    for key, value in model_cfg.config.items():
        if key in _OWN_KEYS:
            raise RunConfigError(f"model.config.{key}={value!r}: set {_OWN_KEYS[key]} instead (it has its own key).")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"Did you mean {close[0]!r}?" if close else f"See {config_cls.__name__} for the valid fields."
            scope = "" if swapping else f" for model.family={model_cfg.family}"
            raise RunConfigError(f"unknown model.config key {key!r} (model.config.{key}={value!r}){scope}. {hint}")
        if swapping and key not in _ADDED_FIELDS:
            raise RunConfigError(
                f"model.config.{key}={value!r}: with model.base ({model_cfg.base!r}), the architecture comes from "
                "the checkpoint, so model.config may only set the mixer fields (ssm_*, s4d_*, mamba_*, mamba2_*, "
                "gss_*, ...) here. Fix: drop it, or set model.base=null to build the architecture from model.config."
            )


def build_tokenizer(
    model_cfg: ModelConfig, tokenizer_dir: Path, training_texts: Callable[[], Iterable[str]]
) -> PreTrainedTokenizerBase:
    """The run's tokenizer. It is saved in `tokenizer_dir` on first use and read from there afterwards, so a resumed
    run (or the other processes of a multi-process run) uses exactly the same one."""
    if (tokenizer_dir / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    elif model_cfg.init_from or model_cfg.tokenizer or model_cfg.base:
        key = "model.init_from" if model_cfg.init_from else "model.tokenizer" if model_cfg.tokenizer else "model.base"
        tokenizer = _load_pretrained(key, model_cfg.init_from or model_cfg.tokenizer or model_cfg.base, load_tokenizer)
    else:
        from .synthetic import train_sentencepiece_tokenizer

        try:
            tokenizer = train_sentencepiece_tokenizer(
                training_texts(),
                tokenizer_dir / "_sentencepiece",
                vocab_size=model_cfg.tokenizer_vocab_size,
                style=model_cfg.family,  # T5's special-token layout for model.family=t5
            )
        except RuntimeError as error:
            if "vocab_size" not in str(error):  # SentencePiece's own check; anything else is not the config's fault
                raise
            raise RunConfigError(
                f"model.tokenizer_vocab_size={model_cfg.tokenizer_vocab_size} does not fit the training texts "
                f"(SentencePiece: {one_line(error)}). Fix: raise model.tokenizer_vocab_size (the demo uses 2000)."
            ) from error
    tokenizer.model_max_length = model_cfg.max_source_positions
    tokenizer.truncation_side = "right"  # SCROLLS inputs start with the query
    if not (tokenizer_dir / "tokenizer_config.json").is_file():
        tokenizer.save_pretrained(tokenizer_dir)
    return tokenizer


def build_model(model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Swap the encoder of `base`, load `init_from` (a scrolls_ssm model, or a peer such as LED or BART), or build
    from scratch from `model.config`."""
    layout = {"max_source_positions": model_cfg.max_source_positions, "attention_window": model_cfg.attention_window}
    _check_config_keys(model_cfg)
    try:
        model = _build(model_cfg, tokenizer, layout)
    except StrictDataclassError as error:
        raise _config_field_error(error) from error
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {model.config.vocab_size}; "
            "use the tokenizer that belongs to model.base / model.init_from."
        )
    set_attention_implementation(model, model_cfg.attn_implementation)
    if model_cfg.activation_checkpointing:
        model.activation_checkpointing_enable()
    return model


def set_attention_implementation(model: PreTrainedModel, requested: str) -> None:
    """Use `requested` (model.attn_implementation) where the model's class has it; a peer whose attention has no such
    path (LongT5: eager only; a T5-family model of this toolkit: no FlashAttention, whose kernels take no position
    bias) gets the best path it has, with a warning, instead of failing the run."""
    supported = {"eager": True, "sdpa": model._supports_sdpa, "flash_attention_2": model._supports_flash_attn}
    if not supported.get(requested, True):
        fallback = "sdpa" if model._supports_sdpa else "eager"
        warnings.warn(
            f"model.attn_implementation={requested!r}: {type(model).__name__} has no {requested} attention; "
            f"using {fallback!r}.",
            stacklevel=2,
        )
        requested = fallback
    model.set_attn_implementation(requested)


def _build(
    model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, layout: dict[str, int | None]
) -> PreTrainedModel:
    if model_cfg.init_from:
        # A scrolls_ssm model to fine-tune further, or a peer (BART, LED, ...) trained and scored as it is, e.g. as a
        # baseline beside swapped models; model.base is what swaps a BART / LED encoder.
        model = _load_pretrained("model.init_from", model_cfg.init_from, AutoModelForSeq2SeqLM.from_pretrained)
    elif model_cfg.base:
        base_config = _load_pretrained("model.base", model_cfg.base, AutoConfig.from_pretrained)
        count = encoder_layer_count(base_config)
        layers = model_cfg.encoder_layer_types or ["attention"] * count
        if len(layers) != count:
            example = ",".join(["s4d"] * (count - 1) + ["attention"])
            raise RunConfigError(
                f"model.encoder_layer_types={layers!r} is invalid: expected one entry per encoder layer, and "
                f"model.base {model_cfg.base!r} has {count} encoder layers. Fix: give {count} mixer kinds, e.g. "
                f"model.encoder_layer_types=[{example}]."
            )
        model = _load_pretrained(
            "model.base", model_cfg.base, lambda name: swap_encoder(name, layers, **layout, **model_cfg.config)
        )
    elif model_cfg.family == "t5":
        model = ScrollsSSMT5ForConditionalGeneration(_t5_config_from_scratch(model_cfg, tokenizer))
    else:
        special = {
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "decoder_start_token_id": tokenizer.eos_token_id,
            "forced_eos_token_id": tokenizer.eos_token_id,
        }
        fields = {**special, **model_cfg.config, **layout}
        if model_cfg.encoder_layer_types is not None:
            fields["encoder_layer_types"] = model_cfg.encoder_layer_types
            fields.setdefault("encoder_layers", len(model_cfg.encoder_layer_types))
        model = ScrollsSSMForConditionalGeneration(ScrollsSSMConfig(**fields))
    return model


def _t5_config_from_scratch(model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> ScrollsSSMT5Config:
    """A T5-family architecture from model.config; the decoder starts from the pad token, as T5's does."""
    fields = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "decoder_start_token_id": tokenizer.pad_token_id,
        **model_cfg.config,
        "max_source_positions": model_cfg.max_source_positions,
        **t5_attention_window(model_cfg.attention_window),
    }
    if model_cfg.encoder_layer_types is not None:
        fields["encoder_layer_types"] = model_cfg.encoder_layer_types
        fields.setdefault("num_layers", len(model_cfg.encoder_layer_types))
    return ScrollsSSMT5Config(**fields)


def encoder_layer_count(config: PretrainedConfig) -> int:
    """The number of encoder layers of a BART / LED (`encoder_layers`) or T5-family (`num_layers`) config."""
    count = getattr(config, "encoder_layers", None)
    return count if isinstance(count, int) else config.num_layers


def encoder_length_limit(config: PretrainedConfig) -> int:
    """The longest input the model's encoder takes: its learned positions (`max_source_positions` here,
    `max_encoder_position_embeddings` in LED, `max_position_embeddings` in BART); unbounded without a table."""
    for name in ("max_source_positions", "max_encoder_position_embeddings", "max_position_embeddings"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return sys.maxsize


def uses_global_attention(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes LED's `global_attention_mask` (the collator then sets one)."""
    return "global_attention_mask" in inspect.signature(model.forward).parameters


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW over `optim.ssm_param_groups`: decayed weights, undecayed biases and norms, and the state-space
    parameters that carry an optimizer hint (their own lr, no weight decay). Trainer users get the same groups."""
    return torch.optim.AdamW(
        ssm_param_groups(model, weight_decay=cfg.train.weight_decay),
        lr=cfg.train.learning_rate,
        betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
        eps=cfg.train.adam_epsilon,
    )
