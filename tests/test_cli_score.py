"""The `score` and `submit` subcommands, run in-process through `main(argv)`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import datasets
import pytest
from scrolls_fixtures import rows_for, write_jsonl, write_scrolls_zip

from scrolls_ssm.cli import _build_parser, main
from scrolls_ssm.data import SCORED_TASKS
from scrolls_ssm.submission import prediction_path, read_submission_csv, write_predictions


@pytest.fixture(autouse=True)
def isolated_cache(monkeypatch, tmp_path):
    """Validated data is cached; keep it out of the user's datasets cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


@pytest.fixture
def qasper_zip(tmp_path):
    rows = rows_for([("a", "blue sky"), ("a", "red"), ("b", "a cat"), ("c", "yes")])
    return write_scrolls_zip(tmp_path / "qasper.zip", "qasper", {"validation": rows})


def test_parser_has_subcommands():
    parser = _build_parser()
    assert (
        parser.parse_args(["score", "--task", "qasper", "--predictions", "p", "--references", "r"]).split
        == "validation"
    )
    assert parser.parse_args(["submit", "--predictions-dir", "d", "--output", "o"]).split == "test"
    with pytest.raises(SystemExit):
        parser.parse_args(["score", "--task", "hotpot", "--predictions", "p", "--references", "r"])


def test_score_prints_and_writes_official_keys(tmp_path, qasper_zip, capsys):
    predictions = write_predictions({"a": "blue", "b": "The cat.", "c": "no"}, tmp_path / "qasper.json")
    output = tmp_path / "metrics.json"
    argv = ["score", "--task", "qasper", "--predictions", str(predictions), "--references", str(qasper_zip)]
    assert main([*argv, "--output", str(output), "--cache-dir", str(tmp_path / "cache")]) == 0
    # a: max(F1(blue | blue sky) = 2/3, 0); b: "cat" == "cat" -> 1; c: 0. Mean 55.5556.
    expected = {
        "f1": 55.5556,
        "num_predicted": 3,
        "mean_prediction_length_characters": round((4 + 8 + 2) / 3, 4),
        "scrolls_score": 55.5556,
    }
    assert json.loads(output.read_text()) == {"task": "qasper", "split": "validation", **expected}
    printed = capsys.readouterr().out
    assert "qasper (validation)" in printed
    assert "f1                                 55.5556" in printed


def test_score_summarization_from_a_folder(tmp_path, capsys):
    write_jsonl(tmp_path / "refs" / "gov_report" / "validation.jsonl", rows_for([("d1", "alpha beta"), ("d2", "x")]))
    predictions = write_predictions({"d1": "alpha beta", "d2": ""}, tmp_path / "p.json")
    argv = ["score", "--task", "gov_report", "--predictions", str(predictions), "--references", str(tmp_path / "refs")]
    assert main([*argv, "--cache-dir", str(tmp_path / "cache")]) == 0
    printed = capsys.readouterr().out
    assert "rouge/geometric_mean" in printed and "50.0" in printed
    assert "scrolls_score" in printed


def test_score_reports_missing_ids_without_traceback(tmp_path, qasper_zip, capsys):
    predictions = write_predictions({"a": "x"}, tmp_path / "p.json")
    argv = ["score", "--task", "qasper", "--predictions", str(predictions), "--references", str(qasper_zip)]
    assert main([*argv, "--cache-dir", str(tmp_path / "cache")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("scrolls-ssm score: error: no prediction for 2 id(s): 'b', 'c'")


def test_submit_builds_and_validates(tmp_path, capsys):
    references = tmp_path / "refs"
    for task in SCORED_TASKS:
        write_scrolls_zip(references / f"{task}.zip", task, {"test": rows_for([("t1", None), ("t2", None)])})
        write_predictions({"t1": f"{task} one", "t2": ""}, prediction_path(tmp_path / "preds", task))
    output = tmp_path / "submission.csv"
    argv = ["submit", "--predictions-dir", str(tmp_path / "preds"), "--output", str(output)]
    assert main([*argv, "--references-dir", str(references)]) == 0
    submitted = read_submission_csv(output)
    assert list(submitted) == list(SCORED_TASKS)
    assert submitted["quality"] == {"t1": "quality one", "t2": ""}
    assert "gov_report 2" in capsys.readouterr().out

    write_predictions({"t1": "only one"}, prediction_path(tmp_path / "preds", "qmsum"))
    assert main([*argv, "--references-dir", str(references)]) == 2
    assert "qmsum: predictions do not match the split's ids: missing 1 id(s): 't2'" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "scrolls_ssm.cli", "--help"],
        capture_output=True,
        text=True,
        env=os.environ,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "score" in result.stdout and "submit" in result.stdout
