"""Smoke test of benchmarks/swap_transfer.py --quick: the stand-in is pretrained and cached, every variant of a kind
is built, scored for retention and fine-tuned through run_finetune.py, and --resume keeps finished work."""

from __future__ import annotations

import csv
import json

import pytest

from tests.conftest import import_benchmark


@pytest.fixture(scope="module")
def swap_transfer():
    yield from import_benchmark("swap_transfer")


def test_quick_run_scores_every_variant_and_resumes(swap_transfer, tmp_path, capsys):
    assert swap_transfer.main(["--quick", "--kinds", "mamba2", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "swap_transfer_quick.csv").open()))
    assert [(row["kind"], row["variant"]) for row in rows] == [
        ("original", "original"),
        ("original", "inputs masked"),
        ("mamba2", "random"),
        ("mamba2", "reuse"),
        ("mamba2", "transfer"),
        ("mamba2", "transfer+distill"),
    ]
    by_variant = {row["variant"]: row for row in rows}
    assert float(by_variant["original"]["encoder_cosine"]) == 1.0
    assert by_variant["inputs masked"]["encoder_cosine"] == "" and by_variant["inputs masked"]["gap_closed"] == ""
    assert float(by_variant["random"]["gap_closed"]) == 0.0
    # Transfer moves the encoder's output towards the original's, even in a few steps.
    assert float(by_variant["transfer"]["encoder_cosine"]) > float(by_variant["random"]["encoder_cosine"])
    curves = list(csv.DictReader((tmp_path / "swap_transfer_curves_quick.csv").open()))
    epochs = swap_transfer.QUICK.finetune_epochs
    assert len(curves) == 5 * epochs and all(float(point["eval_loss"]) > 0 for point in curves)
    report = (tmp_path / "swap_transfer_quick.md").read_text()
    assert "| mamba2 | transfer+distill |" in report and "steps to reach the original's loss" in report
    assert (tmp_path / "swap_transfer_quick.png").stat().st_size > 0
    stand_in = tmp_path / "work" / "stand-in"
    pretraining = json.loads((stand_in / "pretraining.json").read_text())
    assert pretraining["steps"] == swap_transfer.QUICK.pretrain_steps

    # --resume: nothing left to convert or fine-tune, the stand-in is not pretrained again.
    capsys.readouterr()
    assert swap_transfer.main(["--quick", "--kinds", "mamba2", "--resume", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "==" not in printed and "pretrain step" not in printed
    assert list(csv.DictReader((tmp_path / "swap_transfer_quick.csv").open())) == rows


def test_the_gap_closed_is_measured_against_random_mixers(swap_transfer):
    rows = [
        {"kind": "original", "variant": "original", "heldout_loss": 2.0},
        {"kind": "s4d", "variant": "random", "heldout_loss": 4.0},
        {"kind": "s4d", "variant": "transfer", "heldout_loss": 2.5},
    ]
    gaps = {row["variant"]: row.get("gap_closed") for row in swap_transfer.with_gap(rows)}
    assert gaps == {"original": None, "random": 0.0, "transfer": 0.75}
    curve = [{"step": 10, "eval_loss": 3.0}, {"step": 20, "eval_loss": 1.9}, {"step": 30, "eval_loss": 1.5}]
    assert swap_transfer.steps_to_reach(curve, 2.0) == 20 and swap_transfer.steps_to_reach(curve, 1.0) is None


def test_the_report_says_when_the_stand_ins_attention_is_too_weak_to_test(swap_transfer):
    """The share of the encoder's contribution (inputs masked -> original) that random mixers lose, by hand: the
    encoder is worth 2.6 - 2.0 = 0.6; random s4d gives back 0.12 of it (20%), random mamba2 0.3 (50%)."""
    rows = [
        {"kind": "original", "variant": "original", "heldout_loss": 2.0},
        {"kind": "original", "variant": "inputs masked", "heldout_loss": 2.6},
        {"kind": "s4d", "variant": "random", "heldout_loss": 2.12},
    ]
    notes = "\n".join(swap_transfer.validity_notes(rows))
    assert "lowers the loss by 0.600" in notes and "s4d 20%" in notes
    assert "this stand-in's attention carries little" in notes
    strong = "\n".join(
        swap_transfer.validity_notes([*rows, {"kind": "mamba2", "variant": "random", "heldout_loss": 2.3}])
    )
    assert "s4d 20%, mamba2 50%" in strong and "carries little" not in strong
    assert swap_transfer.validity_notes(rows[:1]) == []  # no masked row: nothing to say


def test_setup_fields_can_be_changed_from_the_command_line(swap_transfer, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    changes = swap_transfer.setup_changes(["decoder_layers=2", "pretrain_lr=0.001", "finetune_task=qasper"], parser)
    assert changes == {"decoder_layers": 2, "pretrain_lr": 0.001, "finetune_task": "qasper"}
    for bad, message in (("decoder_layer=2", "FIELD one of"), ("decoder_layers=two", "decoder_layers takes int")):
        with pytest.raises(SystemExit):
            swap_transfer.setup_changes([bad], parser)
        assert message in capsys.readouterr().err
