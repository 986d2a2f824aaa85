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
`generate_conv_gated` puts the post-conv path (conv update, L2 norm of q and k, gating) in front of that, with a
per-(conv row, key head) arrival counter deciding which program shifts a key head's q/k conv state.
"""

from __future__ import annotations

import hashlib

import triton
import triton.language as tl

from braze.patterns.delta_rule import DeltaRule
from braze.patterns.gdn import PostConv
from braze.patterns.stages import RowChain

from .post_conv import emit_conv_read, emit_conv_taps, emit_conv_write, emit_gating_math, emit_l2norm, emit_slot
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
    # (Inductor passes a Python float as fp64: the update is fp32 math, as the graph's)
    q = tl.load(q_ptr + t * q_t + kh * q_h + kk, mask=km, other=0.0).to(tl.float32) * tl.full([1], scale, tl.float32)
    k = tl.load(k_ptr + t * k_t + kh * k_h + kk, mask=km, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + t * v_t + h * v_h + vv, mask=vm, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + t * g_t + h).to(tl.float32)
    beta = tl.load(b_ptr + t * b_t + h).to(tl.float32)
    return delta_rule_update(q, k, v, g, beta, idx_ptr, state_ptr, new_ptr, n_slots, t, h, vv, HV, DK, DV, BLOCK_K,
                             INDEXED)


@triton.jit
def delta_rule_update(
    q, k, v, g, beta, idx_ptr, state_ptr, new_ptr, n_slots, t, h, vv,
    HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_K: tl.constexpr, INDEXED: tl.constexpr,
):
    """The update of columns `vv` of token t's value head h from its operands in fp32 registers (q scaled: [BLOCK_K];
    k [BLOCK_K]; v [BLOCK_V]; g, beta scalars): state block written back, o [BLOCK_V] returned."""
    s = delta_rule_state(idx_ptr, state_ptr, n_slots, t, h, vv, HV, DK, DV, BLOCK_K, INDEXED)
    return delta_rule_apply(s, q, k, v, g, beta, idx_ptr, state_ptr, new_ptr, n_slots, t, h, vv, HV, DK, DV, BLOCK_K,
                            INDEXED)


# (Each half computes the row itself: with the slot from a jit helper that loads the indices, Inductor's analysis of
# what a user kernel writes (torch 2.11 and 2.13) took the indices as written, and cloned them every call.)


@triton.jit
def delta_rule_state(
    idx_ptr, state_ptr, n_slots, t, h, vv,
    HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_K: tl.constexpr, INDEXED: tl.constexpr,
):
    """Columns `vv` of token t's state row of value head h: the [BLOCK_K, BLOCK_V] fp32 block, loaded."""
    kk = tl.arange(0, BLOCK_K)
    if INDEXED:  # state rows idx[t], updated in place
        slot = tl.load(idx_ptr + t).to(tl.int64)
        slot = tl.where(slot < 0, slot + n_slots, slot)  # eager indexing wraps negatives
    else:  # row t is token t's; the new rows go to new_ptr
        slot = t
    # the slot check as a tensor (a scalar bool in a tensor mask is no mask to some interpreters)
    slots = tl.zeros([BLOCK_K, 1], dtype=tl.int64) + slot
    sm = (kk < DK)[:, None] & (vv < DV)[None, :] & (slots >= 0) & (slots < n_slots)
    return tl.load(state_ptr + (slot * HV + h) * (DK * DV) + kk[:, None] * DV + vv[None, :], mask=sm, other=0.0)


@triton.jit
def delta_rule_apply(
    s, q, k, v, g, beta, idx_ptr, state_ptr, new_ptr, n_slots, t, h, vv,
    HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_K: tl.constexpr, INDEXED: tl.constexpr,
):
    """The update of the state block `s` delta_rule_state loaded: written back (INDEXED) or to new_ptr; o [BLOCK_V]
    returned."""
    kk = tl.arange(0, BLOCK_K)
    if INDEXED:
        slot = tl.load(idx_ptr + t).to(tl.int64)
        slot = tl.where(slot < 0, slot + n_slots, slot)
    else:
        slot = t
    slots = tl.zeros([BLOCK_K, 1], dtype=tl.int64) + slot
    sm = (kk < DK)[:, None] & (vv < DV)[None, :] & (slots >= 0) & (slots < n_slots)
    offs = kk[:, None] * DV + vv[None, :]
    s = s * tl.exp(g)
    u = tl.sum(s * k[:, None], axis=0)  # [BLOCK_V]
    delta = beta * (v - u)
    s = s + k[:, None] * delta[None, :]
    if INDEXED:
        tl.store(state_ptr + (slot * HV + h) * (DK * DV) + offs, s, mask=sm)
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
    _, block_v, num_warps = _check_gated(spec, chain)
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
    _emit_gated_tail(em, chain)
    source = kernel_source("braze.codegen.delta_rule", "gated delta-rule update + gated RMSNorm", signature, name,
                           params, em.lines, imports=("from braze.codegen.delta_rule import delta_rule_block",))
    return KernelSource(name, source, 1, block_v, num_warps)


