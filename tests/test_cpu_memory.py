"""scrolls_ssm.cpu_memory: after retain_freed_memory, freeing and re-allocating a large tensor reuses its pages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# In a fresh interpreter (the setting is process-wide): allocate, touch and free a 64 MiB tensor, twice to let the heap
# settle (with retained memory the second cycle sometimes still takes fresh pages), then 12 times, counting the minor
# page faults of those 12. Fresh pages fault once per page: 16,384 per cycle with 4 KiB pages.
CYCLES = """
import json, resource, sys
import torch
from scrolls_ssm.cpu_memory import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else None
def cycle():
    x = torch.empty(16 * 2**20)  # 64 MiB of float32
    x.fill_(1.0)
    del x
cycle()
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(12):
    cycle()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CYCLES, mode], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_retained_memory_is_reused_without_page_faults():
    default, retained = _faults("default"), _faults("retain")
    assert retained["applied"] is True
    # The default: fresh pages every cycle, 12 x 16,384 faults (12 x 32 where the kernel backs them with 2 MiB pages).
    assert default["faults"] >= 12 * 32, default
    # Retained: the first cycle's pages are reused.
    assert retained["faults"] * 4 < default["faults"], (default, retained)


def test_retain_freed_memory_is_a_no_op_off_linux(monkeypatch):
    from scrolls_ssm import cpu_memory

    monkeypatch.setattr(cpu_memory.sys, "platform", "darwin")
    assert cpu_memory.retain_freed_memory() is False
