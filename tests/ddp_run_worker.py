"""One process of a two-process run in tests/test_train.py, started by `accelerate launch`: run_finetune.py as it is,
except that when the run ends it fails unless the DDP-wrapped model is gone before `end_training` destroys the
process group (freed after it, the wrapper's reducer destroys gloo's group with the GIL held, which can deadlock).

    accelerate launch --multi_gpu --num_processes 2 tests/ddp_run_worker.py OVERRIDES...
"""

from __future__ import annotations

import gc
import sys

import torch
from accelerate import Accelerator

from scrolls_ssm.cli import run_finetune_main

_end_training = Accelerator.end_training


def end_training_checked(self: Accelerator) -> None:
    gc.collect()
    alive = sum(isinstance(obj, torch.nn.parallel.DistributedDataParallel) for obj in gc.get_objects())
    if alive:
        raise RuntimeError(f"{alive} DistributedDataParallel model(s) still alive when the process group is destroyed")
    _end_training(self)


if __name__ == "__main__":
    Accelerator.end_training = end_training_checked
    sys.exit(run_finetune_main(sys.argv[1:]))
