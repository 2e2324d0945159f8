"""Compiled CPU kernels: Mamba-1's selective scan (its state kept in cache) and the causal convolution.

The pure-PyTorch scan (ops_selective_scan.py) materializes the (batch, d, n, L) states and passes over them about 34
times per forward + backward: on a CPU that memory traffic is its whole cost (docs/benchmarks.md, "Mamba-1: the floor
that stops it on a CPU"). This kernel walks the L steps once per block of `WIDTH` channels, with the block's
(n, WIDTH) state in cache, and reads and writes only (batch, d, L)-sized inputs and outputs:

- forward: per step, delta = softplus(delta + bias), h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t and
  y_t = C_t . h_t + D u_t; the state entering every `CHUNK`-th step is kept (1/64 of the states);
- backward: chunk by chunk from the end, the chunk's states and decays are recomputed from the kept state into a
  buffer that stays in cache, and the adjoint g_t = C_t gy_t + exp(delta_{t+1} A) g_{t+1} runs backwards through it,
  giving the gradients of u, delta, A, B, C, D and the bias;
- `reverse` runs the steps from last to first in place (Mamba's backward direction), no flip.

The convolution (`CausalConvKernel`, for `ops.causal_conv1d`) fuses SiLU and the pad mask and keeps only its input
for backward, where the pre-activation is recomputed.

The C source lives in this file, so that a checkpoint's copied code (`trust_remote_code`) carries it. It is compiled
on first use with the machine's C compiler (`$CC`, else `cc`), for this CPU (`-march=native`), into
`$SCROLLS_SSM_CACHE/kernels` (default `~/.cache/scrolls_ssm/kernels`), written atomically so that parallel processes
can race for it. Where no compiler works the ops fall back to their PyTorch paths, with one warning that says why;
`SCROLLS_SSM_CPU_KERNELS=0` turns the kernels off. Blocks are independent, so they are split among
`torch.get_num_threads()` threads (the kernel runs outside the GIL).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Steps between two kept states. Backward recomputes one chunk of a block at a time into 2 x CHUNK x WIDTH x n values
# (512 KiB at n = 16 in float32, second-level cache), and the kept states cost n / CHUNK values per step and channel.
CHUNK = 64

# The scan's C body, written once over REAL / EXP / LOG1P / NAME and compiled for float and double. Work items are
# (batch, block of WIDTH channels) pairs; u, delta, y and their gradients share one layout, given by its (batch,
# channel, time) strides: channels-last (a (batch, L, d) tensor, each step of a block a few cache lines) or
# time-contiguous (batch, d, L) (each cache line serves 16 steps of one channel, all of a block's lines stay in the
# first-level cache between steps). B and C are read at
# B + batch * b_batch + group * b_group + t * b_time + k, and their gradients are written with the same strides.
_BODY = r"""
static inline REAL NAME(softplus)(REAL x) { return x > 20 ? x : LOG1P(EXP(x)); }
/* Arguments of exp stay finite: under -ffast-math, 1 / inf may be computed as a reciprocal estimate that gives NaN. */
static inline REAL NAME(sigmoid)(REAL x) { return x > 20 ? 1 : x < -80 ? 0 : 1 / (1 + EXP(-x)); }

/* A block's per-step and per-state values are arrays over its WIDTH channels, [k][c] for states, so that every inner
   loop runs over the channels: a constant trip count that the compiler vectorizes whole (exp included), with no sums
   across vector lanes. Lanes past the block's w channels carry u = 0 (their state stays 0) and are never written. */

/* Step t's delta (after bias and softplus), u and drive delta * u of the block's channels. */
static inline void NAME(step_inputs)(const REAL *restrict u, const REAL *restrict delta, int64_t s_chan,
                                     const REAL *restrict bias, int64_t softplus, int64_t w, REAL *restrict raw,
                                     REAL *restrict dt, REAL *restrict uc, REAL *restrict drive) {
    if (w == WIDTH) {
        for (int64_t c = 0; c < WIDTH; ++c) {
            raw[c] = delta[c * s_chan] + (bias ? bias[c] : 0);
            uc[c] = u[c * s_chan];
        }
    } else {
        for (int64_t c = 0; c < WIDTH; ++c) raw[c] = uc[c] = 0;
        for (int64_t c = 0; c < w; ++c) {
            raw[c] = delta[c * s_chan] + (bias ? bias[c] : 0);
            uc[c] = u[c * s_chan];
        }
    }
    if (softplus)
        for (int64_t c = 0; c < WIDTH; ++c) dt[c] = NAME(softplus)(raw[c]);
    else
        for (int64_t c = 0; c < WIDTH; ++c) dt[c] = raw[c];
    for (int64_t c = 0; c < WIDTH; ++c) drive[c] = dt[c] * uc[c];
}

/* The block's A as [k][c], where each channel finds its rows of B and C (batch and group offsets: one integer
   division per channel and block, not per step), and whether they are all one row (one group: B and C are then a
   scalar per step and state). */
static inline int NAME(block_setup)(const REAL *restrict A, int64_t b, int64_t c0, int64_t w, int64_t n,
                                    int64_t per_group, int64_t b_batch, int64_t b_group, REAL *restrict a,
                                    int64_t *restrict rows) {
    for (int64_t k = 0; k < n; ++k)
        for (int64_t c = 0; c < WIDTH; ++c) a[k * WIDTH + c] = c < w ? A[(c0 + c) * n + k] : 0;
    for (int64_t c = 0; c < WIDTH; ++c) rows[c] = b * b_batch + ((c0 + (c < w ? c : 0)) / per_group) * b_group;
    return c0 / per_group == (c0 + w - 1) / per_group;
}

