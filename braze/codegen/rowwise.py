"""RowChain -> Triton source: one program per row, every stage fused, no intermediates in memory.

Bytes moved per row of D values (bf16 activations, fp8 out, G scale groups):
read x (2D) [+ residual 2D] [+ weight 2D, cached across rows], write
[h 2D] [norm out 2D] q (D) + scales (4G). Every intermediate lives in
registers. A row is held as a [BLOCK_G, BLOCK_GS] tile (groups x group
elements) so per-group reductions are one `tl.max` along axis 1.

Numerics follow the graph: each value is computed in fp32 and rounded to the
dtype the graph gives it, with explicit round-to-nearest-even helpers. They are
bit operations, so the same source is exact on the GPU and under the Triton
interpreter (whose own bf16/fp8 conversions truncate).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from braze.patterns.stages import (
    Cast,
    FP8Quant,
    RMSNorm,
    RowChain,
    UnaryOp,
    WeightMul,
)

_TL_DTYPE = {
    "float32": "tl.float32",
    "bfloat16": "tl.bfloat16",
    "float16": "tl.float16",
    "float8_e4m3fn": "tl.float8e4nv",
    "uint8": "tl.uint8",  # bytes copied through (packed cache rows): integral values, exact in fp32
    "int8": "tl.int8",
}


@dataclass(frozen=True)
class KernelSource:
    name: str
    source: str
    block_g: int
    block_gs: int
    num_warps: int


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class _Emitter:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.count = 0
        self.indent = 1

    def fresh(self, stem: str = "t") -> str:
        self.count += 1
        return f"{stem}{self.count}"

    def line(self, text: str) -> None:
        self.lines.append("    " * self.indent + text)

    def let(self, expr: str, stem: str = "t") -> str:
        name = self.fresh(stem)
        self.line(f"{name} = {expr}")
        return name

    def div(self, a: str, b: str, per_element: bool = False) -> str:
        """a / b. Scalars and per-group values divide with IEEE rounding, as eager
        PyTorch does; per-element divides use it only when DIV_RN (it costs ~2x the
        kernel time on H100/H200), else the fast divide that Inductor also emits."""
        if per_element:
            return f"(tl.math.div_rn({a}, {b}) if DIV_RN else {a} / {b})"
        return f"tl.math.div_rn({a}, {b})"

    def round_to(self, v: str, dtype: str) -> str:
        """fp32 value rounded (RNE) to `dtype`, still held in fp32.

        SOFT_ROUND selects bit-exact rounding written out in integer ops (for the
        interpreter, whose conversions truncate); otherwise the hardware converts.
        """
        if dtype in ("float32", "uint8", "int8"):  # integers pass through exactly: nothing to round
            return v
        out = self.fresh({"bfloat16": "bf", "float16": "hf", "float8_e4m3fn": "f8"}[dtype])
        self.line("if SOFT_ROUND:")
        self.indent += 1
        if dtype == "bfloat16":
            b = self.let(f"{v}.to(tl.uint32, bitcast=True)", "bits")
            r = self.let(f"((({b} + 0x7FFF + (({b} >> 16) & 1)) & 0xFFFF0000)).to(tl.float32, bitcast=True)", "r")
            self.line(f"{out} = tl.where({v} != {v}, {v}, {r})")
        elif dtype == "float16":
            self._round_ulp(v, out, mant=10, emin=-14, max_finite=65504.0)
        elif dtype == "float8_e4m3fn":
            # the graph clamps to +-448 before the cast; out-of-range values are not saturated here
            self._round_ulp(v, out, mant=3, emin=-6, max_finite=None)
        else:
            raise AssertionError(dtype)
        self.indent -= 1
        self.line("else:")
        self.indent += 1
        self.line(f"{out} = {v}.to({_TL_DTYPE[dtype]}).to(tl.float32)")
        self.indent -= 1
        return out

    def _round_ulp(self, v: str, out: str, mant: int, emin: int, max_finite: float | None) -> None:
        # ulp of v in the target format (a power of two, so scaling by it is exact);
        # adding 1.5 * 2^23 to v / ulp rounds it to an integer, ties to even.
        b = self.let(f"{v}.to(tl.int32, bitcast=True)", "bits")
        e = self.let(f"tl.maximum((({b} >> 23) & 0xFF) - 127, {emin}) - {mant}", "e")
        ulp = self.let(f"(({e} + 127) << 23).to(tl.float32, bitcast=True)", "ulp")
        inv = self.let(f"((127 - {e}) << 23).to(tl.float32, bitcast=True)", "inv_ulp")
        r = self.let(f"((({v} * {inv}) + 12582912.0) - 12582912.0) * {ulp}", "r")
        r = self.let(f"({r}.to(tl.int32, bitcast=True) | ({b} & -2147483648)).to(tl.float32, bitcast=True)", "r")
        if max_finite is not None:
            r = self.let(f"tl.where(tl.abs({r}) > {max_finite!r}, {v} * float('inf'), {r})", "r")
        self.line(f"{out} = tl.where((tl.abs({v}) == float('inf')) | ({v} != {v}), {v}, {r})")

    def unary(self, v: str, op: UnaryOp) -> str:
        c = repr(op.const) if op.const is not None else None
        expr = {
            "cast": v,
            "mul": f"{v} * {c}",
            "div": self.div(v, c),
            "rdiv": self.div(f"({c} + tl.zeros_like({v}))", v),
            "add": f"{v} + {c}",
            "clamp_min": f"tl.maximum({v}, {c}, propagate_nan=tl.PropagateNan.ALL)",
            "clamp_max": f"tl.minimum({v}, {c}, propagate_nan=tl.PropagateNan.ALL)",
            "reciprocal": self.div(f"(1.0 + tl.zeros_like({v}))", v),
            "log2": f"tl.math.log2({v})",
            "ceil": f"tl.math.ceil({v})",
            "exp2": f"tl.math.exp2({v})",
        }[op.op]
        return self.round_to(self.let(expr), op.dtype)


def _fmt_float(x: float) -> str:
    if x != x:
        return "float('nan')"
    if x in (float("inf"), float("-inf")):
        return f"float('{x}')"
    return repr(float(x))


def generate(chain: RowChain) -> KernelSource:
    """Triton source for `chain`, specialized on its sizes and dtypes."""
    signature = chain.to_json()
    digest = hashlib.sha256(signature.encode()).hexdigest()[:12]
    name = f"braze_{chain.name}_{digest}"
    block_g, block_gs, num_warps = tile(chain)
    params = ["x_ptr", "x_row_stride"] + stage_params(chain) + ROW_CONSTEXPRS
    em = _Emitter()
    emit_row_tile(em)
    em.line("x = tl.load(x_ptr + row * x_row_stride + col, mask=mask, other=0.0).to(tl.float32)")
    emit_stages(em, chain, "x")
    source = kernel_source("braze.codegen.rowwise", "chain", signature, name, params, em.lines)
    return KernelSource(name, source, block_g, block_gs, num_warps)


# Constexpr parameters every row kernel takes, after its pointers.
ROW_CONSTEXPRS = ["n_rows", "D: tl.constexpr", "G: tl.constexpr", "GS: tl.constexpr", "BLOCK_G: tl.constexpr",
                  "BLOCK_GS: tl.constexpr", "SOFT_ROUND: tl.constexpr", "DIV_RN: tl.constexpr"]


def tile(chain: RowChain) -> tuple[int, int, int]:
    """(BLOCK_G, BLOCK_GS, num_warps) of the [groups, group elements] tile that holds one row."""
    G = chain.n_groups
    block_g, block_gs = _next_pow2(G), _next_pow2(chain.width // G)
    elems = block_g * block_gs
    num_warps = 1 if elems <= 256 else 2 if elems <= 1024 else 4 if elems <= 4096 else 8 if elems <= 16384 else 16
    return block_g, block_gs, num_warps


def stage_params(chain: RowChain) -> list[str]:
    """The pointer parameters of the stages after x: residual, weight, then every output."""
    params = []
    if chain.residual:
        params += ["r_ptr", "r_row_stride"]
    if chain.norm.has_weight:
        params.append("w_ptr")
    if chain.gate is not None:
        params += ["z_ptr", "z_row_stride", "z_head_stride", "z_heads"]
    return params + [f"{o[0]}_ptr" for o in chain.output_specs()]


def emit_row_tile(em: _Emitter) -> None:
    """`row`, and `col`/`mask` of the row held as a [BLOCK_G, BLOCK_GS] tile."""
    em.line("row = tl.program_id(0).to(tl.int64)")
    em.line("g = tl.arange(0, BLOCK_G)[:, None]")
    em.line("e = tl.arange(0, BLOCK_GS)[None, :]")
    em.line("col = g * GS + e  # [BLOCK_G, BLOCK_GS]: element (group, i) of the row")
    em.line("mask = (g < G) & (e < GS)")


def emit_stages(em: _Emitter, chain: RowChain, x: str, preloaded: bool = False) -> None:
    """Every stage of `chain` on the fp32 row tile `x`: residual add, norm, quant, and their stores.
    `preloaded`: the caller has loaded the residual row into `r` and the weight into `w` (fp32) already."""
    h = x
    if chain.residual:
        em.line("# residual add: h = x + r, the new residual")
        if not preloaded:
            em.line("r = tl.load(r_ptr + row * r_row_stride + col, mask=mask, other=0.0).to(tl.float32)")
        h = em.round_to(em.let(f"{x} + r", "h"), chain.residual.dtype)
        if chain.residual.store:
            em.line(f"tl.store(residual_out_ptr + row * D + col, {h}.to({_TL_DTYPE[chain.residual.dtype]}), mask=mask)")
    y = emit_rmsnorm(em, chain.norm, h, w_loaded="w" if preloaded else None)
    if chain.gate is not None:
        y = _emit_gate(em, chain.gate, y)
    if chain.norm.store:
        em.line(f"tl.store(norm_out_ptr + row * D + col, {y}.to({_TL_DTYPE[chain.y_dtype]}), mask=mask)")
    if chain.quant:
        _emit_quant(em, chain.quant, y)


def kernel_source(module: str, what: str, signature: str, name: str, params: list[str], body: list[str],
                  imports: tuple[str, ...] = ()) -> str:
    """A generated kernel's file: the spec it was generated from, then the @triton.jit function."""
    header = [f'"""Generated by {module} for the {what}:', signature, '"""', "import triton",
              "import triton.language as tl", *imports, "", "", "@triton.jit", f"def {name}(", *[f"    {p}," for p in params], "):"]
    return "\n".join(header + body) + "\n"


