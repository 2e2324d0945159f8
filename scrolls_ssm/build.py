"""From a run config to the tokenizer, the model and the optimizer."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedTokenizerBase

from .config import ModelConfig, RunConfig
from .modeling.configuration_scrolls_ssm import ScrollsSSMConfig
from .convert import load_tokenizer, swap_encoder
from .modeling.mixer_base import optim_hints
from .modeling.modeling_scrolls_ssm import ScrollsSSMForConditionalGeneration


def build_tokenizer(
    model_cfg: ModelConfig, tokenizer_dir: Path, training_texts: Callable[[], Iterable[str]]
) -> PreTrainedTokenizerBase:
    """The run's tokenizer. It is saved in `tokenizer_dir` on first use and read from there afterwards, so a resumed
    run (or the other processes of a multi-process run) uses exactly the same one."""
    if (tokenizer_dir / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    elif model_cfg.init_from or model_cfg.tokenizer or model_cfg.base:
        tokenizer = load_tokenizer(model_cfg.init_from or model_cfg.tokenizer or model_cfg.base)
    else:
        from .synthetic import train_sentencepiece_tokenizer

        tokenizer = train_sentencepiece_tokenizer(
            training_texts(), tokenizer_dir / "_sentencepiece", vocab_size=model_cfg.tokenizer_vocab_size
        )
    tokenizer.model_max_length = model_cfg.max_source_positions
    tokenizer.truncation_side = "right"  # SCROLLS inputs start with the query
    if not (tokenizer_dir / "tokenizer_config.json").is_file():
        tokenizer.save_pretrained(tokenizer_dir)
    return tokenizer


def build_model(model_cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> ScrollsSSMForConditionalGeneration:
    """Swap the encoder of `base`, load `init_from`, or build from scratch from `model.config`."""
    layout = {"max_source_positions": model_cfg.max_source_positions, "attention_window": model_cfg.attention_window}
    if model_cfg.init_from:
        model = AutoModelForSeq2SeqLM.from_pretrained(model_cfg.init_from)
        if not isinstance(model, ScrollsSSMForConditionalGeneration):
            raise ValueError(
                f"model.init_from={model_cfg.init_from!r} holds a {type(model).__name__}, not a scrolls_ssm model. "
                "Use model.base for BART / LED checkpoints."
            )
    elif model_cfg.base:
        layers = (
            model_cfg.encoder_layer_types or ["attention"] * AutoConfig.from_pretrained(model_cfg.base).encoder_layers
        )
        model = swap_encoder(model_cfg.base, layers, **layout, **model_cfg.config)
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
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {model.config.vocab_size}; "
            "use the tokenizer that belongs to model.base / model.init_from."
        )
    model.set_attn_implementation(model_cfg.attn_implementation)
    if model_cfg.activation_checkpointing:
        model.activation_checkpointing_enable()
    return model


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW with three kinds of group: decayed weights, undecayed biases / norms / embeddings' padding-free
    vectors, and the state-space parameters that carry an `_optim` hint (their own lr, no weight decay)."""
    hints = optim_hints(model)
    decay, no_decay, hinted = [], [], {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        hint = hints.get(name)
        if hint is not None:
            key = tuple(sorted(hint.items()))
            hinted.setdefault(key, []).append(parameter)
        elif parameter.dim() < 2 or "norm" in name:
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    groups = [
        {"params": decay, "weight_decay": cfg.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups += [{"params": params, **dict(key)} for key, params in hinted.items()]
    return torch.optim.AdamW(
        [group for group in groups if group["params"]],
        lr=cfg.train.learning_rate,
        betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
        eps=cfg.train.adam_epsilon,
    )
