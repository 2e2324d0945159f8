"""The `scrolls-ssm` command line.

Each subcommand is one `add_parser` call in `_build_parser()` plus one `_run_<name>(args) -> int` function set
as its `func`; `main` parses and dispatches. A user error (see `scrolls_ssm.errors`: a bad key, value, file or
unreachable Hub id, whose message already names it and the fix) is printed as one line with exit status 2, like
argparse's own usage errors; `--debug` (before or after the subcommand) shows its traceback instead. Anything else is
a bug and keeps its traceback. `run_finetune.py` is the `train` subcommand on its own parser (`run_finetune_main`).

    scrolls-ssm score --task qasper --predictions preds/qasper.json --references data/qasper.zip
    scrolls-ssm submit --predictions-dir preds --output submission.csv --references-dir data
    scrolls-ssm train --recipe recipes/qasper.yaml model.encoder_layer_types=[s4d,s4d,s4d,s4d,s4d,attention]
    scrolls-ssm evaluate --model runs/qasper/model --recipe recipes/qasper.yaml
    scrolls-ssm predict --model runs/qasper/model --recipe recipes/qasper.yaml --split test
    scrolls-ssm push --model-dir runs/qasper/model --repo-id me/bart-base-s4d-qasper
    scrolls-ssm convert --base facebook/bart-base --layers s4d,s4d,s4d,s4d,s4d,attention --out bart-base-s4d \\
        --transfer-data qasper/train.jsonl --transfer-steps 2000
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from scrolls_ssm.data import SCORED_TASKS, SPLITS, TASKS, group_references, load_scrolls
from scrolls_ssm.errors import USER_ERRORS, one_line
from scrolls_ssm.metrics import compute_scrolls_metrics
from scrolls_ssm.submission import (
    build_submission_csv,
    read_predictions,
    read_submission_csv,
    split_ids,
    write_text_atomic,
)


def format_metrics(task: str, split: str, metrics: Mapping[str, object]) -> str:
    """The metric table printed by `score`: one `key value` line per official key."""
    width = max(len(key) for key in metrics)
    lines = [f"{task} ({split})"]
    lines += [f"  {key:<{width}}  {'-' if value is None else value}" for key, value in metrics.items()]
    return "\n".join(lines)


def _run_score(args: argparse.Namespace) -> int:
    rows = load_scrolls(args.task, args.split, data_files=args.references, cache_dir=args.cache_dir)
    _, references = group_references(rows)
    predictions = read_predictions(args.predictions)
    metrics = compute_scrolls_metrics(args.task, predictions, references, num_proc=args.num_proc)
    print(format_metrics(args.task, args.split, metrics))
    if args.output:
        record = {"task": args.task, "split": args.split, **metrics}
        write_text_atomic(args.output, json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


def _run_submit(args: argparse.Namespace) -> int:
    expected = None
    if args.references_dir is not None:
        expected = {task: split_ids(task, args.references_dir, args.split) for task in SCORED_TASKS}
    else:
        print("note: no --references-dir, so ids are not checked against the split", file=sys.stderr)
    path = build_submission_csv(args.predictions_dir, args.output, expected_ids=expected)
    counts = {task: len(rows) for task, rows in read_submission_csv(path).items()}
    print(f"wrote {path}: " + ", ".join(f"{task} {count}" for task, count in counts.items()))
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from scrolls_ssm.config import load_run_config
    from scrolls_ssm.train import train

    train(load_run_config(args.recipe, _train_overrides(args)))
    return 0


def _train_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides of `train`, with `--resume [PATH]` as `train.resume=auto|PATH` (the config key it stands for)."""
    overrides = list(args.overrides)
    if args.resume is None:
        return overrides
    if "=" in args.resume:  # `--resume key=value ...`: argparse took the first override for the optional PATH
        return [args.resume, *overrides, "train.resume=auto"]
    return [*overrides, f"train.resume={args.resume}"]


