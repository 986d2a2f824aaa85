"""Stage descriptions: what a recognizer finds and what codegen turns into Triton.

A stage is a frozen, hashable, JSON-serializable description of one per-row step
of a fused chain (residual add, RMSNorm, FP8 quant, ...). It carries every
parameter that changes the numerics, including the dtype each intermediate is
rounded to in the original graph, so the generated kernel reproduces eager
rounding step for step. Stages know nothing about FX or Triton.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Union

import torch

# Dtypes a stage may name, by their torch name (JSON-friendly).
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
FP8_DTYPES = ("float8_e4m3fn",)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def round_to(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """t rounded to `dtype` and held in fp32 again: how the references mirror the graph's rounding."""
    return t.to(getattr(torch, dtype)).float()


class _JsonSpec:
    """JSON round trip for the specs that travel as a custom op's string argument."""

    def to_json(self) -> str:
        return json.dumps(_encode(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str):
        spec = _decode(json.loads(text))
        assert isinstance(spec, cls), type(spec)
        return spec


class FlatJsonSpec:
    """JSON round trip for a flat frozen dataclass of plain values (the specs of braze's non-chain ops)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        return cls(**json.loads(text))


# Unary ops a scale program may apply, each followed by rounding to `dtype`.
# `const` is the scalar operand where the op has one.
UNARY_OPS = (
    "cast",  # x
    "mul",  # x * c
    "div",  # x / c
    "rdiv",  # c / x
    "add",  # x + c
    "clamp_min",  # max(x, c)
    "clamp_max",  # min(x, c)
    "reciprocal",  # 1 / x
    "log2",
    "ceil",
    "exp2",  # 2 ** x
)


@dataclass(frozen=True)
class UnaryOp:
    op: str
    dtype: str
    const: float | None = None

    def __post_init__(self) -> None:
        assert self.op in UNARY_OPS, self.op
        assert self.dtype in FLOAT_DTYPES, self.dtype


@dataclass(frozen=True)
class ResidualAdd:
    """h = x + r, rounded to `dtype`; `store` when h is also the new residual."""

    dtype: str
    store: bool
    kind: str = field(default="residual_add", init=False)


@dataclass(frozen=True)
class WeightMul:
    """y = y * w (or y * (1 + w) when zero_centered), result rounded to `dtype`.

    `weight_dtype` is the dtype of the stored weight; `offset_dtype` the dtype
    `1 + w` is rounded to before the multiply (zero-centered only).
    """

    dtype: str
    weight_dtype: str
    zero_centered: bool = False
    offset_dtype: str | None = None


@dataclass(frozen=True)
class Cast:
    dtype: str


EpilogueOp = Union[WeightMul, Cast]


@dataclass(frozen=True)
class RMSNorm:
    """y = x * rsqrt(mean(x^2) + eps), then the epilogue ops in order.

    The dtypes record what the graph rounds each intermediate to: `square`
    for x^2, `mean` for the mean, `rstd` for rsqrt(mean + eps) (the add is
    rounded to `rstd` as well), `normed` for x * rstd; `inverse` how the graph
    spells the inverse RMS. `store` when the norm
    output has users besides the next stage.
    """

    eps: float
    width: int
    square: str
    mean: str
    rstd: str
    normed: str
    epilogue: tuple[EpilogueOp, ...]
    store: bool
    inverse: str = "rsqrt"  # x * rsqrt(v) | "div_sqrt": x / sqrt(v) | "recip_sqrt": x * (1 / sqrt(v))
    kind: str = field(default="rmsnorm", init=False)

    @property
    def out_dtype(self) -> str:
        return self.epilogue[-1].dtype if self.epilogue else self.normed

    @property
    def has_weight(self) -> bool:
        return any(isinstance(op, WeightMul) for op in self.epilogue)

    @property
    def weight_dtype(self) -> str | None:
        for op in self.epilogue:
            if isinstance(op, WeightMul):
                return op.weight_dtype
        return None


@dataclass(frozen=True)
class FP8Quant:
    """Dynamic FP8 quant of each group of `group_size` values of a row.

    amax = max|y| over the group (exact in any dtype). Each scale output and
    the operand are unary programs of amax. The value is cast to
    `value_dtype`, combined with the operand (`div` or `mul`, rounded to
    `value_dtype`), clamped to [clamp_lo, clamp_hi] if given, and cast to fp8.
    """

    group_size: int
    fp8_dtype: str
    value_dtype: str
    combine: str
    operand: tuple[UnaryOp, ...]
    clamp: tuple[float, float] | None
    scales: tuple[tuple[UnaryOp, ...], ...]
    kind: str = field(default="fp8_quant", init=False)

    def __post_init__(self) -> None:
        assert self.combine in ("div", "mul"), self.combine
        assert self.fp8_dtype in FP8_DTYPES, self.fp8_dtype


Stage = Union[ResidualAdd, RMSNorm, FP8Quant]


@dataclass(frozen=True)
class RowChain(_JsonSpec):
    """A fused chain over rows of `width` values: the unit codegen compiles.

    Inputs, in order: x, the residual (if `residual`), the weight (if the norm
    has one), z (if `gate`). Outputs, in order: h (if residual.store), the (gated)
    norm output (if norm.store), q and each scale (if quant). Every output is contiguous with
    the leading (row) dims of x.
    """

    in_dtype: str
    residual: ResidualAdd | None
    norm: RMSNorm
    quant: FP8Quant | None
    gate: Any = None  # braze.patterns.gated_norm.Gate: the norm output times silu(z), before the quant

    @property
    def width(self) -> int:
        return self.norm.width

    @property
    def y_dtype(self) -> str:
        """The dtype of the (gated) norm output."""
        return self.gate.out if self.gate is not None else self.norm.out_dtype

    @property
    def n_groups(self) -> int:
        return self.width // self.quant.group_size if self.quant else 1

    @property
    def name(self) -> str:
        parts = (["add"] if self.residual else []) + ["rmsnorm"] + (["gate"] if self.gate else []) + (
            ["fp8_quant"] if self.quant else [])
        return "_".join(parts)

    def input_names(self) -> list[str]:
        names = ["x"]
        if self.residual:
            names.append("residual")
        if self.norm.has_weight:
            names.append("weight")
        if self.gate is not None:
            names.append("gate")
        return names

    def output_specs(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, trailing shape) of each output, in order."""
        out: list[tuple[str, str, tuple[int, ...]]] = []
        if self.residual and self.residual.store:
            out.append(("residual_out", self.residual.dtype, (self.width,)))
        if self.norm.store:
            out.append(("norm_out", self.y_dtype, (self.width,)))
        if self.quant:
            out.append(("q", self.quant.fp8_dtype, (self.width,)))
            for i, prog in enumerate(self.quant.scales):
                out.append((f"scale{i}", prog[-1].dtype if prog else "float32", (self.n_groups,)))
        return out


@dataclass(frozen=True)
class CacheWrite:
    """Write the chain's result rows in place into a cache.

    layout "rows": the cache viewed as [slots, heads, head_dim], token t's row at slots[t].
    layout "bhsd": a [batch, heads, seq, head_dim] cache (any strides; Hugging Face's static
    cache), token t being sequence t's one new token, written at [t, :, slots[t or 0], :].
    `dtype` is the cache's dtype; the rows are rounded to it (the graph's index_put does).
    """

    dtype: str
    layout: str = "rows"
    kind: str = field(default="cache_write", init=False)


@dataclass(frozen=True)
class FieldWrite:
    """The bytes of one of a chain's values written in place into a byte (uint8) cache.

    `value`: "result" (the chain's result, [heads, head_dim]), "q" (the fp8 values) or "scaleN"
    (scale program N's values, one per head). Element e of token t (heads-major order) lands at byte
        (slot // block) * page_stride + (slot % block) * row_stride + offset + e * size(dtype)
    of field cache `cache`, slot = slots[t] wrapped at `n_slots` when negative (as eager indexing);
    `block` 0: no pages, slot * row_stride + offset + e * size. DeepSeek's packed MLA row (fp8
    values at 0, fp32 scales at 512, bf16 rope at 528 of a 656-byte row) is three fields; its paged
    index cache (a page of `block` fp8 key rows, then `block` fp32 scales) is two.
    """

    value: str
    cache: int
    dtype: str
    offset: int
    row_stride: int
    n_slots: int
    block: int = 0
    page_stride: int = 0
    kind: str = field(default="field_write", init=False)

    def __post_init__(self) -> None:
        assert self.value in ("result", "q") or self.value.startswith("scale"), self.value
        assert self.dtype in FLOAT_DTYPES + FP8_DTYPES, self.dtype
        size = torch.empty((), dtype=to_dtype(self.dtype)).element_size()
        assert self.offset % size == 0 and self.row_stride % size == 0 and self.page_stride % size == 0, \
            "fields are aligned to their element size"

    @property
    def size(self) -> int:
        return torch.empty((), dtype=to_dtype(self.dtype)).element_size()


@dataclass(frozen=True)
class ScaleProduct:
    """A per-(token, head) tensor w [T, heads] times the chain's quant scale program `scale`:
        out = post(round(pre(w) * s, dtype))
    (DeepSeek's indexer head weights `w * q_scale`, with the constants the model multiplies in
    folded into `pre` / `post`). The product is the chain's output in place of that scale.
    `pre` starts with a cast to w's own dtype (so it is never empty); each op rounds to its dtype.
    """

    scale: int
    w_dtype: str
    pre: tuple[UnaryOp, ...]
    dtype: str
    post: tuple[UnaryOp, ...] = ()
    kind: str = field(default="scale_product", init=False)

    @property
    def out_dtype(self) -> str:
        return self.post[-1].dtype if self.post else self.dtype


@dataclass(frozen=True)
class HeadChain(_JsonSpec):
    """norm -> RoPE -> FP8 quant -> (outputs and/or cache write) over the heads of each token.

    The source is x [T, heads, head_dim] (any row stride, unit element stride). The
    norm (RMSNorm or LayerNorm) is per head (width == head_dim) or over the whole row
    (width == heads·head_dim). Inputs, in order: x, the norm weight and bias (if any), cos and sin tables and positions
    (if rope; `gather`: cos/sin [P, table] indexed by positions [T]; else cos/sin are
    [T, table] rows), slot indices [T] (if a cache write). The cache goes in the op's
    separate list of mutated tensors. Outputs: the result [T, heads, head_dim] if `out`;
    with `quant` (group_size == head_dim, one scale per head, or a divisor of it) also the fp8 values
    [T, heads, head_dim] and each of its scale programs' values [T, heads] (quant_outputs; with G groups of
    group_size per head, [T, heads, G]),
    unless `quant_out` is False (the quant's values only feed `fields`). `fields`: byte fields
    written into byte caches (FieldWrite); they read the slot indices too. `product`: the
    output of scale program `product.scale` is that scale times a per-(token, head) input w
    [T, heads] (ScaleProduct; w is the chain's last input), not the scale itself.
    """

    in_dtype: str
    heads: int
    head_dim: int
    norm: Any  # RMSNorm | braze.patterns.layernorm.LayerNorm | None
    rope: Any  # braze.patterns.rope.Rope | None
    gather: bool
    out: bool
    write: CacheWrite | None
    quant: FP8Quant | None = None
    fields: tuple[FieldWrite, ...] = ()
    quant_out: bool = True
    product: ScaleProduct | None = None

    def __post_init__(self) -> None:
        if self.product is not None:
            assert self.quant is not None and self.quant_out, "a scale product needs the quant's outputs"
            assert self.quant.group_size == self.head_dim, "a scale product takes one scale per head"
            assert 0 <= self.product.scale < len(self.quant.scales), self.product.scale
            assert all(f.value != f"scale{self.product.scale}" for f in self.fields), "the scale is not stored"
        if self.quant is not None:
            assert self.head_dim % self.quant.group_size == 0, "head-chain quant: groups within a head"
            assert self.write is None, "head-chain quant: the fp8 values are outputs or fields, not a cache write"
        for f in self.fields:
            assert f.value == "result" or self.quant is not None, f"field {f.value} of a chain without a quant"
            assert not f.value.startswith("scale") or int(f.value[5:]) < len(self.quant.scales), f.value

    @property
    def name(self) -> str:
        parts = ([self.norm.kind] if self.norm else []) + (["rope"] if self.rope else []) + (
            ["fp8"] if self.quant else []) + (["scale_mul"] if self.product else []) + (
            ["store"] if self.write or self.fields else [])
        return "_".join(parts) or "copy"

    def quant_outputs(self) -> list[tuple[str, tuple[int, ...]]]:
        """(dtype, per-token shape) of the quant's outputs: fp8 values, then each scale program's values."""
        if self.quant is None or not self.quant_out:
            return []
        groups = self.head_dim // self.quant.group_size
        per_token = (self.heads,) if groups == 1 else (self.heads, groups)
        return [(self.quant.fp8_dtype, (self.heads, self.head_dim))] + [
            (self.product.out_dtype if self.product is not None and self.product.scale == i else prog[-1].dtype,
             per_token) for i, prog in enumerate(self.quant.scales)]

    @property
    def out_dtype(self) -> str:
        if self.rope is not None:
            return self.rope.out
        return self.norm.out_dtype if self.norm else self.in_dtype

    def input_names(self) -> list[str]:
        names = ["x"]
        if self.norm is not None and self.norm.has_weight:
            names.append("weight")
        if self.norm is not None and getattr(self.norm, "has_bias", False):
            names.append("bias")
        if self.rope is not None:
            names += ["cos", "sin"] + (["positions"] if self.gather else [])
        if self.write is not None or self.fields:
            names.append("slots")
        if self.product is not None:
            names.append("head_weights")
        return names



@dataclass(frozen=True)
class HeadAbsorb(_JsonSpec):
    """A per-head product y[h] = x[h] · W[h] over the heads of each token: MLA's absorbed W_UK
    (`einsum("thd,hdc->thc", q_nope, w_uk)`, a bmm of [H, T, D] by [H, D, C]) run inside a head-chain launch.

    Inputs: x [T, heads, in_dim] (any row and head strides, unit element stride) and the weight [heads, in_dim,
    head_dim] (any head and row strides, unit element stride). Output: [heads, T, head_dim], the bmm's own layout,
    fp32 sums rounded once to `out_dtype`, in a buffer of its own after the flat one (like a quant chain's
    outputs: quant_outputs), so its dtype need not be the launch's. Programs: heads · ⌈head_dim / block_c⌉, each
    holding one [in_dim, block_c] weight tile and running every token's row through it (the weight is read once
    per launch). The attributes below make it read as a HeadChain with nothing else where groups are built.
    """

    in_dtype: str
    heads: int
    in_dim: int
    head_dim: int  # output values per head
    out_dtype: str
    norm = rope = write = quant = product = None
    gather = quant_out = out = False
    fields = ()

    @property
    def name(self) -> str:
        return "absorb"

    @property
    def block_c(self) -> int:
        """Output columns a program computes: a [in_dim, block_c] weight tile of at most 4096 values (4 warps)."""
        d = 1 << max(self.in_dim - 1, 0).bit_length()
        return max(16, min(1 << max(self.head_dim - 1, 0).bit_length(), 4096 // d))

    @property
    def programs(self) -> int:
        return self.heads * -(-self.head_dim // self.block_c)

    def quant_outputs(self) -> list[tuple[str, tuple[int, ...]]]:
        """The output as (dtype, per-token shape): T · heads · head_dim values, laid out [heads, T, head_dim]."""
        return [(self.out_dtype, (self.heads, self.head_dim))]

    def input_names(self) -> list[str]:
        return ["x", "absorb_weight"]


@dataclass(frozen=True)
class HeadGroup(_JsonSpec):
    """Sibling HeadChains over the same tokens, run as one launch (grid: tokens x chains).

    The op's inputs are each chain's inputs in order; its mutated caches are the written
    caches in chain order; its outputs are a flat buffer holding, chain after chain,
    each output chain's [T, heads, head_dim] result (all results share one dtype), then
    each quant chain's fp8 values [T·heads·head_dim] and scales [T·heads] (quant_outputs).
    """

    chains: tuple[HeadChain, ...]

    def __post_init__(self) -> None:
        dtypes = {c.out_dtype for c in self.chains if c.out}
        assert len(dtypes) <= 1, f"grouped chains must share an output dtype, got {dtypes}"

    @property
    def name(self) -> str:
        return "_".join(c.name for c in self.chains) if len(self.chains) <= 2 else f"{len(self.chains)}chains"

    @property
    def out_dtype(self) -> str:
        return next((c.out_dtype for c in self.chains if c.out), self.chains[0].in_dtype)

    def out_widths(self) -> list[int]:
        """Elements per token of each chain's output (0 for chains without one)."""
        return [c.heads * c.head_dim if c.out else 0 for c in self.chains]

    def program_starts(self) -> list[int]:
        """The first program (grid dim 1) of each chain, then the total: one program a chain, a HeadAbsorb's many."""
        starts = [0]
        for c in self.chains:
            starts.append(starts[-1] + getattr(c, "programs", 1))
        return starts

    def quant_outputs(self) -> list[tuple[str, tuple[int, ...]]]:
        """(dtype, per-token shape) of the op's outputs after the flat buffer, chain after chain."""
        return [o for c in self.chains for o in c.quant_outputs()]

    @property
    def n_field_caches(self) -> int:
        """Byte caches the chains' fields write: the op's caches after the CacheWrite ones (chain order)."""
        return 1 + max((f.cache for c in self.chains for f in c.fields), default=-1)

    @property
    def writes(self) -> bool:
        return any(c.write is not None or c.fields for c in self.chains)



def _encode(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return [_encode(o) for o in obj]
    if hasattr(obj, "__dataclass_fields__"):
        d = {f.name: _encode(getattr(obj, f.name)) for f in fields(obj) if f.init}
        d["__type__"] = type(obj).__name__
        return d
    return obj


_TYPES = {c.__name__: c for c in (UnaryOp, ResidualAdd, WeightMul, Cast, RMSNorm, FP8Quant, RowChain, CacheWrite,
                                   FieldWrite, ScaleProduct, HeadChain, HeadAbsorb, HeadGroup)}


def _register_late_types() -> None:
    """Stage types defined in recognizer modules (RoPE) join the JSON codec."""
    from .conv import ConvUpdate
    from .gated_norm import Gate
    from .gdn import Gating, L2Norm, PostConv, Segment
    from .layernorm import BiasAdd, LayerNorm
    from .rope import Rope
    from .tp_norm import TPNorm, TPNormGroup

    _TYPES.update(Rope=Rope, LayerNorm=LayerNorm, BiasAdd=BiasAdd, ConvUpdate=ConvUpdate, L2Norm=L2Norm,
                  Gating=Gating, Segment=Segment, PostConv=PostConv, Gate=Gate, TPNorm=TPNorm, TPNormGroup=TPNormGroup)


def _decode(obj: Any) -> Any:
    if "Rope" not in _TYPES:
        _register_late_types()
    if isinstance(obj, list):
        return tuple(_decode(o) for o in obj)
    if isinstance(obj, dict):
        cls = _TYPES[obj.pop("__type__")]
        return cls(**{k: _decode(v) for k, v in obj.items()})
    return obj


