"""SCROLLS task table, loading and record validation.

Every route ends in the same `datasets.Dataset` with string columns `id`, `pid`, `input`, `output`
(plus QuALITY's boolean `is_hard`), so the rest of the toolkit never cares where the data came from:

* the official per-task zip on the Hub, read through the `datasets` JSON builder (the `tau/scrolls`
  loading script no longer runs on datasets >= 4);
* a local copy of that zip, a folder of `<split>.jsonl` / `<task>/<split>.jsonl` files, or one JSONL or
  parquet file in the SCROLLS format. These are read with `zipfile` / `json` / `pyarrow` directly, because
  `datasets` refuses `zip://` paths under `HF_DATASETS_OFFLINE=1`, and so that a malformed record is reported
  with its file, line and field instead of a pyarrow cast error.

Local files are validated record by record and written once, in bounded batches, to an Arrow file in the
cache that is memory-mapped afterwards: NarrativeQA's training split holds ~16 GB of text and must not be
materialised as Python lists.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import hub_unreachable, offline_note, reach_hub_hint

HUB_RESOLVE_URL = "https://huggingface.co/datasets/tau/scrolls/resolve/main"
SPLITS = ("train", "validation", "test")
TEXT_FIELDS = ("id", "pid", "input", "output")

MetricKind = Literal["rouge", "f1", "exact_match"]


class ScrollsDataError(ValueError):
    """A SCROLLS file or record that cannot be used; the message names the file, line, field and the fix."""


@dataclass(frozen=True)
class TaskSpec:
    """What the toolkit needs to know about one SCROLLS task.

    `data_name` is the folder/zip the rows come from: `quality_hard` is not a file of its own but QuALITY's
    rows with `is_hard == true`. `trim_chars_per_token` bounds the characters kept before tokenizing
    (max_source_length * this), which only matters for NarrativeQA's book-length inputs.
    """

    name: str
    metric: MetricKind
    starts_with_query: bool
    max_target_length: int
    max_new_tokens: int
    data_name: str
    max_source_length: int = 16384
    hard_only: bool = False
    in_scrolls_score: bool = True
    trim_chars_per_token: int | None = None

    @property
    def hub_zip(self) -> str:
        """File name of the official zip on the Hub."""
        return f"{self.data_name}.zip"

    @property
    def hub_url(self) -> str:
        return f"{HUB_RESOLVE_URL}/{self.hub_zip}"


# Targets: summaries are truncated at 1,024 tokens as in the published baselines; QA answers are short
# (NarrativeQA/Qasper answers rarely pass 60 tokens); QuALITY targets are the option text (a sentence);
# ContractNLI targets are one of three labels of at most a few tokens.
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("gov_report", "rouge", False, 1024, 1024, "gov_report"),
        TaskSpec("summ_screen_fd", "rouge", False, 1024, 1024, "summ_screen_fd"),
        TaskSpec("qmsum", "rouge", True, 1024, 1024, "qmsum"),
        TaskSpec("qasper", "f1", True, 128, 128, "qasper"),
        TaskSpec("narrative_qa", "f1", True, 128, 128, "narrative_qa", trim_chars_per_token=10),
        TaskSpec("quality", "exact_match", True, 64, 64, "quality"),
        TaskSpec("quality_hard", "exact_match", True, 64, 64, "quality", hard_only=True, in_scrolls_score=False),
        TaskSpec("contract_nli", "exact_match", True, 16, 16, "contract_nli"),
    )
}
SCORED_TASKS = tuple(name for name, spec in TASKS.items() if spec.in_scrolls_score)


def get_task(name: str) -> TaskSpec:
    """Look up a task by its SCROLLS config name."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown SCROLLS task {name!r}; valid tasks: {', '.join(TASKS)}") from None


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def _features(with_is_hard: bool) -> datasets.Features:
    columns = {field: datasets.Value("string") for field in TEXT_FIELDS}
    if with_is_hard:
        columns["is_hard"] = datasets.Value("bool")
    return datasets.Features(columns)


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_type(value: Any) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _validate_record(record: Any, where: str, split: str, keep_is_hard: bool) -> dict[str, Any]:
    """Check one record against the SCROLLS format and return only the fields the toolkit keeps."""
    if not isinstance(record, dict):
        raise ScrollsDataError(
            f"{where}: expected a JSON object with fields id, pid, input, output, got {_json_type(record)} "
            f"{_preview(record)}. Fix: write one JSON object per line."
        )
    row: dict[str, Any] = {}
    for field in TEXT_FIELDS:
        if field not in record:
            raise ScrollsDataError(
                f"{where}: missing field {field!r} (record has {sorted(record)}). Every SCROLLS record needs "
                f"id, pid, input and output. Fix: add {field!r} to this record."
            )
        value = record[field]
        if field == "output" and value is None:
            if split != "test":
                raise ScrollsDataError(
                    f"{where}: field 'output' is null, which SCROLLS allows only in the test split (this is "
                    f"{split!r}). Fix: give the reference output, or load this file as split='test'."
                )
        elif not isinstance(value, str):
            allowed = "a string (or null in the test split)" if field == "output" else "a string"
            raise ScrollsDataError(
                f"{where}: field {field!r} must be {allowed}, got {_json_type(value)} {_preview(value)}. "
                f"Fix: write {field!r} as a JSON string, e.g. {json.dumps(str(value))}."
            )
        row[field] = value
    if keep_is_hard:
        value = record.get("is_hard")
        if not isinstance(value, bool):
            raise ScrollsDataError(
                f"{where}: field 'is_hard' must be true or false, got {_json_type(value)} {_preview(value)}. "
                f"Fix: every QuALITY record of this file needs a boolean 'is_hard' once the first one has it."
            )
        row["is_hard"] = value
    return row


