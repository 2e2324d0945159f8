"""What a run leaves behind besides the model: the JSONL log, metrics.json, the training curves, the submission CSV
and report.md."""

from __future__ import annotations

import json
from pathlib import Path

from accelerate.tracking import GeneralTracker

from .config import RunConfig
from .evaluation import truncated_split_name
from .submission import build_submission_csv, write_text_atomic


class JSONLTracker(GeneralTracker):
    """An Accelerate tracker that appends every logged dict as one JSON line: always available, easy to plot."""

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)

    @property
    def tracker(self) -> Path:
        return self.path

    def store_init_configuration(self, values: dict) -> None:
        self.log({"config": values}, step=None)

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps({"step": step, **values}, default=str) + "\n")


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_training_curves(log_path: Path, png_path: Path) -> Path:
    """Training loss and validation loss against optimizer steps (+ the eval score when generated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_log(log_path) if r.get("step") is not None]
    series = {
        key: [(r["step"], r[key]) for r in records if key in r] for key in ("train/loss", "eval/loss", "eval/score")
    }
    panels = [key for key in ("train/loss", "eval/score") if series[key]] or ["train/loss"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, key in zip(axes[0], panels, strict=True):
        if key == "train/loss":
            for name in ("train/loss", "eval/loss"):
                if series[name]:
                    steps, values = zip(*series[name], strict=True)
                    ax.plot(steps, values, marker="o" if name == "eval/loss" else None, label=name)
            ax.set_ylabel("cross-entropy")
            if ax.get_legend_handles_labels()[0]:  # a run with no logged step has nothing to label
                ax.legend()
        else:
            steps, values = zip(*series[key], strict=True)
            ax.plot(steps, values, marker="o", label="mean task score")
            ax.set_ylabel("SCROLLS metric")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(png_path)
    return png_path


def write_outputs(out: Path, cfg: RunConfig, results: dict, evaluations: list[dict], raw_train, references) -> None:
    """metrics.json (run and model folder), submission.csv, training_curves.png and report.md. `raw_train` is None
    for a run that read no train split (evaluate / predict): its report has no naive baseline."""
    from .synthetic import naive_baseline

    metrics_text = json.dumps(results, indent=1) + "\n"
    write_text_atomic(out / "metrics.json", metrics_text)
    write_text_atomic(out / "model" / "metrics.json", metrics_text)
    test_dir = out / "predictions" / "test"
    if all((test_dir / f"{task}.json").is_file() for task in cfg.data.tasks) and "test" in cfg.data.predict_splits:
        build_submission_csv(test_dir, out / "submission.csv", tasks=cfg.data.tasks)
    plot_training_curves(out / "log.jsonl", out / "training_curves.png")
    baselines = {
        task: naive_baseline(task, raw_train[task], references[task])
        for task in cfg.data.tasks
        if references[task] and raw_train is not None
    }
    write_text_atomic(out / "report.md", render_report(cfg, results, baselines, evaluations))


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def render_report(cfg: RunConfig, results: dict, baselines: dict, evaluations: list[dict]) -> str:
    split = cfg.data.eval_split
    truncated = cfg.eval.truncated_source_lengths
    lines = [
        f"# Run report: {cfg.recipe}",
        "",
        f"- model: base `{cfg.model.base}`, encoder layers `{cfg.model.encoder_layer_types or 'all attention'}`,"
        f" max source positions {cfg.model.max_source_positions}",
        f"- data: tasks {', '.join(cfg.data.tasks)} from `{cfg.data.data_dir or 'the Hub'}`",
        f"- training: {cfg.train.num_epochs} epoch(s), lr {cfg.train.learning_rate}, "
        f"{cfg.data.max_tokens_per_batch} tokens per batch, mixed precision `{cfg.train.mixed_precision}`",
        "",
        f"## Scores on the {split} split (official SCROLLS metrics)",
        "",
        "| task | metric | model |"
        + "".join(f" model, first {n:,} tokens |" for n in truncated)
        + " naive baseline |",
        "|---|---|---|" + "---|" * len(truncated) + "---|",
    ]
    for task in cfg.data.tasks:
        metrics = results.get(task, {}).get(split)
        if not metrics:
            continue
        columns = [results[task].get(truncated_split_name(split, n), {}) for n in truncated]
        columns.append(baselines.get(task, {}))
        for key, value in metrics.items():
            if key in ("num_predicted", "mean_prediction_length_characters") or value is None:
                continue
            others = "".join(f" {_cell(column.get(key))} |" for column in columns)
            lines.append(f"| {task} | {key} | {value:.2f} |{others}")
    if truncated:
        lines += [
            "",
            f'The "first N tokens" columns score the same model with every {split} input cut to its first N tokens: '
            "what it gains from reading the rest.",
        ]
    lines += [
        "",
        "The naive baseline always predicts the most frequent training answer (see `scrolls_ssm.synthetic`).",
        "",
        "## Evaluations during training",
        "",
        "| epoch | step | validation loss | mean score | best |",
        "|---|---|---|---|---|",
    ]
    for record in evaluations:
        score = record.get("eval/score")
        lines.append(
            f"| {record['epoch']} | {record['step']} | {record['eval/loss']:.4f} | "
            f"{'' if score is None else f'{score:.2f}'} | {'yes' if record['best'] else ''} |"
        )
    lines += ["", "![training curves](training_curves.png)", ""]
    return "\n".join(lines)
