"""Selective scan (Mamba-1's input-dependent diagonal SSM) in pure PyTorch, trainable at 16K tokens on a CPU.

Same arguments, shapes and return values as `mamba_ssm`'s `selective_scan_fn` for real `A`:

    x_t = exp(delta_t * A) * x_{t-1} + delta_t * B_t * u_t      x: (batch, d, n) per step
    y_t = C_t . x_t  (+ D * u_t) (* silu(z_t))

A Python loop over all L steps makes autograd's backward quadratic when it indexes `x[:, :, t]` and costs 16K tiny
kernel launches otherwise. Here the sequence is cut into `nc` chunks of `T ~ sqrt(L)` steps and scanned on two
levels, so only about 2 * sqrt(L) Python steps run and each one works on a large tensor:

1. All chunks are scanned at once from a zero state, step by step over the T positions of a chunk.
2. The state entering each chunk is carried from chunk to chunk (nc small steps).
3. The carried state reaches position t of its chunk decayed by exp(A * sum of delta over the chunk up to t): a
   short cumulative sum of non-negative deltas, so the exponent never changes sign (no exp(-cumsum) forms).
Loops unbind their inputs once and stack their outputs once, which keeps the backward linear in L.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Runs the selective scan; returns `out` (batch, d, L) in u's dtype, or `(out, last_state)`.

    u, delta, z: (batch, d, L). A: (d, n), real. B, C: (d, n) constant, (batch, n, L) variable, or
    (batch, groups, n, L) variable per group of d / groups channels. D, delta_bias: (d,).
    `last_state` (batch, d, n) is x_L before D and z, in float32 (float64 for float64 inputs).
    The math runs in float32 (or float64) whatever the input dtype or autocast says.
    """
    _check_arguments(u, delta, A, B, C, D, z, delta_bias)
    out_dtype = u.dtype
    compute = torch.promote_types(u.dtype, torch.float32)
    with torch.autocast(device_type=u.device.type, enabled=False):
        u, delta, A = u.to(compute), delta.to(compute), A.to(compute)
        if delta_bias is not None:
            delta = delta + delta_bias.to(compute)[:, None]
        if delta_softplus:
            delta = F.softplus(delta)
        out, last_state = _chunked_scan(u, delta, A, B.to(compute), C.to(compute))
        if D is not None:
            out = out + D.to(compute)[:, None] * u
        if z is not None:
            out = out * F.silu(z.to(compute))
    out = out.to(out_dtype)
    return (out, last_state) if return_last_state else out


