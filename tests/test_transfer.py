"""Layer-wise attention transfer: the swapped mixers learn the pretrained attention's outputs, nothing else changes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, BartForConditionalGeneration

from scrolls_ssm import swap_encoder
from scrolls_ssm.transfer import (
    attention_teacher,
    layer_errors,
    relative_error,
    swapped_layers,
    text_batches,
    transfer_attention,
)
from tests.training_fixtures import torchrun_two_processes, write_tiny_bart
from tests.transfer_fixtures import STEPS, documents, transfer_setup


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_tiny_bart(tmp_path_factory.mktemp("bart"), dropout=0.0)


def test_relative_error_by_hand():
    target = torch.tensor([[[1.0, 2.0], [3.0, 0.0], [9.0, 9.0]]])  # the last position is padding
    prediction = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # errors: (0 + 4) + (9 + 0) = 13; target energy: (1 + 4) + (9 + 0) = 14
    assert relative_error(prediction, target, mask).item() == pytest.approx(13 / 14)
    assert relative_error(torch.zeros_like(target), target, mask).item() == pytest.approx(1.0)
    assert relative_error(target, target, mask).item() == 0.0


@pytest.mark.parametrize("kind", ["s4d", "mamba2"])
def test_transfer_lowers_the_error_and_changes_only_the_swapped_mixers(base, kind):
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    student = swap_encoder(base, [kind, "attention"], max_source_positions=64, encoder_positions="none")
    teacher = attention_teacher(base, student)
    train = text_batches(documents(48, seed=0), tokenizer, max_length=64, max_tokens=256)
    held_out = text_batches(documents(16, seed=1), tokenizer, max_length=64, max_tokens=256)
    assert swapped_layers(student) == [0]
    before_state = {name: tensor.clone() for name, tensor in student.state_dict().items()}
    before = layer_errors(student, teacher, held_out)

    log = transfer_attention(student, teacher, train, steps=150, learning_rate=5e-3, progress=False)

    after = layer_errors(student, teacher, held_out)
    assert len(log) == 150 and set(log[0]) == {"step", "loss", "layer_0"}
    # Below 1.0 is better than an all-zero output; the random mixers start far above it (measured: s4d 183 -> 0.30,
    # mamba2 2302 -> 0.54).
    assert before[0] > 1.0 and after[0] < 0.6, (before, after)
    changed = {name for name, tensor in student.state_dict().items() if not torch.equal(tensor, before_state[name])}
    assert changed and all(name.startswith("model.encoder.layers.0.mixer.") for name in changed), changed


def test_the_teacher_is_the_original_attention_and_padding_changes_nothing(base):
    """The captured targets come from the original BART's attention (the teacher's encoder computes BART's), and the
    error of a padded batch equals that of its rows one by one."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    student = swap_encoder(base, ["s4d", "s4d"], max_source_positions=64)
    teacher = attention_teacher(base, student)
    bart = BartForConditionalGeneration.from_pretrained(base).eval()
    batch = text_batches(documents(2, seed=2), tokenizer, max_length=30, max_tokens=1000)[0]
    with torch.no_grad():
        ours = teacher.get_encoder()(**batch).last_hidden_state
        theirs = bart.get_encoder()(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-5, atol=1e-5)

    singles = [{key: value[row : row + 1, : int(real[row].sum())] for key, value in batch.items()} for row in range(2)]
    padded, one_by_one = layer_errors(student, teacher, [batch]), layer_errors(student, teacher, singles)
    assert padded.keys() == one_by_one.keys() == {0, 1}
    for index in padded:
        assert padded[index] == pytest.approx(one_by_one[index], rel=1e-5)


def test_bad_calls_say_what_is_wrong(base):
    tokenizer = AutoTokenizer.from_pretrained(base)
    all_attention = swap_encoder(base, ["attention", "attention"], max_source_positions=64)
    batches = text_batches(documents(2, seed=3), tokenizer, max_length=64, max_tokens=256)
    with pytest.raises(ValueError, match="no swapped layer"):
        transfer_attention(all_attention, attention_teacher(base, all_attention), batches, steps=1)
    student = swap_encoder(base, ["s4d", "attention"], max_source_positions=64)
    with pytest.raises(ValueError, match="steps=0"):
        transfer_attention(student, attention_teacher(base, student), batches, steps=0)
    with pytest.raises(ValueError, match="at least one non-empty document"):
        text_batches(["", "  "], tokenizer, max_length=64, max_tokens=256)