static inline __attribute__((always_inline)) int NAME(forward_impl)(
    SCAN_FORWARD_PARAMETERS)
{
    const int64_t blocks = (d + WIDTH - 1) / WIDTH, chunks = (length + chunk - 1) / chunk, state = WIDTH * n;
    REAL *h = malloc(state * sizeof(REAL)), *a = malloc(state * sizeof(REAL));
    if (!h || !a) { free(h); free(a); return 1; }
    for (int64_t item = item_begin; item < item_end; ++item) {
        const int64_t b = item / blocks, c0 = (item % blocks) * WIDTH, w = d - c0 < WIDTH ? d - c0 : WIDTH;
        REAL *kb = kept + item * chunks * state;
        int64_t rows[WIDTH];
        const int shared = NAME(block_setup)(A, b, c0, w, n, per_group, b_batch, b_group, a, rows);
        memset(h, 0, state * sizeof(REAL));
        for (int64_t step = 0; step < length; ++step) {
            if (step % chunk == 0) memcpy(kb + (step / chunk) * state, h, state * sizeof(REAL));
            const int64_t t = reverse ? length - 1 - step : step, at = b * s_batch + t * s_time + c0 * s_chan;
            REAL raw[WIDTH], dt[WIDTH], uc[WIDTH], drive[WIDTH], acc[WIDTH];
            NAME(step_inputs)(u + at, delta + at, s_chan, bias ? bias + c0 : 0, softplus, w, raw, dt, uc, drive);
            for (int64_t c = 0; c < WIDTH; ++c) acc[c] = 0;
            for (int64_t k = 0; k < n; ++k) {
                REAL *restrict hk = h + k * WIDTH;
                const REAL *restrict ak = a + k * WIDTH;
                if (shared) {
                    const REAL bk = B[rows[0] + t * b_time + k], ck = C[rows[0] + t * b_time + k];
                    for (int64_t c = 0; c < WIDTH; ++c) {
                        hk[c] = DECAY(dt[c] * ak[c]) * hk[c] + drive[c] * bk;
                        acc[c] += ck * hk[c];
                    }
                } else {
                    for (int64_t c = 0; c < WIDTH; ++c) {
                        const int64_t o = rows[c] + t * b_time + k;
                        hk[c] = DECAY(dt[c] * ak[c]) * hk[c] + drive[c] * B[o];
                        acc[c] += C[o] * hk[c];
                    }
                }
            }
            for (int64_t c = 0; c < w; ++c) y[at + c * s_chan] = acc[c] + (D ? D[c0 + c] * uc[c] : 0);
        }
        for (int64_t c = 0; c < w; ++c)
            for (int64_t k = 0; k < n; ++k) last[(b * d + c0 + c) * n + k] = h[k * WIDTH + c];
    }
    free(h); free(a);
    return 0;
}