def _emit_gated_tail(em: _Emitter, chain: RowChain) -> None:
    """The row chain's stages over o (value head h of token t), as a [1, BLOCK_V] tile."""
    em.line("# the norm's row is value head h of token t, held as a [1, BLOCK_V] tile")
    em.line("row = t * HV + h")
    em.line("g = tl.arange(0, BLOCK_G)[:, None]")
    em.line("e = tl.arange(0, BLOCK_GS)[None, :]")
    em.line("col = g * GS + e")
    em.line("mask = (g < G) & (e < GS)")
    x = em.round_to("o[None, :]", chain.in_dtype)  # o as the graph casts it for the norm
    emit_stages(em, chain, x)


def _check_gated(spec: DeltaRule, chain: RowChain) -> tuple[int, int, int]:
    if chain.residual is not None or chain.n_groups != 1 or chain.width != spec.dv or chain.gate is None:
        raise ValueError(f"braze delta_rule: no gated kernel for {chain.name} over {chain.width} values "
                         f"(value heads of {spec.dv})")
    blocks_ = gated_blocks(spec.dk, spec.dv)
    if blocks_ is None:
        raise ValueError(f"braze delta_rule: a [{spec.dk}, {spec.dv}] head is too large for one program")
    return blocks_


# The conv-state channels of q, k and v: the PostConv segments the update reads, by index.
Roles = tuple[int, int, int]


