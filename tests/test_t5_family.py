"""The T5 family as a base: swap_encoder on random-init T5 (v1.0 and v1.1 / Flan), mT5, umT5 and LongT5 (local and
transient-global), equivalence to transformers' own models, what a swap keeps, generate, padding, long inputs, saving
and loading (Auto classes, trust_remote_code), bf16, and the errors."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import (
    AutoModelForSeq2SeqLM,
    LongT5Config,
    LongT5ForConditionalGeneration,
    MT5Config,
    MT5ForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
    UMT5Config,
    UMT5ForConditionalGeneration,
)

from scrolls_ssm import ScrollsSSMT5Config, ScrollsSSMT5ForConditionalGeneration, swap_encoder
from tests.conftest import remote_code_loss

SIZE = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_decoder_layers=2, num_heads=4)
SIZE["decoder_start_token_id"] = 0  # as every T5-family checkpoint's config says
# A LongT5 window shorter than the test inputs, so that blocks, their neighbours and the global tokens all matter.
LONG = dict(local_radius=5, global_block_size=4)

SOURCES = {
    "t5": lambda: T5ForConditionalGeneration(T5Config(**SIZE)),
    # T5 v1.1 / Flan-T5: gated-GELU FFN, untied embeddings in the config (no decoder-output scaling)
    "flan-t5": lambda: T5ForConditionalGeneration(
        T5Config(**SIZE, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    ),
    "mt5": lambda: MT5ForConditionalGeneration(MT5Config(**SIZE, feed_forward_proj="gated-gelu")),
    "umt5": lambda: UMT5ForConditionalGeneration(UMT5Config(**SIZE, feed_forward_proj="gated-gelu")),
    "longt5-local": lambda: LongT5ForConditionalGeneration(LongT5Config(**SIZE, **LONG)),
    "longt5-tglobal": lambda: LongT5ForConditionalGeneration(
        LongT5Config(**SIZE, **LONG, encoder_attention_type="transient-global", feed_forward_proj="gated-gelu")
    ),
}


def source_model(name: str):
    torch.manual_seed(0)
    return SOURCES[name]().eval()


def batch(seq: int = 23, seed: int = 0):
    """Two rows, the second right-padded by 7 tokens; ids avoid pad (0) and eos (1)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, SIZE["vocab_size"], (2, seq), generator=g)
    mask = torch.ones_like(input_ids)
    mask[1, seq - 7 :] = 0
    return input_ids, mask, torch.randint(2, SIZE["vocab_size"], (2, 6), generator=g)


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_all_attention_swap_gives_the_original_logits(name):
    source = source_model(name)
    model = swap_encoder(source, ["attention"] * 3).eval()
    assert isinstance(model, ScrollsSSMT5ForConditionalGeneration)
    assert model.config.t5_family == source.config.model_type
    input_ids, mask, labels = batch()
    with torch.no_grad():
        expected = source(input_ids=input_ids, attention_mask=mask, labels=labels)
        actual = model(input_ids=input_ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(actual.loss, expected.loss, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["flan-t5", "longt5-tglobal"])
def test_generate_matches_the_original(name):
    source = source_model(name)
    model = swap_encoder(source, ["attention"] * 3).eval()
    input_ids, mask, _ = batch()
    options = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    expected = source.generate(input_ids, **options)
    torch.testing.assert_close(model.generate(input_ids, **options), expected, rtol=0, atol=0)
    beams = model.generate(input_ids, num_beams=3, **options)
    torch.testing.assert_close(beams, source.generate(input_ids, num_beams=3, **options), rtol=0, atol=0)


def test_swap_keeps_norms_ffns_decoder_and_moves_the_position_table_to_the_first_attention_layer():
    source = source_model("flan-t5")
    model = swap_encoder(source, ["s4d", "attention", "mamba2"], mamba2_headdim=16)
    theirs, ours = source.state_dict(), model.state_dict()
    for i in range(3):
        assert torch.equal(
            ours[f"model.encoder.layers.{i}.mixer_layer_norm.weight"],
            theirs[f"encoder.block.{i}.layer.0.layer_norm.weight"],
        )
        for name in ("DenseReluDense.wi_0.weight", "DenseReluDense.wo.weight", "layer_norm.weight"):
            assert torch.equal(
                ours[f"model.encoder.layers.{i}.ff.{name}"], theirs[f"encoder.block.{i}.layer.1.{name}"]
            )
    attention = "encoder.block.{}.layer.0.SelfAttention.{}.weight"
    for proj in "qkvo":
        assert torch.equal(ours[f"model.encoder.layers.1.mixer.{proj}.weight"], theirs[attention.format(1, proj)])
    # block 0 held T5's shared relative position table; block 0 is now S4D, so attention layer 1 holds it
    assert torch.equal(
        ours["model.encoder.layers.1.mixer.relative_attention_bias.weight"],
        theirs[attention.format(0, "relative_attention_bias")],
    )
    assert torch.equal(ours["model.encoder.final_layer_norm.weight"], theirs["encoder.final_layer_norm.weight"])
    decoder = [name for name in theirs if name.startswith("decoder.") and "embed_tokens" not in name]
    assert decoder and all(torch.equal(ours[f"model.{name}"], theirs[name]) for name in decoder)
    assert torch.equal(ours["model.shared.weight"], theirs["shared.weight"])


def test_the_shared_position_bias_reaches_a_later_attention_layer():
    """With the table moved from block 0 to the first attention layer, an all-attention model whose layers are then
    swapped still gives attention layer 2 the pretrained bias: compare with the original run layer by layer."""
    source = source_model("t5")
    model = swap_encoder(source, ["s4d", "attention", "attention"]).eval()
    input_ids, mask, _ = batch()
    hidden = torch.randn(2, input_ids.shape[1], SIZE["d_model"])
    with torch.no_grad():
        encoder = model.get_encoder()
        inputs = encoder._attention_inputs(hidden, mask)
        _, bias, _ = encoder.layers[1](hidden, mask, inputs, None)
        ours, _, _ = encoder.layers[2](hidden, mask, inputs, bias)
        block = source.encoder.block[2]
        reference_bias = source.encoder.block[0].layer[0].SelfAttention.compute_bias(hidden.shape[1], hidden.shape[1])
        theirs = block(hidden, inputs, reference_bias)[0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("layers", [["s4d", "mamba2", "attention"], ["gss", "mamba", "s4d"]])
def test_padding_invariance_with_state_space_layers(layers):
    model = swap_encoder(source_model("longt5-tglobal"), layers, mamba2_headdim=16).eval()
    input_ids, mask, labels = batch()
    real = int(mask[1].sum())
    with torch.no_grad():
        padded = model(input_ids=input_ids, attention_mask=mask, labels=labels).logits[1]
        alone = model(input_ids=input_ids[1:, :real], labels=labels[1:]).logits[0]
    torch.testing.assert_close(padded, alone, rtol=0, atol=2e-5)


def test_sixteen_thousand_tokens_forward_and_backward_with_state_space_layers():
    config = ScrollsSSMT5Config(
        **{**SIZE, "d_model": 16, "d_kv": 4, "d_ff": 16},
        encoder_layer_types=["s4d", "mamba2", "attention"],
        encoder_attention_type="local",
        local_radius=64,
        mamba2_headdim=8,
        s4d_d_state=16,
        mamba2_d_state=16,
    )
    torch.manual_seed(0)
    model = ScrollsSSMT5ForConditionalGeneration(config)
    input_ids = torch.randint(2, SIZE["vocab_size"], (1, 16384))
    loss = model(input_ids=input_ids, labels=input_ids[:, :8]).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.get_encoder().layers[0].mixer.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_no_length_ceiling_unless_one_is_set():
    model = swap_encoder(source_model("t5"), ["s4d", "s4d", "attention"], max_source_positions=None).eval()
    assert model.config.max_source_positions is None
    input_ids = torch.randint(2, SIZE["vocab_size"], (1, 700))
    with torch.no_grad():
        model(input_ids=input_ids, decoder_input_ids=input_ids[:, :3])
    limited = swap_encoder(source_model("t5"), ["s4d", "s4d", "attention"], max_source_positions=512)
    with pytest.raises(ValueError, match=r"700 tokens.*max_source_positions=512.*no position table"):
        limited(input_ids=input_ids, decoder_input_ids=input_ids[:, :3])


def test_attention_window_becomes_local_attention_with_that_radius():
    source = source_model("t5")
    model = swap_encoder(source, ["attention"] * 3, attention_window=4).eval()
    assert model.config.encoder_attention_type == "local" and model.config.local_radius == 4
    # a window that covers the whole input is full attention: the original's logits
    wide = swap_encoder(source, ["attention"] * 3, attention_window=64).eval()
    input_ids, mask, labels = batch()
    with torch.no_grad():
        expected = source(input_ids=input_ids, attention_mask=mask, labels=labels).logits
        torch.testing.assert_close(wide(input_ids=input_ids, attention_mask=mask, labels=labels).logits, expected)
        narrow = model(input_ids=input_ids, attention_mask=mask, labels=labels).logits
    assert (narrow - expected).abs().max() > 1e-3  # a 4-token radius on 23 tokens is not full attention


def test_save_and_load_with_auto_classes(tmp_path):
    model = swap_encoder(source_model("longt5-tglobal"), ["s4d", "attention", "gss"]).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "scrolls_ssm_t5" and config["t5_family"] == "longt5"
    assert (
        config["auto_map"]["AutoModelForSeq2SeqLM"] == "modeling_scrolls_ssm_t5.ScrollsSSMT5ForConditionalGeneration"
    )
    loaded, info = AutoModelForSeq2SeqLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    input_ids, mask, labels = batch()
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=mask, labels=labels).logits
        torch.testing.assert_close(
            loaded.eval()(input_ids=input_ids, attention_mask=mask, labels=labels).logits, expected
        )
    assert loaded.config.scale_decoder_outputs == model.config.scale_decoder_outputs


def write_flan_style_checkpoint(folder):
    """A T5 v1.1 / Flan-T5-style checkpoint as those on the Hub are: `tie_word_embeddings: false` in config.json and an
    `lm_head.weight` of its own in the weights file (transformers 5 configs tie always; the file decides)."""
    from safetensors.torch import load_file, save_file

    source_model("flan-t5").save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    weights["lm_head.weight"] = torch.randn(weights["shared.weight"].shape, generator=torch.Generator().manual_seed(1))
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    return weights["lm_head.weight"]


def test_a_flan_t5_checkpoint_keeps_its_own_output_layer_through_swap_save_and_load(tmp_path, caplog):
    head = write_flan_style_checkpoint(tmp_path / "flan")
    original = T5ForConditionalGeneration.from_pretrained(tmp_path / "flan").eval()
    assert torch.equal(original.lm_head.weight, head)  # transformers keeps the checkpoint's own output layer
    model = swap_encoder(str(tmp_path / "flan"), ["attention"] * 3).eval()
    assert torch.equal(model.lm_head.weight, head) and model.lm_head.weight is not model.get_input_embeddings().weight
    assert not model.config.tie_word_embeddings and not model.config.scale_decoder_outputs
    input_ids, mask, labels = batch()
    with torch.no_grad():
        expected = original(input_ids=input_ids, attention_mask=mask, labels=labels).logits
        torch.testing.assert_close(model(input_ids=input_ids, attention_mask=mask, labels=labels).logits, expected)

    model.save_pretrained(tmp_path / "ours")
    caplog.clear()  # transformers' own T5 warns above that it did not tie the two; ours knows they differ
    with caplog.at_level("WARNING"):
        loaded, info = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not any(info.values()) and "tied weights" not in caplog.text, (info, caplog.text)
    assert torch.equal(loaded.lm_head.weight, head) and not loaded.config.tie_word_embeddings
    assert loaded.model.encoder.embed_tokens.weight is loaded.model.shared.weight  # the inputs still share one table
    assert loaded.model.decoder.embed_tokens.weight is loaded.model.shared.weight
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.eval()(input_ids=input_ids, attention_mask=mask, labels=labels).logits, expected
        )

    # T5 v1.0 (one table for inputs and outputs) stays tied, and saves one copy.
    tied = swap_encoder(source_model("t5"), ["s4d", "attention", "attention"])
    assert tied.config.tie_word_embeddings and tied.lm_head.weight is tied.get_input_embeddings().weight
    # A from-scratch config saying tie_word_embeddings=False gets an output layer of its own, initialized as T5's.
    scratch = ScrollsSSMT5ForConditionalGeneration(ScrollsSSMT5Config(**SIZE, tie_word_embeddings=False))
    assert scratch.lm_head.weight is not scratch.get_input_embeddings().weight
    assert 0.8 < scratch.lm_head.weight.std().item() < 1.2 and not scratch.config.scale_decoder_outputs


