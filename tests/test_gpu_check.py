"""benchmarks/gpu_check.sh rehearsed on the CPU (--dry-run): the steps a lent GPU will run, end to end."""

from __future__ import annotations

import csv
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_dry_run_runs_the_cuda_tests_and_the_sweep_into_one_folder(tmp_path):
    out = tmp_path / "gpu"
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", str(out)],
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "tests exit 0, sweep exit 0" in result.stdout

    environment = (out / "environment.txt").read_text()
    assert "torch " in environment and "mamba_ssm: not importable" in environment

    suite = ElementTree.parse(out / "cuda_tests.xml").getroot().find("testsuite")
    assert int(suite.get("failures")) == 0 and int(suite.get("errors")) == 0
    assert int(suite.get("tests")) - int(suite.get("skipped")) >= 15  # every mixer twice, three whole models

    with (out / "encoder_scaling_cpu_tiny.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    kinds = ["s4d", "mamba2", "mamba", "gss-hybrid", "ffn-only", "led", "attention", "local-attention"]
    assert [row["config"] for row in rows] == kinds
    assert all(row["status"] == "ok" and float(row["time_s"]) > 0 for row in rows)
    assert (out / "encoder_scaling_cpu_tiny.md").exists() and (out / "encoder_scaling_cpu_tiny.png").exists()


def test_refuses_to_run_without_a_gpu_and_says_how_to_rehearse(tmp_path):
    import torch

    if torch.cuda.is_available():
        return  # the refusal is what a CPU-only machine sees
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path / "gpu")],
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "no CUDA device is visible to torch; use --dry-run" in result.stderr
