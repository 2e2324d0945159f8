"""Fine-tune and evaluate with Accelerate: one loop, from one CPU to many GPUs.

    output_dir/
      run_config.yaml          the resolved config
      tokenizer/               the run's tokenizer (reused on resume)
      checkpoints/step_N/      resumable state (accelerate save_state + run_state.json), newest `keep` kept
      model/                   the best model so far: loads with AutoModelForSeq2SeqLM.from_pretrained
      log.jsonl                every logged value; training_curves.png is drawn from it
      predictions/<split>/<task>.json, metrics.json, submission.csv, report.md

A checkpoint is written to a hidden temporary folder and renamed into place only when complete, so a run killed at
any moment (even during a save) keeps its last good checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForSeq2SeqLM, get_linear_schedule_with_warmup

from .build import build_model, build_optimizer, build_tokenizer
from .config import RunConfig, RunConfigError
from .data import get_task, group_references, load_scrolls
from .evaluation import EvalSet, generate_predictions, score, validation_loss
from .preprocess import Seq2SeqCollator, TokenBudgetBatchSampler, sequence_lengths, tokenize_for_seq2seq
from .reporting import JSONLTracker, write_outputs
from .submission import write_text_atomic

CHECKPOINT_PREFIX = "step_"
# Test hook, not a feature: `SCROLLS_SSM_TEST_KILL_AT=<point>@<step>` makes the process SIGKILL itself at a named point
# (see `_kill_point` calls), so tests can land a `kill -9` deterministically inside a save or right after one.
TEST_KILL_ENV = "SCROLLS_SSM_TEST_KILL_AT"


@dataclass
class RunState:
    """Where the loop stands; saved in every checkpoint so a resumed run continues mid-epoch exactly."""

    epoch: int = 0
    batches_in_epoch: int = 0
    global_step: int = 0
    skipped_nonfinite: int = 0
    best: float | None = None
    evaluations: list[dict] = field(default_factory=list)


def train(cfg: RunConfig) -> dict:
    """Run the whole recipe: train, evaluate, predict, and write every output. Returns the final metrics."""
    out = Path(cfg.train.output_dir)
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with=_trackers(out),
        project_dir=str(out),
    )
    set_seed(cfg.train.seed)
    resume_from = _find_checkpoint(out, cfg.train.resume) if cfg.train.resume else None
    if resume_from is not None:
        _check_same_model(cfg, resume_from)
    if accelerator.is_main_process:
        write_text_atomic(out / "run_config.yaml", cfg.to_yaml())

    with accelerator.main_process_first():
        data_dir = _materialize_data(cfg)
        raw_train = {task: _load(cfg, task, "train", data_dir) for task in cfg.data.tasks}
        tokenizer = build_tokenizer(
            cfg.model,
            out / "tokenizer",
            lambda: (text for rows in raw_train.values() for column in ("input", "output") for text in rows[column]),
        )
        model = build_model(cfg.model, tokenizer)
        source_limit = model.config.max_source_positions
        train_set, eval_sets, predict_sets = _tokenize_all(cfg, tokenizer, raw_train, data_dir, source_limit)
    collator = Seq2SeqCollator(tokenizer, pad_to_multiple_of=cfg.data.pad_to_multiple_of)
    sampler = TokenBudgetBatchSampler(
        sequence_lengths(train_set), max_tokens=cfg.data.max_tokens_per_batch, shuffle=True, seed=cfg.train.seed
    )
    # A DataLoader draws a base seed whenever an iterator starts; its own generator keeps that draw out of the global
    # RNG, so a resumed run (which starts an iterator right after restoring the RNG) sees the same dropout masks.
    loader_rng = torch.Generator().manual_seed(cfg.train.seed)
    train_loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collator, generator=loader_rng)
    optimizer = build_optimizer(model, cfg)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)

    steps_per_epoch = math.ceil(len(train_loader) / cfg.train.gradient_accumulation_steps)
    total_steps = steps_per_epoch * cfg.train.num_epochs
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    # Stepped once per optimizer step on every process (not prepared, so accelerate does not step it N times).
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.train.warmup_ratio * total_steps), total_steps)
    accelerator.register_for_checkpointing(scheduler)

    state = RunState()
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        state = RunState(**json.loads((resume_from / "run_state.json").read_text()))
        accelerator.print(f"Resumed from {resume_from} (epoch {state.epoch}, step {state.global_step}).")
    accelerator.init_trackers("scrolls_ssm", config=_flat(cfg.to_dict()))

    progress = tqdm(
        total=total_steps, initial=state.global_step, desc="train", disable=not accelerator.is_local_main_process
    )
    running: list[float] = []
    while state.epoch < cfg.train.num_epochs and state.global_step < total_steps:
        train_loader.set_epoch(state.epoch)
        loader = train_loader
        if state.batches_in_epoch:
            loader = accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
            loader.set_epoch(state.epoch)
        model.train()
        for batch in loader:
            batch.pop("row_idx", None)
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                # Skip the step on every process if any process saw a non-finite loss (keeps DDP in step).
                finite = accelerator.reduce(torch.isfinite(loss.detach()).float(), reduction="sum").item()
                if finite == accelerator.num_processes:
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.train.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                    optimizer.step()
                    running.append(loss.item())
                else:
                    state.skipped_nonfinite += 1
                optimizer.zero_grad()
            state.batches_in_epoch += 1
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            state.global_step += 1
            progress.update(1)
            if state.global_step % cfg.train.log_every_steps == 0 and running:
                accelerator.log(
                    {
                        "train/loss": sum(running) / len(running),
                        "train/lr": scheduler.get_last_lr()[0],
                        "train/epoch": state.epoch + state.batches_in_epoch / len(train_loader),
                        "train/skipped_nonfinite": state.skipped_nonfinite,
                    },
                    step=state.global_step,
                )
                progress.set_postfix(loss=f"{sum(running) / len(running):.3f}")
                running.clear()
            epoch_ends = state.batches_in_epoch >= len(train_loader) or state.global_step >= total_steps
            if epoch_ends:
                break
            # An epoch's last step is checkpointed below, after its evaluation: a checkpoint written before it would
            # make a resumed run skip that evaluation (and the best model it may save).
            if cfg.train.checkpoint_every_steps and state.global_step % cfg.train.checkpoint_every_steps == 0:
                save_checkpoint(accelerator, out, state, cfg)
        state.epoch += 1
        state.batches_in_epoch = 0
        _evaluate(cfg, accelerator, model, tokenizer, collator, eval_sets, state, out)
        save_checkpoint(accelerator, out, state, cfg)
    progress.close()
    if not state.evaluations:  # no training step (evaluate / predict, max_steps=0): the model as it came in
        _save_model(accelerator, model, tokenizer, cfg, out)
    accelerator.wait_for_everyone()

    # Final predictions and scores come from the best model.
    best = AutoModelForSeq2SeqLM.from_pretrained(out / "model").to(accelerator.device)
    results = _predict_and_score(cfg, accelerator, best, tokenizer, collator, eval_sets, predict_sets, out)
    if accelerator.is_main_process:
        write_outputs(out, cfg, results, state.evaluations, raw_train, {s.task: s.references for s in eval_sets})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


# --- data -----------------------------------------------------------------------------------------------------------


def _materialize_data(cfg: RunConfig) -> str | None:
    """The data location; the synthetic demo data is written there first when the recipe asks for it."""
    if cfg.data.synthetic is None:
        return cfg.data.data_dir
    if cfg.data.data_dir is None:
        raise RunConfigError("data.synthetic needs data.data_dir: the folder the synthetic dataset is written to.")
    from .synthetic import write_synthetic_scrolls

    # The settings are kept beside the data: the same settings reuse it, other settings write it anew.
    marker = Path(cfg.data.data_dir) / "synthetic.json"
    settings = json.dumps(cfg.data.synthetic, sort_keys=True)
    if not marker.is_file() or marker.read_text() != settings:
        write_synthetic_scrolls(cfg.data.data_dir, **cfg.data.synthetic)
        write_text_atomic(marker, settings)
    return cfg.data.data_dir


def _load(cfg: RunConfig, task: str, split: str, data_dir: str | None) -> datasets.Dataset:
    rows = load_scrolls(task, split, data_files=data_dir, cache_dir=cfg.data.cache_dir)
    limit = cfg.data.max_train_samples if split == "train" else cfg.data.max_eval_samples
    return rows.select(range(min(limit, len(rows)))) if limit is not None else rows


def _tokenize_all(cfg: RunConfig, tokenizer, raw_train, data_dir, source_limit: int):
    """Tokenized training rows of every task (concatenated) and the evaluation / prediction sets per task."""
    train_parts, eval_sets, predict_sets = [], [], []
    for task in cfg.data.tasks:
        spec = get_task(task)
        # Inputs longer than the encoder's learned positions are truncated here, never in the model.
        source_len = min(cfg.data.max_source_length or spec.max_source_length, source_limit)
        if cfg.data.pad_to_multiple_of:
            source_len -= source_len % cfg.data.pad_to_multiple_of  # padding must not push past the limit either
        target_len = cfg.data.max_target_length or spec.max_target_length

        def tokenize(rows, source_len=source_len, target_len=target_len, task=task):
            return tokenize_for_seq2seq(rows, tokenizer, source_len, target_len, task=task, num_proc=cfg.data.num_proc)

        train_parts.append(tokenize(raw_train[task]).select_columns(["input_ids", "attention_mask", "labels"]))
        max_new = cfg.eval.max_new_tokens or get_task(task).max_new_tokens
        for split in dict.fromkeys([cfg.data.eval_split, *cfg.data.predict_splits]):
            rows = _load(cfg, task, split, data_dir)
            grouped, references = group_references(rows)
            has_outputs = any(references.values())
            eval_set = EvalSet(
                task, split, tokenize(rows) if has_outputs else None, tokenize(grouped), references, max_new
            )
            (eval_sets if split == cfg.data.eval_split else predict_sets).append(eval_set)
    return datasets.concatenate_datasets(train_parts), eval_sets, predict_sets


# --- evaluation during training ---------------------------------------------------------------------------------


def _evaluate(cfg, accelerator, model, tokenizer, collator, eval_sets, state: RunState, out: Path) -> None:
    """Validation loss every epoch; generation + SCROLLS metrics when configured; keeps the best model."""
    unwrapped = accelerator.unwrap_model(model)
    record: dict = {"epoch": state.epoch, "step": state.global_step}
    losses = [
        validation_loss(unwrapped, s.loss_rows, accelerator, collator, cfg.eval.max_tokens_per_batch)
        for s in eval_sets
        if s.loss_rows is not None
    ]
    record["eval/loss"] = sum(losses) / len(losses) if losses else float("nan")
    every = cfg.eval.generate_every_epochs
    if cfg.eval.best_metric == "score" or (every and state.epoch % every == 0):
        scores = []
        for eval_set in eval_sets:
            predictions = generate_predictions(
                unwrapped,
                eval_set,
                tokenizer,
                accelerator,
                collator,
                cfg.eval.max_tokens_per_batch,
                cfg.eval.num_beams,
            )
            metrics = score(eval_set, predictions)
            record.update(
                {f"eval/{eval_set.task}/{key}": value for key, value in metrics.items() if value is not None}
            )
            scores.append(metrics["scrolls_score"])
        record["eval/score"] = sum(scores) / len(scores)
    model.train()
    accelerator.log({k: v for k, v in record.items() if k.startswith("eval/")}, step=state.global_step)
    accelerator.print(f"epoch {state.epoch}: " + ", ".join(f"{k}={v:.4f}" for k, v in record.items() if "/" in k))
    value = record["eval/loss"] if cfg.eval.best_metric == "loss" else record["eval/score"]
    better = state.best is None or (value < state.best if cfg.eval.best_metric == "loss" else value > state.best)
    record["best"] = bool(better)
    state.evaluations.append(record)
    if better:
        state.best = value
        _save_model(accelerator, model, tokenizer, cfg, out)


def _predict_and_score(cfg, accelerator, model, tokenizer, collator, eval_sets, predict_sets, out: Path) -> dict:
    results: dict = {}
    for eval_set in [*eval_sets, *predict_sets]:  # the eval split plus every predict split, each once
        predictions = generate_predictions(
            model, eval_set, tokenizer, accelerator, collator, cfg.eval.max_tokens_per_batch, cfg.eval.num_beams
        )
        entry = results.setdefault(eval_set.task, {})
        if any(eval_set.references.values()):
            entry[eval_set.split] = score(eval_set, predictions)
        if accelerator.is_main_process:
            path = out / "predictions" / eval_set.split / f"{eval_set.task}.json"
            write_text_atomic(path, json.dumps(predictions, ensure_ascii=False, indent=1) + "\n")
    return results


# --- checkpoints ----------------------------------------------------------------------------------------------------


def save_checkpoint(accelerator: Accelerator, out: Path, state: RunState, cfg: RunConfig) -> Path:
    """Write a resumable checkpoint atomically (temporary folder, then rename) and keep the newest `keep`."""
    root = out / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{state.global_step:08d}"
    tmp = root / f".tmp-{final.name}"
    if final.exists():  # e.g. an epoch ended on a step that was just checkpointed
        return final
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # save_state has no barrier of its own
    if accelerator.is_main_process:
        write_text_atomic(tmp / "run_state.json", json.dumps(asdict(state), indent=1))
        write_text_atomic(tmp / "run_config.yaml", cfg.to_yaml())
        _kill_point("checkpoint-writing", state.global_step)
        tmp.rename(final)
        for stale in _checkpoints(out)[: -cfg.train.keep_checkpoints]:
            shutil.rmtree(stale)
        _kill_point("checkpoint-saved", state.global_step)
    accelerator.wait_for_everyone()
    return final


def _checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written ones live in hidden .tmp- folders and are ignored)."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / "run_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def _find_checkpoint(out: Path, resume: str) -> Path:
    if resume != "latest":
        path = Path(resume)
        if not (path / "run_state.json").is_file():
            raise RunConfigError(
                f"train.resume={resume!r} is not a complete checkpoint (no run_state.json there). Use 'latest' or "
                f"one of: {[str(p) for p in _checkpoints(out)] or 'none found under ' + str(out / 'checkpoints')}."
            )
        return path
    found = _checkpoints(out)
    if not found:
        raise RunConfigError(
            f"train.resume='latest' but {out / 'checkpoints'} holds no complete checkpoint; start without resume."
        )
    return found[-1]


def _check_same_model(cfg: RunConfig, checkpoint: Path) -> None:
    saved = yaml.safe_load((checkpoint / "run_config.yaml").read_text())
    if saved["model"] != cfg.to_dict()["model"]:
        changed = sorted(k for k in saved["model"] if saved["model"][k] != cfg.to_dict()["model"].get(k))
        raise RunConfigError(
            f"checkpoint {checkpoint} was written by a run with a different model (model.{', model.'.join(changed)} "
            "differ). Resume with the same model settings, or start a new run in another train.output_dir."
        )


def _save_model(accelerator: Accelerator, model, tokenizer, cfg: RunConfig, out: Path) -> None:
    """Replace `out/model` with the current weights, the tokenizer and the run config, atomically."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp, final, old = out / ".tmp-model", out / "model", out / ".old-model"
        for stale in (tmp, old):
            if stale.exists():
                shutil.rmtree(stale)
        accelerator.unwrap_model(model).save_pretrained(tmp, is_main_process=True)
        tokenizer.save_pretrained(tmp)
        write_text_atomic(tmp / "run_config.yaml", cfg.to_yaml())
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        if old.exists():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _kill_point(point: str, step: int) -> None:
    """SIGKILL this process if the test hook `TEST_KILL_ENV` names this point and step (e.g. `checkpoint-saved@8`)."""
    if os.environ.get(TEST_KILL_ENV) == f"{point}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _trackers(out: Path) -> list:
    trackers: list = [JSONLTracker(out / "log.jsonl")]
    if importlib.util.find_spec("tensorboard") is not None:
        trackers.append("tensorboard")
    return trackers


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = (
                value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
            )
    return flat
