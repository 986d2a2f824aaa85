"""HeadChain -> Triton source: per token, norm -> RoPE -> output and/or in-place cache write.

One program per token. A token's heads are held as segments (CHAIN_DESIGN.md): with
RoPE, the rotated dims as a [BLOCK_H, BLOCK_R2, 2] tile laid out so that `tl.split`
yields the two lanes of each rotation pair (NeoX: i and i + r/2; GPT-J: 2i and 2i+1),
plus the untouched dims as [BLOCK_H, BLOCK_P]; without RoPE one [BLOCK_H, BLOCK_D] tile.
Bytes per token: read x (H·hd) + weight (cached) + two cos/sin rows, write the result
and/or one cache row; nothing in between touches memory.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from braze.patterns.stages import Cast, HeadChain, WeightMul

from .rowwise import _TL_DTYPE, _Emitter, _fmt_float, _next_pow2


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


def generate(chain: HeadChain) -> HeadKernelSource:
    signature = chain.to_json()
    digest = hashlib.sha256(signature.encode()).hexdigest()[:12]
    name = f"braze_heads_{chain.name}_{digest}"
    H, HD = chain.heads, chain.head_dim
    rope = chain.rope
    const = {"H": H, "HD": HD, "BLOCK_H": _next_pow2(H)}

    params = ["x_ptr", "x_row_stride"]
    if chain.norm is not None and chain.norm.has_weight:
        params.append("w_ptr")
    if rope is not None:
        params += ["cos_ptr", "sin_ptr", "cos_row_stride", "sin_row_stride"]
        if chain.gather:
            params.append("pos_ptr")
    if chain.write is not None:
        params += ["slots_ptr", "cache_ptr", "n_slots"]
    if chain.out:
        params.append("out_ptr")
    params += ["n_rows"]

    em = _Emitter()
    em.line("row = tl.program_id(0).to(tl.int64)")
    segments: list[_Segment] = []
    if rope is not None:
        r2 = rope.rotary_dim // 2
        const.update(R2=r2, BLOCK_R2=_next_pow2(r2), OFF=rope.offset, P=HD - rope.rotary_dim,
                     BLOCK_P=_next_pow2(max(1, HD - rope.rotary_dim)))
        em.line("h3 = tl.arange(0, BLOCK_H)[:, None, None]")
        em.line("i3 = tl.arange(0, BLOCK_R2)[None, :, None]")
        em.line("j3 = tl.arange(0, 2)[None, None, :]")
        lane = "j3 * R2 + i3" if rope.style == "neox" else "2 * i3 + j3"
        em.line(f"col_rot = h3 * HD + OFF + {lane}  # {rope.style} pairs on dims [{rope.offset}, "
                f"{rope.offset + rope.rotary_dim}) of each head")
        em.line("mask_rot = (h3 < H) & (i3 < R2) & (j3 < 2)")
        segments.append(_Segment("col_rot", "mask_rot", "h3", 3))
        if HD > rope.rotary_dim:
            start = "R2 * 2" if rope.offset == 0 else "0"
            em.line("h2 = tl.arange(0, BLOCK_H)[:, None]")
            em.line("p2 = tl.arange(0, BLOCK_P)[None, :]")
            em.line(f"col_pass = h2 * HD + {start} + p2  # the dims RoPE leaves alone")
            em.line("mask_pass = (h2 < H) & (p2 < P)")
            segments.append(_Segment("col_pass", "mask_pass", "h2", 2))
    else:
        const.update(BLOCK_D=_next_pow2(HD))
        em.line("h2 = tl.arange(0, BLOCK_H)[:, None]")
        em.line("d2 = tl.arange(0, BLOCK_D)[None, :]")
        em.line("col = h2 * HD + d2")
        em.line("mask = (h2 < H) & (d2 < HD)")
        segments.append(_Segment("col", "mask", "h2", 2))
    for k, seg in enumerate(segments):
        seg.value = em.let(f"tl.load(x_ptr + row * x_row_stride + {seg.col}, mask={seg.mask}, other=0.0)"
                           f".to(tl.float32)", f"x{k}_")
    if chain.norm is not None:
        _emit_norm(em, chain, segments)
    if rope is not None:
        _emit_rope(em, chain, segments)
    out_dtype = chain.out_dtype
    for seg in segments:
        seg.value = em.round_to(seg.value, out_dtype)
        if chain.out:
            em.line(f"tl.store(out_ptr + row * (H * HD) + {seg.col}, {seg.value}.to({_TL_DTYPE[out_dtype]}), "
                    f"mask={seg.mask})")
    if chain.write is not None:
        em.line("slot = tl.load(slots_ptr + row).to(tl.int64)")
        em.line("slot = tl.where(slot < 0, slot + n_slots, slot)  # eager indexing wraps negatives")
        em.line("in_range = (slot >= 0) & (slot < n_slots)")
        for seg in segments:
            v = em.round_to(seg.value, chain.write.dtype)
            em.line(f"tl.store(cache_ptr + slot * (H * HD) + {seg.col}, {v}.to({_TL_DTYPE[chain.write.dtype]}), "
                    f"mask={seg.mask} & in_range)")

    consts = [f"{k}: tl.constexpr" for k in const] + ["SOFT_ROUND: tl.constexpr", "DIV_RN: tl.constexpr"]
    header = [
        '"""Generated by braze.codegen.heads for the chain:',
        signature,
        '"""',
        "import triton",
        "import triton.language as tl",
        "",
        "",
        "@triton.jit",
        f"def {name}(",
        *[f"    {p}," for p in params + consts],
        "):",
    ]
    elems = const["BLOCK_H"] * _next_pow2(HD)
    num_warps = 1 if elems <= 256 else 2 if elems <= 1024 else 4 if elems <= 4096 else 8
    return HeadKernelSource(name, "\n".join(header + em.lines) + "\n", const, num_warps)


