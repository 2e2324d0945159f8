"""Loading SCROLLS data from every supported route, and the messages for malformed files."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scrolls_fixtures import rows_for, write_jsonl, write_scrolls_zip

from scrolls_ssm import data
from scrolls_ssm.data import SCORED_TASKS, ScrollsDataError, get_task, group_references, load_scrolls

QASPER_ROWS = rows_for([("a", "yes"), ("a", "it is"), ("b", "no"), ("c", "maybe")])


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Run as users without network do: local routes must work with datasets' offline mode on."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def test_task_table():
    assert SCORED_TASKS == (
        "gov_report",
        "summ_screen_fd",
        "qmsum",
        "qasper",
        "narrative_qa",
        "quality",
        "contract_nli",
    )
    gov, qasper, hard = get_task("gov_report"), get_task("qasper"), get_task("quality_hard")
    assert (gov.metric, gov.starts_with_query, gov.max_source_length, gov.max_target_length) == (
        "rouge",
        False,
        16384,
        1024,
    )
    assert (qasper.metric, qasper.starts_with_query, qasper.max_new_tokens) == ("f1", True, 128)
    assert get_task("contract_nli").metric == get_task("quality").metric == "exact_match"
    assert get_task("qmsum").starts_with_query and not get_task("summ_screen_fd").starts_with_query
    assert (hard.data_name, hard.hub_zip, hard.hard_only, hard.in_scrolls_score) == (
        "quality",
        "quality.zip",
        True,
        False,
    )
    assert gov.hub_url == "https://huggingface.co/datasets/tau/scrolls/resolve/main/gov_report.zip"
    with pytest.raises(dataclasses.FrozenInstanceError):
        gov.metric = "f1"
    with pytest.raises(ValueError, match="unknown SCROLLS task 'govreport'; valid tasks: gov_report, summ_screen_fd"):
        get_task("govreport")


def test_official_zip_layout(tmp_path):
    path = write_scrolls_zip(tmp_path / "qasper.zip", "qasper", {"train": QASPER_ROWS, "validation": QASPER_ROWS[:2]})
    train = load_scrolls("qasper", "train", path)
    assert train.column_names == ["id", "pid", "input", "output"]
    assert train["pid"][:] == ["a_0", "a_1", "b_0", "c_0"]
    assert train[1] == {"id": "a", "pid": "a_1", "input": "doc a", "output": "it is"}
    assert len(load_scrolls("qasper", "validation", path)) == 2


@pytest.mark.parametrize("layout", ["split_file", "task_folder", "zip_in_folder", "single_file", "mapping"])
def test_local_layouts(tmp_path, layout):
    root = tmp_path / "data"
    if layout == "split_file":
        write_jsonl(root / "validation.jsonl", QASPER_ROWS)
        source = root
    elif layout == "task_folder":
        write_jsonl(root / "qasper" / "validation.jsonl", QASPER_ROWS)
        source = root
    elif layout == "zip_in_folder":
        write_scrolls_zip(root / "qasper.zip", "qasper", {"validation": QASPER_ROWS})
        source = root
    elif layout == "single_file":
        source = write_jsonl(root / "mine.jsonl", QASPER_ROWS)
    else:
        source = {"validation": write_jsonl(root / "val.jsonl", QASPER_ROWS)}
    dataset = load_scrolls("qasper", "validation", source)
    assert dataset["output"][:] == ["yes", "it is", "no", "maybe"]


def test_parquet(tmp_path):
    path = tmp_path / "validation.parquet"
    pq.write_table(pa.Table.from_pylist(QASPER_ROWS), path)
    assert load_scrolls("qasper", "validation", path)["id"][:] == ["a", "a", "b", "c"]


def test_quality_keeps_is_hard_and_quality_hard_filters(tmp_path):
    rows = [
        dict(row, is_hard=hard)
        for row, hard in zip(rows_for([("q1", "A"), ("q2", "B"), ("q3", "C")]), [True, False, True], strict=True)
    ]
    path = write_scrolls_zip(tmp_path / "quality.zip", "quality", {"validation": rows})
    quality = load_scrolls("quality", "validation", path)
    assert quality["is_hard"][:] == [True, False, True]
    hard = load_scrolls("quality_hard", "validation", path)
    assert hard["id"][:] == ["q1", "q3"]
    # Another task drops the field: only QuALITY has it.
    write_jsonl(tmp_path / "cnli" / "validation.jsonl", rows)
    assert "is_hard" not in load_scrolls("contract_nli", "validation", tmp_path / "cnli").column_names


def test_quality_hard_needs_is_hard(tmp_path):
    path = write_jsonl(tmp_path / "validation.jsonl", rows_for([("q1", "A")]))
    with pytest.raises(ScrollsDataError, match="quality_hard.*needs QuALITY records with a boolean 'is_hard'"):
        load_scrolls("quality_hard", "validation", path)


def test_test_split_allows_null_output(tmp_path):
    path = write_scrolls_zip(tmp_path / "qasper.zip", "qasper", {"test": rows_for([("a", None), ("b", None)])})
    test = load_scrolls("qasper", "test", path)
    assert test["output"][:] == [None, None]
    assert test.features["output"] == datasets.Value("string")
    rows, references = group_references(test)
    assert len(rows) == 2 and references == {"a": [], "b": []}


def test_group_references():
    dataset = datasets.Dataset.from_list(rows_for([("b", "x"), ("a", "y"), ("b", "z"), ("c", "w"), ("a", "v")]))
    rows, references = group_references(dataset)
    assert rows["pid"][:] == ["b_0", "a_0", "c_0"]
    assert references == {"b": ["x", "z"], "a": ["y", "v"], "c": ["w"]}


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"id": "a", "pid": "a_0", "input": "doc", "output": "x"})


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([GOOD, '{"id": "b", "pid": '], r"line 2: not valid JSON \(Expecting value at column 20\)"),
        ([GOOD, "", json.dumps({"id": "b", "input": "d", "output": "y"})], r"line 3: missing field 'pid'"),
        (
            [json.dumps({"id": 7, "pid": "p", "input": "d", "output": "y"})],
            r"line 1: field 'id' must be a string, got number 7",
        ),
        (
            [GOOD, json.dumps({"id": "b", "pid": "p", "input": "d", "output": None})],
            r"line 2: field 'output' is null, which SCROLLS allows only in the test split \(this is 'validation'\)",
        ),
        (
            [json.dumps({"id": "b", "pid": "p", "input": ["d"], "output": "y"})],
            r"line 1: field 'input' must be a string, got array \['d'\]",
        ),
        ([json.dumps(["a", "b"])], r"line 1: this looks like a JSON array"),
        ([json.dumps("text")], r"line 1: expected a JSON object .* got string 'text'"),
        (["", "  "], r"holds no records"),
    ],
)
def test_malformed_jsonl_messages_name_file_line_and_field(tmp_path, lines, expected):
    path = _write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ScrollsDataError, match=expected) as error:
        load_scrolls("qasper", "validation", path)
    assert str(error.value).startswith(str(path))
    assert "Fix:" in str(error.value) or "holds no records" in str(error.value)


def test_non_utf8_line(tmp_path):
    path = tmp_path / "validation.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"id": "\xff"}\n')
    with pytest.raises(ScrollsDataError, match=r"line 2: not UTF-8 \(invalid start byte at byte 8\)"):
        load_scrolls("qasper", "validation", path)


def test_empty_file(tmp_path):
    path = tmp_path / "validation.jsonl"
    path.write_text("", encoding="utf-8")
    with pytest.raises(ScrollsDataError, match=r"validation.jsonl: holds no records"):
        load_scrolls("gov_report", "validation", tmp_path)


def test_malformed_zip_member_is_named(tmp_path):
    path = tmp_path / "qasper.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("qasper/validation.jsonl", GOOD + "\n{broken\n")
        archive.writestr("qasper/train.jsonl", GOOD + "\n")
    with pytest.raises(ScrollsDataError, match=r"qasper.zip::qasper/validation.jsonl, line 2: not valid JSON"):
        load_scrolls("qasper", "validation", path)
    with pytest.raises(
        ScrollsDataError,
        match=r"no qasper/test.jsonl or test.jsonl inside \(it holds: qasper/validation.jsonl, qasper/train.jsonl\)",
    ):
        load_scrolls("qasper", "test", path)


def test_bad_is_hard_and_parquet_row(tmp_path):
    rows = [dict(row, is_hard=True) for row in rows_for([("q1", "A"), ("q2", "B")])]
    rows[1]["is_hard"] = "yes"
    with pytest.raises(ScrollsDataError, match=r"line 2: field 'is_hard' must be true or false, got string 'yes'"):
        load_scrolls("quality", "validation", write_jsonl(tmp_path / "q.jsonl", rows))
    bad = [dict(row) for row in QASPER_ROWS]
    bad[2]["output"] = None
    path = tmp_path / "validation.parquet"
    pq.write_table(pa.Table.from_pylist(bad), path)
    with pytest.raises(ScrollsDataError, match=r"validation.parquet, row 3: field 'output' is null"):
        load_scrolls("qasper", "validation", path)


def test_missing_paths_and_unknown_formats(tmp_path):
    with pytest.raises(
        ScrollsDataError, match=r"found none of validation.jsonl, validation.parquet, qasper/validation.jsonl"
    ):
        load_scrolls("qasper", "validation", tmp_path)
    with pytest.raises(ScrollsDataError, match="no such file or folder"):
        load_scrolls("qasper", "validation", tmp_path / "nope.jsonl")
    with pytest.raises(ScrollsDataError, match=r"cannot read a .csv file"):
        load_scrolls("qasper", "validation", _write_lines(tmp_path / "x.csv", ["a"]))
    with pytest.raises(ValueError, match="unknown split 'dev'; valid splits: train, validation, test"):
        load_scrolls("qasper", "dev", tmp_path)
    with pytest.raises(ValueError, match=r"data_files has no entry for split 'train'"):
        load_scrolls("qasper", "train", {"validation": tmp_path})


def test_validated_data_is_cached_and_refreshed_when_the_file_changes(tmp_path):
    path = write_jsonl(tmp_path / "validation.jsonl", QASPER_ROWS)
    cache = tmp_path / "cache"
    assert len(load_scrolls("qasper", "validation", path, cache_dir=cache)) == 4
    arrow_files = list((cache / "scrolls_ssm").glob("*.arrow"))
    assert len(arrow_files) == 1
    assert len(load_scrolls("qasper", "validation", path, cache_dir=cache)) == 4
    assert list((cache / "scrolls_ssm").glob("*.arrow")) == arrow_files
    write_jsonl(path, QASPER_ROWS[:3])
    assert len(load_scrolls("qasper", "validation", path, cache_dir=cache)) == 3


class _FakeLoadDataset:
    """Stands in for datasets.load_dataset: records the call, returns what the JSON builder would."""

    def __init__(self, rows):
        self.rows = rows
        self.calls = []

    def __call__(self, builder, **kwargs):
        self.calls.append((builder, kwargs))
        return datasets.Dataset.from_list(self.rows)


def test_hub_route_passes_the_official_zip_url(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    rows = [dict(row, extra=1) for row in rows_for([("a", None), ("b", None)])]
    fake = _FakeLoadDataset(rows)
    monkeypatch.setattr(data.datasets, "load_dataset", fake)
    test = load_scrolls("narrative_qa", "test", cache_dir="/tmp/x")
    assert fake.calls == [
        (
            "json",
            {
                "data_files": {
                    "test": "zip://narrative_qa/test.jsonl::"
                    "https://huggingface.co/datasets/tau/scrolls/resolve/main/narrative_qa.zip"
                },
                "split": "test",
                "cache_dir": "/tmp/x",
            },
        )
    ]
    assert test.column_names == ["id", "pid", "input", "output"]  # extra columns dropped
    assert test.features["output"] == datasets.Value("string")  # an all-null column is cast back to string


def test_hub_route_quality_hard_reads_quality_zip(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    rows = [
        dict(row, is_hard=hard) for row, hard in zip(rows_for([("q1", "A"), ("q2", "B")]), [False, True], strict=True)
    ]
    fake = _FakeLoadDataset(rows)
    monkeypatch.setattr(data.datasets, "load_dataset", fake)
    hard = load_scrolls("quality_hard", "validation")
    assert fake.calls[0][1]["data_files"] == {
        "validation": "zip://quality/validation.jsonl::https://huggingface.co/datasets/tau/scrolls/resolve/main/quality.zip"
    }
    assert hard["id"][:] == ["q2"]


def test_hub_route_rejects_null_outputs_outside_test(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    rows = rows_for([("a", "x"), ("b", None)])
    monkeypatch.setattr(data.datasets, "load_dataset", _FakeLoadDataset(rows))
    with pytest.raises(ScrollsDataError, match=r"column 'output' has 1 null value\(s\)"):
        load_scrolls("qasper", "train")


def test_hub_route_offline_says_what_to_do():
    with pytest.raises(
        ScrollsDataError,
        match=r"could not reach the Hugging Face Hub \(.*\) to download the validation split of "
        r"'qmsum' from the tau/scrolls dataset \(https://huggingface.co/datasets/tau/scrolls/resolve/main/qmsum.zip\)"
        r".* Fix: download qmsum.zip .* data.data_dir=<folder or zip>",
    ):
        load_scrolls("qmsum", "validation")


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_rows_sharing_an_id_must_share_the_input(tmp_path, kind):
    rows = rows_for([("a", "one"), ("b", "two"), ("a", "three")])
    assert rows[0]["input"] == rows[2]["input"]  # one row per reference: a legal repeat
    assert load_scrolls("qasper", "validation", data_files=_write(tmp_path / "ok", rows, kind)).num_rows == 3
    rows[2]["input"] = "another paper"
    bad = _write(tmp_path / "bad", rows, kind)
    where = (
        "line 3: id 'a' was already used on line 1" if kind == "jsonl" else "row 3: id 'a' was already used on row 1"
    )
    with pytest.raises(ScrollsDataError) as raised:
        load_scrolls("qasper", "validation", data_files=bad)
    assert str(raised.value).startswith(f"{bad}, {where} with a different input.")
    assert "Fix: give this row its own id (and pid)" in str(raised.value)


def _write(folder: Path, rows: list[dict], kind: str) -> Path:
    if kind == "jsonl":
        return write_jsonl(folder / "validation.jsonl", rows)
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "validation.parquet")
    return folder / "validation.parquet"
