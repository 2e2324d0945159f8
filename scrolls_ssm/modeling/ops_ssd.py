"""Mamba-2's state-space duality (SSD) scan, chunked, in pure PyTorch (Dao & Gu 2024, "Transformers are SSMs").

With a scalar decay per head the recurrence

    h_t = exp(A_t) h_{t-1} + X_t (outer) B_t        h: (head_dim, d_state) per head
    Y_t = h_t . C_t

is, inside a chunk of Q steps, a masked (Q, Q) attention-like matrix product, and between chunks a short scan
over chunk states. Everything is batched matrix products, so 16K tokens train in seconds on a CPU.

Numerics: every decay is exp of a segment sum built by a masked cumulative sum (sum over steps j+1..i, never a
difference of two long cumulative sums and never exp(-cumsum)), and chunks are at most 256 steps long.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops_s4d import leading_positions

MAX_CHUNK_SIZE = 256


def ssd_scan(
    X: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_states: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the SSD recurrence; returns Y (batch, L, heads, head_dim) in X's dtype and the final state.

    X: (batch, L, heads, head_dim), already multiplied by dt. A: (batch, L, heads), already multiplied by dt (the
    log-decay of each step, normally <= 0). B, C: (batch, L, groups, d_state) with groups dividing heads (1 or
    heads, typically). initial_states: (batch, heads, head_dim, d_state). Any L: it is padded to a multiple of
    `chunk_size` (<= 256) internally. The final state (batch, heads, head_dim, d_state) is float32 (float64 for
    float64 inputs); the math runs in that precision whatever the input dtype or autocast says.
    """
    _check_arguments(X, A, B, C, chunk_size, initial_states)
    batch, length, heads, head_dim = X.shape
    groups, d_state = B.shape[2:]
    per_group = heads // groups
    out_dtype = X.dtype
    compute = torch.promote_types(X.dtype, torch.float32)
    # A symbolic length (torch.export, torch.compile with dynamic shapes) gets one or two more chunks of padding, so
    # that the chunk count is known to be >= 2 and never takes the size-1 branches of broadcasting and matmul.
    chunks = -(-length // chunk_size) if isinstance(length, int) else length // chunk_size + 2
    pad = chunks * chunk_size - length  # written so that a symbolic L + pad simplifies to chunks * chunk_size
    with torch.autocast(device_type=X.device.type, enabled=False):
        # Padding steps: A = 0 (decay 1) and X = 0 (no input), so the final state is the state after step L.
        # Chunks are cut with `unfold` (windows of Q, step Q) rather than a reshape, whose divisibility check a
        # symbolic length defeats.
        def to_chunks(x: torch.Tensor) -> torch.Tensor:
            # (batch, L, heads or groups, k) -> (batch, chunks, heads or groups, k, Q) -> (batch, ., chunks, Q, k)
            x = F.pad(x.to(compute), (0, 0, 0, 0, 0, pad)).unfold(1, chunk_size, chunk_size)
            return x.permute(0, 2, 1, 4, 3)

        X_c = to_chunks(X)  # (batch, heads, chunks, Q, head_dim)
        B_c, C_c = to_chunks(B), to_chunks(C)  # (batch, groups, chunks, Q, d_state)
        # (batch, L, heads) -> (batch, chunks, heads, Q) -> (batch, heads, chunks, Q)
        A_c = F.pad(A.to(compute), (0, 0, 0, pad)).unfold(1, chunk_size, chunk_size).permute(0, 2, 1, 3)

        def by_group(x: torch.Tensor) -> torch.Tensor:
            # (batch, heads, ...) -> (batch, groups, heads per group, ...), to meet B and C's groups
            return x.unflatten(1, (groups, per_group))

        # Within a chunk: Y_i += sum_{j <= i} (C_i . B_j) exp(A_{j+1} + ... + A_i) X_j. C . B is the same for all the
        # heads of a group, so it is computed once per group.
        decay = torch.exp(_segment_sum(A_c))  # (batch, heads, chunks, Q, Q), zero above the diagonal
        scores = C_c @ B_c.transpose(-1, -2)  # (batch, groups, chunks, Q, Q)
        Y = (by_group(decay) * scores[:, :, None]).flatten(1, 2) @ X_c  # (batch, heads, chunks, Q, head_dim)

        # Each chunk's own final state, from a zero state: sum_j exp(A_{j+1} + ... + A_Q) X_j (outer) B_j.
        decay_to_end = decay[..., -1, :, None]  # (batch, heads, chunks, Q, 1): the last row of the segment sums
        weighted = by_group((X_c * decay_to_end).transpose(-1, -2))  # (batch, groups, per group, chunks, P, Q)
        chunk_states = (weighted @ B_c[:, :, None]).flatten(1, 2)  # (batch, heads, chunks, head_dim, d_state)

        # Between chunks: the state entering each chunk, from the initial state and all earlier chunks.
        if initial_states is None:
            initial_states = X.new_zeros(batch, heads, head_dim, d_state, dtype=compute)
        states = torch.cat([initial_states.to(compute)[:, :, None], chunk_states], dim=2)  # (.., 1 + chunks, P, N)
        chunk_totals = F.pad(A_c.sum(-1), (1, 0))  # (batch, heads, 1 + chunks): a chunk's summed log-decay
        chunk_decay = torch.exp(_segment_sum(chunk_totals))  # (batch, heads, 1 + chunks, 1 + chunks)
        # (batch, heads, 1 + chunks, head_dim * d_state) -> (batch, heads, 1 + chunks, head_dim, d_state)
        states = (chunk_decay @ states.flatten(3)).unflatten(3, (head_dim, d_state))
        entering, final_state = states[:, :, :-1], states[:, :, -1]

        # The entering state read out at step i of a chunk, decayed by exp(A_1 + ... + A_i) (a cumsum of <= Q terms
        # that starts at the chunk's first step).
        decay_from_start = torch.exp(torch.cumsum(A_c, dim=-1))[..., None]  # (batch, heads, chunks, Q, 1)
        read = C_c[:, :, None] @ by_group(entering).transpose(-1, -2)  # (batch, groups, per group, chunks, Q, P)
        Y = Y + read.flatten(1, 2) * decay_from_start

    # (batch, heads, chunks, Q, head_dim) -> (batch, chunks, Q, heads, head_dim) -> (batch, L, heads, head_dim)
    Y = leading_positions(Y.permute(0, 2, 3, 1, 4).reshape(batch, chunks * chunk_size, heads, head_dim), length, dim=1)
    return Y.to(out_dtype), final_state


def _segment_sum(x: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T) with out[..., i, j] = x[j+1] + ... + x[i] for j <= i and -inf above the diagonal.

    Built as a cumulative sum down a masked copy of x, so each entry sums only its own segment: subtracting two long
    cumulative sums would cancel catastrophically in float32.
    """
    steps = x.shape[-1]
    below = torch.ones(steps, steps, dtype=torch.bool, device=x.device).tril(-1)
    # entry (i, j) holds x[i] where i > j: summing down column j from row j+1 to row i gives the segment j+1..i.
    segments = torch.cumsum(x[..., :, None].expand(*x.shape, steps).masked_fill(~below, 0.0), dim=-2)
    on_or_below = torch.ones(steps, steps, dtype=torch.bool, device=x.device).tril()
    return segments.masked_fill(~on_or_below, float("-inf"))


def _check_arguments(X, A, B, C, chunk_size, initial_states) -> None:
    """Raises ValueError, naming the argument and the expected shape, for inputs the scan cannot take."""
    if X.dim() != 4 or X.shape[1] < 1:
        raise ValueError(f"ssd_scan: X must have shape (batch, L, heads, head_dim) with L >= 1, got {tuple(X.shape)}.")
    batch, length, heads, head_dim = X.shape
    for name, tensor in (("X", X), ("A", A), ("B", B), ("C", C)):
        if not tensor.is_floating_point():
            raise ValueError(f"ssd_scan: {name} must be a real floating-point tensor, got {tensor.dtype}.")
    if A.shape != (batch, length, heads):
        raise ValueError(
            f"ssd_scan: A must have shape (batch, L, heads) = {(batch, length, heads)}, got {tuple(A.shape)}."
        )
    if B.dim() != 4 or B.shape[:2] != (batch, length) or heads % B.shape[2] != 0:
        raise ValueError(
            f"ssd_scan: B must have shape (batch, L, groups, d_state) = ({batch}, {length}, groups, d_state) with "
            f"groups dividing heads={heads}, got {tuple(B.shape)}."
        )
    if C.shape != B.shape:
        raise ValueError(f"ssd_scan: C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}.")
    if not (isinstance(chunk_size, int) and 1 <= chunk_size <= MAX_CHUNK_SIZE):
        raise ValueError(f"ssd_scan: chunk_size must be an int in [1, {MAX_CHUNK_SIZE}], got {chunk_size!r}.")
    expected_state = (batch, heads, head_dim, B.shape[-1])
    if initial_states is not None and initial_states.shape != expected_state:
        raise ValueError(
            f"ssd_scan: initial_states must have shape (batch, heads, head_dim, d_state) = {expected_state}, got "
            f"{tuple(initial_states.shape)}."
        )