static inline __attribute__((always_inline)) int NAME(backward_impl)(
    SCAN_BACKWARD_PARAMETERS)
{
    const int64_t blocks = (d + WIDTH - 1) / WIDTH, chunks = (length + chunk - 1) / chunk, state = WIDTH * n;
    REAL *states = malloc(chunk * state * sizeof(REAL)), *decays = malloc(chunk * state * sizeof(REAL));
    REAL *steps = malloc(chunk * 4 * WIDTH * sizeof(REAL));  /* raw, dt, u, drive of each step of the chunk */
    REAL *g = malloc(state * sizeof(REAL)), *gA = malloc(state * sizeof(REAL)), *a = malloc(state * sizeof(REAL));
    if (!states || !decays || !steps || !g || !gA || !a) {
        free(states); free(decays); free(steps); free(g); free(gA); free(a);
        return 1;
    }
    for (int64_t item = item_begin; item < item_end; ++item) {
        const int64_t b = item / blocks, c0 = (item % blocks) * WIDTH, w = d - c0 < WIDTH ? d - c0 : WIDTH;
        const REAL *kb = kept + item * chunks * state;
        int64_t rows[WIDTH];
        const int shared = NAME(block_setup)(A, b, c0, w, n, per_group, b_batch, b_group, a, rows);
        REAL gD[WIDTH] = {0}, gbias[WIDTH] = {0};
        for (int64_t k = 0; k < n; ++k)
            for (int64_t c = 0; c < WIDTH; ++c)
                g[k * WIDTH + c] = grad_last && c < w ? grad_last[(b * d + c0 + c) * n + k] : 0;
        memset(gA, 0, state * sizeof(REAL));
        for (int64_t ci = chunks - 1; ci >= 0; --ci) {
            const int64_t s0 = ci * chunk, s1 = s0 + chunk < length ? s0 + chunk : length;
            /* Recompute the chunk's steps from the state kept at its start. */
            for (int64_t step = s0; step < s1; ++step) {
                const int64_t t = reverse ? length - 1 - step : step, j = step - s0;
                const int64_t at = b * s_batch + t * s_time + c0 * s_chan;
                REAL *raw = steps + 4 * WIDTH * j, *dt = raw + WIDTH, *uc = dt + WIDTH, *drive = uc + WIDTH;
                NAME(step_inputs)(u + at, delta + at, s_chan, bias ? bias + c0 : 0, softplus, w, raw, dt, uc, drive);
                const REAL *restrict prev = j ? states + (j - 1) * state : kb + ci * state;
                REAL *restrict st = states + j * state, *restrict dec = decays + j * state;
                for (int64_t k = 0; k < n; ++k) {
                    const int64_t i = k * WIDTH;
                    if (shared) {
                        const REAL bk = B[rows[0] + t * b_time + k];
                        for (int64_t c = 0; c < WIDTH; ++c) {
                            dec[i + c] = DECAY(dt[c] * a[i + c]);
                            st[i + c] = dec[i + c] * prev[i + c] + drive[c] * bk;
                        }
                    } else {
                        for (int64_t c = 0; c < WIDTH; ++c) {
                            dec[i + c] = DECAY(dt[c] * a[i + c]);
                            st[i + c] = dec[i + c] * prev[i + c] + drive[c] * B[rows[c] + t * b_time + k];
                        }
                    }
                }
            }
            /* The adjoint, backwards through the chunk. */
            for (int64_t step = s1 - 1; step >= s0; --step) {
                const int64_t t = reverse ? length - 1 - step : step, j = step - s0;
                const int64_t at = b * s_batch + t * s_time + c0 * s_chan;
                const REAL *raw = steps + 4 * WIDTH * j, *dt = raw + WIDTH, *uc = dt + WIDTH, *drive = uc + WIDTH;
                const REAL *restrict st = states + j * state, *restrict dec = decays + j * state;
                const REAL *restrict before = j ? states + (j - 1) * state : kb + ci * state;
                REAL gy[WIDTH], sum_dt[WIDTH], sum_drive[WIDTH];
                for (int64_t c = 0; c < WIDTH; ++c) {
                    gy[c] = c < w ? grad_y[at + c * s_chan] : 0;
                    sum_dt[c] = sum_drive[c] = 0;
                }
                for (int64_t k = 0; k < n; ++k) {
                    const int64_t i = k * WIDTH;
                    REAL *restrict gk = g + i, *restrict gAk = gA + i;
                    const REAL *restrict ak = a + i, *restrict dk = dec + i, *restrict sk = st + i;
                    const REAL *restrict pk = before + i;
                    if (shared) {
                        const int64_t o = rows[0] + t * b_time + k;
                        const REAL bk = B[o], ck = C[o];
                        REAL gb = 0, gc = 0;
                        for (int64_t c = 0; c < WIDTH; ++c) {
                            const REAL full = gk[c] + gy[c] * ck;  /* dL / d state_t */
                            const REAL e = full * dk[c] * pk[c];  /* dL / d(delta_t A) */
                            gc += gy[c] * sk[c];
                            sum_dt[c] += e * ak[c];
                            gAk[c] += e * dt[c];
                            sum_drive[c] += full * bk;
                            gb += full * drive[c];
                            gk[c] = full * dk[c];
                        }
                        grad_B[o] += gb;
                        grad_C[o] += gc;
                    } else {
                        REAL full[WIDTH];
                        for (int64_t c = 0; c < WIDTH; ++c) {
                            const int64_t o = rows[c] + t * b_time + k;
                            full[c] = gk[c] + gy[c] * C[o];
                            const REAL e = full[c] * dk[c] * pk[c];
                            sum_dt[c] += e * ak[c];
                            gAk[c] += e * dt[c];
                            sum_drive[c] += full[c] * B[o];
                            gk[c] = full[c] * dk[c];
                        }
                        for (int64_t c = 0; c < w; ++c) {  /* channels may share a row: one at a time */
                            const int64_t o = rows[c] + t * b_time + k;
                            grad_C[o] += gy[c] * sk[c];
                            grad_B[o] += full[c] * drive[c];
                        }
                    }
                }
                for (int64_t c = 0; c < w; ++c) {
                    const REAL g_dt = sum_dt[c] + sum_drive[c] * uc[c];
                    const REAL g_raw = softplus ? g_dt * NAME(sigmoid)(raw[c]) : g_dt;
                    grad_u[at + c * s_chan] = sum_drive[c] * dt[c] + (D ? gy[c] * D[c0 + c] : 0);
                    grad_delta[at + c * s_chan] = g_raw;
                    gbias[c] += g_raw;
                    gD[c] += gy[c] * uc[c];
                }
            }
        }
        for (int64_t c = 0; c < w; ++c) {
            for (int64_t k = 0; k < n; ++k) grad_A[(b * d + c0 + c) * n + k] = gA[k * WIDTH + c];
            grad_D[b * d + c0 + c] = gD[c];
            grad_bias[b * d + c0 + c] = gbias[c];
        }
    }
    free(states); free(decays); free(steps); free(g); free(gA); free(a);
    return 0;
}

int NAME(selective_scan_forward)(
    SCAN_FORWARD_PARAMETERS)
{
    /* The same code with the channel stride a constant 1 (channels-last), which the compiler vectorizes better. */
    if (s_chan == 1) return NAME(forward_impl)(u, delta, bias, D, A, B, C, softplus, reverse, d, length, n,
        s_batch, 1, s_time, per_group, b_batch, b_group, b_time, chunk, y, last, kept, item_begin, item_end);
    return NAME(forward_impl)(u, delta, bias, D, A, B, C, softplus, reverse, d, length, n, s_batch, s_chan, s_time,
        per_group, b_batch, b_group, b_time, chunk, y, last, kept, item_begin, item_end);
}

