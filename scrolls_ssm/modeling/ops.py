"""The sequence ops the mixers call, and the one place where optional CUDA kernels are imported.

Every op has a pure-PyTorch path (ops_selective_scan.py, ops_ssd.py, ops_s4d.py) that runs on CPU and GPU and
gives the same numbers. When `mamba_ssm` / `causal_conv1d` are installed and the tensors are on CUDA, the fused
kernels serve the call instead; a call they cannot serve (dtype, shape) falls back to PyTorch with one warning per
kernel. The imports sit in try blocks, which transformers' `trust_remote_code` requirement check skips, so a model
saved with this file loads where the kernels are missing. On CPUs, Mamba's selective scan and the causal
convolution go to the kernels of ops_cpu.py, compiled on first use where the machine has a C compiler.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.utils import logging

from .ops_cpu import CausalConvKernel
from .ops_cpu import usable as compiled_kernel_usable
from .ops_s4d import fft_conv, s4d_kernel
from .ops_selective_scan import selective_scan as _selective_scan_torch
from .ops_ssd import ssd_scan

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _selective_scan_cuda
except Exception:  # not installed, or built against another torch / CUDA
    _selective_scan_cuda = None
try:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as _chunk_scan_cuda
except Exception:
    _chunk_scan_cuda = None
try:
    from causal_conv1d import causal_conv1d_fn as _causal_conv1d_cuda
except Exception:
    _causal_conv1d_cuda = None

logger = logging.get_logger(__name__)

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_warned: set[str] = set()

__all__ = ["causal_conv1d", "fft_conv", "mamba2_scan", "s4d_kernel", "selective_scan", "ssd_scan"]


def _fall_back(kernel: str, reason: str) -> None:
    """Warns the first time `kernel` cannot serve a call; later refusals stay quiet."""
    if kernel not in _warned:
        _warned.add(kernel)
        logger.warning(f"{kernel} cannot serve this call ({reason}); using the PyTorch path (same results, slower).")


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    reverse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba-1's selective scan, with `mamba_ssm.selective_scan_fn`'s semantics (see ops_selective_scan.py), plus
    `reverse`: the recurrence from the last step to the first (on CPU without copies, in the compiled kernel)."""
    if _selective_scan_cuda is not None and u.is_cuda:
        reason = _selective_scan_refusal(u, delta, A, B, C, D, z, delta_bias)
        if reason is None:
            if not reverse:
                return _selective_scan_cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
            steps = [t if t is None or t.dim() == 2 else t.flip(-1) for t in (u, delta, B, C, z)]
            result = _selective_scan_cuda(*steps[:4], D, steps[4], delta_bias, delta_softplus, return_last_state)
            return (result[0].flip(-1), result[1]) if return_last_state else result.flip(-1)
        _fall_back("mamba_ssm selective_scan_fn", reason)
    return _selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse)


def _selective_scan_refusal(u, delta, A, B, C, D, z, delta_bias) -> str | None:
    """Why the CUDA selective scan cannot take these arguments, or None when it can."""
    if u.dtype not in _KERNEL_DTYPES or delta.dtype != u.dtype or (z is not None and z.dtype != u.dtype):
        return f"u, delta and z must share one of {_KERNEL_DTYPES}"
    if A.dtype != torch.float32 or any(t is not None and t.dtype != torch.float32 for t in (D, delta_bias)):
        return "A, D and delta_bias must be float32"
    for name, matrix in (("B", B), ("C", C)):
        if matrix.dtype != (torch.float32 if matrix.dim() == 2 else u.dtype):
            return f"{name} must be float32 when constant and u's dtype when variable"
    if A.shape[1] > 256:
        return "d_state must be <= 256"
    return None


