"""Text infilling, the retention measures, and the end-to-end distillation stage of attention transfer."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoTokenizer, BartForConditionalGeneration

from scrolls_ssm import swap_encoder
from scrolls_ssm.denoising import denoising_batches, denoising_loss, encoder_similarity, text_infilling
from scrolls_ssm.transfer import attention_teacher, distill_outputs
from tests.training_fixtures import WORDS, write_tiny_bart

MASK = 1


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_tiny_bart(tmp_path_factory.mktemp("bart"), dropout=0.0)


def _documents(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 40))) for _ in range(count)]


def test_text_infilling_masks_the_requested_share_in_poisson_spans():
    """Exactly round(0.3 n) body tokens go, the rest stay in order, <s> and </s> stay, and the number of spans is
    what Poisson(3) lengths give: 300 masked tokens in ~100 spans."""
    generator = torch.Generator().manual_seed(0)
    body = list(range(10, 1010))
    spans = []
    for _ in range(20):
        noised = text_infilling([0, *body, 2], MASK, generator, mask_ratio=0.3, poisson_lambda=3.0)
        assert noised[0] == 0 and noised[-1] == 2
        kept = [token for token in noised[1:-1] if token != MASK]
        assert len(kept) == 700 and kept == sorted(kept) and set(kept) <= set(body)
        spans.append(noised.count(MASK))
    assert 90 <= sum(spans) / len(spans) <= 110, spans


def test_text_infilling_puts_a_mask_wherever_tokens_are_missing():
    """Between two kept tokens (or a kept token and an end) with clean tokens missing between them, the noised
    sequence has a mask; with 40% of 60 tokens masked, 36 tokens stay."""
    generator = torch.Generator().manual_seed(3)
    body = list(range(100, 160))
    noised = text_infilling([0, *body, 2], MASK, generator, mask_ratio=0.4, poisson_lambda=2.0)[1:-1]
    assert len([token for token in noised if token != MASK]) == 36
    previous, masks_since = -1, 0
    for token in [*noised, None]:
        if token == MASK:
            masks_since += 1
            continue
        index = len(body) if token is None else body.index(token)
        if index > previous + 1:
            assert masks_since >= 1, f"tokens {body[previous + 1 : index]} removed without a mask"
        previous, masks_since = index, 0


def test_text_infilling_edges():
    generator = torch.Generator().manual_seed(0)
    assert text_infilling([0, 5, 6, 7, 2], MASK, generator, mask_ratio=0.0) == [0, 5, 6, 7, 2]
    assert text_infilling([0, 2], MASK, generator) == [0, 2]
    with pytest.raises(ValueError, match="mask_ratio=1.0"):
        text_infilling([0, 5, 2], MASK, generator, mask_ratio=1.0)
    again = [text_infilling(list(range(50)), MASK, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert again[0] == again[1]


def test_denoising_batches_pair_noised_inputs_with_clean_labels(base):
    tokenizer = AutoTokenizer.from_pretrained(base)
    texts = _documents(12, seed=0)
    batches = denoising_batches(texts, tokenizer, max_length=24, max_tokens=64, seed=5)
    clean = sorted((tokenizer(t, truncation=True, max_length=24)["input_ids"] for t in texts), key=len)
    labels = [row[row != -100].tolist() for batch in batches for row in batch["labels"]]
    assert sorted(labels) == sorted(clean)
    for batch in batches:
        assert batch["labels"].numel() <= 64 or len(batch["labels"]) == 1
        for ids, mask, target in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True):
            noised = ids[mask.bool()].tolist()
            assert tokenizer.mask_token_id in noised and noised[0] == tokenizer.bos_token_id
            assert (ids[~mask.bool()] == tokenizer.pad_token_id).all()
            assert [t for t in noised if t != tokenizer.mask_token_id] != target[target != -100].tolist()
    same = denoising_batches(texts, tokenizer, max_length=24, max_tokens=64, seed=5)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, same, strict=True))

    tokenizer.mask_token = None
    with pytest.raises(ValueError, match="no mask token.*add_special_tokens"):
        denoising_batches(texts, tokenizer, max_length=24, max_tokens=64)


def test_denoising_loss_is_token_weighted_and_padding_free(base):
    """The loss of padded batches equals the token-weighted mean of the rows' own losses, one row at a time."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = BartForConditionalGeneration.from_pretrained(base)
    batches = denoising_batches(_documents(6, seed=1), tokenizer, max_length=30, max_tokens=1000)
    assert len(batches) == 1 and batches[0]["labels"].shape[0] == 6
    total, count = 0.0, 0
    for row in range(6):
        labels = batches[0]["labels"][row]
        length, source = int((labels != -100).sum()), int(batches[0]["attention_mask"][row].sum())
        single = {
            "input_ids": batches[0]["input_ids"][row : row + 1, :source],
            "attention_mask": batches[0]["attention_mask"][row : row + 1, :source],
            "labels": labels[None, :length],
        }
        with torch.no_grad():
            total += model(**single).loss.item() * length
        count += length
    assert denoising_loss(model, batches) == pytest.approx(total / count, rel=1e-5)