def test_convert_command_swaps_transfers_and_saves_a_loadable_model(base, tmp_path, capsys):
    """`scrolls-ssm convert` with SCROLLS .jsonl transfer data: the saved model loads with the Auto classes, keeps
    BART's attention layer bit for bit, and its transferred mixer is closer to the attention than a plain swap's."""
    import json

    from transformers import AutoModelForSeq2SeqLM

    from scrolls_ssm.cli import main

    data = tmp_path / "train.jsonl"
    rows = [{"id": str(i), "pid": f"{i}_0", "input": text, "output": "x"} for i, text in enumerate(documents(40, 4))]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = ["convert", "--base", str(base), "--layers", "s4d,attention", "--max-source-positions", "64"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    transfer = ["--transfer-data", str(data), "--transfer-steps", "150", "--transfer-lr", "5e-3"]
    assert main([*common, *transfer, "--transfer-tokens-per-batch", "256", "--out", str(tmp_path / "moved")]) == 0
    printed = capsys.readouterr().out
    assert "layer 0 (s4d): relative error " in printed and f"wrote {tmp_path / 'moved'}" in printed

    plain, moved = (AutoModelForSeq2SeqLM.from_pretrained(tmp_path / name) for name in ("plain", "moved"))
    bart = BartForConditionalGeneration.from_pretrained(base)
    torch.testing.assert_close(
        moved.model.encoder.layers[1].mixer.q_proj.weight, bart.model.encoder.layers[1].self_attn.q_proj.weight
    )
    report = json.loads((tmp_path / "moved" / "conversion.json").read_text())
    assert report["documents"] == 40 and len(report["transfer"]["log"]) == 150
    assert report["relative_error_after"]["0"] < 0.6 < 1.0 < report["relative_error_before"]["0"]
    assert report["encoder_cosine_before"] < report["encoder_cosine_after"] <= 1.0
    assert not (tmp_path / ".moved.transfer-state").exists()  # the stage checkpoints go once --out is written
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "moved")
    batches = text_batches(documents(8, seed=5), tokenizer, max_length=64, max_tokens=256)
    teacher = attention_teacher(base, plain)
    assert layer_errors(moved, teacher, batches)[0] < 0.5 * layer_errors(plain, teacher, batches)[0]