int NAME(selective_scan_backward)(
    SCAN_BACKWARD_PARAMETERS)
{
    /* The same code with the channel stride a constant 1 (channels-last), which the compiler vectorizes better. */
    if (s_chan == 1) return NAME(backward_impl)(u, delta, bias, D, A, B, C, softplus, reverse, kept, grad_y,
        grad_last, d, length, n, s_batch, 1, s_time, per_group, b_batch, b_group, b_time, chunk, grad_u,
        grad_delta, grad_A, grad_D, grad_bias, grad_B, grad_C, item_begin, item_end);
    return NAME(backward_impl)(u, delta, bias, D, A, B, C, softplus, reverse, kept, grad_y, grad_last, d, length,
        n, s_batch, s_chan, s_time, per_group, b_batch, b_group, b_time, chunk, grad_u, grad_delta, grad_A, grad_D,
        grad_bias, grad_B, grad_C, item_begin, item_end);
}

/* The depthwise causal convolution with SiLU, fused with the pad mask: y_t = keep_t act(bias + sum_k w_k keep_s x_s)
   over s = t - width + 1 + k (s = t + width - 1 - k in reverse). Work items as in the scan: (batch, block of WIDTH
   channels); the same strides for x, y and their gradients. A block's weights are copied to [k][c] first, so that
   every inner loop runs over contiguous channels. */
static inline void NAME(conv_weights)(const REAL *restrict w, int64_t c0, int64_t cw, int64_t width,
                                      REAL *restrict wt) {
    for (int64_t k = 0; k < width; ++k)
        for (int64_t c = 0; c < WIDTH; ++c) wt[k * WIDTH + c] = c < cw ? w[(c0 + c) * width + k] : 0;
}

static inline __attribute__((always_inline)) void NAME(conv_pre)(
    const REAL *restrict x, const REAL *restrict wt, const REAL *restrict bias, const REAL *restrict keep,
    int64_t reverse, int64_t length, int64_t width, int64_t s_chan, int64_t s_time, int64_t t, int64_t c0,
    int64_t cw, REAL *restrict pre) {
    for (int64_t c = 0; c < WIDTH; ++c) pre[c] = c < cw && bias ? bias[c0 + c] : 0;
    for (int64_t k = 0; k < width; ++k) {
        const int64_t src = reverse ? t + width - 1 - k : t - width + 1 + k;
        if (src < 0 || src >= length || (keep && keep[src] == 0)) continue;
        const REAL *restrict xs = x + src * s_time, *restrict wk = wt + k * WIDTH;
        for (int64_t c = 0; c < cw; ++c) pre[c] += wk[c] * xs[c * s_chan];
    }
}

static inline __attribute__((always_inline)) int NAME(conv_forward_impl)(
    const REAL *restrict x, const REAL *restrict w, const REAL *restrict bias, const REAL *restrict keep,
    int64_t silu, int64_t reverse, int64_t d, int64_t length, int64_t width, int64_t s_batch, int64_t s_chan,
    int64_t s_time, REAL *restrict y, int64_t item_begin, int64_t item_end)
{
    const int64_t blocks = (d + WIDTH - 1) / WIDTH;
    REAL *wt = malloc(width * WIDTH * sizeof(REAL));
    if (!wt) return 1;
    for (int64_t item = item_begin; item < item_end; ++item) {
        const int64_t b = item / blocks, c0 = (item % blocks) * WIDTH, cw = d - c0 < WIDTH ? d - c0 : WIDTH;
        const REAL *xb = x + b * s_batch + c0 * s_chan, *kb = keep ? keep + b * length : 0;
        REAL *yb = y + b * s_batch + c0 * s_chan;
        NAME(conv_weights)(w, c0, cw, width, wt);
        for (int64_t t = 0; t < length; ++t) {
            REAL pre[WIDTH], out[WIDTH];
            if (cw == WIDTH)  /* a constant trip count: whole vectors, no remainder loops */
                NAME(conv_pre)(xb, wt, bias, kb, reverse, length, width, s_chan, s_time, t, c0, WIDTH, pre);
            else
                NAME(conv_pre)(xb, wt, bias, kb, reverse, length, width, s_chan, s_time, t, c0, cw, pre);
            const REAL kept_t = kb ? kb[t] : 1;
            for (int64_t c = 0; c < WIDTH; ++c)
                out[c] = kept_t * (silu ? pre[c] * NAME(sigmoid)(pre[c]) : pre[c]);
            for (int64_t c = 0; c < cw; ++c) yb[t * s_time + c * s_chan] = out[c];
        }
    }
    free(wt);
    return 0;
}

/* Backward: the pre-activation is recomputed (only x is kept), the gradient before the activation is gathered into
   a (L, WIDTH) buffer per block, then x's gradient is the convolution run the other way and the weights' and bias's
   gradients are sums over the steps (per batch row: the caller sums the rows). */
