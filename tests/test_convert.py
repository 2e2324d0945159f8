"""swap_encoder: what it keeps, equivalence to BART, position tiling, LED checkpoints, tokenizer, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import LEDConfig, LEDForConditionalGeneration, PegasusConfig

from scrolls_ssm import ScrollsSSMForConditionalGeneration, swap_encoder
from tests.conftest import TINY


def _inputs(seq=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, 120, (2, seq), generator=g)
    mask = torch.ones_like(input_ids)
    mask[1, seq - 9 :] = 0
    return input_ids, mask, torch.randint(4, 120, (2, 9), generator=g)


def test_all_attention_swap_equals_the_bart_checkpoint(tiny_bart):
    model = swap_encoder(tiny_bart, ["attention", "attention"], max_source_positions=1024)
    input_ids, mask, labels = _inputs(seq=TINY["max_position_embeddings"])  # as long as BART's positions allow
    with torch.no_grad():
        expected = tiny_bart(input_ids=input_ids, attention_mask=mask, labels=labels).logits
        actual = model.eval()(input_ids=input_ids, attention_mask=mask, labels=labels).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_swap_keeps_ffn_norms_decoder_and_embeddings(tiny_bart):
    model = swap_encoder(tiny_bart, ["s4d", "attention"])
    bart_state, ours = tiny_bart.state_dict(), model.state_dict()
    for i in range(2):
        for name in ("fc1.weight", "fc2.bias", "final_layer_norm.weight"):
            torch.testing.assert_close(
                ours[f"model.encoder.layers.{i}.{name}"], bart_state[f"model.encoder.layers.{i}.{name}"]
            )
        torch.testing.assert_close(
            ours[f"model.encoder.layers.{i}.mixer_layer_norm.bias"],
            bart_state[f"model.encoder.layers.{i}.self_attn_layer_norm.bias"],
        )
    decoder = [name for name in bart_state if name.startswith("model.decoder.")]
    assert decoder and all(torch.equal(ours[name], bart_state[name]) for name in decoder)
    assert torch.equal(ours["model.shared.weight"], bart_state["model.shared.weight"])
    assert model.lm_head.weight.data_ptr() == model.model.shared.weight.data_ptr()
    assert torch.equal(
        ours["model.encoder.layers.1.mixer.q_proj.weight"],
        bart_state["model.encoder.layers.1.self_attn.q_proj.weight"],
    )


def test_positions_are_tiled_up_to_max_source_positions(tiny_bart):
    model = swap_encoder(tiny_bart, ["attention", "attention"], max_source_positions=150)
    old = tiny_bart.model.encoder.embed_positions.weight[2:]  # 64 pretrained positions
    new = model.model.encoder.embed_positions.weight[2:]
    assert new.shape == (150, 32)
    for position in (0, 63, 64, 100, 149):
        assert torch.equal(new[position], old[position % 64])
    # the decoder keeps BART's own limit
    assert model.model.decoder.embed_positions.weight.shape == tiny_bart.model.decoder.embed_positions.weight.shape


def test_swap_to_an_encoder_without_positions_drops_the_table_and_loads_strictly(tiny_bart, tmp_path):
    model = swap_encoder(tiny_bart, ["s4d", "s4d"], encoder_positions="none")
    assert model.model.encoder.embed_positions is None
    assert torch.equal(  # the decoder keeps its own positions
        model.model.decoder.embed_positions.weight, tiny_bart.model.decoder.embed_positions.weight
    )
    model.save_pretrained(tmp_path)
    _, info = ScrollsSSMForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched


def test_swap_from_a_local_path_brings_the_tokenizer(tmp_path, tiny_bart, tokenizer):
    tiny_bart.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, loaded_tokenizer = swap_encoder(tmp_path, ["attention", "attention"], 512, return_tokenizer=True)
    assert isinstance(model, ScrollsSSMForConditionalGeneration)
    assert model.config.max_source_positions == 512 and loaded_tokenizer.model_max_length == 512
    assert loaded_tokenizer("the cat sat").input_ids == tokenizer("the cat sat").input_ids
    # config overrides reach the new config
    windowed = swap_encoder(str(tmp_path), ["attention", "attention"], attention_window=16)
    assert windowed.config.attention_window == 16


def test_led_checkpoint_gives_its_decoder_embeddings_and_local_attention():
    torch.manual_seed(0)
    led_config = LEDConfig(
        vocab_size=120,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        attention_window=[8, 8],
        max_encoder_position_embeddings=128,
        max_decoder_position_embeddings=32,
        dropout=0.0,
    )
    led = LEDForConditionalGeneration(led_config).eval()
    model = swap_encoder(led, ["attention", "attention"], max_source_positions=300).eval()
    assert model.config.max_position_embeddings == 32
    # LED positions start at row 0, ours at row 2; encoder positions are tiled past LED's 128.
    torch.testing.assert_close(
        model.model.encoder.embed_positions.weight[2 + 130], led.led.encoder.embed_positions.weight[2]
    )
    torch.testing.assert_close(model.model.decoder.embed_positions.weight[2:], led.led.decoder.embed_positions.weight)
    torch.testing.assert_close(
        model.model.encoder.layers[0].mixer.q_proj.weight,
        led.led.encoder.layers[0].self_attn.longformer_self_attn.query.weight,
    )
    # Given the same encoder states, the decoder and LM head compute exactly what LED's do.
    input_ids, mask, labels = _inputs(seq=16)
    encoder_states = torch.randn(2, 16, 32)
    with torch.no_grad():
        expected = led(attention_mask=mask, encoder_outputs=(encoder_states,), labels=labels).logits
        actual = model(attention_mask=mask, encoder_outputs=(encoder_states,), labels=labels).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_unsupported_family_is_a_clear_error(tmp_path):
    PegasusConfig(vocab_size=10, d_model=8, encoder_layers=1, decoder_layers=1).save_pretrained(tmp_path)
    with pytest.raises(
        ValueError,
        match=r"model_type='pegasus'.*Supported families: bart .*facebook/bart-base.*led.*t5 .*flan-t5.*longt5",
    ):
        swap_encoder(tmp_path, ["attention"])


def test_return_tokenizer_needs_a_path(tiny_bart):
    with pytest.raises(ValueError, match="return_tokenizer=True needs a path"):
        swap_encoder(tiny_bart, ["attention", "attention"], return_tokenizer=True)


def test_bad_layer_kind_names_the_layer(tiny_bart):
    with pytest.raises(Exception, match=r"encoder_layer_types\[1\]='rnn'"):
        swap_encoder(tiny_bart, ["attention", "rnn"])
