"""Where one bidirectional Mamba-2 layer's time goes, against the time the 3x-LED target leaves it.

    python benchmarks/mamba2_budget.py --lengths 4096 16384 --threads 1 --scaling-csv SWEEP.csv

Times, forward + backward against a random output gradient, at the `small` encoder's shapes (d_model 256, so
d_inner 512, 8 heads of 64, d_state 64, one group, chunk `mamba2_chunk_size`), float32, best of `--repeats` after a
warm-up:

- the whole mixer (`BiMamba2Mixer`, both directions);
- its parts, each alone at the shapes it has inside the mixer: the input projection (three products with slices of
  its weight), the causal convolution + SiLU and the SSD scan (each twice: once per direction), the gated RMSNorm
  and the output projection. What the parts do not add up to is the glue: the flips, the pads' masking, the skip
  connection and the sum of the two directions.

With `--scaling-csv` (an encoder_scaling.py CSV of the same thread count with `led` and `ffn-only` at these
lengths), the report also gives the mixer's budget: LED's step / 3 / 4 layers is what the target leaves a whole
layer, and the FFN-only encoder's step / 4 layers is what the layer's FFN, norms and residuals take of it.
Writes CSV, markdown and PNG.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from scan_floor import apply_memory_setting, best_time, encoder_times, per_layer_parser, write_rows

from scrolls_ssm.modeling.configuration_scrolls_ssm import ScrollsSSMConfig
from scrolls_ssm.modeling.mixer_mamba2 import BiMamba2Mixer
from scrolls_ssm.modeling.ops import causal_conv1d, mamba2_scan

RESULTS_DIR = Path(__file__).resolve().parent / "results" / "mamba2_budget"
D_MODEL, LAYERS = 256, 4  # the `small` encoder of encoder_scaling.py
PARTS = ["in_proj", "conv_silu_x2", "scan_x2", "gated_norm", "out_proj"]


def fwd_bwd_time(forward, repeats: int) -> float:
    """Seconds of forward() plus its backward against a fixed random gradient of its output."""
    grad = torch.randn_like(forward())
    return best_time(lambda: forward().backward(grad), repeats)


def measure(length: int, repeats: int) -> dict:
    """The mixer's and its parts' forward + backward times at `length` (batch 1)."""
    torch.manual_seed(0)
    config = ScrollsSSMConfig(d_model=D_MODEL, encoder_layers=LAYERS, encoder_layer_types=["mamba2"] * LAYERS)
    mixer = BiMamba2Mixer(config, layer_idx=0)
    heads, head_dim, groups, d_state = mixer.heads, mixer.head_dim, mixer.groups, mixer.d_state

    def leaf(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape) * scale).requires_grad_()

    hidden, mask = leaf(1, length, D_MODEL), torch.ones(1, length, dtype=torch.long)
    # The convolution's input as the mixer passes it: the channels-last view of a (batch, L, channels) tensor.
    conv_in = leaf(1, length, mixer.conv1d.weight.shape[0])
    x, dt = leaf(1, length, heads, head_dim), (torch.rand(1, length, heads) * 0.1).requires_grad_()
    B, C = leaf(1, length, groups, d_state), leaf(1, length, groups, d_state)
    A = -torch.exp(mixer.A_log.detach())
    y, z = leaf(1, length, mixer.d_inner), leaf(1, length, mixer.d_inner)
    in_proj_weights = mixer.in_proj.weight.split(mixer.in_proj_parts)
    forwards = {
        "mixer": lambda: mixer(hidden, mask),
        "in_proj": lambda: torch.cat([F.linear(hidden, w) for w in in_proj_weights], dim=-1),
        "conv_silu_x2": lambda: causal_conv1d(
            conv_in.transpose(1, 2), mixer.conv1d.weight[:, 0], mixer.conv1d.bias, activation="silu"
        ),
        "scan_x2": lambda: mamba2_scan(x, dt, A, B, C, mixer.chunk_size)[0],
        "gated_norm": lambda: mixer.norm(y, z),
        "out_proj": lambda: mixer.out_proj(y),
    }
    row = {"length": length, "chunk_size": mixer.chunk_size}
    for name, forward in forwards.items():
        row[f"{name}_s"] = fwd_bwd_time(forward, repeats) * (2 if name.endswith("_x2") else 1)
    row["glue_s"] = row["mixer_s"] - sum(row[f"{part}_s"] for part in PARTS)
    return row


def add_budgets(rows: list[dict], led: dict[int, float], ffn: dict[int, float]) -> None:
    """The time the 3x-LED target leaves one mixer: LED / 3 / layers, less the FFN-only encoder's share per layer."""
    for row in rows:
        length = row["length"]
        known = length in led and length in ffn
        row["layer_budget_s"] = led[length] / 3 / LAYERS if length in led else ""
        row["ffn_per_layer_s"] = ffn[length] / LAYERS if length in ffn else ""
        row["mixer_budget_s"] = row["layer_budget_s"] - row["ffn_per_layer_s"] if known else ""


