"""The mixer contract (scrolls_ssm/mixer_base.py), checked for every kind in MIXERS on a tiny config."""

from __future__ import annotations

import pytest
import torch

from scrolls_ssm.modeling.configuration_scrolls_ssm import MIXER_KINDS, ScrollsSSMConfig
from scrolls_ssm.modeling.mixer_base import optim_hints
from scrolls_ssm.modeling.mixers import MIXERS, build_mixer
from tests.test_ops import selective_scan_reference, ssd_reference

D_MODEL = 32
# Every kind, plus block-local attention with a window shorter than the test sequences and Mamba-2 with 2 groups.
CASES = [pytest.param(kind, {}, id=kind) for kind in MIXERS] + [
    pytest.param("attention", {"attention_window": 4}, id="attention-window4"),
    pytest.param("mamba2", {"mamba2_ngroups": 2}, id="mamba2-2groups"),
]


def tiny_config(kind: str, **overrides) -> ScrollsSSMConfig:
    """Small enough to run every check in well under a second; small chunks so that chunking is exercised."""
    settings = dict(
        d_model=D_MODEL,
        encoder_attention_heads=4,
        encoder_layers=1,
        encoder_layer_types=[kind],
        s4d_d_state=8,
        mamba_d_state=4,
        mamba2_d_state=8,
        mamba2_headdim=16,
        mamba2_chunk_size=8,
        gss_d_state=8,
        attention_dropout=0.0,
    )
    config = ScrollsSSMConfig(**{**settings, **overrides})
    # What the model sets when it is built; a bare config leaves it None, and then transformers' mask helpers
    # return no mask at all.
    config._attn_implementation = "sdpa"
    return config


def make_mixer(kind: str, overrides: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_mixer(tiny_config(kind, **overrides), layer_idx=0).eval()


def hidden(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, length, D_MODEL, generator=torch.Generator().manual_seed(seed))


def test_mixers_cover_exactly_the_configurable_kinds():
    assert set(MIXERS) == set(MIXER_KINDS)


def test_unknown_kind_names_layer_value_and_choices():
    config = tiny_config("attention")
    config.encoder_layer_types[0] = "lstm"  # past the config's own validation, as a hand-edited config would be
    with pytest.raises(ValueError, match=r"encoder_layer_types\[0\]='lstm'.*valid kinds: \['attention'"):
        build_mixer(config, 0)


@pytest.mark.parametrize(("kind", "overrides"), CASES)
def test_output_shape(kind, overrides):
    mixer = make_mixer(kind, overrides)
    x = hidden(2, 13)
    out = mixer(x, torch.ones(2, 13, dtype=torch.long))
    assert out.shape == x.shape and out.dtype == x.dtype


@pytest.mark.parametrize(("kind", "overrides"), CASES)
def test_padding_invariance(kind, overrides):
    """Real positions of a right-padded row match the same row run alone, whatever sits at the pads."""
    mixer = make_mixer(kind, overrides)
    lengths = [19, 11]
    x = hidden(2, 19)
    mask = torch.zeros(2, 19, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    x[1, lengths[1] :] = 1e3 * hidden(1, 19 - lengths[1], seed=2)[0]  # large garbage at the pads
    with torch.no_grad():
        padded = mixer(x, mask)
        for row, length in enumerate(lengths):
            alone = mixer(x[row : row + 1, :length], torch.ones(1, length, dtype=torch.long))
            torch.testing.assert_close(padded[row, :length], alone[0], rtol=1e-5, atol=1e-5)
        assert torch.isfinite(padded).all()


@pytest.mark.parametrize(("kind", "overrides"), CASES)
def test_bidirectional(kind, overrides):
    """Changing the last real position changes position 0, in a padded batch too.

    Block-local attention sees its own and the neighbouring blocks only, so its sequence spans two blocks.
    """
    mixer = make_mixer(kind, overrides)
    length = 2 * overrides["attention_window"] if "attention_window" in overrides else 15
    x = hidden(2, length)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, length - 3 :] = 0
    changed = x.clone()
    changed[0, length - 1] += 1.0
    changed[1, length - 4] += 1.0
    with torch.no_grad():
        before, after = mixer(x, mask), mixer(changed, mask)
    assert (before[:, 0] - after[:, 0]).abs().max(dim=-1).values.min() > 1e-6


@pytest.mark.parametrize(("kind", "overrides"), CASES)
def test_gradients_reach_every_parameter(kind, overrides):
    mixer = make_mixer(kind, overrides).train()
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, 9:] = 0
    out = mixer(hidden(2, 13), mask)
    (out * hidden(2, 13, seed=3)).sum().backward()
    for name, parameter in mixer.named_parameters():
        assert parameter.grad is not None, f"{kind}: {name} got no gradient"
        assert parameter.grad.abs().sum() > 0, f"{kind}: {name} got a zero gradient"
        assert torch.isfinite(parameter.grad).all(), f"{kind}: {name} got a non-finite gradient"


