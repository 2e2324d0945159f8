"""Hub publishing, offline: the model card, the dry-run folder, the commit sent, token hygiene and loading back.

The network is never reached: `HfApi.create_repo` and `HfApi.create_commit`, the two calls `push_to_hub` makes, are
replaced by recorders that keep what they were given (the commit's file bytes are read while the call runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import CommitInfo, HfApi, ModelCard

from scrolls_ssm import ScrollsSSMForConditionalGeneration
from scrolls_ssm.hub import (
    CARD_MARKER,
    HubUploadError,
    ModelDirError,
    add_push_arguments,
    build_model_card,
    compact_layout,
    prepare_upload_folder,
    push_to_hub,
    run_push,
)
from tests.conftest import tiny_model

REPO_ID = "someone/bart-tiny-ssm-scrolls"
TOKEN = "hf_TESTTOKENdoNotLeakThis0123456789"
COMMIT_URL = f"https://huggingface.co/{REPO_ID}/commit/0123abcd"
RUN_CONFIG = {
    "recipe": "gov_report",
    "model": {"base": "facebook/bart-base", "encoder_layer_types": ["attention", "attention"]},
    "data": {"tasks": ["gov_report", "qasper", "quality"], "max_source_length": 128},
    "train": {"learning_rate": 2e-4, "num_epochs": 10, "mixed_precision": "bf16"},
}
METRICS = {
    "gov_report": {
        "validation": {
            "rouge/rouge1": 47.9,
            "rouge/rouge2": 18.6,
            "rouge/rougeL": 22.7,
            "rouge/rougeLsum": None,
            "rouge/geometric_mean": 27.4567,
            "num_predicted": 972,
            "mean_prediction_length_characters": 3012.5,
            "scrolls_score": 27.4567,
        }
    },
    "qasper": {"validation": {"f1": 26.3, "num_predicted": 1726, "scrolls_score": 26.3}},
    "quality": {
        "validation": {"exact_match": 26.0, "scrolls_score": 26.0},
        "test": {"exact_match": 25.5, "scrolls_score": 25.5},
    },
}
# metrics.json key -> model-index metric type; the other keys (counts, lengths, scrolls_score, nulls) stay out.
INDEXED = {
    "rouge/rouge1": "rouge1",
    "rouge/rouge2": "rouge2",
    "rouge/rougeL": "rougeL",
    "rouge/geometric_mean": "rouge_geometric_mean",
    "f1": "f1",
    "exact_match": "exact_match",
}


def _tiny_model() -> ScrollsSSMForConditionalGeneration:
    return tiny_model(encoder_layer_types=["attention", "attention"], dropout=0.1)


@pytest.fixture
def model(tmp_path, tokenizer):
    """A trained-run model directory as the training loop writes it, plus files that must not be published."""
    directory = tmp_path / "run" / "model"
    net = _tiny_model()
    net.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "run_config.yaml").write_text(yaml.safe_dump(RUN_CONFIG))
    (directory / "metrics.json").write_text(json.dumps(METRICS))
    (directory / "optimizer.bin").write_bytes(b"optimizer state")
    (directory / "checkpoint-100").mkdir()
    return directory, net


@pytest.fixture
def hub(monkeypatch):
    """Replace the Hub's two write calls with recorders; `hub["fail"]` makes create_commit raise that exception."""
    calls: dict = {"create_repo": [], "create_commit": [], "fail": None}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"].append({"repo_id": repo_id, **kwargs})

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for op in operations:
            source = op.path_or_fileobj
            files[op.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()
        calls["create_commit"].append({"repo_id": repo_id, "files": files, **kwargs})
        if calls["fail"] is not None:
            raise calls["fail"]
        return CommitInfo(commit_url=COMMIT_URL, commit_message="", commit_description="", oid="0123abcd")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


def _metadata(readme: Path) -> dict:
    _, front, _ = readme.read_text(encoding="utf-8").split("---\n", 2)
    return yaml.safe_load(front)


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


# --- dry run ---------------------------------------------------------------------------------------------------------


def test_dry_run_folder_holds_every_file_of_the_repo(model, tmp_path, hub):
    directory, _ = model
    out = Path(push_to_hub(directory, REPO_ID, token=TOKEN, dry_run_dir=tmp_path / "upload"))
    code = {path.name for path in directory.glob("*.py")}
    assert {"configuration_scrolls_ssm.py", "modeling_scrolls_ssm.py", "mixers.py"} <= code
    expected = code | {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "run_config.yaml",
        "metrics.json",
        "README.md",
    }
    assert {path.name for path in out.iterdir()} == expected  # no optimizer.bin, no checkpoint-100/
    for name in expected - {"README.md"}:
        assert (out / name).read_bytes() == (directory / name).read_bytes(), name
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForSeq2SeqLM"] == (
        "modeling_scrolls_ssm.ScrollsSSMForConditionalGeneration"
    )
    assert hub["create_repo"] == [] and hub["create_commit"] == []
    assert not [path for path in out.parent.iterdir() if path.name.startswith(".")]  # no staging left behind


