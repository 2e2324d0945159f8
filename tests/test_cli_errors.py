"""User errors on the command line: one line on stderr naming the key / file / id and the fix, exit status 2, no
traceback; `--debug` shows the traceback; bugs keep theirs. In-process through `main(argv)`, and `run_finetune.py` in a
subprocess. The Hub is unreachable here as for any offline user: HF_HUB_OFFLINE=1 (set by conftest), nothing mocked.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from scrolls_fixtures import rows_for, write_jsonl

from scrolls_ssm.cli import CommandLineError, main
from scrolls_ssm.config import RunConfigError
from scrolls_ssm.errors import hub_unreachable, reach_hub_hint
from tests.training_fixtures import overrides, write_task_data, write_tiny_bart

REPO = Path(__file__).resolve().parents[1]
README_LAYOUT = "model.encoder_layer_types=[s4d,s4d,s4d,s4d,s4d,attention]"


@pytest.fixture(autouse=True)
def isolated_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A local BART checkpoint and SCROLLS-format contract_nli data, as a user without network would have them."""
    root = tmp_path_factory.mktemp("tiny_run")
    return write_tiny_bart(root / "bart"), write_task_data(root / "data")


def one_error_line(capsys, prefix: str) -> str:
    """The error line, after asserting it is the only line on stderr besides progress bars of steps that finished."""
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "%|" not in line]  # tqdm: "Loading weights: 100%|###|"
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith(f"{prefix}: error: "), err
    return lines[0]


