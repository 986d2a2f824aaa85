"""Routed SwiGLU experts of a small decode step as two Triton kernels, pair by pair, with no sort.

Reference: braze.patterns.moe.experts_reference. With S = T·k (token, expert) pairs and p = t·k + j:

- `braze_moe_gate_up`, grid (S, cdiv(I, BLOCK_N)): program (p, b) reads x[t] and rows [b·BLOCK_N, ..) of
  expert idx[p]'s gate and up weights, and writes h[p, b·BLOCK_N..] = silu(x·W_gate)·(x·W_up).
- `braze_moe_down`, grid (T, cdiv(H, BLOCK_N)): program (t, b) runs the down projection of token t's k
  experts for output columns [b·BLOCK_N, ..) and sums them weighted by w[t, j] in fp32.
- A shared expert (every token's, weight 1 or sigmoid of a gate logit) is one more pair per token: T more
  gate/up programs, and one more term of each token's sum.

Bytes: each pair reads its expert's 2·I·H gate/up and I·H down weights once (3·I·H·2 bytes in bf16) plus x,
h and y, which are tiny at decode: the kernels are a read of the chosen experts' weights, as the grouped
GEMMs are, without the sort, gathers, un-sort and weighted sum around them. A pair re-reads its expert's
weights if another pair chose the same expert, so the pass fuses only while S <= E.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _round(v, ROUND: tl.constexpr, SOFT_ROUND: tl.constexpr):
    """fp32 v rounded (RNE) to bf16 and back when ROUND; SOFT_ROUND spells it in integer ops (the
    interpreter's conversion truncates)."""
    if ROUND:
        if SOFT_ROUND:
            b = v.to(tl.uint32, bitcast=True)
            r = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            v = tl.where(v != v, v, r)
        else:
            v = v.to(tl.bfloat16).to(tl.float32)
    return v


@triton.jit
def _gate_up_pair(x_ptr, x_t, x_h, t, w_row, w_h, w_n, valid, h_ptr, p, nn,
                  HIDDEN: tl.constexpr, INTER: tl.constexpr, ROUND_ACT: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, SOFT_ROUND: tl.constexpr):
    """h[p, nn] = silu(x[t]·W_gate[:, nn])·(x[t]·W_up[:, nn]) for one pair, W = w_row [H, 2I] (gate | up)."""
    kk = tl.arange(0, BLOCK_K)
    nm = nn < INTER
    wm = nm & valid
    acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, HIDDEN, BLOCK_K):
        km = (k0 + kk) < HIDDEN
        xk = tl.load(x_ptr + t * x_t + (k0 + kk) * x_h, mask=km, other=0.0).to(tl.float32)
        m = wm[:, None] & km[None, :]
        off = (k0 + kk)[None, :] * w_h + nn[:, None] * w_n
        wg = tl.load(w_row + off, mask=m, other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_K]
        wu = tl.load(w_row + off + INTER * w_n, mask=m, other=0.0).to(tl.float32)
        acc_g += tl.sum(wg * xk[None, :], axis=1)
        acc_u += tl.sum(wu * xk[None, :], axis=1)
    g = _round(acc_g, True, SOFT_ROUND)
    u = _round(acc_u, True, SOFT_ROUND)
    a = _round(g / (1.0 + tl.exp(-g)), ROUND_ACT, SOFT_ROUND)
    h = _round(a * u, True, SOFT_ROUND)
    tl.store(h_ptr + p * INTER + nn, h.to(tl.bfloat16), mask=nm)


@triton.jit
def braze_moe_gate_up(
    x_ptr, x_t, x_h, ids_ptr, w_ptr, w_e, w_h, w_n, h_ptr, n_experts, ws_ptr, ws_h, ws_n, n_pairs,
    TOP_K: tl.constexpr, HIDDEN: tl.constexpr, INTER: tl.constexpr, ROUND_ACT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SOFT_ROUND: tl.constexpr, SHARED: tl.constexpr,
):
    """Programs p < n_pairs: pair p's expert; with SHARED, programs n_pairs + t: token t's shared expert (gate/up
    weights ws_ptr [H, 2I], strides ws_h, ws_n)."""
    p = tl.program_id(0).to(tl.int64)
    nn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if p < n_pairs:
        e = tl.load(ids_ptr + p).to(tl.int64)
        e = tl.where(e < 0, e + n_experts, e)  # eager indexing wraps negatives
        ev = tl.zeros([BLOCK_N], dtype=tl.int64) + e  # as a block: Triton 3.9's interpreter makes block & scalar-bool int32
        valid = (ev >= 0) & (ev < n_experts)  # an out-of-range id reads nothing (eager raises; braze must not fault)
        _gate_up_pair(x_ptr, x_t, x_h, p // TOP_K, w_ptr + e * w_e, w_h, w_n, valid, h_ptr, p, nn,
                      HIDDEN, INTER, ROUND_ACT, BLOCK_N, BLOCK_K, SOFT_ROUND)
    elif SHARED:
        valid = tl.full([BLOCK_N], 1, tl.int1)
        _gate_up_pair(x_ptr, x_t, x_h, p - n_pairs, ws_ptr, ws_h, ws_n, valid, h_ptr, p, nn,
                      HIDDEN, INTER, ROUND_ACT, BLOCK_N, BLOCK_K, SOFT_ROUND)