def generate_conv_gated(post: PostConv, roles: Roles, spec: DeltaRule, chain: RowChain) -> KernelSource:
    """The post-conv path (causal conv update, L2 norm of q and k, gating) of the value head's operands, the
    delta-rule update and `chain` after it in one kernel: grid (T, Hv), program (t, h) as in `generate_gated`.

    Program (t, h) runs the conv of its key head's q and k channels and of its own v channels. Its own v channels'
    conv state it shifts itself; the key head's q/k channels are read by the RATIO programs of that key head, so
    each adds one to the key head's arrival counter once it has read them, and the last to arrive (it knows all
    the others have read) writes the shifted q/k state and sets the counter back to 0 for the next call."""
    _, block_v, num_warps = _check_gated(spec, chain)
    if post.gating is None or post.gating.heads != spec.heads_v:
        raise ValueError("braze delta_rule: the post-conv site has no gating of the value heads")
    segs = [post.segments[i] for i in roles]
    want = ((spec.heads_k, spec.dk), (spec.heads_k, spec.dk), (spec.heads_v, spec.dv))
    for seg, (heads, dim), what in zip(segs, want, "qkv"):
        if seg.heads * seg.head_dim != heads * dim or (seg.norm is not None and seg.head_dim != dim):
            raise ValueError(f"braze delta_rule: the {what} segment ({seg.heads}x{seg.head_dim}) is not "
                             f"{heads} heads of {dim}")
    signature = "|".join((post.to_json(), ",".join(map(str, roles)), spec.to_json(), chain.to_json()))
    name = f"braze_conv_delta_rule_{chain.name}_{hashlib.sha256(signature.encode()).hexdigest()[:12]}"
    conv = ["c_x_ptr", "c_x_row_stride", "c_w_ptr", "c_idx_ptr", "c_state_ptr", "c_n_slots", "c_a_ptr",
            "c_a_row_stride", "c_b_ptr", "c_b_row_stride", "c_alog_ptr", "c_dt_ptr", "ctr_ptr"]
    update = ["u_idx_ptr", "u_state_ptr", "u_n_slots", "u_scale"]
    params = [*conv, *update, *stage_params(chain), *ROW_CONSTEXPRS,
              "RATIO: tl.constexpr", "HK: tl.constexpr", "HV: tl.constexpr", "DK: tl.constexpr", "DV: tl.constexpr",
              "BLOCK_K: tl.constexpr", "BLOCK_V: tl.constexpr", "INDEXED: tl.constexpr"]
    em = _Emitter()
    em.line("t = tl.program_id(0).to(tl.int64)")
    em.line("h = tl.program_id(1)")
    em.line("kh = h // RATIO  # the key head whose q and k this value head reads")
    emit_slot(em, post, pre="c_")
    em.line("kk = tl.arange(0, BLOCK_K)")
    em.line("km = kk < DK")
    em.line("vv = tl.arange(0, BLOCK_V)")
    em.line("vm = vv < DV")
    chans = {"q": f"{segs[0].start} + kh * DK + kk", "k": f"{segs[1].start} + kh * DK + kk",
             "v": f"{segs[2].start} + h * DV + vv"}
    reads = {}
    for what, mask in (("q", "km"), ("k", "km"), ("v", "vm")):
        em.line(f"c{what} = {chans[what]}  # the {what} channels")
        reads[what] = emit_conv_read(em, post, f"c{what}", mask, pre="c_")
    em.line("# the recurrent state block, loaded before the barrier and the counter (nothing after them may start")
    em.line("# earlier): its latency overlaps the conv's")
    em.line("blk = delta_rule_state(u_idx_ptr, u_state_ptr, u_n_slots, t, h, vv, HV, DK, DV, BLOCK_K, INDEXED)")
    em.line("tl.debug_barrier()  # every conv state value of this program is read before any is written")
    emit_conv_write(em, post, *reads["v"])  # this value head's v channels: no other program reads them
    if spec.heads_v == spec.heads_k:
        em.line("# q and k channels: this program is their key head's only reader")
        emit_conv_write(em, post, *reads["q"])
        emit_conv_write(em, post, *reads["k"])
    else:
        em.line("if (slot >= 0) & (slot < c_n_slots):")
        em.indent += 1
        em.line("ctr = ctr_ptr + slot * HK + kh")
        em.line("arrived = tl.atomic_add(ctr, 1, sem='acq_rel')  # after this program's reads (the barrier)")
        # modulo RATIO, and reset by subtracting RATIO: two tokens naming one conv row (undefined in eager too) still
        # leave the counter at zero for the next call, whatever the interleaving
        em.line("if arrived % RATIO == RATIO - 1:  # the key head's last reader: all others have read the q/k state")
        em.indent += 1
        emit_conv_write(em, post, *reads["q"])
        emit_conv_write(em, post, *reads["k"])
        em.line("tl.atomic_add(ctr, -RATIO, sem='relaxed')  # back to where it started for the next call")
        em.indent -= 2
    ops = {}
    for (what, mask), seg in zip((("q", "km"), ("k", "km"), ("v", "vm")), segs):
        y = emit_conv_taps(em, post, reads[what][2], f"c{what}", mask, pre="c_")
        ops[what] = emit_l2norm(em, seg, y, mask) if seg.norm is not None else y
    em.line("hh = h + tl.arange(0, 1)")
    em.line("hm = hh < HV")
    g, beta = emit_gating_math(em, post, "hh", "hm", pre="c_")
    em.line("# the update (Inductor passes a Python float as fp64: the update is fp32 math, as the graph's)")
    em.line(f"qs = {ops['q']} * tl.full([1], u_scale, tl.float32)")
    em.line(f"o = delta_rule_apply(blk, qs, {ops['k']}, {ops['v']}, tl.sum({g}, axis=0), tl.sum({beta}, axis=0), "
            "u_idx_ptr, u_state_ptr,")
    em.line("                     u_state_ptr, u_n_slots, t, h, vv, HV, DK, DV, BLOCK_K, INDEXED)  # [BLOCK_V] fp32: "
            "all of the head")
    _emit_gated_tail(em, chain)
    source = kernel_source("braze.codegen.delta_rule", "post-conv path + gated delta-rule update + gated RMSNorm",
                           signature, name, params, em.lines,
                           imports=("from braze.codegen.delta_rule import delta_rule_apply, delta_rule_state",))
    return KernelSource(name, source, 1, block_v, num_warps)
