"""Every recipe loads, carries the published baseline hyper-parameters, and accepts the documented overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from scrolls_ssm.config import RunConfigError, load_run_config
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
            r"train.mixed_precision='fp8' is not valid; choose one of \['no', 'bf16', 'fp16'\]",
        ),
        ("model=3", "'model' .* is a section"),
        ("no_equals_sign", "is not of the form key=value"),
        ("data.tasks=[]", "data.tasks is empty"),
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
