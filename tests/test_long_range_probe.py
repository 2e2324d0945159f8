"""Smoke test of benchmarks/long_range_probe.py --quick: one contender trains through run_finetune.py, every
(task, length, depth) cell is scored, the CSV / markdown / heatmaps are written, and --resume keeps finished work."""

from __future__ import annotations

import csv
import importlib
import json

import pytest
import torch

from tests.conftest import import_benchmark


@pytest.fixture(scope="module")
def long_range_probe():
    yield from import_benchmark("long_range_probe")


def test_quick_sweep_scores_every_cell_and_resumes(long_range_probe, tmp_path, capsys):
    csv_path = long_range_probe.main(["--quick", "--contenders", "s4d", "truncated", "--out", str(tmp_path)])
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    setup = long_range_probe.QUICK
    expected = 3 * len(setup.eval_lengths) * len(setup.depths) + len(setup.eval_lengths)  # aggregation: no depths
    # truncated: trained, positions tiled, then evaluated in a second run; "s4d (first 384)": the s4d model reading
    # only the first `truncate` tokens of every input, scored in the s4d run.
    for contender in ("s4d", "truncated", "s4d (first 384)"):
        cells = [row for row in rows if row["contender"] == contender]
        assert len(cells) == expected and all(row["status"] == "ok" for row in cells), rows
    cut = tmp_path / "runs" / "s4d" / "predictions" / "validation_first_384_tokens" / "quality.json"
    full = tmp_path / "runs" / "s4d" / "predictions" / "validation" / "quality.json"
    assert json.loads(cut.read_text()).keys() == json.loads(full.read_text()).keys()
    assert (tmp_path / "runs" / "truncated" / "tiled" / "predictions").is_dir()
    trained_on = tmp_path / "runs" / "truncated" / "predictions" / "validation" / "quality.json"
    assert len(json.loads(trained_on.read_text())) == 8  # the training-only run scores 8 rows, nothing more
    assert all(0.0 <= float(row["exact_match"]) <= 100.0 for row in cells)
    assert {row["task"] for row in rows if row["contender"] == "naive"} == {
        "single_needle", "multi_key_needle", "variable_tracking", "aggregation"
    }  # fmt: skip
    report = csv_path.with_suffix(".md").read_text()
    assert "## variable_tracking (naive baseline" in report and "| s4d |" in report
    # The total counts each trained model once: "s4d (first 384)" is the s4d model again, not a third run.
    seconds = {row["contender"]: float(row["seconds"]) for row in rows if row["contender"] in ("s4d", "truncated")}
    total = seconds["s4d"] + seconds["truncated"]
    assert f"Train + eval time of the 2 contenders in all: {total:,.0f} s ({total / 60:.0f} min)." in report
    for task in ("single_needle", "aggregation"):
        assert (tmp_path / f"long_range_probe_quick_{task}.png").stat().st_size > 0

    capsys.readouterr()
    long_range_probe.main(["--quick", "--contenders", "s4d", "truncated", "--resume", "--out", str(tmp_path)])
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
        # ... and the state-space ones are also scored reading only the first `truncate` tokens.
        assert ("eval.truncated_source_lengths=[384]" in args) == (expected == "none"), contender


def test_command_line_narrows_the_setup(long_range_probe):
    args = long_range_probe.parse_args(["--tasks", "single_needle", "--lengths", "4096", "1024", "--steps", "7"])
    setup = long_range_probe.setup_from_args(args)
    assert (setup.tasks, setup.eval_lengths, setup.steps) == (("single_needle",), (1024, 4096), 7)
    assert setup.d_model == long_range_probe.Setup().d_model
    # Without --tasks: the single needle (the task every contender can learn in the default budget); --quick runs all.
    defaults = long_range_probe.setup_from_args(long_range_probe.parse_args([]))
    assert defaults.tasks == ("single_needle",) and long_range_probe.QUICK.tasks == long_range_probe.PROBE_TASKS
    seeded = long_range_probe.setup_from_args(long_range_probe.parse_args(["--seed", "2"]))
    assert defaults.seed == 0 and seeded.seed == 2
    args = long_range_probe.parse_args(["--tasks", "multi_key_needle", "aggregation"])
    assert long_range_probe.setup_from_args(args).tasks == ("multi_key_needle", "aggregation")
    assert defaults.training_tasks == ()
    args = long_range_probe.parse_args(["--tasks", "multi_key_needle", "--training-tasks", "multi_query_needle"])
    assert long_range_probe.setup_from_args(args).training_tasks == ("multi_query_needle",)
    with pytest.raises(SystemExit):
        long_range_probe.parse_args(["--tasks", "needle"])
    with pytest.raises(SystemExit):
        long_range_probe.parse_args(["--training-tasks", "single_needle"])


@pytest.mark.parametrize("family", ["scrolls_ssm", "led"])
def test_tiling_copies_the_trained_rows_over_the_rest_of_the_table(long_range_probe, tmp_path, family):
    from transformers import AutoModelForSeq2SeqLM, LEDConfig, LEDForConditionalGeneration

    from tests.conftest import tiny_model

    if family == "led":
        config = LEDConfig(
            vocab_size=120, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, attention_window=8,
            max_encoder_position_embeddings=40, max_decoder_position_embeddings=16,
        )  # fmt: skip
        model, name, offset = LEDForConditionalGeneration(config), "led.encoder.embed_positions.weight", 0
    else:
        model = tiny_model(max_source_positions=40)
        name, offset = "model.encoder.embed_positions.weight", 2
    model.save_pretrained(tmp_path)
    before = model.state_dict()[name].clone()
    long_range_probe.tile_learned_positions(tmp_path, period=12)
    after = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).state_dict()[name]
    assert after.shape == before.shape
    torch.testing.assert_close(after[: offset + 12], before[: offset + 12], rtol=0, atol=0)  # trained rows kept
    for position in (12, 23, 24, 39):
        torch.testing.assert_close(after[offset + position], before[offset + position % 12], rtol=0, atol=0)


