"""What stops Mamba-1 on a CPU: its selective scan against the memory-bandwidth floor of the state it works on.

    python benchmarks/scan_floor.py --lengths 4096 16384 --threads 1

One bidirectional Mamba layer of encoder_scaling.py's `small` encoder (d_model 256, so d_inner 512, d_state 16, both
directions stacked as a batch of 2) works on a (2, d_state, d_inner, L) float32 state: 1 GiB at 16K tokens, 16 times
the size of the layer's input. This script times, at each length:

- one elementwise pass over that state (`c = a * b`: two tensors read, one written), the unit of the floor;
- the selective scan's forward and backward (`ops_selective_scan.selective_scan`, the layer's shapes), and each as a
  number of such passes: the PyTorch scan, which materializes the state, and the compiled CPU kernel
  (ops_cpu.py), which keeps it in cache and reads and writes only the (2, d_inner, L) inputs and outputs, 16
  times less (left blank where the kernel is not built: no C compiler).

With `--scaling-csv`, the report also sets the scan against the budget of the 3x-LED target: LED's step time at the
same length (from an encoder_scaling.py CSV run with the same thread count) / 3 / the number of layers, per layer,
for everything the layer does. Writes CSV, markdown and PNG.
"""

from __future__ import annotations

import argparse
import csv
import platform
import sys
import time
from pathlib import Path

import torch

from scrolls_ssm.modeling import ops_cpu, ops_selective_scan
from scrolls_ssm.modeling.ops_selective_scan import selective_scan

RESULTS_DIR = Path(__file__).resolve().parent / "results" / "scan_floor"
D_MODEL, LAYERS, D_STATE, EXPAND = 256, 4, 16, 2  # the `small` encoder of encoder_scaling.py, Mamba-1's defaults


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def one_pass_time(shape: tuple[int, ...], repeats: int) -> float:
    """Seconds for c = a * b over float32 tensors of `shape` (freed on return)."""
    a, b, c = torch.rand(shape), torch.rand(shape), torch.empty(shape)
    return best_time(lambda: torch.mul(a, b, out=c), repeats)


def measure(length: int, repeats: int) -> dict:
    """Times of one pass over the state and of the scan's forward and backward at `length`, for the PyTorch scan
    (`scan_*`) and the compiled kernel (`compiled_*`)."""
    batch, d_inner = 2, EXPAND * D_MODEL
    state = (batch, D_STATE, d_inner, length)
    pass_s = one_pass_time(state, repeats)

    generator = torch.Generator().manual_seed(0)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).requires_grad_()

    u, z = leaf(batch, d_inner, length), leaf(batch, d_inner, length)
    delta = (torch.rand(batch, d_inner, length, generator=generator) * 0.1).requires_grad_()
    A = (-torch.rand(d_inner, D_STATE, generator=generator)).requires_grad_()
    B, C, D = leaf(batch, D_STATE, length), leaf(batch, D_STATE, length), leaf(d_inner)
    inputs = (u, delta, A, B, C, D, z)

    def scan_times() -> tuple[float, float]:
        def backward() -> float:
            out = selective_scan(*inputs)
            started = time.perf_counter()
            out.sum().backward()
            return time.perf_counter() - started

        forward_s = best_time(lambda: selective_scan(*inputs), repeats)
        backward()  # warm-up
        return forward_s, min(backward() for _ in range(repeats))

    row = {"length": length, "state_mib": round(batch * D_STATE * d_inner * length * 4 / 2**20), "pass_s": pass_s}
    for prefix, compiled in (("scan", False), ("compiled", True)):
        if compiled and ops_cpu.load() is None:
            row.update(dict.fromkeys([f"{prefix}_{key}" for key in KEYS], ""))
            continue
        ops_selective_scan.USE_COMPILED_KERNEL = compiled
        try:
            forward_s, backward_s = scan_times()
        finally:
            ops_selective_scan.USE_COMPILED_KERNEL = True
        row.update(
            {
                f"{prefix}_forward_s": forward_s,
                f"{prefix}_backward_s": backward_s,
                f"{prefix}_forward_passes": forward_s / pass_s,
                f"{prefix}_backward_passes": backward_s / pass_s,
            }
        )
    return row


KEYS = ("forward_s", "backward_s", "forward_passes", "backward_passes")


def encoder_times(path: Path, threads: int, config: str = "led") -> dict[int, float]:
    """`config`'s forward + backward time per length from an encoder_scaling.py CSV run with `threads` threads."""
    with path.open() as handle:
        rows = [row for row in csv.DictReader(handle) if row["config"] == config and row["status"] == "ok"]
    return {int(row["length"]): float(row["time_s"]) for row in rows if int(row["threads"]) == threads}


