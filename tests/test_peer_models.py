"""Peers in the training loop: a transformers LED (or BART) checkpoint given as `model.init_from` trains, evaluates
and predicts through the same loop as the toolkit's own models, so baselines are measured with the same recipe."""

from __future__ import annotations

import json
import math

import torch
from transformers import AutoModelForSeq2SeqLM, LEDConfig, LEDForConditionalGeneration

from scrolls_ssm.build import encoder_length_limit, uses_global_attention
from scrolls_ssm.config import load_run_config
from scrolls_ssm.preprocess import Seq2SeqCollator
from scrolls_ssm.train import train
from tests.conftest import TINY, train_tokenizer
from tests.training_fixtures import LABELS, scrolls_rows, write_task_data


def write_tiny_led(root, vocab_texts):
    tokenizer = train_tokenizer(vocab_texts, vocab_size=150)
    torch.manual_seed(0)
    fields = {key: value for key, value in TINY.items() if key != "max_position_embeddings"}
    config = LEDConfig(
        **{**fields, "vocab_size": len(tokenizer)},
        attention_window=16,
        max_encoder_position_embeddings=96,
        max_decoder_position_embeddings=32,
    )
    LEDForConditionalGeneration(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def test_collator_sets_global_attention_on_the_first_token_only_when_asked():
    rows = [
        {"input_ids": [0, 5, 6, 2], "attention_mask": [1, 1, 1, 1]},
        {"input_ids": [0, 7, 2], "attention_mask": [1, 1, 1]},
    ]
    plain = Seq2SeqCollator(1)(rows)
    assert "global_attention_mask" not in plain
    batch = Seq2SeqCollator(1, pad_to_multiple_of=8, global_attention_first_token=True)(rows)
    assert batch["global_attention_mask"].tolist() == [[1] + [0] * 7, [1] + [0] * 7]


def test_an_led_checkpoint_trains_and_predicts_through_the_loop(tmp_path):
    texts = [row["input"] + " " + row["output"] for row in scrolls_rows("train", 60, seed=1)]
    led = write_tiny_led(tmp_path / "led", texts + LABELS * 5)
    model = AutoModelForSeq2SeqLM.from_pretrained(led)
    assert uses_global_attention(model) and encoder_length_limit(model.config) == 96
    data = write_task_data(tmp_path / "data")
    out = tmp_path / "run"
    cfg = load_run_config(
        None,
        [
            "model.base=null",
            f"model.init_from={led}",
            f"data.data_dir={data}",
            "data.tasks=[contract_nli]",
            "data.max_tokens_per_batch=300",
            f"train.output_dir={out}",
            "train.max_steps=3",
            "train.learning_rate=2e-3",
            "train.log_every_steps=1",
        ],
    )
    results = train(cfg)
    trained = AutoModelForSeq2SeqLM.from_pretrained(out / "model")
    assert isinstance(trained, LEDForConditionalGeneration)
    assert not torch.equal(trained.lm_head.weight, model.lm_head.weight)  # it trained
    predictions = json.loads((out / "predictions" / "validation" / "contract_nli.json").read_text())
    assert len(predictions) == 9 and results["contract_nli"]["validation"]["num_predicted"] == 9
    losses = [
        r["train/loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "train/loss" in r
    ]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)  # logged every step
