"""One run per output folder: the rules `train()` applies before it writes anything.

| the folder holds                     | no resume | resume=auto       | resume=latest / PATH | overwrite_output_dir |
|--------------------------------------|-----------|-------------------|----------------------|----------------------|
| nothing                              | start     | start             | error                | start                |
| a run that stopped before training   | start     | start             | error                | start                |
| a run without a complete checkpoint  | error     | clear, start (1)  | error                | clear, start         |
| a run with checkpoints               | error     | resume the newest | resume it            | clear, start         |
| a live run (lock file with live pid) | error     | error             | error                | error                |

(1) except `transfer/`, the recipe's transfer stage (train.py): its result and checkpoints are kept and reused when the
settings are unchanged, so a run killed during transfer resumes it.

A lock file names the process that owns the folder; one left by a dead process is taken over with a warning.
Hidden `.tmp-*` leftovers of a save that was killed are removed at every start.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from pathlib import Path

from .checkpointing import list_checkpoints
from .config import RunConfig, RunConfigError
from .submission import write_text_atomic

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
# What a run writes before its first step; a folder holding nothing else has no results to protect.
STARTUP_ENTRIES = frozenset({"run_config.yaml", "tokenizer", "log.jsonl"})
# Written by save_model / save_checkpoint / write_text_atomic before their rename; a kill leaves them behind.
LEFTOVERS = (
    ".tmp-model",
    ".old-model",
    "checkpoints/.tmp-*",
    ".*.tmp",
    "model/.*.tmp",
    "predictions/*/.*.tmp",
    "transfer/.*.tmp",
    "transfer/state/.*.tmp",
)


class RunFolderLock:
    """`<output_dir>/.lock`, created exclusively and holding the owner's pid and host; removed by `release`."""

    def __init__(self, out: Path):
        self.path = out / LOCK_NAME

    def acquire(self) -> bool:
        """Take the lock; True if it was taken over from a dead run (whose folder may hold a half-started run).

        The lock appears with its content or not at all (a hard link of a finished file, which fails if the lock
        exists), so another process never reads a lock that is still being written."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        written = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")  # a kill leaves it to the .*.tmp cleanup
        written.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        took_over = False
        try:
            for _ in range(2):  # the second try follows the removal of a stale lock
                try:
                    os.link(written, self.path)
                    return took_over
                except FileExistsError:
                    took_over = self._remove_if_stale()
        finally:
            written.unlink(missing_ok=True)
        raise RunConfigError(f"{self.path.parent} was locked by another run starting at the same moment; try again.")

    def _remove_if_stale(self) -> bool:
        """Remove the lock if its process is gone (True); raise if that process may still be running."""
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return False  # released meanwhile
        except ValueError:
            holder = {}  # garbled: no owner to wait for
        pid, host = holder.get("pid"), holder.get("host")
        if host not in (None, socket.gethostname()):
            raise RunConfigError(
                f"train.output_dir={str(self.path.parent)!r} is in use by process {pid} on host {host} (lock file "
                f"{self.path}). Wait for it, choose another train.output_dir, or delete the lock if that run is dead."
            )
        if pid is not None and pid != os.getpid() and _alive(pid):
            raise RunConfigError(
                f"train.output_dir={str(self.path.parent)!r} is in use by a running process (pid {pid}, lock file "
                f"{self.path}). Wait for it to finish, stop it, or choose another train.output_dir."
            )
        logger.warning("Taking over %s, left by process %s, which is no longer running.", self.path, pid)
        self.path.unlink(missing_ok=True)
        return True

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def prepare_run_folder(cfg: RunConfig, took_over_lock: bool = False) -> list[Path]:
    """Apply the folder rules (module docstring) and return the checkpoints to resume from, newest first (empty: a
    fresh start, whose run_config.yaml is written at once). Called by the main process only, holding the lock.

    A folder counts as a run (that `resume=auto` may clear when it has no checkpoint) if it holds run_config.yaml or
    the lock of a dead run: a run killed before its first checkpoint leaves one of the two."""
    out = Path(cfg.train.output_dir)
    resume, overwrite = cfg.train.resume, cfg.train.overwrite_output_dir
    if resume and overwrite:
        raise RunConfigError(
            f"train.resume={resume!r} and train.overwrite_output_dir=true contradict each other: resume keeps the "
            "folder, overwrite clears it. Give one of them."
        )
    for pattern in LEFTOVERS:
        for leftover in out.glob(pattern):
            _remove(leftover)
    checkpoints = list_checkpoints(out)[::-1]
    if resume not in (None, "auto", "latest"):
        path = Path(resume)
        if not (path / "run_state.json").is_file():
            found = [str(p) for p in checkpoints] or f"none found under {out / 'checkpoints'}"
            raise RunConfigError(
                f"train.resume={resume!r} is not a complete checkpoint (no run_state.json there). Use 'auto', "
                f"'latest' or one of: {found}."
            )
        return [path]
    if resume in ("auto", "latest") and checkpoints:
        return checkpoints
    if resume == "latest":
        raise RunConfigError(
            f"train.resume='latest' but {out / 'checkpoints'} holds no complete checkpoint. Use train.resume=auto to "
            "resume when there is one and start fresh otherwise."
        )
    used = _run_entries(cfg)
    ours = (out / "run_config.yaml").is_file() or took_over_lock
    # A run that stopped before it produced anything (bad data, no network) left only what every start writes: the
    # same command, run again, starts over instead of asking for a flag.
    never_trained = ours and {path.name for path in used} <= STARTUP_ENTRIES
    if used and not (overwrite or never_trained or (resume == "auto" and ours)):
        raise RunConfigError(
            f"train.output_dir={str(out)!r} already holds a run ({', '.join(sorted(p.name for p in used)[:5])}). "
            "Resume it with train.resume=auto (or --resume), clear it with train.overwrite_output_dir=true, "
            "or choose another train.output_dir."
        )
    if resume == "auto":
        # The transfer stage's result and checkpoints (train.py) resume too; they are redone if the settings changed.
        used = [path for path in used if path.name != "transfer"]
    # run_config.yaml last: a kill while clearing leaves a folder that is still recognisably a run.
    for entry in sorted(used, key=lambda path: path.name == "run_config.yaml"):
        _remove(entry)
    write_text_atomic(out / "run_config.yaml", cfg.to_yaml())
    return []


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _run_entries(cfg: RunConfig) -> list[Path]:
    """What a fresh start would clear: everything in the folder except the lock and a data folder kept inside it
    (the demo writes its synthetic data to runs/demo/data)."""
    out = Path(cfg.train.output_dir)
    if not out.is_dir():
        return []
    data = Path(cfg.data.data_dir).resolve() if cfg.data.data_dir else None
    kept = {data, *data.parents} if data else set()
    return [p for p in out.iterdir() if p.name != LOCK_NAME and p.resolve() not in kept]


def truncate_log(path: Path, size: int | None) -> None:
    """Cut log.jsonl back to `size` bytes (the checkpoint's), so a resumed run does not log its steps twice."""
    if size is not None and path.is_file() and path.stat().st_size > size:
        with path.open("r+b") as stream:
            stream.truncate(size)
