"""Prediction JSONs, the leaderboard CSV and their validation."""

from __future__ import annotations

import json

import datasets
import pandas as pd
import pytest
from scrolls_fixtures import rows_for, write_scrolls_zip

from scrolls_ssm.data import SCORED_TASKS
from scrolls_ssm.submission import (
    build_submission_csv,
    load_predictions_dir,
    prediction_path,
    read_predictions,
    read_submission_csv,
    split_ids,
    validate_predictions,
    validate_submission_csv,
    write_predictions,
)


@pytest.fixture(autouse=True)
def isolated_cache(monkeypatch, tmp_path):
    """Validated data is cached; keep it out of the user's datasets cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


TRICKY = {"a": "", "b": 'comma, "quote"\nand a newline', "c": "NA", "d": "Ünïcödé"}


def _all_tasks():
    return {task: {f"{task}-{i}": f"answer {i}" for i in range(2)} for task in SCORED_TASKS}


def test_predictions_round_trip_atomically(tmp_path):
    path = write_predictions(TRICKY, tmp_path / "out" / "qasper.json")
    assert read_predictions(path) == TRICKY
    assert [p.name for p in path.parent.iterdir()] == ["qasper.json"]  # no temporary file left behind
    assert json.loads(path.read_text(encoding="utf-8"))["d"] == "Ünïcödé"


def test_predictions_must_be_strings(tmp_path):
    with pytest.raises(ValueError, match=r"1 entr\(y/ies\) are not string -> string, e.g. 'a': None"):
        write_predictions({"a": None, "b": "x"}, tmp_path / "p.json")
    assert not (tmp_path / "p.json").exists()
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object"):
        read_predictions(tmp_path / "list.json")
    (tmp_path / "broken.json").write_text('{"a": ')
    with pytest.raises(ValueError, match=r"broken.json: not valid JSON \(Expecting value at line 1, column 7\)"):
        read_predictions(tmp_path / "broken.json")


def test_validate_predictions_lists_missing_and_extra():
    expected = [f"id{i}" for i in range(13)] + ["id0"]  # duplicates (one row per pid) count once
    with pytest.raises(ValueError) as error:
        validate_predictions("qasper", {"id0": "x", "other": "y"}, expected)
    message = str(error.value)
    assert message.startswith("qasper: predictions do not match the split's ids: missing 12 id(s): 'id1', 'id2'")
    assert "'id10', ..." in message and "'id11'" not in message
    assert "extra 1 id(s): 'other'" in message
    validate_predictions("qasper", {f"id{i}": "" for i in range(13)}, expected)


def test_csv_round_trip_keeps_empty_and_tricky_predictions(tmp_path):
    predictions = _all_tasks()
    predictions["qasper"] = TRICKY
    path = build_submission_csv(predictions, tmp_path / "submission.csv")
    assert read_submission_csv(path) == predictions
    frame = pd.read_csv(path, keep_default_na=False)
    assert list(frame.columns) == ["Task", "ID", "Prediction"]
    assert len(frame) == 6 * 2 + 4
    qasper = frame[frame.Task == "qasper"].set_index("ID")["Prediction"].to_dict()
    assert qasper == TRICKY
    # Why keep_default_na matters: by default pandas turns "" and "NA" into NaN.
    assert pd.read_csv(path)["Prediction"].isna().sum() == 2


def test_csv_needs_exactly_the_seven_tasks(tmp_path):
    predictions = _all_tasks()
    del predictions["qmsum"]
    with pytest.raises(ValueError, match=r"missing: \['qmsum'\]; not part of it: none"):
        build_submission_csv(predictions, tmp_path / "s.csv")
    with pytest.raises(ValueError, match=r"not part of it: \['quality_hard'\]"):
        build_submission_csv({**_all_tasks(), "quality_hard": {}}, tmp_path / "s.csv")
    assert not (tmp_path / "s.csv").exists()


def test_csv_for_a_subset_of_tasks(tmp_path):
    """A run on fewer tasks writes the same format for just its own tasks, in the order given."""
    predictions = {task: ids for task, ids in _all_tasks().items() if task in ("qasper", "gov_report")}
    path = build_submission_csv(predictions, tmp_path / "s.csv", tasks=["qasper", "gov_report"])
    assert read_submission_csv(path) == predictions
    assert path.read_text().splitlines()[1].startswith("qasper,")
    with pytest.raises(ValueError, match=r"missing: \['gov_report'\]"):
        build_submission_csv({"qasper": predictions["qasper"]}, tmp_path / "t.csv", tasks=["qasper", "gov_report"])


def test_csv_from_folder_and_validation_against_test_split(tmp_path):
    predictions = _all_tasks()
    for task, task_predictions in predictions.items():
        write_predictions(task_predictions, prediction_path(tmp_path / "preds", task))
    references = tmp_path / "refs"
    for task in SCORED_TASKS:
        rows = rows_for([(f"{task}-0", None), (f"{task}-0", None), (f"{task}-1", None)])
        write_scrolls_zip(references / f"{task}.zip", task, {"test": rows})
    assert split_ids("qasper", references) == ["qasper-0", "qasper-1"]
    expected = {task: split_ids(task, references) for task in SCORED_TASKS}
    path = build_submission_csv(tmp_path / "preds", tmp_path / "submission.csv", expected_ids=expected)
    validate_submission_csv(path, expected)
    assert read_submission_csv(path) == predictions

    expected["contract_nli"] = ["contract_nli-0", "contract_nli-1", "contract_nli-2"]
    with pytest.raises(ValueError, match=r"contract_nli: .*missing 1 id\(s\): 'contract_nli-2'"):
        build_submission_csv(tmp_path / "preds", tmp_path / "other.csv", expected_ids=expected)
    with pytest.raises(ValueError, match=r"contract_nli: .*missing 1 id\(s\): 'contract_nli-2'"):
        validate_submission_csv(path, expected)


def test_missing_prediction_files_are_all_named(tmp_path):
    write_predictions({"x": "y"}, prediction_path(tmp_path, "qasper"))
    with pytest.raises(ValueError) as error:
        load_predictions_dir(tmp_path)
    message = str(error.value)
    assert "gov_report.json" in message and "contract_nli.json" in message and "qasper.json" not in message


def test_read_submission_csv_rejects_bad_files(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("task,id,prediction\n")
    with pytest.raises(ValueError, match="header must be Task,ID,Prediction"):
        read_submission_csv(path)
    path.write_text("Task,ID,Prediction\nqasper,a,x\nqasper,a,y\n")
    with pytest.raises(ValueError, match=r"s.csv, line 3: duplicate ID 'a' for task 'qasper'"):
        read_submission_csv(path)
    path.write_text("Task,ID,Prediction\nhotpot,a,x\n")
    with pytest.raises(ValueError, match=r"line 2: unknown task 'hotpot'"):
        read_submission_csv(path)
    path.write_text("Task,ID,Prediction\nqasper,a\n")
    with pytest.raises(ValueError, match=r"line 2: expected 3 fields"):
        read_submission_csv(path)
