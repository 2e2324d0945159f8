"""The model: config validation, Auto classes, save/load, remote code, generate, checkpointing, attention variants."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

from scrolls_ssm import ScrollsSSMConfig, ScrollsSSMForConditionalGeneration, ScrollsSSMModel
from tests.conftest import remote_code_loss, tiny_config, tiny_model


def _batch(batch=2, seq=24, pad_last=6, vocab=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(input_ids)
    mask[-1, seq - pad_last :] = 0
    input_ids[mask == 0] = 1
    labels = torch.randint(4, vocab, (batch, 7), generator=g)
    return input_ids, mask, labels


# --- config ---------------------------------------------------------------------------------------------------------


def test_config_defaults_and_json_round_trip(tmp_path):
    config = tiny_config(encoder_layer_types=["attention", "attention"], attention_window=8)
    assert ScrollsSSMConfig(encoder_layers=3).encoder_layer_types == ["attention"] * 3
    config.save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk["model_type"] == "scrolls_ssm"
    assert on_disk["encoder_layer_types"] == ["attention", "attention"]
    assert on_disk["max_source_positions"] == 256 and on_disk["attention_window"] == 8
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, ScrollsSSMConfig)
    assert {**loaded.to_dict(), "_name_or_path": ""} == {**config.to_dict(), "_name_or_path": ""}


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(encoder_layers=2, encoder_layer_types=["attention"]), "encoder_layer_types=['attention']"),
        (
            dict(encoder_layers=1, encoder_layer_types=["lstm"]),
            "encoder_layer_types[0]='lstm' is invalid: expected one of",
        ),
        (dict(attention_window=0), "attention_window=0"),
        (dict(max_source_positions=0), "max_source_positions=0"),
        (
            dict(encoder_positions="rotary"),
            "encoder_positions='rotary' is invalid: expected one of ['learned', 'none']",
        ),
        (dict(d_model=30, encoder_attention_heads=4), "encoder_attention_heads=4"),
        (
            dict(d_model=32, encoder_layers=1, encoder_layer_types=["mamba2"], mamba2_headdim=16, mamba2_ngroups=3),
            "mamba2_ngroups=3 is invalid: expected a divisor of the Mamba-2 head count",
        ),
    ],
)
def test_config_rejects_bad_values_naming_field_and_value(fields, message):
    with pytest.raises(StrictDataclassError) as error:
        ScrollsSSMConfig(**fields)
    assert message in str(error.value)


def test_an_encoder_without_positions_has_no_table_and_no_length_it_was_sized_for(tmp_path):
    """`encoder_positions="none"`: no position parameters; the outputs do not depend on `max_source_positions`, so
    a model saved with a short limit reads longer inputs once the limit is raised, with the same weights."""
    model = tiny_model(encoder_layer_types=["s4d", "attention"], encoder_positions="none", max_source_positions=32)
    assert model.model.encoder.embed_positions is None
    assert not any("embed_positions" in name for name in model.state_dict() if ".encoder." in name)
    model.save_pretrained(tmp_path)
    input_ids, mask, _ = _batch(seq=24)
    long_ids = torch.randint(4, 120, (1, 80), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="raise `config.max_source_positions`"):
        model.model.encoder(input_ids=long_ids)
    longer = AutoModelForSeq2SeqLM.from_pretrained(tmp_path, max_source_positions=4096).eval()
    with torch.no_grad():
        expected = model.model.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        actual = longer.model.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        assert longer.model.encoder(input_ids=long_ids).last_hidden_state.shape == (1, 80, model.config.d_model)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


# --- Auto classes, save / load, remote code -------------------------------------------------------------------------


def test_a_config_built_from_another_configs_dict_keeps_auto_config_in_auto_map(tmp_path):
    from transformers import BartConfig

    bart = BartConfig()
    fields = {name: getattr(bart, name) for name in BartConfig.__dataclass_fields__ if hasattr(bart, name)}
    assert fields["_auto_class"] is None  # BART's dataclass fields include it (as swap_encoder reads them)
    ScrollsSSMConfig(**fields).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoConfig"].endswith("ScrollsSSMConfig")


def test_auto_classes_resolve_without_remote_code():
    config = tiny_config()
    assert type(AutoModelForSeq2SeqLM.from_config(config)) is ScrollsSSMForConditionalGeneration
    assert type(AutoModel.from_config(config)) is ScrollsSSMModel


def test_save_load_gives_identical_outputs(tmp_path):
    model = tiny_model(encoder_layer_types=["attention", "attention"], attention_window=4)
    input_ids, mask, labels = _batch()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=mask, labels=labels)
        actual = loaded(input_ids=input_ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=0, atol=0)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.shared.weight.data_ptr()  # tied after loading


def test_trust_remote_code_load_without_the_package(tmp_path):
    """A saved directory loads in a process where `scrolls_ssm` cannot be imported at all."""
    model = tiny_model()
    input_ids, mask, labels = _batch()
    model.save_pretrained(tmp_path / "model")
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.item()
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSeq2SeqLM"].endswith("ScrollsSSMForConditionalGeneration")
    loss = remote_code_loss(tmp_path / "model", input_ids, mask, labels, tmp_path)
    assert loss == pytest.approx(expected, abs=1e-6)


# --- generate -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [dict(), dict(num_beams=3), dict(do_sample=True, top_k=5)],
    ids=["greedy", "beam", "sample"],
)
def test_generate_with_the_collated_batch(options):
    model = tiny_model(encoder_layer_types=["attention", "attention"])
    input_ids, mask, labels = _batch()
    torch.manual_seed(0)
    plain = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, **options)
    torch.manual_seed(0)
    # The collated batch carries labels (and decoder masks): generate accepts them and they change nothing.
    batch = dict(
        input_ids=input_ids, attention_mask=mask, labels=labels, decoder_attention_mask=torch.ones_like(labels)
    )
    full = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, **options)
    assert plain.shape == (2, 6) and torch.equal(plain, full)


def test_generate_rejects_unknown_columns_by_name():
    model = tiny_model()
    input_ids, mask, _ = _batch()
    with pytest.raises(ValueError, match="row_idx"):
        model.generate(input_ids=input_ids, attention_mask=mask, row_idx=torch.arange(2), max_new_tokens=2)


def test_greedy_generate_matches_argmax_decoding():
    model = tiny_model()
    input_ids, mask, _ = _batch()
    generated = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4)
    decoder_ids = generated[:, :1]
    with torch.no_grad():
        for _ in range(4):
            logits = model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
            decoder_ids = torch.cat([decoder_ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    # min_new_tokens bans EOS, so compare where the reference did not choose EOS.
    assert torch.equal(generated[:, 1:][decoder_ids[:, 1:] != 2], decoder_ids[:, 1:][decoder_ids[:, 1:] != 2])


# --- training-side behaviour -----------------------------------------------------------------------------------------


def test_activation_checkpointing_gives_the_same_gradients():
    input_ids, mask, labels = _batch()

    def grads(checkpointing: bool):
        model = tiny_model(encoder_layer_types=["attention", "attention"]).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.model.encoder.layers[0].gradient_checkpointing
        model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 20
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_padding_invariance_of_the_whole_model():
    model = tiny_model(encoder_layer_types=["attention", "attention"])
    input_ids, mask, labels = _batch(batch=1, seq=18, pad_last=0)
    padded = torch.cat([input_ids, torch.full((1, 9), 1)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 9, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        short = model(input_ids=input_ids, attention_mask=mask, labels=labels).logits
        long = model(input_ids=padded, attention_mask=padded_mask, labels=labels).logits
    torch.testing.assert_close(long, short, rtol=1e-5, atol=1e-5)


def test_input_longer_than_max_source_positions_is_a_clear_error():
    model = tiny_model(max_source_positions=32)
    with pytest.raises(ValueError, match=r"40 tokens .* max_source_positions=32. Truncate"):
        model(input_ids=torch.full((1, 40), 5), labels=torch.full((1, 3), 5))


def test_bf16_autocast_runs_and_stays_close():
    model = tiny_model(encoder_layer_types=["attention", "attention"])
    input_ids, mask, labels = _batch()
    with torch.no_grad():
        reference = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    assert torch.isfinite(loss) and abs(loss.item() - reference.item()) < 0.05


def test_flash_attention_request_falls_back_to_sdpa_with_one_warning(caplog):
    config = tiny_config()
    with caplog.at_level(logging.WARNING):
        model = ScrollsSSMForConditionalGeneration._from_config(config, attn_implementation="flash_attention_2")
    assert model.config._attn_implementation == "sdpa"
    assert model.model.decoder.config._attn_implementation == "sdpa"


# --- attention variants ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attention_implementations_agree(implementation):
    input_ids, mask, labels = _batch()
    reference = tiny_model()
    reference.config._attn_implementation = "eager"
    model = tiny_model()
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=mask, labels=labels).logits
        actual = model(input_ids=input_ids, attention_mask=mask, labels=labels).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [12, 16, 20])
def test_block_local_equals_full_attention_when_the_window_covers_the_sequence(window):
    """Blocks attend to their neighbours, so any window >= half the (padded) length sees everything."""
    input_ids, mask, labels = _batch(seq=24, pad_last=5)
    full = tiny_model()
    local = tiny_model(attention_window=window)
    with torch.no_grad():
        expected = full(input_ids=input_ids, attention_mask=mask, labels=labels).logits
        actual = local(input_ids=input_ids, attention_mask=mask, labels=labels).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_block_local_attention_matches_an_explicit_banded_mask():
    from scrolls_ssm.modeling.mixer_attention import AttentionMixer

    torch.manual_seed(0)
    window, seq = 4, 19
    mixer = AttentionMixer(tiny_config(attention_window=window), layer_idx=0).eval()
    hidden = torch.randn(2, seq, 32)
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[1, 13:] = 0
    blocks = torch.arange(seq) // window
    allowed = (blocks[:, None] - blocks[None, :]).abs() <= 1  # (query, key)
    allowed = allowed[None] & mask[:, None, :].bool()  # and the key is real
    q, k, v = (mixer._heads(proj(hidden)) for proj in (mixer.q_proj, mixer.k_proj, mixer.v_proj))
    scores = (q @ k.transpose(-1, -2)) * mixer.scaling
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    expected = mixer.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, seq, 32))
    with torch.no_grad():
        actual = mixer(hidden, mask)
    real = mask.bool()
    torch.testing.assert_close(actual[real], expected[real].detach(), rtol=1e-5, atol=1e-5)


def test_block_local_attention_stays_finite_with_long_padding():
    model = tiny_model(attention_window=2)
    input_ids, mask, labels = _batch(seq=30, pad_last=20)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask, labels=labels).logits
    assert torch.isfinite(logits).all()


def test_16k_token_forward_and_backward_of_a_tiny_model():
    model = tiny_model(encoder_layer_types=["s4d", "attention"], attention_window=256, max_source_positions=16384)
    model.train()
    input_ids = torch.randint(4, 120, (1, 16384))
    loss = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=input_ids[:, :8]).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.model.encoder.embed_positions.weight.grad[2 + 16000].abs().sum() > 0


def test_optimizer_groups_keep_ssm_hints_after_save_and_load(tmp_path):
    """SSM dynamics train at `ssm_lr` without weight decay, also for a model loaded from disk (loading replaces the
    Parameter objects, so the hints must not live on them)."""
    from scrolls_ssm.build import build_optimizer
    from scrolls_ssm.config import RunConfig

    cfg = RunConfig()
    cfg.train.learning_rate, cfg.train.weight_decay = 1e-4, 0.01
    model = tiny_model(encoder_layer_types=["s4d", "mamba2"], ssm_lr=3e-3, mamba2_headdim=16)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    for candidate in (model, loaded):
        groups = build_optimizer(candidate, cfg).param_groups
        by_param = {id(p): g for g in groups for p in g["params"]}
        s4d, mamba2 = candidate.model.encoder.layers[0].mixer, candidate.model.encoder.layers[1].mixer
        for parameter in (s4d.ssm.log_dt, s4d.ssm.A_imag, mamba2.A_log, mamba2.dt_bias):
            assert (by_param[id(parameter)]["lr"], by_param[id(parameter)]["weight_decay"]) == (3e-3, 0.0)
        assert (by_param[id(mamba2.D)]["lr"], by_param[id(mamba2.D)]["weight_decay"]) == (1e-4, 0.0)
        fc1 = candidate.model.encoder.layers[0].fc1
        assert by_param[id(fc1.weight)]["weight_decay"] == 0.01 and by_param[id(fc1.bias)]["weight_decay"] == 0.0
        assert sum(len(g["params"]) for g in groups) == len(list(candidate.parameters()))


@pytest.mark.parametrize("implementation", [None, "eager", "sdpa"])
def test_attention_mixer_is_padding_exact_whatever_the_implementation(implementation):
    """Also when built from a bare config outside a model, where no attention implementation was chosen."""
    from scrolls_ssm.modeling.mixer_attention import AttentionMixer

    torch.manual_seed(0)
    config = tiny_config()
    config._attn_implementation = implementation
    mixer = AttentionMixer(config, layer_idx=0).eval()
    hidden = torch.randn(1, 10, 32)
    padded = torch.cat([hidden, 100 * torch.randn(1, 6, 32)], dim=1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 6)], dim=1).long()
    with torch.no_grad():
        torch.testing.assert_close(mixer(padded, mask)[:, :10], mixer(hidden, torch.ones(1, 10).long()))
