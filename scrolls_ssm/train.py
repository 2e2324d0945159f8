"""Fine-tune and evaluate with Accelerate: one loop, from one CPU to many GPUs.

    output_dir/
      .lock                    the pid of the process running there (removed at the end)
      run_config.yaml          the resolved config
      tokenizer/               the run's tokenizer (reused on resume)
      checkpoints/step_N/      resumable state (accelerate save_state + run_state.json), newest `keep` kept
      model/                   the best model so far: loads with AutoModelForSeq2SeqLM.from_pretrained
      log.jsonl                every logged value; training_curves.png is drawn from it
      predictions/<split>/<task>.json, metrics.json, submission.csv, report.md

One run per folder (see run_folder.py): a used folder is resumed (`train.resume`) or cleared
(`train.overwrite_output_dir`), never mixed into. Checkpoints and the model are written to hidden temporary folders and
renamed into place when complete (see checkpointing.py), and an epoch's last step is checkpointed after its
evaluation, so a run killed at any moment and resumed ends with the same files as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForSeq2SeqLM, get_linear_schedule_with_warmup

from .build import build_model, build_optimizer, build_tokenizer, encoder_length_limit, uses_global_attention
from .checkpointing import RunState, kill_point, load_checkpoint, save_checkpoint, save_model
from .config import RunConfig, RunConfigError
from .cpu_memory import retain_freed_memory
from .data import get_task, group_references, load_scrolls
from .evaluation import EvalSet, generate_predictions, score, truncated_split_name, validation_loss
from .preprocess import Seq2SeqCollator, TokenBudgetBatchSampler, sequence_lengths, tokenize_for_seq2seq
from .reporting import JSONLTracker, write_outputs
from .run_folder import RunFolderLock, prepare_run_folder, truncate_log
from .submission import write_text_atomic


def train(cfg: RunConfig) -> dict:
    """Run the whole recipe: train, evaluate, predict, and write every output. Returns the final metrics.

    With `train.max_steps=0` (what `scrolls-ssm evaluate / predict` run) the train split is never read: the model and
    its tokenizer come from `model.init_from` (or `model.base`)."""
    out = Path(cfg.train.output_dir)
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with=_trackers(out),
        project_dir=str(out),
    )
    if cfg.train.retain_freed_memory and accelerator.device.type == "cpu" and retain_freed_memory():
        accelerator.print(
            "CPU run: freed memory is kept in the process for reuse (train.retain_freed_memory=false: off)."
        )
    lock = RunFolderLock(out)
    resume_candidates = _claim_folder(accelerator, cfg, lock)
    try:
        results = _run(cfg, accelerator, out, resume_candidates)  # ends once every process is done
    finally:
        if accelerator.is_main_process:
            lock.release()
    for task, splits in results.items():
        for split, metrics in splits.items():
            shown = ", ".join(f"{key}={value:.4g}" for key, value in metrics.items() if value is not None)
            accelerator.print(f"{task}/{split}: {shown}")
    accelerator.print(f"outputs in {out}")
    return results


def resolve_mixed_precision(requested: str) -> str:
    """`train.mixed_precision` as accelerate takes it: "auto" is bf16 on a CUDA device that supports it (Ampere and
    newer), else "no". bf16 has float32's exponent range, so the T5 family, whose activations overflow float16, trains
    in it safely; on a CPU, bf16 autocast is slower than float32, so "auto" stays in float32 there."""
    if requested != "auto":
        return requested
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _claim_folder(accelerator: Accelerator, cfg: RunConfig, lock: RunFolderLock) -> list[Path]:
    """The main process locks the output folder and applies the folder rules; every process gets the verdict (the
    checkpoints to resume from, newest first) or the same error."""
    error: RunConfigError | None = None
    candidates: list[Path] = []
    if accelerator.is_main_process:
        try:
            took_over = lock.acquire()
        except RunConfigError as refused:
            error = refused
        else:
            try:
                candidates = prepare_run_folder(cfg, took_over)
            except RunConfigError as refused:
                lock.release()
                error = refused
    verdict = [None if error is None else str(error), [str(path) for path in candidates]]
    if accelerator.num_processes > 1:
        broadcast_object_list(verdict)
    if error is not None:
        raise error
    if verdict[0] is not None:
        raise RunConfigError(verdict[0])
    return [Path(path) for path in verdict[1]]


def _run(cfg: RunConfig, accelerator: Accelerator, out: Path, resume_candidates: list[Path]) -> dict:
    set_seed(cfg.train.seed)
    training = cfg.train.max_steps != 0
    with accelerator.main_process_first():
        data_dir = _materialize_data(cfg)
        raw_train = {task: _load(cfg, task, "train", data_dir) for task in cfg.data.tasks} if training else None
        tokenizer = build_tokenizer(cfg.model, out / "tokenizer", lambda: _training_texts(cfg, raw_train))
        model = build_model(cfg.model, tokenizer)
        if accelerator.mixed_precision == "fp16" and model.config.model_type == "scrolls_ssm_t5":
            accelerator.print(
                "warning: train.mixed_precision=fp16 with a T5-family model: T5's activations overflow float16 (the "
                "blocks clamp infinities, which hides rather than fixes it). Use bf16 (train.mixed_precision=auto "
                "picks it where the GPU has it) or no."
            )
        source_limit = encoder_length_limit(model.config)
    if training and not resume_candidates and (cfg.transfer.steps or cfg.transfer.distill_steps):
        _transfer_stage(cfg, accelerator, model, tokenizer, raw_train, source_limit, out)  # every process takes part
    with accelerator.main_process_first():
        train_set = _tokenize_train(cfg, tokenizer, raw_train, source_limit) if training else None
        eval_sets, predict_sets = _tokenize_evaluation(cfg, tokenizer, data_dir, source_limit)
    global_attention = uses_global_attention(model)  # LED: global attention on <s>
    collator = Seq2SeqCollator(tokenizer, cfg.data.pad_to_multiple_of, global_attention_first_token=global_attention)

    state = RunState()
    if training:
        model, state = _train(
            cfg, accelerator, model, tokenizer, collator, train_set, eval_sets, out, resume_candidates
        )
    else:  # evaluate / predict: the model as it came in
        model = accelerator.prepare(model)
        save_model(accelerator, model, tokenizer, cfg, out, step=0)
    accelerator.wait_for_everyone()

    # Final predictions and scores come from the best model.
    best = AutoModelForSeq2SeqLM.from_pretrained(out / "model").to(accelerator.device)
    results = _predict_and_score(cfg, accelerator, best, tokenizer, collator, eval_sets, predict_sets, out)
    truncated_sets = _truncated_eval_sets(cfg, tokenizer, data_dir, source_limit)
    truncated = _predict_and_score(cfg, accelerator, best, tokenizer, collator, truncated_sets, [], out)
    for task, scored in truncated.items():
        results.setdefault(task, {}).update(scored)
    if accelerator.is_main_process:
        kill_point("outputs-writing", state.global_step)
        write_outputs(out, cfg, results, state.evaluations, raw_train, {s.task: s.references for s in eval_sets})
    accelerator.wait_for_everyone()
    # The DDP wrapper's reducer holds a reference to the process group. Freed after end_training has destroyed the
    # group, it would hold the last one, and gloo's destructor, run with the GIL held, waits for a worker thread that
    # waits for the GIL: a two-process run hung at exit now and then. Free it while the group is still registered.
    del model
    accelerator.free_memory()
    accelerator.end_training()
    return results


def _train(
    cfg: RunConfig,
    accelerator: Accelerator,
    model: torch.nn.Module,
    tokenizer,
    collator: Seq2SeqCollator,
    train_set: datasets.Dataset,
    eval_sets: list[EvalSet],
    out: Path,
    resume_candidates: list[Path],
) -> tuple[torch.nn.Module, RunState]:
    """The training loop with its evaluations and checkpoints; returns the prepared model and the final state."""
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
    if resume_candidates:
        resumed_from, state = load_checkpoint(accelerator, resume_candidates, cfg)
        if accelerator.is_main_process:  # (a fresh start wrote run_config.yaml when it claimed the folder)
            truncate_log(out / "log.jsonl", state.log_bytes)
            write_text_atomic(out / "run_config.yaml", cfg.to_yaml())
        accelerator.print(f"Resumed from {resumed_from} (epoch {state.epoch}, step {state.global_step}).")
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
    return model, state


# --- transfer: the pretrained attention into the new mixers, before fine-tuning --------------------------------------


def _transfer_stage(cfg: RunConfig, accelerator: Accelerator, model, tokenizer, raw_train, source_limit, out) -> None:
    """Run the recipe's `transfer:` stage on `model` in place (docs/transfer.md). Every process takes part: each
    optimizer step's batches are dealt out over them and their gradients summed (`transfer.batches_per_step`, default
    one per process). The result is kept in `<output_dir>/transfer/` (model.safetensors, transfer.json with the
    report), which a run restarted with the same settings loads instead. The stage checkpoints itself in
    `transfer/state/` every `transfer.checkpoint_every_steps` steps; a restart with `train.resume=auto` resumes it."""
    from safetensors.torch import load_model, save_model

    from .transfer import read_documents, run_transfer

    folder = out / "transfer"
    settings = json.dumps(
        {
            "transfer": dataclasses.asdict(cfg.transfer),
            "model": dataclasses.asdict(cfg.model),
            "tasks": cfg.data.tasks,
            "data_dir": cfg.data.data_dir,
            "seed": cfg.train.seed,
        },
        sort_keys=True,
    )
    report_path, weights = folder / "transfer.json", folder / "model.safetensors"
    done = report_path.is_file() and weights.is_file() and json.loads(report_path.read_text())["settings"] == settings
    accelerator.wait_for_everyone()  # every process has looked before the first one writes anything
    if done:
        load_model(model, weights)
        accelerator.print(f"Transfer: loaded the transferred mixers from {folder}.")
        return
    state_dir = folder / "state"
    if accelerator.is_main_process:
        if (state_dir / "settings.json").is_file() and (state_dir / "settings.json").read_text() != settings:
            shutil.rmtree(state_dir)  # written for other settings: starts over
        state_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(state_dir / "settings.json", settings)
    accelerator.wait_for_everyone()
    if cfg.transfer.documents:
        documents = read_documents(cfg.transfer.documents)
    else:
        documents = [text for rows in raw_train.values() for text in rows["input"]]
    documents = documents[: cfg.transfer.max_documents]
    max_length = cfg.transfer.max_length or max(_lengths(cfg, task, source_limit)[0] for task in cfg.data.tasks)
    model.to(accelerator.device)
    report = run_transfer(
        model,
        cfg.model.base,
        tokenizer,
        documents,
        cfg.transfer,
        max_length=min(max_length, source_limit),
        max_tokens_per_batch=cfg.transfer.max_tokens_per_batch or cfg.data.max_tokens_per_batch,
        seed=cfg.train.seed,
        work_dir=state_dir,
        progress=accelerator.is_local_main_process,
    )
    before, after = report["relative_error_before"], report["relative_error_after"]
    accelerator.print(
        "Transfer: relative error per swapped layer "
        + ", ".join(f"{index}: {before[index]:.3f} -> {after[index]:.3f}" for index in before)
        + f"; encoder cosine to the original {report['encoder_cosine_before']:.3f} -> "
        f"{report['encoder_cosine_after']:.3f}."
    )
    if accelerator.is_main_process:
        staging = folder / ".model.safetensors.tmp"
        save_model(model, str(staging))
        os.replace(staging, weights)
        write_text_atomic(report_path, json.dumps({"settings": settings, **report}, indent=1) + "\n")
        shutil.rmtree(state_dir)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        load_model(model, weights)  # the first process's weights, bit for bit


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


def _training_texts(cfg: RunConfig, raw_train: dict | None) -> Iterator[str]:
    """Text to train a tokenizer on; only a run that trains has (and reads) the train split."""
    if raw_train is None:
        raise RunConfigError(
            "train.max_steps=0 reads no training data, so it cannot train a tokenizer: set model.init_from to a "
            "trained model folder (its tokenizer is saved beside it) or model.tokenizer."
        )
    return (text for rows in raw_train.values() for column in ("input", "output") for text in rows[column])


def _lengths(cfg: RunConfig, task: str, source_limit: int) -> tuple[int, int]:
    """(source, target) token lengths of a task. Inputs longer than the encoder's learned positions are truncated
    here, never in the model; padding to a multiple must not push past that limit either."""
    source_len = min(cfg.data.max_source_length or get_task(task).max_source_length, source_limit)
    if cfg.data.pad_to_multiple_of:
        source_len -= source_len % cfg.data.pad_to_multiple_of
    return source_len, cfg.data.max_target_length or get_task(task).max_target_length


def _tokenize(cfg: RunConfig, tokenizer, rows: datasets.Dataset, task: str, source_limit: int) -> datasets.Dataset:
    source_len, target_len = _lengths(cfg, task, source_limit)
    return tokenize_for_seq2seq(rows, tokenizer, source_len, target_len, task=task, num_proc=cfg.data.num_proc)


def _tokenize_train(cfg: RunConfig, tokenizer, raw_train: dict, source_limit: int) -> datasets.Dataset:
    """The tokenized training rows of every task, concatenated."""
    parts = [
        _tokenize(cfg, tokenizer, raw_train[task], task, source_limit).select_columns(
            ["input_ids", "attention_mask", "labels"]
        )
        for task in cfg.data.tasks
    ]
    return datasets.concatenate_datasets(parts)


def _tokenize_evaluation(cfg: RunConfig, tokenizer, data_dir, source_limit: int):
    """The evaluation sets (eval split) and prediction sets (other predict splits) of every task."""
    eval_sets, predict_sets = [], []
    for task in cfg.data.tasks:
        for split in dict.fromkeys([cfg.data.eval_split, *cfg.data.predict_splits]):
            eval_set = _eval_set(cfg, tokenizer, data_dir, task, split, source_limit)
            (eval_sets if split == cfg.data.eval_split else predict_sets).append(eval_set)
    return eval_sets, predict_sets


def _eval_set(cfg: RunConfig, tokenizer, data_dir, task: str, split: str, source_limit: int, loss: bool = True):
    """One task's split, tokenized for generation (one row per id) and, with `loss` and references, for the loss."""
    rows = _load(cfg, task, split, data_dir)
    grouped, references = group_references(rows)
    loss_rows = _tokenize(cfg, tokenizer, rows, task, source_limit) if loss and any(references.values()) else None
    generation_rows = _tokenize(cfg, tokenizer, grouped, task, source_limit)
    max_new = cfg.eval.max_new_tokens or get_task(task).max_new_tokens
    return EvalSet(task, split, loss_rows, generation_rows, references, max_new)


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
        save_model(accelerator, model, tokenizer, cfg, out, state.global_step)


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


def _truncated_eval_sets(cfg: RunConfig, tokenizer, data_dir, source_limit: int) -> list[EvalSet]:
    """The eval split of every task with its inputs cut to each of eval.truncated_source_lengths, named
    `<split>_first_<N>_tokens` (their metrics.json key and predictions folder): what the model gains from reading
    past N tokens."""
    split = cfg.data.eval_split
    sets = []
    for length in cfg.eval.truncated_source_lengths:
        for task in cfg.data.tasks:
            eval_set = _eval_set(cfg, tokenizer, data_dir, task, split, min(length, source_limit), loss=False)
            if any(eval_set.references.values()):
                sets.append(dataclasses.replace(eval_set, split=truncated_split_name(split, length)))
    return sets


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