def test_dry_run_replaces_its_own_output_and_refuses_anything_else(model, tmp_path):
    directory, _ = model
    out = tmp_path / "upload"
    prepare_upload_folder(directory, out, REPO_ID)
    prepare_upload_folder(directory, out, REPO_ID, license="apache-2.0")
    assert _metadata(out / "README.md")["license"] == "apache-2.0"

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    with pytest.raises(ModelDirError, match=f"{foreign}.*not empty.*pick a new folder"):
        prepare_upload_folder(directory, foreign, REPO_ID)
    assert [path.name for path in foreign.iterdir()] == ["todo.txt"]

    (out / "extra").mkdir()  # a sub-folder: no longer only what a dry run writes
    with pytest.raises(ModelDirError, match="not an earlier dry-run folder"):
        prepare_upload_folder(directory, out, REPO_ID)
    with pytest.raises(ModelDirError, match="outside the model directory"):
        prepare_upload_folder(directory, directory.parent, REPO_ID)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare_upload_folder(directory, empty, REPO_ID) == empty and (empty / "README.md").is_file()


def test_failed_dry_run_leaves_no_folder(model, tmp_path, monkeypatch):
    directory, _ = model
    copied = []

    def copy_then_fail(source, destination):
        if copied:
            raise OSError("disk full")
        copied.append(Path(destination).write_bytes(Path(source).read_bytes()))

    monkeypatch.setattr("scrolls_ssm.hub.shutil.copyfile", copy_then_fail)
    with pytest.raises(OSError, match="disk full"):
        prepare_upload_folder(directory, tmp_path / "upload", REPO_ID)
    assert not (tmp_path / "upload").exists()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".upload")]


# --- model card ------------------------------------------------------------------------------------------------------


def test_card_metadata_and_model_index(model, tmp_path):
    directory, _ = model
    out = prepare_upload_folder(directory, tmp_path / "upload", REPO_ID, license="apache-2.0")
    meta = _metadata(out / "README.md")
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text2text-generation"  # QA tasks among them
    assert {"scrolls", "long-context", "state-space-model", "attention"} <= set(meta["tags"])
    assert meta["datasets"] == ["tau/scrolls"]
    assert meta["base_model"] == "facebook/bart-base"
    assert meta["license"] == "apache-2.0"

    (index,) = meta["model-index"]
    assert index["name"] == REPO_ID.split("/")[1]
    found = {}
    for result in index["results"]:
        assert result["dataset"]["type"] == "tau/scrolls" and result["dataset"]["name"] == "SCROLLS"
        for metric in result["metrics"]:
            key = (result["dataset"]["config"], result["dataset"]["split"], metric["type"])
            found[key] = (result["task"]["type"], metric["value"])
    task_types = {"gov_report": "summarization", "qasper": "question-answering", "quality": "multiple-choice"}
    expected = {
        (task, split, INDEXED[key]): (task_types[task], value)
        for task, splits in METRICS.items()
        for split, values in splits.items()
        for key, value in values.items()
        if key in INDEXED and value is not None
    }
    assert found == expected
    card = ModelCard.load(out / "README.md")  # and huggingface_hub reads its own model-index back
    assert len(card.data.eval_results) == len(expected)