def mamba2_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_states: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2's scan in its parameterization: returns Y (batch, L, heads, head_dim) in x's dtype and the final state.

    x: (batch, L, heads, head_dim). dt: (batch, L, heads), the positive step sizes (bias and softplus applied).
    A: (heads,), the per-head decay rates (negative). B, C: (batch, L, groups, d_state). This is `ssd_scan` on
    X = x * dt and A * dt (computed in float32), or `mamba_chunk_scan_combined` on CUDA.
    """
    if _chunk_scan_cuda is not None and x.is_cuda:
        reason = _chunk_scan_refusal(x, dt, A, B, C, chunk_size)
        if reason is None:
            return _chunk_scan_cuda(
                x, dt, A, B, C, chunk_size, initial_states=initial_states, return_final_states=True
            )
        _fall_back("mamba_ssm mamba_chunk_scan_combined", reason)
    if dt.shape != x.shape[:3] or A.shape != x.shape[2:3]:
        raise ValueError(
            f"mamba2_scan: dt must have shape (batch, L, heads) = {tuple(x.shape[:3])} and A shape (heads,) = "
            f"{tuple(x.shape[2:3])}, got {tuple(dt.shape)} and {tuple(A.shape)}."
        )
    length = x.shape[1]
    recorded = torch.is_grad_enabled() and any(t.requires_grad for t in (x, dt, A, B, C))
    if not (isinstance(length, int) and length > SCAN_SEGMENT and recorded):
        return _mamba2_scan_torch(x, dt, A, B, C, chunk_size, initial_states)
    # Longer inputs: segments of SCAN_SEGMENT steps, each recomputed in backward, the state handed from one to the
    # next (exactly: a segment's padding steps neither decay nor add to it). The scan then holds one segment's
    # tensors for backward instead of the whole input's; at 64K tokens that is what lets Mamba-2 train in 24 GB.
    outputs, state = [], initial_states
    for start in range(0, length, SCAN_SEGMENT):
        piece = slice(start, start + SCAN_SEGMENT)
        y, state = checkpoint(
            _mamba2_scan_torch, x[:, piece], dt[:, piece], A, B[:, piece], C[:, piece], chunk_size, state,
            use_reentrant=False,
        )  # fmt: skip
        outputs.append(y)
    return torch.cat(outputs, dim=1), state


# Inputs longer than this many steps (the longest SCROLLS inputs) run the PyTorch Mamba-2 scan in segments of this
# length when gradients are recorded; shorter ones run whole.
SCAN_SEGMENT = 16384


def _mamba2_scan_torch(x, dt, A, B, C, chunk_size, initial_states):
    """`mamba2_scan`'s PyTorch path on one stretch of the sequence."""
    compute = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        dt = dt.to(compute)
        X = x.to(compute) * dt[..., None]  # (batch, L, heads, head_dim)
        Y, final_state = ssd_scan(X, dt * A.to(compute), B, C, chunk_size, initial_states)
    return Y.to(x.dtype), final_state


