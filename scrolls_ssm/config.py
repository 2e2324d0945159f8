"""The run config: one typed tree, resolved as defaults < recipe YAML < `key=value` overrides.

    cfg = load_run_config("recipes/gov_report.yaml", ["model.encoder_layer_types=[s4d,s4d,s4d,s4d,s4d,attention]"])

Unknown keys are errors that name the key and the closest valid one; values are checked against the field's type.
The resolved config is written (as YAML) beside every checkpoint and output, and `load_run_config` reads it back.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ModelConfig:
    # A BART, LED or T5-family (T5, Flan-T5, mT5, umT5, LongT5) checkpoint (Hub id or path) whose encoder is swapped;
    # None trains from scratch (see `config` and `family`).
    base: str | None = "facebook/bart-base"
    # The architecture built from scratch when `base` is None: "bart" (ScrollsSSMConfig) or "t5" (ScrollsSSMT5Config:
    # pre-norm RMS-norm blocks, gated FFN if model.config says so, relative positions, T5's decoder). With `base`, the
    # checkpoint decides.
    family: str = "bart"
    # A saved scrolls_ssm model directory to start from instead (e.g. to fine-tune further); overrides `base`.
    init_from: str | None = None
    # One mixer kind per encoder layer; None keeps every layer `attention` (plain BART, longer positions).
    encoder_layer_types: list[str] | None = None
    max_source_positions: int = 16384
    attention_window: int | None = None
    # Any other ScrollsSSMConfig field: mixer hyper-parameters, or the whole architecture when `base` is None.
    config: dict[str, Any] = field(default_factory=dict)
    # Tokenizer to load (defaults to `base`); with `base` None and no tokenizer, a SentencePiece tokenizer of
    # `tokenizer_vocab_size` is trained on the training inputs.
    tokenizer: str | None = None
    tokenizer_vocab_size: int = 2000
    attn_implementation: str = "sdpa"
    activation_checkpointing: bool = False


@dataclass
class DataConfig:
    # SCROLLS task names; several tasks train one model on all of them and evaluate each with its own metric.
    tasks: list[str] = field(default_factory=lambda: ["gov_report"])
    # A local folder / zip of SCROLLS files; None reads the official files from the Hub.
    data_dir: str | None = None
    # Write the synthetic demo dataset into `data_dir` first (see scrolls_ssm.synthetic).
    synthetic: dict[str, Any] | None = None
    # None: the task's default (SCROLLS: 16,384-token inputs; task-specific targets).
    max_source_length: int | None = None
    max_target_length: int | None = None
    max_tokens_per_batch: int = 16384
    pad_to_multiple_of: int | None = 8
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    eval_split: str = "validation"
    # Splits to predict at the end ("test" also writes the leaderboard submission).
    predict_splits: list[str] = field(default_factory=lambda: ["validation", "test"])
    num_proc: int | None = None
    cache_dir: str | None = None


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 42
    num_epochs: int = 1
    # Stop after this many optimizer steps (None: run all epochs).
    max_steps: int | None = None
    learning_rate: float = 5e-5
    weight_decay: float = 0.001
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_epsilon: float = 1e-6
    warmup_ratio: float = 0.1
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    # "auto": bf16 on a GPU that has it, else float32 (T5-family models overflow in fp16; bf16 has float32's range).
    mixed_precision: str = "auto"
    # Write a resumable checkpoint every N optimizer steps (and at every epoch end); keep the newest `keep`.
    checkpoint_every_steps: int | None = None
    keep_checkpoints: int = 2
    log_every_steps: int = 10
    # Continue the run in output_dir exactly where it stopped: "auto" (its newest complete checkpoint, or a fresh
    # start when there is none), "latest" (its newest complete checkpoint, which must exist) or a checkpoint folder.
    resume: str | None = None
    # Clear a non-empty output_dir and start anew (without it or `resume`, a used output_dir is refused).
    overwrite_output_dir: bool = False
    # On a Linux CPU, keep freed memory in the process instead of returning it to the kernel (glibc's mallopt), so a
    # step reuses the last one's pages: 16K-token steps ran 1.4-2.2x faster, peak memory up to 1.4x higher
    # (docs/training.md). GPU runs are not affected.
    retain_freed_memory: bool = True


@dataclass
class EvalConfig:
    # Generate and score the eval split every N epochs (validation loss is computed every epoch); None: at the end.
    generate_every_epochs: int | None = None
    # The metric that picks the best checkpoint: "loss" (validation loss, lower is better) or "score" (the mean
    # task score of the SCROLLS metric, higher is better; needs generation at each evaluation).
    best_metric: str = "loss"
    num_beams: int = 1
    # None: the task's default.
    max_new_tokens: int | None = None
    max_tokens_per_batch: int = 32768
    # After training, also score the best model on the eval split with every input cut to its first N tokens, for each
    # N listed: what it gains from reading further. The report adds a column per N; empty: off.
    truncated_source_lengths: list[int] = field(default_factory=list)


@dataclass
class TransferConfig:
    """A stage between building the swapped model and fine-tuning it: the new mixers learn what model.base's attention
    layers did (docs/transfer.md). Off while `steps` and `distill_steps` are both 0."""

    # Layer-wise attention transfer: optimizer steps (0: skip) and AdamW learning rate.
    steps: int = 0
    learning_rate: float = 1e-3
    # Start every mamba / mamba2 layer from the attention it replaces (x <- V, B <- K, C <- Q, out <- O) before
    # transfer.
    reuse_weights: bool = False
    # Unlabeled documents: SCROLLS .jsonl files (their inputs) or text files; null: the training inputs of data.tasks.
    documents: list[str] | None = None
    max_documents: int | None = None
    # Tokens per document (null: the training source length) and per batch (null: data.max_tokens_per_batch).
    max_length: int | None = None
    max_tokens_per_batch: int | None = None
    # Block-local attention for the teacher where full attention over max_length does not fit.
    teacher_window: int | None = None
    # Then the end-to-end stage: the original's output distributions distilled on text-infilling batches, cut to the
    # original's position limit. distill_train: the parameters that learn (mixers, encoder or all).
    distill_steps: int = 0
    distill_learning_rate: float = 1e-4
    distill_train: str = "mixers"
    # Save the stage's state every N steps (and at its end); an interrupted run resumes it with train.resume=auto.
    checkpoint_every_steps: int | None = None
    # Batches averaged per optimizer step of both stages, dealt out over the processes (null: one per process, so
    # N processes take N batches a step, as data-parallel training does).
    batches_per_step: int | None = None


@dataclass
class RunConfig:
    recipe: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with 1.2's scalars: only true/false are booleans (so `mixed_precision: no` stays the string "no") and
    `1e-4` is a float."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


def _parse_yaml(text: str):
    return yaml.load(text, Loader=_Yaml12Loader)


CHOICES = {
    "train.mixed_precision": ("auto", "no", "bf16", "fp16"),
    "model.family": ("bart", "t5"),
    "eval.best_metric": ("loss", "score"),
    "model.attn_implementation": ("eager", "sdpa", "flash_attention_2"),
    "data.eval_split": ("train", "validation", "test"),
    "transfer.distill_train": ("mixers", "encoder", "all"),
}


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric key: `low` <= value <= `high` (either bound may be open or absent)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {low}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def _number(value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


_POSITIVE = Range(1)
# Every int / float key of the run config and its valid values (None, where a key allows it, is always valid).
# tests/test_recipes.py checks that every numeric field is listed here.
RANGES: dict[str, Range] = {
    "model.max_source_positions": _POSITIVE,
    "model.attention_window": _POSITIVE,
    "model.tokenizer_vocab_size": _POSITIVE,
    "data.max_source_length": _POSITIVE,
    "data.max_target_length": _POSITIVE,
    "data.max_tokens_per_batch": _POSITIVE,
    "data.pad_to_multiple_of": _POSITIVE,
    "data.max_train_samples": _POSITIVE,
    "data.max_eval_samples": _POSITIVE,
    "data.num_proc": _POSITIVE,
    "train.seed": Range(0, 2**32 - 1),  # numpy's seed range (accelerate's set_seed seeds numpy too)
    "train.num_epochs": Range(0),  # 0 only with train.max_steps (see _check)
    "train.max_steps": Range(0),  # 0: no training step (how `evaluate` and `predict` run)
    "train.learning_rate": Range(0, low_open=True),
    "train.weight_decay": Range(0),
    "train.adam_beta1": Range(0, 1, high_open=True),
    "train.adam_beta2": Range(0, 1, high_open=True),
    "train.adam_epsilon": Range(0, low_open=True),
    "train.warmup_ratio": Range(0, 1),
    "train.gradient_accumulation_steps": _POSITIVE,
    "train.max_grad_norm": Range(0),  # 0 turns clipping off
    "train.checkpoint_every_steps": _POSITIVE,
    "train.keep_checkpoints": _POSITIVE,
    "train.log_every_steps": _POSITIVE,
    "eval.generate_every_epochs": _POSITIVE,
    "eval.num_beams": _POSITIVE,
    "eval.max_new_tokens": _POSITIVE,
    "eval.max_tokens_per_batch": _POSITIVE,
    "eval.truncated_source_lengths": _POSITIVE,
    "transfer.steps": Range(0),
    "transfer.learning_rate": Range(0, low_open=True),
    "transfer.max_documents": _POSITIVE,
    "transfer.max_length": _POSITIVE,
    "transfer.max_tokens_per_batch": _POSITIVE,
    "transfer.teacher_window": _POSITIVE,
    "transfer.distill_steps": Range(0),
    "transfer.distill_learning_rate": Range(0, low_open=True),
    "transfer.checkpoint_every_steps": _POSITIVE,
    "transfer.batches_per_step": _POSITIVE,
}


class RunConfigError(ValueError):
    """A recipe or override that does not fit the run config; the message names the key, the value and the fix."""


def load_run_config(recipe: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the recipe YAML (if any), then `key=value` overrides (values parsed as YAML)."""
    config = RunConfig()
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise RunConfigError(f"recipe file {str(path)!r} does not exist. Recipes live in recipes/*.yaml.")
        try:
            tree = _parse_yaml(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise RunConfigError(f"recipe {str(path)!r} is not valid YAML: {error}") from None
        if not isinstance(tree, dict):
            raise RunConfigError(f"recipe {str(path)!r} must be a mapping of sections, not {type(tree).__name__}.")
        _merge(config, tree, prefix="", source=str(path))
    for override in overrides or []:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise RunConfigError(
                f"override {override!r} is not of the form key=value (e.g. train.learning_rate=1e-4)."
            )
        try:
            value = _parse_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or " ".join(str(error).split())
            raise RunConfigError(
                f"override {override!r}: the value {raw!r} is not valid YAML ({problem}). Fix: write lists as [a,b], "
                "and quote values with special characters, e.g. key='a: b'."
            ) from None
        tree: dict[str, Any] = {}
        node = tree
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
        _merge(config, tree, prefix="", source=f"override {override!r}")
    _check(config)
    return config


def _merge(target: Any, tree: dict[str, Any], prefix: str, source: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(target)}
    hints = typing.get_type_hints(type(target))
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            valid = [f"{prefix}{name}" for name in fields]
            close = difflib.get_close_matches(dotted, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else f" Valid keys here: {', '.join(valid)}."
            raise RunConfigError(f"unknown config key {dotted!r} in {source}.{hint}")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise RunConfigError(f"{dotted!r} in {source} is a section; give it a mapping, not {value!r}.")
            _merge(current, value, prefix=f"{dotted}.", source=source)
        elif isinstance(current, dict) and isinstance(value, dict):
            # Free-form mappings (model.config, data.synthetic) merge key by key, so `model.config.d_model=128`
            # changes one entry of the recipe's mapping instead of replacing all of it.
            setattr(target, key, _merge_mapping(current, value))
        else:
            setattr(target, key, _coerce(value, hints[key], dotted, source))


def _merge_mapping(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = _merge_mapping(merged[key], value)
        else:
            merged[key] = value
    return merged


def _coerce(value: Any, annotation: Any, dotted: str, source: str) -> Any:
    """The value if it fits the annotation (ints are accepted for floats), else a RunConfigError."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    for option in options:
        origin = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return None
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin in (str, bool) and type(value) is origin:
            return value
        if origin is list and isinstance(value, list):
            item = (typing.get_args(option) or (Any,))[0]
            return [value_ if item is Any else _coerce(value_, item, f"{dotted}[]", source) for value_ in value]
        if origin is dict and isinstance(value, dict):
            return value
        if origin is Any:
            return value
    expected = " or ".join(getattr(o, "__name__", str(o)).replace("NoneType", "null") for o in options)
    raise RunConfigError(f"{dotted}={value!r} in {source} has the wrong type: expected {expected}.")


def _check(config: RunConfig) -> None:
    for dotted, choices in CHOICES.items():
        section, name = dotted.split(".")
        value = getattr(getattr(config, section), name)
        if value not in choices:
            raise RunConfigError(f"{dotted}={value!r} is not valid; choose one of {list(choices)}.")
    for dotted, valid in RANGES.items():
        section, name = dotted.split(".")
        value = getattr(getattr(config, section), name)
        for item in value if isinstance(value, list) else [value]:  # a list's range holds for each entry
            if item is not None and item not in valid:
                finite = "" if math.isfinite(item) else "a finite number "
                subject = f"the entry {item!r}" if isinstance(value, list) else "it"
                raise RunConfigError(f"{dotted}={value!r} is out of range: {subject} must be {finite}{valid}.")
    if config.train.num_epochs < 1 and config.train.max_steps is None:
        raise RunConfigError(f"train.num_epochs={config.train.num_epochs} must be >= 1 (or set train.max_steps).")
    if not config.data.tasks:
        raise RunConfigError("data.tasks is empty; name at least one SCROLLS task, e.g. data.tasks=[gov_report].")
    from .data import SPLITS, TASKS  # here, not at the top: the data module imports datasets and pyarrow

    for task in config.data.tasks:
        if task not in TASKS:
            close = difflib.get_close_matches(task, list(TASKS), n=1)
            hint = f"Did you mean {close[0]!r}? " if close else ""
            raise RunConfigError(
                f"data.tasks={config.data.tasks!r} names an unknown SCROLLS task {task!r}. {hint}"
                f"Valid tasks: {', '.join(TASKS)}."
            )
    if config.data.synthetic is not None:
        import inspect

        from .synthetic import write_synthetic_scrolls

        valid = [name for name in inspect.signature(write_synthetic_scrolls).parameters if name != "out_dir"]
        for key in config.data.synthetic:
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f"Did you mean {close[0]!r}?" if close else f"Valid keys: {', '.join(valid)}."
                raise RunConfigError(f"unknown data.synthetic key {key!r} (see scrolls_ssm.synthetic). {hint}")
    for split in config.data.predict_splits:
        if split not in SPLITS:
            raise RunConfigError(
                f"data.predict_splits={config.data.predict_splits!r} names an unknown split {split!r}; "
                f"valid splits: {', '.join(SPLITS)}."
            )
    if (config.transfer.steps or config.transfer.distill_steps) and (
        config.model.base is None or config.model.init_from is not None
    ):
        raise RunConfigError(
            f"transfer.steps={config.transfer.steps} / transfer.distill_steps={config.transfer.distill_steps} "
            f"transfer from the pretrained attention of model.base, but model.base={config.model.base!r} and "
            f"model.init_from={config.model.init_from!r}. Fix: set model.base to a BART / LED checkpoint and "
            "model.init_from to null, or set transfer.steps=0 and transfer.distill_steps=0."
        )
    if config.model.base is None and config.model.init_from is None and not config.model.config:
        raise RunConfigError(
            "model.base is null but model.config is empty: to train from scratch give the architecture in "
            "model.config (d_model, encoder_layers, ...), or set model.base to a BART checkpoint."
        )