def _seconds(value) -> str:
    return f"{value:.2f}" if value != "" else "n/a"


def report(rows: list[dict], command: str, threads: int, out: Path, allocator: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, png_path = (out / f"mamba2_budget.{ext}" for ext in ("csv", "md", "png"))
    write_rows(rows, csv_path)
    lines = [
        "# One bidirectional Mamba-2 layer against the 3x-LED budget",
        "",
        f"`small` encoder shapes (d_inner 512, 8 heads of 64, d_state 64, chunk {rows[0]['chunk_size']}), batch 1, "
        f"float32, forward + backward, {threads} torch thread(s), {allocator}, torch {torch.__version__}, "
        f"{platform.machine()}. "
        f"Generated by `{command}`. Seconds; `x2`: both directions. Mixer budget: LED's step / 3 / {LAYERS} layers, "
        "less the FFN-only encoder's step per layer.",
        "",
        "| length | mixer | " + " | ".join(PARTS) + " | glue | mixer budget (3x LED) | mixer / budget |",
        "|---|---|" + "---|" * len(PARTS) + "---|---|---|",
    ]
    for row in rows:
        ratio = f"{row['mixer_s'] / row['mixer_budget_s']:.2f}x" if row.get("mixer_budget_s", "") != "" else "n/a"
        cells = [f"{row[f'{part}_s']:.2f}" for part in PARTS]
        lines.append(
            f"| {row['length']:,} | {row['mixer_s']:.2f} | " + " | ".join(cells) + f" | {row['glue_s']:.2f} | "
            f"{_seconds(row.get('mixer_budget_s', ''))} | {ratio} |"
        )
    md_path.write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    positions = range(len(rows))
    bottom = [0.0] * len(rows)
    for part in [*PARTS, "glue"]:
        heights = [max(row[f"{part}_s"], 0.0) for row in rows]
        axis.bar(positions, heights, width=0.6, bottom=bottom, label=part)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    budgets = [(i, row["mixer_budget_s"]) for i, row in enumerate(rows) if row.get("mixer_budget_s", "") != ""]
    if budgets:
        axis.scatter(*zip(*budgets, strict=True), marker="_", s=900, color="red", zorder=3, label="3x-LED budget")
    axis.set_xticks(list(positions), [f"{row['length'] // 1024}K" for row in rows])
    axis.set_ylabel("seconds per layer, forward + backward")
    axis.set_title(f"Bidirectional Mamba-2 mixer, {threads} thread(s)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
    return [csv_path, md_path, png_path]


def main(argv: list[str] | None = None) -> list[Path]:
    scaling_help = "an encoder_scaling.py CSV with led and ffn-only at these lengths"
    args = per_layer_parser(__doc__, 3, scaling_help, RESULTS_DIR).parse_args(argv)
    torch.set_num_threads(args.threads)
    allocator = apply_memory_setting(args)
    rows = []
    for length in args.lengths:
        row = measure(length, args.repeats)
        rows.append(row)
        parts = ", ".join(f"{part} {row[f'{part}_s']:.2f}" for part in PARTS)
        print(f"L={length}: mixer {row['mixer_s']:.2f} s ({parts}, glue {row['glue_s']:.2f})", flush=True)
    if args.scaling_csv:
        add_budgets(
            rows,
            encoder_times(args.scaling_csv, args.threads, "led"),
            encoder_times(args.scaling_csv, args.threads, "ffn-only"),
        )
    command = "python benchmarks/mamba2_budget.py " + " ".join(argv if argv is not None else sys.argv[1:])
    paths = report(rows, command.strip(), args.threads, args.out, allocator)
    print("wrote " + ", ".join(str(path) for path in paths))
    return paths


if __name__ == "__main__":
    main()
