"""Every op against a plain float64 recurrence or direct convolution sum, values and gradients, plus bad inputs."""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from scrolls_ssm.modeling import ops, ops_cpu, ops_selective_scan
from scrolls_ssm.modeling.ops_selective_scan import selective_scan
from scrolls_ssm.modeling.ops_ssd import ssd_scan


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- references
def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """One step at a time, in whatever dtype it is given (float64 in these tests)."""
    batch, d, length = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)

    def at(matrix, t):  # B or C at step t, broadcastable to the (batch, d, n) state
        if matrix.dim() == 2:
            return matrix[None]
        if matrix.dim() == 3:
            return matrix[:, None, :, t]
        return matrix[..., t].repeat_interleave(d // matrix.shape[1], dim=1)

    x = u.new_zeros(batch, d, A.shape[1])
    ys = []
    for t in range(length):
        x = torch.exp(delta[:, :, t, None] * A) * x + (delta[:, :, t] * u[:, :, t])[..., None] * at(B, t)
        ys.append((x * at(C, t)).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y, x


def ssd_reference(X, A, B, C, initial_states=None):
    batch, length, heads, head_dim = X.shape
    B = B.repeat_interleave(heads // B.shape[2], dim=2)
    C = C.repeat_interleave(heads // C.shape[2], dim=2)
    h = X.new_zeros(batch, heads, head_dim, B.shape[-1]) if initial_states is None else initial_states
    ys = []
    for t in range(length):
        h = torch.exp(A[:, t])[:, :, None, None] * h + X[:, t, :, :, None] * B[:, t, :, None, :]
        ys.append((h * C[:, t, :, None, :]).sum(-1))
    return torch.stack(ys, dim=1), h


def s4d_kernel_reference(log_dt, A, C, length):
    """The naive kernel: materializes the (H, N/2, L) Vandermonde matrix."""
    dtA = torch.exp(log_dt)[:, None] * A
    vandermonde = torch.exp(dtA[:, :, None] * torch.arange(length, dtype=log_dt.dtype))
    return 2 * torch.einsum("chn,hnl->chl", C * (torch.exp(dtA) - 1) / A, vandermonde).real


def conv_reference(u, K, bidirectional):
    """The direct O(L^2) sums."""
    length = u.shape[-1]
    y = torch.zeros_like(u)
    for t in range(length):
        for s in range(length):
            if s <= t:
                y[..., t] += K[0, :, t - s] * u[..., s]
            elif bidirectional:
                y[..., t] += K[1, :, s - t - 1] * u[..., s]
    return y


# ---------------------------------------------------------------------------------------------- selective scan
def _scan_inputs(kind: str, length: int = 37, batch: int = 2, d: int = 6, n: int = 4, dtype=torch.float64):
    g = _seeded(1)
    shape = {"constant": (d, n), "variable": (batch, n, length), "grouped": (batch, 3, n, length)}[kind]
    return dict(
        u=torch.randn(batch, d, length, generator=g, dtype=dtype),
        delta=torch.rand(batch, d, length, generator=g, dtype=dtype),
        A=-torch.rand(d, n, generator=g, dtype=dtype) * 3,
        B=torch.randn(*shape, generator=g, dtype=dtype),
        C=torch.randn(*shape, generator=g, dtype=dtype),
        D=torch.randn(d, generator=g, dtype=dtype),
        z=torch.randn(batch, d, length, generator=g, dtype=dtype),
        delta_bias=torch.rand(d, generator=g, dtype=dtype) - 0.2,  # delta + bias stays > 0 without softplus
    )


HAS_COMPILER = shutil.which(os.environ.get("CC", "cc")) is not None


@pytest.fixture(params=["compiled", "pytorch"])
def scan_backend(request, monkeypatch):
    """Runs a test once on the compiled CPU kernel (ops_cpu.py) and once on the PyTorch two-level scan, and
    checks that the backend asked for is the one that served every call."""
    served = []
    if request.param == "compiled":
        if not HAS_COMPILER:
            pytest.skip("no C compiler on this machine: the compiled scan is not built")
        assert ops_cpu.load() is not None, "a C compiler is on PATH, yet the compiled scan did not build"
        monkeypatch.setattr(ops_selective_scan, "SelectiveScanKernel", _counting(ops_cpu.SelectiveScanKernel, served))
    else:
        monkeypatch.setattr(ops_selective_scan, "USE_COMPILED_KERNEL", False)
        monkeypatch.setattr(
            ops_selective_scan, "_SelectiveScanCore", _counting(ops_selective_scan._SelectiveScanCore, served)
        )
    yield request.param
    assert served, f"the {request.param} scan served no call"


def _counting(function_class, served: list):
    class Counting(function_class):
        @classmethod
        def apply(cls, *args):
            served.append(cls)
            return super().apply(*args)

    return Counting


@pytest.mark.parametrize("kind", ["constant", "variable", "grouped"])
@pytest.mark.parametrize("extras", [(), ("D",), ("z", "delta_bias"), ("D", "z", "delta_bias")])
@pytest.mark.parametrize("softplus", [False, True])
@pytest.mark.parametrize("length", [1, 37])
def test_selective_scan_matches_recurrence(kind, extras, softplus, length, scan_backend):
    inputs = _scan_inputs(kind, length)
    kwargs = {k: inputs[k] for k in ("u", "delta", "A", "B", "C", *extras)}
    expected, expected_state = selective_scan_reference(**kwargs, delta_softplus=softplus)
    float32 = {k: v.float() for k, v in kwargs.items()}
    out, state = selective_scan(**float32, delta_softplus=softplus, return_last_state=True)
    assert out.dtype == torch.float32 and state.shape == (2, 6, 4)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.double(), expected_state, rtol=1e-4, atol=1e-4)
    assert torch.equal(selective_scan(**float32, delta_softplus=softplus), out)  # without the last state


@pytest.mark.parametrize("kind", ["constant", "variable", "grouped"])
@pytest.mark.parametrize(
    ("length", "d"),
    # One chunk of the compiled kernel's backward and three; d: part of a block of its 8 channels, blocks that span
    # groups of B and C (21 channels in 3 groups of 7), and blocks inside one group (24 channels in 3 groups of 8).
    [(23, 6), (150, 6), (150, 21), (70, 24)],
)
def test_selective_scan_gradients_match_recurrence(kind, length, d, scan_backend):
    inputs = {k: v.requires_grad_() for k, v in _scan_inputs(kind, length=length, d=d).items()}
    weight = torch.randn(2, d, length, generator=_seeded(2), dtype=torch.float64)
    out, state = selective_scan(**inputs, delta_softplus=True, return_last_state=True)
    grads = torch.autograd.grad((out * weight).sum() + state.sum(), list(inputs.values()))
    expected, expected_state = selective_scan_reference(**inputs, delta_softplus=True)
    expected_grads = torch.autograd.grad((expected * weight).sum() + expected_state.sum(), list(inputs.values()))
    for name, grad, expected_grad in zip(inputs, grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-8, msg=f"gradient of {name}")


@pytest.mark.parametrize("kind", ["constant", "variable", "grouped"])
def test_selective_scan_in_reverse_is_the_scan_of_the_flipped_inputs(kind, scan_backend):
    """`reverse=True` equals scanning the inputs flipped along L and flipping the output back (float64, values, last
    state and every gradient), over three chunks of the compiled kernel's backward."""
    inputs = {
        k: v.requires_grad_() for k, v in _scan_inputs(kind, length=150, d=21 if kind != "grouped" else 6).items()
    }
    weight = torch.randn(*inputs["u"].shape, generator=_seeded(5), dtype=torch.float64)

    def flipped(name, tensor):
        return tensor.flip(-1) if name in ("u", "delta", "z") or (name in ("B", "C") and tensor.dim() > 2) else tensor

    out, state = selective_scan(**inputs, delta_softplus=True, return_last_state=True, reverse=True)
    grads = torch.autograd.grad((out * weight).sum() + state.sum(), list(inputs.values()))
    expected, expected_state = selective_scan_reference(
        **{k: flipped(k, v) for k, v in inputs.items()}, delta_softplus=True
    )
    expected = expected.flip(-1)
    expected_grads = torch.autograd.grad((expected * weight).sum() + expected_state.sum(), list(inputs.values()))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, expected_state, rtol=1e-10, atol=1e-10)
    for name, grad, expected_grad in zip(inputs, grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-8, msg=f"gradient of {name}")


@pytest.mark.parametrize("kind", ["constant", "variable", "grouped"])
@pytest.mark.parametrize("channels_per_slice", [1, 4])
def test_selective_scan_over_channel_slices_equals_one_pass(kind, channels_per_slice, monkeypatch):
    """Above `STATE_SLICE_ELEMENTS` state values the PyTorch scan runs over slices of channels (grouped B / C: whole
    groups of 2 channels, so 4 per slice -> 4 + 2); outputs, last state and every gradient equal the one-pass scan's.
    (The compiled kernel holds no state-sized tensors and never slices.)"""
    monkeypatch.setattr(ops_selective_scan, "USE_COMPILED_KERNEL", False)
    inputs = {k: v.requires_grad_() for k, v in _scan_inputs(kind, length=23).items()}
    weight = torch.randn(2, 6, 23, generator=_seeded(3), dtype=torch.float64)

    def run():
        out, state = selective_scan(**inputs, delta_softplus=True, return_last_state=True)
        grads = torch.autograd.grad((out * weight).sum() + state.sum(), list(inputs.values()))
        return out, state, grads

    whole = run()
    batch, n, length = 2, 4, 23
    monkeypatch.setattr(ops_selective_scan, "STATE_SLICE_ELEMENTS", channels_per_slice * batch * n * length)
    slices = ops_selective_scan._channel_slices(inputs["u"].shape, n, inputs["B"])
    width = max(channels_per_slice, 2) if kind == "grouped" else channels_per_slice
    assert [part.stop - part.start for part in slices] == [width] * (6 // width) + ([6 % width] if 6 % width else [])
    sliced = run()
    torch.testing.assert_close(sliced[0], whole[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sliced[1], whole[1], rtol=1e-12, atol=1e-12)
    for name, got, want in zip(inputs, sliced[2], whole[2], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"gradient of {name}")


def test_selective_scan_long_sequence_is_stable(scan_backend):
    """Large step sizes over many steps: no overflow from long products of decays."""
    inputs = _scan_inputs("variable", length=3000, d=2, n=3, dtype=torch.float32)
    out, state = selective_scan(
        inputs["u"], inputs["delta"] * 20, inputs["A"] * 5, inputs["B"], inputs["C"], return_last_state=True
    )
    assert torch.isfinite(out).all() and torch.isfinite(state).all()


def test_selective_scan_keeps_float32_math_under_autocast(scan_backend):
    inputs = _scan_inputs("variable", dtype=torch.float32)
    expected = selective_scan(**inputs, delta_softplus=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = selective_scan(
            **{k: v.bfloat16() if v.dim() == 3 and k != "B" and k != "C" else v for k, v in inputs.items()},
            delta_softplus=True,
        )
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.05)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine: the compiled scan is not built")
@pytest.mark.parametrize("kind", ["constant", "variable", "grouped"])
def test_compiled_scan_splits_channels_among_threads_without_changing_results(kind):
    """Rows are split among torch's threads, each summing the gradients of shared B and C into its own buffer: two
    and three threads give one thread's numbers (to rounding of the sums' order)."""
    inputs = {k: v.requires_grad_() for k, v in _scan_inputs(kind, length=70, batch=3).items()}
    weight = torch.randn(3, 6, 70, generator=_seeded(4), dtype=torch.float64)

    def run(threads):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out, state = selective_scan(**inputs, delta_softplus=True, return_last_state=True)
            return [out, state, *torch.autograd.grad((out * weight).sum() + state.sum(), list(inputs.values()))]
        finally:
            torch.set_num_threads(before)

    one = run(1)
    for threads in (2, 3):
        for got, want in zip(run(threads), one, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["channels_last", "mixed"])
def test_selective_scan_gives_the_same_numbers_in_every_layout(layout, scan_backend):
    """u and delta as transposed views of (batch, L, d) tensors (what the Mamba mixer passes; the compiled kernel reads
    them in place), or u so and delta not (delta is copied to u's layout): the same outputs and gradients, in float64
    to rounding, as (batch, d, L) inputs."""
    inputs = _scan_inputs("variable", length=70, d=21)
    weight = torch.randn(2, 21, 70, generator=_seeded(6), dtype=torch.float64)

    def run(transposed: tuple[str, ...]):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        laid = {k: v.transpose(1, 2).contiguous().transpose(1, 2) if k in transposed else v for k, v in leaves.items()}
        out, state = selective_scan(**laid, delta_softplus=True, return_last_state=True)
        return [out, state, *torch.autograd.grad((out * weight).sum() + state.sum(), list(leaves.values()))]

    expected = run(())
    got = run(("u", "delta", "z") if layout == "channels_last" else ("u",))
    for name, a, b in zip(["out", "state", *inputs], got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def _scan_in_child(inputs, results) -> None:
    torch.set_num_threads(2)
    results.put(selective_scan(**inputs, delta_softplus=True).tolist())  # plain data: the child exits first


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine: the compiled scan is not built")
def test_compiled_scan_runs_in_a_forked_child_after_the_parent_used_its_threads():
    """A process forked after the kernel ran on two threads (a DataLoader worker, say) has none of those threads; its
    own scan must not wait on them."""
    import multiprocessing

    inputs = _scan_inputs("variable", length=70, d=130, dtype=torch.float32)  # 3 blocks: both threads get work
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = selective_scan(**inputs, delta_softplus=True)
    finally:
        torch.set_num_threads(before)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_scan_in_child, args=(inputs, results))
    child.start()
    got = results.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0
    torch.testing.assert_close(torch.tensor(got), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler on this machine: the compiled scan is not built")
def test_compiled_scan_is_built_once_into_the_cache(tmp_path, monkeypatch):
    """The first load compiles into $SCROLLS_SSM_CACHE/kernels; a later process (here: a cleared cache of the
    loader) loads that file without compiling again."""
    monkeypatch.setenv("SCROLLS_SSM_CACHE", str(tmp_path))
    monkeypatch.setattr(ops_cpu, "load", ops_cpu.load.__wrapped__)  # uncached
    assert ops_cpu.load() is not None
    (library,) = (tmp_path / "kernels").glob("ops_cpu-*.so")
    assert not any(path.name.startswith(".build-") for path in (tmp_path / "kernels").iterdir())
    built = library.stat().st_mtime_ns
    compiled = []
    monkeypatch.setattr(ops_cpu, "_compile", lambda *args: compiled.append(args))
    assert ops_cpu.load() is not None and not compiled and library.stat().st_mtime_ns == built


@pytest.mark.parametrize(
    ("environment", "reason"),
    [
        ({"CC": "no-such-compiler"}, "no C compiler found (looked for 'no-such-compiler' on PATH; set CC)"),
        ({"CC": "false"}, "failed"),  # a "compiler" that fails every build
        ({"SCROLLS_SSM_CPU_KERNELS": "0"}, None),  # switched off: quietly
    ],
)
def test_without_the_compiled_scan_the_pytorch_scan_serves_with_one_warning(
    tmp_path, monkeypatch, environment, reason
):
    monkeypatch.setenv("SCROLLS_SSM_CACHE", str(tmp_path))
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    warnings = []
    monkeypatch.setattr(ops_cpu.logger, "warning", warnings.append)
    ops_cpu.load.cache_clear()
    try:
        inputs = _scan_inputs("variable", dtype=torch.float32)
        assert not ops_cpu.usable(*(inputs[k] for k in ("u", "delta", "A", "B", "C")))
        expected, _ = selective_scan_reference(**{k: v.double() for k, v in inputs.items()}, delta_softplus=True)
        for _ in range(2):
            torch.testing.assert_close(
                selective_scan(**inputs, delta_softplus=True).double(), expected, rtol=1e-4, atol=1e-4
            )
    finally:
        ops_cpu.load.cache_clear()
    if reason is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and reason in warnings[0] and "using the PyTorch paths" in warnings[0]
    assert not list(tmp_path.rglob("*.so"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"delta": torch.zeros(2, 6, 5)}, "delta must have u's shape"),
        ({"A": torch.zeros(5, 4)}, r"A must have shape \(d, n\)"),
        ({"B": torch.zeros(2, 5, 37)}, r"B must have shape \(d, n\)"),
        ({"C": torch.zeros(2, 4, 4, 37)}, "C has 4 groups"),
        ({"D": torch.zeros(5)}, r"D must be a real tensor of shape \(d,\)"),
        ({"z": torch.zeros(2, 6, 36)}, "z must have u's shape"),
        ({"delta": torch.zeros(2, 6, 37, dtype=torch.float64)}, "delta must have u's dtype"),
        ({"u": torch.zeros(6, 37)}, r"u must have shape \(batch, d, L\)"),
    ],
)
def test_selective_scan_rejects_bad_inputs(change, message):
    inputs = {**_scan_inputs("variable", dtype=torch.float32), **change}
    with pytest.raises(ValueError, match=message):
        selective_scan(**inputs)


# ---------------------------------------------------------------------------------------------- SSD
def _ssd_inputs(length=37, groups=1, with_initial=False, batch=2, heads=4, head_dim=3, d_state=5):
    g = _seeded(3)
    return dict(
        X=torch.randn(batch, length, heads, head_dim, generator=g, dtype=torch.float64),
        A=-torch.rand(batch, length, heads, generator=g, dtype=torch.float64),
        B=torch.randn(batch, length, groups, d_state, generator=g, dtype=torch.float64),
        C=torch.randn(batch, length, groups, d_state, generator=g, dtype=torch.float64),
        initial_states=torch.randn(batch, heads, head_dim, d_state, generator=g, dtype=torch.float64)
        if with_initial
        else None,
    )


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("with_initial", [False, True])
# (75, 4): 19 chunks, more than one checkpointed piece of the intra-chunk term (ops_ssd.CHUNKS_PER_PIECE = 8)
@pytest.mark.parametrize(("length", "chunk_size"), [(37, 8), (32, 8), (1, 4), (5, 16), (75, 4)])
def test_ssd_scan_matches_recurrence(groups, with_initial, length, chunk_size):
    inputs = _ssd_inputs(length, groups, with_initial)
    expected, expected_state = ssd_reference(**inputs)
    Y, state = ssd_scan(**{k: v.float() if v is not None else None for k, v in inputs.items()}, chunk_size=chunk_size)
    assert Y.dtype == torch.float32
    torch.testing.assert_close(Y.double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.double(), expected_state, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("length", "chunk_size"), [(19, 8), (75, 4)])
def test_ssd_scan_gradients_match_recurrence(length, chunk_size):
    """Also through the recomputation in backward, over several pieces (75 steps in chunks of 4: 19 chunks)."""
    inputs = {k: v.requires_grad_() for k, v in _ssd_inputs(length=length, groups=2, with_initial=True).items()}
    weight = torch.randn(2, length, 4, 3, generator=_seeded(4), dtype=torch.float64)
    Y, state = ssd_scan(**inputs, chunk_size=chunk_size)
    grads = torch.autograd.grad((Y * weight).sum() + state.sum(), list(inputs.values()))
    expected, expected_state = ssd_reference(**inputs)
    expected_grads = torch.autograd.grad((expected * weight).sum() + expected_state.sum(), list(inputs.values()))
    for name, grad, expected_grad in zip(inputs, grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-8, msg=f"gradient of {name}")


def test_ssd_scan_long_strong_decay_is_finite():
    inputs = _ssd_inputs(length=2000, heads=2)
    Y, state = ssd_scan(inputs["X"].float(), inputs["A"].float() * 50, inputs["B"].float(), inputs["C"].float(), 256)
    assert torch.isfinite(Y).all() and torch.isfinite(state).all()


@pytest.mark.parametrize(
    ("change", "chunk_size", "message"),
    [
        ({"A": torch.zeros(2, 37, 3)}, 8, r"A must have shape \(batch, L, heads\)"),
        ({"B": torch.zeros(2, 37, 3, 5)}, 8, "B must have shape"),
        ({"C": torch.zeros(2, 37, 1, 4)}, 8, "C must have B's shape"),
        ({"initial_states": torch.zeros(2, 4, 3, 4)}, 8, "initial_states must have shape"),
        ({}, 512, r"chunk_size must be an int in \[1, 256\]"),
    ],
)
def test_ssd_scan_rejects_bad_inputs(change, chunk_size, message):
    inputs = {**_ssd_inputs(), **change}
    with pytest.raises(ValueError, match=message):
        ssd_scan(**inputs, chunk_size=chunk_size)


def test_mamba2_scan_in_segments_matches_the_whole_scan(monkeypatch):
    """Past ops.SCAN_SEGMENT steps (with gradients recorded) the scan runs in segments recomputed in backward, the
    state handed on: the same outputs, final state and gradients as one scan. 53 steps in segments of 16 (chunks of
    8): four segments, the last one partial; with an initial state and 2 groups."""
    g = _seeded(9)
    inputs = {
        "x": torch.randn(2, 53, 4, 3, generator=g, dtype=torch.float64),
        "dt": torch.rand(2, 53, 4, generator=g, dtype=torch.float64),
        "A": -torch.rand(4, generator=g, dtype=torch.float64),
        "B": torch.randn(2, 53, 2, 5, generator=g, dtype=torch.float64),
        "C": torch.randn(2, 53, 2, 5, generator=g, dtype=torch.float64),
        "initial_states": torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64),
    }
    weight = torch.randn(2, 53, 4, 3, generator=g, dtype=torch.float64)
    results = []
    for segment in (1 << 20, 16):
        monkeypatch.setattr(ops, "SCAN_SEGMENT", segment)
        leaves = {name: tensor.clone().requires_grad_() for name, tensor in inputs.items()}
        Y, state = ops.mamba2_scan(**leaves, chunk_size=8)
        grads = torch.autograd.grad((Y * weight).sum() + state.square().sum(), list(leaves.values()))
        results.append((Y.detach(), state.detach(), grads))
    (Y, state, grads), (Y_seg, state_seg, grads_seg) = results
    torch.testing.assert_close(Y_seg, Y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state_seg, state, rtol=1e-10, atol=1e-10)
    for name, grad, grad_seg in zip(inputs, grads, grads_seg, strict=True):
        torch.testing.assert_close(grad_seg, grad, rtol=1e-10, atol=1e-10, msg=f"gradient of {name}")


def test_mamba2_scan_is_ssd_on_dt_scaled_inputs():
    g = _seeded(5)
    x, dt = torch.randn(2, 21, 4, 3, generator=g), torch.rand(2, 21, 4, generator=g)
    A, B, C = -torch.rand(4, generator=g), torch.randn(2, 21, 1, 5, generator=g), torch.randn(2, 21, 1, 5, generator=g)
    Y, state = ops.mamba2_scan(x, dt, A, B, C, chunk_size=8)
    expected, expected_state = ssd_reference(
        x.double() * dt.double()[..., None], A.double() * dt.double(), B.double(), C.double()
    )
    torch.testing.assert_close(Y.double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.double(), expected_state, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"A shape \(heads,\)"):
        ops.mamba2_scan(x, dt, A[:3], B, C, chunk_size=8)


# ---------------------------------------------------------------------------------------------- S4D
def _s4d_parameters(heads=3, half_state=4, channels=2):
    g = _seeded(6)
    log_dt = torch.rand(heads, generator=g, dtype=torch.float64) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)
    A = torch.complex(
        -0.5 * torch.ones(heads, half_state, dtype=torch.float64),
        math.pi * torch.arange(half_state, dtype=torch.float64).expand(heads, -1),
    )
    C = torch.complex(
        torch.randn(channels, heads, half_state, generator=g, dtype=torch.float64),
        torch.randn(channels, heads, half_state, generator=g, dtype=torch.float64),
    )
    return log_dt, A, C


@pytest.mark.parametrize("length", [1, 7, 37, 300])
def test_s4d_kernel_matches_materialized_vandermonde(length):
    log_dt, A, C = _s4d_parameters()
    expected = s4d_kernel_reference(log_dt, A, C, length)
    got = ops.s4d_kernel(log_dt.float(), A.to(torch.complex64), C.to(torch.complex64), length)
    assert got.shape == (2, 3, length) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_s4d_kernel_gradients_match_materialized_vandermonde():
    parameters = [p.requires_grad_() for p in _s4d_parameters()]
    weight = torch.randn(2, 3, 29, generator=_seeded(7), dtype=torch.float64)
    grads = torch.autograd.grad((ops.s4d_kernel(*parameters, 29) * weight).sum(), parameters)
    expected = torch.autograd.grad((s4d_kernel_reference(*parameters, 29) * weight).sum(), parameters)
    for grad, expected_grad in zip(grads, expected, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("length", [1, 2, 17])
def test_fft_conv_matches_direct_sums(bidirectional, length):
    g = _seeded(8)
    u = torch.randn(2, 3, length, generator=g, dtype=torch.float64, requires_grad=True)
    K = torch.randn(2 if bidirectional else 1, 3, length, generator=g, dtype=torch.float64, requires_grad=True)
    got, expected = ops.fft_conv(u, K, bidirectional), conv_reference(u, K, bidirectional)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-8)
    weight = torch.randn_like(expected)
    grads = torch.autograd.grad((got * weight).sum(), [u, K])
    expected_grads = torch.autograd.grad((expected * weight).sum(), [u, K])
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-8)