def test_encoder_similarity(base):
    tokenizer = AutoTokenizer.from_pretrained(base)
    bart = BartForConditionalGeneration.from_pretrained(base)
    batches = denoising_batches(_documents(6, seed=2), tokenizer, max_length=30, max_tokens=200)
    same = swap_encoder(base, ["attention", "attention"], max_source_positions=32)
    assert encoder_similarity(same, bart, batches) == pytest.approx(1.0, abs=1e-5)
    torch.manual_seed(0)
    swapped = swap_encoder(base, ["s4d", "attention"], max_source_positions=32)
    value = encoder_similarity(swapped, bart, batches)
    # by hand, on the first batch alone
    batch = batches[0]
    with torch.no_grad():
        ours = swapped.get_encoder()(batch["input_ids"], batch["attention_mask"]).last_hidden_state
        theirs = bart.get_encoder()(batch["input_ids"], batch["attention_mask"]).last_hidden_state
    real = batch["attention_mask"].bool()
    by_hand = torch.nn.functional.cosine_similarity(ours[real], theirs[real], dim=-1).mean().item()
    assert encoder_similarity(swapped, bart, batches[:1]) == pytest.approx(by_hand, rel=1e-5)
    assert -1.0 <= value < 1.0 - 1e-4  # a random S4D layer moves the output (the tiny BART barely: 0.9992)


def test_distillation_is_zero_for_the_original_and_lowers_the_kl_of_a_swap(base):
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    student = swap_encoder(base, ["s4d", "attention"], max_source_positions=32)
    teacher = attention_teacher(base, student)
    batches = denoising_batches(_documents(40, seed=3), tokenizer, max_length=30, max_tokens=256)

    copy = swap_encoder(base, ["attention", "attention"], max_source_positions=32)
    log = distill_outputs(copy, teacher, batches, steps=1, train="all", progress=False)
    assert log[0]["loss"] == pytest.approx(0.0, abs=1e-5)  # the teacher distilled into itself: nothing to learn

    before_state = {name: tensor.clone() for name, tensor in student.state_dict().items()}
    log = distill_outputs(student, teacher, batches, steps=60, learning_rate=3e-3, seed=0, progress=False)
    first, last = sum(r["loss"] for r in log[:5]) / 5, sum(r["loss"] for r in log[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    changed = {name for name, tensor in student.state_dict().items() if not torch.equal(tensor, before_state[name])}
    assert changed and all(name.startswith("model.encoder.layers.0.mixer.") for name in changed), changed

    with pytest.raises(ValueError, match="train='decoder'.*mixers, encoder, all"):
        distill_outputs(student, teacher, batches, steps=1, train="decoder")
    with pytest.raises(ValueError, match="batches with labels"):
        distill_outputs(student, teacher, [{"input_ids": batches[0]["input_ids"]}], steps=1)
