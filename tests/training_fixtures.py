"""A tiny, fast training setup: a random-init BART checkpoint with its tokenizer, and SCROLLS-format task data where
the answer is the first word of the document (so a few steps of training visibly help)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration

from tests.conftest import TINY, train_tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda omicron".split()
LABELS = ["Entailment", "Contradiction", "Not mentioned"]


def scrolls_rows(split: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(f"{split}-{seed}")
    rows = []
    for i in range(n):
        label = LABELS[i % 3]
        document = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 50)))
        rows.append(
            {
                "id": f"{split}-{i}",
                "pid": f"{split}-{i}_0",
                "input": f"is it so?\n\n{label.lower()} {document}",
                "output": None if split == "test" else label,
            }
        )
    return rows


def write_task_data(root: Path, task: str = "contract_nli", sizes=(("train", 36), ("validation", 9), ("test", 5))):
    for split, n in sizes:
        path = root / task / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in scrolls_rows(split, n, seed=0)))
    return root


def write_tiny_bart(root: Path, dropout: float = 0.1) -> Path:
    texts = [row["input"] + " " + row["output"] for row in scrolls_rows("train", 60, seed=1)]
    tokenizer = train_tokenizer(texts + LABELS * 5, vocab_size=150)
    torch.manual_seed(0)
    config = BartConfig(**{**TINY, "vocab_size": len(tokenizer), "dropout": dropout, "max_position_embeddings": 32})
    BartForConditionalGeneration(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def write_tiny_t5(root: Path, family: str = "t5") -> Path:
    """A random-init T5 v1.1 / Flan-T5-style (gated-GELU, `family="t5"`) or LongT5 transient-global
    (`family="longt5"`) checkpoint, 2 encoder layers, with a T5-style SentencePiece tokenizer trained here."""
    from transformers import LongT5Config, LongT5ForConditionalGeneration, T5Config, T5ForConditionalGeneration

    from scrolls_ssm.synthetic import train_sentencepiece_tokenizer

    texts = [row["input"] + " " + row["output"] for row in scrolls_rows("train", 60, seed=1)]
    tokenizer = train_sentencepiece_tokenizer(
        texts + LABELS * 5,
        root / "_spm",
        vocab_size=150,
        style="t5",
        extra_ids=10,  # T5's sentinels, fewer
    )
    size = dict(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    if family == "longt5":
        config = LongT5Config(**size, local_radius=15, global_block_size=8, encoder_attention_type="transient-global")
        model = LongT5ForConditionalGeneration(config)
    else:
        model = T5ForConditionalGeneration(T5Config(**size, tie_word_embeddings=False))
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def overrides(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.base={base}",
        "model.encoder_layer_types=[attention,attention]",
        "model.max_source_positions=96",
        f"data.data_dir={data}",
        "data.tasks=[contract_nli]",
        "data.max_tokens_per_batch=300",
        "data.pad_to_multiple_of=8",
        f"train.output_dir={out}",
        "train.num_epochs=2",
        "train.learning_rate=2e-3",
        "train.log_every_steps=1",
        "train.mixed_precision=no",
        *extra,
    ]


def _run_process_group(command: list[str], env: dict, timeout: int, hung: str) -> tuple[int, str]:
    """Run COMMAND in a session of its own; `(returncode, stdout + stderr)`. Past `timeout` seconds the launcher and
    every worker are killed (a hung worker would otherwise outlive the test run) and the test fails with `hung`."""
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{hung} (killed after {timeout} s): {output[-3000:]}")
    return process.returncode, output


def torchrun_two_processes(script: str, args: list[str], timeout: int, what: str) -> str:
    """`torchrun --standalone --nproc_per_node 2 tests/SCRIPT ARGS` on CPU (gloo, one thread each); returns its output.
    Fails the test with the output's tail when it exits non-zero, or when it hangs past `timeout` seconds."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(repo / "tests" / script), *args]
    hung = f"the two {what} processes hung (mismatched collectives)"
    returncode, output = _run_process_group(command, env, timeout, hung)
    assert returncode == 0, output[-4000:]
    return output


def launch_two_processes(
    argv: list[str], script: str = "run_finetune.py", timeout: int = 300
) -> subprocess.CompletedProcess:
    """`accelerate launch` of SCRIPT (a path in the repository) ARGV with 2 CPU processes on this machine; returns the
    finished run (stdout holds both streams). A run that hangs past `timeout` seconds fails the test."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(repo / script), *argv,
    ]  # fmt: skip
    returncode, output = _run_process_group(command, env, timeout, f"the two-process run of {script} hung")
    return subprocess.CompletedProcess(command, returncode, output, "")


def run_train_command(argv: list[str], kill_at: str | None = None) -> None:
    """A child process of the kill -9 tests: `scrolls-ssm train ARGV`, with the SIGKILL test hook set to `kill_at`."""
    run_command(["train", *argv], kill_at)


def run_command(argv: list[str], kill_at: str | None = None) -> None:
    """A child process of the kill -9 tests: `scrolls-ssm ARGV`, with the SIGKILL test hook set to `kill_at`."""
    import os
    import sys

    from scrolls_ssm.checkpointing import TEST_KILL_ENV
    from scrolls_ssm.cli import main

    if kill_at is not None:
        os.environ[TEST_KILL_ENV] = kill_at
    sys.exit(main(argv))
