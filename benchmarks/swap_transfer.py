"""Swap without forgetting, measured: what a pretrained BART keeps when its encoder is swapped, with and without
weight reuse, attention transfer and output distillation, and how fast each start fine-tunes.

    python benchmarks/swap_transfer.py                  # the default run on a CPU (the stand-in is cached)
    python benchmarks/swap_transfer.py --quick          # smoke test: tiny sizes, minutes
    python benchmarks/swap_transfer.py --base facebook/bart-base --documents train.jsonl --heldout validation.jsonl \\
        --length 4096 --finetune-task qasper --finetune-data DIR           # a real checkpoint, on a GPU

Without `--base`, the benchmark makes its own pretrained stand-in first: a small BART trained with BART's
text-infilling objective on synthetic documents (`scrolls_ssm.synthetic`), cached in `<work>/stand-in` for later runs
with the same setup. Then, for every kind (`s4d`, `mamba2`, `gss-hybrid`: GSS layers under one attention layer),
it builds:

* `random`: `swap_encoder` alone, new mixers at their own initialization;
* `reuse`: mamba2 (and mamba, with `--kinds mamba`) only, mixers initialized from the attention weights
  (`reuse_attention_weights`);
* `transfer`: layer-wise attention transfer on the stand-in's documents (after reuse where a map exists);
* `transfer+distill`: then the end-to-end stage, the original's output distributions distilled into the mixers.

Each is scored on held-out documents, with the same noise for all: the text-infilling loss (what the checkpoint was
pretrained to do; the original's own loss is the floor) and the encoder-output cosine similarity to the original. The
fraction of the gap closed is (loss_random - loss_variant) / (loss_random - loss_original). Then the original and
every variant are fine-tuned with `run_finetune.py` on a synthetic SCROLLS task, evaluated every epoch (validation loss
and the SCROLLS score): the steps a start needs to reach the original's final validation loss are compared with the
steps from random mixers.

Outputs in `--out` (default benchmarks/results/swap_transfer): swap_transfer[_quick].csv (retention),
swap_transfer_curves[_quick].csv (fine-tuning), .md, .png; see docs/transfer.md for the findings.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results" / "swap_transfer"
KINDS = ("s4d", "mamba2", "gss-hybrid", "mamba")
DEFAULT_KINDS = KINDS[:3]
REUSABLE = ("mamba", "mamba2")  # the kinds with a weight map from the attention
VARIANTS = ("random", "reuse", "transfer", "transfer+distill")


@dataclass(frozen=True)
class Setup:
    """Everything a run depends on. The stand-in is cached per (model, corpus, pretraining) fields."""

    # The stand-in BART.
    d_model: int = 128
    encoder_layers: int = 4
    decoder_layers: int = 1  # too shallow to find a restated sentence in its own output: the encoder must help
    heads: int = 4
    ffn_dim: int = 256
    vocab_size: int = 1000
    length: int = 512  # tokens per document: pretraining, transfer and held-out inputs
    corpus_documents: int = 4000
    sentences_per_document: int = 10  # each stated `restatements` times: ~400 tokens a document
    restatements: int = 3
    pretrain_steps: int = 4000
    pretrain_tokens: int = 2048
    pretrain_lr: float = 2e-3
    # BART's 0.02 leaves a from-scratch model's cross-attention uniform, and the decoder learns to ignore the encoder
    # (measured: the same loss with every input token masked); 0.1 makes it read the encoder (docs/demo.md).
    init_std: float = 0.1
    # Conversion.
    heldout_documents: int = 48
    transfer_documents: int = 600
    transfer_steps: int = 300
    transfer_lr: float = 2e-3
    transfer_tokens: int = 4096
    distill_steps: int = 150
    distill_lr: float = 5e-4
    # Fine-tuning on a synthetic SCROLLS task.
    finetune_task: str = "gov_report"
    finetune_train: int = 400
    finetune_validation: int = 40
    finetune_doc_words: int = 380
    finetune_epochs: int = 5
    finetune_lr: float = 3e-4
    finetune_tokens: int = 4096
    seed: int = 0

    def stand_in_key(self) -> dict:
        fields = asdict(self)
        stand_in = [
            "d_model", "encoder_layers", "decoder_layers", "heads", "ffn_dim", "vocab_size", "length",
            "corpus_documents", "sentences_per_document", "restatements", "pretrain_steps", "pretrain_tokens",
            "pretrain_lr", "init_std", "seed",
        ]  # fmt: skip
        return {name: fields[name] for name in stand_in}


QUICK = Setup(
    d_model=32,
    encoder_layers=2,
    decoder_layers=1,
    heads=2,
    ffn_dim=64,
    vocab_size=300,
    length=128,
    corpus_documents=40,
    sentences_per_document=4,
    restatements=2,
    pretrain_steps=30,
    pretrain_tokens=1024,
    heldout_documents=8,
    transfer_documents=40,
    transfer_steps=10,
    distill_steps=5,
    finetune_train=24,
    finetune_validation=6,
    finetune_doc_words=80,
    finetune_epochs=2,
    finetune_tokens=1024,
)


def setup_changes(pairs: list[str], parser: argparse.ArgumentParser) -> dict:
    """`--setup FIELD=VALUE ...` as typed Setup fields; an unknown field or a value of the wrong type is refused."""
    fields = {name: type(value) for name, value in asdict(Setup()).items()}
    changes = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in fields:
            parser.error(f"--setup {pair!r}: expected FIELD=VALUE with FIELD one of {', '.join(fields)}")
        try:
            changes[name] = fields[name](value)
        except ValueError:
            parser.error(f"--setup {pair!r}: {name} takes {fields[name].__name__} values, got {value!r}")
    return changes


def layout(kind: str, layers: int) -> list[str]:
    return ["gss"] * (layers - 1) + ["attention"] if kind == "gss-hybrid" else [kind] * layers


# --- the pretrained stand-in ----------------------------------------------------------------------------------------


def corpus(setup: Setup, split: str) -> list[str]:
    """The stand-in's documents: `sentences_per_document` synthetic sentences, each stated `restatements` times, in a
    shuffled order. A masked span is recoverable only from another statement of its sentence, which the model must
    find elsewhere in the document: knowledge that lives in the encoder's attention (docs/transfer.md explains why
    plain filler text was not enough). `split` "train" or "heldout"; deterministic per setup."""
    from scrolls_ssm.synthetic import filler_sentence

    rng = random.Random(f"{split}-{setup.seed}")
    count = setup.corpus_documents if split == "train" else setup.heldout_documents
    texts = []
    for _ in range(count):
        sentences = [filler_sentence(rng) for _ in range(setup.sentences_per_document)] * setup.restatements
        rng.shuffle(sentences)
        texts.append(" ".join(sentences))
    return texts


def stand_in(setup: Setup, out: Path) -> Path:
    """A small BART pretrained with text infilling on the synthetic corpus, saved with its tokenizer (with <mask>)."""
    from transformers import AutoTokenizer

    from scrolls_ssm.denoising import denoising_batches, denoising_loss
    from scrolls_ssm.synthetic import train_sentencepiece_tokenizer

    folder = out / "stand-in"
    settings = json.dumps(setup.stand_in_key(), sort_keys=True)
    if (folder / "setup.json").is_file() and (folder / "setup.json").read_text() == settings:
        return folder
    texts = corpus(setup, "train")
    staging = out / ".stand-in.training"
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = train_sentencepiece_tokenizer(texts, staging / "_sentencepiece", vocab_size=setup.vocab_size)
    tokenizer.add_special_tokens({"mask_token": "<mask>"})
    tokenizer.model_max_length = setup.length
    heldout = denoising_batches(corpus(setup, "heldout"), tokenizer, setup.length, 8192, seed=99)
    started = time.monotonic()
    sizes = {name: getattr(setup, name) for name in SIZES}
    model = pretrain_with_infilling(
        tokenizer, texts, sizes, setup.init_std, setup.length, setup.pretrain_steps, setup.pretrain_tokens,
        setup.pretrain_lr, setup.seed,
    )  # fmt: skip
    report = {
        "steps": setup.pretrain_steps,
        "seconds": round(time.monotonic() - started),
        "heldout_denoising_loss": denoising_loss(model, heldout),
    }
    print(f"stand-in pretrained: {report}", flush=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "pretraining.json").write_text(json.dumps(report, indent=1) + "\n")
    (staging / "setup.json").write_text(settings)
    shutil.rmtree(staging / "_sentencepiece")
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    AutoTokenizer.from_pretrained(folder)  # loads back as a user would
    return folder


# The fields of a Setup (of this script or of long_range_probe.py) that size a BART.
SIZES = ("d_model", "encoder_layers", "decoder_layers", "heads", "ffn_dim")


def pretrain_with_infilling(
    tokenizer,
    texts: list[str],
    sizes: dict,
    init_std: float,
    length: int,
    steps: int,
    tokens: int,
    lr: float,
    seed: int,
):
    """A BART of `sizes` (`d_model`, `encoder_layers`, `decoder_layers`, `heads`, `ffn_dim`) trained from scratch
    with BART's text infilling on `texts` cut to `length` tokens: `steps` steps of `tokens` tokens, AdamW, linear
    warm-up over the first 5% and decay, fresh noise every epoch."""
    from transformers import BartConfig, BartForConditionalGeneration, get_linear_schedule_with_warmup

    from scrolls_ssm.denoising import denoising_batches

    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=len(tokenizer),
        d_model=sizes["d_model"],
        encoder_layers=sizes["encoder_layers"],
        decoder_layers=sizes["decoder_layers"],
        encoder_attention_heads=sizes["heads"],
        decoder_attention_heads=sizes["heads"],
        encoder_ffn_dim=sizes["ffn_dim"],
        decoder_ffn_dim=sizes["ffn_dim"],
        max_position_embeddings=length,
        dropout=0.0,
        init_std=init_std,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
    )
    model = BartForConditionalGeneration(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, steps // 20, steps)
    model.train()
    step, epoch = 0, 0
    while step < steps:
        # Fresh noise every epoch, as BART's pretraining draws it per example.
        batches = denoising_batches(texts, tokenizer, length, tokens, seed=seed + epoch)
        for index in torch.randperm(len(batches), generator=torch.Generator().manual_seed(epoch)).tolist():
            loss = model(**batches[index]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 100 == 0 or step == steps:
                print(f"pretrain step {step}/{steps}: loss {loss.item():.3f}", flush=True)
            if step == steps:
                break
        epoch += 1
    return model


# --- the variants ---------------------------------------------------------------------------------------------------


def convert(kind: str, variant: str, base: str, setup: Setup, texts: list[str], folder: Path) -> dict:
    """Build one variant of `kind` from `base`, save it to `folder`; returns what it took."""
    from scrolls_ssm.convert import swap_encoder
    from scrolls_ssm.denoising import denoising_batches
    from scrolls_ssm.transfer import (
        attention_teacher,
        distill_outputs,
        reuse_attention_weights,
        text_batches,
        transfer_attention,
    )

    torch.manual_seed(setup.seed)  # every variant of a kind starts from the same random mixers
    model, tokenizer = swap_encoder(
        base, layout(kind, setup.encoder_layers), max_source_positions=setup.length, return_tokenizer=True
    )
    teacher = attention_teacher(base, model)
    started, record = time.monotonic(), {}
    if variant != "random" and kind in REUSABLE:
        record["reused_layers"] = reuse_attention_weights(model, teacher)
    if variant.startswith("transfer"):
        batches = text_batches(texts, tokenizer, setup.length, setup.transfer_tokens)
        log = transfer_attention(model, teacher, batches, setup.transfer_steps, setup.transfer_lr, seed=setup.seed)
        record["transfer_loss"] = log[-1]["loss"]
    if variant == "transfer+distill":
        batches = denoising_batches(texts, tokenizer, setup.length, setup.transfer_tokens, seed=setup.seed)
        log = distill_outputs(model, teacher, batches, setup.distill_steps, setup.distill_lr, seed=setup.seed)
        record["distill_loss"] = log[-1]["loss"]
    record["convert_seconds"] = round(time.monotonic() - started, 1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return record


def with_inputs_masked(batches: list[dict], mask_token_id: int) -> list[dict]:
    """The batches with every real input token replaced by <mask>: what the decoder does without the encoder."""
    return [
        {**batch, "input_ids": batch["input_ids"].masked_fill(batch["attention_mask"].bool(), mask_token_id)}
        for batch in batches
    ]


def retention(folder: Path, original, heldout) -> dict:
    from transformers import AutoModelForSeq2SeqLM

    from scrolls_ssm.denoising import denoising_loss, encoder_similarity

    model = AutoModelForSeq2SeqLM.from_pretrained(folder)
    return {
        "heldout_loss": round(denoising_loss(model, heldout), 4),
        "encoder_cosine": round(encoder_similarity(model, original, heldout), 4),
    }


# --- fine-tuning ----------------------------------------------------------------------------------------------------


def finetune_data(setup: Setup, out: Path) -> Path:
    from scrolls_ssm.synthetic import write_synthetic_scrolls

    folder = out / "finetune-data"
    marker = folder / "setup.json"
    settings = json.dumps([setup.finetune_task, setup.finetune_train, setup.finetune_validation,
                           setup.finetune_doc_words, setup.seed])  # fmt: skip
    if not (marker.is_file() and marker.read_text() == settings):
        write_synthetic_scrolls(
            folder,
            num_train=setup.finetune_train,
            num_validation=setup.finetune_validation,
            num_test=1,
            doc_words=setup.finetune_doc_words,
            num_distractors=0,
            tasks=[setup.finetune_task],
            seed=setup.seed,
        )
        marker.write_text(settings)
    return folder


def finetune(model_dir: Path, setup: Setup, data_dir: Path | None, task: str, run_dir: Path, log: Path) -> list[dict]:
    """Fine-tune `model_dir` with run_finetune.py, scoring every epoch; the curve as (step, loss, score) records."""
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [
        sys.executable,
        str(REPO / "run_finetune.py"),
        f"model.init_from={model_dir}",
        f"data.tasks=[{task}]",
        f"data.data_dir={data_dir if data_dir is not None else 'null'}",
        f"data.max_source_length={setup.length}",
        "data.max_target_length=64",
        f"data.max_tokens_per_batch={setup.finetune_tokens}",
        "data.predict_splits=[]",
        f"train.output_dir={run_dir}",
        f"train.num_epochs={setup.finetune_epochs}",
        f"train.learning_rate={setup.finetune_lr}",
        "train.warmup_ratio=0.05",
        f"train.seed={setup.seed}",
        "eval.generate_every_epochs=1",
        "eval.max_new_tokens=48",
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    with log.open("a") as handle:
        process = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if process.returncode != 0:
        tail = log.read_text().replace("\r", "\n").strip().splitlines()[-1:]
        raise RuntimeError(f"fine-tuning {model_dir} failed (see {log}): {tail}")
    curve = []
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "eval/score" in record:
            curve.append(
                {"step": record["step"], "eval_loss": round(record["eval/loss"], 4), "score": record["eval/score"]}
            )
    return curve


def steps_to_reach(curve: list[dict], target: float) -> int | None:
    """The first evaluated step whose validation loss is at or below `target`."""
    return next((point["step"] for point in curve if point["eval_loss"] <= target), None)


# --- the run --------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the whole pipeline")
    parser.add_argument("--kinds", nargs="+", default=list(DEFAULT_KINDS), choices=KINDS)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/...)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default <out>/work)")
    parser.add_argument("--base", help="a real BART checkpoint (path or Hub id) instead of the stand-in")
    parser.add_argument("--documents", nargs="+", help="transfer documents for --base (.jsonl inputs or text)")
    parser.add_argument("--heldout", nargs="+", help="held-out documents for --base")
    parser.add_argument("--length", type=int, help="tokens per document (default: the setup's)")
    parser.add_argument("--finetune-task", help="the SCROLLS task to fine-tune on (default: synthetic gov_report)")
    parser.add_argument("--finetune-data", help="its data folder (default: synthetic; 'hub' for the official files)")
    parser.add_argument("--no-finetune", action="store_true", help="retention only")
    parser.add_argument("--resume", action="store_true", help="keep the finished (kind, variant) rows of --out")
    parser.add_argument(
        "--setup",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="change setup fields, e.g. decoder_layers=2 pretrain_steps=8000 (the stand-in is cached per setup)",
    )
    args = parser.parse_args(argv)
    if args.base and not (args.documents and args.heldout):
        parser.error("--base needs --documents and --heldout (the stand-in's corpus fits only the stand-in).")

    setup = QUICK if args.quick else Setup()
    if args.length:
        setup = replace(setup, length=args.length)
    if args.finetune_task:
        setup = replace(setup, finetune_task=args.finetune_task)
    setup = replace(setup, **setup_changes(args.setup, parser))
    suffix = "_quick" if args.quick else ""
    out = args.out or RESULTS_DIR
    work = args.work or out / "work"
    work.mkdir(parents=True, exist_ok=True)

    from transformers import AutoTokenizer

    from scrolls_ssm.convert import swap_encoder
    from scrolls_ssm.denoising import denoising_batches, denoising_loss
    from scrolls_ssm.transfer import read_documents

    if args.base:
        base, transfer_texts, heldout_texts = args.base, read_documents(args.documents), read_documents(args.heldout)
    else:
        base = str(stand_in(setup, work))
        transfer_texts = corpus(setup, "train")[: setup.transfer_documents]
        heldout_texts = corpus(setup, "heldout")
    tokenizer = AutoTokenizer.from_pretrained(base)
    heldout = denoising_batches(heldout_texts, tokenizer, setup.length, 8192, seed=99)
    original_dir = work / "models" / "original"
    original = swap_encoder(base, ["attention"] * setup.encoder_layers, max_source_positions=setup.length)
    original.save_pretrained(original_dir)
    tokenizer.save_pretrained(original_dir)
    original.eval()
    original_loss = denoising_loss(original, heldout)

    if args.finetune_data == "hub":
        data_dir = None
    elif args.finetune_data:
        data_dir = Path(args.finetune_data)
    else:
        data_dir = finetune_data(setup, work)
    finetune_log = work / "finetune.log"
    rows, curves = read_outputs(out, suffix) if args.resume else ([], [])
    finished = {(row["kind"], row["variant"]) for row in rows}
    if not args.no_finetune:
        finished &= {(point["kind"], point["variant"]) for point in curves}
    rows = [row for row in rows if (row["kind"], row["variant"]) in finished and row["kind"] != "original"]
    curves = [point for point in curves if (point["kind"], point["variant"]) in finished]
    # The reference that shows whether the encoder matters at all: the original with every input token masked.
    blind_loss = denoising_loss(original, with_inputs_masked(heldout, tokenizer.mask_token_id))
    rows[:0] = [
        {"kind": "original", "variant": "original", "heldout_loss": round(original_loss, 4), "encoder_cosine": 1.0},
        {"kind": "original", "variant": "inputs masked", "heldout_loss": round(blind_loss, 4)},
    ]
    if not args.no_finetune and ("original", "original") not in finished:
        curve = finetune(original_dir, setup, data_dir, setup.finetune_task, work / "runs" / "original", finetune_log)
        curves += [{"kind": "original", "variant": "original", **point} for point in curve]
    for kind in args.kinds:
        for variant in VARIANTS:
            if (variant == "reuse" and kind not in REUSABLE) or (kind, variant) in finished:
                continue
            folder = work / "models" / f"{kind}-{variant}"
            print(f"== {kind} / {variant}", flush=True)
            row = {"kind": kind, "variant": variant, **convert(kind, variant, base, setup, transfer_texts, folder)}
            row.update(retention(folder, original, heldout))
            rows.append(row)
            if not args.no_finetune:
                curve = finetune(
                    folder, setup, data_dir, setup.finetune_task, work / "runs" / folder.name, finetune_log
                )
                curves += [{"kind": kind, "variant": variant, **point} for point in curve]
            write_outputs(rows, curves, setup, out, suffix, vars(args))
    write_outputs(rows, curves, setup, out, suffix, vars(args))
    return 0


# --- outputs --------------------------------------------------------------------------------------------------------

ROW_FIELDS = ["kind", "variant", "heldout_loss", "encoder_cosine", "gap_closed", "reused_layers", "transfer_loss",
              "distill_loss", "convert_seconds"]  # fmt: skip
CURVE_FIELDS = ["kind", "variant", "step", "eval_loss", "score"]


def read_outputs(out: Path, suffix: str) -> tuple[list[dict], list[dict]]:
    """The rows and curve points of an earlier run in `out` (numbers as numbers), or nothing."""
    tables = []
    for name in ("", "_curves"):
        path = out / f"swap_transfer{name}{suffix}.csv"
        rows = list(csv.DictReader(path.open())) if path.is_file() else []
        tables.append([{key: _number(value) for key, value in row.items() if value != ""} for row in rows])
    return tables[0], tables[1]


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def with_gap(rows: list[dict]) -> list[dict]:
    """Adds `gap_closed`: (random - variant) / (random - original) held-out loss, per kind."""
    original = next(row["heldout_loss"] for row in rows if row["kind"] == "original")
    random = {row["kind"]: row["heldout_loss"] for row in rows if row["variant"] == "random"}
    for row in rows:
        gap = random.get(row["kind"], math.nan) - original
        if row["kind"] != "original" and gap > 0:
            row["gap_closed"] = round((random[row["kind"]] - row["heldout_loss"]) / gap, 3)
    return rows


def write_outputs(rows: list[dict], curves: list[dict], setup: Setup, out: Path, suffix: str, args: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = with_gap(rows)
    for name, fields, table in (("", ROW_FIELDS, rows), ("_curves", CURVE_FIELDS, curves)):
        with (out / f"swap_transfer{name}{suffix}.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(table)
    (out / f"swap_transfer{suffix}.md").write_text(markdown(rows, curves, setup, args))
    if curves:
        plot(curves, out / f"swap_transfer{suffix}.png")


def finetune_summary(curves: list[dict]) -> tuple[float | None, dict[tuple[str, str], dict]]:
    """The original's final validation loss, and per (kind, variant): final loss and score, and the steps to reach
    the original's final loss. The loss, not the score: on the CPU budget the small models' generated summaries stay
    near the naive baseline's score while their validation loss falls steadily (docs/transfer.md)."""
    runs: dict[tuple[str, str], list[dict]] = {}
    for point in curves:
        runs.setdefault((point["kind"], point["variant"]), []).append(point)
    target = runs[("original", "original")][-1]["eval_loss"] if ("original", "original") in runs else None
    summary = {
        key: {
            "loss": curve[-1]["eval_loss"],
            "score": curve[-1]["score"],
            "steps": curve[-1]["step"],
            "reach": steps_to_reach(curve, target) if target is not None else None,
        }
        for key, curve in runs.items()
    }
    return target, summary


