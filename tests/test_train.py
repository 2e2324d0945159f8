"""The training loop: outputs, exact resume after kill -9, half-written checkpoints, guards, two processes."""

from __future__ import annotations

import json
import multiprocessing
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM

from scrolls_ssm.config import RunConfigError, load_run_config
from scrolls_ssm.train import train
from tests.training_fixtures import (
    launch_two_processes,
    overrides,
    run_train_command,
    write_task_data,
    write_tiny_bart,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return write_tiny_bart(root / "bart"), write_task_data(root / "data"), root


def test_a_run_writes_every_output_and_prints_its_final_metrics(setup, capsys):
    base, data, root = setup
    out = root / "full"
    cfg = load_run_config(None, overrides(base, data, out, "eval.generate_every_epochs=1"))
    results = train(cfg)
    last_lines = capsys.readouterr().out.splitlines()[-2:]
    exact_match = results["contract_nli"]["validation"]["exact_match"]
    assert last_lines[0].startswith(f"contract_nli/validation: exact_match={exact_match:.4g}, num_predicted=9, ")
    assert last_lines[1] == f"outputs in {out}"

    model = AutoModelForSeq2SeqLM.from_pretrained(out / "model")
    assert model.config.model_type == "scrolls_ssm" and model.config.max_source_positions == 96
    validation_ids = {f"validation-{i}" for i in range(9)}
    predictions = json.loads((out / "predictions" / "validation" / "contract_nli.json").read_text())
    assert set(predictions) == validation_ids
    assert set(json.loads((out / "predictions" / "test" / "contract_nli.json").read_text())) == {
        f"test-{i}" for i in range(5)
    }
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == results and metrics["contract_nli"]["validation"]["num_predicted"] == 9
    assert json.loads((out / "model" / "metrics.json").read_text()) == metrics
    assert (out / "submission.csv").read_text().splitlines()[0] == "Task,ID,Prediction"
    assert (out / "training_curves.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "| contract_nli | exact_match |" in report and "naive baseline" in report
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train_losses = [r["train/loss"] for r in log if "train/loss" in r]
    assert len(train_losses) >= 4 and all(map(lambda x: x == x, train_losses))
    evaluations = [r for r in log if "eval/loss" in r]
    assert len(evaluations) == 2 and evaluations[1]["eval/loss"] < evaluations[0]["eval/loss"]
    assert (out / "run_config.yaml").read_text() == (out / "model" / "run_config.yaml").read_text()


# A checkpoint every 2 steps (an epoch's last step is checkpointed after its evaluation); 12 rows: 3 steps an epoch.
RESUMABLE = ["train.checkpoint_every_steps=2", "data.max_train_samples=12"]
# Children forked from a server that has the toolkit imported already: a fresh interpreter spends 10-20 s on imports.
FORKS = multiprocessing.get_context("forkserver")
FORKS.set_forkserver_preload(["scrolls_ssm.train", "scrolls_ssm.cli", "tests.training_fixtures"])


@pytest.fixture(scope="module")
def reference(setup):
    """An uninterrupted run that interrupted-and-resumed runs must reproduce file for file."""
    base, data, root = setup
    out = root / "uninterrupted"
    train(load_run_config(None, overrides(base, data, out, *RESUMABLE)))
    return out


def assert_same_outputs(expected: Path, actual: Path) -> None:
    """The final model's weights bit for bit; the metrics, predictions, submission and report byte for byte; the
    logged values record for record (a resumed run logs its config again, and nothing else twice)."""
    want, got = (load_file(d / "model" / "model.safetensors") for d in (expected, actual))
    assert want.keys() == got.keys()
    differ = {
        name: (got[name] - want[name]).abs().max().item() for name in want if not torch.equal(got[name], want[name])
    }
    assert not differ, (
        f"{len(differ)} of {len(want)} weights differ from the uninterrupted run's (largest difference per tensor): "
        + ", ".join(f"{name} {value:.3g}" for name, value in list(differ.items())[:8])
    )
    files = ["metrics.json", "model/metrics.json", "submission.csv", "report.md"]
    files += [str(p.relative_to(expected)) for p in sorted((expected / "predictions").rglob("*.json"))]
    assert len(files) == 6
    for name in files:
        assert (actual / name).read_text() == (expected / name).read_text(), name
    want_log, got_log = (
        [r for r in map(json.loads, (d / "log.jsonl").read_text().splitlines()) if "config" not in r]
        for d in (expected, actual)
    )
    assert got_log == want_log


def _launch(argv: list[str], kill_at: str | None = None, kill_after: float | None = None) -> str:
    """Run `scrolls-ssm train ARGV` in a child process, with the SIGKILL hook at `kill_at`, and SIGKILL it ourselves
    after `kill_after` seconds if it is still running. Returns how it ended: finished, killed-by-hook or
    killed-at-random."""
    process = FORKS.Process(target=run_train_command, args=(argv, kill_at))
    process.start()
    process.join(kill_after)
    ended = "killed-by-hook"
    if process.exitcode is None:
        process.kill()
        process.join()
        ended = "killed-at-random"
    if process.exitcode == 0:
        return "finished"
    assert process.exitcode == -signal.SIGKILL, f"exit code {process.exitcode} (kill_at={kill_at})"
    return ended


def _steps(reference: Path) -> tuple[int, int]:
    """(steps per epoch, final step) of the reference run."""
    (final,) = [p for p in (reference / "checkpoints").iterdir() if p.name.startswith("step_")][-1:]
    evaluations = json.loads((final / "run_state.json").read_text())["evaluations"]
    return evaluations[0]["step"], evaluations[-1]["step"]


def test_resume_after_the_final_checkpoint_redoes_nothing_and_loses_nothing(setup, reference):
    """Killed right after its last checkpoint (written after the final evaluation), a resumed run still ends with the
    final model, predictions, metrics and report, identical to an uninterrupted run's."""
    base, data, root = setup
    out = root / "killed-after-final-checkpoint"
    _, final_step = _steps(reference)
    assert _launch(overrides(base, data, out, *RESUMABLE), f"checkpoint-saved@{final_step}") == "killed-by-hook"
    assert _launch(overrides(base, data, out, *RESUMABLE, "train.resume=latest")) == "finished"
    assert_same_outputs(reference, out)


def test_kill_9_at_random_moments_and_inside_saves_then_resume_reproduces_the_uninterrupted_run(setup, reference):
    """The same command (`--resume`, i.e. train.resume=auto), killed with SIGKILL at 10 seeded random moments and at
    five named points (three inside a save, one right after the final checkpoint), then run to the end, leaves the
    files of an uninterrupted run."""
    base, data, root = setup
    out = root / "killed-again-and-again"
    command = ["--resume", *overrides(base, data, out, *RESUMABLE)]
    per_epoch, final = _steps(reference)
    hooks = [
        "checkpoint-writing@2",  # inside a mid-epoch save
        f"model-writing@{per_epoch}",  # inside the model save: no model/ folder at all
        f"checkpoint-writing@{per_epoch}",  # inside the epoch-end save
        f"checkpoint-saved@{final}",  # right after the final checkpoint
        f"outputs-writing@{final}",  # predictions written, report not yet
    ]
    rng = random.Random(9)
    ends = []
    for hook in hooks:
        for _ in range(2):
            ends.append(_launch(command, hook, kill_after=rng.uniform(0.5, 12)))
            if ends[-1] == "killed-by-hook":
                break
        else:
            ends.append(_launch(command, hook))
            assert ends[-1] == "killed-by-hook", f"{hook} never came"
    while ends.count("killed-at-random") < 10:  # the finished run, resumed: killed while it redoes its outputs
        ends.append(_launch(command, kill_after=rng.uniform(0.5, 8)))
    assert _launch(command) == "finished"
    assert ends.count("killed-by-hook") == len(hooks), ends
    try:
        assert_same_outputs(reference, out)
    except AssertionError as error:
        raise AssertionError(f"{error}\nhow each launch ended: {ends}") from None


def test_resume_ignores_half_written_checkpoints_and_refuses_another_model(setup, tmp_path):
    base, data, root = setup
    out = tmp_path / "run"
    train(load_run_config(None, overrides(base, data, out, "train.max_steps=2", "data.predict_splits=[validation]")))
    checkpoints = out / "checkpoints"
    (checkpoints / ".tmp-step_00000009").mkdir()  # a save that was killed
    (checkpoints / "step_00000007").mkdir()  # a folder without run_state.json
    from scrolls_ssm.checkpointing import list_checkpoints

    assert [p.name for p in list_checkpoints(out)] == ["step_00000002"]
    with pytest.raises(RunConfigError, match=r"model.encoder_layer_types.*differ"):
        train(
            load_run_config(
                None,
                overrides(base, data, out, "train.resume=latest", "model.encoder_layer_types=[attention,s4d]"),
            )
        )
    with pytest.raises(RunConfigError, match="not a complete checkpoint"):
        train(load_run_config(None, overrides(base, data, out, f"train.resume={checkpoints / 'step_00000007'}")))


def test_non_finite_loss_skips_the_step_and_counts_it(setup, tmp_path, monkeypatch):
    from scrolls_ssm.modeling.modeling_scrolls_ssm import ScrollsSSMForConditionalGeneration

    base, data, _ = setup
    original = ScrollsSSMForConditionalGeneration.forward
    calls = {"train": 0}

    def forward(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        if self.training:
            calls["train"] += 1
            if calls["train"] == 2:
                output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(ScrollsSSMForConditionalGeneration, "forward", forward)
    out = tmp_path / "nan"
    train(load_run_config(None, overrides(base, data, out, "train.max_steps=4", "data.predict_splits=[validation]")))
    state = json.loads(max((out / "checkpoints").iterdir()).joinpath("run_state.json").read_text())
    assert state["skipped_nonfinite"] == 1 and state["global_step"] == 4
    weights = load_file(out / "model" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_two_processes_train_and_gather_every_id_once(setup, tmp_path):
    base, data, _ = setup
    out = tmp_path / "ddp"
    # The worker is run_finetune.py that also fails if the DDP model outlives the process group (an exit hang).
    argv = overrides(base, data, out, "train.num_epochs=1", "eval.generate_every_epochs=1")
    result = launch_two_processes(argv, script="tests/ddp_run_worker.py")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    predictions = json.loads((out / "predictions" / "validation" / "contract_nli.json").read_text())
    assert sorted(predictions) == sorted(f"validation-{i}" for i in range(9))  # 9 rows over 2 processes: uneven
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["contract_nli"]["validation"]["num_predicted"] == 9
    assert AutoModelForSeq2SeqLM.from_pretrained(out / "model") is not None


def test_evaluate_command_reproduces_the_runs_metrics(setup, tmp_path, capsys):
    """`scrolls-ssm evaluate` on a trained model gives the metrics its run reported; a second evaluation into the
    same folder scores the newly given model, not the one left there."""
    from scrolls_ssm.cli import main

    base, data, root = setup
    run = tmp_path / "run"
    results = train(load_run_config(None, overrides(base, data, run, "train.max_steps=3")))
    evaluated = tmp_path / "evaluated"
    common = ["--output-dir", str(evaluated), f"data.data_dir={data}", "data.tasks=[contract_nli]"]
    capsys.readouterr()
    assert main(["evaluate", "--model", str(run / "model"), *common]) == 0
    assert json.loads((evaluated / "metrics.json").read_text()) == {"contract_nli": results["contract_nli"]}
    printed = capsys.readouterr().out
    assert printed.count("exact_match") == 1 and printed.count(f"outputs in {evaluated}") == 1  # each said once
    # An untrained swap of the same base predicts differently: its metrics must replace the first ones.
    untrained = tmp_path / "untrained"
    train(load_run_config(None, overrides(base, data, untrained, "train.max_steps=0")))
    assert main(["evaluate", "--model", str(untrained / "model"), *common, "train.overwrite_output_dir=true"]) == 0
    scored, given = (load_file(d / "model" / "model.safetensors") for d in (evaluated, untrained))
    assert scored.keys() == given.keys() and all(torch.equal(scored[k], given[k]) for k in scored)
    trained = load_file(run / "model" / "model.safetensors")
    assert not all(torch.equal(scored[k], trained[k]) for k in scored)


def test_truncated_source_lengths_score_the_best_model_on_cut_inputs(setup, tmp_path):
    """eval.truncated_source_lengths scores the run's best model again on inputs cut to N tokens: the same figures as
    evaluating that model with data.max_source_length=N, in metrics.json, the predictions and the report."""
    from scrolls_ssm.cli import main

    base, data, root = setup
    run = tmp_path / "run"
    cfg = load_run_config(
        None, overrides(base, data, run, "train.max_steps=3", "eval.truncated_source_lengths=[8,4096]")
    )
    results = train(cfg)["contract_nli"]
    evaluated = tmp_path / "evaluated"
    common = ["--output-dir", str(evaluated), f"data.data_dir={data}", "data.tasks=[contract_nli]"]
    assert main(["evaluate", "--model", str(run / "model"), *common, "data.max_source_length=8"]) == 0
    cut = json.loads((evaluated / "metrics.json").read_text())["contract_nli"]["validation"]
    assert results["validation_first_8_tokens"] == cut
    cut_predictions = json.loads((evaluated / "predictions" / "validation" / "contract_nli.json").read_text())
    saved = run / "predictions" / "validation_first_8_tokens" / "contract_nli.json"
    assert json.loads(saved.read_text()) == cut_predictions
    # A limit past the encoder's 96 positions reads what the plain evaluation reads.
    assert results["validation_first_4096_tokens"] == results["validation"]
    assert json.loads((run / "metrics.json").read_text())["contract_nli"] == results
    report = (run / "report.md").read_text()
    assert "| task | metric | model | model, first 8 tokens | model, first 4,096 tokens | naive baseline |" in report
    exact = [results[key]["exact_match"] for key in ("validation", "validation_first_8_tokens")]
    assert f"| contract_nli | exact_match | {exact[0]:.2f} | {exact[1]:.2f} | {exact[0]:.2f} |" in report


def test_synthetic_data_is_rewritten_when_its_settings_change(tmp_path):
    from scrolls_ssm.train import _materialize_data

    data = tmp_path / "data"
    settings = ["data.tasks=[qasper]", "data.synthetic={num_train: 6, num_validation: 3, num_test: 3, doc_words: 120}"]
    cfg = load_run_config(None, [f"data.data_dir={data}", *settings])
    _materialize_data(cfg)
    first = (data / "qasper" / "train.jsonl").read_text()
    _materialize_data(cfg)  # same settings: reused as is
    assert (data / "qasper" / "train.jsonl").read_text() == first
    cfg.data.synthetic["num_train"] = 9
    _materialize_data(cfg)
    assert len((data / "qasper" / "train.jsonl").read_text().splitlines()) == 9


FAST = ["data.predict_splits=[validation]"]


def test_a_used_output_folder_is_refused_unless_resumed_or_overwritten(setup, tmp_path):
    base, data, _ = setup
    out = tmp_path / "run"
    train(load_run_config(None, overrides(base, data, out, "train.max_steps=2", *FAST)))
    with pytest.raises(RunConfigError, match=r"already holds a run.*train.resume=auto.*overwrite_output_dir=true"):
        train(load_run_config(None, overrides(base, data, out, "train.max_steps=1", *FAST)))
    (out / "checkpoints" / ".tmp-step_00000009").mkdir()  # what a save killed midway leaves
    (out / ".tmp-model").mkdir()
    train(load_run_config(None, overrides(base, data, out, "train.max_steps=1", "train.overwrite_output_dir=true")))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001"]  # the old run's are gone
    assert not (out / ".tmp-model").exists() and not (out / ".lock").exists()
    assert [r["step"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "train/loss" in r] == [
        1
    ]
    with pytest.raises(RunConfigError, match="contradict"):
        train(
            load_run_config(None, overrides(base, data, out, "train.resume=auto", "train.overwrite_output_dir=true"))
        )


def test_a_run_that_failed_before_training_is_started_again_by_the_same_command(setup, tmp_path):
    base, _, _ = setup
    data = write_task_data(tmp_path / "data", sizes=(("train", 12), ("test", 3)))  # no validation split yet
    out = tmp_path / "run"
    command = overrides(base, data, out, "train.max_steps=1", *FAST)
    with pytest.raises(ValueError, match="validation"):
        train(load_run_config(None, command))
    assert (out / "run_config.yaml").is_file() and not (out / "checkpoints").exists()
    write_task_data(data, sizes=(("validation", 3),))
    train(load_run_config(None, command))  # no resume or overwrite flag needed: the first try left no results
    assert (out / "model" / "model.safetensors").is_file()


def test_a_live_run_locks_its_folder_and_a_dead_runs_lock_is_taken_over(setup, tmp_path, caplog):
    base, data, _ = setup
    out = tmp_path / "run"
    out.mkdir()
    lock = out / ".lock"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock.write_text(json.dumps({"pid": live.pid, "host": socket.gethostname()}))
        with pytest.raises(RunConfigError, match=rf"in use by a running process \(pid {live.pid}"):
            train(load_run_config(None, overrides(base, data, out, "train.max_steps=0", *FAST)))
        assert json.loads(lock.read_text())["pid"] == live.pid  # the other run's lock is left alone
    finally:
        live.kill()
        live.wait()
    train(load_run_config(None, overrides(base, data, out, "train.max_steps=0", *FAST)))
    assert f"left by process {live.pid}, which is no longer running" in caplog.text
    assert not lock.exists() and (out / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "damaged_file, damage, error",
    [
        ("model.safetensors", "truncate", "SafetensorError"),  # a save cut short by a full disk
        # accelerate's load_state only logs a bad RNG file at INFO level and goes on with the wrong random streams:
        # the checkpoint must count as damaged instead, or the resumed run silently stops reproducing the first one.
        ("random_states_0.pkl", "truncate", "OSError"),
        ("random_states_0.pkl", "delete", "FileNotFoundError"),
    ],
)
def test_resume_falls_back_past_a_damaged_checkpoint_and_does_not_log_steps_twice(
    setup, tmp_path, caplog, damaged_file, damage, error
):
    base, data, _ = setup
    out = tmp_path / "run"
    settings = overrides(base, data, out, "train.max_steps=4", "train.checkpoint_every_steps=2", *FAST)
    train(load_run_config(None, settings))
    first = {name: (out / name).read_bytes() for name in ("model/model.safetensors", "metrics.json", "log.jsonl")}
    damaged = out / "checkpoints" / "step_00000004"
    file = damaged / damaged_file
    if damage == "truncate":
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    else:
        file.unlink()

    train(load_run_config(None, [*settings, "train.resume=auto"]))
    assert f"checkpoint {damaged} could not be loaded ({error}" in caplog.text
    assert "falling back to" in caplog.text and str(out / "checkpoints" / "step_00000002") in caplog.text
    for name, content in first.items():
        if name != "log.jsonl":
            assert (out / name).read_bytes() == content, name
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4]  # steps 3-4 were redone, logged once
    assert [r["step"] for r in records if "eval/loss" in r] == [4]
    strip = [json.loads(line) for line in first["log.jsonl"].decode().splitlines() if '"config"' not in line]
    assert [r for r in records if "config" not in r] == strip  # the redone steps log the very same values


def test_predict_reads_no_train_split(setup, tmp_path):
    """`scrolls-ssm predict` works on a folder with only the test split: the tokenizer comes from the model folder."""
    from scrolls_ssm.cli import main

    base, data, _ = setup
    run = tmp_path / "run"
    train(load_run_config(None, overrides(base, data, run, "train.max_steps=0", *FAST)))
    test_only = write_task_data(tmp_path / "test-only", sizes=(("test", 5),))
    predicted = tmp_path / "predicted"
    common = [f"data.data_dir={test_only}", "data.tasks=[contract_nli]", "model.max_source_positions=96"]
    assert main(["predict", "--model", str(run / "model"), "--output-dir", str(predicted), *common]) == 0
    assert sorted(json.loads((predicted / "predictions" / "test" / "contract_nli.json").read_text())) == [
        f"test-{i}" for i in range(5)
    ]
    assert "## Scores on the test split" in (predicted / "report.md").read_text()


def test_resume_flag_means_resume_auto(setup, tmp_path, capsys):
    from scrolls_ssm.cli import _build_parser, _train_overrides, main

    def parsed(*argv: str) -> list[str]:
        return _train_overrides(_build_parser().parse_args(["train", *argv]))

    assert parsed("--resume") == ["train.resume=auto"]
    assert parsed("--resume", "runs/x/checkpoints/step_00000002") == ["train.resume=runs/x/checkpoints/step_00000002"]
    assert parsed("--resume", "train.seed=1", "data.num_proc=2") == [
        "train.seed=1",
        "data.num_proc=2",
        "train.resume=auto",
    ]
    assert parsed("train.seed=1") == ["train.seed=1"]

    base, data, _ = setup
    out = tmp_path / "run"
    args = ["train", "--resume", *overrides(base, data, out, "train.max_steps=2", *FAST)]
    assert main(args) == 0  # a first start: nothing to resume, so it starts fresh
    assert "Resumed from" not in capsys.readouterr().out
    weights = (out / "model" / "model.safetensors").read_bytes()
    assert main(args) == 0  # the same command again: resumes the finished run, which only redoes its outputs
    assert f"Resumed from {out / 'checkpoints' / 'step_00000002'} (epoch 1, step 2)" in capsys.readouterr().out
    assert (out / "model" / "model.safetensors").read_bytes() == weights


@pytest.mark.parametrize("retain", [True, False])
def test_a_cpu_run_keeps_freed_memory_unless_told_not_to(setup, tmp_path, monkeypatch, retain):
    """train() asks for retained memory on a CPU before it claims the run folder, and not with
    train.retain_freed_memory=false (stopped right after, at the folder lock)."""
    import scrolls_ssm.train as train_module

    calls = []

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(train_module, "retain_freed_memory", lambda: calls.append("retain") or True)
    monkeypatch.setattr(train_module, "RunFolderLock", stop)
    base, data, _ = setup
    cfg = load_run_config(
        None, overrides(base, data, tmp_path / "run", f"train.retain_freed_memory={str(retain).lower()}")
    )
    with pytest.raises(Stop):
        train(cfg)
    assert calls == (["retain"] if retain else [])
