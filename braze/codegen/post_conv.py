"""PostConv -> Triton source: causal conv update (state shifted in place) -> split -> L2 norm -> gating.

Grid (T, programs): program (t, p) takes one head (a normed segment) or one chunk of
BLOCK_D channels (a plain segment) of token t: it reads the K-1 state values and the new
input of each of its channels, writes the shifted state back in place, sums the K taps,
applies SiLU, and stores the L2-normed head (or the plain values). One more program per
token computes the gating g, beta of all Hv heads. The K taps are unrolled at generation
time (K is read from the graph), so each tap is a [BLOCK_D] vector held by the thread that
also writes it back; a CTA barrier separates the state reads from the state writes.

Bytes per token (C channels, state dtype s bytes, bf16 x, fp32 outputs of q/k):
read x (2C) + state (s·C·(K-1)) + weight (cached) + a, b (4Hv); write state (s·C·(K-1)),
q, k (4·2·Hk·dk), v (2·Hv·dv), g, beta (8Hv). Nothing in between touches memory.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from braze.patterns.gdn import PostConv

from .rowwise import _TL_DTYPE, _Emitter, _fmt_float, _next_pow2, kernel_source


@dataclass(frozen=True)
class PostConvKernelSource:
    name: str
    source: str
    programs: int  # per token, the gating program included
    num_warps: int


def layout(spec: PostConv) -> tuple[int, list[tuple[int, int]]]:
    """BLOCK_D and, per segment, (channels per program, programs)."""
    normed = [s.head_dim for s in spec.segments if s.norm is not None]
    block = _next_pow2(max(normed)) if normed else min(128, _next_pow2(spec.conv.channels))
    out = []
    for s in spec.segments:
        chunk = s.head_dim if s.norm is not None else block
        width = s.heads * s.head_dim
        out.append((chunk, -(-width // chunk)))
    return block, out


def generate(spec: PostConv) -> PostConvKernelSource:
    signature = spec.to_json()
    digest = hashlib.sha256(signature.encode()).hexdigest()[:12]
    name = f"braze_post_conv_{digest}"
    conv = spec.conv
    block, plan = layout(spec)
    params = ["x_ptr", "x_row_stride", "w_ptr", "idx_ptr", "state_ptr", "n_slots"]
    if spec.gating:
        params += ["a_ptr", "a_row_stride", "b_ptr", "b_row_stride", "alog_ptr", "dt_ptr"]
    params += ["f32_ptr", "lo_ptr", "n_rows", "BLOCK_D: tl.constexpr", "SOFT_ROUND: tl.constexpr", "DIV_RN: tl.constexpr"]

    place, _ = spec.placement()
    em = _Emitter()
    em.line("t = tl.program_id(0).to(tl.int64)")
    em.line("pid = tl.program_id(1)")
    emit_slot(em, spec)
    em.line("d = tl.arange(0, BLOCK_D)")
    first = 0
    for k, (seg, (chunk, progs)) in enumerate(zip(spec.segments, plan)):
        width = seg.heads * seg.head_dim
        em.line(f"if (pid >= {first}) & (pid < {first + progs}):  # segment {k}: channels "
                f"[{seg.start}, {seg.start + width}), {progs} program(s) of {chunk}")
        em.indent += 1
        em.line(f"ch = (pid - {first}) * {chunk} + d")
        em.line(f"m = (d < {chunk}) & (ch < {width})")
        em.line(f"c = {seg.start} + ch")
        y = _emit_conv(em, spec)
        if seg.norm is not None:
            y = emit_l2norm(em, seg, y, "m")
            out_dtype = seg.norm.out
        else:
            out_dtype = conv.out
        em.line(f"tl.store({_out(place[k])} + t * {width} + ch, {y}.to({_TL_DTYPE[out_dtype]}), mask=m)")
        em.indent -= 1
        first += progs
    if spec.gating:
        _emit_gating(em, spec, first, _out(place[-2]), _out(place[-1]))
        first += 1
    source = kernel_source("braze.codegen.post_conv", "post-conv site", signature, name, params, em.lines)
    num_warps = max(1, min(4, block // 32))
    return PostConvKernelSource(name, source, first, num_warps)


def emit_slot(em: _Emitter, spec: PostConv, pre: str = "") -> None:
    """`slot`, token t's conv state row (parameters idx_ptr and n_slots, prefixed by `pre`)."""
    if spec.conv.indexed:
        em.line(f"slot = tl.load({pre}idx_ptr + t).to(tl.int64)  # the conv state row")
        em.line(f"slot = tl.where(slot < 0, slot + {pre}n_slots, slot)  # eager indexing wraps negatives")
    else:
        em.line("slot = t  # token t's conv state is row t")


