"""Resumable checkpoints and the saved model, written so that a `kill -9` at any moment loses at most the work since
the last complete checkpoint.

    checkpoints/step_N/   accelerate save_state + run_state.json + run_config.yaml, renamed into place when complete
    model/                the best model (save_pretrained), swapped in by rename when complete

Saving gathers the full weights collectively on every process (FSDP-sharded parameters need every rank), then the
main process writes them.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors import SafetensorError
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from .config import RunConfig, RunConfigError
from .submission import write_text_atomic

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
# Test hook, not a feature: `SCROLLS_SSM_TEST_KILL_AT=<point>@<step>` makes the process SIGKILL itself at a named point
# (the `kill_point` calls), so tests can land a `kill -9` deterministically inside a save or right after one.
TEST_KILL_ENV = "SCROLLS_SSM_TEST_KILL_AT"
# What reading a damaged checkpoint raises: truncated safetensors, torch pickles cut short, missing or garbled files.
LOAD_ERRORS = (
    OSError,
    ValueError,
    RuntimeError,
    EOFError,
    KeyError,
    pickle.UnpicklingError,
    yaml.YAMLError,
    SafetensorError,
)


@dataclass
class RunState:
    """Where the loop stands; saved in every checkpoint so a resumed run continues mid-epoch exactly."""

    epoch: int = 0
    batches_in_epoch: int = 0
    global_step: int = 0
    skipped_nonfinite: int = 0
    best: float | None = None
    evaluations: list[dict] = field(default_factory=list)
    # Size of log.jsonl when the checkpoint was written: a resumed run cuts the log back to it, so the records logged
    # after the checkpoint (and logged again by the resumed run) do not appear twice.
    log_bytes: int | None = None


def kill_point(point: str, step: int) -> None:
    """SIGKILL this process if the test hook `TEST_KILL_ENV` names this point and step (e.g. `checkpoint-saved@8`)."""
    if os.environ.get(TEST_KILL_ENV) == f"{point}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(accelerator: Accelerator, out: Path, state: RunState, cfg: RunConfig) -> Path:
    """Write a resumable checkpoint atomically (temporary folder, then rename) and keep the newest `keep`."""
    root = out / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{state.global_step:08d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # save_state has no barrier of its own
    if accelerator.is_main_process:
        log = out / "log.jsonl"
        state.log_bytes = log.stat().st_size if log.is_file() else 0
        write_text_atomic(tmp / "run_state.json", json.dumps(asdict(state), indent=1))
        write_text_atomic(tmp / "run_config.yaml", cfg.to_yaml())
        kill_point("checkpoint-writing", state.global_step)
        if final.exists():  # left by an earlier attempt that stopped before its state could be saved again
            shutil.rmtree(final)
        tmp.rename(final)
        for stale in list_checkpoints(out)[: -cfg.train.keep_checkpoints]:
            shutil.rmtree(stale)
        kill_point("checkpoint-saved", state.global_step)
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written ones live in hidden .tmp- folders and are ignored)."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / "run_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def load_checkpoint(accelerator: Accelerator, candidates: list[Path], cfg: RunConfig) -> tuple[Path, RunState]:
    """Restore the first checkpoint of `candidates` (newest first) that loads; a damaged one (truncated safetensors,
    missing file) is reported with a warning and removed, and the next one is tried."""
    for position, path in enumerate(candidates):
        try:
            check_same_model(cfg, path)
            state = RunState(**json.loads((path / "run_state.json").read_text()))
            check_random_states(path, accelerator.num_processes)
            accelerator.load_state(str(path))
        except RunConfigError:
            raise  # another model's checkpoint: not damage, and no reason to try an older one
        except LOAD_ERRORS as error:
            problem = f"checkpoint {path} could not be loaded ({type(error).__name__}: {error})"
            if position + 1 == len(candidates):
                raise RunConfigError(
                    f"{problem}, and no earlier complete checkpoint is left to fall back to. Start over with "
                    "train.overwrite_output_dir=true, or resume another checkpoint with train.resume=PATH."
                ) from error
            if accelerator.is_main_process:
                logger.warning(
                    "%s; falling back to %s and removing the damaged one.", problem, candidates[position + 1]
                )
            continue
        accelerator.wait_for_everyone()  # every process is done reading before the damaged ones go
        if accelerator.is_main_process:
            for damaged in candidates[:position]:
                shutil.rmtree(damaged, ignore_errors=True)
        return path, state
    raise AssertionError("load_checkpoint needs at least one candidate")


# What accelerate's `load_state` needs from each process's `random_states_<rank>.pkl` to restore its RNGs.
RANDOM_STATE_KEYS = ("random_state", "numpy_random_seed", "torch_manual_seed")


def check_random_states(checkpoint: Path, num_processes: int) -> None:
    """Raise (one of LOAD_ERRORS) unless every process's RNG file of `checkpoint` loads and holds the RNG states.

    `Accelerator.load_state` catches any error while restoring the RNG states and only logs it at INFO level, so a
    checkpoint with a missing or truncated `random_states_<rank>.pkl` would resume with the wrong random streams: the
    run goes on, but no longer reproduces the uninterrupted one. Every process checks every rank's file, so all of
    them agree on whether this checkpoint is damaged."""
    from accelerate.utils import RNG_STATE_NAME, load

    for rank in range(num_processes):
        file = checkpoint / f"{RNG_STATE_NAME}_{rank}.pkl"  # the name accelerate's save_state writes
        states = load(file)
        missing = [key for key in RANDOM_STATE_KEYS if not isinstance(states, dict) or key not in states]
        if missing:
            raise KeyError(f"{file} lacks the random states {', '.join(missing)}")


def check_same_model(cfg: RunConfig, checkpoint: Path) -> None:
    saved = yaml.safe_load((checkpoint / "run_config.yaml").read_text())["model"]
    current = cfg.to_dict()["model"]
    if saved != current:
        changed = sorted(key for key in saved if saved[key] != current.get(key))
        raise RunConfigError(
            f"checkpoint {checkpoint} was written by a run with a different model (model.{', model.'.join(changed)} "
            "differ). Resume with the same model settings, or start a new run in another train.output_dir."
        )


def full_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the main process (other processes get an empty or partial dict).

    A collective: every process must call it. Sharded parameters (FSDP2's DTensors, accelerate's FSDP / DeepSpeed)
    are all-gathered; tied weights point to one tensor again, so `save_pretrained` writes them once, exactly as it
    does for an unsharded model."""
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        state = accelerator.get_state_dict(model)
    else:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(accelerator.unwrap_model(model), options=options)
    if not accelerator.is_main_process:
        return state
    tied: dict[int, list[str]] = {}
    for name, parameter in accelerator.unwrap_model(model).named_parameters(remove_duplicate=False):
        tied.setdefault(id(parameter), []).append(name)
    for first, *others in tied.values():
        for name in others:
            if first in state:
                state[name] = state[first]
    return state


def save_model(
    accelerator: Accelerator, model: torch.nn.Module, tokenizer, cfg: RunConfig, out: Path, step: int
) -> None:
    """Replace `out/model` with the current weights, the tokenizer and the run config, atomically. Every process
    must call it (the weights are gathered collectively)."""
    accelerator.wait_for_everyone()
    state = full_state_dict(accelerator, model)
    if accelerator.is_main_process:
        tmp, final, old = out / ".tmp-model", out / "model", out / ".old-model"
        for stale in (tmp, old):
            if stale.exists():
                shutil.rmtree(stale)
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state, is_main_process=True)
        tokenizer.save_pretrained(tmp)
        write_text_atomic(tmp / "run_config.yaml", cfg.to_yaml())
        if final.exists():
            final.rename(old)
        kill_point("model-writing", step)  # the worst moment: no model/ at all until the rename below
        tmp.rename(final)
        if old.exists():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
