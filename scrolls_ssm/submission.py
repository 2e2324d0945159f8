"""Prediction files and the leaderboard submission.

Per task, predictions are a JSON object `{id: prediction}` with exactly one entry per id of the split, kept in
`<dir>/<task>.json`. The leaderboard takes one CSV, columns `Task,ID,Prediction`, covering the seven scored
tasks. Files are written to a temporary name and moved into place with `os.replace`, so an interrupted run
never leaves half a file that a later step would take for a finished one. Empty predictions are legal and
survive the round trip (the csv module keeps "" as ""; with pandas read it back with keep_default_na=False).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from scrolls_ssm.data import SCORED_TASKS, get_task, group_references, load_scrolls

CSV_COLUMNS = ("Task", "ID", "Prediction")


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write text to a temporary file beside `path`, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
            stream.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def prediction_path(predictions_dir: str | os.PathLike[str], task: str) -> Path:
    """Where the predictions of `task` live inside a predictions folder."""
    get_task(task)
    return Path(predictions_dir) / f"{task}.json"


def write_predictions(predictions: Mapping[str, str], path: str | os.PathLike[str]) -> Path:
    """Write `{id: prediction}` as JSON, atomically."""
    _check_prediction_map(predictions, str(path))
    return write_text_atomic(Path(path), json.dumps(dict(predictions), ensure_ascii=False, indent=1) + "\n")


def _check_prediction_map(predictions: object, source: str) -> None:
    if not isinstance(predictions, Mapping):
        raise ValueError(f"{source}: predictions must be a JSON object {{id: prediction}}, got {type(predictions)}.")
    bad = [
        (id_, value) for id_, value in predictions.items() if not isinstance(id_, str) or not isinstance(value, str)
    ]
    if bad:
        id_, value = bad[0]
        raise ValueError(
            f"{source}: {len(bad)} entr(y/ies) are not string -> string, e.g. {id_!r}: {value!r}. "
            f'Fix: every prediction is a string (use "" for an empty answer).'
        )


def read_predictions(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read a `{id: prediction}` JSON file, checking it is an object of strings."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ValueError(
            f"predictions file {path} {what}. Fix: pass the JSON object {{id: prediction}} a run wrote, e.g. "
            "runs/<recipe>/predictions/validation/<task>.json."
        )
    try:
        predictions = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})."
        ) from None
    _check_prediction_map(predictions, str(path))
    return predictions


def _listing(ids: list[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:10])
    return f"{len(ids)} id(s): {shown}" + (", ..." if len(ids) > 10 else "")


def validate_predictions(task: str, predictions: Mapping[str, str], expected_ids: Iterable[str]) -> None:
    """Raise ValueError unless `predictions` has exactly the ids of the split, listing the missing and extra ones."""
    expected = list(dict.fromkeys(expected_ids))
    expected_set = set(expected)
    missing = [id_ for id_ in expected if id_ not in predictions]
    extra = [id_ for id_ in predictions if id_ not in expected_set]
    if missing or extra:
        parts = [f"missing {_listing(missing)}" if missing else "", f"extra {_listing(extra)}" if extra else ""]
        raise ValueError(
            f"{task}: predictions do not match the split's ids: {'; '.join(p for p in parts if p)}. "
            f"Fix: predict exactly once per id (not per pid) of the split."
        )


def split_ids(task: str, references: str | os.PathLike[str], split: str = "test") -> list[str]:
    """The distinct ids of a split, in file order, from any local source `load_scrolls` accepts."""
    rows, _ = group_references(load_scrolls(task, split, data_files=references))
    return list(rows["id"])


def load_predictions_dir(
    predictions_dir: str | os.PathLike[str], tasks: Iterable[str] = SCORED_TASKS
) -> dict[str, dict[str, str]]:
    """Read `<dir>/<task>.json` for every task, naming all missing files at once."""
    tasks = list(tasks)
    paths = {task: prediction_path(predictions_dir, task) for task in tasks}
    absent = [str(path) for path in paths.values() if not path.is_file()]
    if absent:
        raise ValueError(
            f"missing prediction file(s): {', '.join(absent)}. Fix: write one {{id: prediction}} "
            f"JSON per task, named <task>.json."
        )
    return {task: read_predictions(path) for task, path in paths.items()}


def build_submission_csv(
    predictions: Mapping[str, Mapping[str, str]] | str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    expected_ids: Mapping[str, Iterable[str]] | None = None,
    tasks: Iterable[str] = SCORED_TASKS,
) -> Path:
    """Write the leaderboard CSV (Task,ID,Prediction), atomically.

    predictions: `{task: {id: prediction}}` or a folder of `<task>.json` files.
    expected_ids: `{task: ids of the test split}`; when given, every task is validated against it first.
    tasks: the tasks the file covers. The leaderboard takes the seven scored tasks (the default); a run on fewer
        tasks writes the same format for just its own, e.g. to submit once the other tasks' files exist.
    """
    tasks = list(tasks)
    if not isinstance(predictions, Mapping):
        predictions = load_predictions_dir(predictions, tasks)
    unknown = sorted(set(predictions) - set(tasks))
    missing = [task for task in tasks if task not in predictions]
    if unknown or missing:
        raise ValueError(
            f"this submission covers exactly the tasks {', '.join(tasks)}; "
            f"missing: {missing or 'none'}; not part of it: {unknown or 'none'}."
        )
    for task in tasks:
        _check_prediction_map(predictions[task], task)
        if expected_ids is not None:
            validate_predictions(task, predictions[task], expected_ids[task])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for task in tasks:
        for id_, prediction in predictions[task].items():
            writer.writerow((task, id_, prediction))
    return write_text_atomic(Path(output_path), buffer.getvalue())


def read_submission_csv(path: str | os.PathLike[str]) -> dict[str, dict[str, str]]:
    """Read a submission CSV back to `{task: {id: prediction}}`, rejecting bad headers, tasks and duplicates."""
    path = Path(path)
    result: dict[str, dict[str, str]] = {}
    with open(path, encoding="utf-8", newline="") as stream:
        reader = csv.reader(stream)
        header = next(reader, None)
        if header is None or tuple(header) != CSV_COLUMNS:
            raise ValueError(f"{path}: header must be {','.join(CSV_COLUMNS)}, got {header}.")
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            if len(row) != 3:
                raise ValueError(f"{where}: expected 3 fields (Task,ID,Prediction), got {len(row)}: {row!r}.")
            task, id_, prediction = row
            if task not in SCORED_TASKS:
                raise ValueError(f"{where}: unknown task {task!r}; a submission holds {', '.join(SCORED_TASKS)}.")
            if id_ in result.setdefault(task, {}):
                raise ValueError(f"{where}: duplicate ID {id_!r} for task {task!r}.")
            result[task][id_] = prediction
    return result


def validate_submission_csv(path: str | os.PathLike[str], expected_ids: Mapping[str, Iterable[str]]) -> None:
    """Check a written CSV against the split ids of every task (missing tasks and ids, extra ids)."""
    submitted = read_submission_csv(path)
    absent = [task for task in SCORED_TASKS if task not in submitted]
    if absent:
        raise ValueError(f"{path}: no rows for task(s) {absent}.")
    for task in SCORED_TASKS:
        validate_predictions(task, submitted[task], expected_ids[task])