def test_fft_conv_takes_bfloat16_and_returns_it():
    u = torch.randn(2, 3, 16, generator=_seeded(9))
    K = torch.randn(2, 3, 16, generator=_seeded(10))
    got = ops.fft_conv(u.bfloat16(), K.bfloat16(), bidirectional=True)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ops.fft_conv(u, K, bidirectional=True), rtol=0.05, atol=0.1)


def test_s4d_ops_reject_bad_inputs():
    log_dt, A, C = _s4d_parameters()
    with pytest.raises(ValueError, match=r"A must be a complex tensor of shape \(H, N/2\)"):
        ops.s4d_kernel(log_dt, A.real, C, 8)
    with pytest.raises(ValueError, match=r"C must be a complex tensor of shape \(channels, H, N/2\)"):
        ops.s4d_kernel(log_dt, A, C[:, :2], 8)
    with pytest.raises(ValueError, match="length must be an int >= 1"):
        ops.s4d_kernel(log_dt, A, C, 0)
    with pytest.raises(ValueError, match=r"K must be a real tensor of shape \(channels, H, L\) = \(2, 3, 8\)"):
        ops.fft_conv(torch.zeros(1, 3, 8), torch.zeros(1, 3, 8), bidirectional=True)


# ---------------------------------------------------------------------------------------------- causal conv
@pytest.fixture(params=["compiled", "pytorch"])
def conv_backend(request, monkeypatch):
    """Runs a test on the compiled CPU convolution (ops_cpu.py) and on the PyTorch one."""
    if request.param == "compiled":
        if not HAS_COMPILER:
            pytest.skip("no C compiler on this machine: the compiled kernels are not built")
        assert ops_cpu.load() is not None, "a C compiler is on PATH, yet the compiled kernels did not build"
    monkeypatch.setattr(ops, "USE_COMPILED_CONV", request.param == "compiled")
    return request.param


