"""Validation loss, generation and scoring, on one process or many, with the model whole or sharded (FSDP).

Each process takes every `world_size`-th row (no padding rows, unlike accelerate's even batches), and the
predictions travel back with their row index, so every id is predicted exactly once whatever the number of processes.

A sharded model all-gathers its parameters inside every forward, so every process must make the same forward calls:
a process with fewer batches runs dummy batches (results dropped) until it has run as many as the busiest one, and
`generate` gets `synced_gpus=True` (a process whose sequences have ended keeps stepping until every process's have).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method
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


def _lockstep_batches(
    rows: datasets.Dataset, accelerator: Accelerator, collator: Seq2SeqCollator, max_tokens: int
) -> Iterator[tuple[dict[str, torch.Tensor], bool]]:
    """`(batch, is_real)`: this process's batches, then dummy ones (`is_real` False, to be dropped) until it has run
    as many as the busiest process."""
    loader = _shard_loader(rows, accelerator, collator, max_tokens)
    count = len(loader)
    busiest = count
    if accelerator.num_processes > 1:
        busiest = int(accelerator.gather(torch.tensor([count], device=accelerator.device)).max())
    dummy = None
    for batch in loader:
        dummy = batch if dummy is None else dummy
        yield batch, True
    if busiest > count:
        dummy = collator([rows[0]]) if dummy is None else dummy  # a process with no rows at all
        for _ in range(busiest - count):
            yield dummy, False


_GENERATION_INPUTS = ("input_ids", "attention_mask", "global_attention_mask")  # the last: LED's, when collated


def _ready_to_generate(model: torch.nn.Module) -> torch.nn.Module:
    """Let FSDP2 gather the root's parameters around `generate` as it does around `forward`: `generate` calls the
    encoder and decoder directly, and without this fails on a model that has not run one full forward yet."""
    if isinstance(model, FSDPModule) and not getattr(model, "_scrolls_ssm_generate_registered", False):
        register_fsdp_forward_method(model, "generate")
        model._scrolls_ssm_generate_registered = True
    return model


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
    for batch, is_real in _lockstep_batches(rows, accelerator, collator, max_tokens):
        batch = {key: value.to(accelerator.device) for key, value in batch.items() if key != "row_idx"}
        with accelerator.autocast():
            logits = model(**batch).logits
        if not is_real:
            continue
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
    model = _ready_to_generate(model)
    model.eval()
    rows = eval_set.generation_rows
    local: list[tuple[int, str]] = []
    batches = _lockstep_batches(rows, accelerator, collator, max_tokens)
    progress = tqdm(
        batches, desc=f"generate {eval_set.task}/{eval_set.split}", disable=not accelerator.is_local_main_process
    )
    for batch, is_real in progress:
        with accelerator.autocast():
            inputs = {key: batch[key].to(accelerator.device) for key in _GENERATION_INPUTS if key in batch}
            generated = model.generate(
                **inputs,
                max_new_tokens=eval_set.max_new_tokens,
                num_beams=num_beams,
                do_sample=False,
                synced_gpus=accelerator.num_processes > 1,
            )
        if not is_real:
            continue
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


def truncated_split_name(split: str, length: int) -> str:
    """The metrics.json key (and predictions folder) of a split scored with inputs cut to `length` tokens."""
    return f"{split}_first_{length}_tokens"