def test_trust_remote_code_load_without_the_package(tmp_path):
    model = swap_encoder(source_model("flan-t5"), ["mamba2", "attention", "s4d"], mamba2_headdim=16).eval()
    model.save_pretrained(tmp_path / "model")
    input_ids, mask, labels = batch()
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.item()
    loss = remote_code_loss(tmp_path / "model", input_ids, mask, labels, tmp_path)
    assert loss == pytest.approx(expected, abs=1e-6)


def test_a_bf16_autocast_training_step_on_cpu_has_a_finite_loss():
    model = swap_encoder(source_model("flan-t5"), ["s4d", "mamba2", "attention"], mamba2_headdim=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    input_ids, mask, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_config_errors_name_the_field_and_the_valid_values():
    with pytest.raises(
        StrictDataclassError, match=r"ScrollsSSMT5Config.t5_family='bart'.*'t5', 'mt5', 'umt5', 'longt5'"
    ):
        ScrollsSSMT5Config(t5_family="bart")
    with pytest.raises(StrictDataclassError, match=r"encoder_layer_types=\['s4d'\].*3 entries, as `num_layers`=3"):
        ScrollsSSMT5Config(num_layers=3, encoder_layer_types=["s4d"])
    with pytest.raises(StrictDataclassError, match=r"encoder_attention_type='transient-global'.*only LongT5"):
        ScrollsSSMT5Config(encoder_attention_type="transient-global")
    with pytest.raises(StrictDataclassError, match=r"encoder_attention_type='local'.*umT5"):
        ScrollsSSMT5Config(t5_family="umt5", encoder_attention_type="local")


def test_the_decoder_needs_decoder_inputs():
    model = swap_encoder(source_model("t5"), ["attention"] * 3)
    with pytest.raises(ValueError, match="decoder_start_token_id=0"):
        model(input_ids=batch()[0])


# --- tokenizers and the training loop --------------------------------------------------------------------------------


def test_a_t5_style_sentencepiece_tokenizer_trains_and_loads_offline(tmp_path):
    from transformers import AutoTokenizer, T5Tokenizer

    from scrolls_ssm.synthetic import train_sentencepiece_tokenizer

    texts = [f"the report number {i} says the cat sat on the mat for {i * 7} days" for i in range(300)]
    tokenizer = train_sentencepiece_tokenizer(texts, tmp_path / "spm", vocab_size=120, style="t5", split_digits=True)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.bos_token_id is None
    ids = tokenizer("the cat sat 1234").input_ids
    assert ids[-1] == 1 and 0 not in ids  # `... </s>`, no <s>
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the cat sat 1234"
    # the SentencePiece model itself loads as a T5 checkpoint's spiece.model does
    bare = T5Tokenizer.from_pretrained(tmp_path / "spm", extra_ids=0)
    assert bare("the cat sat 1234").input_ids == ids
    tokenizer.save_pretrained(tmp_path / "saved")
    assert AutoTokenizer.from_pretrained(tmp_path / "saved")("the cat sat 1234").input_ids == ids
    with pytest.raises(ValueError, match="style='gpt'.*'bart' or 't5'"):
        train_sentencepiece_tokenizer(texts, tmp_path / "x", style="gpt")


@pytest.mark.parametrize("family", ["t5", "longt5"])
def test_a_recipe_run_swaps_a_t5_family_base_trains_and_scores(tmp_path, family):
    from scrolls_ssm.config import load_run_config
    from scrolls_ssm.train import train
    from tests.training_fixtures import overrides, write_task_data, write_tiny_t5

    base, data = write_tiny_t5(tmp_path / "base", family), write_task_data(tmp_path / "data")
    out = tmp_path / "run"
    argv = overrides(base, data, out, "model.encoder_layer_types=[s4d,attention]", "train.checkpoint_every_steps=3")
    results = train(load_run_config(None, argv))
    assert results["contract_nli"]["validation"]["num_predicted"] == 9
    model = AutoModelForSeq2SeqLM.from_pretrained(out / "model")
    assert model.config.model_type == "scrolls_ssm_t5" and model.config.t5_family == family
    assert model.config.encoder_layer_types == ["s4d", "attention"] and model.config.max_source_positions == 96
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evaluations = [r["eval/loss"] for r in log if "eval/loss" in r]
    assert len(evaluations) == 2 and evaluations[1] < evaluations[0]
    predictions = json.loads((out / "predictions" / "validation" / "contract_nli.json").read_text())
    assert len(predictions) == 9 and all(isinstance(text, str) for text in predictions.values())
    # the same command with --resume after the end redoes nothing and keeps the metrics
    again = train(load_run_config(None, [*argv, "train.resume=auto"]))
    assert again == results


def test_a_t5_family_model_trains_from_scratch_with_its_own_tokenizer(tmp_path):
    from scrolls_ssm.config import load_run_config
    from scrolls_ssm.train import train
    from tests.training_fixtures import write_task_data

    data, out = write_task_data(tmp_path / "data"), tmp_path / "run"
    argv = [
        "model.base=null",
        "model.family=t5",
        "model.tokenizer_vocab_size=120",
        "model.encoder_layer_types=[s4d,attention]",
        "model.attention_window=16",
        "model.max_source_positions=96",
        "model.config={d_model: 32, d_kv: 8, d_ff: 64, num_heads: 4, num_decoder_layers: 1}",
        "model.config.feed_forward_proj=gated-gelu",
        f"data.data_dir={data}",
        "data.tasks=[contract_nli]",
        "data.max_tokens_per_batch=300",
        f"train.output_dir={out}",
        "train.num_epochs=1",
        "train.learning_rate=2e-3",
    ]
    train(load_run_config(None, argv))
    model = AutoModelForSeq2SeqLM.from_pretrained(out / "model")
    assert model.config.model_type == "scrolls_ssm_t5" and model.config.is_gated_act
    assert model.config.encoder_attention_type == "local" and model.config.local_radius == 16
    tokenizer = (out / "tokenizer" / "tokenizer_config.json").read_text()
    assert "T5Tokenizer" in tokenizer
    assert (model.config.pad_token_id, model.config.eos_token_id, model.config.decoder_start_token_id) == (0, 1, 0)


def test_model_config_keys_are_checked_against_the_family(tmp_path):
    from scrolls_ssm.build import build_model
    from scrolls_ssm.config import RunConfigError, load_run_config

    cfg = load_run_config(None, ["model.base=null", "model.family=t5", "model.config={encoder_ffn_dim: 64}"])
    with pytest.raises(RunConfigError, match=r"unknown model.config key 'encoder_ffn_dim'.*model.family=t5"):
        build_model(cfg.model, tokenizer=None)
    cfg = load_run_config(None, ["model.base=google/flan-t5-base", "model.config={d_ff: 64}"])
    with pytest.raises(RunConfigError, match=r"model.config.d_ff=64: with model.base.*architecture comes from"):
        build_model(cfg.model, tokenizer=None)


def test_a_longt5_peer_loads_with_its_eager_attention_and_t5_family_models_skip_flash(tmp_path):
    """LongT5 has only eager attention; model.init_from=<a LongT5 checkpoint> (a peer scored beside swapped models)
    must not fail on the default model.attn_implementation=sdpa. Our T5-family models have no FlashAttention path."""
    from scrolls_ssm.build import build_model
    from scrolls_ssm.config import load_run_config

    source_model("longt5-tglobal").save_pretrained(tmp_path / "longt5")
    cfg = load_run_config(None, ["model.base=null", f"model.init_from={tmp_path / 'longt5'}"])
    with pytest.warns(UserWarning, match=r"attn_implementation='sdpa': LongT5ForConditionalGeneration has no sdpa"):
        model = build_model(cfg.model, tokenizer=[0] * SIZE["vocab_size"])
    assert model.config._attn_implementation == "eager"
    input_ids, mask, labels = batch()
    expected = source_model("longt5-tglobal")(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(model(input_ids=input_ids, attention_mask=mask, labels=labels).loss, expected)

    swap_encoder(source_model("t5"), ["s4d", "attention", "attention"]).save_pretrained(tmp_path / "ours")
    flash = "model.attn_implementation=flash_attention_2"
    cfg = load_run_config(None, ["model.base=null", f"model.init_from={tmp_path / 'ours'}", flash])
    with pytest.warns(UserWarning, match="has no flash_attention_2 attention; using 'sdpa'"):
        assert build_model(cfg.model, tokenizer=[0] * SIZE["vocab_size"]).config._attn_implementation == "sdpa"


def test_mixed_precision_auto_is_bf16_only_where_a_gpu_has_it(monkeypatch):
    from scrolls_ssm.train import resolve_mixed_precision

    for explicit in ("no", "bf16", "fp16"):
        assert resolve_mixed_precision(explicit) == explicit
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_mixed_precision("auto") == "no"  # CPU: bf16 autocast is slower than float32 there
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_mixed_precision("auto") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_mixed_precision("auto") == "no"  # e.g. a V100: no bf16, and fp16 is unsafe for T5


def test_convert_command_on_a_t5_base_reuses_transfers_and_distills(tmp_path, capsys):
    """`scrolls-ssm convert` on a T5 v1.1-style checkpoint: weight reuse from T5's q/k/v/o, layer-wise transfer (the
    teacher's T5 attention returns a tuple, its output first), and distillation on inputs infilled with T5's first
    sentinel; the saved model loads with the Auto classes and keeps the attention layer as it was."""
    from scrolls_ssm.cli import main
    from tests.training_fixtures import scrolls_rows, write_tiny_t5

    base = write_tiny_t5(tmp_path / "base")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in scrolls_rows("train", 40, seed=3)))
    argv = ["convert", "--base", str(base), "--layers", "mamba2,attention", "--max-source-positions", "96"]
    argv += ["--config", "mamba2_headdim=16", "--reuse-weights", "--transfer-data", str(data)]
    argv += ["--transfer-steps", "60", "--transfer-lr", "5e-3", "--transfer-tokens-per-batch", "512"]
    assert main([*argv, "--distill-steps", "3", "--out", str(tmp_path / "moved")]) == 0
    assert "layer 0 (mamba2): relative error " in capsys.readouterr().out
    report = json.loads((tmp_path / "moved" / "conversion.json").read_text())
    assert report["reused_weights_in_layers"] == [0] and len(report["distillation"]["log"]) == 3
    assert report["distillation"]["max_length"] == 96  # no position limit of its own: the T5 family has none
    assert report["relative_error_after"]["0"] < report["relative_error_before"]["0"]
    moved = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "moved")
    original = T5ForConditionalGeneration.from_pretrained(base)
    assert moved.config.model_type == "scrolls_ssm_t5"
    assert torch.equal(
        moved.model.encoder.layers[1].mixer.q.weight, original.encoder.block[1].layer[0].SelfAttention.q.weight
    )
    # weight reuse read T5's names: B rows are K's rows (tiled), the output projection starts from O
    from scrolls_ssm.transfer import attention_teacher, reuse_attention_weights

    student = swap_encoder(base, ["mamba2", "attention"], mamba2_headdim=16)
    teacher = attention_teacher(base, student)
    assert reuse_attention_weights(student, teacher) == [0]
    mixer, attention = student.get_encoder().layers[0].mixer, teacher.get_encoder().layers[0].mixer
    k = attention.k.weight
    rows = mixer.in_proj.weight[2 * mixer.d_inner :][: k.shape[0]]
    torch.testing.assert_close(rows, k[: rows.shape[0]], rtol=0, atol=0)
    torch.testing.assert_close(mixer.out_proj.weight[:, : attention.o.weight.shape[1]], attention.o.weight)


def test_model_card_of_a_t5_family_model_without_a_length_limit(tmp_path):
    import yaml

    from scrolls_ssm.hub import build_model_card

    directory = tmp_path / "model"
    swap_encoder(source_model("flan-t5"), ["s4d", "s4d", "attention"], max_source_positions=None).save_pretrained(
        directory
    )
    run_config = {"recipe": "qasper", "model": {"base": "google/flan-t5-base"}, "data": {"tasks": ["qasper"]}}
    run_config["data"]["max_source_length"] = 4096
    (directory / "run_config.yaml").write_text(yaml.safe_dump(run_config))
    text = build_model_card(directory, "you/flan-t5-s4d").text
    assert "a T5-family model's embeddings" in text and "accepts inputs of any length" in text
    assert "max_length=4096" in text  # the length it was trained at
