"""Writes an encoder-scaling sweep (see encoder_scaling.py) as a CSV, a markdown report and a log-log plot.

The markdown ends with the scaling targets checked against the data, so a sweep's verdict is in its own report:
at 16K tokens every state-space configuration should have >= 3x LED's throughput and <= 0.35x its peak memory, and
time(16K) / time(4K) <= 4.4 (linear scaling with ~10% slack).
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
from pathlib import Path

import torch

# Every configuration the sweep knows, in report order: ours, then the peers, then the floor.
CONFIGS = {
    "s4d": "all layers bidirectional S4D",
    "mamba": "all layers bidirectional Mamba (selective scan)",
    "mamba2": "all layers bidirectional Mamba-2 (SSD)",
    "gss-hybrid": "GSS layers, the last layer block-local attention",
    "attention": "full attention (SDPA): BART's encoder",
    "local-attention": "block-local attention (each block sees itself and both neighbours)",
    "led": "peer: transformers' LED encoder (Longformer attention, global attention on token 0)",
    "longt5-tglobal": "peer: transformers' LongT5 encoder, transient-global attention (radius 127, blocks of 16)",
    "ffn-only": "floor: our encoder with every mixer replaced by the identity",
}
SSM_CONFIGS = ("s4d", "mamba", "mamba2", "gss-hybrid")
TARGET_LENGTH, SHORT_LENGTH = 16384, 4096
TARGET_SPEEDUP, TARGET_MEMORY, TARGET_GROWTH = 3.0, 0.35, 4.4

FIELDS = [
    "config", "length", "status", "note", "time_s", "time_min_s", "cpu_s", "tokens_per_s", "peak_mem_mb", "gflop",
    "achieved_gflops", "matmul_gflops", "matmul_util", "params_m", "device", "dtype", "threads", "repeats", "load_avg",
]  # fmt: skip


def _float(row: dict, field: str) -> float | None:
    """A numeric field of a row that may come from the CSV (strings) or from a worker (numbers)."""
    value = row.get(field)
    return float(value) if value not in (None, "") else None


def _ok(rows: list[dict]) -> dict[tuple[str, int], dict]:
    return {(row["config"], int(row["length"])): row for row in rows if row["status"] == "ok"}


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _pivot(rows: list[dict], field: str, fmt: str, scale: float = 1.0) -> list[str]:
    """A configs x lengths markdown table of `field`; a run that did not finish shows its status instead."""
    lengths = sorted({int(row["length"]) for row in rows})
    cells = {(row["config"], int(row["length"])): row for row in rows}
    lines = ["| config | " + " | ".join(f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths) + " |"]
    lines.append("|---" * (len(lengths) + 1) + "|")
    for config in [c for c in CONFIGS if any(row["config"] == c for row in rows)]:
        values = []
        for length in lengths:
            row = cells.get((config, length))
            if row is None:
                values.append("")
            elif row["status"] == "ok":
                values.append(format(_float(row, field) * scale, fmt))
            else:
                values.append(row["status"])
        lines.append(f"| {config} | " + " | ".join(values) + " |")
    return lines


def _verdict(value: float | None, good: bool, judged: bool) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f} " + (("met" if good else "**missed**") if judged else "-")


def _ratio(numerator: dict | None, denominator: dict | None, field: str) -> float | None:
    if numerator is None or denominator is None or _float(numerator, field) is None or not _float(denominator, field):
        return None
    return _float(numerator, field) / _float(denominator, field)


def _targets(rows: list[dict]) -> list[str]:
    """The 16K verdicts, from wall time and from CPU time, or a sentence saying why they cannot be checked.

    Both clocks are judged because a shared machine inflates wall times unevenly between runs; CPU seconds of the
    worker stay honest there (throughput by CPU time is tokens per CPU-second)."""
    ok = _ok(rows)
    led = ok.get(("led", TARGET_LENGTH))
    if led is None:
        return [f"Targets not checked: LED has no finished run at {TARGET_LENGTH} tokens in this sweep."]
    lines = [
        f"Verdicts for {', '.join(SSM_CONFIGS)}; the other rows are for comparison. Each cell: by wall time / by CPU "
        "time.",
        "",
        f"| config | tokens/s vs LED (>= {TARGET_SPEEDUP:g}x) | peak memory vs LED (<= {TARGET_MEMORY:g}x) | "
        f"time 16K / time 4K (<= {TARGET_GROWTH:g}) | matmul-FLOP util |",
        "|---|---|---|---|---|",
    ]
    for config in [c for c in CONFIGS if c != "led" and (c, TARGET_LENGTH) in ok]:
        row, short, judged = ok[(config, TARGET_LENGTH)], ok.get((config, SHORT_LENGTH)), config in SSM_CONFIGS
        speedups = [_ratio(led, row, field) for field in ("time_s", "cpu_s")]  # throughput ratio = time ratio
        growths = [_ratio(row, short, field) for field in ("time_s", "cpu_s")]
        memory = _ratio(row, led, "peak_mem_mb")
        lines.append(
            f"| {config} | "
            + " / ".join(_verdict(x, x is not None and x >= TARGET_SPEEDUP, judged) for x in speedups)
            + f" | {_verdict(memory, memory is not None and memory <= TARGET_MEMORY, judged)} | "
            + " / ".join(_verdict(x, x is not None and x <= TARGET_GROWTH, judged) for x in growths)
            + f" | {100 * _float(row, 'matmul_util'):.1f}% / {100 * row.get('matmul_util_cpu', float('nan')):.1f}% |"
        )
    missing = [c for c in SSM_CONFIGS if (c, TARGET_LENGTH) not in ok and any(r["config"] == c for r in rows)]
    if missing:
        lines.append(f"\nNo finished {TARGET_LENGTH}-token run (targets missed or unmeasured): {', '.join(missing)}.")
    return lines


def _with_cpu_utilization(rows: list[dict]) -> list[dict]:
    """Adds `matmul_util_cpu`: counted FLOPs per CPU-second against the best per-thread matmul rate of the sweep.

    Each worker's own reference rate and wall time are both at the mercy of other processes on a shared machine;
    CPU seconds and the least-disturbed reference measurement are not."""
    rates = [_float(row, "matmul_gflops") / _float(row, "threads") for row in rows if row["status"] == "ok"]
    best = max(rates, default=None)
    out = []
    for row in rows:
        extra = {}
        if row["status"] == "ok" and best and _float(row, "cpu_s"):
            extra["matmul_util_cpu"] = _float(row, "gflop") / _float(row, "cpu_s") / best
        out.append({**row, **extra})
    return out


def _load_note(loads: list[float]) -> str:
    """What the load averages say about the wall times: only a load above the core count means competition."""
    if not loads:
        return ""
    if max(loads) > (os.cpu_count() or 1):
        return " (above the core count: other processes were competing and wall times are inflated; compare CPU times)"
    return " (not above the core count)"


def write_markdown(rows: list[dict], path: Path, meta: dict) -> None:
    rows = _with_cpu_utilization(rows)
    rates = [_float(row, "matmul_gflops") for row in rows if row["status"] == "ok"]
    rate = f"{statistics.median(rates):.0f} GFLOP/s" if rates else "n/a"
    loads = [_float(row, "load_avg") for row in rows if _float(row, "load_avg") is not None]
    load = f"{min(loads):.1f} to {max(loads):.1f}" if loads else "n/a"
    threads = "/".join(sorted({str(row["threads"]) for row in rows if row["status"] == "ok"})) or "n/a"
    lines = [
        f"# Encoder scaling: {meta['device']}, size `{meta['size']}`",
        "",
        f"Encoder only, batch 1, forward + backward. d_model {meta['d_model']}, {meta['layers']} layers, FFN "
        f"{meta['ffn_dim']}, {meta['heads']} heads, attention window {meta['window']}. "
        f"Generated {datetime.datetime.now().isoformat(timespec='minutes')} by `{meta['command']}` "
        f"(torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cores, {threads} torch threads per "
        f"worker). Reference matmul rate (median over runs): {rate}. 1-minute load average when runs ended: {load}"
        f"{_load_note(loads)}.",
        "",
        "| config | what it is |",
        "|---|---|",
        *[f"| {name} | {text} |" for name, text in CONFIGS.items() if any(r["config"] == name for r in rows)],
        "",
        "## Forward + backward time (s, median)",
        *_pivot(rows, "time_s", ".3f"),
        "",
        "## CPU time per step (s, all threads, median)",
        *_pivot(rows, "cpu_s", ".3f"),
        "",
        "## Throughput (tokens/s)",
        *_pivot(rows, "tokens_per_s", ".0f"),
        "",
        "## Peak memory growth during the steps (MiB)",
        *_pivot(rows, "peak_mem_mb", ".0f"),
        "",
        "## Matmul-FLOP utilization (%; FFTs, scans and elementwise work are not counted)",
        "By wall time against the worker's own reference matmul:",
        "",
        *_pivot(rows, "matmul_util", ".1f", scale=100.0),
        "",
        "By CPU time against the best per-thread reference matmul of the sweep (robust to a busy machine):",
        "",
        *_pivot(rows, "matmul_util_cpu", ".1f", scale=100.0),
        "",
        f"## Targets at {TARGET_LENGTH // 1024}K tokens",
        *_targets(rows),
    ]
    notes = [f"- {r['config']} at {r['length']}: {r['status']}: {r['note']}" for r in rows if r.get("note")]
    if notes:
        lines += ["", "## Notes", *notes]
    path.write_text("\n".join(lines) + "\n")


def write_plot(rows: list[dict], path: Path, meta: dict) -> None:
    """Log-log wall time, CPU time and memory against length, one line per configuration (finished runs only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = _ok(rows)
    fields = {
        "time_s": "forward + backward wall time (s)",
        "cpu_s": "forward + backward CPU time (s, all threads)",
        "peak_mem_mb": "peak memory growth (MiB)",
    }
    figure, axes = plt.subplots(1, len(fields), figsize=(18, 5.5))
    for config in CONFIGS:
        points = sorted((length, row) for (name, length), row in ok.items() if name == config)
        if not points:
            continue
        style = "--" if config in ("led", "longt5-tglobal") else (":" if config == "ffn-only" else "-")
        lengths = [length for length, _ in points]
        for axis, field in zip(axes, fields, strict=True):
            axis.plot(lengths, [_float(row, field) for _, row in points], style, marker="o", label=config)
    for axis, label in zip(axes, fields.values(), strict=True):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length (tokens)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    if ok:
        axes[0].legend(fontsize=8)
    figure.suptitle(
        f"Encoder fwd+bwd, batch 1, {meta['device']}: d_model {meta['d_model']}, {meta['layers']} layers, "
        f"FFN {meta['ffn_dim']}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_outputs(rows: list[dict], out: Path, stem: str, meta: dict, plot: bool) -> list[Path]:
    """Writes `<stem>.csv`, `<stem>.md` and (when `plot`) `<stem>.png` into `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.csv", out / f"{stem}.md"]
    write_csv(rows, paths[0])
    write_markdown(rows, paths[1], meta)
    if plot:
        paths.append(out / f"{stem}.png")
        write_plot(rows, paths[2], meta)
    return paths