def write_rows(rows: list[dict], path: Path) -> None:
    """`rows` as a CSV with the first row's keys as its columns (this script's and mamba2_budget.py's)."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def report(
    rows: list[dict], command: str, threads: int, led: dict[int, float], out: Path, allocator: str
) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, png_path = out / "scan_floor.csv", out / "scan_floor.md", out / "scan_floor.png"
    for row in rows:
        budget = led.get(row["length"])
        row["layer_budget_s"] = budget / 3 / LAYERS if budget else ""
    write_rows(rows, csv_path)
    lines = [
        "# Mamba-1's selective scan against the memory-bandwidth floor",
        "",
        f"One bidirectional Mamba layer of the `small` encoder (d_inner {EXPAND * D_MODEL}, d_state {D_STATE}, 2 "
        f"directions), float32, {threads} torch thread(s), {allocator}, torch {torch.__version__}, "
        f"{platform.machine()}. "
        f"Generated by `{command}`. A pass: one elementwise product over the (2, {D_STATE}, {EXPAND * D_MODEL}, L) "
        "state, two tensors read and one written.",
        "",
        "| length | state | one pass (s) | PyTorch scan forward (s) = passes | backward (s) = passes | "
        "compiled scan forward (s) = passes | backward (s) = passes | 3x-LED budget per layer, whole layer (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(row: dict, prefix: str, part: str) -> str:
        if row[f"{prefix}_{part}_s"] == "":
            return "(not built)"
        return f"{row[f'{prefix}_{part}_s']:.3f} = {row[f'{prefix}_{part}_passes']:.1f}"

    for row in rows:
        budget = f"{row['layer_budget_s']:.2f}" if row["layer_budget_s"] != "" else "(no LED time given)"
        scans = " | ".join(
            cell(row, prefix, part) for prefix in ("scan", "compiled") for part in ("forward", "backward")
        )
        lines.append(f"| {row['length']:,} | {row['state_mib']:,} MiB | {row['pass_s']:.3f} | {scans} | {budget} |")
    md_path.write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    labels = [f"{row['length'] // 1024}K" for row in rows]
    positions = range(len(rows))
    for offset, prefix, name in ((-0.2, "scan", "PyTorch"), (0.2, "compiled", "compiled")):
        built = [(i, row) for i, row in enumerate(rows) if row[f"{prefix}_forward_s"] != ""]
        places = [i + offset for i, _ in built]
        forward = [row[f"{prefix}_forward_s"] for _, row in built]
        axis.bar(places, forward, width=0.35, label=f"{name} scan forward")
        axis.bar(places, [row[f"{prefix}_backward_s"] for _, row in built], width=0.35, bottom=forward,
                 label=f"{name} scan backward")  # fmt: skip
    axis.scatter(positions, [10 * row["pass_s"] for row in rows], color="black", zorder=3, label="10 passes")
    budgets = [(i, row["layer_budget_s"]) for i, row in enumerate(rows) if row["layer_budget_s"] != ""]
    if budgets:
        axis.scatter(
            *zip(*budgets, strict=True), marker="_", s=900, color="red", zorder=3, label="3x-LED layer budget"
        )
    axis.set_xticks(list(positions), labels)
    axis.set_ylabel("seconds per layer")
    axis.set_title(f"Mamba-1 scan, one bidirectional layer, {threads} thread(s)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
    return [csv_path, md_path, png_path]


def per_layer_parser(doc: str, repeats: int, scaling_help: str, results_dir: Path) -> argparse.ArgumentParser:
    """The options of a one-layer timing script set against encoder_scaling.py's LED (this one and
    mamba2_budget.py): lengths, threads, repeats, the scaling CSV and the output folder."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 16384], help="sequence lengths in tokens")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (encoder_scaling.py's main sweep: 1)")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed runs after a warm-up; the fastest is kept")
    parser.add_argument("--scaling-csv", type=Path, help=scaling_help)
    parser.add_argument("--out", type=Path, default=results_dir, help=f"output folder (default {results_dir})")
    parser.add_argument(
        "--retain-freed-memory",
        action="store_true",
        help="keep freed memory for reuse (glibc mallopt), as the training loop and encoder_scaling.py's flag do",
    )
    return parser


def apply_memory_setting(args: argparse.Namespace) -> str:
    """Applies --retain-freed-memory; returns the words the report uses for the allocator."""
    if not args.retain_freed_memory:
        return "glibc's default allocator"
    from scrolls_ssm.cpu_memory import retain_freed_memory

    return "freed memory retained" if retain_freed_memory() else "freed memory retention unavailable here"


def main(argv: list[str] | None = None) -> list[Path]:
    scaling_help = "an encoder_scaling.py CSV with LED at these lengths and thread count"
    args = per_layer_parser(__doc__, 2, scaling_help, RESULTS_DIR).parse_args(argv)
    torch.set_num_threads(args.threads)
    allocator = apply_memory_setting(args)
    led = encoder_times(args.scaling_csv, args.threads) if args.scaling_csv else {}
    rows = []
    for length in args.lengths:
        row = measure(length, args.repeats)
        rows.append(row)
        compiled = (
            f"compiled forward {row['compiled_forward_s']:.3f} s, backward {row['compiled_backward_s']:.3f} s"
            if row["compiled_forward_s"] != ""
            else "compiled scan not built"
        )
        print(
            f"L={length}: pass {row['pass_s']:.3f} s, PyTorch scan forward {row['scan_forward_s']:.2f} s "
            f"({row['scan_forward_passes']:.0f} passes), backward {row['scan_backward_s']:.2f} s "
            f"({row['scan_backward_passes']:.0f} passes); {compiled}",
            flush=True,
        )
    command = "python benchmarks/scan_floor.py " + " ".join(argv if argv is not None else sys.argv[1:])
    paths = report(rows, command.strip(), args.threads, led, args.out, allocator)
    print("wrote " + ", ".join(str(path) for path in paths))
    return paths


if __name__ == "__main__":
    main()