@triton.jit
def braze_moe_down(
    h_ptr, ids_ptr, w_ptr, w_e, w_i, w_n, r_ptr, r_t, r_k, y_ptr, n_experts, ws_ptr, ws_i, ws_n, g_ptr, g_t, n_pairs,
    TOP_K: tl.constexpr, HIDDEN: tl.constexpr, INTER: tl.constexpr, ROUND_OUT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SOFT_ROUND: tl.constexpr, SHARED: tl.constexpr,
    SIGMOID: tl.constexpr,
):
    """With SHARED, token t's shared expert (h row n_pairs + t, down weights ws_ptr [I, H], strides ws_i, ws_n) is
    added as the graph adds it: its output rounded to bf16 (times sigmoid(g[t]) rounded to bf16, the product
    rounded, when SIGMOID), added to the routed sum (rounded first when the output is bf16)."""
    t = tl.program_id(0).to(tl.int64)
    nn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    nm = nn < HIDDEN
    out = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in range(TOP_K):
        p = t * TOP_K + j
        e = tl.load(ids_ptr + p).to(tl.int64)
        e = tl.where(e < 0, e + n_experts, e)
        ev = tl.zeros([BLOCK_N], dtype=tl.int64) + e
        wm = nm & (ev >= 0) & (ev < n_experts)
        r = tl.load(r_ptr + t * r_t + j * r_k).to(tl.float32)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, INTER, BLOCK_K):
            km = (k0 + kk) < INTER
            hk = tl.load(h_ptr + p * INTER + k0 + kk, mask=km, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + e * w_e + (k0 + kk)[None, :] * w_i + nn[:, None] * w_n,
                        mask=wm[:, None] & km[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * hk[None, :], axis=1)
        out += _round(acc, True, SOFT_ROUND) * r
    if SHARED:
        p = n_pairs + t
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, INTER, BLOCK_K):
            km = (k0 + kk) < INTER
            hk = tl.load(h_ptr + p * INTER + k0 + kk, mask=km, other=0.0).to(tl.float32)
            w = tl.load(ws_ptr + (k0 + kk)[None, :] * ws_i + nn[:, None] * ws_n,
                        mask=nm[:, None] & km[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * hk[None, :], axis=1)
        term = _round(acc, True, SOFT_ROUND)
        if SIGMOID:
            g = tl.load(g_ptr + t * g_t).to(tl.float32)
            term = _round(term * _round(1.0 / (1.0 + tl.exp(-g)), True, SOFT_ROUND), True, SOFT_ROUND)
        out = _round(out, ROUND_OUT, SOFT_ROUND) + term
    tl.store(y_ptr + t * HIDDEN + nn, _round(out, ROUND_OUT, SOFT_ROUND), mask=nm)  # y: fp32 or bf16


def gate_up_blocks(hidden: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) of `braze_moe_gate_up`. Measured on an H100 (benchmarks/results/moe_tune_*.json,
    the three models' expert shapes at T = 1 and 8): 16 rows × 128-wide K chunks with 8 warps is within 1-2% of
    the best of 96 tilings at every shape but DeepSeek's T=8 (0.5%), where the old rule (up to 64 rows, 512 wide)
    lost up to 12% (Qwen T=1)."""
    return 16, min(128, triton.next_power_of_2(hidden)), 8


def down_blocks(hidden: int, inter: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) of `braze_moe_down`: 256-wide K chunks; 8 rows and 8 warps when a token's
    output still spans >= 768 programs of 8 rows (H >= 6144: DeepSeek's 7168, 81.9 µs vs 99.2 µs with 4 rows at
    T=1), else 4 rows and 4 warps (MiniMax's 3072: 32.6 vs 37.5 µs). The old rule (4 × 512, 4 warps) was 1.38× the
    weight floor on DeepSeek at T=1; this one is 1.03×."""
    block_n = 8 if hidden // 8 >= 768 else 4
    return block_n, min(256, triton.next_power_of_2(inter)), block_n
