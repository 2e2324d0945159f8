"""One process of the distributed transfer test (tests/test_transfer.py), started twice by torchrun: plain
torch.distributed over gloo (CPU), no accelerate, calling the library's `transfer_attention` as a user's script would.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/transfer_worker.py BASE OUT [PER_STEP ...]

Each process builds its student from a seed of its own (the stage must start every process from the first one's
parameters) and saves its mixers after the stage as OUT/<per_step>/rank<r>.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from scrolls_ssm.transfer import transfer_attention
from tests.transfer_fixtures import STEPS, transfer_setup


def main(base: Path, out: Path, settings: list[str]) -> None:
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    for setting in settings:
        student, teacher, batches = transfer_setup(base, seed=100 + rank)
        per_step = None if setting == "default" else int(setting)
        log = transfer_attention(
            student, teacher, batches, STEPS, learning_rate=5e-3, progress=False, batches_per_step=per_step
        )
        (out / setting).mkdir(parents=True, exist_ok=True)
        torch.save(
            {"mixer": student.get_encoder().layers[0].mixer.state_dict(), "log": log}, out / setting / f"rank{rank}.pt"
        )
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