def run_finetune(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(cwd / "hf_home")}
    return subprocess.run(
        [sys.executable, str(REPO / "run_finetune.py"), *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


# --- evaluate / predict --model -----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_model_that_is_not_a_folder_is_one_line(tmp_path, capsys, command):
    assert main([command, "--model", str(tmp_path / "missing_dir")]) == 2
    line = one_error_line(capsys, f"scrolls-ssm {command}")
    assert f"--model {tmp_path / 'missing_dir'}: no such folder. Pass the model/ folder a training run wrote" in line

    (tmp_path / "weights.bin").write_bytes(b"")
    assert main([command, "--model", str(tmp_path / "weights.bin")]) == 2
    assert "weights.bin: is a file, not a folder" in one_error_line(capsys, f"scrolls-ssm {command}")


def test_model_folder_without_config_is_one_line(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    assert main(["evaluate", "--model", str(tmp_path / "notes")]) == 2
    line = one_error_line(capsys, "scrolls-ssm evaluate")
    assert f"--model {tmp_path / 'notes'}: has no config.json, so it is not a saved model" in line
    assert "(it holds config.json and model.safetensors)" in line


def test_model_folder_of_another_kind_is_one_line(tmp_path, capsys, tiny_run):
    base, _ = tiny_run  # a BART checkpoint: loadable, but not a scrolls_ssm model
    assert main(["evaluate", "--model", str(base)]) == 2
    line = one_error_line(capsys, "scrolls-ssm evaluate")
    assert f"--model {base}: holds a model of type 'bart', not a scrolls_ssm model" in line
    assert "train with model.base=<it> instead" in line


def test_push_with_a_bad_repo_id_is_one_line(tmp_path, capsys):
    assert main(["push", "--model-dir", str(tmp_path), "--repo-id", "me/models/bart"]) == 2
    line = one_error_line(capsys, "scrolls-ssm push")
    assert "--repo-id 'me/models/bart' is not a Hub repo id" in line and "Fix: write it as owner/name" in line


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_exception_instead(tmp_path, where):
    argv = ["evaluate", "--model", str(tmp_path / "missing_dir")]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    with pytest.raises(CommandLineError, match="no such folder"):
        main(argv)


def test_bugs_keep_their_traceback(monkeypatch):
    """A failure that is not a user error (here a RuntimeError from inside a subcommand) is not turned into a line."""

    def broken(args):
        raise RuntimeError("index out of bounds in the collator")

    monkeypatch.setattr("scrolls_ssm.cli._run_score", broken)
    with pytest.raises(RuntimeError, match="index out of bounds"):
        main(["score", "--task", "qasper", "--predictions", "p.json", "--references", "r.zip"])


# --- config values ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.log_every_steps=0", "train.log_every_steps=0 is out of range: it must be >= 1."),
        ("train.gradient_accumulation_steps=0", "gradient_accumulation_steps=0 is out of range: it must be >= 1."),
        ("train.learning_rate=-1", "train.learning_rate=-1.0 is out of range: it must be > 0."),
    ],
)
def test_out_of_range_config_is_one_line(tmp_path, capsys, override, fragment):
    recipe = str(REPO / "recipes" / "qasper.yaml")
    assert main(["train", "--recipe", recipe, f"train.output_dir={tmp_path / 'out'}", override]) == 2
    assert one_error_line(capsys, "scrolls-ssm train").endswith(fragment)
    assert not (tmp_path / "out").exists()  # rejected before the run starts


def test_recipe_yaml_error_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rate: [1e-4\n")
    assert main(["train", "--recipe", str(bad)]) == 2
    line = one_error_line(capsys, "scrolls-ssm train")
    assert f"recipe {str(bad)!r} is not valid YAML" in line and "line 2" in line


# --- run_finetune.py ------------------------------------------------------------------------------------------------


def test_run_finetune_usage_names_itself(tmp_path):
    result = run_finetune("--bogus", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: run_finetune.py [-h] [--debug] [--recipe RECIPE]")
    assert "[key=value ...]" in result.stderr
    assert result.stderr.strip().endswith("run_finetune.py: error: unrecognized arguments: --bogus")
    assert "scrolls-ssm" not in result.stderr


def test_run_finetune_config_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    recipe = str(REPO / "recipes" / "qasper.yaml")
    result = run_finetune("--recipe", recipe, "train.warmup_ratio=2", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr == ("run_finetune.py: error: train.warmup_ratio=2.0 is out of range: it must be in [0, 1].\n")
    result = run_finetune("--debug", "--recipe", recipe, "train.warmup_ratio=2", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "RunConfigError: train.warmup_ratio=2.0 is out of range" in result.stderr


def test_readme_command_without_network_names_the_dataset_and_the_fix(tmp_path):
    """The README's fine-tune command on a machine that cannot reach the Hub."""
    result = run_finetune("--recipe", str(REPO / "recipes" / "qasper.yaml"), README_LAYOUT, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    line = lines[0]
    assert line.startswith("run_finetune.py: error: could not reach the Hugging Face Hub")
    assert "tau/scrolls" in line and "qasper.zip" in line
    assert "data.data_dir=" in line and "HF_HUB_OFFLINE" in line


# --- model and tokenizer ----------------------------------------------------------------------------------------


def test_model_base_from_the_hub_offline_names_the_id_and_the_fix(tiny_run, tmp_path, capsys):
    base, data = tiny_run
    argv = overrides(base, data, tmp_path / "out", "model.base=facebook/bart-base")
    assert main(["train", *argv]) == 2
    line = one_error_line(capsys, "scrolls-ssm train")
    assert "model.base='facebook/bart-base'" in line and "could not reach the Hugging Face Hub" in line
    assert "HF_HUB_OFFLINE=1" in line and "set model.base to a local folder" in line


def test_tokenizer_from_the_hub_offline_names_its_key(tiny_run, tmp_path, capsys):
    base, data = tiny_run
    argv = overrides(base, data, tmp_path / "out", "model.tokenizer=someone/tokenizer-not-cached")
    assert main(["train", *argv]) == 2
    line = one_error_line(capsys, "scrolls-ssm train")
    assert "model.tokenizer='someone/tokenizer-not-cached'" in line and "could not reach the Hugging Face Hub" in line


def test_missing_local_model_base_is_one_line(tiny_run, tmp_path, capsys):
    base, data = tiny_run
    missing = tmp_path / "checkpoints" / "bart-bsae"
    assert main(["train", *overrides(base, data, tmp_path / "out", f"model.base={missing}")]) == 2
    line = one_error_line(capsys, "scrolls-ssm train")
    assert f"model.base={str(missing)!r}" in line and "no such folder" in line


@pytest.mark.parametrize(
    ("layout", "fragment"),
    [
        (
            "model.encoder_layer_types=[s4d,s5d]",
            "model.encoder_layer_types[1]='s5d' is invalid: expected one of ['attention', 's4d', 'mamba', 'mamba2', "
            "'gss']",
        ),
        (
            "model.encoder_layer_types=[s4d,s4d,attention]",
            "model.encoder_layer_types=['s4d', 's4d', 'attention'] is invalid: expected one entry per encoder layer",
        ),
    ],
)
def test_bad_encoder_layout_names_the_key(tiny_run, tmp_path, capsys, layout, fragment):
    base, data = tiny_run
    assert main(["train", *overrides(base, data, tmp_path / "out", layout)]) == 2
    line = one_error_line(capsys, "scrolls-ssm train")
    assert fragment in line
    if "entry per encoder layer" in fragment:
        assert f"model.base {str(base)!r} has 2 encoder layers" in line


def test_bad_mixer_setting_names_its_model_config_key(tiny_run, tmp_path, capsys):
    base, data = tiny_run
    argv = overrides(
        base, data, tmp_path / "out", "model.encoder_layer_types=[s4d,attention]", "model.config.s4d_d_state=3"
    )
    assert main(["train", *argv]) == 2
    line = one_error_line(capsys, "scrolls-ssm train")
    assert "model.config.s4d_d_state=3 is invalid: expected an even int >= 2" in line


def test_wrong_type_in_a_from_scratch_architecture_names_its_key(tiny_run, tmp_path, capsys):
    base, data = tiny_run
    scratch = ["model.base=null", f"model.tokenizer={base}", "model.config.d_model=wide"]
    assert main(["train", *overrides(base, data, tmp_path / "out", *scratch)]) == 2
    line = one_error_line(capsys, "scrolls-ssm train")
    assert line.startswith("scrolls-ssm train: error: model.config.d_model: Field 'd_model' with value 'wide'")


def test_unknown_model_config_key_is_an_error(tiny_run, tmp_path, capsys):
    base, data = tiny_run
    argv = overrides(base, data, tmp_path / "out", "model.config.s4d_dstate=32")
    assert main(["train", *argv]) == 2
    line = one_error_line(capsys, "scrolls-ssm train")
    assert "unknown model.config key 's4d_dstate'" in line and "Did you mean 's4d_d_state'" in line


def test_too_small_sentencepiece_vocabulary_names_the_key(tmp_path, capsys):
    synthetic = [f"data.synthetic.{key}={value}" for key, value in (("num_train", 12), ("num_validation", 3))]
    argv = [
        "train",
        "--recipe",
        str(REPO / "recipes" / "demo.yaml"),
        "model.tokenizer_vocab_size=5",
        f"data.data_dir={tmp_path / 'synthetic'}",
        *synthetic,
        "data.synthetic.num_test=3",
        "data.synthetic.doc_words=120",
        f"train.output_dir={tmp_path / 'out'}",
    ]
    assert main(argv) == 2
    line = one_error_line(capsys, "scrolls-ssm train")
    assert line.startswith("scrolls-ssm train: error: model.tokenizer_vocab_size=5 does not fit the training texts")
    assert "Vocabulary size is smaller than required_chars" in line and "Fix: raise model.tokenizer_vocab_size" in line


# --- score: duplicate ids -----------------------------------------------------------------------------------------


def test_score_rejects_duplicate_ids_with_different_inputs(tmp_path, capsys):
    rows = rows_for([("a", "blue"), ("a", "red"), ("b", "cat")])
    rows[1]["input"] = "a different document"
    references = write_jsonl(tmp_path / "qasper" / "validation.jsonl", rows)
    predictions = tmp_path / "p.json"
    predictions.write_text('{"a": "blue", "b": "cat"}')
    argv = ["score", "--task", "qasper", "--predictions", str(predictions), "--references", str(tmp_path)]
    assert main(argv) == 2
    line = one_error_line(capsys, "scrolls-ssm score")
    assert f"{references}, line 2: id 'a' was already used on line 1 with a different input" in line
    assert "Fix: give this row its own id" in line


def test_score_with_a_missing_predictions_file_is_one_line(tmp_path, capsys):
    rows = rows_for([("a", "blue")])
    write_jsonl(tmp_path / "refs" / "validation.jsonl", rows)
    missing = tmp_path / "preds" / "qasper.json"
    argv = ["score", "--task", "qasper", "--predictions", str(missing), "--references", str(tmp_path / "refs")]
    assert main(argv) == 2
    line = one_error_line(capsys, "scrolls-ssm score")
    assert f"predictions file {missing} does not exist. Fix: pass the JSON object {{id: prediction}}" in line


def test_score_num_proc_must_be_positive(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["score", "--task", "gov_report", "--predictions", "p", "--references", "r", "--num-proc", "0"])
    assert raised.value.code == 2
    assert (
        "scrolls-ssm score: error: argument --num-proc: 0 is out of range: it must be >= 1" in capsys.readouterr().err
    )


def test_unknown_task_in_a_run_is_one_line(tmp_path, capsys):
    assert main(["train", "data.tasks=[qasperr]", f"train.output_dir={tmp_path / 'out'}"]) == 2
    line = one_error_line(capsys, "scrolls-ssm train")
    assert "data.tasks=['qasperr'] names an unknown SCROLLS task 'qasperr'. Did you mean 'qasper'?" in line


def test_hub_unreachable_follows_the_exception_chain(monkeypatch):
    def raise_chained():
        try:
            raise socket.gaierror(-2, "Name or service not known")
        except OSError as dns:
            raise RuntimeError("request failed") from dns

    with pytest.raises(RuntimeError) as raised:
        raise_chained()
    assert hub_unreachable(raised.value)
    assert not hub_unreachable(ValueError("ScrollsSSMConfig.s4d_d_state=3 is invalid"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert (
        reach_hub_hint() == "or check that this machine can reach https://huggingface.co (network, proxy, HF_ENDPOINT)"
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert reach_hub_hint() == "or unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE on a machine that can reach the Hub"


def test_run_config_error_is_a_value_error():
    """What `main` relies on: the toolkit's own errors are ValueErrors."""
    assert issubclass(RunConfigError, ValueError) and issubclass(CommandLineError, ValueError)
