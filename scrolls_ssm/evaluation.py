"""Validation loss, generation and scoring, on one process or many.

Each process takes every `world_size`-th row (no padding rows, unlike accelerate's even batches), and the
predictions travel back with their row index, so every id is predicted exactly once whatever the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .metrics import compute_scrolls_metrics
from .preprocess import Seq2SeqCollator, TokenBudgetBatchSampler, sequence_lengths


@dataclass
class EvalSet:
    """One task's evaluation data: every row (for the loss), one row per id (for generation) and the references."""

    task: str
    split: str
    loss_rows: datasets.Dataset | None  # tokenized, every pid; None for test splits (no outputs)
    generation_rows: datasets.Dataset  # tokenized, one row per id, `row_idx` = position in this dataset
    references: dict[str, list[str]]
    max_new_tokens: int


def _shard_loader(rows: datasets.Dataset, accelerator: Accelerator, collator, max_tokens: int) -> DataLoader:
    shard = rows.select(range(accelerator.process_index, len(rows), accelerator.num_processes))
    sampler = TokenBudgetBatchSampler(sequence_lengths(shard), max_tokens=max_tokens, shuffle=False)
    # Its own generator: evaluating must not advance the global RNG that training's dropout draws from.
    return DataLoader(shard, batch_sampler=sampler, collate_fn=collator, generator=torch.Generator())


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    rows: datasets.Dataset,
    accelerator: Accelerator,
    collator: Seq2SeqCollator,
    max_tokens: int,
) -> float:
    """Mean token-level cross-entropy over all target tokens of `rows`, summed across processes."""
    model.eval()
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)  # (sum of losses, number of tokens)
    for batch in _shard_loader(rows, accelerator, collator, max_tokens):
        batch = {key: value.to(accelerator.device) for key, value in batch.items() if key != "row_idx"}
        with accelerator.autocast():
            logits = model(**batch).logits
        labels = batch["labels"]
        loss = torch.nn.functional.cross_entropy(
            logits.float().view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100, reduction="sum"
        )
        total += torch.stack([loss.double(), (labels != -100).sum().double()])
    total = accelerator.reduce(total, reduction="sum")
    return (total[0] / total[1].clamp(min=1)).item()


@torch.no_grad()
def generate_predictions(
    model: torch.nn.Module,
    eval_set: EvalSet,
    tokenizer: PreTrainedTokenizerBase,
    accelerator: Accelerator,
    collator: Seq2SeqCollator,
    max_tokens: int,
    num_beams: int = 1,
) -> dict[str, str]:
    """`{id: prediction}` for every id of the split, generated greedily (or with beams) on all processes."""
    model.eval()
    rows = eval_set.generation_rows
    local: list[tuple[int, str]] = []
    loader = _shard_loader(rows, accelerator, collator, max_tokens)
    progress = tqdm(
        loader, desc=f"generate {eval_set.task}/{eval_set.split}", disable=not accelerator.is_local_main_process
    )
    for batch in progress:
        with accelerator.autocast():
            generated = model.generate(
                input_ids=batch["input_ids"].to(accelerator.device),
                attention_mask=batch["attention_mask"].to(accelerator.device),
                max_new_tokens=eval_set.max_new_tokens,
                num_beams=num_beams,
                do_sample=False,
            )
        texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
        local.extend(zip(batch["row_idx"].tolist(), (text.strip() for text in texts), strict=True))
    by_row = dict(gather_object(local)) if accelerator.num_processes > 1 else dict(local)
    ids = rows["id"]
    if sorted(by_row) != list(range(len(ids))):
        missing = sorted(set(range(len(ids))) - set(by_row))
        raise RuntimeError(f"{eval_set.task}/{eval_set.split}: predictions missing for rows {missing[:10]}.")
    return {ids[row]: by_row[row] for row in range(len(ids))}


def score(eval_set: EvalSet, predictions: dict[str, str]) -> dict:
    """The official SCROLLS metric of `predictions` against the split's references."""
    return compute_scrolls_metrics(eval_set.task, predictions, eval_set.references)