def test_card_body_explains_layout_training_results_and_loading(model):
    directory, _ = model
    config = json.loads((directory / "config.json").read_text())
    config["encoder_layer_types"] = ["s4d"] * 5 + ["attention"]  # the card reads the layout from config.json
    (directory / "config.json").write_text(json.dumps(config))
    card = build_model_card(directory, REPO_ID)
    text = card.text
    assert text.lstrip().startswith(CARD_MARKER)
    assert "5 x s4d + 1 x attention" in text and "| 5 | attention |" in text
    assert {"s4d", "attention"} <= set(card.data.tags)
    assert "[facebook/bart-base](https://huggingface.co/facebook/bart-base)" in text
    assert "Recipe: gov_report" in text and "Learning rate: 0.0002" in text and "Mixed precision: bf16" in text
    assert "| gov_report | validation | 27.4567 (ROUGE geometric mean) |" in text
    assert "| quality | test | 25.5 (Exact match) |" in text
    assert "AutoModelForSeq2SeqLM.from_pretrained(repo_id, trust_remote_code=True)" in text
    assert "AutoTokenizer.from_pretrained(repo_id, trust_remote_code=True)" in text  # it reads the config too
    assert f'repo_id = "{REPO_ID}"' in text and "pip install scrolls-ssm" in text and "import scrolls_ssm" in text
    assert "max_length=128" in text  # data.max_source_length, below the encoder's 256 positions
    assert 'question + "\\n\\n" + paper' in text


def test_card_without_run_config_or_metrics_says_so(model):
    directory, _ = model
    (directory / "run_config.yaml").unlink()
    (directory / "metrics.json").unlink()
    card = build_model_card(directory, REPO_ID)
    assert "No run_config.yaml was found" in card.text and "No metrics.json was found" in card.text
    meta = card.data.to_dict()
    assert "model-index" not in meta and "base_model" not in meta
    assert meta["pipeline_tag"] == "text2text-generation"
    assert "max_length=256" in card.text  # falls back to the encoder's max_source_positions


def test_summarization_runs_get_the_summarization_pipeline_tag(model):
    directory, _ = model
    run = {**RUN_CONFIG, "data": {"tasks": ["gov_report", "qmsum"], "max_source_length": 128}}
    (directory / "run_config.yaml").write_text(yaml.safe_dump(run))
    (directory / "metrics.json").unlink()
    assert build_model_card(directory, REPO_ID).data.pipeline_tag == "summarization"


def test_synthetic_demo_runs_are_not_indexed_as_scrolls(model, tmp_path):
    directory, _ = model
    local_base = tmp_path / "my-bart"
    local_base.mkdir()
    run = {**RUN_CONFIG, "model": {"base": str(local_base)}, "data": {**RUN_CONFIG["data"], "synthetic": {"n": 8}}}
    (directory / "run_config.yaml").write_text(yaml.safe_dump(run))
    card = build_model_card(directory, REPO_ID)
    meta = card.data.to_dict()
    assert "model-index" not in meta and "datasets" not in meta
    assert "base_model" not in meta  # a local path is no Hub id
    assert "synthetic demo data" in card.text and f"`{local_base}`" in card.text


def test_local_data_runs_say_where_the_scores_come_from_and_are_not_indexed(model, tmp_path):
    directory, _ = model
    data_dir = tmp_path / "my-scrolls"
    run = {**RUN_CONFIG, "data": {**RUN_CONFIG["data"], "data_dir": str(data_dir)}}
    (directory / "run_config.yaml").write_text(yaml.safe_dump(run))
    card = build_model_card(directory, REPO_ID)
    meta = card.data.to_dict()
    assert "model-index" not in meta and "datasets" not in meta
    assert meta["base_model"] == "facebook/bart-base"
    assert (
        f"fine-tuned on local data in the SCROLLS format from `{data_dir}` (gov_report, qasper, quality)" in card.text
    )
    assert f"- Data: local files at `{data_dir}`" in card.text
    assert f"These scores come from the local data at `{data_dir}` on the machine that trained the model" in card.text
    assert "tau/scrolls" in card.text and "| qasper | validation | 26.3 (F1) |" in card.text  # the table stays


