"""Turning SCROLLS rows into model batches: tokenization, token-budget batching, collation, eval grouping.

The training and evaluation loops call exactly these:

    train = tokenize_for_seq2seq(load_scrolls(task, "train", files), tokenizer, 16384, 1024, task=task)
    sampler = TokenBudgetBatchSampler(sequence_lengths(train), max_tokens=16384, seed=seed)
    loader = DataLoader(train, batch_sampler=sampler, collate_fn=Seq2SeqCollator(tokenizer))

    eval_rows, references = group_references(load_scrolls(task, "validation", files))
    eval_set = tokenize_for_seq2seq(eval_rows, tokenizer, 16384, 1024, task=task)
    # after generate + accelerator.gather_for_metrics(row_idx) / gather_for_metrics(texts, use_gather_object=True):
    predictions = predictions_by_id(all_row_idx, all_texts, eval_set["id"])
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from torch.utils.data import Sampler
from transformers import PreTrainedTokenizerBase

from scrolls_ssm.data import get_task, group_references

__all__ = [
    "Seq2SeqCollator",
    "TokenBudgetBatchSampler",
    "group_references",
    "predictions_by_id",
    "sequence_lengths",
    "tokenize_for_seq2seq",
]


def tokenize_for_seq2seq(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_source_length: int,
    max_target_length: int,
    task: str | None = None,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Tokenize SCROLLS rows into input_ids, attention_mask, labels, keeping `id` and adding `row_idx`.

    Inputs are truncated on the right so the query that starts qmsum/qasper/narrative_qa/quality/contract_nli
    inputs survives. `labels` is left out when the outputs are None (test split). `row_idx` (int64) is the row's
    position in `dataset`: the collator passes it as a tensor, so predictions gathered across processes can be
    mapped back to their `id` (strings cannot travel through `gather`).

    For tasks with `trim_chars_per_token` (NarrativeQA, whose books run to hundreds of thousands of words) the
    text is cut to max_source_length * that many characters first: tokenizing the whole book only to throw
    away all but the first 16K tokens costs minutes per epoch.
    """
    if tokenizer.truncation_side != "right":
        raise ValueError(
            f"tokenizer.truncation_side is {tokenizer.truncation_side!r}; SCROLLS inputs start with the query, "
            f"which left truncation would cut. Fix: set tokenizer.truncation_side = 'right'."
        )
    char_limit = None
    if task is not None:
        spec = get_task(task)
        if spec.trim_chars_per_token is not None:
            char_limit = max_source_length * spec.trim_chars_per_token
    nulls = sum(output is None for output in dataset["output"])
    if 0 < nulls < len(dataset):
        raise ValueError(
            f"{nulls} of {len(dataset)} rows have output None; a split has references for every row or for "
            f"none (test). Fix: filter the rows without output, or tokenize them as a separate set."
        )
    with_labels = nulls == 0

    def encode(batch: Mapping[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        inputs = batch["input"] if char_limit is None else [text[:char_limit] for text in batch["input"]]
        encoded = tokenizer(inputs, max_length=max_source_length, truncation=True)
        features = {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "row_idx": indices,
        }
        if with_labels:
            targets = tokenizer(text_target=batch["output"], max_length=max_target_length, truncation=True)
            features["labels"] = targets["input_ids"]
        return features

    return dataset.map(
        encode,
        batched=True,
        batch_size=64,
        with_indices=True,
        num_proc=num_proc,
        remove_columns=[name for name in dataset.column_names if name != "id"],
        desc="Tokenizing",
    )


def sequence_lengths(dataset: datasets.Dataset, column: str = "input_ids") -> list[int]:
    """Token count of every row, read from Arrow list lengths without decoding the tokens."""
    lengths: list[int] = []
    for batch in dataset.select_columns([column]).with_format("arrow").iter(batch_size=4096):
        lengths.extend(pc.list_value_length(batch[column]).to_pylist())
    return lengths


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Length-grouped batches whose padded size (longest row x rows) stays within `max_tokens`.

    Rows are sorted by length (ties in random order) and packed greedily, longest first, which keeps padding
    minimal; the batch order is then shuffled. Batches are thus rebuilt every epoch but their number is fixed,
    so `__len__` is exact for every epoch (fairseq's `batch_by_size` makes the same trade). A row longer than
    `max_tokens` gets a batch of its own rather than being dropped. `drop_last` drops the leftover batch of the
    shortest rows when one more row of its length would still have fitted.

    Order depends only on (seed, epoch). Under `accelerate`, `prepare` wraps this in a `BatchSamplerShard` that
    deals whole batches round-robin to the processes; it reads `batch_size` (absent here, meaning variable-size
    batches) and `drop_last`, and its DataLoader calls `batch_sampler.batch_sampler.sampler.set_epoch(epoch)`
    at every pass, which is why `sampler` refers to this object: epochs then advance without a manual call.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}.")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1 or (self.lengths < 0).any():
            raise ValueError("lengths must be a flat sequence of non-negative token counts, one per row.")
        self.max_tokens = max_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.sampler = self
        self._cached: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _build(self) -> list[list[int]]:
        if self._cached is not None and self._cached[0] == self.epoch:
            return self._cached[1]
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths)) if self.shuffle else np.arange(len(self.lengths))
        # A stable sort of a random permutation puts equal lengths in random order.
        order = order[np.argsort(-self.lengths[order], kind="stable")]
        batches: list[list[int]] = []
        current: list[int] = []
        longest = 0
        for index in order.tolist():
            length = int(self.lengths[index])
            if current and (len(current) + 1) * max(longest, length) > self.max_tokens:
                batches.append(current)
                current, longest = [], 0
            current.append(index)
            longest = max(longest, length)
        if current:
            fits_another = (len(current) + 1) * longest <= self.max_tokens
            if not (self.drop_last and fits_another):
                batches.append(current)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._cached = (self.epoch, batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from (list(batch) for batch in self._build())

    def __len__(self) -> int:
        return len(self._build())


class Seq2SeqCollator:
    """Right-pad rows to the longest in the batch and return tensors only.

    Returns input_ids, attention_mask, labels (padded with `label_pad_token_id`, ignored by the loss) when the
    rows have labels, and row_idx when they have it. Every other column (`id`, raw text) is dropped: strings
    cannot be moved to a device or gathered, so ids are recovered afterwards from row_idx. With
    `global_attention_first_token`, also LED's `global_attention_mask`, global on the first token (`<s>`), as the
    SCROLLS LED baselines use it.
    """

    def __init__(
        self,
        pad_token_id: int | PreTrainedTokenizerBase,
        pad_to_multiple_of: int | None = None,
        label_pad_token_id: int = -100,
        global_attention_first_token: bool = False,
    ) -> None:
        if isinstance(pad_token_id, PreTrainedTokenizerBase):
            tokenizer = pad_token_id
            if tokenizer.pad_token_id is None:
                raise ValueError(
                    f"{type(tokenizer).__name__} has no pad token. Fix: set tokenizer.pad_token before collating."
                )
            pad_token_id = tokenizer.pad_token_id
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.label_pad_token_id = label_pad_token_id
        self.global_attention_first_token = global_attention_first_token

    def _pad(self, sequences: list[Sequence[int]], value: int) -> torch.Tensor:
        width = max(len(sequence) for sequence in sequences)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        padded = torch.full((len(sequences), width), value, dtype=torch.long)  # (batch, width)
        for row, sequence in enumerate(sequences):
            padded[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
        return padded

    def __call__(self, rows: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {
            "input_ids": self._pad([row["input_ids"] for row in rows], self.pad_token_id),
            "attention_mask": self._pad([row["attention_mask"] for row in rows], 0),
        }
        if self.global_attention_first_token:
            batch["global_attention_mask"] = torch.zeros_like(batch["attention_mask"])
            batch["global_attention_mask"][:, 0] = 1
        if "labels" in rows[0]:
            batch["labels"] = self._pad([row["labels"] for row in rows], self.label_pad_token_id)
        if "row_idx" in rows[0]:
            batch["row_idx"] = torch.tensor([row["row_idx"] for row in rows], dtype=torch.long)
        return batch


def predictions_by_id(row_indices: Iterable[int], texts: Iterable[str], ids: Sequence[str]) -> dict[str, str]:
    """Map gathered predictions back to ids through `row_idx`, keeping the first prediction of each row.

    With variable-size batches, accelerate cannot tell how many gathered rows are padding: to give every process
    the same number of batches it repeats early batches at the end of an epoch, and `gather_for_metrics` returns
    those repeats too. Deduplicating on row_idx removes them.
    """
    predictions: dict[str, str] = {}
    seen: set[int] = set()
    for row, text in zip(row_indices, texts, strict=True):
        row = int(row)
        if row not in seen:
            seen.add(row)
            predictions[ids[row]] = text
    return predictions
