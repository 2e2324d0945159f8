"""Smoke test of benchmarks/encoder_scaling.py at a tiny size: the sweep runs, isolates workers, and writes a CSV,
markdown and PNG with the expected columns and positive numbers.

The sweep itself runs in-process with the worker call swapped for a direct `measure` (a fresh process per run costs
seconds of imports each); one real worker process checks the subprocess protocol on its own.
"""

from __future__ import annotations

import csv
import importlib
import math
from dataclasses import asdict

import pytest

from tests.conftest import import_benchmark

CONFIGS = ["s4d", "mamba2", "led"]  # two of our mixers and the SCROLLS LED baseline
LENGTHS = [64, 128]
NUMERIC = ["time_s", "tokens_per_s", "gflop", "achieved_gflops", "matmul_gflops", "matmul_util"]


@pytest.fixture(scope="module")
def encoder_scaling():
    yield from import_benchmark("encoder_scaling")


def test_sweep_writes_expected_outputs(encoder_scaling, tmp_path, monkeypatch):
    for config in CONFIGS:
        if reason := encoder_scaling.missing_kinds(config):
            pytest.skip(reason)
    monkeypatch.setattr(encoder_scaling, "matmul_rate", lambda device, dtype: 1e11)  # the worker test times it
    monkeypatch.setattr(
        encoder_scaling, "run_worker", lambda spec, timeout_s, max_rss_bytes: encoder_scaling.measure(spec)
    )
    argv = ["--size", "tiny", "--repeats", "1", "--out", str(tmp_path), "--lengths", *map(str, LENGTHS)]
    csv_path = encoder_scaling.main([*argv, "--kinds", *CONFIGS])

    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == importlib.import_module("scaling_report").FIELDS
    assert [(row["config"], int(row["length"])) for row in rows] == [(c, n) for c in CONFIGS for n in LENGTHS]
    for row in rows:
        assert row["status"] == "ok", row
        for field in NUMERIC:
            assert float(row[field]) > 0, (field, row)
        # CPU peak memory is RSS growth: in this reused process the allocator may already hold the pages a run needs,
        # so growth can be 0 here. A fresh worker (as the sweep really uses) measures it; the worker test checks that.
        assert float(row["peak_mem_mb"]) >= 0, row
    report = csv_path.with_suffix(".md").read_text()
    assert "## Forward + backward time" in report and "| led |" in report
    assert csv_path.with_suffix(".png").stat().st_size > 0


def test_worker_process_reports_a_result(encoder_scaling):
    size = asdict(encoder_scaling.SIZES["tiny"])
    spec = {"config": "attention", "length": 64, "size": size, "device": "cpu", "repeats": 1}
    result = encoder_scaling.run_worker(spec, timeout_s=120, max_rss_bytes=8 * 2**30)
    assert result["status"] == "ok", result
    assert result["time_s"] > 0 and result["gflop"] > 0 and result["peak_mem_mb"] > 0


def test_unregistered_kind_is_recorded_as_skipped(encoder_scaling, tmp_path, monkeypatch):
    monkeypatch.setitem(encoder_scaling.REQUIRED_KINDS, "s4d", {"no-such-kind"})
    csv_path = encoder_scaling.main(["--size", "tiny", "--kinds", "s4d", "--lengths", "64", "--out", str(tmp_path)])
    with csv_path.open() as handle:
        (row,) = csv.DictReader(handle)
    assert row["status"] == "skipped" and "no-such-kind" in row["note"]


def test_gradient_checkpointing_runs_are_timed_and_measured_but_not_flop_counted(encoder_scaling):
    """--gradient-checkpointing: FlopCounterMode keeps what checkpointing frees (bart-base Mamba-2 at 4K: 6.3 GiB with
    the counter against 2.2 GiB without), so a checkpointed run reports NaN FLOPs rather than an extra step that
    would not fit; time and memory are measured as for any run."""
    size = asdict(encoder_scaling.SIZES["tiny"])
    spec = {"config": "mamba2", "length": 128, "size": size, "device": "cpu", "repeats": 1}
    plain = encoder_scaling.measure(spec)
    recomputed = encoder_scaling.measure({**spec, "gradient_checkpointing": True})
    assert plain["status"] == recomputed["status"] == "ok"
    assert plain["gflop"] > 0 and math.isnan(recomputed["gflop"]) and math.isnan(recomputed["matmul_util"])
    assert recomputed["time_s"] > 0 and recomputed["peak_mem_mb"] >= 0


@pytest.mark.parametrize("config", ["s4d", "gss-hybrid", "local-attention", "ffn-only"])
def test_t5_family_encoders_are_measured(encoder_scaling, config):
    """--family t5: our configurations as T5-family encoders (local attention for the attention layers)."""
    size = asdict(encoder_scaling.SIZES["tiny"])
    spec = {"config": config, "length": 96, "size": size, "device": "cpu", "repeats": 1, "family": "t5"}
    encoder, _ = encoder_scaling.build_encoder(config, encoder_scaling.Size(**size), 96, "t5")
    assert encoder.config.model_type == "scrolls_ssm_t5"
    if config != "ffn-only":
        assert encoder.config.encoder_layer_types == encoder_scaling.layer_types(config, 2)
    result = encoder_scaling.measure(spec)
    assert result["status"] == "ok" and result["time_s"] > 0 and result["gflop"] > 0, result


