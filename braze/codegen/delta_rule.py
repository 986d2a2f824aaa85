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

`delta_rule_block` is the update of one block of columns, shared by `braze_delta_rule` and the kernels
`generate_gated` writes: the update with a row chain (the gated RMSNorm of o [+ FP8 quant]) after it, grid
(T, Hv), one program per value head holding all dv columns so the norm's row never leaves registers.
"""

from __future__ import annotations

import hashlib

import triton
import triton.language as tl

from braze.patterns.delta_rule import DeltaRule
from braze.patterns.stages import RowChain

from .rowwise import ROW_CONSTEXPRS, KernelSource, _Emitter, emit_stages, kernel_source, stage_params


@triton.jit
def delta_rule_block(
    q_ptr, q_t, q_h, k_ptr, k_t, k_h, v_ptr, v_t, v_h, g_ptr, g_t, b_ptr, b_t,
    idx_ptr, state_ptr, new_ptr, n_slots, scale, t, h, vv,
    RATIO: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_K: tl.constexpr, INDEXED: tl.constexpr,
):
    """The update of columns `vv` of token t's value head h: state block written back, o [BLOCK_V] returned."""
    kh = h // RATIO  # the key head this value head reads (repeat_interleave)
    kk = tl.arange(0, BLOCK_K)
    km = kk < DK
    vm = vv < DV
    if INDEXED:  # state rows idx[t], updated in place
        slot = tl.load(idx_ptr + t).to(tl.int64)
        slot = tl.where(slot < 0, slot + n_slots, slot)  # eager indexing wraps negatives
    else:  # row t is token t's; the new rows go to new_ptr
        slot = t
    # the slot check as a tensor (a scalar bool in a tensor mask is no mask to some interpreters)
    slots = tl.zeros([BLOCK_K, 1], dtype=tl.int64) + slot
    sm = km[:, None] & vm[None, :] & (slots >= 0) & (slots < n_slots)
    # (Inductor passes a Python float as fp64: the update is fp32 math, as the graph's)
    q = tl.load(q_ptr + t * q_t + kh * q_h + kk, mask=km, other=0.0).to(tl.float32) * tl.full([1], scale, tl.float32)
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
    return tl.sum(s * q[:, None], axis=0)


@triton.jit
def braze_delta_rule(
    q_ptr, q_t, q_h, k_ptr, k_t, k_h, v_ptr, v_t, v_h, g_ptr, g_t, b_ptr, b_t,
    idx_ptr, state_ptr, new_ptr, o_ptr, n_slots, scale,
    RATIO: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, INDEXED: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    vv = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    o = delta_rule_block(q_ptr, q_t, q_h, k_ptr, k_t, k_h, v_ptr, v_t, v_h, g_ptr, g_t, b_ptr, b_t,
                         idx_ptr, state_ptr, new_ptr, n_slots, scale, t, h, vv,
                         RATIO, HV, DK, DV, BLOCK_K, INDEXED)
    tl.store(o_ptr + (t * HV + h) * DV + vv, o, mask=vv < DV)


def blocks(dk: int, dv: int) -> tuple[int, int, int]:
    """BLOCK_K (all of dk), BLOCK_V (a state block of at most 4096 fp32 values) and num_warps."""
    block_k = triton.next_power_of_2(dk)
    block_v = min(triton.next_power_of_2(dv), max(16, 4096 // block_k))
    return block_k, block_v, 4 if block_k * block_v >= 2048 else 2


# The most fp32 state values one program of the gated kernel holds: a whole [dk, dv] head (128 x 128 in Qwen 3.5),
# 64 per thread at 8 warps. Larger heads keep the gated norm a kernel of its own.
GATED_MAX_STATE = 16384


def gated_blocks(dk: int, dv: int) -> tuple[int, int, int] | None:
    """BLOCK_K, BLOCK_V (all of dv: the norm needs the whole head) and num_warps of the gated kernel; None when a
    head's state is too large for one program."""
    block_k, block_v = triton.next_power_of_2(dk), triton.next_power_of_2(dv)
    n = block_k * block_v
    if n > GATED_MAX_STATE:
        return None
    # 4 warps (128 fp32 state values a thread): on an H200 at 128 x 128 heads as fast as 8 at T=1 and 8, faster from
    # T=64 (session11_gpu/4_micro: 20.6 against 26.0 µs at T=64, 77.2 against 103.6 at T=256); 16 is slower throughout
    return block_k, block_v, 4


def generate_gated(spec: DeltaRule, chain: RowChain) -> KernelSource:
    """The delta-rule update with `chain` (the gated RMSNorm over each value head's o, [+ its FP8 quant with one
    group per head]) after it, in one kernel: grid (T, Hv), program (t, h) owns the whole state row of value head h
    (delta_rule_block over all dv columns), so o never leaves registers."""
    if chain.residual is not None or chain.n_groups != 1 or chain.width != spec.dv or chain.gate is None:
        raise ValueError(f"braze delta_rule: no gated kernel for {chain.name} over {chain.width} values "
                         f"(value heads of {spec.dv})")
    blocks_ = gated_blocks(spec.dk, spec.dv)
    if blocks_ is None:
        raise ValueError(f"braze delta_rule: a [{spec.dk}, {spec.dv}] head is too large for one program")
    _, block_v, num_warps = blocks_
    signature = spec.to_json() + "|" + chain.to_json()
    name = f"braze_delta_rule_{chain.name}_{hashlib.sha256(signature.encode()).hexdigest()[:12]}"
    # the update's operands (prefixed: the quant's outputs are named q_ptr and scale0_ptr)
    update = [f"u_{p}" for p in ("q_ptr", "q_t", "q_h", "k_ptr", "k_t", "k_h", "v_ptr", "v_t", "v_h", "g_ptr", "g_t",
                                 "b_ptr", "b_t", "idx_ptr", "state_ptr", "new_ptr", "n_slots", "scale")]
    params = [*update, *stage_params(chain), *ROW_CONSTEXPRS,
              "RATIO: tl.constexpr", "HV: tl.constexpr", "DK: tl.constexpr", "DV: tl.constexpr",
              "BLOCK_K: tl.constexpr", "BLOCK_V: tl.constexpr", "INDEXED: tl.constexpr"]
    em = _Emitter()
    em.line("t = tl.program_id(0).to(tl.int64)")
    em.line("h = tl.program_id(1)")
    em.line(f"o = delta_rule_block({', '.join(update)},")
    em.line("                     t, h, tl.arange(0, BLOCK_V), RATIO, HV, DK, DV, BLOCK_K, INDEXED)  # [BLOCK_V] fp32: "
            "all of the head")
    em.line("# the norm's row is value head h of token t, held as a [1, BLOCK_V] tile")
    em.line("row = t * HV + h")
    em.line("g = tl.arange(0, BLOCK_G)[:, None]")
    em.line("e = tl.arange(0, BLOCK_GS)[None, :]")
    em.line("col = g * GS + e")
    em.line("mask = (g < G) & (e < GS)")
    x = em.round_to("o[None, :]", chain.in_dtype)  # o as the graph casts it for the norm
    emit_stages(em, chain, x)
    source = kernel_source("braze.codegen.delta_rule", "gated delta-rule update + gated RMSNorm", signature, name,
                           params, em.lines, imports=("from braze.codegen.delta_rule import delta_rule_block",))
    return KernelSource(name, source, 1, block_v, num_warps)