def _emit_conv(em: _Emitter, spec: PostConv) -> str:
    """The conv update of channels `c` (mask `m`) of token t; returns y, rounded to conv.out."""
    srow, sm, window = emit_conv_read(em, spec, "c", "m")
    em.line("tl.debug_barrier()  # every state value of this program is read before any is written")
    emit_conv_write(em, spec, srow, sm, window)
    return emit_conv_taps(em, spec, window, "c", "m")


def emit_conv_read(em: _Emitter, spec: PostConv, c: str, m: str, pre: str = "") -> tuple[str, str, list[str]]:
    """Load the window [state | x] of channels `c` (mask `m`) of token t's conv state row `slot`:
    (the row's pointer, the state mask, the K window values held in fp32). `pre` prefixes the kernel's
    parameter names (x_ptr, x_row_stride, state_ptr, n_slots)."""
    conv = spec.conv
    K, C, L = conv.width, conv.channels, conv.state_len
    em.line(f"# causal conv update: {K} taps over [state ({L}) | x], state [rows, {C}, {L}] shifted in place")
    srow = em.let(f"{pre}state_ptr + slot * {C * L} + {c} * {L}", "srow")
    # the slot check as a tensor like `m` (a scalar bool in a tensor mask is no mask to some interpreters)
    sm = em.let(f"{m} & ((tl.zeros_like({c}).to(tl.int64) + slot) >= 0) & "
                f"((tl.zeros_like({c}).to(tl.int64) + slot) < {pre}n_slots)", "sm")
    window = [em.let(f"tl.load({srow} + {i}, mask={sm}, other=0.0).to(tl.float32)", "u") for i in range(L)]
    xv = em.let(f"tl.load({pre}x_ptr + t * {pre}x_row_stride + {c}, mask={m}, other=0.0).to(tl.float32)", "xv")
    window.append(em.round_to(xv, conv.state_dtype))  # the window holds x in the state's dtype
    return srow, sm, window


def emit_conv_write(em: _Emitter, spec: PostConv, srow: str, sm: str, window: list[str]) -> None:
    """The state row shifted by one: the window's last L values (after every read of it: the caller's barrier)."""
    st = _TL_DTYPE[spec.conv.state_dtype]
    for i in range(spec.conv.state_len):
        em.line(f"tl.store({srow} + {i}, {window[i + 1]}.to({st}), mask={sm})")


def emit_conv_taps(em: _Emitter, spec: PostConv, window: list[str], c: str, m: str, pre: str = "") -> str:
    """y of channels `c`: the K taps summed (the weights at the parameter `pre` + w_ptr), the activation; rounded
    to conv.out."""
    conv = spec.conv
    K, L = conv.width, conv.state_len
    acc = None
    for i, u in enumerate(window[L + 1 - K:]):
        w = em.let(f"tl.load({pre}w_ptr + {c} * {K} + {i}, mask={m}, other=0.0).to(tl.float32)", "w")
        term = f"{u} * {w}"
        acc = em.let(term if acc is None else f"{acc} + {term}", "acc")
    acc = em.round_to(acc, conv.acc)
    if conv.act == "silu":
        den = em.let(f"1.0 + tl.exp(-{acc})", "den")
        acc = em.let(em.div(acc, den, per_element=True), "act")
    return em.round_to(acc, conv.out)


