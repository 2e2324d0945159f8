"""What transformers' common model tests check for a seq2seq model, for every encoder layout of this toolkit.

Each test runs on five tiny layouts (two layers each): all attention, all S4D, all Mamba, all Mamba-2, and a GSS +
attention hybrid. The checks: output shapes and `return_dict` equivalence, attention and hidden-state outputs, save /
load with tied weights, resizing the vocabulary, activation checkpointing, generate in every mode (greedy, sample,
beam, with `return_dict_in_generate` / `output_scores` / precomputed `encoder_outputs`), and `torch.compile` with
`fullgraph=True`.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from scrolls_ssm import ScrollsSSMForConditionalGeneration, ScrollsSSMModel
from tests.conftest import tiny_model

# Small state sizes and chunks so every layout runs each check in well under a second.
SSM_SIZES = dict(
    s4d_d_state=8, mamba_d_state=4, mamba2_d_state=8, mamba2_headdim=16, mamba2_chunk_size=8, gss_d_state=8
)
LAYOUTS = {
    "attention": ["attention", "attention"],
    "s4d": ["s4d", "s4d"],
    "mamba": ["mamba", "mamba"],
    "mamba2": ["mamba2", "mamba2"],
    "gss+attention": ["gss", "attention"],
}
BATCH, SEQ, TARGET, VOCAB, D_MODEL, HEADS = 2, 20, 6, 120, 32, 4


@pytest.fixture(params=list(LAYOUTS), ids=list(LAYOUTS))
def layout(request) -> list[str]:
    return LAYOUTS[request.param]


def make_model(layout: list[str], **overrides) -> ScrollsSSMForConditionalGeneration:
    return tiny_model(encoder_layer_types=layout, **{**SSM_SIZES, **overrides})


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two inputs, the second right-padded by 5 tokens, and targets."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.ones_like(input_ids)
    mask[1, SEQ - 5 :] = 0
    input_ids[mask == 0] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": torch.randint(4, VOCAB, (BATCH, TARGET), generator=g),
    }


# --- outputs ---------------------------------------------------------------------------------------------------------


def test_output_shapes_and_return_dict_equivalence(layout):
    model = make_model(layout)
    inputs = batch()
    with torch.no_grad():
        as_dict = model(**inputs)
        as_tuple = model(**inputs, return_dict=False)
    assert as_dict.logits.shape == (BATCH, TARGET, VOCAB)
    assert as_dict.encoder_last_hidden_state.shape == (BATCH, SEQ, D_MODEL)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_dict.to_tuple())
    for expected, actual in zip(as_dict.to_tuple(), as_tuple, strict=True):
        if isinstance(expected, torch.Tensor):
            torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert as_tuple[0] == as_dict.loss  # the loss comes first, as in every transformers model

    base = ScrollsSSMModel(model.config).eval()
    with torch.no_grad():
        base_dict = base(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        base_tuple = base(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], return_dict=False)
        encoder_tuple = base.get_encoder()(input_ids=inputs["input_ids"], return_dict=False)
    torch.testing.assert_close(base_tuple[0], base_dict.last_hidden_state, rtol=0, atol=0)
    assert isinstance(encoder_tuple, tuple) and encoder_tuple[0].shape == (BATCH, SEQ, D_MODEL)

    model.config.return_dict = False  # the config's value is the default, as in transformers
    with torch.no_grad():
        assert isinstance(model(**inputs), tuple)


def test_loss_over_num_items_in_batch_and_non_contiguous_labels():
    model = make_model(LAYOUTS["s4d"])
    inputs = batch()
    labels = inputs["labels"].clone()
    labels[0, 4:] = -100  # 10 target tokens in all
    wide = torch.stack([labels, labels], dim=2)[:, :, 0]  # the same values, not contiguous
    assert not wide.is_contiguous()
    with torch.no_grad():
        mean = model(**{**inputs, "labels": labels}).loss
        strided = model(**{**inputs, "labels": wide}).loss
        summed = model(**{**inputs, "labels": labels}, num_items_in_batch=torch.tensor(40)).loss
    torch.testing.assert_close(strided, mean, rtol=0, atol=0)
    torch.testing.assert_close(summed, mean * 10 / 40)  # sum over 10 tokens, divided by the whole batch's 40


def test_attentions_and_hidden_states(layout):
    model = make_model(layout)
    model.set_attn_implementation("eager")  # the decoder's probabilities need eager attention, as in BART
    inputs = batch()
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
    attention_layers = layout.count("attention")

    assert len(out.encoder_hidden_states) == len(layout) + 1
    assert all(h.shape == (BATCH, SEQ, D_MODEL) for h in out.encoder_hidden_states)
    torch.testing.assert_close(out.encoder_hidden_states[-1], out.encoder_last_hidden_state, rtol=0, atol=0)
    assert len(out.decoder_hidden_states) == model.config.decoder_layers + 1

    # One probability tensor per full-attention layer; state-space layers have none.
    assert len(out.encoder_attentions) == attention_layers
    for weights in out.encoder_attentions:
        assert weights.shape == (BATCH, HEADS, SEQ, SEQ)
        torch.testing.assert_close(weights.sum(-1), torch.ones(BATCH, HEADS, SEQ))
        assert weights[1, :, :, SEQ - 5 :].abs().max() == 0  # no probability on padded keys
    assert len(out.decoder_attentions) == len(out.cross_attentions) == model.config.decoder_layers
    assert out.cross_attentions[0].shape == (BATCH, HEADS, TARGET, SEQ)

    # Asking for attentions does not change the result.
    with torch.no_grad():
        plain = model(**inputs)
    torch.testing.assert_close(out.logits, plain.logits, rtol=1e-5, atol=1e-6)
    assert plain.encoder_attentions is None and plain.encoder_hidden_states is None


def test_encoder_attentions_with_the_default_sdpa_implementation():
    """SDPA never materializes probabilities; the encoder computes them eagerly when they are asked for."""
    model = make_model(LAYOUTS["gss+attention"])
    assert model.config._attn_implementation == "sdpa"
    inputs = batch()
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
        plain = model(**inputs)
    assert len(out.encoder_attentions) == 1 and out.encoder_attentions[0].shape == (BATCH, HEADS, SEQ, SEQ)
    torch.testing.assert_close(out.logits, plain.logits, rtol=1e-5, atol=1e-6)


def test_config_output_flags_are_the_defaults(layout):
    model = make_model(layout)
    model.set_attn_implementation("eager")  # transformers accepts `config.output_attentions` only with eager
    model.config.output_hidden_states = True
    model.config.output_attentions = True
    with torch.no_grad():
        out = model(**batch())
    assert len(out.encoder_hidden_states) == len(layout) + 1
    assert len(out.encoder_attentions) == layout.count("attention")
    with torch.no_grad():
        out = model(**batch(), output_hidden_states=False)  # an explicit argument wins over the config
    assert out.encoder_hidden_states is None


# --- weights ---------------------------------------------------------------------------------------------------------


def test_save_load_keeps_outputs_and_tied_weights(layout, tmp_path):
    model = make_model(layout)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is ScrollsSSMForConditionalGeneration
    inputs = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    shared = loaded.model.shared.weight
    tied = (loaded.lm_head, loaded.model.encoder.embed_tokens, loaded.model.decoder.embed_tokens)
    assert all(module.weight.data_ptr() == shared.data_ptr() for module in tied)


def test_resize_token_embeddings_then_forward_save_and_load(layout, tmp_path):
    model = make_model(layout)
    inputs = batch()
    with torch.no_grad():
        before = model(**inputs).logits
    model.resize_token_embeddings(VOCAB + 13)
    assert model.final_logits_bias.shape == (1, VOCAB + 13) and model.config.vocab_size == VOCAB + 13
    assert model.lm_head.weight.data_ptr() == model.model.shared.weight.data_ptr()
    with torch.no_grad():
        after = model(**inputs).logits
    assert after.shape == (BATCH, TARGET, VOCAB + 13)
    torch.testing.assert_close(after[..., :VOCAB], before, rtol=1e-5, atol=1e-6)  # old tokens keep their logits

    model.save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, after, rtol=0, atol=0)

    model.resize_token_embeddings(VOCAB - 8)  # shrinking keeps the first rows
    small = {key: value.clamp(max=VOCAB - 9) for key, value in inputs.items()}
    with torch.no_grad():
        assert model(**small).logits.shape == (BATCH, TARGET, VOCAB - 8)


def test_activation_checkpointing_gives_the_same_gradients(layout):
    inputs = batch()

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = make_model(layout).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(**inputs).loss.backward()
        return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


# --- generate --------------------------------------------------------------------------------------------------------


GENERATE_MODES = {
    "greedy": dict(),
    "sample": dict(do_sample=True, top_k=10),
    "beam": dict(num_beams=3, num_return_sequences=2),
}


@pytest.mark.parametrize("mode", list(GENERATE_MODES))
def test_generate_modes_with_dict_outputs_and_precomputed_encoder_outputs(layout, mode):
    model = make_model(layout)
    inputs = batch()
    options = dict(max_new_tokens=4, min_new_tokens=4, **GENERATE_MODES[mode])
    inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    sequences = BATCH * options.get("num_return_sequences", 1)

    torch.manual_seed(0)
    plain = model.generate(**inputs, **options)
    torch.manual_seed(0)
    rich = model.generate(
        **inputs, **options, return_dict_in_generate=True, output_scores=True, output_attentions=True
    )
    torch.testing.assert_close(rich.sequences, plain, rtol=0, atol=0)
    assert plain.shape == (sequences, 1 + 4)
    assert len(rich.scores) == 4 and rich.scores[0].shape[-1] == VOCAB
    assert len(rich.encoder_attentions) == layout.count("attention")

    encoder_outputs = model.get_encoder()(**inputs)
    torch.manual_seed(0)
    reused = model.generate(encoder_outputs=encoder_outputs, attention_mask=inputs["attention_mask"], **options)
    torch.testing.assert_close(reused, plain, rtol=0, atol=0)


def test_static_cache_generate_equals_the_dynamic_cache(layout):
    """`_can_compile_fullgraph` offers the static cache (and its compiled decoding on GPUs); same tokens either way."""
    model = make_model(layout)
    inputs = {key: value for key, value in batch().items() if key != "labels"}
    dynamic = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5)
    static = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, cache_implementation="static")
    torch.testing.assert_close(static, dynamic, rtol=0, atol=0)


def test_generate_emits_no_deprecation_warning(layout, recwarn):
    model = make_model(layout)
    inputs = batch()
    model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=3)
    model(**inputs)
    messages = [str(w.message) for w in recwarn if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not [m for m in messages if "past_key_values" in m or "cache" in m], messages


def test_get_encoder_keeps_the_base_signature():
    model = make_model(LAYOUTS["s4d"])
    assert model.get_encoder() is model.model.encoder
    assert model.get_encoder(modality=None) is model.model.encoder
    assert model.model.get_encoder(modality=None) is model.model.encoder


# --- compile ---------------------------------------------------------------------------------------------------------


def test_compiles_with_fullgraph(layout):
    torch._dynamo.reset()
    model = make_model(layout)
    inputs = batch()
    with torch.no_grad():
        expected = model(**inputs).logits
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        actual = compiled(**inputs).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
