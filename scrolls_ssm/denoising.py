"""BART's text-infilling noise, and two measures of what a swapped encoder kept of its checkpoint.

BART was pretrained to restore documents from text infilling: spans of Poisson(3)-distributed lengths, together 30% of
the tokens, each replaced by one `<mask>` token (a span of length 0 inserts a `<mask>`). Held-out loss on that task is
what a BART-family checkpoint knows how to do, so it measures what a swap loses and what transfer gives back:

    batches = denoising_batches(documents, tokenizer, max_length=1024, max_tokens=8192, seed=0)
    denoising_loss(model, batches)                 # mean cross-entropy per target token (lower: more kept)
    encoder_similarity(model, original, batches)   # mean cosine of the encoders' outputs, token by token

Both run on any seq2seq model of the project (ScrollsSSM, BART, LED) and the same batches, so the original and its
swapped versions are scored on identical inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

T = TypeVar("T")


def text_infilling(
    ids: Sequence[int],
    mask_token_id: int,
    generator: torch.Generator,
    mask_ratio: float = 0.3,
    poisson_lambda: float = 3.0,
    keep_first: int = 1,
    keep_last: int = 1,
) -> list[int]:
    """`ids` with spans replaced by single `mask_token_id`s, BART's way: span lengths drawn from Poisson(lambda)
    until they cover `mask_ratio` of the tokens (the last one shortened to fit), placed at uniformly random points
    without overlapping. The first `keep_first` and last `keep_last` tokens (`<s>`, `</s>`) are never masked."""
    if not 0 <= mask_ratio < 1:
        raise ValueError(f"mask_ratio={mask_ratio} must be a fraction in [0, 1).")
    head, body, tail = ids[:keep_first], list(ids[keep_first : len(ids) - keep_last]), ids[len(ids) - keep_last :]
    target = round(len(body) * mask_ratio)
    if not body or target == 0:
        return list(ids)
    lengths: list[int] = []
    while sum(lengths) < target:
        draws = torch.poisson(torch.full((max(4, target // int(poisson_lambda + 1)),), poisson_lambda), generator)
        lengths += [int(draw) for draw in draws]
    covered = 0
    for count, length in enumerate(lengths):
        if covered + length >= target:
            lengths = lengths[:count] + [target - covered]
            break
        covered += length
    # Spans never overlap: the unmasked tokens are split into len(lengths) + 1 runs at uniformly drawn cut points.
    kept = len(body) - target
    cuts = sorted(torch.randint(0, kept + 1, (len(lengths),), generator=generator).tolist())
    noised, position, previous = list(head), 0, 0
    for cut, length in zip(cuts, lengths, strict=True):
        noised += body[position : position + cut - previous] + [mask_token_id]  # length 0 inserts a mask
        position += cut - previous + length
        previous = cut
    return noised + body[position:] + list(tail)


def infilling_mask_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that replaces a span in text infilling: the mask token, else T5's first sentinel."""
    if tokenizer.mask_token_id is not None:
        return tokenizer.mask_token_id
    sentinel = tokenizer.get_vocab().get("<extra_id_0>")
    if sentinel is not None:
        return sentinel
    raise ValueError(
        f"{type(tokenizer).__name__} has no mask token (nor T5's <extra_id_0> sentinel), which text infilling needs. "
        "Fix: tokenizer.add_special_tokens({'mask_token': '<mask>'}) (and resize the model's embeddings), or use a "
        "BART- or T5-family tokenizer."
    )


def denoising_batches(
    texts: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_tokens: int,
    seed: int = 0,
    mask_ratio: float = 0.3,
    poisson_lambda: float = 3.0,
) -> list[dict[str, torch.Tensor]]:
    """Documents as text-infilling batches: `input_ids` / `attention_mask` the noised document (cut to `max_length`
    tokens first), `labels` the clean one (padding -100). Sorted by length and grouped under `max_tokens` tokens per
    batch (counted on the clean documents, padding included). The noise is fixed by `seed`, so every model scored
    on these batches sees the same inputs. The tokenizer needs a mask token: BART's `<mask>`, or a T5-family
    tokenizer's first sentinel `<extra_id_0>`, which then stands for every span (BART's objective, T5's token)."""
    mask = infilling_mask_token_id(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    clean = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in texts if text.strip()]
    if not clean:
        raise ValueError("denoising needs at least one non-empty document.")
    pairs = [(text_infilling(ids, mask, generator, mask_ratio, poisson_lambda), ids) for ids in clean]
    batches = group_under_budget(pairs, lambda pair: len(pair[1]), max_tokens)
    return [_pad(batch, tokenizer.pad_token_id) for batch in batches]


def group_under_budget(items: Sequence[T], length: Callable[[T], int], max_tokens: int) -> list[list[T]]:
    """`items` sorted by `length` and cut into consecutive groups of at most `max_tokens` tokens, padding to the
    group's longest item included (an item longer than the budget makes a group of its own)."""
    groups: list[list[T]] = []
    current: list[T] = []
    for item in sorted(items, key=length):
        if current and length(item) * (len(current) + 1) > max_tokens:
            groups.append(current)
            current = []
        current.append(item)
    groups.append(current)
    return groups


def _pad(pairs: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    source = max(len(noised) for noised, _ in pairs)
    target = max(len(ids) for _, ids in pairs)
    input_ids = torch.full((len(pairs), source), pad_token_id)
    attention_mask = torch.zeros((len(pairs), source), dtype=torch.long)
    labels = torch.full((len(pairs), target), -100)
    for row, (noised, ids) in enumerate(pairs):
        input_ids[row, : len(noised)] = torch.tensor(noised)
        attention_mask[row, : len(noised)] = 1
        labels[row, : len(ids)] = torch.tensor(ids)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _on(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {key: value.to(device) for key, value in batch.items()}


@torch.no_grad()
def denoising_loss(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """Mean cross-entropy per target token of `model` restoring the documents of `batches` (from
    `denoising_batches`), in nats; every target token weighs the same, whatever its batch."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            batch = _on(model, batch)
            logits = model(**batch).logits.float()
            labels = batch["labels"]
            total += float(nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum"))
            count += int((labels != -100).sum())
    finally:
        model.train(was_training)
    return total / count


@torch.no_grad()
def encoder_similarity(model: nn.Module, reference: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """Mean cosine similarity, over every real input token of `batches`, between the last encoder hidden states of
    `model` and of `reference` (1.0: the same direction at every token). Both encoders must have the same width."""
    modes = (model.training, reference.training)
    model.eval()
    reference.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            outputs = []
            for which in (model, reference):
                on = _on(which, batch)
                encoder = which.get_encoder()
                hidden = encoder(input_ids=on["input_ids"], attention_mask=on["attention_mask"]).last_hidden_state
                outputs.append(hidden.float().cpu())
            cosine = nn.functional.cosine_similarity(*outputs, dim=-1)
            mask = batch["attention_mask"].bool()
            total += float(cosine[mask].sum())
            count += int(mask.sum())
    finally:
        model.train(modes[0])
        reference.train(modes[1])
    return total / count