def validity_notes(rows: list[dict]) -> list[str]:
    """How much the stand-in's attention is worth, read off the retention rows: the share of the encoder's
    contribution (inputs masked -> original) that a swap with random mixers loses. Where it is small, the pretrained
    attention carried little, 'gap closed' divides by a small gap, and the comparison tests little."""
    losses = {(row["kind"], row["variant"]): row["heldout_loss"] for row in rows}
    original, masked = losses.get(("original", "original")), losses.get(("original", "inputs masked"))
    if original is None or masked is None or masked <= original:
        return []
    gap = masked - original
    shares = {kind: (loss - original) / gap for (kind, variant), loss in losses.items() if variant == "random"}
    if not shares:
        return []
    listed = ", ".join(f"{kind} {100 * share:.0f}%" for kind, share in shares.items())
    lines = [
        "",
        f"What the attention is worth: the encoder lowers the loss by {gap:.3f} (inputs masked -> "
        f"original); swapping in random mixers gives back this share of it: {listed}.",
    ]
    if max(shares.values()) < WEAK_ATTENTION_SHARE:
        lines.append(
            f"**Below {100 * WEAK_ATTENTION_SHARE:.0f}% for every kind: this stand-in's attention carries little "
            "(most of what its encoder gives passes through the embeddings and FFNs), so 'gap closed' divides by a "
            "small gap and these rows cannot show whether transfer keeps what attention knew.** A stand-in whose "
            "attention matters is the fix (docs/transfer.md)."
        )
    return lines