def emit_l2norm(em: _Emitter, seg, y: str, m: str) -> str:
    """The L2 norm of the head `y` (mask `m`), rounded to the norm's dtype."""
    em.line(f"# l2 norm of each head of {seg.head_dim}, eps={seg.norm.eps!r}")
    ss = em.let(f"tl.sum(tl.where({m}, {y} * {y}, 0.0), axis=0)", "ss")
    r = em.let(f"tl.math.rsqrt({ss} + {_fmt_float(seg.norm.eps)})", "r")
    return em.round_to(em.let(f"{y} * {r}", "n"), seg.norm.out)


def _out(place: tuple[int, int]) -> str:
    """Where an output starts: its buffer, past T rows of the outputs placed before it."""
    buf, offset = place
    return f"{('f32_ptr', 'lo_ptr')[buf]} + n_rows * {offset}"


def _emit_gating(em: _Emitter, spec: PostConv, pid: int, g_out: str, beta_out: str) -> None:
    gate = spec.gating
    hv = gate.heads
    em.line(f"if pid == {pid}:  # gating of {hv} heads: g = -exp(A_log)·softplus(a + dt_bias), beta = sigmoid(b)")
    em.indent += 1
    em.line(f"hh = tl.arange(0, {_next_pow2(hv)})")
    em.line(f"hm = hh < {hv}")
    g, beta = emit_gating_math(em, spec, "hh", "hm")
    em.line(f"tl.store({g_out} + t * {hv} + hh, {g}.to({_TL_DTYPE[gate.g_out]}), mask=hm)")
    em.line(f"tl.store({beta_out} + t * {hv} + hh, {beta}.to({_TL_DTYPE[gate.beta_out]}), mask=hm)")
    em.indent -= 1


def emit_gating_math(em: _Emitter, spec: PostConv, hh: str, hm: str, pre: str = "") -> tuple[str, str]:
    """g and beta of heads `hh` (mask `hm`) of token t, each rounded to its output dtype (held in fp32); `pre`
    prefixes the parameter names (a_ptr, a_row_stride, dt_ptr, alog_ptr, b_ptr, b_row_stride)."""
    gate = spec.gating
    em.line(f"av = tl.load({pre}a_ptr + t * {pre}a_row_stride + {hh}, mask={hm}, other=0.0).to(tl.float32)")
    em.line(f"dt = tl.load({pre}dt_ptr + {hh}, mask={hm}, other=0.0).to(tl.float32)")
    em.line(f"al = tl.load({pre}alog_ptr + {hh}, mask={hm}, other=0.0).to(tl.float32)")
    em.line("s = av + dt")
    # log1p(e) without libdevice (the interpreter lacks it): log(w)·e/(w-1), w = 1 + e, exact when w == 1
    em.line("e = tl.exp(tl.minimum(s, 80.0))")
    em.line("w1 = 1.0 + e")
    em.line("lp = tl.where(w1 == 1.0, e, tl.log(w1) * (e / tl.where(w1 == 1.0, 1.0, w1 - 1.0)))")
    em.line(f"sp = tl.where(s > {_fmt_float(gate.threshold)}, s, lp)")
    g = em.round_to(em.let("-tl.exp(al) * sp", "g"), gate.g_out)
    em.line(f"bv = tl.load({pre}b_ptr + t * {pre}b_row_stride + {hh}, mask={hm}, other=0.0).to(tl.float32)")
    beta = em.round_to(em.let(em.div("(1.0 + tl.zeros_like(bv))", "(1.0 + tl.exp(-bv))", per_element=True), "beta"),
                       gate.beta_out)
    return g, beta