def emit_mean_square(em: _Emitter, norm: RMSNorm, x: str) -> str:
    """mean(x^2) over the row tile `x`, rounded as the graph rounds it."""
    sq = em.round_to(em.let(f"{x} * {x}", "sq"), norm.square)
    total = em.let(f"tl.sum(tl.sum({sq}, axis=1), axis=0)", "ssum")
    return em.round_to(em.let(em.div(total, repr(float(norm.width))), "mean"), norm.mean)


def emit_rmsnorm(em: _Emitter, norm: RMSNorm, x: str, mean: str | None = None, w_ptr: str = "w_ptr",
                 w_loaded: str | None = None) -> str:
    """The norm of row tile `x`; `mean` when the variance was computed elsewhere (reduced across ranks);
    `w_loaded` when the weight is already loaded (fp32) under that name."""
    em.line(f"# rmsnorm over {norm.width} values, eps={norm.eps!r}")
    if mean is None:
        mean = emit_mean_square(em, norm, x)
    var = em.round_to(em.let(f"{mean} + {_fmt_float(norm.eps)}", "var"), norm.rstd)
    if norm.inverse == "rsqrt":
        rstd = em.round_to(em.let(f"tl.math.rsqrt({var})", "rstd"), norm.rstd)
        y = em.round_to(em.let(f"{x} * {rstd}", "y"), norm.normed)
    elif norm.inverse == "recip_sqrt":
        rms = em.round_to(em.let(f"tl.sqrt_rn({var})", "rms"), norm.rstd)
        rstd = em.round_to(em.let(em.div(f"(1.0 + tl.zeros_like({rms}))", rms), "rstd"), norm.rstd)
        y = em.round_to(em.let(f"{x} * {rstd}", "y"), norm.normed)
    else:
        rms = em.round_to(em.let(f"tl.sqrt_rn({var})", "rms"), norm.rstd)
        y = em.round_to(em.let(em.div(x, f"({rms} + tl.zeros_like({x}))", per_element=True), "y"), norm.normed)
    for op in norm.epilogue:
        if isinstance(op, Cast):
            y = em.round_to(y, op.dtype)
        elif isinstance(op, WeightMul):
            w = w_loaded or em.let(f"tl.load({w_ptr} + col, mask=mask, other=0.0).to(tl.float32)", "w")
            if op.zero_centered:
                w = em.round_to(em.let(f"1.0 + {w}", "w"), op.offset_dtype or "float32")
            y = em.round_to(em.let(f"{y} * {w}", "y"), op.dtype)
    return y


