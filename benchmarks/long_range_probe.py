"""Long-range probe: does an encoder use facts thousands of tokens away? Every contender is trained from scratch with
the toolkit's own loop on the probe tasks of `scrolls_ssm.probe` (needles, multi-key needles, variable tracking,
aggregation), with the same recipe, width, depth, steps and token budget, then scored by exact match on held-out
inputs at every length and needle depth.

    python benchmarks/long_range_probe.py                         # the default sweep (lengths 1K, 4K, 16K)
    python benchmarks/long_range_probe.py --quick                 # smoke test: tiny sizes, two contenders
    python benchmarks/long_range_probe.py --contenders s4d gss-hybrid --lengths 1024 4096 16384 32768
    python benchmarks/long_range_probe.py --family t5             # T5-family models; LongT5 is the peer

Each contender trains in its own process (`run_finetune.py`, as a user would run it) and its cells are appended to
the CSV as soon as it finishes: an interrupted sweep resumes with the contenders it has not finished (`--resume`).
`--family t5` builds every contender as a T5-family model (pre-norm blocks, relative position bias, a T5-style
tokenizer) and puts transformers' LongT5 (transient-global attention) where the BART family has LED.
Outputs: `<out>/long_range_probe[_quick][_t5].csv`, `.md` (task x contender x length) and one heatmap PNG per task;
see docs/long_range.md for the findings and the recipe.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from probe_report import first_tokens_name, write_outputs

from scrolls_ssm.probe import PROBE_TASKS, TRAINING_TASKS

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results" / "long_range"


@dataclass(frozen=True)
class Setup:
    """What every contender shares: model width and depth, the data, and the training budget."""

    # The default sweep is the single needle: with these sizes every contender either learns it or shows that it does
    # not, and the nine BART-family contenders took 55 minutes on 2 CPU cores (docs/long_range.md). The other three
    # tasks were not learned by any layout in budgets many times larger (the pilots there): ask for them with --tasks.
    tasks: tuple[str, ...] = ("single_needle",)
    training_tasks: tuple[str, ...] = ()  # training rows only (scrolls_ssm.probe.TRAINING_TASKS)
    d_model: int = 64
    encoder_layers: int = 4
    decoder_layers: int = 2  # one layer to read the question, one to find its fact
    heads: int = 4
    ffn_dim: int = 128
    window: int = 512  # block-local attention window (also the hybrids' attention layer)
    truncate: int = 1024  # what the truncation baseline reads
    vocab_size: int = 1000  # keeps every planted word (probe_vocabulary) one piece
    # Short training inputs: many examples per step, so retrieval is learned within minutes; layouts without a
    # position table carry it to 16K (docs/long_range.md). Learned-position layouts have nothing past 512 trained.
    train_lengths: tuple[int, ...] = (256, 512)
    train_rows_per_length: int = 3000
    eval_lengths: tuple[int, ...] = (1024, 4096, 16384)
    depths: tuple[int, ...] = (0, 25, 50, 75, 100)
    eval_rows_per_cell: int = 4
    steps: int = 1500
    tokens_per_batch: int = 2048
    learning_rate: float = 1e-3
    # Learned-position layouts have rows trained only up to the longest training input; after training, those rows
    # are copied over the rest of the table (as LED's 16K table was made from BART's 1K one) before evaluation.
    tile_positions: bool = True
    seed: int = 0
    family: str = "bart"  # or "t5": T5-family contenders (FAMILIES)


QUICK = Setup(
    tasks=PROBE_TASKS,  # the smoke test runs every task through the whole pipeline
    d_model=32,
    encoder_layers=2,
    heads=2,
    ffn_dim=64,
    window=64,
    truncate=384,
    vocab_size=300,
    train_lengths=(384, 512),
    train_rows_per_length=10,
    eval_lengths=(384, 768),
    depths=(0, 100),
    eval_rows_per_cell=1,
    steps=6,
    tokens_per_batch=1024,
)

# Contender -> what it is. Layouts mirror benchmarks/encoder_scaling.py; every other setting is shared.
CONTENDERS = {
    "s4d": "all layers bidirectional S4D",
    "mamba2": "all layers bidirectional Mamba-2 (SSD)",
    "mamba": "all layers bidirectional Mamba (selective scan)",
    "gss-hybrid": "GSS layers, the last layer block-local attention",
    "s4d-hybrid": "S4D layers, the last layer block-local attention",
    "local-attention": "block-local attention in every layer",
    "attention": "full attention in every layer (BART's encoder)",
    "truncated": "full attention reading only the first `truncate` tokens (BART's 1,024)",
    "led": "transformers' LED at the same size (window `window`, global attention on <s>)",
    "longt5": "transformers' LongT5 at the same size (transient-global attention, radius `window`)",
}

# Model family -> its contenders: the same layouts, and the family's own long-input peer from transformers.
FAMILIES = {
    "bart": [name for name in CONTENDERS if name != "longt5"],
    "t5": [name for name in CONTENDERS if name != "led"],
}
# What a sweep runs when --contenders is not given. T5's full attention adds a relative position bias, which SDPA
# cannot fuse: every attention layer materializes (heads, L, L) float32 tensors, 4 GiB each at 16K tokens, and one
# pass over the 16K validation inputs took over 20 minutes on 2 CPU cores. Ask for it by name where it fits.
DEFAULT_CONTENDERS = {"bart": FAMILIES["bart"], "t5": [name for name in FAMILIES["t5"] if name != "attention"]}
PEERS = {"led", "longt5"}


# The state-space contenders and their mixer. Their first layer sees order, so they run without a position table.
STATE_SPACE = {"s4d": "s4d", "mamba2": "mamba2", "mamba": "mamba", "gss-hybrid": "gss", "s4d-hybrid": "s4d"}


def layout(contender: str, layers: int) -> list[str]:
    if contender.endswith("-hybrid"):
        return [STATE_SPACE[contender]] * (layers - 1) + ["attention"]
    return [STATE_SPACE.get(contender, "attention")] * layers


def overrides(
    contender: str,
    setup: Setup,
    data_dir: Path,
    tokenizer_dir: Path,
    out_dir: Path,
    predict: bool = True,
    evaluate_from: Path | None = None,
) -> list[str]:
    """The run_finetune.py overrides of one contender: everything but the encoder layout is shared. `predict=False`
    only trains; `evaluate_from` only predicts, with the model saved in that folder (no training step). A state-space
    contender's run also scores its model reading only the first `truncate` tokens (`reads_first`)."""
    limit = max(setup.eval_lengths + setup.train_lengths) + 16  # room for <s> / </s>, a multiple of 8
    if contender == "truncated":
        limit = setup.truncate
    windowed = contender == "local-attention" or contender.endswith("-hybrid")
    config = model_config(contender, setup)
    if evaluate_from is not None:
        model = [f"model.init_from={evaluate_from}"]
    elif contender in PEERS:
        folder = write_peer(contender, setup, config, limit, tokenizer_dir, out_dir.parent / f"{contender}-init")
        model = [f"model.init_from={folder}"]
    else:
        model = [
            f"model.family={setup.family}",
            f"model.tokenizer={tokenizer_dir}",
            f"model.encoder_layer_types={json.dumps(layout(contender, setup.encoder_layers))}",
            f"model.attention_window={setup.window if windowed else 'null'}",
            f"model.config={json.dumps(config)}",
        ]
    return [
        "model.base=null",
        *model,
        f"model.max_source_positions={limit}",
        "data.tasks=[quality]",
        f"data.data_dir={data_dir}",
        f"data.max_source_length={limit}",
        "data.max_target_length=32",
        f"data.max_tokens_per_batch={setup.tokens_per_batch}",
        f"data.predict_splits={'[validation]' if predict else '[]'}",
        # A training-only run still scores its eval split at the end: 8 rows keep that cheap.
        *([] if predict else ["data.max_eval_samples=8"]),
        f"train.output_dir={out_dir}",
        f"train.max_steps={0 if evaluate_from is not None else setup.steps}",
        "train.num_epochs=100",
        f"train.learning_rate={setup.learning_rate}",
        "train.warmup_ratio=0.05",
        "train.weight_decay=0.01",
        f"train.seed={setup.seed}",
        "eval.max_new_tokens=32",
        f"eval.max_tokens_per_batch={2 * max(setup.eval_lengths)}",
        *([f"eval.truncated_source_lengths=[{setup.truncate}]"] if predict and reads_first(contender, setup) else []),
    ]


