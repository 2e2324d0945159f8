"""Builders for SCROLLS-format files and a tiny tokenizer, shared by the data/metrics/CLI tests.

Everything is made on the spot: the Hub is unreachable in tests, and files written here exercise exactly the
layouts users have (the official `<task>.zip` holding `<task>/<split>.jsonl`, bare JSONL files, folders).
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]


def jsonl_text(rows: Iterable[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(jsonl_text(rows), encoding="utf-8")
    return path


def write_scrolls_zip(path: Path, data_name: str, splits: Mapping[str, Iterable[Mapping[str, Any]]]) -> Path:
    """Write a zip laid out like the official one: `<data_name>/<split>.jsonl`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for split, rows in splits.items():
            archive.writestr(f"{data_name}/{split}.jsonl", jsonl_text(rows))
    return path


def rows_for(ids_and_outputs: Iterable[tuple[str, str | None]], prefix: str = "doc") -> list[dict[str, Any]]:
    """SCROLLS rows; repeated ids get pids id_0, id_1, ... like Qasper/NarrativeQA."""
    rows, seen = [], {}
    for id_, output in ids_and_outputs:
        seen[id_] = seen.get(id_, -1) + 1
        rows.append({"id": id_, "pid": f"{id_}_{seen[id_]}", "input": f"{prefix} {id_}", "output": output})
    return rows


def make_tokenizer(corpus: Iterable[str]) -> PreTrainedTokenizerFast:
    """A whole-word tokenizer over `corpus` that appends </s>, so token counts in tests are exact."""
    words = sorted({word for text in corpus for word in text.split()})
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
