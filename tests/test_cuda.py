"""CUDA checks: every mixer and a whole model on the GPU give the CPU's numbers; attention runs through SDPA's flash
backend; the optional fused kernels (mamba-ssm, causal-conv1d, flash-attn) agree with the PyTorch paths.

Marked `cuda` and skipped where no CUDA device is visible: `benchmarks/gpu_check.sh` runs them on a lent GPU.
`SCROLLS_SSM_TEST_DEVICE=cpu python -m pytest -m cuda tests/test_cuda.py` dry-runs this file's logic on the CPU (the
device-against-CPU comparisons then compare the CPU with itself; the kernel checks skip).
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_model
from test_mixers import CASES, hidden, make_mixer
from test_model_contract import SSM_SIZES, batch

from scrolls_ssm.modeling import ops, ops_selective_scan, ops_ssd

DEVICE = torch.device(os.environ.get("SCROLLS_SSM_TEST_DEVICE", "cuda"))

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="no CUDA device visible"),
]


@pytest.fixture(autouse=True)
def exact_float32_matmuls():
    """TF32 would make float32 matmuls on the GPU differ from the CPU's by ~1e-3; the checks compare full float32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _padded_mask(batch_size: int, length: int) -> torch.Tensor:
    mask = torch.ones(batch_size, length, dtype=torch.long)
    mask[-1, length // 2 :] = 0  # the last row right-padded to half its length
    return mask


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float().cpu() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize(("kind", "overrides"), CASES)
def test_mixer_on_device_matches_cpu_values_and_gradients(kind, overrides):
    """Float32 on the device (fused kernels where installed) against float32 on the CPU, with a padded row."""
    x, mask = hidden(2, 40), _padded_mask(2, 40)
    weight = torch.randn(2, 40, x.shape[-1], generator=torch.Generator().manual_seed(3))
    real = mask.bool()[..., None]
    results = []
    for device in (torch.device("cpu"), DEVICE):
        mixer = make_mixer(kind, overrides).to(device)
        inputs = x.to(device).requires_grad_()
        out = mixer(inputs, mask.to(device))
        out = out[0] if isinstance(out, tuple) else out
        (out * weight.to(device) * real.to(device)).sum().backward()
        grads = {name: p.grad.cpu() for name, p in mixer.named_parameters() if p.grad is not None}
        results.append((out.detach().cpu() * real, inputs.grad.cpu(), grads))
    (cpu_out, cpu_dx, cpu_grads), (dev_out, dev_dx, dev_grads) = results
    torch.testing.assert_close(dev_out, cpu_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dev_dx, cpu_dx, rtol=1e-4, atol=1e-4)
    assert dev_grads.keys() == cpu_grads.keys()
    for name in cpu_grads:
        assert _relative_error(dev_grads[name], cpu_grads[name]) < 1e-4, name


@pytest.mark.parametrize(("kind", "overrides"), CASES)
def test_mixer_under_bf16_autocast_stays_close_to_float32(kind, overrides):
    """What `--mixed-precision bf16` runs: within bf16's precision of the float32 CPU output, and finite."""
    x, mask = hidden(2, 64), _padded_mask(2, 64)
    expected = make_mixer(kind, overrides)(x, mask)
    expected = expected[0] if isinstance(expected, tuple) else expected
    mixer = make_mixer(kind, overrides).to(DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        got = mixer(x.to(DEVICE), mask.to(DEVICE))
    got = got[0] if isinstance(got, tuple) else got
    real = mask.bool()[..., None]
    assert torch.isfinite(got).all()
    assert _relative_error(got.float().cpu() * real, expected * real) < 3e-2


@pytest.mark.parametrize("layout", [["s4d", "mamba2"], ["gss", "attention"], ["mamba", "attention"]])
def test_model_on_device_matches_cpu_loss_and_greedy_generation(layout):
    inputs = batch()
    model = tiny_model(encoder_layer_types=layout, **SSM_SIZES)
    expected_loss = model(**inputs).loss
    expected_tokens = model.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=8)
    model.to(DEVICE)
    on_device = {k: v.to(DEVICE) for k, v in inputs.items()}
    torch.testing.assert_close(model(**on_device).loss.cpu(), expected_loss, rtol=1e-4, atol=1e-4)
    tokens = model.generate(on_device["input_ids"], attention_mask=on_device["attention_mask"], max_new_tokens=8)
    assert tokens.cpu().tolist() == expected_tokens.tolist()


def test_attention_runs_on_sdpa_flash_backend():
    """Unpadded bf16 attention with only the flash backend allowed: raises if SDPA would have to fall back."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if DEVICE.type != "cuda":
        pytest.skip("the flash backend of SDPA is CUDA-only")
    x = hidden(2, 256)
    expected = make_mixer("attention", {})(x, None)
    expected = expected[0] if isinstance(expected, tuple) else expected
    mixer = make_mixer("attention", {}).to(DEVICE, torch.bfloat16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        got = mixer(x.to(DEVICE, torch.bfloat16), None)
    got = got[0] if isinstance(got, tuple) else got
    assert _relative_error(got, expected) < 3e-2


# --- the optional fused kernels, against the PyTorch paths they replace ---------------------------------------------


def _kernel_or_skip(kernel, extra: str):
    if DEVICE.type != "cuda" or kernel is None:
        pytest.skip(f"not importable here: install `scrolls-ssm[{extra}]` on a CUDA machine to check it")


def test_selective_scan_kernel_matches_pytorch_path():
    _kernel_or_skip(ops._selective_scan_cuda, "mamba")
    g = torch.Generator().manual_seed(0)
    batch_size, d, n, length = 2, 16, 8, 300
    u, delta = torch.randn(batch_size, d, length, generator=g), torch.rand(batch_size, d, length, generator=g)
    A = -torch.rand(d, n, generator=g) - 0.5
    B, C = torch.randn(batch_size, n, length, generator=g), torch.randn(batch_size, n, length, generator=g)
    D, bias = torch.randn(d, generator=g), torch.randn(d, generator=g)
    z = torch.randn(batch_size, d, length, generator=g)
    args = [t.to(DEVICE) for t in (u, delta, A, B, C, D, z, bias)]
    got, got_state = ops.selective_scan(*args, delta_softplus=True, return_last_state=True)
    expected, state = ops_selective_scan.selective_scan(*args, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got_state, state, rtol=1e-3, atol=1e-3)


def test_chunk_scan_kernel_matches_pytorch_path():
    _kernel_or_skip(ops._chunk_scan_cuda, "mamba")
    g = torch.Generator().manual_seed(0)
    batch_size, length, heads, head_dim, n = 2, 300, 4, 16, 32
    x = torch.randn(batch_size, length, heads, head_dim, generator=g)
    dt = torch.rand(batch_size, length, heads, generator=g) * 0.1 + 1e-3
    A = -torch.rand(heads, generator=g) * 4 - 0.5
    B, C = (torch.randn(batch_size, length, 1, n, generator=g) for _ in range(2))
    x, dt, A, B, C = (t.to(DEVICE) for t in (x, dt, A, B, C))
    got, got_state = ops.mamba2_scan(x, dt, A, B, C, chunk_size=64)
    expected, state = ops_ssd.ssd_scan(x * dt[..., None], dt * A, B, C, chunk_size=64)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got_state, state, rtol=1e-3, atol=1e-3)


def test_causal_conv1d_kernel_matches_pytorch_path():
    _kernel_or_skip(ops._causal_conv1d_cuda, "mamba")
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(2, 64, 300, generator=g), torch.randn(64, 4, generator=g)
    bias = torch.randn(64, generator=g)
    x, weight, bias = (t.to(DEVICE) for t in (x, weight, bias))
    got = ops.causal_conv1d(x, weight, bias, activation="silu")
    expected = torch.nn.functional.silu(
        torch.nn.functional.conv1d(x, weight[:, None], bias, padding=3, groups=64)[..., :300]
    )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_flash_attention_2_model_matches_sdpa():
    import importlib.util

    if DEVICE.type != "cuda" or importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn not importable here: install `scrolls-ssm[flash]` on a CUDA machine to check it")
    inputs = {k: v.to(DEVICE) for k, v in batch().items()}
    losses = []
    for implementation in ("sdpa", "flash_attention_2"):
        model = tiny_model(encoder_layer_types=["s4d", "attention"], **SSM_SIZES, attn_implementation=implementation)
        model.to(DEVICE, torch.bfloat16)
        losses.append(model(**inputs).loss.float().cpu())
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=2e-2)