class CommandLineError(ValueError):
    """A command-line option whose value cannot be used; the message names the option, the value and the fix."""


def _check_model_folder(option: str, value: str) -> None:
    """`--model` must be a folder written by `save_pretrained` (a training run's `model/`), checked before any work."""
    path = Path(value).expanduser()
    expected = (
        "the model/ folder a training run wrote (it holds config.json and model.safetensors), e.g. runs/qasper/model"
    )
    if not path.exists():
        raise CommandLineError(f"{option} {value}: no such folder. Pass {expected}.")
    if not path.is_dir():
        raise CommandLineError(f"{option} {value}: is a file, not a folder. Pass {expected}.")
    if not (path / "config.json").is_file():
        raise CommandLineError(f"{option} {value}: has no config.json, so it is not a saved model. Pass {expected}.")
    try:
        model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, AttributeError):
        raise CommandLineError(f"{option} {value}: its config.json is not a JSON object. Pass {expected}.") from None
    if model_type != "scrolls_ssm":
        raise CommandLineError(
            f"{option} {value}: holds a model of type {model_type!r}, not a scrolls_ssm model. Pass {expected}; "
            "to fine-tune a BART / LED checkpoint, train with model.base=<it> instead."
        )


def _run_evaluate(args: argparse.Namespace) -> int:
    """Evaluate (or, for `predict`, only predict) a trained model: the training loop with zero steps."""
    from scrolls_ssm.config import load_run_config
    from scrolls_ssm.train import train

    _check_model_folder("--model", args.model)
    split = args.split
    fixed = [
        f"model.init_from={args.model}",
        "train.max_steps=0",
        f"data.eval_split={split}",
        f"data.predict_splits=[{split}]",
        f"train.output_dir={args.output_dir or Path(args.model).parent / f'{args.command}-{split}'}",
    ]
    if args.output_dir is None:  # the default folder only ever holds this command's earlier outputs: replace them
        fixed.append("train.overwrite_output_dir=true")
    train(load_run_config(args.recipe, [*fixed, *args.overrides]))  # it prints the metrics and the output folder
    return 0