def _emit_gate(em: _Emitter, gate, y: str) -> str:
    """y · silu(z) with z's row of this program, rounded as the graph rounds it."""
    em.line("# gate: y * silu(z)")
    # z's row `row` is head row % z_heads of token row // z_heads: z [T, H, width] is read where it lies
    # (e.g. inside the input projection), no copy into rows first
    em.line("z_row = (row // z_heads) * z_row_stride + (row % z_heads) * z_head_stride")
    z = em.let("tl.load(z_ptr + z_row + col, mask=mask, other=0.0).to(tl.float32)", "z")
    s = em.round_to(em.let(em.div(z, f"(1.0 + tl.exp(-{z}))", per_element=True), "silu"), gate.act)
    return em.round_to(em.round_to(em.let(f"{y} * {s}", "y"), gate.dtype), gate.out)


def _emit_quant(em: _Emitter, quant: FP8Quant, y: str) -> None:
    em.line(f"# fp8 quant, {quant.group_size} values per scale")
    amax = em.let(f"tl.max(tl.abs({y}), axis=1)[:, None]  # [BLOCK_G, 1]", "amax")
    for i, prog in enumerate(quant.scales):
        s = amax
        for op in prog:
            s = em.unary(s, op)
        em.line(f"tl.store(scale{i}_ptr + row * G + g, {s}.to({_TL_DTYPE[prog[-1].dtype]}), mask=g < G)")
    operand = amax
    for op in quant.operand:
        operand = em.unary(operand, op)
    if quant.combine == "div" and _power_of_two(quant.operand):
        # dividing by 2^k is multiplying by 2^-k exactly: one divide per group, not per value
        inv = em.let(em.div(f"(1.0 + tl.zeros_like({operand}))", operand), "inv")
        v = em.let(f"{y} * {inv}", "v")
    elif quant.combine == "div":
        v = em.let(em.div(y, f"({operand} + tl.zeros_like({y}))", per_element=True), "v")
    else:
        v = em.let(f"{y} * {operand}", "v")
    v = fp8_value(em, v, quant)
    em.line(f"tl.store(q_ptr + row * D + col, {v}.to({_TL_DTYPE[quant.fp8_dtype]}), mask=mask)")


def fp8_value(em: _Emitter, v: str, quant: FP8Quant) -> str:
    """A scaled value as the graph casts it to fp8: rounded to the scaling dtype, clamped, rounded to fp8."""
    v = em.round_to(v, quant.value_dtype)
    if quant.clamp is not None:
        lo, hi = quant.clamp
        v = em.let(f"tl.minimum(tl.maximum({v}, {_fmt_float(lo)}, propagate_nan=tl.PropagateNan.ALL), "
                   f"{_fmt_float(hi)}, propagate_nan=tl.PropagateNan.ALL)", "v")
    return em.round_to(v, quant.fp8_dtype)


def _power_of_two(prog: tuple[UnaryOp, ...]) -> bool:
    """Whether a scale program always yields a power of two (ends in exp2 of an integer)."""
    ops = [op for op in prog if op.op != "cast" or op.dtype == "float32"]
    return len(ops) >= 2 and ops[-1].op == "exp2" and ops[-2].op == "ceil" and all(
        op.dtype == "float32" for op in prog[prog.index(ops[-2]):])
