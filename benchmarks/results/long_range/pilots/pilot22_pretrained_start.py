"""Pilot 22 of docs/long_range.md, as it was run: does a pretrained start make the multi-key needle learnable?

A BART of the probe's size is pretrained with text infilling on documents whose sentences and four keyed facts are
each stated twice (restoring a masked value needs the other statement of its key: the matching the probe asks
for), then fine-tuned on the multi-key needle exactly as the probe's contenders are.

    python benchmarks/results/long_range/pilots/pilot22_pretrained_start.py original 6000   # about 35 minutes
"""

import json
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import long_range_probe as lrp  # noqa: E402  (benchmarks/, put on the path above)
import torch  # noqa: E402
from swap_transfer import SIZES, pretrain_with_infilling  # noqa: E402

from scrolls_ssm.probe import _key, _needle, _value  # noqa: E402
from scrolls_ssm.synthetic import filler_sentence  # noqa: E402

OUT = Path(os.environ.get("PILOT_OUT", "/tmp/p22"))
SETUP = lrp.Setup(
    tasks=("multi_key_needle",),
    train_lengths=(128, 256),
    train_rows_per_length=45000,
    eval_lengths=(256, 1024, 4096, 16384),
    depths=(0, 50, 100),
    eval_rows_per_cell=4,
    steps=int(sys.argv[2]) if len(sys.argv) > 2 else 6000,
)
PRE_LEN, PRE_STEPS, PRE_TOKENS, PRE_LR = 512, 6000, 4096, 2e-3


def documents(count: int, split: str, facts: int = 4, restatements: int = 2, sentences: int = 14) -> list[str]:
    rng = random.Random(f"pretrain-{split}")
    texts = []
    for _ in range(count):
        parts = [filler_sentence(rng) for _ in range(sentences)] * restatements
        keys = set()
        while len(keys) < facts:
            keys.add(_key(rng))
        parts += [_needle(key, _value(rng)) for key in keys] * restatements
        rng.shuffle(parts)
        texts.append(" ".join(parts))
    return texts


def pretrain(tokenizer_dir: Path) -> Path:
    from transformers import AutoTokenizer

    from scrolls_ssm.denoising import denoising_batches, denoising_loss

    folder = OUT / "pretrained"
    if (folder / "config.json").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"mask_token": "<mask>"})
    texts = documents(12000, "train")
    heldout = denoising_batches(documents(48, "heldout"), tokenizer, PRE_LEN, 8192, seed=99)
    lengths = [len(tokenizer(t)["input_ids"]) for t in texts[:50]]
    print("pretraining document tokens", min(lengths), sum(lengths) / len(lengths), max(lengths), flush=True)
    started = time.monotonic()
    sizes = {name: getattr(SETUP, name) for name in SIZES}
    model = pretrain_with_infilling(tokenizer, texts, sizes, 0.1, PRE_LEN, PRE_STEPS, PRE_TOKENS, PRE_LR, seed=0)
    report = {
        "steps": PRE_STEPS,
        "seconds": round(time.monotonic() - started),
        "heldout": denoising_loss(model, heldout),
    }
    print("pretrained", report, flush=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "pretraining.json").write_text(json.dumps(report))
    return folder


def variant(name: str, pretrained: Path, tokenizer_dir: Path) -> Path:
    """The pretrained BART as a scrolls_ssm model with every layer attention, its learned positions tiled to the
    probe's length limit (the way LED's were made from BART's)."""
    from transformers import AutoTokenizer

    from scrolls_ssm.convert import swap_encoder

    folder = OUT / "starts" / name
    if (folder / "config.json").is_file():
        return folder
    limit = max(SETUP.eval_lengths + SETUP.train_lengths) + 16
    model = swap_encoder(pretrained, ["attention"] * 4, max_source_positions=limit)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(pretrained).save_pretrained(folder)
    return folder