def _chunk_scan_refusal(x, dt, A, B, C, chunk_size) -> str | None:
    """Why the Triton SSD scan cannot take these arguments, or None when it can."""
    if x.dtype not in _KERNEL_DTYPES or any(t.dtype not in _KERNEL_DTYPES for t in (dt, B, C)):
        return f"x, dt, B and C must be one of {_KERNEL_DTYPES}"
    if A.dtype != torch.float32:
        return "A must be float32"
    if chunk_size & (chunk_size - 1):
        return "chunk_size must be a power of two"
    return None


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    reverse: bool = False,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Depthwise causal convolution: x (batch, d, L), weight (d, width), bias (d,); activation None or "silu".

    Output t sees inputs t - width + 1 .. t; returns (batch, d, L) in x's dtype. `reverse=True` is the same
    convolution run from the end of the sequence (the causal convolution of the flipped x, flipped back): output t
    sees inputs t .. t + width - 1, weight[:, -1] on input t. `keep` (batch, L), 1 at real tokens and 0 at pads,
    reads the pads' inputs as zeros and zeroes their outputs. On CPU float32 / float64 tensors the compiled kernel
    (ops_cpu.py) does all of it in one pass and keeps only x for backward.
    """
    if activation not in (None, "silu"):
        raise ValueError(f"causal_conv1d: activation must be None or 'silu', got {activation!r}.")
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(
            f"causal_conv1d: x must have shape (batch, d, L) and weight (d, width) with the same d, got "
            f"{tuple(x.shape)} and {tuple(weight.shape)}."
        )
    if keep is not None and keep.shape != (x.shape[0], x.shape[2]):
        raise ValueError(
            f"causal_conv1d: keep must have shape (batch, L) = {(x.shape[0], x.shape[2])}, got {tuple(keep.shape)}."
        )
    parameters = [weight] + ([] if bias is None else [bias])
    if USE_COMPILED_CONV and compiled_kernel_usable(x, *parameters):
        return CausalConvKernel.apply(x, weight, bias, keep, activation == "silu", reverse)
    mask = None if keep is None else keep[:, None, :].to(x.dtype)
    if mask is not None:
        x = x * mask
    if _causal_conv1d_cuda is not None and x.is_cuda:
        if x.dtype in _KERNEL_DTYPES and 2 <= weight.shape[1] <= 4:
            if reverse:
                y = _causal_conv1d_cuda(x.flip(-1), weight, bias, activation=activation).flip(-1)
            else:
                y = _causal_conv1d_cuda(x, weight, bias, activation=activation)
            return y if mask is None else y * mask
        _fall_back("causal_conv1d", "it takes float32/16 inputs and widths 2 to 4")
    y = _CausalDepthwiseConv.apply(x, weight, bias, reverse)
    y = F.silu(y) if activation == "silu" else y
    return y if mask is None else y * mask


# Whether CPU calls go to the compiled convolution (ops_cpu.py) where it is built; False forces the PyTorch path
# (the tests compare the two).
USE_COMPILED_CONV = True


def _causal_conv_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, reverse: bool = False
) -> torch.Tensor:
    """The causal depthwise convolution: width - 1 zeros in front of x (batch, d, L), L outputs; with `reverse`,
    the zeros after x and the weights in reverse order.

    As a 2-D convolution over (batch, d, 1, L): oneDNN keeps a channels-last x (stride 1 along d: a transposed
    (batch, L, d) tensor, as the Mamba-2 mixer passes) in that layout, where conv1d would copy it to (batch, d, L)
    and back (at 16K tokens and d = 640 those copies cost 4x the convolution).
    """
    width = weight.shape[1]
    padded = F.pad(x[:, :, None], (0, width - 1) if reverse else (width - 1, 0))
    kernel = weight.flip(-1) if reverse else weight
    return F.conv2d(padded, kernel[:, None, None, :], bias, groups=x.shape[1])[:, :, 0]


class _CausalDepthwiseConv(torch.autograd.Function):
    """`_causal_conv_forward` with a hand-written backward.

    The weight's gradient is `width` fused multiply-and-sum passes over x and the output's gradient; oneDNN's
    depthwise weight gradient took 5x longer on a CPU (16K tokens, 640 channels, one thread: about 550 ms against
    100 ms). The input's gradient is the convolution of the output's gradient with the same weights, run the other
    way.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, reverse: bool = False):
        ctx.save_for_backward(x, weight)
        ctx.reverse = reverse
        return _causal_conv_forward(x, weight, bias, reverse)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        reverse = ctx.reverse
        width, length = weight.shape[1], x.shape[-1]
        dtype = torch.promote_types(x.dtype, grad.dtype)
        with torch.autocast(device_type=x.device.type, enabled=False):
            grad, x, weight = grad.to(dtype), x.to(dtype), weight.to(dtype)
            grad_x = grad_weight = grad_bias = None
            if ctx.needs_input_grad[0]:
                # x_s reaches outputs s .. s + width - 1 (s - width + 1 .. s in reverse) through the same weights
                grad_x = _causal_conv_forward(grad, weight, None, reverse=not reverse)
            if ctx.needs_input_grad[1]:
                # In x's own layout: a channels-last x as the (batch, L, d) tensor it is a view of (mixing layouts
                # in these products made them 2.5x slower).
                along = 1 if x.stride(1) == 1 else 2
                xs, gs = (x.transpose(1, 2), grad.transpose(1, 2).contiguous()) if along == 1 else (x, grad)
                pad = (0, width - 1) if reverse else (width - 1, 0)
                shifted = F.pad(xs, (0, 0, *pad) if along == 1 else pad)
                # weight[:, k] multiplies x_{t - width + 1 + k} (causal) or x_{t + width - 1 - k} (reverse)
                grad_weight = torch.stack(
                    [
                        (gs * shifted.narrow(along, width - 1 - k if reverse else k, length)).sum((0, along))
                        for k in range(width)
                    ],
                    dim=-1,
                )
            if ctx.needs_input_grad[2]:  # False when there is no bias
                grad_bias = grad.sum((0, 2))
        return grad_x, grad_weight, grad_bias, None