static inline __attribute__((always_inline)) int NAME(conv_backward_impl)(
    const REAL *restrict x, const REAL *restrict w, const REAL *restrict bias, const REAL *restrict keep,
    int64_t silu, int64_t reverse, int64_t d, int64_t length, int64_t width, int64_t s_batch, int64_t s_chan,
    int64_t s_time, const REAL *restrict grad_y, REAL *restrict grad_x, REAL *restrict grad_w,
    REAL *restrict grad_bias, int64_t item_begin, int64_t item_end)
{
    const int64_t blocks = (d + WIDTH - 1) / WIDTH;
    REAL *gp = malloc(length * WIDTH * sizeof(REAL)), *wt = malloc(width * WIDTH * sizeof(REAL));
    REAL *gw = malloc(width * WIDTH * sizeof(REAL));
    if (!gp || !wt || !gw) { free(gp); free(wt); free(gw); return 1; }
    for (int64_t item = item_begin; item < item_end; ++item) {
        const int64_t b = item / blocks, c0 = (item % blocks) * WIDTH, cw = d - c0 < WIDTH ? d - c0 : WIDTH;
        const int64_t offset = b * s_batch + c0 * s_chan;
        const REAL *xb = x + offset, *gyb = grad_y + offset, *kb = keep ? keep + b * length : 0;
        REAL *gxb = grad_x + offset, gb[WIDTH] = {0};
        NAME(conv_weights)(w, c0, cw, width, wt);
        memset(gw, 0, width * WIDTH * sizeof(REAL));
        for (int64_t t = 0; t < length; ++t) {
            REAL pre[WIDTH], gy[WIDTH];
            if (cw == WIDTH)
                NAME(conv_pre)(xb, wt, bias, kb, reverse, length, width, s_chan, s_time, t, c0, WIDTH, pre);
            else
                NAME(conv_pre)(xb, wt, bias, kb, reverse, length, width, s_chan, s_time, t, c0, cw, pre);
            const REAL kept_t = kb ? kb[t] : 1;
            for (int64_t c = 0; c < WIDTH; ++c) gy[c] = c < cw ? kept_t * gyb[t * s_time + c * s_chan] : 0;
            REAL *restrict g = gp + t * WIDTH;
            for (int64_t c = 0; c < WIDTH; ++c) {
                const REAL sig = NAME(sigmoid)(pre[c]);
                g[c] = silu ? gy[c] * sig * (1 + pre[c] * (1 - sig)) : gy[c];
                gb[c] += g[c];
            }
        }
        for (int64_t s = 0; s < length; ++s) {
            REAL gx[WIDTH] = {0};
            if (!(kb && kb[s] == 0)) {
                REAL xs[WIDTH];
                for (int64_t c = 0; c < cw; ++c) xs[c] = xb[s * s_time + c * s_chan];
                for (int64_t k = 0; k < width; ++k) {
                    /* x_s feeds output t = s + width - 1 - k (causal) or s - width + 1 + k (reverse) through w_k */
                    const int64_t t = reverse ? s - width + 1 + k : s + width - 1 - k;
                    if (t < 0 || t >= length) continue;
                    const REAL *restrict g = gp + t * WIDTH, *restrict wk = wt + k * WIDTH;
                    REAL *restrict gwk = gw + k * WIDTH;
                    for (int64_t c = 0; c < cw; ++c) {
                        gx[c] += wk[c] * g[c];
                        gwk[c] += g[c] * xs[c];
                    }
                }
            }
            for (int64_t c = 0; c < cw; ++c) gxb[s * s_time + c * s_chan] = gx[c];
        }
        for (int64_t c = 0; c < cw; ++c) {
            for (int64_t k = 0; k < width; ++k) grad_w[(b * d + c0 + c) * width + k] = gw[k * WIDTH + c];
            grad_bias[b * d + c0 + c] = gb[c];
        }
    }
    free(gp); free(wt); free(gw);
    return 0;
}

int NAME(conv_forward)(const REAL *restrict x, const REAL *restrict w, const REAL *restrict bias,
                       const REAL *restrict keep, int64_t silu, int64_t reverse, int64_t d, int64_t length,
                       int64_t width, int64_t s_batch, int64_t s_chan, int64_t s_time, REAL *restrict y,
                       int64_t item_begin, int64_t item_end)
{
    if (s_chan == 1)  /* channels-last, with a constant stride the compiler vectorizes */
        return NAME(conv_forward_impl)(x, w, bias, keep, silu, reverse, d, length, width, s_batch, 1, s_time, y,
                                       item_begin, item_end);
    return NAME(conv_forward_impl)(x, w, bias, keep, silu, reverse, d, length, width, s_batch, s_chan, s_time, y,
                                   item_begin, item_end);
}

int NAME(conv_backward)(const REAL *restrict x, const REAL *restrict w, const REAL *restrict bias,
                        const REAL *restrict keep, int64_t silu, int64_t reverse, int64_t d, int64_t length,
                        int64_t width, int64_t s_batch, int64_t s_chan, int64_t s_time, const REAL *restrict grad_y,
                        REAL *restrict grad_x, REAL *restrict grad_w, REAL *restrict grad_bias,
                        int64_t item_begin, int64_t item_end)
{
    if (s_chan == 1)
        return NAME(conv_backward_impl)(x, w, bias, keep, silu, reverse, d, length, width, s_batch, 1, s_time,
                                        grad_y, grad_x, grad_w, grad_bias, item_begin, item_end);
    return NAME(conv_backward_impl)(x, w, bias, keep, silu, reverse, d, length, width, s_batch, s_chan, s_time,
                                    grad_y, grad_x, grad_w, grad_bias, item_begin, item_end);
}
"""

WIDTH = 64  # channels per work item: eight 8-float vectors per state; per step, u and delta are 4 cache lines each

# The scan's decays exp(delta A) are most of its arithmetic: one per state value and step, forward and again in
# backward. In float32 they use this inline exp (Cody-Waite range reduction, degree-6 Taylor polynomial on
# |r| <= ln 2 / 2, 2^n from the exponent bits; about 1 ulp), which the compiler vectorizes in the loop itself, where a
# call to glibc's vector exp costs a call per 8 values. Float64 keeps libm's exp (the tests' float64 references).
_FAST_EXP = r"""
static inline float exp_decay_f32(float x) {
    x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;
    const float n = __builtin_roundf(x * 1.44269504f);
    const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
    float p = 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { float f; int32_t i; } scale = {.i = ((int32_t)n + 127) << 23};
    return p * scale.f;
}
"""

_PARAMETERS = r"""
/* The scan's parameters, shared by its implementations and their entry points. */
#define SCAN_FORWARD_PARAMETERS \
    const REAL *restrict u, const REAL *restrict delta, const REAL *restrict bias, const REAL *restrict D, \
    const REAL *restrict A, const REAL *restrict B, const REAL *restrict C, int64_t softplus, int64_t reverse, \
    int64_t d, int64_t length, int64_t n, int64_t s_batch, int64_t s_chan, int64_t s_time, int64_t per_group, \
    int64_t b_batch, int64_t b_group, int64_t b_time, int64_t chunk, \
    REAL *restrict y, REAL *restrict last, REAL *restrict kept, int64_t item_begin, int64_t item_end
