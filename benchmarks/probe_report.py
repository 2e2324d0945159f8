"""Writes a long-range probe sweep (see long_range_probe.py) as a CSV, a markdown report and one heatmap per task."""

from __future__ import annotations

import csv
import datetime
import platform
from collections import defaultdict
from pathlib import Path

FIELDS = ["contender", "task", "length", "depth", "exact_match", "rows", "status", "note", "seconds", "steps"]


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _by_cell(rows: list[dict]) -> dict[tuple[str, str], dict[int, list[float]]]:
    """(contender, task) -> length -> exact match of every depth."""
    table: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["status"] == "ok" and row["contender"] != "naive":
            table[(row["contender"], row["task"])][int(row["length"])].append(float(row["exact_match"]))
    return table


def write_markdown(rows: list[dict], path: Path, meta: dict) -> None:
    table = _by_cell(rows)
    tasks = list(dict.fromkeys(row["task"] for row in rows if row.get("task")))
    contenders = list(dict.fromkeys(row["contender"] for row in rows if row["contender"] != "naive"))
    lengths = sorted({length for cells in table.values() for length in cells})
    naive = {row["task"]: row["exact_match"] for row in rows if row["contender"] == "naive"}
    lines = [
        "# Long-range probe: exact match by task, contender and input length (mean over needle depths)",
        "",
        f"`{meta['command']}` on {platform.node()} ({platform.processor() or platform.machine()}), "
        f"{datetime.date.today().isoformat()}.",
        "",
        "Setup: " + ", ".join(f"{key}={value}" for key, value in meta.items() if key != "command") + ".",
        "",
    ]
    for task in tasks:
        lines += [f"## {task} (naive baseline {naive.get(task, '-')})", ""]
        lines += ["| contender | " + " | ".join(f"{length:,}" for length in lengths) + " | train+eval s |"]
        lines += ["|---" * (len(lengths) + 2) + "|"]
        for contender in contenders:
            status = next((row for row in rows if row["contender"] == contender), {})
            if status.get("status") != "ok":
                lines.append(f"| {contender} | {status.get('status', '-')}: {status.get('note', '')} |")
                continue
            cells = table[(contender, task)]
            values = [f"{sum(cells[n]) / len(cells[n]):.1f}" if cells.get(n) else "-" for n in lengths]
            lines.append(f"| {contender} | " + " | ".join(values) + f" | {status.get('seconds', '')} |")
        lines.append("")
    trained = contender_seconds(rows)
    total = sum(trained.values())
    lines += [f"Train + eval time of the {len(trained)} contenders in all: {total:,.0f} s ({total / 60:.0f} min).", ""]
    path.write_text("\n".join(lines))


FIRST_TOKENS = " (first {tokens})"  # ends the name of a contender's own model scored on its inputs' first tokens


def first_tokens_name(contender: str, tokens: int) -> str:
    """The name of the rows that score `contender`'s model reading only the first `tokens` tokens of every input."""
    return contender + FIRST_TOKENS.format(tokens=tokens)


def contender_seconds(rows: list[dict]) -> dict[str, float]:
    """Each trained contender's train + eval seconds. The rows of a model reading only its inputs' first tokens
    (`first_tokens_name`) carry their contender's time and are not counted twice."""
    marker = FIRST_TOKENS.split("{")[0]
    return {
        row["contender"]: float(row["seconds"])
        for row in rows
        if row.get("seconds") not in (None, "") and marker not in row["contender"]
    }


def write_heatmaps(rows: list[dict], out: Path, stem: str) -> list[Path]:
    """One PNG per task: a panel per contender, exact match over input length (x) and needle depth (y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [row for row in rows if row["status"] == "ok" and row["contender"] != "naive"]
    paths = []
    for task in dict.fromkeys(row["task"] for row in ok):
        lengths, depths, grids = heatmap_grids(ok, task)
        figure, axes = plt.subplots(1, len(grids), figsize=(2.2 * len(grids) + 1, 2.8), squeeze=False)
        for axis, (contender, grid) in zip(axes[0], grids.items(), strict=True):
            image = axis.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto", origin="upper")
            axis.set_title(contender, fontsize=9)
            axis.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
            axis.set_yticks(range(len(depths)), [f"{d}%" if d != "all" else "all" for d in depths])
            axis.tick_params(labelleft=axis is axes[0][0])  # depth labels once, on the left
            axis.set_xlabel("input tokens", fontsize=8)
        axes[0][0].set_ylabel("needle depth", fontsize=8)
        figure.colorbar(image, ax=axes[0].tolist(), label="exact match (%)")
        figure.suptitle(f"long-range probe: {task}", fontsize=10, y=1.06)
        path = out / f"{stem}_{task}.png"
        figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(figure)
        paths.append(path)
    return paths


def heatmap_grids(rows: list[dict], task: str) -> tuple[list[int], list[str], dict[str, list[list[float]]]]:
    """A task's input lengths, needle depths and, per contender, exact match over (depth, length) (NaN where not
    measured). Rows kept from an earlier CSV (--resume) hold their numbers as text, fresh rows as numbers: both read
    the same here."""
    task_rows = [row for row in rows if row["task"] == task]
    lengths = sorted({int(row["length"]) for row in task_rows})
    depths = sorted({str(row["depth"]) for row in task_rows}, key=lambda d: -1 if d == "all" else int(d))
    grids: dict[str, list[list[float]]] = {}
    for row in task_rows:
        grid = grids.setdefault(row["contender"], [[float("nan")] * len(lengths) for _ in depths])
        grid[depths.index(str(row["depth"]))][lengths.index(int(row["length"]))] = float(row["exact_match"])
    return lengths, depths, grids


def write_outputs(rows: list[dict], out: Path, stem: str, meta: dict, plot: bool) -> list[Path]:
    csv_path, md_path = out / f"{stem}.csv", out / f"{stem}.md"
    write_csv(rows, csv_path)
    write_markdown(rows, md_path, meta)
    return [csv_path, md_path, *(write_heatmaps(rows, out, stem) if plot else [])]