def _emit_norm(em: _Emitter, chain: HeadChain, segments: list[_Segment]) -> None:
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
    if norm.inverse == "rsqrt":
        inv = em.round_to(em.let(f"tl.math.rsqrt({var})", "rstd"), norm.rstd)
    else:
        rms = em.round_to(em.let(f"tl.sqrt_rn({var})", "rms"), norm.rstd)
        inv = em.round_to(em.let(em.div(f"(1.0 + tl.zeros_like({rms}))", rms), "rstd"), norm.rstd)
    for seg in segments:
        factor = seg.bcast(inv) if per_head else inv
        if norm.inverse == "div_sqrt":
            rms_b = seg.bcast(rms) if per_head else rms
            y = em.let(em.div(seg.value, f"({rms_b} + tl.zeros_like({seg.value}))", per_element=True), "y")
        else:
            y = em.let(f"{seg.value} * {factor}", "y")
        y = em.round_to(y, norm.normed)
        for op in norm.epilogue:
            if isinstance(op, Cast):
                y = em.round_to(y, op.dtype)
            elif isinstance(op, WeightMul):
                index = f"({seg.col} - {seg.head} * HD)" if norm.width == chain.head_dim else seg.col
                w = em.let(f"tl.load(w_ptr + {index}, mask={seg.mask}, other=0.0).to(tl.float32)", "w")
                if op.zero_centered:
                    w = em.round_to(em.let(f"1.0 + {w}", "w"), op.offset_dtype or "float32")
                y = em.round_to(em.let(f"{y} * {w}", "y"), op.dtype)
        seg.value = y


def _emit_rope(em: _Emitter, chain: HeadChain, segments: list[_Segment]) -> None:
    rope = chain.rope
    rot = segments[0]
    em.line(f"# rope ({rope.style}) on {rope.rotary_dim} of {rope.head_dim} dims")
    em.line("trow = tl.load(pos_ptr + row).to(tl.int64)" if chain.gather else "trow = row")
    em.line("i2 = tl.arange(0, BLOCK_R2)[None, :]")
    em.line("mask_i = i2 < R2")
    x1, x2 = em.fresh("x1_"), em.fresh("x2_")
    em.line(f"{x1}, {x2} = tl.split({rot.value})  # [BLOCK_H, BLOCK_R2] each")

    def table(ptr: str, stride: str, shift: str = "") -> str:
        return em.let(f"tl.load({ptr} + trow * {stride} + i2{shift}, mask=mask_i, other=0.0).to(tl.float32)", "tb")

    def prod(a: str, b: str) -> str:
        return em.round_to(em.let(f"{a} * {b}", "m"), rope.mul)

    if rope.table == rope.rotary_dim:  # rotate-half with full-width tables
        c1, s1 = table("cos_ptr", "cos_row_stride"), table("sin_ptr", "sin_row_stride")
        c2, s2 = table("cos_ptr", "cos_row_stride", " + R2"), table("sin_ptr", "sin_row_stride", " + R2")
        y1 = em.let(f"{prod(x1, c1)} + {prod(f'(-{x2})', s1)}", "y1_")
        y2 = em.let(f"{prod(x2, c2)} + {prod(x1, s2)}", "y2_")
    else:
        c, s = table("cos_ptr", "cos_row_stride"), table("sin_ptr", "sin_row_stride")
        y1 = em.let(f"{prod(x1, c)} - {prod(x2, s)}", "y1_")
        y2 = em.let(f"{prod(x2, c)} + {prod(x1, s)}", "y2_")
    y1, y2 = em.round_to(y1, rope.out), em.round_to(y2, rope.out)
    rot.value = em.let(f"tl.join({y1}, {y2})  # [BLOCK_H, BLOCK_R2, 2]", "rot")