@dataclass(frozen=True)
class _LocalSource:
    """One local file to read: a JSONL file, a JSONL member of a zip, or a parquet file."""

    path: Path
    kind: Literal["jsonl", "parquet"]
    member: str | None = None

    @property
    def label(self) -> str:
        return f"{self.path}::{self.member}" if self.member else str(self.path)


def _zip_source(path: Path, spec: TaskSpec, split: str) -> _LocalSource:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    for member in (f"{spec.data_name}/{split}.jsonl", f"{split}.jsonl"):
        if member in names:
            return _LocalSource(path, "jsonl", member)
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} entries)" if len(names) > 20 else "")
    raise ScrollsDataError(
        f"{path}: no {spec.data_name}/{split}.jsonl or {split}.jsonl inside (it holds: {shown}). "
        f"Fix: pass the official {spec.hub_zip} (from {spec.hub_url}) or a zip with that layout."
    )


def _resolve_local(spec: TaskSpec, split: str, location: str | os.PathLike[str]) -> _LocalSource:
    """Find the file for (task, split) under a user-given path."""
    path = Path(location).expanduser()
    if path.is_dir():
        candidates = [
            path / f"{split}.jsonl",
            path / f"{split}.parquet",
            path / spec.data_name / f"{split}.jsonl",
            path / spec.data_name / f"{split}.parquet",
            path / spec.hub_zip,
        ]
        for candidate in candidates:
            if candidate.is_file():
                return _resolve_local(spec, split, candidate)
        tried = ", ".join(str(c.relative_to(path)) for c in candidates)
        raise ScrollsDataError(f"{path}: found none of {tried} for task {spec.name!r}, split {split!r}.")
    if not path.is_file():
        raise ScrollsDataError(f"{path}: no such file or folder (task {spec.name!r}, split {split!r}).")
    suffix = path.suffix.lower()
    if suffix == ".zip":
        return _zip_source(path, spec, split)
    if suffix in (".jsonl", ".json"):
        return _LocalSource(path, "jsonl")
    if suffix == ".parquet":
        return _LocalSource(path, "parquet")
    raise ScrollsDataError(
        f"{path}: cannot read a {suffix or 'suffix-less'} file. Fix: pass a .zip, .jsonl, .json (JSON Lines), "
        f".parquet file or a folder holding <split>.jsonl."
    )


def _open_lines(source: _LocalSource) -> Iterator[bytes]:
    if source.member is None:
        with open(source.path, "rb") as handle:
            yield from handle
    else:
        with zipfile.ZipFile(source.path) as archive, archive.open(source.member) as handle:
            yield from handle