def _per_layer_argv(tmp_path, lengths: list[int], scaling: list[tuple]) -> list[str]:
    """The arguments of a one-layer script (scan_floor.py, mamba2_budget.py) at this process's thread count (the
    script sets it: keep ours), with a scaling CSV of (config, length, status, time_s, threads above ours) rows."""
    import torch

    threads = torch.get_num_threads()
    path = tmp_path / "scaling.csv"
    lines = [
        f"{config},{length},{status},{time_s},{threads + extra}" for config, length, status, time_s, extra in scaling
    ]
    path.write_text("\n".join(["config,length,status,time_s,threads", *lines]) + "\n")
    lengths_argv = [str(length) for length in lengths]
    return ["--lengths", *lengths_argv, "--repeats", "1", "--threads", str(threads), "--scaling-csv", str(path)]


def test_scan_floor_counts_the_scan_in_passes_and_sets_it_against_led(tmp_path):
    """benchmarks/scan_floor.py at tiny lengths: the passes are the scan's times over the pass time, and the budget is
    LED's time (from a scaling CSV, at the run's thread count only) / 3 / the `small` encoder's 4 layers."""
    scaling = [("led", 256, "ok", 6.0, 0), ("led", 256, "ok", 99.0, 1), ("led", 512, "error", "", 0)]
    argv = _per_layer_argv(tmp_path, [256, 512], [*scaling, ("s4d", 256, "ok", 1.0, 0)])
    for scan_floor in import_benchmark("scan_floor"):
        paths = scan_floor.main([*argv, "--out", str(tmp_path)])
    assert [path.name for path in paths] == ["scan_floor.csv", "scan_floor.md", "scan_floor.png"]
    with paths[0].open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["length"]) for row in rows] == [256, 512]
    for row in rows:
        for prefix in ("scan", "compiled"):  # the PyTorch scan and the compiled kernel (the test machines have cc)
            pass_s, forward, backward = (
                float(row[key]) for key in ("pass_s", f"{prefix}_forward_s", f"{prefix}_backward_s")
            )
            assert pass_s > 0 and forward > 0 and backward > 0
            assert float(row[f"{prefix}_forward_passes"]) == pytest.approx(forward / pass_s)
            assert float(row[f"{prefix}_backward_passes"]) == pytest.approx(backward / pass_s)
    assert int(rows[0]["state_mib"]) == round(2 * 16 * 512 * 256 * 4 / 2**20)  # (2, d_state, d_inner, L) float32
    assert float(rows[0]["layer_budget_s"]) == pytest.approx(6.0 / 3 / 4)
    assert rows[1]["layer_budget_s"] == ""  # LED failed at 512
    assert "(no LED time given)" in paths[1].read_text()


def test_mamba2_budget_splits_the_mixer_into_its_parts_and_sets_it_against_led(tmp_path):
    """benchmarks/mamba2_budget.py at tiny lengths: every part is timed, the glue is the mixer's time less the parts',
    and the mixer's budget is LED / 3 / 4 layers less the FFN-only encoder's time per layer, from the CSV rows of the
    run's thread count only (a length LED or ffn-only lacks gets no budget)."""
    scaling = [("led", 128, "ok", 12.0, 0), ("led", 128, "ok", 99.0, 1), ("ffn-only", 128, "ok", 2.0, 0)]
    argv = _per_layer_argv(tmp_path, [128, 256], [*scaling, ("led", 256, "ok", 24.0, 0)])
    for budget in import_benchmark("mamba2_budget"):
        paths = budget.main([*argv, "--out", str(tmp_path)])
        parts = budget.PARTS
    assert [path.name for path in paths] == ["mamba2_budget.csv", "mamba2_budget.md", "mamba2_budget.png"]
    with paths[0].open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["length"]) for row in rows] == [128, 256]
    for row in rows:
        assert all(float(row[f"{part}_s"]) > 0 for part in ["mixer", *parts])
        assert float(row["glue_s"]) == pytest.approx(float(row["mixer_s"]) - sum(float(row[f"{p}_s"]) for p in parts))
    assert float(rows[0]["mixer_budget_s"]) == pytest.approx(12.0 / 3 / 4 - 2.0 / 4)
    assert rows[1]["mixer_budget_s"] == "" and float(rows[1]["layer_budget_s"]) == pytest.approx(2.0)
    report = paths[1].read_text()
    assert "| 128 |" in report and report.count("n/a") == 2  # 256: no budget, no ratio


def test_report_says_the_machine_was_contended_only_when_the_load_was_above_the_core_count(monkeypatch):
    scaling_report = importlib.import_module("scaling_report")
    monkeypatch.setattr(scaling_report.os, "cpu_count", lambda: 2)
    assert "competing" in scaling_report._load_note([1.9, 2.5])
    assert scaling_report._load_note([0.8, 2.0]) == " (not above the core count)"
    assert scaling_report._load_note([]) == ""
