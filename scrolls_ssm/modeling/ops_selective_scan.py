"""Selective scan (Mamba-1's input-dependent diagonal SSM) in pure PyTorch, trainable at 16K tokens on a CPU.

Same arguments, shapes and return values as `mamba_ssm`'s `selective_scan_fn` for real `A`:

    x_t = exp(delta_t * A) * x_{t-1} + delta_t * B_t * u_t      x: (batch, d, n) per step
    y_t = C_t . x_t  (+ D * u_t) (* silu(z_t))

A Python loop over all L steps makes autograd's backward quadratic when it indexes `x[:, :, t]` and costs 16K tiny
kernel launches otherwise. Here the sequence is cut into `nc` chunks of `T ~ sqrt(L)` steps and scanned on two
levels, so only about 2 * sqrt(L) Python steps run and each one works on a large tensor:

1. All chunks are scanned at once from a zero state, step by step over the T positions of a chunk, keeping the
   running product of the decays inside the chunk (a product of factors <= 1: no exp(-cumsum) forms).
2. The state entering each chunk is carried from chunk to chunk (nc small steps).
3. Each step adds the entering state times its running decay product.

The backward is written by hand (`_SelectiveScanCore`): it recomputes the states and runs the adjoint recurrence
backwards with the same two levels. Between forward and backward a layer then holds only (batch, d, L)-sized
inputs, not the (batch, d, n, L) states autograd would save (a bidirectional Mamba mixer at d_model 256, L = 16K:
3.7 GB peak instead of 8 GB), and every loop stays linear in L. Inside one call, forward and backward still hold a
few state-sized tensors at once; above `STATE_SLICE_ELEMENTS` the scan runs over slices of channels (independent in
the scan), so that only one slice's are alive at a time.

On a CPU this scan is bound by memory traffic over its states: about 10 passes over them forward and 24 backward
(`benchmarks/scan_floor.py`, docs/benchmarks.md). So on CPU float32 / float64 tensors the core runs in a compiled
kernel that keeps each block of channels' state in cache (ops_cpu.py), where the machine has a C compiler; this
module's two-level scan serves every other call (CUDA without mamba-ssm, tracing, no compiler) with the same numbers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .ops_cpu import SelectiveScanKernel
from .ops_cpu import usable as compiled_kernel_usable


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
    """Runs the selective scan; returns `out` (batch, d, L) in u's dtype, or `(out, last_state)`.

    u, delta, z: (batch, d, L). A: (d, n), real. B, C: (d, n) constant, (batch, n, L) variable, or
    (batch, groups, n, L) variable per group of d / groups channels. D, delta_bias: (d,).
    `last_state` (batch, d, n) is x_L before D and z, in float32 (float64 for float64 inputs).
    `reverse=True` runs the recurrence from step L - 1 down to step 0 (what the scan of the flipped inputs, flipped
    back, gives; `last_state` is then the state after step 0); the compiled kernel does it without copies.
    The math runs in float32 (or float64) whatever the input dtype or autocast says.
    """
    _check_arguments(u, delta, A, B, C, D, z, delta_bias)
    out_dtype = u.dtype
    compute = torch.promote_types(u.dtype, torch.float32)
    with torch.autocast(device_type=u.device.type, enabled=False):
        u, delta, A, B, C = u.to(compute), delta.to(compute), A.to(compute), B.to(compute), C.to(compute)
        D = None if D is None else D.to(compute)
        delta_bias = None if delta_bias is None else delta_bias.to(compute)
        vectors = [t for t in (D, delta_bias) if t is not None]
        if USE_COMPILED_KERNEL and compiled_kernel_usable(u, delta, A, B, C, *vectors):
            out, last_state = SelectiveScanKernel.apply(u, delta, A, B, C, D, delta_bias, delta_softplus, reverse)
        elif reverse:
            u, delta, B, C = u.flip(-1), delta.flip(-1), _flip_steps(B), _flip_steps(C)
            out, last_state = _scan_pytorch(u, delta, A, B, C, D, delta_bias, delta_softplus)
            out = out.flip(-1)
        else:
            out, last_state = _scan_pytorch(u, delta, A, B, C, D, delta_bias, delta_softplus)
        if z is not None:
            out = out * F.silu(z.to(compute))
    out = out.to(out_dtype)
    return (out, last_state) if return_last_state else out


def _scan_pytorch(u, delta, A, B, C, D, delta_bias, delta_softplus) -> tuple[torch.Tensor, torch.Tensor]:
    """The two-level scan of the module docstring, D skip included, over slices of channels where it is large."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    drive, d = delta * u, u.shape[1]
    pieces = [
        _SelectiveScanCore.apply(delta[:, part], drive[:, part], A[part], _channels(B, part, d), _channels(C, part, d))
        for part in _channel_slices(u.shape, A.shape[1], B)
    ]
    out, last_state = (torch.cat(tensors, dim=1) for tensors in zip(*pieces, strict=True))
    return (out if D is None else out + D[:, None] * u), last_state