@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv1d_matches_direct_sum(activation, conv_backend):
    g = _seeded(11)
    x, weight, bias = torch.randn(2, 3, 9, generator=g), torch.randn(3, 4, generator=g), torch.randn(3, generator=g)
    expected = torch.stack(
        [sum(weight[:, k] * x[:, :, t - 3 + k] for k in range(4) if t - 3 + k >= 0) + bias for t in range(9)], dim=-1
    )
    expected = F.silu(expected) if activation == "silu" else expected
    torch.testing.assert_close(ops.causal_conv1d(x, weight, bias, activation), expected)
    with pytest.raises(ValueError, match="activation must be None or 'silu'"):
        ops.causal_conv1d(x, weight, bias, "relu")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("reverse", [False, True], ids=["causal", "reverse"])
def test_causal_conv1d_gradients_match_conv1d_in_both_layouts(layout, with_bias, reverse, conv_backend):
    """The hand-written backward gives conv1d's gradients (float64), for a (batch, d, L) tensor and for the transposed
    view of a (batch, L, d) one, which is what the Mamba-2 mixer passes; the outputs keep the input's layout. The
    reverse convolution (Mamba-1's backward direction) equals conv1d on the flipped sequence, flipped back."""
    g = _seeded(12)
    if layout == "contiguous":
        x = torch.randn(2, 5, 13, generator=g, dtype=torch.float64)
    else:
        x = torch.randn(2, 13, 5, generator=g, dtype=torch.float64).transpose(1, 2)
    x.requires_grad_(True)
    weight = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    upstream = torch.randn(2, 5, 13, generator=g, dtype=torch.float64)

    def grads(fn):
        inputs = [x, weight] + ([bias] if with_bias else [])
        out = fn()
        return out, torch.autograd.grad((out * upstream).sum(), inputs)

    def reference():  # reverse: the causal convolution of the flipped sequence, flipped back
        inputs = x.flip(-1) if reverse else x
        out = F.silu(F.conv1d(inputs, weight[:, None], bias, padding=3, groups=5)[..., :13])
        return out.flip(-1) if reverse else out

    out, got = grads(lambda: ops.causal_conv1d(x, weight, bias, "silu", reverse=reverse))
    ref_out, expected = grads(reference)
    torch.testing.assert_close(out, ref_out)
    for g_got, g_expected in zip(got, expected, strict=True):
        torch.testing.assert_close(g_got, g_expected)
    assert (out.stride(1) == 1) == (layout == "channels_last")
    assert torch.autograd.gradcheck(lambda x, w: ops.causal_conv1d(x, w, bias, reverse=reverse), (x, weight))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("reverse", [False, True], ids=["causal", "reverse"])