def _run_push(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from scrolls_ssm.hub import run_push

    try:
        validate_repo_id(args.repo_id)
    except HFValidationError as error:
        raise CommandLineError(
            f"--repo-id {args.repo_id!r} is not a Hub repo id ({one_line(error)}). Fix: write it as owner/name, "
            "e.g. your-name/bart-base-s4d-gov-report."
        ) from None
    return run_push(args)


def _config_settings(pairs: Sequence[str]) -> dict:
    """`--config KEY=VALUE ...` as config fields (values parsed as YAML); an unknown key is an error, not ignored."""
    import yaml

    from scrolls_ssm.modeling.configuration_scrolls_ssm import ScrollsSSMConfig

    fields = ScrollsSSMConfig.__dataclass_fields__
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise CommandLineError(f"--config {pair!r}: expected KEY=VALUE, e.g. mamba2_ngroups=12.")
        if key not in fields or key in ("encoder_layer_types", "max_source_positions", "encoder_positions"):
            raise CommandLineError(
                f"--config {pair!r}: {key!r} is not a setting --config can change. Fix: one of the mixer fields in "
                "docs/mixers.md (e.g. s4d_d_state, mamba2_ngroups); layers and positions have their own options."
            )
        settings[key] = yaml.safe_load(value)
    return settings


def _run_convert(args: argparse.Namespace) -> int:
    """Swap a BART, LED or T5-family checkpoint's encoder and, with --transfer-data, transfer its attention into the
    new mixers."""
    import shutil

    import torch
    from huggingface_hub.errors import StrictDataclassError

    from scrolls_ssm.config import TransferConfig
    from scrolls_ssm.convert import swap_encoder
    from scrolls_ssm.modeling import MIXER_KINDS
    from scrolls_ssm.transfer import attention_teacher, read_documents, reuse_attention_weights, run_transfer

    layers = [kind.strip() for kind in args.layers.split(",")]
    unknown = [kind for kind in layers if kind not in MIXER_KINDS]
    if unknown:
        raise CommandLineError(
            f"--layers {args.layers}: unknown mixer kind(s) {unknown}. Fix: one of {', '.join(MIXER_KINDS)} per "
            "encoder layer, comma-separated, e.g. --layers s4d,s4d,s4d,s4d,s4d,attention."
        )
    if args.reuse_weights and not {"mamba", "mamba2"} & set(layers):
        raise CommandLineError(
            f"--reuse-weights: --layers {args.layers} has no mamba or mamba2 layer, the only kinds with a weight "
            "map. Fix: drop --reuse-weights or swap some layers to mamba or mamba2."
        )
    if args.distill_steps and not args.transfer_data:
        raise CommandLineError("--distill-steps distills on documents. Fix: give them with --transfer-data.")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise CommandLineError(f"--out {out}: the folder is not empty. Fix: another --out, or --overwrite.")
    documents = read_documents(args.transfer_data) if args.transfer_data else None
    torch.manual_seed(args.seed)  # the new mixers' initialization
    overrides = {"encoder_positions": args.encoder_positions, **_config_settings(args.config)}
    try:
        model, tokenizer = swap_encoder(
            args.base, layers, max_source_positions=args.max_source_positions, return_tokenizer=True, **overrides
        )
    except StrictDataclassError as error:  # a --config value the model's config rejects
        text = " ".join(str(error.__cause__ or error).split())
        raise CommandLineError(f"--config: {text} Fix: change that value in --config.") from error
    report = {"base": args.base, "layers": layers, "max_source_positions": args.max_source_positions}
    # The stages' checkpoints live beside --out until it is written: the same command, run again, resumes them.
    state_dir = out.with_name(f".{out.name}.transfer-state")
    if documents is None and args.reuse_weights:
        report["reused_weights_in_layers"] = reuse_attention_weights(model, attention_teacher(args.base, model))
    elif documents is not None:
        settings = TransferConfig(
            steps=args.transfer_steps,
            learning_rate=args.transfer_lr,
            reuse_weights=args.reuse_weights,
            teacher_window=args.teacher_window,
            distill_steps=args.distill_steps,
            distill_learning_rate=args.distill_lr,
            distill_train=args.distill_train,
            checkpoint_every_steps=args.checkpoint_every_steps,
            batches_per_step=args.batches_per_step,
        )
        report.update(
            run_transfer(
                model,
                args.base,
                tokenizer,
                documents,
                settings,
                max_length=args.transfer_max_length or args.max_source_positions,
                max_tokens_per_batch=args.transfer_tokens_per_batch,
                seed=args.seed,
                work_dir=state_dir,
                report_batches=args.report_batches,
            )
        )
        before, after = report["relative_error_before"], report["relative_error_after"]
        for index in before:
            print(f"layer {index} ({layers[index]}): relative error {before[index]:.4f} -> {after[index]:.4f}")
        print(f"encoder output cosine to the original: {report['encoder_cosine_before']:.4f} -> "
              f"{report['encoder_cosine_after']:.4f}")  # fmt: skip
        if "distillation" in report:
            loss = report["distillation"]["denoising_loss"]
            print(
                f"denoising loss: {loss['before']:.4f} -> {loss['after']:.4f} (the original: {loss['original']:.4f})"
            )
    staging = out.with_name(f".{out.name}.converting")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    write_text_atomic(staging / "conversion.json", json.dumps(report, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)  # the folder appears whole or not at all
    shutil.rmtree(state_dir, ignore_errors=True)
    print(f"wrote {out} (fine-tune it with model.init_from={out})")
    return 0


def _positive_int(text: str) -> int:
    """argparse type for counts: an int >= 1 (argparse reports the option and the value on failure)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is out of range: it must be >= 1")
    return value


_DEBUG_HELP = "show the traceback of an error instead of a one-line message"


def _add_debug_argument(parser: argparse.ArgumentParser, default: object = False) -> None:
    parser.add_argument("--debug", action="store_true", default=default, help=_DEBUG_HELP)


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default=None, help="a recipe YAML, e.g. recipes/qasper.yaml")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.learning_rate=1e-4"
    )


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `train`, shared by `scrolls-ssm train` and `run_finetune.py` (add new train options here)."""
    _add_run_arguments(parser)
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="PATH",
        help="continue the run in train.output_dir: alone, its newest checkpoint (or a fresh start if it has none); "
        "with PATH, that checkpoint. Same as train.resume=auto|PATH",
    )
    parser.set_defaults(func=_run_train)


_TRAIN_DESCRIPTION = "Train with Accelerate: defaults < recipe YAML < key=value overrides. See docs/training.md."


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scrolls-ssm", description="Long-document seq2seq on SCROLLS.")
    _add_debug_argument(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    score = commands.add_parser(
        "score",
        help="score a {id: prediction} JSON with the official SCROLLS metric",
        description="Score predictions against a split's references with the official-equivalent metric.",
    )
    score.add_argument("--task", required=True, choices=list(TASKS))
    score.add_argument("--predictions", required=True, help="JSON object {id: prediction}")
    score.add_argument(
        "--references",
        required=True,
        help="the official <task>.zip, a folder with <split>.jsonl or <task>/<split>.jsonl, or a JSONL/parquet file",
    )
    score.add_argument("--split", default="validation", choices=[s for s in SPLITS if s != "test"])
    score.add_argument("--output", help="also write the metrics as JSON here")
    score.add_argument(
        "--num-proc", type=_positive_int, default=None, help="processes for ROUGE (summarization tasks)"
    )
    score.add_argument("--cache-dir", default=None, help="cache for validated data (default: datasets cache)")
    score.set_defaults(func=_run_score)

    submit = commands.add_parser(
        "submit",
        help="build the leaderboard CSV from per-task prediction JSONs",
        description=f"Build Task,ID,Prediction CSV from <dir>/<task>.json for {', '.join(SCORED_TASKS)}.",
    )
    submit.add_argument("--predictions-dir", required=True, help="folder holding <task>.json per task")
    submit.add_argument("--output", required=True, help="CSV to write")
    submit.add_argument(
        "--references-dir",
        default=None,
        help="folder with the official <task>.zip files (or <task>/<split>.jsonl) to check ids against",
    )
    submit.add_argument("--split", default="test", choices=list(SPLITS), help="split whose ids must be covered")
    submit.set_defaults(func=_run_submit)

    train = commands.add_parser(
        "train",
        help="fine-tune and evaluate a recipe (accelerate launch for several processes)",
        description=_TRAIN_DESCRIPTION,
    )
    _add_train_arguments(train)
    for name, split, what in (("evaluate", "validation", "score"), ("predict", "test", "predict")):
        sub = commands.add_parser(
            name, help=f"{what} a trained model on a split", description=f"{what.capitalize()} a trained model."
        )
        sub.add_argument("--model", required=True, help="a trained model folder (e.g. runs/qasper/model)")
        sub.add_argument("--split", default=split, choices=list(SPLITS))
        sub.add_argument("--output-dir", default=None, help="where outputs go (default: beside the model)")
        _add_run_arguments(sub)
        sub.set_defaults(func=_run_evaluate)

    convert = commands.add_parser(
        "convert",
        help="swap a BART / LED checkpoint's encoder, optionally transferring its attention into the new mixers",
        description="Swap the encoder of a BART / LED checkpoint layer by layer and save it; with --transfer-data, "
        "first train every new mixer to reproduce the attention layer it replaces (docs/transfer.md).",
    )
    convert.add_argument("--base", required=True, help="a BART, LED or T5-family checkpoint: local folder or Hub id")
    convert.add_argument("--layers", required=True, help="one mixer kind per encoder layer, e.g. s4d,s4d,attention")
    convert.add_argument("--out", required=True, help="the folder to write (model, tokenizer, conversion.json)")
    convert.add_argument("--max-source-positions", type=_positive_int, default=16384, help="encoder length limit")
    convert.add_argument(
        "--encoder-positions",
        choices=["learned", "none"],
        default="learned",
        help="keep the learned position table (tiled) or drop it (state-space layouts; see docs/architecture.md)",
    )
    convert.add_argument(
        "--config",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="mixer settings of the new model, e.g. mamba2_ngroups=12 mamba2_d_state=64 (docs/mixers.md)",
    )
    convert.add_argument("--transfer-data", nargs="+", help="SCROLLS .jsonl files (their inputs) or text files")
    convert.add_argument("--transfer-steps", type=_positive_int, default=1000, help="optimizer steps of transfer")
    convert.add_argument("--transfer-lr", type=float, default=1e-3, help="learning rate of transfer")
    convert.add_argument(
        "--transfer-max-length", type=_positive_int, default=None, help="tokens per document (default: the limit)"
    )
    convert.add_argument("--transfer-tokens-per-batch", type=_positive_int, default=16384, help="batch token budget")
    convert.add_argument(
        "--batches-per-step",
        type=_positive_int,
        default=None,
        help="batches averaged per optimizer step of both stages (default: one per process)",
    )
    convert.add_argument(
        "--teacher-window", type=_positive_int, default=None, help="block-local teacher attention (default: full)"
    )
    convert.add_argument(
        "--report-batches", type=_positive_int, default=4, help="batches the before/after errors are measured on"
    )
    convert.add_argument(
        "--reuse-weights",
        action="store_true",
        help="initialize mamba and mamba2 layers from the attention they replace (x<-V, B<-K, C<-Q, out<-O) "
        "before transfer",
    )
    convert.add_argument(
        "--distill-steps",
        type=_positive_int,
        default=0,
        help="after transfer, steps distilling the original's outputs on text-infilled documents (default 0: none)",
    )
    convert.add_argument("--distill-lr", type=float, default=1e-4, help="learning rate of distillation")
    convert.add_argument(
        "--distill-train",
        choices=["mixers", "encoder", "all"],
        default="mixers",
        help="the parameters distillation trains (default: the new mixers only)",
    )
    convert.add_argument(
        "--checkpoint-every-steps",
        type=_positive_int,
        default=None,
        help="save the stages' state every N steps; the same command, run again, resumes it",
    )
    convert.add_argument("--seed", type=int, default=0, help="seed of the new mixers and of the batch order")
    convert.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    convert.set_defaults(func=_run_convert)

    from scrolls_ssm.hub import add_push_arguments

    push = commands.add_parser(
        "push", help="upload a trained model with its model card to the Hub", description="Push to the Hub."
    )
    add_push_arguments(push)
    push.set_defaults(func=_run_push)
    for subparser in commands.choices.values():
        # SUPPRESS: a subcommand without --debug keeps the value the top-level parser set.
        _add_debug_argument(subparser, default=argparse.SUPPRESS)
    return parser


def _dispatch(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, label: Callable[[argparse.Namespace], str]
) -> int:
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as error:
        if args.debug:
            raise
        print(f"{label(args)}: error: {one_line(error)}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """`scrolls-ssm`: exit status 0 on success, 2 for a user error (one line on stderr), a traceback for a bug."""
    return _dispatch(_build_parser(), argv, lambda args: f"scrolls-ssm {args.command}")


def run_finetune_main(argv: Sequence[str] | None = None, prog: str = "run_finetune.py") -> int:
    """`python run_finetune.py [--debug] --recipe ... [key=value ...]`: the `train` subcommand under its own name."""
    parser = argparse.ArgumentParser(prog=prog, description=_TRAIN_DESCRIPTION)
    _add_debug_argument(parser)
    _add_train_arguments(parser)
    return _dispatch(parser, argv, lambda args: prog)


if __name__ == "__main__":
    sys.exit(main())