def model_config(contender: str, setup: Setup) -> dict:
    """The model.config of every contender of `setup.family`: the shared width and depth, the mixers' settings, and
    for the BART family the position table (T5-family models have none: relative position bias in attention)."""
    mixers = {
        "s4d_d_state": 32,
        "gss_d_state": 32,
        "mamba2_headdim": min(32, 2 * setup.d_model),
        "mamba2_chunk_size": 64,
    }
    if setup.family == "t5":
        # T5's own initialization (weights scaled by d_model ** -0.5) trains from scratch as it is.
        return {
            "d_model": setup.d_model,
            "d_ff": setup.ffn_dim,
            "num_heads": setup.heads,
            "d_kv": setup.d_model // setup.heads,
            "num_decoder_layers": setup.decoder_layers,
            "dropout_rate": 0.0,
            **mixers,
        }
    return {
        "d_model": setup.d_model,
        "encoder_ffn_dim": setup.ffn_dim,
        "decoder_ffn_dim": setup.ffn_dim,
        "encoder_attention_heads": setup.heads,
        "decoder_attention_heads": setup.heads,
        "decoder_layers": setup.decoder_layers,
        "max_position_embeddings": 64,
        "dropout": 0.0,
        "init_std": 0.1,  # see docs/demo.md: BART's 0.02 lets a from-scratch encoder collapse to a constant
        **mixers,
        # State-space layouts read order from their mixers, so they need no position table, and one trained on
        # short inputs meets no untrained position on long ones; attention layouts need their learned table.
        "encoder_positions": "none" if contender in STATE_SPACE else "learned",
    }