def test_convert_command_errors_name_the_option_and_the_fix(base, tmp_path, capsys):
    import json

    from scrolls_ssm.cli import main

    common = ["convert", "--base", str(base), "--max-source-positions", "64"]
    assert main([*common, "--layers", "s4d,atention", "--out", str(tmp_path / "a")]) == 2
    assert "--layers s4d,atention: unknown mixer kind(s) ['atention']" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main([*common, "--layers", "s4d,attention", "--out", str(tmp_path / "full")]) == 2
    assert "the folder is not empty. Fix: another --out, or --overwrite" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert main([*common, "--layers", "s4d,attention", "--reuse-weights", "--out", str(tmp_path / "c")]) == 2
    assert "--reuse-weights: --layers s4d,attention has no mamba or mamba2 layer" in capsys.readouterr().err
    assert main([*common, "--layers", "mamba2,attention", "--reuse-weights", "--out", str(tmp_path / "d")]) == 0
    assert json.loads((tmp_path / "d" / "conversion.json").read_text())["reused_weights_in_layers"] == [0]
    assert (
        main([*common, "--layers", "mamba2,attention", "--config", "mamba2_groups=4", "--out", str(tmp_path / "e")])
        == 2
    )
    assert "'mamba2_groups' is not a setting --config can change" in capsys.readouterr().err
    assert (
        main([*common, "--layers", "mamba2,attention", "--config", "mamba2_ngroups", "--out", str(tmp_path / "e")])
        == 2
    )
    assert "--config 'mamba2_ngroups': expected KEY=VALUE" in capsys.readouterr().err
    assert (
        main([*common, "--layers", "mamba2,attention", "--config", "mamba2_ngroups=3", "--out", str(tmp_path / "e")])
        == 2
    )
    assert "mamba2_ngroups=3 is invalid: expected a divisor of the Mamba-2 head count" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
    per_head = ["--config", "mamba2_ngroups=4", "mamba2_d_state=8", "mamba2_headdim=8"]
    assert (
        main([*common, "--layers", "mamba2,attention", "--reuse-weights", *per_head, "--out", str(tmp_path / "f")])
        == 0
    )
    converted = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "f")
    assert (converted.config.mamba2_ngroups, converted.config.mamba2_d_state) == (4, 8)
    key_rows = converted.get_encoder().layers[0].mixer.in_proj.weight[128:160]  # after z and x: 2 x 64 rows
    source = BartForConditionalGeneration.from_pretrained(base).get_encoder().layers[0].self_attn.k_proj.weight
    torch.testing.assert_close(key_rows, source, rtol=0, atol=0)  # the per-head map: B is K, all heads
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "fine"}\n{"text": "no input"}\n')
    argv = [*common, "--layers", "s4d,attention", "--transfer-data", str(bad), "--out", str(tmp_path / "b")]
    assert main(argv) == 2
    assert f"{bad}, line 2: no string field 'input'" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_weight_reuse_maps_v_k_q_o_into_mamba2_and_starts_closer(base):
    """x <- V, B <- K, C <- Q (rows tiled to the mixer's sizes), out <- O on the first d_model channels; only mamba2
    layers are touched; the relative error against the attention starts lower than a random init's."""
    from scrolls_ssm.transfer import reuse_attention_weights

    tokenizer = AutoTokenizer.from_pretrained(base)
    held_out = text_batches(documents(16, seed=1), tokenizer, max_length=64, max_tokens=256)
    errors = {}
    for reuse in (False, True):
        torch.manual_seed(0)
        student = swap_encoder(base, ["mamba2", "s4d"], max_source_positions=64)
        teacher = attention_teacher(base, student)
        s4d_before = {k: v.clone() for k, v in student.get_encoder().layers[1].state_dict().items()}
        if reuse:
            assert reuse_attention_weights(student, teacher) == [0]
        errors[reuse] = layer_errors(student, teacher, held_out)[0]
    mixer, attention = student.get_encoder().layers[0].mixer, teacher.get_encoder().layers[0].mixer
    d_inner, d_state, d_model = mixer.d_inner, mixer.d_state, 32
    rows = mixer.in_proj.weight
    v, k, q = attention.v_proj.weight, attention.k_proj.weight, attention.q_proj.weight
    assert d_inner == 2 * d_model  # x holds V twice
    repeats = -(-d_state // d_model)
    torch.testing.assert_close(rows[d_inner : 2 * d_inner], torch.cat([v, v]), rtol=0, atol=0)
    torch.testing.assert_close(rows[2 * d_inner :][:d_state], k.repeat(repeats, 1)[:d_state], rtol=0, atol=0)
    torch.testing.assert_close(rows[2 * d_inner + d_state :][:d_state], q.repeat(repeats, 1)[:d_state], rtol=0, atol=0)
    torch.testing.assert_close(mixer.out_proj.weight[:, :d_model], attention.out_proj.weight, rtol=0, atol=0)
    assert not mixer.out_proj.weight[:, d_model:].any()
    after = student.get_encoder().layers[1].state_dict()
    assert all(torch.equal(after[name], tensor) for name, tensor in s4d_before.items())  # the s4d layer: untouched
    assert errors[True] < 0.7 * errors[False], errors  # measured: 1,209 against 2,023


def test_per_head_weight_reuse_gives_each_group_its_heads_k_q_v_and_o(base):
    """With one group of Mamba-2 heads per attention head and d_state = the head size (4 heads of 8 in the tiny BART;
    8 Mamba-2 heads of 8, so 2 per group): group g's B and C rows are head g's K and Q rows, both heads of group g
    read head g's V rows, and out_proj gives each of them head g's block of O, halved. Measured (seed 0, relative
    error before / after 150 transfer steps): per-head 560 / 0.559, the tiled map (one group, d_state 64)
    1,212 / 0.541, random 2,066 / 0.702. The per-head map starts closest; after transfer it beats random, and the
    tiled layout's 8x larger state catches up with it."""
    from scrolls_ssm.transfer import reuse_attention_weights

    tokenizer = AutoTokenizer.from_pretrained(base)
    train = text_batches(documents(48, seed=0), tokenizer, max_length=64, max_tokens=256)
    held_out = text_batches(documents(16, seed=1), tokenizer, max_length=64, max_tokens=256)
    per_head = dict(mamba2_ngroups=4, mamba2_d_state=8, mamba2_headdim=8)
    starts = {
        "random": (False, per_head), "per-head": (True, per_head), "tiled": (True, dict(mamba2_headdim=8)),
    }  # fmt: skip
    before, after = {}, {}
    for name, (reuse, sizes) in starts.items():
        torch.manual_seed(0)
        student = swap_encoder(base, ["mamba2", "attention"], max_source_positions=64, **sizes)
        teacher = attention_teacher(base, student)
        if reuse:
            assert reuse_attention_weights(student, teacher) == [0]
        if name == "per-head":
            mixer, attention = student.get_encoder().layers[0].mixer, teacher.get_encoder().layers[0].mixer
            v, k, q, o = (getattr(attention, p).weight for p in ("v_proj", "k_proj", "q_proj", "out_proj"))
            rows, d_inner = mixer.in_proj.weight, mixer.d_inner
            assert (mixer.groups, mixer.heads, mixer.d_state, attention.head_dim) == (4, 8, 8, 8)
            torch.testing.assert_close(rows[2 * d_inner : 2 * d_inner + 32], k, rtol=0, atol=0)
            torch.testing.assert_close(rows[2 * d_inner + 32 : 2 * d_inner + 64], q, rtol=0, atol=0)
            for h in range(8):
                g = h // 2
                x_rows = rows[d_inner + 8 * h : d_inner + 8 * (h + 1)]
                torch.testing.assert_close(x_rows, v[8 * g : 8 * (g + 1)], rtol=0, atol=0)
                columns = mixer.out_proj.weight[:, 8 * h : 8 * (h + 1)]
                torch.testing.assert_close(columns, o[:, 8 * g : 8 * (g + 1)] / 2, rtol=0, atol=0)
        before[name] = layer_errors(student, teacher, held_out)[0]
        transfer_attention(student, teacher, train, steps=150, learning_rate=5e-3, progress=False)
        after[name] = layer_errors(student, teacher, held_out)[0]
    assert before["per-head"] < 0.6 * before["tiled"] < 0.6 * before["random"], before
    assert after["per-head"] < 0.85 * after["random"], after


def test_weight_reuse_maps_v_k_q_o_into_mamba_and_ends_closer_after_transfer(base):
    """Mamba-1 reads B and C from x (after its convolution): x <- V (tiled), each direction's B rows <- K pinv(V) and
    C rows <- Q pinv(V), so that B x = K h exactly when x = V h; out <- O. After the same transfer, both layers end
    closer to the attention than from random mixers (measured, seed 0: 0.327 / 0.454 against 0.349 / 0.488)."""
    from scrolls_ssm.transfer import reuse_attention_weights

    tokenizer = AutoTokenizer.from_pretrained(base)
    train = text_batches(documents(48, seed=0), tokenizer, max_length=64, max_tokens=256)
    held_out = text_batches(documents(16, seed=1), tokenizer, max_length=64, max_tokens=256)
    errors = {}
    for reuse in (False, True):
        torch.manual_seed(0)
        student = swap_encoder(base, ["mamba", "mamba"], max_source_positions=64)
        teacher = attention_teacher(base, student)
        if reuse:
            assert reuse_attention_weights(student, teacher) == [0, 1]
        transfer_attention(student, teacher, train, steps=150, learning_rate=5e-3, progress=False)
        errors[reuse] = layer_errors(student, teacher, held_out)
    assert all(errors[True][layer] < errors[False][layer] for layer in (0, 1)), errors

    torch.manual_seed(0)
    student = swap_encoder(base, ["mamba", "attention"], max_source_positions=64)
    teacher = attention_teacher(base, student)
    assert reuse_attention_weights(student, teacher) == [0]
    mixer, attention = student.get_encoder().layers[0].mixer, teacher.get_encoder().layers[0].mixer
    v, k, q, o = (getattr(attention, name).weight for name in ("v_proj", "k_proj", "q_proj", "out_proj"))
    d_model, d_inner = v.shape[1], mixer.out_proj.weight.shape[1]
    assert d_inner == 2 * d_model
    value = torch.cat([v, v])
    torch.testing.assert_close(mixer.in_proj.weight[:d_inner], value, rtol=0, atol=0)
    for direction in (mixer.forward_ssm, mixer.backward_ssm):
        rank, d_state = direction.dt_rank, direction.d_state
        rows = direction.x_proj.weight
        repeats = -(-d_state // d_model)
        torch.testing.assert_close(rows[rank : rank + d_state] @ value, k.repeat(repeats, 1)[:d_state])
        torch.testing.assert_close(rows[rank + d_state :] @ value, q.repeat(repeats, 1)[:d_state])
    torch.testing.assert_close(mixer.out_proj.weight[:, :d_model], o, rtol=0, atol=0)
    assert mixer.out_proj.weight[:, d_model:].abs().sum() == 0


def test_two_processes_share_each_step_and_end_as_one_process_averaging_their_batches(base, tmp_path):
    """`transfer_attention` under plain torch.distributed (torchrun, gloo): with one batch per process per step (the
    default) or 3 batches dealt out unevenly over 2 processes, both processes end with the same mixer, equal to what
    one process computes averaging the same batches per step, and log the same losses. Each process starts from a
    mixer of its own: the stage starts all from the first one's."""
    torchrun_two_processes("transfer_worker.py", [str(base), str(tmp_path), "default", "3"], 300, "transfer")

    for setting, per_step in (("default", 2), ("3", 3)):
        ranks = [torch.load(tmp_path / setting / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
        student, teacher, batches = transfer_setup(base, seed=100)  # the first process's initialization
        log = transfer_attention(
            student, teacher, batches, STEPS, learning_rate=5e-3, progress=False, batches_per_step=per_step
        )
        want = student.get_encoder().layers[0].mixer.state_dict()
        for name, tensor in want.items():
            assert torch.equal(ranks[0]["mixer"][name], ranks[1]["mixer"][name]), name
            # Up to float32 rounding: the gradients are summed in another order (3 batches: (b0 + b2) + b1 against
            # (b0 + b1) + b2), measured 4e-8 relative (A_imag, values up to 100: 3.8e-6 apart).
            torch.testing.assert_close(ranks[0]["mixer"][name], tensor, rtol=1e-6, atol=1e-6, msg=f"{setting}: {name}")
        assert [row["loss"] for row in ranks[0]["log"]] == pytest.approx([row["loss"] for row in log], rel=1e-6)
        assert ranks[0]["log"] == ranks[1]["log"]
    # The processes did start apart, and the steps did change the mixer.
    first, second = (
        transfer_setup(base, seed=seed)[0].get_encoder().layers[0].mixer.state_dict() for seed in (100, 101)
    )
    assert any(not torch.equal(first[name], second[name]) for name in first)
    assert any(not torch.equal(first[name], want[name]) for name in first)


def test_a_stage_checkpoint_resumes_only_with_the_batches_per_step_it_was_written_with(base, tmp_path):
    student, teacher, batches = transfer_setup(base)
    checkpoint = tmp_path / "stage.pt"
    transfer_attention(student, teacher, batches, 2, progress=False, checkpoint=checkpoint)
    with pytest.raises(ValueError, match=r"1 batch\(es\) per step and this run takes 2 .*batches_per_step=1"):
        transfer_attention(student, teacher, batches, 4, progress=False, checkpoint=checkpoint, batches_per_step=2)
    log = transfer_attention(student, teacher, batches, 4, progress=False, checkpoint=checkpoint, batches_per_step=1)
    assert [row["step"] for row in log] == [1, 2, 3, 4]


def test_batches_per_step_below_the_process_count_is_refused(base):
    student, teacher, batches = transfer_setup(base)
    with pytest.raises(ValueError, match=r"batches_per_step=0: each of the 1 processes .* Fix: batches_per_step >= 1"):
        transfer_attention(student, teacher, batches, 2, progress=False, batches_per_step=0)