def _chunked_scan(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two-level scan of the module docstring; returns y (batch, d, L) and the state after the last step.

    The state is laid out (batch, n, d, nc) and built one step at a time: the read-out sums over a leading axis
    (fast, where a sum over a short last axis is not), and per-step tensors of a few MB are reused by the
    allocator where whole-sequence ones would cost hundreds of MB apiece.
    """
    batch, d, length = u.shape
    n = A.shape[1]
    steps = math.isqrt(length - 1) + 1  # T = ceil(sqrt(L)): T + L/T Python steps in all
    chunks = -(-length // steps)
    # Padding steps have delta = 0 and u = 0: decay 1 and no input, so the final state is the state at step L.
    pad = chunks * steps - length

    def to_chunks(x: torch.Tensor) -> torch.Tensor:
        # (..., L) -> (T, ..., nc): the step inside a chunk leads, so the loops below unbind it once.
        return F.pad(x, (0, pad)).unflatten(-1, (chunks, steps)).movedim(-1, 0)

    A = A.t()[None, :, :, None]  # (d, n) -> (1, n, d, 1)
    delta_c = to_chunks(delta)[:, :, None]  # (T, batch, 1, d, nc)
    drive_c = to_chunks(delta * u)  # (T, batch, d, nc)
    B_c = _per_step(B, to_chunks, steps)  # T entries of (1, n, d, 1) or (batch, n, groups, 1, nc)
    C_c = _per_step(C, to_chunks, steps)

    # 1. Every chunk at once, each from a zero state; decay_so_far[t] = exp(A * delta summed over steps <= t).
    x = u.new_zeros(batch, n, d, chunks)
    decay = torch.ones_like(x)
    y_local, decay_so_far = [], []
    for delta_t, drive_t, B_t, C_t in zip(delta_c.unbind(0), drive_c.unbind(0), B_c, C_c, strict=True):
        decay_t = torch.exp(delta_t * A)  # (batch, n, d, nc)
        x = decay_t * x + _times(drive_t, B_t)
        decay = decay * decay_t
        y_local.append(_read_out(x, C_t))
        decay_so_far.append(decay)

    # 2. Carry the state from chunk to chunk; `decay` now holds each chunk's decay from its start to its end.
    state = u.new_zeros(batch, n, d)
    entering = []
    for decay_c, end_c in zip(decay.unbind(3), x.unbind(3), strict=True):
        entering.append(state)
        state = decay_c * state + end_c
    entering_states = torch.stack(entering, dim=3)  # (batch, n, d, nc)

    # 3. Step t of a chunk also sees the state that entered the chunk, decayed by decay_so_far[t].
    y_carry = [_read_out(decay_t * entering_states, C_t) for decay_t, C_t in zip(decay_so_far, C_c, strict=True)]
    y = torch.stack(y_local) + torch.stack(y_carry)  # (T, batch, d, nc)
    y = y.movedim(0, -1).reshape(batch, d, chunks * steps)[..., :length]  # (T, batch, d, nc) -> (batch, d, L)
    return y, state.transpose(1, 2)  # (batch, n, d) -> (batch, d, n)


def _per_step(
    matrix: torch.Tensor, to_chunks: Callable[[torch.Tensor], torch.Tensor], steps: int
) -> list[torch.Tensor]:
    """B or C for each step of a chunk: (d, n) -> (1, n, d, 1) at every step; (batch, [groups,] n, L) ->
    T tensors of (batch, n, groups, 1, nc)."""
    if matrix.dim() == 2:
        return [matrix.t()[None, :, :, None]] * steps
    if matrix.dim() == 3:
        matrix = matrix[:, None]  # (batch, n, L) -> (batch, 1, n, L)
    # (batch, groups, n, L) -> (T, batch, groups, n, nc) -> (T, batch, n, groups, 1, nc)
    return list(to_chunks(matrix).transpose(2, 3)[:, :, :, :, None].unbind(0))


def _times(drive: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """delta * u (batch, d, nc) times B_t (1, n, d, 1) or (batch, n, groups, 1, nc) -> (batch, n, d, nc)."""
    if matrix.dim() == 4:
        return drive[:, None] * matrix
    batch, d, chunks = drive.shape
    groups = matrix.shape[2]
    # (batch, d, nc) -> (batch, 1, groups, d / groups, nc); the product back to (batch, n, d, nc)
    return (drive.view(batch, 1, groups, d // groups, chunks) * matrix).flatten(2, 3)


def _read_out(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """sum_n C_t * x: x (batch, n, d, nc), C_t (1, n, d, 1) or (batch, n, groups, 1, nc) -> (batch, d, nc)."""
    if matrix.dim() == 4:
        return (x * matrix).sum(1)
    batch, n, d, chunks = x.shape
    groups = matrix.shape[2]
    # (batch, n, d, nc) -> (batch, n, groups, d / groups, nc); the sum back to (batch, d, nc)
    return (x.view(batch, n, groups, d // groups, chunks) * matrix).sum(1).flatten(1, 2)


def _check_arguments(u, delta, A, B, C, D, z, delta_bias) -> None:
    """Raises ValueError, naming the argument and the expected shape, for inputs the scan cannot take."""
    if u.dim() != 3 or u.shape[-1] < 1:
        raise ValueError(f"selective_scan: u must have shape (batch, d, L) with L >= 1, got {tuple(u.shape)}.")
    batch, d, length = u.shape
    for name, tensor in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if not tensor.is_floating_point():
            raise ValueError(f"selective_scan: {name} must be a real floating-point tensor, got {tensor.dtype}.")
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta must have u's shape {(batch, d, length)}, got {tuple(delta.shape)}.")
    if delta.dtype != u.dtype:
        raise ValueError(f"selective_scan: delta must have u's dtype {u.dtype}, got {delta.dtype}.")
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"selective_scan: A must have shape (d, n) = ({d}, n), got {tuple(A.shape)}.")
    n = A.shape[1]
    for name, matrix in (("B", B), ("C", C)):
        constant = matrix.shape == (d, n)
        variable = matrix.dim() == 3 and matrix.shape == (batch, n, length)
        grouped = matrix.dim() == 4 and matrix.shape[:1] + matrix.shape[2:] == (batch, n, length)
        if grouped and d % matrix.shape[1] != 0:
            raise ValueError(
                f"selective_scan: {name} has {matrix.shape[1]} groups, which must divide d={d} "
                f"(shape (batch, groups, n, L) = ({batch}, groups, {n}, {length}))."
            )
        if not (constant or variable or grouped):
            raise ValueError(
                f"selective_scan: {name} must have shape (d, n) = {(d, n)}, (batch, n, L) = {(batch, n, length)} "
                f"or (batch, groups, n, L) = ({batch}, groups, {n}, {length}), got {tuple(matrix.shape)}."
            )
    for name, vector in (("D", D), ("delta_bias", delta_bias)):
        if vector is not None and (vector.shape != (d,) or not vector.is_floating_point()):
            raise ValueError(
                f"selective_scan: {name} must be a real tensor of shape (d,) = ({d},), got "
                f"{tuple(vector.shape)} {vector.dtype}."
            )
    if z is not None and (z.shape != u.shape or z.dtype != u.dtype):
        raise ValueError(
            f"selective_scan: z must have u's shape {(batch, d, length)} and dtype {u.dtype}, got "
            f"{tuple(z.shape)} {z.dtype}."
        )