def family_suffix(setup: Setup) -> str:
    """What ends the names of a T5-family sweep's files and folders (none for the BART family), so both families'
    sweeps share one output folder."""
    return "" if setup.family == "bart" else f"_{setup.family}"


def tiles_positions(contender: str, setup: Setup) -> bool:
    """Whether the contender has a learned position table to tile after training (BART-family attention layouts and
    LED; T5-family models have relative position bias, which has no table of absolute positions)."""
    return setup.tile_positions and setup.family == "bart" and contender not in STATE_SPACE


def reads_first(contender: str, setup: Setup) -> str | None:
    """The name of the companion rows that score a state-space contender's model on the first `setup.truncate`
    tokens of every input (the same model, cut as the SCROLLS BART baseline is cut), or None. Needles past that
    token are out of its reach: this shows what the whole input is worth to a model that learned the task."""
    if contender in STATE_SPACE and setup.truncate < max(setup.eval_lengths):
        return first_tokens_name(contender, setup.truncate)
    return None


def write_peer(contender: str, setup: Setup, config: dict, limit: int, tokenizer_dir: Path, folder: Path) -> Path:
    """A random-init transformers peer of the contenders' size (LED for the BART family, LongT5 with transient-global
    attention for the T5 family), with the shared tokenizer, as a checkpoint folder."""
    from transformers import (
        AutoTokenizer,
        LEDConfig,
        LEDForConditionalGeneration,
        LongT5Config,
        LongT5ForConditionalGeneration,
    )

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if contender == "longt5":
        peer = LongT5ForConditionalGeneration(
            LongT5Config(
                **config,
                vocab_size=len(tokenizer),
                num_layers=setup.encoder_layers,
                encoder_attention_type="transient-global",
                local_radius=setup.window,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id,
            )
        )
    else:
        shared = {key: value for key, value in config.items() if key in LEDConfig.__dataclass_fields__}
        peer = LEDForConditionalGeneration(
            LEDConfig(
                **shared,
                vocab_size=len(tokenizer),
                encoder_layers=setup.encoder_layers,
                attention_window=setup.window,
                max_encoder_position_embeddings=-(-limit // setup.window) * setup.window,  # LED pads whole windows
                max_decoder_position_embeddings=config["max_position_embeddings"],
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.eos_token_id,
            )
        )
    peer.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def prepare_data(setup: Setup, out: Path) -> tuple[Path, Path]:
    """The shared tokenizer and the probe dataset, written once per setup (kept when the setup is unchanged)."""
    from transformers import AutoTokenizer

    from scrolls_ssm.probe import probe_rows, probe_vocabulary, write_probe_dataset
    from scrolls_ssm.synthetic import train_sentencepiece_tokenizer

    data_dir, tokenizer_dir = out / f"data{family_suffix(setup)}", out / f"tokenizer{family_suffix(setup)}"
    marker = data_dir / "setup.json"
    settings = json.dumps(asdict(setup), sort_keys=True)
    if marker.is_file() and marker.read_text() == settings:
        return data_dir, tokenizer_dir
    shutil.rmtree(data_dir, ignore_errors=True)
    shutil.rmtree(tokenizer_dir, ignore_errors=True)
    # Lengths are counted in the tokenizer's tokens, so it is trained first, on word-counted examples of every task.
    rows = probe_rows(PROBE_TASKS, (512,), [None], per_cell=40, seed=setup.seed, split="tokenizer")
    sample = [row["input"] + " " + row["output"] for row in rows]
    sample += [" ".join(probe_vocabulary())] * 50  # every planted word often enough to stay one piece
    tokenizer = train_sentencepiece_tokenizer(
        sample, tokenizer_dir / "_sentencepiece", vocab_size=setup.vocab_size, split_digits=True, style=setup.family
    )
    tokenizer.save_pretrained(tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    write_probe_dataset(
        data_dir,
        tasks=setup.tasks,
        train_lengths=setup.train_lengths,
        num_train_per_length=setup.train_rows_per_length,
        eval_lengths=setup.eval_lengths,
        depths=setup.depths,
        num_eval_per_cell=setup.eval_rows_per_cell,
        seed=setup.seed,
        count_tokens=count,
        training_tasks=setup.training_tasks,
    )
    marker.write_text(settings)
    return data_dir, tokenizer_dir


def tile_learned_positions(model_dir: Path, period: int) -> None:
    """Copy the first `period` positions of the encoder's learned table (the trained ones) over the rest of it, and
    save the model back to `model_dir`. BART-style tables keep their unused leading rows (`offset`); LED has none."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from scrolls_ssm.convert import tile_positions

    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    table = model.get_encoder().embed_positions
    offset = getattr(table, "offset", 0)
    with torch.no_grad():
        rows = table.weight[offset:]
        rows.copy_(tile_positions(rows[:period].clone(), rows.shape[0]))
    model.save_pretrained(model_dir)


def _run(command: list[str], log: Path) -> str | None:
    """Run one run_finetune.py command, appending to `log`; None on success, else the last line that is not a
    progress bar."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    with log.open("a") as handle:
        process = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if process.returncode == 0:
        return None
    lines = log.read_text().replace("\r", "\n").strip().splitlines()
    return ([line for line in lines if "it/s]" not in line][-1:] or ["no output"])[0][:300]


def run_contender(contender: str, setup: Setup, data_dir: Path, tokenizer_dir: Path, out: Path) -> list[dict]:
    """Train and evaluate one contender in its own process; one CSV row per (task, length, depth) cell.
    Learned-position contenders train, have their position table tiled (`Setup.tile_positions`), then evaluate."""
    from scrolls_ssm.data import group_references, load_scrolls
    from scrolls_ssm.evaluation import truncated_split_name
    from scrolls_ssm.probe import PROBE_SCROLLS_TASK, probe_scores

    runs = out / f"runs{family_suffix(setup)}"
    run_dir = runs / contender
    shutil.rmtree(run_dir, ignore_errors=True)  # the sweep owns this folder; a contender always starts fresh
    log = runs / f"{contender}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    finetune = [sys.executable, str(REPO / "run_finetune.py")]
    started = time.monotonic()
    tile = tiles_positions(contender, setup)
    error = _run([*finetune, *overrides(contender, setup, data_dir, tokenizer_dir, run_dir, predict=not tile)], log)
    predictions_dir = run_dir
    if tile and error is None:
        tile_learned_positions(run_dir / "model", max(setup.train_lengths))
        predictions_dir = run_dir / "tiled"
        evaluate = overrides(
            contender, setup, data_dir, tokenizer_dir, predictions_dir, evaluate_from=run_dir / "model"
        )
        error = _run([*finetune, *evaluate], log)
    seconds = time.monotonic() - started
    if error is not None:
        return [{"contender": contender, "status": "error", "note": error, "seconds": round(seconds)}]
    _, references = group_references(load_scrolls(PROBE_SCROLLS_TASK, "validation", data_files=str(data_dir)))
    splits = {contender: "validation"}
    companion = reads_first(contender, setup)
    if companion:
        splits[companion] = truncated_split_name("validation", setup.truncate)
    rows = []
    for name, split in splits.items():
        predictions = json.loads((predictions_dir / "predictions" / split / f"{PROBE_SCROLLS_TASK}.json").read_text())
        rows += [
            {
                "contender": name,
                "task": task,
                "length": length,
                "depth": "all" if depth is None else depth,
                "exact_match": round(score, 2),
                "rows": setup.eval_rows_per_cell,
                "status": "ok",
                "seconds": round(seconds),
                "steps": setup.steps,
            }
            for (task, length, depth), score in probe_scores(predictions, references).items()
        ]
    return rows


def naive_rows(setup: Setup, data_dir: Path) -> list[dict]:
    """The best constant training answer per task, as a contender named `naive` (length and depth: all)."""
    from scrolls_ssm.data import group_references, load_scrolls
    from scrolls_ssm.probe import PROBE_SCROLLS_TASK, probe_naive_baseline

    train = load_scrolls(PROBE_SCROLLS_TASK, "train", data_files=str(data_dir))
    _, references = group_references(load_scrolls(PROBE_SCROLLS_TASK, "validation", data_files=str(data_dir)))
    return [
        {
            "contender": "naive",
            "task": task,
            "length": "all",
            "depth": "all",
            "exact_match": round(score, 2),
            "status": "ok",
        }  # fmt: skip
        for task, score in probe_naive_baseline(train, references).items()
    ]


def load_previous(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as handle:
        return list(csv.DictReader(handle))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contenders", nargs="+", choices=list(CONTENDERS), help="default: all")
    parser.add_argument(
        "--tasks", nargs="+", choices=list(PROBE_TASKS), help="probe tasks (default: single_needle; any of the four)"
    )
    parser.add_argument(
        "--training-tasks",
        nargs="+",
        choices=list(TRAINING_TASKS),
        help="extra training rows beside the probe tasks' own (multi_query_needle: every key of a multi-key needle "
        "asked at once); scored on the probe tasks only",
    )
    parser.add_argument("--lengths", nargs="+", type=int, help="evaluation lengths in tokens (default 1K 4K 16K)")
    parser.add_argument("--steps", type=int, help="optimizer steps per contender")
    parser.add_argument(
        "--seed", type=int, help="seed of the data and of every contender's training (default 0); one --out per seed"
    )
    parser.add_argument(
        "--family",
        choices=list(FAMILIES),
        default="bart",
        help="build the contenders as BART-family (LED as the peer) or T5-family models (LongT5 as the peer)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny model and data, two contenders")
    parser.add_argument("--resume", action="store_true", help="keep contenders finished in an earlier CSV")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"output folder (default {RESULTS_DIR})")
    return parser.parse_args(argv)


def setup_from_args(args: argparse.Namespace) -> Setup:
    """The default (or --quick) setup with the command line's tasks, evaluation lengths and steps."""
    changes = {
        "tasks": tuple(args.tasks) if args.tasks else None,
        "training_tasks": tuple(args.training_tasks) if args.training_tasks else None,
        "eval_lengths": tuple(sorted(args.lengths)) if args.lengths else None,
        "steps": args.steps,
        "seed": args.seed,
        "family": args.family if args.family != "bart" else None,
    }
    chosen = {key: value for key, value in changes.items() if value is not None}
    return replace(QUICK if args.quick else Setup(), **chosen)


def main(argv: list[str] | None = None) -> Path:
    """Runs the sweep and returns the CSV path."""
    args = parse_args(argv)
    setup = setup_from_args(args)
    foreign = sorted(set(args.contenders or []) - set(FAMILIES[setup.family]))
    if foreign:
        raise SystemExit(
            f"--contenders {' '.join(foreign)}: not a contender of --family {setup.family} (LED is the BART family's "
            "peer, LongT5 the T5 family's). Fix: use led with --family bart and longt5 with --family t5."
        )
    contenders = args.contenders or (["s4d", "truncated"] if args.quick else DEFAULT_CONTENDERS[setup.family])
    stem = "long_range_probe" + ("_quick" if args.quick else "") + family_suffix(setup)
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / f"{stem}.csv"
    command = "python benchmarks/long_range_probe.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    meta = {"command": command.strip(), **asdict(setup)}

    started = time.monotonic()
    data_dir, tokenizer_dir = prepare_data(setup, args.out)
    rows = [row for row in load_previous(csv_path) if row["contender"] != "naive"] if args.resume else []
    finished = {row["contender"] for row in rows if row["status"] == "ok"}
    rows = naive_rows(setup, data_dir) + [row for row in rows if row["contender"] in finished]
    for index, contender in enumerate(contenders, 1):
        if contender in finished:
            print(f"[{index}/{len(contenders)}] {contender}: kept from {csv_path.name}", flush=True)
            continue
        print(f"[{index}/{len(contenders)}] {contender}: training {setup.steps} steps ...", flush=True)
        new = run_contender(contender, setup, data_dir, tokenizer_dir, args.out)
        rows += new
        ok = [float(row["exact_match"]) for row in new if row["status"] == "ok"]
        summary = f"mean exact match {sum(ok) / len(ok):.1f}" if ok else f"{new[0]['status']}: {new[0]['note']}"
        print(f"[{index}/{len(contenders)}] {contender}: {summary} ({new[0]['seconds']} s)", flush=True)
        write_outputs(rows, args.out, stem, meta, plot=False)  # a partial sweep is never lost
    paths = write_outputs(rows, args.out, stem, meta, plot=True)
    print("wrote " + ", ".join(str(path) for path in paths), flush=True)
    print(f"sweep: {time.monotonic() - started:.0f} s with the data (contenders kept by --resume not counted)")
    return csv_path


if __name__ == "__main__":
    main()
