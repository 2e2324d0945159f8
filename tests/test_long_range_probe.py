"""Smoke test of benchmarks/long_range_probe.py --quick: one contender trains through run_finetune.py, every
(task, length, depth) cell is scored, the CSV / markdown / heatmaps are written, and --resume keeps finished work."""

from __future__ import annotations

import csv
import json

import pytest

from tests.conftest import import_benchmark


@pytest.fixture(scope="module")
def long_range_probe():
    yield from import_benchmark("long_range_probe")


def test_quick_sweep_scores_every_cell_and_resumes(long_range_probe, tmp_path, capsys):
    csv_path = long_range_probe.main(["--quick", "--contenders", "s4d", "--out", str(tmp_path)])
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    setup = long_range_probe.QUICK
    cells = [row for row in rows if row["contender"] == "s4d"]
    expected = 3 * len(setup.eval_lengths) * len(setup.depths) + len(setup.eval_lengths)  # aggregation: no depths
    assert len(cells) == expected and all(row["status"] == "ok" for row in cells), rows
    assert all(0.0 <= float(row["exact_match"]) <= 100.0 for row in cells)
    assert {row["task"] for row in rows if row["contender"] == "naive"} == {
        "single_needle", "multi_key_needle", "variable_tracking", "aggregation"
    }  # fmt: skip
    report = csv_path.with_suffix(".md").read_text()
    assert "## variable_tracking (naive baseline" in report and "| s4d |" in report
    for task in ("single_needle", "aggregation"):
        assert (tmp_path / f"long_range_probe_quick_{task}.png").stat().st_size > 0

    capsys.readouterr()
    long_range_probe.main(["--quick", "--contenders", "s4d", "--resume", "--out", str(tmp_path)])
    assert "s4d: kept from long_range_probe_quick.csv" in capsys.readouterr().out
    with csv_path.open() as handle:
        assert list(csv.DictReader(handle)) == rows


def test_state_space_contenders_run_without_a_position_table(long_range_probe, tmp_path):
    """Only the contenders whose first layer sees order drop the position table; attention layouts keep theirs."""
    for contender in ("s4d", "mamba2", "mamba", "gss-hybrid", "s4d-hybrid", "attention", "local-attention"):
        args = long_range_probe.overrides(contender, long_range_probe.QUICK, tmp_path, tmp_path, tmp_path / "run")
        config = json.loads(next(arg for arg in args if arg.startswith("model.config=")).split("=", 1)[1])
        expected = "learned" if contender.endswith("attention") else "none"
        assert config["encoder_positions"] == expected, contender


def test_command_line_narrows_the_setup(long_range_probe):
    args = long_range_probe.parse_args(["--tasks", "single_needle", "--lengths", "4096", "1024", "--steps", "7"])
    setup = long_range_probe.setup_from_args(args)
    assert (setup.tasks, setup.eval_lengths, setup.steps) == (("single_needle",), (1024, 4096), 7)
    assert setup.d_model == long_range_probe.Setup().d_model
    with pytest.raises(SystemExit):
        long_range_probe.parse_args(["--tasks", "needle"])