# Below this share of the encoder's contribution lost by a random swap, the stand-in's attention is too weak to test.
WEAK_ATTENTION_SHARE = 0.3


def markdown(rows: list[dict], curves: list[dict], setup: Setup, args: dict) -> str:
    command = "python benchmarks/swap_transfer.py " + " ".join(
        f"--{key.replace('_', '-')} {' '.join(map(str, value)) if isinstance(value, list) else value}"
        if value is not True
        else f"--{key.replace('_', '-')}"
        for key, value in args.items()
        if value not in (None, False) and key not in ("out", "work")
    )
    lines = [
        "# Swap without forgetting: retention and fine-tuning from each start",
        "",
        f"`{command.strip()}` on {platform.node()} ({platform.processor() or platform.machine()}), "
        f"{datetime.date.today().isoformat()}.",
        "",
        "Setup: " + ", ".join(f"{key}={value}" for key, value in asdict(setup).items()) + ".",
        "",
        "## Retention (held-out text infilling; lower loss is better, cosine 1.0 = the original's encoder output)",
        "",
        "'inputs masked' is the original with every input token replaced by <mask>: the loss its decoder reaches "
        "without the encoder. A swap that loses all the encoder knew lands there, not at the original's loss.",
        "",
        "| kind | variant | held-out loss | gap closed | encoder cosine | conversion s |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        gap = f"{100 * row['gap_closed']:.0f}%" if "gap_closed" in row else "-"
        cosine = f"{row['encoder_cosine']:.3f}" if "encoder_cosine" in row else "-"
        lines.append(
            f"| {row['kind']} | {row['variant']} | {row['heldout_loss']:.3f} | {gap} | {cosine} "
            f"| {row.get('convert_seconds', '-')} |"
        )
    lines += validity_notes(rows)
    if curves:
        target, summary = finetune_summary(curves)
        lines += [
            "",
            f"## Fine-tuning on {setup.finetune_task} (validation loss and SCROLLS score, every epoch)",
            "",
            f"The original ends at validation loss {target:.4f}. 'Steps to reach' is the first evaluation at or "
            "below it; 'of random's' compares that with the same kind's random start.",
            "",
            "| kind | variant | final loss | final score | steps to reach the original's loss | of random's |",
            "|---|---|---|---|---|---|",
        ]
        for (kind, variant), entry in summary.items():
            random = summary.get((kind, "random"), {}).get("reach")
            reach = entry["reach"]
            if reach is not None and random is not None:
                ratio = f"{100 * reach / random:.0f}%"
            elif reach is not None and (kind, "random") in summary:
                ratio = f"< {100 * reach / summary[(kind, 'random')]['steps']:.0f}%"  # random never got there
            else:
                ratio = "-"
            shown = f"{reach}" if reach is not None else f"not in {entry['steps']}"
            lines.append(f"| {kind} | {variant} | {entry['loss']:.4f} | {entry['score']:.2f} | {shown} | {ratio} |")
    return "\n".join(lines) + "\n"


def plot(curves: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [kind for kind in dict.fromkeys(point["kind"] for point in curves) if kind != "original"] or ["original"]
    figure, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 3.6), squeeze=False)
    for axis, kind in zip(axes[0], kinds, strict=True):
        for variant in ("original", *VARIANTS):
            owner = "original" if variant == "original" else kind
            points = [p for p in curves if p["kind"] == owner and p["variant"] == variant]
            if points:
                style = {"color": "black", "linestyle": "--"} if variant == "original" else {}
                axis.plot(
                    [p["step"] for p in points], [p["eval_loss"] for p in points], marker="o", label=variant, **style
                )
        axis.set_title(kind)
        axis.set_xlabel("fine-tuning step")
        axis.set_ylabel("validation loss")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