#define SCAN_BACKWARD_PARAMETERS \
    const REAL *restrict u, const REAL *restrict delta, const REAL *restrict bias, const REAL *restrict D, \
    const REAL *restrict A, const REAL *restrict B, const REAL *restrict C, int64_t softplus, int64_t reverse, \
    const REAL *restrict kept, const REAL *restrict grad_y, const REAL *restrict grad_last, \
    int64_t d, int64_t length, int64_t n, int64_t s_batch, int64_t s_chan, int64_t s_time, int64_t per_group, \
    int64_t b_batch, int64_t b_group, int64_t b_time, int64_t chunk, \
    REAL *restrict grad_u, REAL *restrict grad_delta, REAL *restrict grad_A, REAL *restrict grad_D, \
    REAL *restrict grad_bias, REAL *restrict grad_B, REAL *restrict grad_C, int64_t item_begin, int64_t item_end
"""

_SOURCE = (
    f"#include <math.h>\n#include <stdint.h>\n#include <stdlib.h>\n#include <string.h>\n#define WIDTH {WIDTH}\n"
    + _FAST_EXP
    + _PARAMETERS
    + "#define REAL float\n#define EXP expf\n#define DECAY exp_decay_f32\n#define LOG1P log1pf\n"
    + "#define NAME(x) x##_f32\n"
    + _BODY
    + "#undef REAL\n#undef EXP\n#undef DECAY\n#undef LOG1P\n#undef NAME\n"
    + "#define REAL double\n#define EXP exp\n#define DECAY exp\n#define LOG1P log1p\n#define NAME(x) x##_f64\n"
    + _BODY
)

# -ffast-math lets the compiler vectorize the loops, sums and exp included (glibc's vector exp). It is given
# to the compile step only: linked into a shared library it would add crtfastmath.o, which switches the whole process
# to flush-to-zero arithmetic when the library loads.
_COMPILE_FLAGS = ["-O3", "-ffast-math", "-fPIC", "-std=c11"]
_ARCH_FLAGS = [["-march=native"], []]  # this CPU's vector units where the compiler knows the flag


def _cache_dir() -> Path:
    if os.environ.get("SCROLLS_SSM_CACHE"):
        return Path(os.environ["SCROLLS_SSM_CACHE"]) / "kernels"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scrolls_ssm" / "kernels"


def _cpu_signature() -> str:
    """What -march=native depends on: a library built for one CPU must not be loaded on another."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
        flags = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def _compiler_version(compiler: str) -> str:
    done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60, check=False)
    return done.stdout.splitlines()[0] if done.returncode == 0 and done.stdout else ""


