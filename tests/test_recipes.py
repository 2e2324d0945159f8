"""Every recipe loads, carries the published baseline hyper-parameters, and accepts the documented overrides."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from scrolls_ssm.config import RANGES, RunConfig, RunConfigError, load_run_config
from scrolls_ssm.data import SCORED_TASKS

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# task: (epochs, BART-base learning rate), from the SCROLLS baselines
PUBLISHED = {
    "gov_report": (10, 2e-4),
    "summ_screen_fd": (10, 1e-4),
    "qmsum": (20, 5e-5),
    "qasper": (20, 5e-5),
    "narrative_qa": (2, 5e-5),
    "quality": (20, 1e-5),
    "contract_nli": (20, 5e-5),
}


def test_there_is_a_recipe_per_scrolls_task_and_a_demo():
    assert {p.stem for p in RECIPES.glob("*.yaml")} == {*SCORED_TASKS, "demo"}


@pytest.mark.parametrize("task", SCORED_TASKS)
def test_task_recipes_carry_the_published_setup(task):
    cfg = load_run_config(RECIPES / f"{task}.yaml")
    epochs, lr = PUBLISHED[task]
    assert cfg.recipe == task and cfg.data.tasks == [task]
    assert (cfg.train.num_epochs, cfg.train.learning_rate) == (epochs, lr)
    assert (cfg.train.adam_beta1, cfg.train.adam_beta2, cfg.train.adam_epsilon) == (0.9, 0.98, 1e-6)
    assert (cfg.train.weight_decay, cfg.train.warmup_ratio) == (0.001, 0.1)
    assert cfg.model.base == "facebook/bart-base" and cfg.model.max_source_positions == 16384
    assert cfg.data.max_source_length == 16384 and cfg.data.max_tokens_per_batch == 16384
    assert cfg.eval.best_metric == "loss" and cfg.eval.num_beams == 1
    assert cfg.train.output_dir == f"runs/{task}"


def test_demo_recipe_runs_offline_from_scratch():
    cfg = load_run_config(RECIPES / "demo.yaml")
    assert cfg.model.base is None and cfg.model.tokenizer is None  # trains its own SentencePiece tokenizer
    assert cfg.data.synthetic is not None and cfg.data.data_dir
    assert set(cfg.data.tasks) == {"gov_report", "qasper", "contract_nli"}


def test_layout_override_and_precedence():
    cfg = load_run_config(
        RECIPES / "qasper.yaml",
        [
            "model.encoder_layer_types=[s4d,s4d,s4d,s4d,s4d,attention]",
            "train.learning_rate=1e-4",
            "model.config.ssm_lr=2e-3",
        ],
    )
    assert cfg.model.encoder_layer_types == ["s4d"] * 5 + ["attention"]
    assert cfg.train.learning_rate == 1e-4 and cfg.train.num_epochs == 20  # override wins, recipe kept elsewhere
    assert cfg.model.config == {"ssm_lr": 2e-3}


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "train.learnig_rate=1e-4",
            "unknown config key 'train.learnig_rate' in override .* Did you mean 'train.learning_rate'",
        ),
        ("trian.seed=1", "Did you mean 'train'"),
        ("train.num_epochs=ten", r"train.num_epochs='ten' .* wrong type: expected int"),
        (
            "train.mixed_precision=fp8",
            r"train.mixed_precision='fp8' is not valid; choose one of \['auto', 'no', 'bf16', 'fp16'\]",
        ),
        ("model=3", "'model' .* is a section"),
        ("no_equals_sign", "is not of the form key=value"),
        ("data.tasks=[]", "data.tasks is empty"),
        ("data.tasks=[qasperr]", r"unknown SCROLLS task 'qasperr'. Did you mean 'qasper'\? Valid tasks: gov_report, "),
        ("data.synthetic.doc_wrods=300", r"unknown data.synthetic key 'doc_wrods' .* Did you mean 'doc_words'\?"),
        ("data.predict_splits=[dev]", r"unknown split 'dev'; valid splits: train, validation, test"),
        ("train.learning_rate=[1e-4", r"override 'train.learning_rate=\[1e-4': the value '\[1e-4' is not valid YAML"),
    ],
)
def test_bad_overrides_name_the_key_and_the_fix(override, message):
    with pytest.raises(RunConfigError, match=message):
        load_run_config(RECIPES / "qasper.yaml", [override])


def test_overrides_inside_a_mapping_keep_the_recipes_other_entries():
    cfg = load_run_config(RECIPES / "demo.yaml", ["model.config.init_std=0.1", "data.synthetic.doc_words=300"])
    recipe = load_run_config(RECIPES / "demo.yaml")
    assert cfg.model.config == {**recipe.model.config, "init_std": 0.1}
    assert cfg.data.synthetic == {**recipe.data.synthetic, "doc_words": 300}


def test_yaml_1_2_scalars():
    cfg = load_run_config(None, ["train.mixed_precision=no", "train.learning_rate=3e-4", "data.tasks=[qasper]"])
    assert cfg.train.mixed_precision == "no" and cfg.train.learning_rate == 3e-4


def test_recipe_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 3\n")
    with pytest.raises(RunConfigError, match=rf"unknown config key 'train.epochs' in {bad}.*'train.num_epochs'"):
        load_run_config(bad)
    with pytest.raises(RunConfigError, match="does not exist"):
        load_run_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_run_config(
        RECIPES / "gov_report.yaml", ["model.encoder_layer_types=[mamba2,mamba2,mamba2,mamba2,mamba2,mamba2]"]
    )
    (tmp_path / "run_config.yaml").write_text(cfg.to_yaml())
    assert load_run_config(tmp_path / "run_config.yaml") == cfg


# One out-of-range value per numeric key, with the exact message; `test_every_numeric_key_is_range_checked` keeps
# this list complete.
OUT_OF_RANGE = [
    ("model.max_source_positions=0", "model.max_source_positions=0 is out of range: it must be >= 1."),
    ("model.attention_window=-8", "model.attention_window=-8 is out of range: it must be >= 1."),
    ("model.tokenizer_vocab_size=0", "model.tokenizer_vocab_size=0 is out of range: it must be >= 1."),
    ("data.max_source_length=0", "data.max_source_length=0 is out of range: it must be >= 1."),
    ("data.max_target_length=0", "data.max_target_length=0 is out of range: it must be >= 1."),
    ("data.max_tokens_per_batch=0", "data.max_tokens_per_batch=0 is out of range: it must be >= 1."),
    ("data.pad_to_multiple_of=0", "data.pad_to_multiple_of=0 is out of range: it must be >= 1."),
    ("data.max_train_samples=0", "data.max_train_samples=0 is out of range: it must be >= 1."),
    ("data.max_eval_samples=-1", "data.max_eval_samples=-1 is out of range: it must be >= 1."),
    ("data.num_proc=0", "data.num_proc=0 is out of range: it must be >= 1."),
    ("train.seed=-1", "train.seed=-1 is out of range: it must be in [0, 4294967295]."),
    ("train.num_epochs=-1", "train.num_epochs=-1 is out of range: it must be >= 0."),
    ("train.max_steps=-5", "train.max_steps=-5 is out of range: it must be >= 0."),
    ("train.learning_rate=-1", "train.learning_rate=-1.0 is out of range: it must be > 0."),
    ("train.weight_decay=-0.1", "train.weight_decay=-0.1 is out of range: it must be >= 0."),
    ("train.adam_beta1=1", "train.adam_beta1=1.0 is out of range: it must be in [0, 1)."),
    ("train.adam_beta2=-0.5", "train.adam_beta2=-0.5 is out of range: it must be in [0, 1)."),
    ("train.adam_epsilon=0", "train.adam_epsilon=0.0 is out of range: it must be > 0."),
    ("train.warmup_ratio=1.5", "train.warmup_ratio=1.5 is out of range: it must be in [0, 1]."),
    ("train.gradient_accumulation_steps=0", "train.gradient_accumulation_steps=0 is out of range: it must be >= 1."),
    ("train.max_grad_norm=-1", "train.max_grad_norm=-1.0 is out of range: it must be >= 0."),
    ("train.checkpoint_every_steps=0", "train.checkpoint_every_steps=0 is out of range: it must be >= 1."),
    ("train.keep_checkpoints=0", "train.keep_checkpoints=0 is out of range: it must be >= 1."),
    ("train.log_every_steps=0", "train.log_every_steps=0 is out of range: it must be >= 1."),
    ("eval.generate_every_epochs=0", "eval.generate_every_epochs=0 is out of range: it must be >= 1."),
    ("eval.num_beams=0", "eval.num_beams=0 is out of range: it must be >= 1."),
    ("eval.max_new_tokens=0", "eval.max_new_tokens=0 is out of range: it must be >= 1."),
    ("eval.max_tokens_per_batch=0", "eval.max_tokens_per_batch=0 is out of range: it must be >= 1."),
    (
        "eval.truncated_source_lengths=[1024,0]",
        "eval.truncated_source_lengths=[1024, 0] is out of range: the entry 0 must be >= 1.",
    ),
    ("transfer.steps=-1", "transfer.steps=-1 is out of range: it must be >= 0."),
    ("transfer.learning_rate=0", "transfer.learning_rate=0.0 is out of range: it must be > 0."),
    ("transfer.max_documents=0", "transfer.max_documents=0 is out of range: it must be >= 1."),
    ("transfer.max_length=0", "transfer.max_length=0 is out of range: it must be >= 1."),
    ("transfer.max_tokens_per_batch=0", "transfer.max_tokens_per_batch=0 is out of range: it must be >= 1."),
    ("transfer.teacher_window=0", "transfer.teacher_window=0 is out of range: it must be >= 1."),
    ("transfer.distill_steps=-5", "transfer.distill_steps=-5 is out of range: it must be >= 0."),
    ("transfer.distill_learning_rate=-1", "transfer.distill_learning_rate=-1.0 is out of range: it must be > 0."),
    ("transfer.checkpoint_every_steps=0", "transfer.checkpoint_every_steps=0 is out of range: it must be >= 1."),
    ("transfer.batches_per_step=0", "transfer.batches_per_step=0 is out of range: it must be >= 1."),
]


def _numeric_keys() -> set[str]:
    """Every `section.key` of RunConfig whose type allows an int or a float."""
    keys = set()
    for section, section_type in typing.get_type_hints(RunConfig).items():
        if not dataclasses.is_dataclass(section_type):
            continue
        for name, hint in typing.get_type_hints(section_type).items():
            if {int, float} & (set(typing.get_args(hint)) or {hint}):
                keys.add(f"{section}.{name}")
    return keys


def test_every_numeric_key_is_range_checked():
    assert len(_numeric_keys()) == 39
    assert set(RANGES) == _numeric_keys()
    assert {override.split("=")[0] for override, _ in OUT_OF_RANGE} == set(RANGES)


@pytest.mark.parametrize(("override", "message"), OUT_OF_RANGE, ids=[o.split("=")[0] for o, _ in OUT_OF_RANGE])
def test_out_of_range_values_name_the_key_the_value_and_the_range(override, message):
    with pytest.raises(RunConfigError) as raised:
        load_run_config(RECIPES / "qasper.yaml", [override])
    assert str(raised.value) == message


@pytest.mark.parametrize(
    "override",
    ["train.learning_rate=.inf", "train.max_grad_norm=.nan"],
)
def test_non_finite_numbers_are_out_of_range(override):
    with pytest.raises(RunConfigError, match="is out of range: it must be a finite number"):
        load_run_config(None, [override])


def test_range_bounds_themselves_are_valid():
    cfg = load_run_config(
        None,
        [
            "train.warmup_ratio=0",
            "train.adam_beta1=0",
            "train.max_grad_norm=0",
            "train.seed=4294967295",
            "train.max_steps=0",
            "train.num_epochs=0",
            "data.max_tokens_per_batch=1",
        ],
    )
    assert (cfg.train.warmup_ratio, cfg.train.max_grad_norm, cfg.train.seed) == (0.0, 0.0, 4294967295)
    assert (cfg.train.max_steps, cfg.train.num_epochs, cfg.data.max_tokens_per_batch) == (0, 0, 1)
