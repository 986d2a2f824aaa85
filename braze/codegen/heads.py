"""HeadGroup -> Triton source: per token, norm -> RoPE -> output and/or in-place cache write.

Grid (tokens, chains): program (t, k) runs chain k of the group on token t, so sibling
chains over the same tokens (q and k of one attention layer) are one launch. A token's
heads are held as segments (CHAIN_DESIGN.md): with RoPE, the rotated dims as a
[BLOCK_H, BLOCK_R2, 2] tile laid out so that `tl.split` yields the two lanes of each
rotation pair (NeoX: i and i + r/2; GPT-J: 2i and 2i+1), plus the untouched dims as
[BLOCK_H, BLOCK_P]; without RoPE one [BLOCK_H, BLOCK_D] tile.
Bytes per token and chain: read x (H·hd) + weight (cached) + two cos/sin rows, write the
result and/or one cache row; nothing in between touches memory. Outputs of all chains
share one flat buffer: chain k's [T, H, hd] slab starts at T · (widths of earlier outputs).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from braze.patterns.stages import Cast, HeadAbsorb, HeadChain, HeadGroup, WeightMul

from .rowwise import _TL_DTYPE, _Emitter, _fmt_float, _next_pow2, _power_of_two, fp8_value, kernel_source


@dataclass(frozen=True)
class HeadKernelSource:
    name: str
    source: str
    constexprs: dict
    num_warps: int


@dataclass
class _Segment:
    col: str  # element offset of each lane within the token's row
    mask: str
    head: str  # head index, shaped to broadcast with the tile
    rank: int  # 2 or 3
    value: str = ""

    def per_head(self, v: str) -> str:
        """Reduce a tile to one value per head: [BLOCK_H]."""
        return f"tl.sum(tl.sum({v}, axis=2), axis=1)" if self.rank == 3 else f"tl.sum({v}, axis=1)"

    def bcast(self, v: str) -> str:
        """A [BLOCK_H] value broadcast against the tile."""
        return f"{v}[:, None, None]" if self.rank == 3 else f"{v}[:, None]"


def chain_params(chain: HeadChain) -> list[str]:
    """Pointer/stride parameters of one chain, unprefixed, in launch order."""
    params = ["x_ptr", "x_row_stride", "x_head_stride"]
    if chain.norm is not None and chain.norm.has_weight:
        params.append("w_ptr")
    if chain.norm is not None and getattr(chain.norm, "has_bias", False):
        params.append("b_ptr")
    if chain.rope is not None:
        params += ["cos_ptr", "sin_ptr", "cos_row_stride", "sin_row_stride"]
        if chain.gather:
            params.append("pos_ptr")
    if chain.write is not None:
        params += ["slots_ptr", "cache_ptr", "n_slots"]
        if chain.write.layout == "bhsd":
            params += ["slots_stride", "cache_sb", "cache_sh", "cache_ss"]
    elif chain.fields:
        params.append("slots_ptr")
    if chain.product is not None:
        params += ["hw_ptr", "hw_row_stride", "hw_head_stride"]
    if chain.quant is not None and chain.quant_out:
        params += ["q_ptr"] + [f"s{i}_ptr" for i in range(len(chain.quant.scales))]
    return params


def generate(group: HeadGroup) -> HeadKernelSource:
    signature = group.to_json()
    digest = hashlib.sha256(signature.encode()).hexdigest()[:12]
    name = f"braze_heads_{group.name}_{digest}"
    params: list[str] = []
    const: dict[str, int] = {}
    em = _Emitter()
    em.line("row = tl.program_id(0).to(tl.int64)")
    em.line("chain = tl.program_id(1)")
    out_offset = 0
    starts = group.program_starts()
    for k, chain in enumerate(group.chains):
        p = f"c{k}_"
        if isinstance(chain, HeadAbsorb):
            params += [p + q for q in ("x_ptr", "x_row_stride", "x_head_stride", "w_ptr", "w_head_stride",
                                       "w_row_stride", "y_ptr")]
            em.line(f"if (chain >= {starts[k]}) & (chain < {starts[k + 1]}) & (row == 0):  # {chain.name}: "
                    f"{chain.heads} x [{chain.in_dim}] @ [{chain.in_dim}, {chain.head_dim}]")
            em.indent += 1
            _emit_absorb(em, chain, p, const, starts[k])
        else:
            params += [p + q for q in chain_params(chain)]
            em.line(f"if chain == {starts[k]}:  # {chain.name}: {chain.heads} x {chain.head_dim}")
            em.indent += 1
            _emit_chain(em, chain, p, const, out_offset)
        em.indent -= 1
        if chain.out:
            out_offset += chain.heads * chain.head_dim
    params += [f"fc{i}_ptr" for i in range(group.n_field_caches)] + ["out_ptr", "n_rows"]
    consts = [f"{k}: tl.constexpr" for k in const] + ["SOFT_ROUND: tl.constexpr", "DIV_RN: tl.constexpr"]
    elems = max(_next_pow2(c.in_dim) * c.block_c if isinstance(c, HeadAbsorb) else
                _next_pow2(c.heads) * _next_pow2(c.head_dim) for c in group.chains)
    num_warps = 1 if elems <= 256 else 2 if elems <= 1024 else 4 if elems <= 4096 else 8
    source = kernel_source("braze.codegen.heads", "chains", signature, name, params + consts, em.lines)
    return HeadKernelSource(name, source, const, num_warps)


def _emit_absorb(em: _Emitter, chain: HeadAbsorb, p: str, const: dict, start: int) -> None:
    """Program (0, start + i): head i // ⌈C / BC⌉, output columns of block i % ⌈C / BC⌉, every token's row through
    one [D, BC] weight tile held in registers; the result goes to its own buffer as [H, T, C] (the bmm's layout)."""
    nb = -(-chain.head_dim // chain.block_c)
    const.update({f"{p}D": chain.in_dim, f"{p}C": chain.head_dim, f"{p}BD": _next_pow2(chain.in_dim),
                  f"{p}BC": chain.block_c})
    em.line(f"{p}i = chain - {start}")
    em.line(f"{p}h = {p}i // {nb}")
    em.line(f"{p}c = ({p}i % {nb}) * {p}BC + tl.arange(0, {p}BC)")
    em.line(f"{p}d = tl.arange(0, {p}BD)")
    em.line(f"{p}cm = {p}c < {p}C")
    em.line(f"{p}dm = {p}d < {p}D")
    em.line(f"{p}w = tl.load({p}w_ptr + {p}h * {p}w_head_stride + {p}d[:, None] * {p}w_row_stride + {p}c[None, :], "
            f"mask={p}dm[:, None] & {p}cm[None, :], other=0.0).to(tl.float32)")
    em.line(f"for {p}r in range(0, n_rows):")
    em.indent += 1
    em.line(f"{p}x = tl.load({p}x_ptr + {p}r * {p}x_row_stride + {p}h * {p}x_head_stride + {p}d, mask={p}dm, "
            "other=0.0).to(tl.float32)")
    em.line(f"{p}y = tl.sum({p}x[:, None] * {p}w, axis=0)")
    em.line(f"tl.store({p}y_ptr + ({p}h * n_rows + {p}r) * {p}C + {p}c, "
            f"{p}y.to({_TL_DTYPE[chain.out_dtype]}), mask={p}cm)")
    em.indent -= 1


def _emit_chain(em: _Emitter, chain: HeadChain, p: str, const: dict, out_offset: int) -> None:
    H, HD = chain.heads, chain.head_dim
    rope = chain.rope
    const.update({f"{p}H": H, f"{p}HD": HD, f"{p}BLOCK_H": _next_pow2(H)})
    segments: list[_Segment] = []
    if rope is not None:
        r2 = rope.rotary_dim // 2
        const.update({f"{p}R2": r2, f"{p}BLOCK_R2": _next_pow2(r2), f"{p}OFF": rope.offset,
                      f"{p}P": HD - rope.rotary_dim, f"{p}BLOCK_P": _next_pow2(max(1, HD - rope.rotary_dim))})
        em.line(f"{p}h3 = tl.arange(0, {p}BLOCK_H)[:, None, None]")
        em.line(f"{p}i3 = tl.arange(0, {p}BLOCK_R2)[None, :, None]")
        em.line(f"{p}j3 = tl.arange(0, 2)[None, None, :]")
        lane = f"{p}j3 * {p}R2 + {p}i3" if rope.style == "neox" else f"2 * {p}i3 + {p}j3"
        em.line(f"{p}col_rot = {p}h3 * {p}HD + {p}OFF + {lane}  # {rope.style} pairs on dims "
                f"[{rope.offset}, {rope.offset + rope.rotary_dim}) of each head")
        em.line(f"{p}mask_rot = ({p}h3 < {p}H) & ({p}i3 < {p}R2) & ({p}j3 < 2)")
        segments.append(_Segment(f"{p}col_rot", f"{p}mask_rot", f"{p}h3", 3))
        if HD > rope.rotary_dim:
            start = f"{p}R2 * 2" if rope.offset == 0 else "0"
            em.line(f"{p}h2 = tl.arange(0, {p}BLOCK_H)[:, None]")
            em.line(f"{p}p2 = tl.arange(0, {p}BLOCK_P)[None, :]")
            em.line(f"{p}col_pass = {p}h2 * {p}HD + {start} + {p}p2  # the dims RoPE leaves alone")
            em.line(f"{p}mask_pass = ({p}h2 < {p}H) & ({p}p2 < {p}P)")
            segments.append(_Segment(f"{p}col_pass", f"{p}mask_pass", f"{p}h2", 2))
    else:
        const[f"{p}BLOCK_D"] = _next_pow2(HD)
        em.line(f"{p}h2 = tl.arange(0, {p}BLOCK_H)[:, None]")
        em.line(f"{p}d2 = tl.arange(0, {p}BLOCK_D)[None, :]")
        em.line(f"{p}col = {p}h2 * {p}HD + {p}d2")
        em.line(f"{p}mask = ({p}h2 < {p}H) & ({p}d2 < {p}HD)")
        segments.append(_Segment(f"{p}col", f"{p}mask", f"{p}h2", 2))
    for k, seg in enumerate(segments):
        # x may have gaps between heads (q split from an interleaved [q | gate] projection)
        at = f"row * {p}x_row_stride + {seg.col} + {seg.head} * ({p}x_head_stride - {p}HD)"
        seg.value = em.let(f"tl.load({p}x_ptr + {at}, mask={seg.mask}, other=0.0).to(tl.float32)", f"{p}x{k}_")
    if chain.fields:
        em.line(f"{p}fslot = tl.load({p}slots_ptr + row).to(tl.int64)")
    if chain.norm is not None and chain.norm.kind == "layernorm":
        _emit_layernorm(em, chain, segments, p)
    elif chain.norm is not None:
        _emit_norm(em, chain, segments, p)
    if rope is not None:
        _emit_rope(em, chain, segments, p)
    out_dtype = chain.out_dtype
    for seg in segments:
        seg.value = em.round_to(seg.value, out_dtype)
        if chain.out:
            base = f"n_rows * {out_offset} + row * {H * HD}"
            em.line(f"tl.store(out_ptr + {base} + {seg.col}, {seg.value}.to({_TL_DTYPE[out_dtype]}), mask={seg.mask})")
        emit_fields(em, chain, p, "result", seg.value, seg.col, seg.mask)
    if chain.quant is not None:
        _emit_quant(em, chain, segments, p)
    if chain.write is not None:
        bhsd = chain.write.layout == "bhsd"
        em.line(f"{p}slot = tl.load({p}slots_ptr + row{f' * {p}slots_stride' if bhsd else ''}).to(tl.int64)")
        em.line(f"{p}slot = tl.where({p}slot < 0, {p}slot + {p}n_slots, {p}slot)  # eager indexing wraps negatives")
        for seg in segments:
            v = em.round_to(seg.value, chain.write.dtype)
            # the slot broadcast over the tile, so the range check is a tensor mask like the others
            at = em.let(f"tl.zeros_like({seg.col}).to(tl.int64) + {p}slot", f"{p}slot_")
            if bhsd:  # [batch, heads, seq, head_dim] with the cache's own strides; this token is sequence `row`
                addr = (f"row * {p}cache_sb + {at} * {p}cache_ss + {seg.head} * {p}cache_sh + "
                        f"({seg.col} - {seg.head} * {p}HD)")
            else:
                addr = f"{at} * ({p}H * {p}HD) + {seg.col}"
            em.line(f"tl.store({p}cache_ptr + {addr}, "
                    f"{v}.to({_TL_DTYPE[chain.write.dtype]}), mask={seg.mask} & ({at} >= 0) & ({at} < {p}n_slots))")


def _emit_norm(em: _Emitter, chain: HeadChain, segments: list[_Segment], p: str) -> None:
    norm = chain.norm
    per_head = norm.width == chain.head_dim and chain.heads > 1
    em.line(f"# rmsnorm over {norm.width} values ({'each head' if per_head else 'the row'}), eps={norm.eps!r}")
    sums = []
    for seg in segments:
        sq = em.round_to(em.let(f"{seg.value} * {seg.value}", "sq"), norm.square)
        sums.append(seg.per_head(sq))
    total = em.let(" + ".join(sums), "ssum")  # [BLOCK_H]
    if not per_head:
        total = em.let(f"tl.sum({total}, axis=0)", "ssum")
    mean = em.round_to(em.let(em.div(total, repr(float(norm.width))), "mean"), norm.mean)
    var = em.round_to(em.let(f"{mean} + {_fmt_float(norm.eps)}", "var"), norm.rstd)
    rms = None
    if norm.inverse == "rsqrt":
        inv = em.round_to(em.let(f"tl.math.rsqrt({var})", "rstd"), norm.rstd)
    else:
        rms = em.round_to(em.let(f"tl.sqrt_rn({var})", "rms"), norm.rstd)
        inv = em.round_to(em.let(em.div(f"(1.0 + tl.zeros_like({rms}))", rms), "rstd"), norm.rstd)
    for seg in segments:
        if norm.inverse == "div_sqrt":
            rms_b = seg.bcast(rms) if per_head else rms
            y = em.let(em.div(seg.value, f"({rms_b} + tl.zeros_like({seg.value}))", per_element=True), "y")
        else:
            y = em.let(f"{seg.value} * {seg.bcast(inv) if per_head else inv}", "y")
        y = em.round_to(y, norm.normed)
        for op in norm.epilogue:
            if isinstance(op, Cast):
                y = em.round_to(y, op.dtype)
            elif isinstance(op, WeightMul):
                index = f"({seg.col} - {seg.head} * {p}HD)" if norm.width == chain.head_dim else seg.col
                w = em.let(f"tl.load({p}w_ptr + {index}, mask={seg.mask}, other=0.0).to(tl.float32)", "w")
                if op.zero_centered:
                    w = em.round_to(em.let(f"1.0 + {w}", "w"), op.offset_dtype or "float32")
                y = em.round_to(em.let(f"{y} * {w}", "y"), op.dtype)
        seg.value = y


def _emit_layernorm(em: _Emitter, chain: HeadChain, segments: list[_Segment], p: str) -> None:
    """(x - mean) * rsqrt(var + eps), biased variance, statistics in the stage's compute dtype; then
    weight, bias and casts in the graph's order. Lanes outside the tile's mask stay 0."""
    norm = chain.norm
    per_head = norm.width == chain.head_dim and chain.heads > 1
    em.line(f"# layernorm over {norm.width} values ({'each head' if per_head else 'the row'}), eps={norm.eps!r}")

    def reduce(values: list[str], stem: str) -> str:
        total = em.let(" + ".join(seg.per_head(v) for seg, v in zip(segments, values)), stem)  # [BLOCK_H]
        return total if per_head else em.let(f"tl.sum({total}, axis=0)", stem)

    def bcast(seg: _Segment, v: str) -> str:
        return seg.bcast(v) if per_head else v

    for seg in segments:
        seg.value = em.round_to(seg.value, norm.compute)
    mean = em.round_to(em.let(em.div(reduce([s.value for s in segments], "sum"), repr(float(norm.width))), "mean"),
                       norm.compute)
    centered = [em.round_to(em.let(f"tl.where({seg.mask}, {seg.value} - {bcast(seg, mean)}, 0.0)", "c"), norm.compute)
                for seg in segments]
    var = em.round_to(em.let(em.div(reduce([f"{c} * {c}" for c in centered], "ssq"), repr(float(norm.width))), "var"),
                      norm.compute)
    rstd = em.round_to(em.let(f"tl.math.rsqrt({em.round_to(em.let(f'{var} + {_fmt_float(norm.eps)}', 've'), norm.compute)})",
                              "rstd"), norm.compute)
    for seg, c in zip(segments, centered):
        y = em.round_to(em.let(f"{c} * {bcast(seg, rstd)}", "y"), norm.compute)
        for op in norm.epilogue:
            index = f"({seg.col} - {seg.head} * {p}HD)" if norm.width == chain.head_dim else seg.col
            if isinstance(op, Cast):
                y = em.round_to(y, op.dtype)
            elif isinstance(op, WeightMul):
                w = em.let(f"tl.load({p}w_ptr + {index}, mask={seg.mask}, other=0.0).to(tl.float32)", "w")
                y = em.round_to(em.let(f"{y} * {w}", "y"), op.dtype)
            else:  # BiasAdd
                b = em.let(f"tl.load({p}b_ptr + {index}, mask={seg.mask}, other=0.0).to(tl.float32)", "b")
                y = em.round_to(em.let(f"{y} + {b}", "y"), op.dtype)
        seg.value = y


def _emit_rope(em: _Emitter, chain: HeadChain, segments: list[_Segment], p: str) -> None:
    rope = chain.rope
    rot = segments[0]
    em.line(f"# rope ({rope.style}) on {rope.rotary_dim} of {rope.head_dim} dims")
    em.line(f"{p}trow = tl.load({p}pos_ptr + row).to(tl.int64)" if chain.gather else f"{p}trow = row")
    em.line(f"{p}i2 = tl.arange(0, {p}BLOCK_R2)[None, :]")
    em.line(f"{p}mask_i = {p}i2 < {p}R2")
    x1, x2 = em.fresh("x1_"), em.fresh("x2_")
    em.line(f"{x1}, {x2} = tl.split({rot.value})  # [BLOCK_H, BLOCK_R2] each")

    def table(ptr: str, stride: str, shift: str = "") -> str:
        return em.let(f"tl.load({p}{ptr} + {p}trow * {p}{stride} + {p}i2{shift}, mask={p}mask_i, other=0.0)"
                      f".to(tl.float32)", "tb")

    def prod(a: str, b: str) -> str:
        return em.round_to(em.let(f"{a} * {b}", "m"), rope.mul)

    if rope.table == rope.rotary_dim:  # rotate-half with full-width tables
        c1, s1 = table("cos_ptr", "cos_row_stride"), table("sin_ptr", "sin_row_stride")
        c2, s2 = table("cos_ptr", "cos_row_stride", f" + {p}R2"), table("sin_ptr", "sin_row_stride", f" + {p}R2")
        y1 = em.let(f"{prod(x1, c1)} + {prod(f'(-{x2})', s1)}", "y1_")
        y2 = em.let(f"{prod(x2, c2)} + {prod(x1, s2)}", "y2_")
    else:
        c, s = table("cos_ptr", "cos_row_stride"), table("sin_ptr", "sin_row_stride")
        y1 = em.let(f"{prod(x1, c)} - {prod(x2, s)}", "y1_")
        y2 = em.let(f"{prod(x2, c)} + {prod(x1, s)}", "y2_")
    y1, y2 = em.round_to(y1, rope.out), em.round_to(y2, rope.out)
    rot.value = em.let(f"tl.join({y1}, {y2})  # [BLOCK_H, BLOCK_R2, 2]", "rot")


def _emit_quant(em: _Emitter, chain: HeadChain, segments: list[_Segment], p: str) -> None:
    """FP8 quant of each head (one scale per head): amax over the head's values as rounded to the
    result dtype, the scale programs stored per [token, head], the fp8 values beside the result."""
    quant = chain.quant
    if quant.group_size != chain.head_dim:
        _emit_group_quant(em, chain, segments, p)
        return
    em.line(f"# fp8 quant, one scale per head of {chain.head_dim} values")
    maxes = []
    for seg in segments:
        a = em.let(f"tl.where({seg.mask}, tl.abs({seg.value}), 0.0)", "a")
        maxes.append(em.let(f"tl.max(tl.max({a}, axis=2), axis=1)" if seg.rank == 3 else f"tl.max({a}, axis=1)",
                            "amax"))
    amax = maxes[0]
    for m in maxes[1:]:
        amax = em.let(f"tl.maximum({amax}, {m})", "amax")  # [BLOCK_H]
    em.line(f"{p}hq = tl.arange(0, {p}BLOCK_H)")
    for i, prog in enumerate(quant.scales):
        sc = amax
        for op in prog:
            sc = em.unary(sc, op)
        product = chain.product if chain.product is not None and chain.product.scale == i else None
        if product is not None:  # the scale only feeds w * scale: store that product instead
            em.line(f"# scale {i} times the per-head weights w[t, h] (one value per head)")
            w = em.let(f"tl.load({p}hw_ptr + row * {p}hw_row_stride + {p}hq * {p}hw_head_stride, mask={p}hq < {p}H, "
                       f"other=0.0).to(tl.float32)", "hw")
            for op in product.pre:
                w = em.unary(w, op)
            v = em.round_to(em.let(f"{w} * {sc}", "hw"), product.dtype)
            for op in product.post:
                v = em.unary(v, op)
            em.line(f"tl.store({p}s{i}_ptr + row * {p}H + {p}hq, {v}.to({_TL_DTYPE[product.out_dtype]}), "
                    f"mask={p}hq < {p}H)")
        elif chain.quant_out:
            em.line(f"tl.store({p}s{i}_ptr + row * {p}H + {p}hq, {sc}.to({_TL_DTYPE[prog[-1].dtype]}), "
                    f"mask={p}hq < {p}H)")
        emit_fields(em, chain, p, f"scale{i}", sc, f"{p}hq", f"{p}hq < {p}H")
    operand = amax
    for op in quant.operand:
        operand = em.unary(operand, op)
    inv = None
    if quant.combine == "div" and _power_of_two(quant.operand):
        # dividing by 2^k is multiplying by 2^-k exactly: one divide per head, not per value
        inv = em.let(em.div(f"(1.0 + tl.zeros_like({operand}))", operand), "inv")
    for seg in segments:
        if inv is not None:
            v = em.let(f"{seg.value} * {seg.bcast(inv)}", "v")
        elif quant.combine == "div":
            v = em.let(em.div(seg.value, f"({seg.bcast(operand)} + tl.zeros_like({seg.value}))", per_element=True),
                       "v")
        else:
            v = em.let(f"{seg.value} * {seg.bcast(operand)}", "v")
        v = fp8_value(em, v, quant)
        if chain.quant_out:
            em.line(f"tl.store({p}q_ptr + row * {chain.heads * chain.head_dim} + {seg.col}, "
                    f"{v}.to({_TL_DTYPE[quant.fp8_dtype]}), mask={seg.mask})")
        emit_fields(em, chain, p, "q", v, seg.col, seg.mask)


def _emit_group_quant(em: _Emitter, chain: HeadChain, segments: list[_Segment], p: str) -> None:
    """FP8 quant in groups of g values, G = head_dim / g groups per head: each element's group is its
    dim within the head // g, whatever segment (rotated or not) holds it; amax, the scale programs and
    the operand per (head, group); scales stored [token, head, group]."""
    quant = chain.quant
    g = quant.group_size
    n = chain.head_dim // g
    em.line(f"# fp8 quant, {n} groups of {g} values per head")
    gids = [em.let(f"({seg.col} - {seg.head} * {p}HD) // {g}", "gid") for seg in segments]
    amaxes = []
    for k in range(n):
        maxes = []
        for seg, gid in zip(segments, gids):
            a = em.let(f"tl.where({seg.mask} & ({gid} == {k}), tl.abs({seg.value}), 0.0)", "a")
            maxes.append(em.let(f"tl.max(tl.max({a}, axis=2), axis=1)" if seg.rank == 3 else f"tl.max({a}, axis=1)",
                                "amax"))
        amax = maxes[0]
        for m in maxes[1:]:
            amax = em.let(f"tl.maximum({amax}, {m})", "amax")  # [BLOCK_H]
        amaxes.append(amax)
    em.line(f"{p}hq = tl.arange(0, {p}BLOCK_H)")
    for i, prog in enumerate(quant.scales):
        for k, amax in enumerate(amaxes):
            sc = amax
            for op in prog:
                sc = em.unary(sc, op)
            elem = f"{p}hq * {n} + {k}"
            if chain.quant_out:
                em.line(f"tl.store({p}s{i}_ptr + row * {p}H * {n} + {elem}, {sc}.to({_TL_DTYPE[prog[-1].dtype]}), "
                        f"mask={p}hq < {p}H)")
            emit_fields(em, chain, p, f"scale{i}", sc, f"({elem})", f"{p}hq < {p}H")
    operands = []
    for amax in amaxes:
        operand = amax
        for op in quant.operand:
            operand = em.unary(operand, op)
        if quant.combine == "div" and _power_of_two(quant.operand):  # exact: multiply by 2^-k
            operand = em.let(em.div(f"(1.0 + tl.zeros_like({operand}))", operand), "inv")
        operands.append(operand)
    exact_inverse = quant.combine == "div" and _power_of_two(quant.operand)
    for seg, gid in zip(segments, gids):
        per = seg.bcast(operands[-1])
        for k in range(n - 2, -1, -1):
            per = f"tl.where({gid} == {k}, {seg.bcast(operands[k])}, {per})"
        per = em.let(f"{per} + tl.zeros_like({seg.value})", "opd")
        if exact_inverse or quant.combine == "mul":
            v = em.let(f"{seg.value} * {per}", "v")
        else:
            v = em.let(em.div(seg.value, per, per_element=True), "v")
        v = fp8_value(em, v, quant)
        if chain.quant_out:
            em.line(f"tl.store({p}q_ptr + row * {chain.heads * chain.head_dim} + {seg.col}, "
                    f"{v}.to({_TL_DTYPE[quant.fp8_dtype]}), mask={seg.mask})")
        emit_fields(em, chain, p, "q", v, seg.col, seg.mask)


def emit_fields(em: _Emitter, chain: HeadChain, p: str, value: str, v: str, elem: str, mask: str) -> None:
    """Store `v` (element indices `elem` of the token's value, heads-major) into each byte field of
    the chain that holds `value`: the field's address is computed in bytes and the pointer cast to
    the field's dtype, so a fp32 scale lands as its four little-endian bytes."""
    for f in chain.fields:
        if f.value != value:
            continue
        em.line(f"# {value} -> bytes [{f.offset}, +{f.size}·n) of each slot's row in field cache {f.cache}"
                + (f", pages of {f.block} slots" if f.block else ""))
        slot = em.let(f"tl.zeros_like({elem}).to(tl.int64) + {p}fslot", "fs")
        slot = em.let(f"tl.where({slot} < 0, {slot} + {f.n_slots}, {slot})", "fs")  # eager indexing wraps negatives
        base = (f"({slot} // {f.block}) * {f.page_stride} + ({slot} % {f.block}) * {f.row_stride}" if f.block
                else f"{slot} * {f.row_stride}")
        addr = em.let(f"{base} + {f.offset} + {elem} * {f.size}", "fa")
        stored = v if value == "q" else em.round_to(v, f.dtype)  # q: fp8 values already
        em.line(f"tl.store((fc{f.cache}_ptr + {addr}).to(tl.pointer_type({_TL_DTYPE[f.dtype]})), "
                f"{stored}.to({_TL_DTYPE[f.dtype]}), mask=({mask}) & ({slot} >= 0) & ({slot} < {f.n_slots}))")