@pytest.mark.parametrize(("kind", "overrides"), CASES)
@pytest.mark.parametrize("length", [1, 2, 7, 33])
def test_finite_at_short_and_odd_lengths(kind, overrides, length):
    mixer = make_mixer(kind, overrides)
    with torch.no_grad():
        out = mixer(hidden(2, length), torch.ones(2, length, dtype=torch.long))
    assert out.shape == (2, length, D_MODEL) and torch.isfinite(out).all()


@pytest.mark.parametrize(("kind", "overrides"), CASES)
def test_bfloat16_autocast_stays_close_to_float32(kind, overrides):
    """Under CPU bf16 autocast the projections run in bf16 but the SSM math stays float32."""
    mixer = make_mixer(kind, overrides)
    x = hidden(2, 21)
    mask = torch.ones(2, 21, dtype=torch.long)
    mask[1, 15:] = 0
    with torch.no_grad():
        expected = mixer(x, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = mixer(x, mask)
    assert torch.isfinite(got).all()
    scale = expected[mask.bool()].abs().max()
    error = (got.float() - expected)[mask.bool()].abs().max()
    assert error <= 0.05 * scale, f"{kind}: bf16 error {error:.3g} vs output scale {scale:.3g}"


@pytest.mark.parametrize("kind", [kind for kind in MIXERS if kind != "attention"])
def test_ssm_dynamics_carry_optimizer_hint(kind):
    """dt / A parameters learn at `ssm_lr`; every hinted parameter skips weight decay."""
    mixer = make_mixer(kind, {"ssm_lr": 2e-3})
    hints = optim_hints(mixer)
    assert set(hints) <= {name for name, _ in mixer.named_parameters()}, hints
    assert any(hint.get("lr") == 2e-3 for hint in hints.values()), hints
    assert all(hint["weight_decay"] == 0.0 and hint.get("lr", 2e-3) == 2e-3 for hint in hints.values()), hints


def test_s4d_convolution_recomputed_in_backward_gives_the_same_gradients():
    """BidirectionalS4D recomputes its kernel and FFTs in backward (activation checkpointing): the gradients must be
    exactly those of the plain graph."""
    mixer = make_mixer("s4d", {})
    ssm = mixer.ssm
    u = torch.randn(2, D_MODEL, 24, generator=torch.Generator().manual_seed(5), requires_grad=True)
    weight = torch.randn(2, D_MODEL, 24, generator=torch.Generator().manual_seed(6))
    grads = []
    for forward in (ssm, lambda x: ssm._convolve(x) + x * ssm.D[:, None]):
        grads.append(torch.autograd.grad((forward(u) * weight).sum(), [u, *ssm.parameters()]))
    for checkpointed, plain in zip(*grads, strict=True):
        torch.testing.assert_close(checkpointed, plain, rtol=0, atol=0)


def _mamba2_reference_row(mixer, h: torch.Tensor) -> torch.Tensor:
    """Bidirectional Mamba-2 on one unpadded row (L, d_model), step by step: each direction's causal convolution as a
    direct sum and its scan as the recurrence (test_ops.ssd_reference), the reverse direction on the flipped row."""
    z, xBC, dt = (h @ mixer.in_proj.weight.T).split(mixer.in_proj_parts, dim=-1)
    dt = torch.nn.functional.softplus(dt + mixer.dt_bias)
    width = mixer.conv1d.weight.shape[-1]
    heads, head_dim, groups, d_state = mixer.heads, mixer.head_dim, mixer.groups, mixer.d_state

    def direction(xBC, dt):
        length = xBC.shape[0]
        conv = torch.stack(
            [
                mixer.conv1d.bias + sum(mixer.conv1d.weight[:, 0, k] * xBC[t - width + 1 + k] for k in range(width)
                                        if t - width + 1 + k >= 0)
                for t in range(length)
            ]
        )  # fmt: skip
        x, B, C = torch.nn.functional.silu(conv).split([mixer.d_inner, mixer.bc_width, mixer.bc_width], dim=-1)
        x = x.reshape(length, heads, head_dim)
        A = -torch.exp(mixer.A_log)
        y, _ = ssd_reference(
            (x * dt[..., None])[None], (dt * A)[None], B.reshape(1, length, groups, d_state),
            C.reshape(1, length, groups, d_state),
        )  # fmt: skip
        return (y[0] + x * mixer.D[:, None]).reshape(length, -1)

    y = direction(xBC, dt) + direction(xBC.flip(0), dt.flip(0)).flip(0)
    return mixer.out_proj(mixer.norm(y, z))


@pytest.mark.parametrize("overrides", [{}, {"mamba2_ngroups": 2}], ids=["1group", "2groups"])
def test_mamba2_mixer_matches_a_step_by_step_reference_per_row(overrides):
    """The mixer's padded, chunked, flipped computation equals the recurrence run on each row's real tokens alone
    (float64, but the mixer takes dt's softplus and the gated norm in float32, hence 1e-6): rows of 21 (three chunks of
    8, the last one partial) and 9 tokens, garbage at the pads."""
    _check_padded_rows_against(make_mixer("mamba2", overrides).double(), _mamba2_reference_row, tolerance=1e-6)


def _check_padded_rows_against(mixer, reference_row, tolerance: float) -> None:
    """The mixer on a float64 batch of rows of 21 and 9 tokens, garbage (1e3) at the pads, against
    `reference_row(mixer, real tokens)` for each row."""
    lengths = [21, 9]
    x = hidden(2, 21).double()
    x[1, lengths[1] :] = 1e3
    mask = torch.zeros(2, 21, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    with torch.no_grad():
        out = mixer(x, mask)
        for row, length in enumerate(lengths):
            expected = reference_row(mixer, x[row, :length])
            torch.testing.assert_close(out[row, :length], expected, rtol=tolerance, atol=tolerance)


def _mamba_reference_row(mixer, h: torch.Tensor) -> torch.Tensor:
    """Bidirectional Mamba on one unpadded row (L, d_model), step by step: each direction's causal convolution as a
    direct sum and its selective scan as the recurrence (test_ops.selective_scan_reference), the reverse direction on
    the flipped row."""
    x, z = (h @ mixer.in_proj.weight.T).chunk(2, dim=-1)

    def direction(ssm, x):
        width, length = ssm.conv1d.weight.shape[-1], x.shape[0]
        conv = torch.stack(
            [
                ssm.conv1d.bias + sum(ssm.conv1d.weight[:, 0, k] * x[t - width + 1 + k] for k in range(width)
                                      if t - width + 1 + k >= 0)
                for t in range(length)
            ]
        )  # fmt: skip
        u = torch.nn.functional.silu(conv)
        dt, B, C = (u @ ssm.x_proj.weight.T).split([ssm.dt_rank, ssm.d_state, ssm.d_state], dim=-1)
        y, _ = selective_scan_reference(
            u.T[None], (dt @ ssm.dt_proj.weight.T).T[None], -torch.exp(ssm.A_log), B.T[None], C.T[None], D=ssm.D,
            delta_bias=ssm.dt_proj.bias, delta_softplus=True,
        )  # fmt: skip
        return y[0].T

    y = direction(mixer.forward_ssm, x) + direction(mixer.backward_ssm, x.flip(0)).flip(0)
    return mixer.out_proj(y * torch.nn.functional.silu(z))


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled-scan", "pytorch-scan"])
def test_mamba_mixer_matches_a_step_by_step_reference_per_row(compiled, monkeypatch):
    """The mixer's padded computation, its reverse direction run from the end of the row with the pads zeroed, equals
    the recurrence run on each row's real tokens alone (float64): rows of 21 and 9 tokens, garbage at the pads."""
    from scrolls_ssm.modeling import ops_selective_scan
    from tests.test_ops import HAS_COMPILER

    if compiled and not HAS_COMPILER:
        pytest.skip("no C compiler on this machine: the compiled scan is not built")
    if not compiled:
        monkeypatch.setattr(ops_selective_scan, "USE_COMPILED_KERNEL", False)
    _check_padded_rows_against(make_mixer("mamba", {}).double(), _mamba_reference_row, tolerance=1e-10)


def test_mamba_gated_projection_equals_the_plain_gate_and_product():
    """`GatedProjection` keeps only y and z and recomputes the gate in backward: the same values and gradients as
    out_proj(y * silu(z)) in float64, and under CPU bfloat16 autocast the same dtypes as F.linear gives."""
    from scrolls_ssm.modeling.mixer_mamba import GatedProjection

    g = torch.Generator().manual_seed(7)
    y, z = (torch.randn(2, 13, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weight = torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 13, 5, generator=g, dtype=torch.float64)
    out = GatedProjection.apply(y, z, weight)
    expected = torch.nn.functional.linear(y * torch.nn.functional.silu(z), weight)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad((out * upstream).sum(), [y, z, weight])
    want = torch.autograd.grad((expected * upstream).sum(), [y, z, weight])
    for name, a, b in zip(["y", "z", "weight"], got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)

    y32, z32, w32 = (t.detach().float().requires_grad_() for t in (y, z, weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = GatedProjection.apply(y32, z32, w32)
        reference = torch.nn.functional.linear(y32 * torch.nn.functional.silu(z32), w32)
    assert out.dtype == reference.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference.float(), rtol=0.02, atol=0.02)
    out.float().sum().backward()
    assert y32.grad.dtype == z32.grad.dtype == w32.grad.dtype == torch.float32