def finetune(name: str, start: Path, data_dir: Path, tokenizer_dir: Path) -> None:
    runs = OUT / "runs"
    run_dir = runs / name
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    log = runs / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    args = lrp.overrides("s4d", SETUP, data_dir, tokenizer_dir, run_dir, predict=True, evaluate_from=start)
    args = [a for a in args if not a.startswith("train.max_steps=")] + [f"train.max_steps={SETUP.steps}"]
    started = time.monotonic()
    error = lrp._run([sys.executable, str(lrp.REPO / "run_finetune.py"), *args], log)
    print(name, "error" if error else "ok", error or "", f"{time.monotonic() - started:.0f} s", flush=True)
    from scrolls_ssm.data import group_references, load_scrolls
    from scrolls_ssm.evaluation import truncated_split_name
    from scrolls_ssm.probe import probe_scores

    _, refs = group_references(load_scrolls("quality", "validation", data_files=str(data_dir)))
    for split in ("validation", truncated_split_name("validation", SETUP.truncate)):
        path = run_dir / "predictions" / split / "quality.json"
        if path.is_file():
            scores = probe_scores(json.loads(path.read_text()), refs)
            by_length = {}
            for (_task, length, _depth), s in scores.items():
                by_length.setdefault(length, []).append(s)
            print(name, split, {k: round(sum(v) / len(v), 1) for k, v in sorted(by_length.items())}, flush=True)
            (runs / f"{name}.{split}.json").write_text(json.dumps({str(k): v for k, v in scores.items()}))
    losses = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    curve = [(r["step"], round(r["train/loss"], 3)) for r in losses if "train/loss" in r and r["step"] % 500 == 0]
    print(name, "train loss", curve, [(r["step"], round(r["eval/loss"], 3)) for r in losses if "eval/loss" in r])


def recall(folder: Path, which: int, count: int = 40) -> None:
    """How often the pretrained model restores a masked value from the other statement of its key: documents of the
    pretraining form, the value of one fact masked in its first (`which=0`) or second statement, the clean text as
    decoder input (teacher forcing); a hit is every digit of the value predicted right at its place."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
    rng = random.Random("recall")
    hits = digits = 0.0
    for _ in range(count):
        parts = [filler_sentence(rng) for _ in range(14)] * 2
        keys: list[str] = []
        while len(keys) < 4:
            key = _key(rng)
            if key not in keys:
                keys.append(key)
        values = [_value(rng) for _ in keys]
        parts += [_needle(key, value) for key, value in zip(keys, values, strict=True)] * 2
        rng.shuffle(parts)
        target = _needle(keys[0], values[0])
        index = [i for i, part in enumerate(parts) if part == target][which]
        clean = " ".join(parts)
        parts[index] = target.replace(values[0], "<mask>")
        noised = tokenizer(" ".join(parts), return_tensors="pt", truncation=True, max_length=PRE_LEN)
        labels = tokenizer(clean, return_tensors="pt", truncation=True, max_length=PRE_LEN)["input_ids"]
        value = tokenizer(values[0] + " .", add_special_tokens=False)["input_ids"][:-1]
        ids = labels[0].tolist()
        found = [i for i in range(len(ids)) if ids[i : i + len(value)] == value]
        if len(found) <= which:
            continue  # cut off by the length limit
        at = found[which]
        with torch.no_grad():
            predicted = model(**noised, labels=labels).logits[0].argmax(-1).tolist()[at : at + len(value)]
        hits += predicted == value
        digits += sum(a == b for a, b in zip(predicted, value, strict=True)) / len(value)
    print(f"statement {which} masked: value restored {hits:.0f}/{count}, digits right {digits / count:.2f}")


if __name__ == "__main__":
    if sys.argv[1] == "recall":  # ... recall 0|1: after pretraining
        recall(OUT / "pretrained", int(sys.argv[2]))
        sys.exit()
    data_dir, tokenizer_dir = lrp.prepare_data(SETUP, OUT)
    pretrained = pretrain(tokenizer_dir)
    for name in sys.argv[1].split(","):
        finetune(name, variant(name, pretrained, tokenizer_dir), data_dir, tokenizer_dir)