def test_hub_data_runs_are_indexed_as_tau_scrolls(model):
    directory, _ = model
    run = {**RUN_CONFIG, "data": {**RUN_CONFIG["data"], "data_dir": None}}
    (directory / "run_config.yaml").write_text(yaml.safe_dump(run))
    card = build_model_card(directory, REPO_ID)
    assert card.data.to_dict()["datasets"] == ["tau/scrolls"] and len(card.data.eval_results) == 7
    assert "fine-tuned on SCROLLS (the tau/scrolls dataset on the Hub)" in card.text
    assert "- Data: [tau/scrolls](https://huggingface.co/datasets/tau/scrolls)" in card.text


def test_metrics_without_a_run_config_are_not_indexed(model):
    directory, _ = model
    (directory / "run_config.yaml").unlink()
    card = build_model_card(directory, REPO_ID)
    assert "model-index" not in card.data.to_dict() and "datasets" not in card.data.to_dict()
    assert "The data they come from was not recorded (no run_config.yaml)" in card.text


@pytest.mark.parametrize(
    ("layer_types", "expected"),
    [
        (["s4d"] * 5 + ["attention"], "5 x s4d + 1 x attention"),
        (["mamba2"] * 12, "12 x mamba2"),
        (["gss", "gss", "gss", "attention"] * 3, "(3 x gss + 1 x attention) x 3"),
        (["s4d", "attention", "s4d"], "1 x s4d + 1 x attention + 1 x s4d"),
    ],
)
def test_compact_layout(layer_types, expected):
    assert compact_layout(layer_types) == expected


# --- checks before any network call ----------------------------------------------------------------------------------


def test_unusable_model_dirs_fail_before_any_network_call(model, tmp_path, hub):
    directory, _ = model
    with pytest.raises(ModelDirError, match=f"{tmp_path / 'nowhere'} does not exist.*model/"):
        push_to_hub(tmp_path / "nowhere", REPO_ID, token=TOKEN)

    (directory / "metrics.json").write_text(json.dumps({"gov_reprt": {}}))
    with pytest.raises(ModelDirError, match="metrics.json: unknown SCROLLS task 'gov_reprt'"):
        push_to_hub(directory, REPO_ID, token=TOKEN)
    (directory / "metrics.json").write_text(json.dumps({"qasper": {"validation": {"f1": "high"}}}))
    with pytest.raises(ModelDirError, match=r"qasper\.validation\.f1='high' is not a number"):
        push_to_hub(directory, REPO_ID, token=TOKEN)
    (directory / "metrics.json").unlink()

    (directory / "model.safetensors").unlink()
    with pytest.raises(ModelDirError, match=f"{directory} has no \\*.safetensors weights.*save_pretrained"):
        push_to_hub(directory, REPO_ID, token=TOKEN)

    config = json.loads((directory / "config.json").read_text())
    del config["auto_map"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelDirError, match="no auto_map.*trust_remote_code.*import scrolls_ssm"):
        push_to_hub(directory, REPO_ID, token=TOKEN)

    (directory / "config.json").unlink()
    with pytest.raises(ModelDirError, match=f"{directory} has no config.json.*save_pretrained"):
        push_to_hub(directory, REPO_ID, token=TOKEN)
    assert hub["create_repo"] == [] and hub["create_commit"] == []


# --- push ------------------------------------------------------------------------------------------------------------


def test_push_commits_exactly_the_dry_run_folder(model, tmp_path, hub):
    directory, _ = model
    dry = Path(push_to_hub(directory, REPO_ID, dry_run_dir=tmp_path / "upload"))
    url = push_to_hub(directory, REPO_ID, token=TOKEN, private=True, revision="v1", commit_message="first model")
    assert url == COMMIT_URL
    assert hub["create_repo"] == [{"repo_id": REPO_ID, "private": True, "exist_ok": True, "repo_type": "model"}]
    (commit,) = hub["create_commit"]
    assert commit["repo_id"] == REPO_ID and commit["revision"] == "v1" and commit["repo_type"] == "model"
    assert commit["commit_message"] == "first model"
    assert commit["files"].keys() == _folder_bytes(dry).keys()
    assert commit["files"] == _folder_bytes(dry)