def test_t5_family_contenders_are_t5_models_with_longt5_as_the_peer(long_range_probe, tmp_path):
    """--family t5: every contender is a T5-family model (T5 fields, no position table to tile), LongT5 replaces LED,
    and the family's files and folders end in _t5 so both families' sweeps share one output folder."""
    setup = long_range_probe.setup_from_args(long_range_probe.parse_args(["--quick", "--family", "t5"]))
    assert setup.family == "t5" and long_range_probe.family_suffix(setup) == "_t5"
    for contender in ("s4d", "gss-hybrid", "attention", "local-attention", "truncated"):
        args = long_range_probe.overrides(contender, setup, tmp_path, tmp_path, tmp_path / "run")
        assert "model.family=t5" in args, contender
        config = json.loads(next(arg for arg in args if arg.startswith("model.config=")).split("=", 1)[1])
        assert config["d_ff"] == setup.ffn_dim and config["num_decoder_layers"] == setup.decoder_layers
        assert "encoder_positions" not in config and not long_range_probe.tiles_positions(contender, setup)
    assert long_range_probe.tiles_positions("attention", long_range_probe.QUICK)  # the BART family's learned table
    assert "longt5" in long_range_probe.FAMILIES["t5"] and "led" not in long_range_probe.FAMILIES["t5"]
    # T5's full attention (a materialized relative bias) runs only when asked for by name.
    defaults = long_range_probe.DEFAULT_CONTENDERS
    assert "attention" in long_range_probe.FAMILIES["t5"] and "attention" not in defaults["t5"]
    assert defaults["bart"] == long_range_probe.FAMILIES["bart"]
    with pytest.raises(SystemExit, match="led: not a contender of --family t5"):
        long_range_probe.main(["--quick", "--family", "t5", "--contenders", "led", "--out", str(tmp_path)])


def test_the_longt5_peer_is_written_with_the_shared_tokenizer(long_range_probe, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    from scrolls_ssm.synthetic import train_sentencepiece_tokenizer

    setup = long_range_probe.setup_from_args(long_range_probe.parse_args(["--quick", "--family", "t5"]))
    texts = [f"the special magic number for the red fox is {n} ." for n in range(10000, 10400)]
    tokenizer = train_sentencepiece_tokenizer(texts, tmp_path / "spm", vocab_size=60, split_digits=True, style="t5")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    config = long_range_probe.model_config("longt5", setup)
    folder = long_range_probe.write_peer("longt5", setup, config, 784, tmp_path / "tokenizer", tmp_path / "peer")
    peer = AutoModelForSeq2SeqLM.from_pretrained(folder)
    assert type(peer).__name__ == "LongT5ForConditionalGeneration"
    assert peer.config.encoder_attention_type == "transient-global" and peer.config.local_radius == setup.window
    assert (peer.config.num_layers, peer.config.d_model, peer.config.vocab_size) == (2, 32, len(tokenizer))
    assert (peer.config.pad_token_id, peer.config.eos_token_id, peer.config.decoder_start_token_id) == (0, 1, 0)


def test_a_quick_t5_family_sweep_trains_and_scores_longt5_and_s4d(long_range_probe, tmp_path):
    csv_path = long_range_probe.main(
        ["--quick", "--family", "t5", "--contenders", "longt5", "s4d", "--out", str(tmp_path)]
    )
    assert csv_path.name == "long_range_probe_quick_t5.csv"
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    setup = long_range_probe.QUICK
    expected = 3 * len(setup.eval_lengths) * len(setup.depths) + len(setup.eval_lengths)
    for contender in ("longt5", "s4d", "s4d (first 384)"):
        cells = [row for row in rows if row["contender"] == contender]
        assert len(cells) == expected and all(row["status"] == "ok" for row in cells), rows
    config = json.loads((tmp_path / "runs_t5" / "s4d" / "model" / "config.json").read_text())
    assert config["model_type"] == "scrolls_ssm_t5" and config["encoder_layer_types"] == ["s4d", "s4d"]
    assert "T5Tokenizer" in (tmp_path / "tokenizer_t5" / "tokenizer_config.json").read_text()


def test_heatmap_cells_of_resumed_and_fresh_rows_line_up(long_range_probe):
    """--resume mixes rows read back from the CSV (numbers as text) with fresh ones (numbers): one depth axis."""
    import math

    report = importlib.import_module("probe_report")
    kept = {"task": "single_needle", "status": "ok", "contender": "s4d"}
    rows = [{**kept, "length": "1024", "depth": "0", "exact_match": "100.0"}]
    rows += [{**kept, "length": "4096", "depth": "50", "exact_match": "25.0"}]
    rows += [{**kept, "contender": "led", "length": 1024, "depth": 0, "exact_match": 75.0}]
    rows += [{**kept, "contender": "led", "length": 4096, "depth": 50, "exact_match": 0.0}]
    lengths, depths, grids = report.heatmap_grids(rows, "single_needle")
    assert (lengths, depths, list(grids)) == ([1024, 4096], ["0", "50"], ["s4d", "led"])
    assert grids["s4d"][0][0] == 100.0 and grids["s4d"][1][1] == 25.0
    assert grids["led"][0][0] == 75.0 and grids["led"][1][1] == 0.0
    assert math.isnan(grids["s4d"][0][1]) and math.isnan(grids["led"][1][0])