class _SameInputPerId:
    """Rows that share an id are the references of one example (Qasper and NarrativeQA have one row per pid), so they
    must carry the same input; otherwise scoring would pool the references of different examples. Keeps one hash per
    id, not the inputs."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.first: dict[str, tuple[str, int]] = {}  # id -> (where it first appeared, hash of its input)

    def check(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        first_where, first_hash = self.first.setdefault(row["id"], (where, hash(row["input"])))
        if first_hash != hash(row["input"]):
            raise ScrollsDataError(
                f"{self.label}, {where}: id {row['id']!r} was already used on {first_where} with a different input. "
                "Rows that share an id are references of one example and must carry the same input. Fix: give this "
                f"row its own id (and pid), or make its input identical to the one on {first_where}."
            )
        return row


def _iter_records(source: _LocalSource, split: str, keep_is_hard: bool) -> Iterator[dict[str, Any]]:
    """Yield validated rows; raise ScrollsDataError at the first bad line, naming it."""
    count = 0
    same_input = _SameInputPerId(source.label)
    if source.kind == "parquet":
        parquet = pq.ParquetFile(source.path)
        row_number = 0
        for batch in parquet.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row_number += 1
                row = _validate_record(record, f"{source.label}, row {row_number}", split, keep_is_hard)
                yield same_input.check(row, f"row {row_number}")
        count = row_number
    else:
        for line_number, raw in enumerate(_open_lines(source), start=1):
            try:
                text = raw.decode("utf-8").rstrip("\r\n")  # unstripped otherwise, so JSON error columns are true
            except UnicodeDecodeError as error:
                raise ScrollsDataError(
                    f"{source.label}, line {line_number}: not UTF-8 ({error.reason} at byte {error.start}). "
                    f"Fix: save the file as UTF-8, as JSON requires."
                ) from None
            if not text.strip():
                continue
            if count == 0 and text.lstrip().startswith("["):
                raise ScrollsDataError(
                    f"{source.label}, line {line_number}: this looks like a JSON array, but SCROLLS files are "
                    f"JSON Lines. Fix: write one JSON object per line."
                )
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise ScrollsDataError(
                    f"{source.label}, line {line_number}: not valid JSON ({error.msg} at column {error.colno}): "
                    f"{_preview(text)}. Fix: each line must hold one complete JSON object."
                ) from None
            count += 1
            row = _validate_record(record, f"{source.label}, line {line_number}", split, keep_is_hard)
            yield same_input.check(row, f"line {line_number}")
    if count == 0:
        raise ScrollsDataError(
            f"{source.label}: holds no records. Fix: point at a SCROLLS {split} file with one JSON object per line."
        )


def _first_record_has_is_hard(source: _LocalSource) -> bool:
    """Peek at the first record so QuALITY files with and without `is_hard` both load."""
    if source.kind == "parquet":
        return "is_hard" in pq.ParquetFile(source.path).schema_arrow.names
    for raw in _open_lines(source):
        text = raw.decode("utf-8").strip()
        if text:
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                return False  # _iter_records reports the bad line with its number
            return isinstance(record, dict) and "is_hard" in record
    return False


def _write_arrow(rows: Iterable[dict[str, Any]], features: datasets.Features, path: Path) -> None:
    """Stream rows into an Arrow IPC stream file in bounded batches (rows or characters, whichever first)."""
    schema = features.arrow_schema
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    columns: dict[str, list[Any]] = {name: [] for name in schema.names}
    chars = 0
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for row in rows:
                for name in schema.names:
                    columns[name].append(row[name])
                chars += len(row["input"])
                if len(columns["id"]) >= 1000 or chars >= 32_000_000:
                    writer.write_batch(pa.record_batch(columns, schema=schema))
                    columns = {name: [] for name in schema.names}
                    chars = 0
            if columns["id"]:
                writer.write_batch(pa.record_batch(columns, schema=schema))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else Path(datasets.config.HF_DATASETS_CACHE)
    return root / "scrolls_ssm"


def _load_local(spec: TaskSpec, split: str, source: _LocalSource, cache_dir: str | os.PathLike[str] | None):
    keep_is_hard = spec.data_name == "quality" and _first_record_has_is_hard(source)
    stat = source.path.stat()
    key = json.dumps(
        [2, str(source.path.resolve()), source.member, stat.st_size, stat.st_mtime_ns, spec.data_name, split]
    )
    root = _cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    arrow_path = root / f"{spec.data_name}-{split}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.arrow"
    if not arrow_path.is_file():
        _write_arrow(_iter_records(source, split, keep_is_hard), _features(keep_is_hard), arrow_path)
    return datasets.Dataset.from_file(str(arrow_path), split=split)


def _hub_unreachable_error(spec: TaskSpec, split: str, reason: str) -> ScrollsDataError:
    return ScrollsDataError(
        f"could not reach the Hugging Face Hub{reason} to download the {split} split of {spec.name!r} from the "
        f"tau/scrolls dataset ({spec.hub_url}), and no local data was given. Fix: download {spec.hub_zip} where the "
        "Hub is reachable and point at it (or at a folder holding it, or <task>/<split>.jsonl files): "
        f"data.data_dir=<folder or zip> in a run config, data_files= for load_scrolls; {reach_hub_hint()}."
    )


def _load_from_hub(spec: TaskSpec, split: str, cache_dir: str | os.PathLike[str] | None) -> datasets.Dataset:
    url = f"zip://{spec.data_name}/{split}.jsonl::{spec.hub_url}"
    if datasets.config.HF_DATASETS_OFFLINE:  # datasets refuses zip:// URLs offline, even for a cached download
        raise _hub_unreachable_error(spec, split, offline_note() or " (offline mode is on)")
    try:
        dataset = datasets.load_dataset(
            "json", data_files={split: url}, split=split, cache_dir=None if cache_dir is None else str(cache_dir)
        )
    except Exception as error:
        if not hub_unreachable(error):
            raise
        raise _hub_unreachable_error(spec, split, offline_note()) from error
    return _check_hub_table(dataset, url, split, keep_is_hard=spec.data_name == "quality")


def _check_hub_table(dataset: datasets.Dataset, label: str, split: str, keep_is_hard: bool) -> datasets.Dataset:
    """Column-level checks for data read by the JSON builder (row-by-row Python checks would decode ~16 GB)."""
    missing = [field for field in TEXT_FIELDS if field not in dataset.column_names]
    if missing:
        raise ScrollsDataError(f"{label}: missing column(s) {missing}; columns are {dataset.column_names}.")
    if dataset.features["output"] == datasets.Value("null"):
        dataset = dataset.cast_column("output", datasets.Value("string"))
    for field in TEXT_FIELDS:
        feature = dataset.features[field]
        if feature != datasets.Value("string"):
            raise ScrollsDataError(f"{label}: column {field!r} must hold strings, found {feature}.")
        nulls = dataset.data.column(field).null_count
        if nulls and (field != "output" or split != "test"):
            raise ScrollsDataError(
                f"{label}: column {field!r} has {nulls} null value(s); only 'output' in the test split may be null."
            )
    keep = list(TEXT_FIELDS)
    if keep_is_hard and "is_hard" in dataset.column_names:
        keep.append("is_hard")
    return dataset.select_columns(keep)


def load_scrolls(
    task: str,
    split: str,
    data_files: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> datasets.Dataset:
    """Load one split of one SCROLLS task as a Dataset with columns id, pid, input, output (+ is_hard).

    data_files: None reads the official zip from the Hub; otherwise a local zip, a folder (holding
    `<split>.jsonl`, `<task>/<split>.jsonl`, the `.parquet` equivalents or the official `<task>.zip`), a single
    JSONL/parquet file, or a mapping `{split: path}`. `quality_hard` reads QuALITY's data and keeps `is_hard` rows.
    cache_dir: where validated local data (and the Hub download) is cached; defaults to the datasets cache.
    """
    spec = get_task(task)
    _check_split(split)
    if data_files is None:
        dataset = _load_from_hub(spec, split, cache_dir)
    else:
        if isinstance(data_files, Mapping):
            if split not in data_files:
                raise ValueError(f"data_files has no entry for split {split!r}; it names {sorted(data_files)}.")
            data_files = data_files[split]
        dataset = _load_local(spec, split, _resolve_local(spec, split, data_files), cache_dir)
    if spec.hard_only:
        if "is_hard" not in dataset.column_names:
            raise ScrollsDataError(
                f"task 'quality_hard' needs QuALITY records with a boolean 'is_hard' field; the {split} data has "
                f"columns {dataset.column_names}. Fix: use the official quality.zip, which carries it."
            )
        dataset = dataset.filter(lambda flags: flags, input_columns="is_hard", batched=True)
    return dataset


def group_references(dataset: datasets.Dataset) -> tuple[datasets.Dataset, dict[str, list[str]]]:
    """Collapse rows to one per `id` for evaluation and collect every reference of each id.

    Qasper and NarrativeQA have one row per reference answer; the model must predict once per id and be
    scored against all of them. Rows keep the order of each id's first appearance. Test rows (output None)
    give an empty reference list.
    """
    first_row: dict[str, int] = {}
    references: dict[str, list[str]] = {}
    for index, (id_, output) in enumerate(zip(dataset["id"], dataset["output"], strict=True)):
        if id_ not in first_row:
            first_row[id_] = index
            references[id_] = []
        if output is not None:
            references[id_].append(output)
    return dataset.select(list(first_row.values())), references
