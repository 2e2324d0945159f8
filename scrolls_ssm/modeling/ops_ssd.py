"""Mamba-2's state-space duality (SSD) scan, chunked, in pure PyTorch (Dao & Gu 2024, "Transformers are SSMs").

With a scalar decay per head the recurrence

    h_t = exp(A_t) h_{t-1} + X_t (outer) B_t        h: (head_dim, d_state) per head
    Y_t = h_t . C_t

is, inside a chunk of Q steps, a masked (Q, Q) attention-like matrix product, and between chunks a short scan
over chunk states. Everything is batched matrix products, so 16K tokens train in seconds on a CPU.

Numerics: every decay is exp of a sum over steps inside one chunk (at most 256 of them), taken as a difference of two
cumulative sums that start at the chunk's first step, never of sums over the whole sequence and never exp(-cumsum);
between chunks the state is carried by a scan, one chunk at a time.

Memory and time: the (Q, Q) decay-times-scores matrices, one per head and chunk, are the scan's largest tensors; they
are recomputed in backward (activation checkpointing of the intra-chunk term) instead of kept, and the pass between
chunks is linear in their number.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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
        # Layout: chunk-major, (batch, chunks, Q, heads, k), a view of the padded input. With the heads of a group
        # side by side in memory, the products with B and C take all of a group's heads as the rows of one matrix
        # (no copy of B or C per head), and the output comes out in X's own layout. Chunks are cut with `unfold`
        # (windows of Q, step Q) rather than a reshape, whose divisibility check a symbolic length defeats.
        def padded(x: torch.Tensor, widths: tuple[int, ...]) -> torch.Tensor:
            # F.pad copies even when it adds nothing; at 16K tokens that is a 32 MiB copy of X kept for backward.
            x = x.to(compute)
            return x if isinstance(pad, int) and pad == 0 else F.pad(x, widths)

        def to_chunks(x: torch.Tensor) -> torch.Tensor:
            # (batch, L, heads or groups, k) -> (batch, chunks, heads or groups, k, Q) -> (batch, chunks, Q, ., k)
            return padded(x, (0, 0, 0, 0, 0, pad)).unfold(1, chunk_size, chunk_size).permute(0, 1, 4, 2, 3)

        X_c = to_chunks(X)  # (batch, chunks, Q, heads, head_dim)
        B_c, C_c = to_chunks(B), to_chunks(C)  # (batch, chunks, Q, groups, d_state)
        # (batch, L, heads) -> (batch, chunks, heads, Q)
        A_c = padded(A, (0, 0, 0, pad)).unfold(1, chunk_size, chunk_size)

        def group_rows(x: torch.Tensor) -> torch.Tensor:
            # (batch, chunks, Q, heads, P) -> (batch, chunks, groups, Q, heads per group * P)
            return x.flatten(3).unflatten(3, (groups, per_group * head_dim)).transpose(2, 3)

        # Each chunk's own cumulative log-decay, A_1 + ... + A_i: a sum of at most Q <= 256 steps that starts at the
        # chunk's first step. Every decay below is exp of a difference of two of them, or of one of them.
        A_cum = torch.cumsum(A_c, dim=-1)  # (batch, chunks, heads, Q)

        # Within a chunk: Y_i = sum_{j <= i} (C_i . B_j) exp(A_{j+1} + ... + A_i) X_j. Its (Q, Q) tensors per head
        # are recomputed in backward rather than kept: they are most of the memory the scan would otherwise hold.
        Y = _within_chunks_in_pieces(X_c, A_cum, B_c, C_c)  # (batch, chunks, Q, heads, head_dim)

        # Each chunk's own final state, from a zero state: sum_j exp(A_{j+1} + ... + A_Q) X_j (outer) B_j; one
        # (heads per group * P, Q) x (Q, N) product per chunk and group.
        decay_to_end = torch.exp(A_cum[..., -1:] - A_cum).transpose(2, 3)[..., None]  # (batch, chunks, Q, heads, 1)
        weighted = group_rows(X_c * decay_to_end).transpose(-1, -2)  # (batch, chunks, groups, per group * P, Q)
        chunk_states = weighted @ B_c.transpose(2, 3)  # (batch, chunks, groups, per group * P, N)
        chunk_states = chunk_states.unflatten(3, (per_group, head_dim)).flatten(2, 3)  # (batch, chunks, heads, P, N)

        # Between chunks: the state entering each chunk, from the initial state and all earlier chunks.
        if initial_states is None:
            initial_states = X.new_zeros(batch, heads, head_dim, d_state, dtype=compute)
        entering, final_state = _across_chunks(initial_states.to(compute), chunk_states, A_cum[..., -1])

        # The entering state read out at step i of a chunk, decayed by exp(A_1 + ... + A_i): (Q, N) x (N, rows).
        rows = entering.flatten(2, 3).unflatten(2, (groups, per_group * head_dim))  # (batch, chunks, groups, ., N)
        read = C_c.transpose(2, 3) @ rows.transpose(-1, -2)  # (batch, chunks, groups, Q, per group * P)
        read = read.transpose(2, 3).unflatten(-1, (per_group, head_dim)).flatten(3, 4)  # (batch, chunks, Q, heads, P)
        Y = Y + read * torch.exp(A_cum).transpose(2, 3)[..., None]

    # (batch, chunks, Q, heads, head_dim) -> (batch, L, heads, head_dim)
    Y = leading_positions(Y.reshape(batch, chunks * chunk_size, heads, head_dim), length, dim=1)
    return Y.to(out_dtype), final_state


# Chunks per checkpointed piece of the intra-chunk term. The whole term at once allocates (batch, heads, chunks, Q, Q)
# tensors afresh in every step, and at 16K tokens their first-touch page faults dominate; pieces of 8 chunks keep
# them small enough to reuse freed pages (16K tokens, fwd + bwd on one CPU thread: 4.6 s whole, 3.1 s in pieces of 8,
# 3.5 s of 4, 3.7 s of 16).
CHUNKS_PER_PIECE = 8


def _within_chunks_in_pieces(
    X_c: torch.Tensor, A_cum: torch.Tensor, B_c: torch.Tensor, C_c: torch.Tensor
) -> torch.Tensor:
    """`_within_chunks` over pieces of `CHUNKS_PER_PIECE` chunks, each recomputed in backward when gradients are
    recorded. A symbolic chunk count (torch.export) cannot be split in Python; it takes one piece."""
    tensors = (X_c, A_cum, B_c, C_c)
    record = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if isinstance(X_c.shape[1], int):
        pieces = list(zip(*(t.split(CHUNKS_PER_PIECE, dim=1) for t in tensors), strict=True))
    else:
        pieces = [tensors]
    outs = [
        checkpoint(_within_chunks, *piece, use_reentrant=False) if record else _within_chunks(*piece)
        for piece in pieces
    ]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def _within_chunks(X_c: torch.Tensor, A_cum: torch.Tensor, B_c: torch.Tensor, C_c: torch.Tensor) -> torch.Tensor:
    """The intra-chunk term: (batch, chunks, Q, heads, head_dim). X_c: (batch, chunks, Q, heads, head_dim); A_cum:
    (batch, chunks, heads, Q), the per-chunk cumulative log-decays; B_c, C_c: (batch, chunks, Q, groups, d_state).

    decay[i, j] = exp(A_cum[i] - A_cum[j]) = exp(A_{j+1} + ... + A_i) for j <= i: a difference of two sums of at most
    Q steps from the same start, never of sums over the whole sequence. Above the diagonal the difference is positive
    (it could overflow) and is set to -inf before the exp. C . B is the same for all the heads of a group.
    """
    steps, heads = X_c.shape[2:4]
    groups = B_c.shape[3]
    # Head-major here, (batch, heads or groups, chunks, ...): the products need X per head as contiguous (Q, P)
    # matrices anyway (one copy), and with the heads in front of the chunks, splitting the products' flattened batch
    # back into its dimensions is provable for a symbolic chunk count (torch.export).
    X_h = X_c.permute(0, 3, 1, 2, 4).contiguous()  # (batch, heads, chunks, Q, head_dim)
    A_h = A_cum.transpose(1, 2)  # (batch, heads, chunks, Q)
    causal = torch.ones(steps, steps, dtype=torch.bool, device=X_c.device).tril()
    segments = (A_h[..., :, None] - A_h[..., None, :]).masked_fill_(~causal, float("-inf"))
    decay = segments.exp_().unflatten(1, (groups, heads // groups))  # (batch, groups, per group, chunks, Q, Q)
    scores = C_c.permute(0, 3, 1, 2, 4) @ B_c.permute(0, 3, 1, 4, 2)  # (batch, groups, chunks, Q, Q)
    weights = (decay * scores[:, :, None]).flatten(1, 2)  # (batch, heads, chunks, Q, Q)
    return (weights @ X_h).permute(0, 2, 3, 1, 4)


def _across_chunks(
    initial: torch.Tensor, chunk_states: torch.Tensor, chunk_totals: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The state entering every chunk, and the final state: state_{k+1} = exp(total_k) state_k + chunk_state_k.

    initial: (batch, heads, P, N); chunk_states: (batch, chunks, heads, P, N); chunk_totals: (batch, chunks, heads),
    each chunk's summed log-decay. A scan over the chunks, linear in their number (a dense (chunks x chunks) decay
    matrix would be quadratic: 34 GFLOP per layer at 64K tokens). A symbolic chunk count (torch.export) cannot drive
    a Python loop; it takes the dense form, built from a masked cumulative sum of the totals.
    """
    if isinstance(chunk_states.shape[1], int):
        factors = torch.exp(chunk_totals)[..., None, None].unbind(1)
        states, state = [], initial
        for factor, own in zip(factors, chunk_states.unbind(1), strict=True):
            states.append(state)
            state = factor * state + own
        return torch.stack(states, dim=1), state
    states = torch.cat([initial[:, None], chunk_states], dim=1).transpose(1, 2)  # (batch, heads, 1 + chunks, P, N)
    decay = torch.exp(_segment_sum(F.pad(chunk_totals.transpose(1, 2), (1, 0))))  # (batch, heads, 1 + c, 1 + c)
    states = (decay @ states.flatten(3)).unflatten(3, states.shape[3:]).transpose(1, 2)  # (batch, 1 + c, heads, P, N)
    return states[:, :-1], states[:, -1]


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
