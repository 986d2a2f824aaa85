"""A MoE router as one Triton kernel: scores, top-k, the chosen scores renormalized and scaled.

Reference: braze.patterns.router.router_reference. One program per token holds its row of E scores in
registers (E <= 4096): softmax (max, exp, sum, divide) or sigmoid in fp32, the choice (scores + bias; with expert
groups, -inf outside the best groups by the sum of their two largest choices), then
k rounds of "the largest key, the lowest index among equal keys" over the top-k order keys braze's top-k
uses (NaN above every number, -0.0 equal to +0.0), each round's score taken from the row, then the sum of the
k weights and the scaling. k is small (a router keeps 2-16 experts), so k reductions over the row cost less
than a sort of it. Bytes per token: E logits read, 12·k bytes written.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .topk import _order_key

SCORING_CODES = {"softmax": 0, "sigmoid": 1}


@triton.jit
def braze_router(logits_ptr, l_row, bias_ptr, w_ptr, idx_ptr, scaling, eps,
                 E: tl.constexpr, K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                 SCORING: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr,
                 GROUPS: tl.constexpr, TOP_GROUPS: tl.constexpr, BLOCK_G: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    m = e < E
    x = tl.load(logits_ptr + r * l_row + e, mask=m, other=0.0).to(tl.float32)
    if SCORING == 0:  # softmax over the row
        x = tl.where(m, x, float("-inf"))
        p = tl.exp(x - tl.max(x, axis=0))
        p = tl.where(m, p, 0.0)
        scores = p / tl.sum(p, axis=0)
    else:
        scores = 1.0 / (1.0 + tl.exp(-x))
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + e, mask=m, other=0.0).to(tl.float32)
    if GROUPS > 1:  # group-limited: only the TOP_GROUPS groups with the largest top-2 sums stay choosable
        grp = e // (E // GROUPS)
        gg = tl.arange(0, BLOCK_G)
        gs = tl.zeros([BLOCK_G], tl.float32)
        ckey = tl.where(m, _order_key(choice, True), -2147483648)
        for g in tl.static_range(GROUPS):  # a group's two largest choices in top-k order (NaN first), summed
            c = tl.where(grp == g, ckey, -2147483648)
            i1 = tl.min(tl.where(c == tl.max(c, axis=0), e, BLOCK_E), axis=0)
            c = tl.where(e == i1, -2147483648, c)
            i2 = tl.min(tl.where(c == tl.max(c, axis=0), e, BLOCK_E), axis=0)
            two = tl.sum(tl.where((e == i1) | (e == i2), choice, 0.0), axis=0)
            gs = tl.where(gg == g, two, gs)
        gkey = tl.where(gg < GROUPS, _order_key(gs, True), -2147483648)
        keep = grp < 0  # all False
        for j in tl.static_range(TOP_GROUPS):
            gbest = tl.max(gkey, axis=0)
            gi = tl.min(tl.where(gkey == gbest, gg, BLOCK_G), axis=0)
            keep = keep | (grp == gi)
            gkey = tl.where(gg == gi, -2147483648, gkey)
        choice = tl.where(keep, choice, float("-inf"))
    key = tl.where(m, _order_key(choice, True), -2147483648)  # padding below every value
    kk = tl.arange(0, BLOCK_K)
    w = tl.zeros([BLOCK_K], tl.float32)
    idx = tl.zeros([BLOCK_K], tl.int64)
    for j in tl.static_range(K):
        best = tl.max(key, axis=0)
        i = tl.min(tl.where(key == best, e, BLOCK_E), axis=0)  # ties: the lower index first
        s = tl.sum(tl.where(e == i, scores, 0.0), axis=0)
        w = tl.where(kk == j, s, w)
        idx = tl.where(kk == j, i.to(tl.int64), idx)
        key = tl.where(e == i, -2147483648, key)
    if RENORM:
        w = w / (tl.sum(tl.where(kk < K, w, 0.0), axis=0) + eps)
    w = w * scaling
    o = kk < K
    tl.store(w_ptr + r * K + kk, w, mask=o)
    tl.store(idx_ptr + r * K + kk, idx, mask=o)


def launch_config(experts: int, k: int) -> tuple[int, int, int]:
    """BLOCK_E, BLOCK_K and num_warps for a row of `experts` scores."""
    block_e = triton.next_power_of_2(experts)
    return block_e, triton.next_power_of_2(k), 1 if block_e <= 256 else 4 if block_e <= 2048 else 8
