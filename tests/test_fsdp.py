"""FSDP2 (`torch.distributed.fsdp.fully_shard`) over two gloo processes on CPU: the project's saving and evaluation
code on a sharded model gives the weights and predictions of the unsharded model."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from scrolls_ssm import ScrollsSSMForConditionalGeneration
from tests.conftest import tiny_config
from tests.fsdp_worker import evaluate_and_save
from tests.training_fixtures import torchrun_two_processes, write_task_data, write_tiny_bart


def test_fsdp2_sharded_model_saves_full_weights_and_predicts_like_one_process(tmp_path):
    data, model_dir = write_task_data(tmp_path / "data"), tmp_path / "model"
    tokenizer = AutoTokenizer.from_pretrained(write_tiny_bart(tmp_path / "bart"))
    special = {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 2}
    # init_std 0.2: a random model that does not end every row at its first token (as with BART's 0.02).
    config = tiny_config(vocab_size=len(tokenizer), max_source_positions=96, init_std=0.2, **special)
    torch.manual_seed(0)
    model = ScrollsSSMForConditionalGeneration(config)
    # Generation also stops at "?": some rows end after a few tokens and others run to max_new_tokens, so the two
    # processes' generate calls last different numbers of steps (what synced_gpus is for).
    model.generation_config.eos_token_id = [2, tokenizer.convert_tokens_to_ids("?")]
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    sharded = tmp_path / "sharded"
    torchrun_two_processes("fsdp_worker.py", [str(model_dir), str(data), str(sharded)], 180, "FSDP")
    got = json.loads((sharded / "result.json").read_text())

    single = evaluate_and_save(
        AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval(), model_dir, data, tmp_path / "single", Accelerator()
    )
    assert got["predictions"] == single["predictions"] and len(got["predictions"]) == 9
    stopped_early = {text.endswith("?") for text in got["predictions"].values()}
    assert stopped_early == {True, False}, "generations must differ in length for this test to mean anything"
    assert got["loss"] == pytest.approx(single["loss"], rel=1e-5)
    want, saved = load_file(model_dir / "model.safetensors"), load_file(sharded / "model" / "model.safetensors")
    assert saved.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(saved[name], want[name], rtol=0, atol=0, msg=name)