@pytest.mark.parametrize("token_from", ["argument", "environment"])
def test_token_never_appears_in_errors_logs_or_output(model, hub, caplog, capsys, monkeypatch, token_from):
    directory, _ = model
    caplog.set_level(logging.DEBUG)
    if token_from == "environment":
        monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub["fail"] = RuntimeError(f"401 Client Error: Unauthorized (Authorization: Bearer {TOKEN})")
    parser = argparse.ArgumentParser()
    add_push_arguments(parser)
    argv = ["--model-dir", str(directory), "--repo-id", REPO_ID, "--private"]
    args = parser.parse_args(argv + (["--token", TOKEN] if token_from == "argument" else []))
    with pytest.raises(HubUploadError) as raised:
        run_push(args)
    error = raised.value
    shown = "".join(traceback.format_exception(error))
    assert "401 Client Error" in shown and "<redacted token>" in shown
    assert error.__cause__ is None and error.__suppress_context__
    captured = capsys.readouterr()
    for text in (shown, repr(error.args), captured.out, captured.err, caplog.text):
        assert TOKEN not in text
    assert hub["create_repo"][0]["private"] is True


def test_hub_errors_without_the_token_keep_their_cause(model, hub):
    directory, _ = model
    hub["fail"] = RuntimeError("404 Client Error: Revision Not Found")
    with pytest.raises(HubUploadError, match=f"pushing .* to {REPO_ID}@nope failed.*Revision Not Found") as raised:
        push_to_hub(directory, REPO_ID, token=TOKEN, revision="nope")
    assert raised.value.__cause__ is hub["fail"]


def test_cli_dry_run(model, tmp_path, capsys, hub):
    directory, _ = model
    parser = argparse.ArgumentParser()
    add_push_arguments(parser)
    args = parser.parse_args(["--model-dir", str(directory), "--repo-id", REPO_ID, "--dry-run", str(tmp_path / "up")])
    assert run_push(args) == 0
    assert f"wrote {tmp_path / 'up'}" in capsys.readouterr().out
    assert (tmp_path / "up" / "README.md").is_file() and hub["create_commit"] == []


# --- loading what would be uploaded ----------------------------------------------------------------------------------


def test_upload_folder_loads_back_with_the_same_logits(model, tmp_path, tokenizer):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    directory, net = model
    folder = prepare_upload_folder(directory, tmp_path / "upload", REPO_ID)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
    batch = AutoTokenizer.from_pretrained(folder)(
        ["the cat sat on a mat", "long documents"], padding=True, return_tensors="pt"
    )
    decoder_input_ids = torch.tensor([[2, 0, 5, 7], [2, 0, 9, 1]])
    with torch.no_grad():
        expected = net(**batch, decoder_input_ids=decoder_input_ids).logits
        got = loaded(**batch, decoder_input_ids=decoder_input_ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.slow  # a fresh interpreter importing torch and transformers: ~10 s
def test_upload_folder_loads_with_remote_code_only(model, tmp_path):
    """What Hub users get: the folder loads in a process where scrolls_ssm cannot be imported."""
    directory, net = model
    folder = prepare_upload_folder(directory, tmp_path / "upload", REPO_ID)
    ids = torch.tensor([[0, 11, 12, 13, 2]])
    with torch.no_grad():
        expected = net(input_ids=ids, decoder_input_ids=ids).logits.sum().item()
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.modules["scrolls_ssm"] = None
        from transformers import AutoModelForSeq2SeqLM
        model = AutoModelForSeq2SeqLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        ids = torch.tensor({ids.tolist()})
        with torch.no_grad():
            print(model(input_ids=ids, decoder_input_ids=ids).logits.sum().item())
        """
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.strip().splitlines()[-1]) == pytest.approx(expected, abs=1e-5)