def _flip_steps(matrix: torch.Tensor) -> torch.Tensor:
    """B or C in reverse step order (a constant (d, n) matrix has no steps)."""
    return matrix if matrix.dim() == 2 else matrix.flip(-1)


# Whether CPU calls go to the compiled kernel where it is built (ops_cpu.py); False forces this module's
# PyTorch scan (the tests and benchmarks/scan_floor.py compare the two).
USE_COMPILED_KERNEL = True


# One call of the scan's core holds a few (batch, d, n, L) tensors at once (the states, their decays, the adjoint):
# 1 GiB each for a bidirectional Mamba layer at d_model 256 and 16K tokens. Channels are independent in the scan, so
# above this many state elements the core runs over slices of channels, one slice's states alive at a time: the same
# work in the same number of passes over memory, with a fraction of the peak. 2**26 float32 values: 256 MiB.
STATE_SLICE_ELEMENTS = 2**26


def _channel_slices(shape: torch.Size, n: int, B: torch.Tensor) -> list[slice]:
    """Slices of the d channels of u's `shape` (batch, d, L) whose states hold at most `STATE_SLICE_ELEMENTS` values
    each (at least one channel, or one group of channels where B and C are grouped: slices keep groups whole)."""
    batch, d, length = shape
    unit = d // B.shape[1] if B.dim() == 4 else 1
    width = max(unit, STATE_SLICE_ELEMENTS // (batch * n * length) // unit * unit)
    return [slice(start, min(start + width, d)) for start in range(0, d, width)]


def _channels(matrix: torch.Tensor, part: slice, d: int) -> torch.Tensor:
    """B or C for the channels `part` of d: a constant (d, n) matrix is sliced, a variable (batch, n, L) one is
    shared by every channel, a grouped (batch, groups, n, L) one gives the groups of those channels."""
    if matrix.dim() == 2:
        return matrix[part]
    if matrix.dim() == 3:
        return matrix
    per_group = d // matrix.shape[1]
    return matrix[:, part.start // per_group : -(-part.stop // per_group)]


class _Chunking:
    """Cuts a length-L axis into nc chunks of T ~ sqrt(L) steps, step-major, and back.

    Padding steps at the end carry delta = 0 and zero inputs: decay 1 and nothing added, so the state after the last
    padding step is the state after step L, and gradients flow through them unchanged.
    """

    def __init__(self, length: int):
        self.length = length
        self.steps = math.isqrt(length - 1) + 1  # T = ceil(sqrt(L)): T + L/T Python steps per loop pair
        self.chunks = -(-length // self.steps)
        self.pad = self.chunks * self.steps - length

    def split(self, x: torch.Tensor) -> torch.Tensor:
        # (..., L) -> (T, ..., nc): the step inside a chunk leads, so loops unbind it once. Contiguous, so that each
        # step's slice is dense along nc (strided inner loops make every per-step op several times slower).
        return F.pad(x, (0, self.pad)).unflatten(-1, (self.chunks, self.steps)).movedim(-1, 0).contiguous()

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        # (T, ..., nc) -> (..., L)
        return x.movedim(0, -1).flatten(-2)[..., : self.length]

    def matrix_steps(self, matrix: torch.Tensor) -> list[torch.Tensor]:
        """B or C per step: (d, n) -> (1, n, d, 1) at every step; (batch, [groups,] n, L) -> T x (batch, n, groups,
        1, nc)."""
        if matrix.dim() == 2:
            return [matrix.t()[None, :, :, None]] * self.steps
        grouped = matrix if matrix.dim() == 4 else matrix[:, None]  # (batch, n, L) -> (batch, 1, n, L)
        # (batch, groups, n, L) -> (T, batch, groups, n, nc) -> (T, batch, n, groups, 1, nc)
        return list(self.split(grouped).transpose(2, 3).contiguous()[:, :, :, :, None].unbind(0))

    def matrix_grad(self, step_grads: list[torch.Tensor], matrix: torch.Tensor) -> torch.Tensor:
        """Per-step gradients from `_matrix_step_grad` back to the shape of B or C."""
        if matrix.dim() == 2:
            return torch.stack(step_grads).sum(0).t()  # T x (n, d) -> (d, n)
        # T x (batch, n, groups, 1, nc) -> (T, batch, groups, n, nc) -> (batch, groups, n, L)
        grad = self.merge(torch.stack(step_grads)[:, :, :, :, 0].transpose(2, 3))
        return grad if matrix.dim() == 4 else grad[:, 0]


class _SelectiveScanCore(torch.autograd.Function):
    """y_t = C_t . x_t with x_t = exp(delta_t A) x_{t-1} + drive_t B_t, and the state after the last step.

    Saves only its inputs: the backward recomputes the states and runs the adjoint recurrence
    g_t = C_t gy_t + exp(delta_{t+1} A) g_{t+1} backwards with the same two-level scheme, so a layer holds
    (batch, d, L)-sized tensors between forward and backward instead of (batch, d, n, L) ones.
    """

    @staticmethod
    def forward(ctx, delta, drive, A, B, C):
        chunking = _Chunking(delta.shape[-1])
        ctx.save_for_backward(delta, drive, A, B, C)
        A_steps = A.t()[None, :, :, None]  # (d, n) -> (1, n, d, 1)
        C_steps = chunking.matrix_steps(C)
        decays, states, _, final = _forward_states(chunking, delta, drive, A_steps, chunking.matrix_steps(B))
        del decays
        y = torch.stack([_read_out(x, C_t) for x, C_t in zip(states, C_steps, strict=True)])  # (T, batch, d, nc)
        return chunking.merge(y), final.transpose(1, 2)  # (batch, n, d) -> (batch, d, n)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_final):
        delta, drive, A, B, C = ctx.saved_tensors
        chunking = _Chunking(delta.shape[-1])
        A_steps = A.t()[None, :, :, None]  # (d, n) -> (1, n, d, 1)
        B_steps, C_steps = chunking.matrix_steps(B), chunking.matrix_steps(C)
        decays, states, entering, _ = _forward_states(chunking, delta, drive, A_steps, B_steps)
        batch, n, d, chunks = states[0].shape
        if grad_y is None:
            grad_y = delta.new_zeros(delta.shape)
        grad_y_steps = chunking.split(grad_y).unbind(0)  # T x (batch, d, nc)

        # Adjoint inside each chunk, from a zero gradient after its last step, walking the steps backwards:
        # local[j] = a_{j+1} local[j+1] + C_j gy_j, and after[j] = a_{j+1} ... a_{T-1} (running product).
        local, after = [None] * chunking.steps, [None] * chunking.steps
        g, product = None, torch.ones_like(states[0])
        for j in reversed(range(chunking.steps)):
            emitted = _times(grad_y_steps[j], C_steps[j])
            g = emitted if g is None else decays[j + 1] * g + emitted
            local[j], after[j] = g, product
            product = product * decays[j]
        # Between chunks, backwards: the gradient reaching the end of chunk c from all later chunks.
        last = delta.new_zeros(batch, n, d) if grad_final is None else grad_final.transpose(1, 2)
        from_later = _carry(product.flip(3), (decays[0] * local[0]).flip(3), last)[0].flip(3)  # (batch, n, d, nc)

        delta_steps, drive_steps = chunking.split(delta).unbind(0), chunking.split(drive).unbind(0)
        grads_delta, grads_drive, grads_A, grads_B, grads_C = [], [], [], [], []
        for j in range(chunking.steps):
            g = local[j].addcmul_(after[j], from_later)  # the full adjoint at step j, in place of the local one
            previous = entering if j == 0 else states[j - 1]
            exponent_grad = g * previous * decays[j]  # dL / d(delta_j A): (batch, n, d, nc)
            grads_delta.append(_read_out(exponent_grad, A_steps))
            grads_A.append(_matrix_step_grad(exponent_grad, delta_steps[j], A_steps))
            grads_drive.append(_read_out(g, B_steps[j]))
            grads_B.append(_matrix_step_grad(g, drive_steps[j], B_steps[j]))
            grads_C.append(_matrix_step_grad(states[j], grad_y_steps[j], C_steps[j]))
            local[j] = after[j] = None  # release as we go
        grad_A = torch.stack(grads_A).sum(0).t()  # T x (n, d) -> (d, n)
        return (
            chunking.merge(torch.stack(grads_delta)),
            chunking.merge(torch.stack(grads_drive)),
            grad_A,
            chunking.matrix_grad(grads_B, B),
            chunking.matrix_grad(grads_C, C),
        )


def _forward_states(
    chunking: _Chunking, delta: torch.Tensor, drive: torch.Tensor, A: torch.Tensor, B_steps: list[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The two-level scan of the module docstring, without autograd.

    Returns per-step decays and states (T x (batch, n, d, nc) each: step j of every chunk), the states entering
    each chunk (batch, n, d, nc) and the state after the last step (batch, n, d). The (batch, n, d, nc) layout puts
    the read-out's sum over n on a leading axis, which is fast, where a sum over a short last axis is not.
    """
    delta_steps = chunking.split(delta)[:, :, None]  # (T, batch, 1, d, nc)
    drive_steps = chunking.split(drive)  # (T, batch, d, nc)
    decays = [torch.exp(delta_t * A) for delta_t in delta_steps.unbind(0)]  # T x (batch, n, d, nc)
    # 1. Every chunk at once, each from a zero state; so_far[j] = a_0 ... a_j inside the chunk.
    x = so_far = None
    states, so_far_steps = [], []
    for decay, drive_t, B_t in zip(decays, drive_steps.unbind(0), B_steps, strict=True):
        added = _times(drive_t, B_t)
        x = added if x is None else decay * x + added
        so_far = decay if so_far is None else so_far * decay
        states.append(x)
        so_far_steps.append(so_far)
    # 2. Carry the state from chunk to chunk; 3. add it, decayed, to every step of the chunk it enters.
    entering, final = _carry(so_far, x, torch.zeros_like(x[..., 0]))
    for x_t, so_far_t in zip(states, so_far_steps, strict=True):
        x_t.addcmul_(so_far_t, entering)
    return decays, states, entering, final


def _carry(
    chunk_decay: torch.Tensor, chunk_input: torch.Tensor, initial: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """state_c = chunk_decay_c * state_{c-1} + chunk_input_c over the chunk axis (last) of (batch, n, d, nc) tensors.

    Returns the state entering each chunk (batch, n, d, nc) and the one after the last (batch, n, d).
    """
    state = initial
    entering = []
    for decay_c, input_c in zip(chunk_decay.unbind(3), chunk_input.unbind(3), strict=True):
        entering.append(state)
        state = decay_c * state + input_c
    return torch.stack(entering, dim=3), state


def _times(scalar: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """scalar (batch, d, nc) times a step's B or C, (1, n, d, 1) or (batch, n, groups, 1, nc) -> (batch, n, d, nc)."""
    if matrix.dim() == 4:
        return scalar[:, None] * matrix
    batch, d, chunks = scalar.shape
    groups = matrix.shape[2]
    # (batch, d, nc) -> (batch, 1, groups, d / groups, nc); the product back to (batch, n, d, nc)
    return (scalar.view(batch, 1, groups, d // groups, chunks) * matrix).flatten(2, 3)


def _read_out(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """sum_n matrix * x: x (batch, n, d, nc), a step's B or C (1, n, d, 1) / (batch, n, groups, 1, nc) ->
    (batch, d, nc)."""
    if matrix.dim() == 4:
        return (x * matrix).sum(1)
    batch, n, d, chunks = x.shape
    groups = matrix.shape[2]
    # (batch, n, d, nc) -> (batch, n, groups, d / groups, nc); the sum back to (batch, d, nc)
    return (x.view(batch, n, groups, d // groups, chunks) * matrix).sum(1).flatten(1, 2)


def _matrix_step_grad(x: torch.Tensor, scalar: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Gradient of a step's B or C (the `matrix` of `_times` / `_read_out`): sum over the channels it is shared by
    of x (batch, n, d, nc) * scalar (batch, d, nc) -> (n, d) for a constant matrix, (batch, n, groups, 1, nc) else."""
    if matrix.dim() == 4:
        return torch.einsum("bndc,bdc->nd", x, scalar)
    batch, n, d, chunks = x.shape
    groups = matrix.shape[2]
    # (batch, n, d, nc) -> (batch, n, groups, d / groups, nc), summed over the channels of each group
    product = x.view(batch, n, groups, d // groups, chunks) * scalar.view(batch, 1, groups, d // groups, chunks)
    return product.sum(3, keepdim=True)


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
