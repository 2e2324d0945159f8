"""What the distributed transfer test and its worker processes share: the same student, teacher and batches."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import AutoTokenizer

from scrolls_ssm import swap_encoder
from scrolls_ssm.transfer import attention_teacher, text_batches
from tests.training_fixtures import WORDS

STEPS = 6


def documents(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 45))) for _ in range(count)]


def transfer_setup(base: Path, seed: int = 0):
    """(student, teacher, batches) of a one-layer s4d swap of `base`; `seed` sets the new mixer's initialization."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(seed)
    student = swap_encoder(base, ["s4d", "attention"], max_source_positions=64, encoder_positions="none")
    teacher = attention_teacher(base, student)
    return student, teacher, text_batches(documents(48, seed=0), tokenizer, max_length=64, max_tokens=256)