def test_causal_conv1d_with_a_pad_mask_reads_pads_as_zeros_and_zeroes_them(layout, reverse, conv_backend):
    """`keep` equals masking x before and the output after (float64, values and gradients); 70 channels: a whole
    block of the compiled kernel's 64 and part of one. Pads hold 1e4, so a leak would show."""
    g = _seeded(13)
    shape = (2, 70, 19) if layout == "contiguous" else (2, 19, 70)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    x = (x if layout == "contiguous" else x.transpose(1, 2)).requires_grad_(True)
    keep = torch.ones(2, 19, dtype=torch.float64)
    keep[1, 12:] = 0
    with torch.no_grad():
        x[1, :, 12:] = 1e4
    weight = torch.randn(70, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(70, generator=g, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 70, 19, generator=g, dtype=torch.float64)

    def grads(fn):
        out = fn()
        return out, torch.autograd.grad((out * upstream).sum(), [x, weight, bias])

    out, got = grads(lambda: ops.causal_conv1d(x, weight, bias, "silu", reverse=reverse, keep=keep))
    mask = keep[:, None]

    def reference():
        inputs = x * mask
        inputs = inputs.flip(-1) if reverse else inputs
        y = F.silu(F.conv1d(inputs, weight[:, None], bias, padding=3, groups=70)[..., :19])
        return (y.flip(-1) if reverse else y) * mask

    ref_out, expected = grads(reference)
    torch.testing.assert_close(out, ref_out)
    assert out[1, :, 12:].abs().max() == 0
    for name, g_got, g_expected in zip(["x", "weight", "bias"], got, expected, strict=True):
        torch.testing.assert_close(g_got, g_expected, msg=name)
    with pytest.raises(ValueError, match=r"keep must have shape \(batch, L\)"):
        ops.causal_conv1d(x, weight, bias, "silu", keep=keep[:, :5])


def test_causal_conv1d_silu_stays_finite_for_huge_inputs(conv_backend):
    """SiLU of very negative pre-activations is (minus) zero, not NaN (the compiled kernel keeps its exp finite)."""
    g = _seeded(14)
    x = torch.randn(1, 8, 10, generator=g) * 1e4
    weight, bias = torch.randn(8, 4, generator=g), torch.randn(8, generator=g)
    out = ops.causal_conv1d(x, weight, bias, "silu")
    expected = F.silu(F.conv1d(x, weight[:, None], bias, padding=3, groups=8)[..., :10])
    torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------------------------------------- kernel dispatch
def test_kernel_refusals_name_the_reason_and_warn_once(monkeypatch):
    """The CUDA kernels' capability checks (no GPU needed) and the one-warning-per-kernel fallback."""
    inputs = _scan_inputs("variable", dtype=torch.float32)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    assert ops._selective_scan_refusal(*args) is None
    args[2] = inputs["A"].double()
    assert "A, D and delta_bias must be float32" in ops._selective_scan_refusal(*args)
    x = torch.zeros(1, 4, 2, 3)
    assert "power of two" in ops._chunk_scan_refusal(x, x[..., 0], torch.zeros(2), x, x, chunk_size=48)
    warnings = []
    monkeypatch.setattr(ops, "_warned", set())
    monkeypatch.setattr(ops.logger, "warning", warnings.append)
    ops._fall_back("some kernel", "reason one")
    ops._fall_back("some kernel", "reason two")
    assert len(warnings) == 1 and "some kernel cannot serve this call (reason one)" in warnings[0]