def _compile(compiler: str, target: Path) -> str | None:
    """Builds the library into `target` atomically; returns None, or why it failed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as build:
        source, obj, library = Path(build, "scan.c"), Path(build, "scan.o"), Path(build, "scan.so")
        source.write_text(_SOURCE)
        error = "no attempt"
        for arch in _ARCH_FLAGS:
            steps = (
                [compiler, *_COMPILE_FLAGS, *arch, "-c", str(source), "-o", str(obj)],
                [compiler, "-shared", str(obj), "-o", str(library), "-lm"],
            )
            for step in steps:
                done = subprocess.run(step, capture_output=True, text=True, timeout=300, check=False)
                if done.returncode != 0:
                    error = f"`{' '.join(step)}` failed: {(done.stderr or done.stdout).strip()[-500:]}"
                    break
            else:
                os.replace(library, target)  # atomic: another process sees the old file, none or the whole new one
                return None
        return error


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None (with one warning saying why) where they cannot be."""
    if os.environ.get("SCROLLS_SSM_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return _unavailable(f"no C compiler found (looked for {os.environ.get('CC', 'cc')!r} on PATH; set CC)")
    try:
        key = "\n".join([_SOURCE, *_COMPILE_FLAGS, _compiler_version(compiler), _cpu_signature()])
        target = _cache_dir() / f"ops_cpu-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
        if not target.is_file():
            error = _compile(compiler, target)
            if error is not None:
                return _unavailable(error)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        return _unavailable(str(error))
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    for suffix in ("f32", "f64"):
        forward = getattr(library, f"selective_scan_forward_{suffix}")
        forward.argtypes = [pointer] * 7 + [size] * 13 + [pointer] * 3 + [size] * 2
        backward = getattr(library, f"selective_scan_backward_{suffix}")
        backward.argtypes = [pointer] * 7 + [size] * 2 + [pointer] * 3 + [size] * 11 + [pointer] * 7 + [size] * 2
        forward.restype = backward.restype = ctypes.c_int
        conv_forward = getattr(library, f"conv_forward_{suffix}")
        conv_forward.argtypes = [pointer] * 4 + [size] * 8 + [pointer] + [size] * 2
        conv_backward = getattr(library, f"conv_backward_{suffix}")
        conv_backward.argtypes = [pointer] * 4 + [size] * 8 + [pointer] * 4 + [size] * 2
        conv_forward.restype = conv_backward.restype = ctypes.c_int
    return library


def _unavailable(reason: str) -> None:
    logger.warning(
        f"The compiled CPU kernels (Mamba's selective scan, the causal convolution) are unavailable ({reason}); "
        "using the PyTorch paths (same results to rounding, Mamba several times slower on long inputs). Install a C "
        "compiler (e.g. gcc) or set SCROLLS_SSM_CPU_KERNELS=0 to silence this."
    )
    return None


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not the fake or functional tensors of tracing, which have no data


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernel can serve a call on these tensors: plain CPU float32 / float64 tensors of one dtype, outside
    tracing (torch.export and torch.compile see the PyTorch scan), with the library built."""
    dtype = tensors[0].dtype
    return (
        dtype in (torch.float32, torch.float64)
        and all(type(t) in _PLAIN and t.device.type == "cpu" and t.dtype == dtype for t in tensors)
        and not torch.compiler.is_compiling()
        and load() is not None
    )


@functools.cache
def _pool(workers: int, pid: int) -> ThreadPoolExecutor:
    """Worker threads for the kernel (it runs outside the GIL). Keyed by process id: a forked child has none of its
    parent's threads, and a pool inherited from the parent would wait on them forever."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scrolls-ssm-scan")


def _run(function, items: int, arguments: list, per_thread=None) -> None:
    """Calls `function(*arguments, *per_thread[i], item_begin, item_end)` over `items` work items split among
    torch's threads."""
    threads = max(1, min(torch.get_num_threads(), items))
    bounds = [items * i // threads for i in range(threads + 1)]

    def call(i: int) -> int:
        extra = [] if per_thread is None else [p.data_ptr() for p in per_thread[i]]
        return function(*arguments, *extra, bounds[i], bounds[i + 1])

    codes = [call(0)] if threads == 1 else list(_pool(threads, os.getpid()).map(call, range(threads)))
    if any(codes):
        raise MemoryError("a compiled CPU kernel could not allocate its buffers")


def _matrix_layout(matrix: torch.Tensor, batch: int, d: int) -> tuple[torch.Tensor, int, list[int]]:
    """B or C as a contiguous tensor with n last, its channels per group and its (batch, group, time) strides.

    Constant (d, n): every channel its own group, no batch or time stride. Variable (batch, n, L) -> (batch, L, n),
    one group. Grouped (batch, groups, n, L) -> (batch, groups, L, n)."""
    if matrix.dim() == 2:
        return matrix.contiguous(), 1, [0, matrix.shape[1], 0]
    if matrix.dim() == 3:
        laid = matrix.transpose(1, 2).contiguous()
        return laid, d, [laid.stride(0), 0, laid.stride(1)]
    laid = matrix.transpose(2, 3).contiguous()
    return laid, d // matrix.shape[1], [laid.stride(0), laid.stride(1), laid.stride(2)]


def _unlayout(grad: torch.Tensor, dims: int) -> torch.Tensor:
    """A gradient in `_matrix_layout`'s layout back to the layout of a `dims`-dimensional B or C."""
    return grad if dims == 2 else grad.transpose(-1, -2)


def _kernel(name: str, dtype: torch.dtype):
    """The compiled function `name` for float32 or float64 tensors."""
    return getattr(load(), f"{name}_{'f32' if dtype == torch.float32 else 'f64'}")


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


class SelectiveScanKernel(torch.autograd.Function):
    """The selective scan of `ops_selective_scan.selective_scan` before the gate z, in the compiled kernel:

        (u, delta, A, B, C, D, delta_bias, softplus, reverse) -> (y (batch, d, L), last state (batch, d, n))

    with delta <- softplus(delta + delta_bias) and y = scan + D * u, all inside the kernel (those elementwise steps
    and their gradients would otherwise be a dozen passes over (batch, d, L) tensors). u's layout, channels-last (the
    transposed (batch, L, d) tensor a Mamba mixer makes) or (batch, d, L), is the kernel's: delta and the gradient of
    y are copied to it if they differ, and y and the gradients of u and delta come back in it. D and delta_bias may
    be None. `reverse` scans from the
    last step to the first (the state after step 0 is then the last state), without copying anything.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, softplus: bool, reverse: bool):
        batch, d, length = u.shape
        n = A.shape[1]
        channels_last = _channels_last(u)
        u, delta = _laid(u, channels_last), _laid(delta, channels_last)
        A = A.contiguous()
        D = None if D is None else D.contiguous()
        delta_bias = None if delta_bias is None else delta_bias.contiguous()
        B_laid, per_group, strides = _matrix_layout(B, batch, d)
        C_laid = _matrix_layout(C, batch, d)[0]
        items = batch * -(-d // WIDTH)
        y = torch.empty_like(u)  # u's layout
        last = u.new_empty(batch, d, n)
        kept = u.new_empty(items, -(-length // CHUNK), WIDTH, n)
        sizes = [d, length, n, *u.stride(), per_group, *strides, CHUNK]
        inputs = [_pointer(t) for t in (u, delta, delta_bias, D, A, B_laid, C_laid)]
        outputs = [t.data_ptr() for t in (y, last, kept)]
        _run(
            _kernel("selective_scan_forward", u.dtype),
            items,
            [*inputs, int(softplus), int(reverse), *sizes, *outputs],
        )
        ctx.save_for_backward(u, delta, A, B_laid, C_laid, D, delta_bias, kept)
        ctx.layout = (B.dim(), per_group, strides, softplus, reverse)
        return y, last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_last):
        u, delta, A, B_laid, C_laid, D, delta_bias, kept = ctx.saved_tensors
        matrix_dims, per_group, strides, softplus, reverse = ctx.layout
        batch, d, length = u.shape
        n = A.shape[1]
        grad_y = torch.zeros_like(u) if grad_y is None else _laid(grad_y, _channels_last(u))
        grad_last = None if grad_last is None else grad_last.contiguous()
        items = batch * -(-d // WIDTH)
        threads = max(1, min(torch.get_num_threads(), items))
        # Channels of one group share B and C: each thread sums their gradients into a buffer of its own.
        grad_B = B_laid.new_zeros(threads, *B_laid.shape)
        grad_C = C_laid.new_zeros(threads, *C_laid.shape)
        grad_u, grad_delta = torch.empty_like(u), torch.empty_like(u)
        grad_A = A.new_empty(batch, d, n)
        grad_D, grad_bias = A.new_empty(batch, d), A.new_empty(batch, d)
        sizes = [d, length, n, *u.stride(), per_group, *strides, CHUNK]
        inputs = [_pointer(t) for t in (u, delta, delta_bias, D, A, B_laid, C_laid)]
        saved = [kept.data_ptr(), grad_y.data_ptr(), _pointer(grad_last)]
        outputs = [t.data_ptr() for t in (grad_u, grad_delta, grad_A, grad_D, grad_bias)]
        _run(
            _kernel("selective_scan_backward", u.dtype),
            items,
            [*inputs, int(softplus), int(reverse), *saved, *sizes, *outputs],
            per_thread=[(grad_B[i], grad_C[i]) for i in range(threads)],
        )
        return (
            grad_u,
            grad_delta,
            grad_A.sum(0),
            _unlayout(grad_B.sum(0), matrix_dims),
            _unlayout(grad_C.sum(0), matrix_dims),
            None if D is None else grad_D.sum(0),
            None if delta_bias is None else grad_bias.sum(0),
            None,
            None,
        )


def _channels_last(x: torch.Tensor) -> bool:
    """Whether the kernels read (batch, d, L) x channels-last (stride 1 along d) rather than along L."""
    return x.stride(1) == 1 and x.shape[1] > 1


def _laid(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """x (batch, d, L) as a dense tensor in the kernel's layout: a transposed (batch, L, d) one or (batch, d, L)
    itself; no copy when it already is."""
    return x.transpose(1, 2).contiguous().transpose(1, 2) if channels_last else x.contiguous()


class CausalConvKernel(torch.autograd.Function):
    """`ops.causal_conv1d` with SiLU (or none) and a pad mask, in the compiled kernel:

        (x (batch, d, L), weight (d, width), bias (d,) or None, keep (batch, L) or None, silu, reverse) -> y

    y_t = keep_t act(bias + sum_k weight_k keep_s x_s) over the inputs s that output t reads (t - width + 1 .. t, or
    t .. t + width - 1 in reverse). Only x is kept for backward: the pre-activation is recomputed there. y and x's
    gradient come back in x's layout (channels-last or (batch, d, L), read through strides, no copies)."""

    @staticmethod
    def forward(ctx, x, weight, bias, keep, silu: bool, reverse: bool):
        batch, d, length = x.shape
        x = _laid(x, _channels_last(x))
        weight = weight.contiguous()
        bias = None if bias is None else bias.contiguous()
        keep = None if keep is None else keep.to(x.dtype).contiguous()
        y = torch.empty_like(x)
        items = batch * -(-d // WIDTH)
        inputs = [_pointer(t) for t in (x, weight, bias, keep)]
        sizes = [int(silu), int(reverse), d, length, weight.shape[1], *x.stride()]
        _run(_kernel("conv_forward", x.dtype), items, [*inputs, *sizes, y.data_ptr()])
        ctx.save_for_backward(x, weight, bias, keep)
        ctx.flags = (silu, reverse)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, weight, bias, keep = ctx.saved_tensors
        silu, reverse = ctx.flags
        batch, d, length = x.shape
        grad_y = _laid(grad_y, _channels_last(x))
        grad_x = torch.empty_like(x)
        grad_w = x.new_empty(batch, *weight.shape)
        grad_b = x.new_empty(batch, d)
        items = batch * -(-d // WIDTH)
        inputs = [_pointer(t) for t in (x, weight, bias, keep)]
        sizes = [int(silu), int(reverse), d, length, weight.shape[1], *x.stride()]
        outputs = [t.data_ptr() for t in (grad_y, grad_x, grad_w, grad_b)]
        _run(_kernel("conv_backward", x.dtype), items, [*inputs, *sizes, *outputs])
        return grad_x, grad_w.sum(0), None if bias is None else grad_b.sum(0), None, None, None
