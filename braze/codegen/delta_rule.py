"""The gated delta-rule decode update as one Triton kernel: the fp32 state rows updated in place.

Reference: braze.patterns.delta_rule.delta_rule_reference. Grid (T, Hv, cdiv(dv, BLOCK_V)): program
(t, h, b) owns columns [b·BLOCK_V, (b+1)·BLOCK_V) of the state row S = state[idx[t], h] ([dk, dv]),
written back in place (INDEXED), or of S = state[t, h] written to new[t, h] (Hugging Face's form).
Every column of S evolves on its own (u, δ and o of column j read column j only), so the
programs never share state values: each reads its block once, updates it in registers
(S ← e^g·S; u = Sᵀk; δ = β(v − u); S += k δᵀ), writes it back once, and stores o = Sᵀ(q·scale).
Value head h reads key head h // (Hv/Hk): the expansion of q and k costs no copy.

Bytes per token and value head: state row 4·dk·dv read + 4·dk·dv written; q, k 4·dk each (per
block), v dv·(its size), g, beta 8, o 4·dv. At Qwen 3.5's dk = dv = 128 the state is 97% of it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def braze_delta_rule(
    q_ptr, q_t, q_h, k_ptr, k_t, k_h, v_ptr, v_t, v_h, g_ptr, g_t, b_ptr, b_t,
    idx_ptr, state_ptr, new_ptr, o_ptr, n_slots, scale,
    RATIO: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, INDEXED: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    kh = h // RATIO  # the key head this value head reads (repeat_interleave)
    kk = tl.arange(0, BLOCK_K)
    vv = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    km = kk < DK
    vm = vv < DV
    if INDEXED:  # state rows idx[t], updated in place
        slot = tl.load(idx_ptr + t).to(tl.int64)
        slot = tl.where(slot < 0, slot + n_slots, slot)  # eager indexing wraps negatives
    else:  # row t is token t's; the new rows go to new_ptr
        slot = t
    # the slot check as a tensor (a scalar bool in a tensor mask is no mask to some interpreters)
    slots = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.int64) + slot
    sm = km[:, None] & vm[None, :] & (slots >= 0) & (slots < n_slots)
    q = tl.load(q_ptr + t * q_t + kh * q_h + kk, mask=km, other=0.0).to(tl.float32) * scale
    k = tl.load(k_ptr + t * k_t + kh * k_h + kk, mask=km, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + t * v_t + h * v_h + vv, mask=vm, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + t * g_t + h).to(tl.float32)
    beta = tl.load(b_ptr + t * b_t + h).to(tl.float32)
    row = state_ptr + (slot * HV + h) * (DK * DV)
    offs = kk[:, None] * DV + vv[None, :]
    s = tl.load(row + offs, mask=sm, other=0.0)  # [BLOCK_K, BLOCK_V] fp32
    s = s * tl.exp(g)
    u = tl.sum(s * k[:, None], axis=0)  # [BLOCK_V]
    delta = beta * (v - u)
    s = s + k[:, None] * delta[None, :]
    if INDEXED:
        tl.store(row + offs, s, mask=sm)
    else:
        tl.store(new_ptr + (t * HV + h) * (DK * DV) + offs, s, mask=sm)
    o = tl.sum(s * q[:, None], axis=0)
    tl.store(o_ptr + (t * HV + h) * DV + vv, o, mask=vm)


def blocks(dk: int, dv: int) -> tuple[int, int, int]:
    """BLOCK_K (all of dk), BLOCK_V (a state block of at most 4096 fp32 values) and num_warps."""
    block_k = triton.next_power_of_2(dk)
    block_v = min(triton.next_power_of_2(dv), max(16, 4096 // block_k))
    return block_k, block_v, 4 if block_k * block_v >= 2048 else 2
