"""LayerNorm (weight and bias, as `F.layer_norm` / `nn.LayerNorm` decompose) in a post-grad ATen graph.

The core is `(x - mean) * rsqrt(var + eps)` with var_mean over the last dim
(biased variance); then at most one weight multiply, one bias add and casts.
eps and width are read from the graph.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Node

from .fx import (
    FLOAT_DTYPES,
    Miss,
    aten,
    binary_operands,
    describe,
    dtype_of,
    is_cast,
    is_op,
    known_eq,
    same_value,
    scalar,
    shape_of,
    single_user,
    strip_lossless_casts,
    users_outside,
)
from .stages import Cast, WeightMul, dtype_name, round_to as _round

@dataclass(frozen=True)
class BiasAdd:
    """y = y + b (b a [width] vector), rounded to `dtype`."""

    dtype: str
    bias_dtype: str


@dataclass(frozen=True)
class LayerNorm:
    """y = (x - mean) * rsqrt(var + eps) over `width`, then the epilogue ops in order.

    `compute` is the dtype the statistics and the normalization are computed and
    rounded in (what the graph's var_mean returns).
    """

    eps: float
    width: int
    compute: str
    epilogue: tuple[object, ...]  # Cast | WeightMul | BiasAdd
    kind: str = "layernorm"

    @property
    def out_dtype(self) -> str:
        return self.epilogue[-1].dtype if self.epilogue else self.compute

    @property
    def has_weight(self) -> bool:
        return any(isinstance(op, WeightMul) for op in self.epilogue)

    @property
    def has_bias(self) -> bool:
        return any(isinstance(op, BiasAdd) for op in self.epilogue)


@dataclass(frozen=True)
class LayerNormMatch:
    stage: LayerNorm
    x: Node
    weight: Node | None
    bias: Node | None
    output: Node
    nodes: frozenset[Node]
    anchor: Node  # the var_mean


def _vector(node: object, width: int) -> Node | None:
    """node, through lossless casts, if it is a [width] (or [1.., width]) float vector."""
    if not isinstance(node, Node):
        return None
    v = strip_lossless_casts(node)
    shape = shape_of(v)
    if not shape or not known_eq(shape[-1], width) or not all(known_eq(s, 1) for s in shape[:-1]):
        return None
    return v if dtype_of(v) in FLOAT_DTYPES else None


def match_layernorm(var_mean: Node) -> LayerNormMatch | Miss:
    """Recognize the LayerNorm whose statistics are `var_mean`."""
    if not is_op(var_mean, aten.var_mean):
        return Miss("not a var_mean", candidate=False)
    x = var_mean.args[0]
    shape = shape_of(x)
    if not shape:
        return Miss("input has no shape", candidate=False)
    dims = var_mean.args[1] if len(var_mean.args) > 1 else var_mean.kwargs.get("dim")
    rank = len(shape)
    if dims is None or [d % rank for d in dims] != [rank - 1]:
        return Miss(f"statistics over dims {dims}, not the last dim", "normalize over the last dim only")
    if var_mean.kwargs.get("correction", 1) != 0 or not var_mean.kwargs.get("keepdim", False):
        return Miss("not the biased variance with keepdim", candidate=False)
    width = shape[-1]
    if not isinstance(width, int):
        return Miss(f"row width {width} is dynamic", "make the hidden size static")
    gets = {u.args[1]: u for u in var_mean.users if u.target is operator.getitem}
    var, mean = gets.get(0), gets.get(1)
    if var is None or mean is None:
        return Miss("var_mean's results are not both used", candidate=False)
    add = single_user(var)
    eps = None
    if is_op(add, aten.add):
        a, b = binary_operands(add)
        eps = scalar(b) if a is var else scalar(a)
    if eps is None:
        return Miss("the variance is not followed by `+ eps` with a constant eps", "use a Python float eps")
    rstd = single_user(add)
    center = single_user(mean)
    if not is_op(rstd, aten.rsqrt) or not is_op(center, aten.sub) or center.args[1] is not mean:
        return Miss("not (x - mean) * rsqrt(var + eps)", candidate=False)
    if not same_value(center.args[0], x):
        return Miss("centers a different tensor than the one whose statistics it took",
                    "normalize the tensor the statistics were taken of")
    normed = single_user(center)
    if not is_op(normed, aten.mul) or rstd not in normed.args:
        return Miss("the centered value is not multiplied by the inverse std", candidate=False)
    core = [var_mean, var, mean, add, rstd, center, normed]
    ops: list[object] = []
    weight = bias = None
    y, tail = normed, []
    while (user := single_user(y)) is not None:
        other = next((a for a in user.args[:2] if a is not y), None)
        if is_cast(user) and dtype_of(user) in FLOAT_DTYPES:
            ops.append(Cast(dtype_name(dtype_of(user))))
        elif weight is None and bias is None and is_op(user, aten.mul) and (w := _vector(other, width)) is not None:
            weight = w
            ops.append(WeightMul(dtype_name(dtype_of(user)), dtype_name(dtype_of(w))))
        elif bias is None and is_op(user, aten.add) and (b := _vector(other, width)) is not None \
                and user.kwargs.get("alpha", 1) == 1:
            bias = b
            ops.append(BiasAdd(dtype_name(dtype_of(user)), dtype_name(dtype_of(b))))
        else:
            break
        tail.append(user)
        y = user
    nodes = frozenset(core + tail)
    for n in nodes - {y}:
        escape = users_outside(n, nodes)
        if escape:
            return Miss(f"intermediate {describe(n)} is also used by {describe(escape[0])}",
                        "braze produces the norm output, not inner values")
    stage = LayerNorm(float(eps), width, dtype_name(dtype_of(var)), tuple(ops))
    return LayerNormMatch(stage, strip_lossless_casts(x), weight, bias, y, nodes, var_mean)


# ---------------------------------------------------------------------------
# Reference: pure torch, x [..., D] fp32-held.



def layernorm_reference(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                        stage: LayerNorm) -> torch.Tensor:
    x = _round(x.float(), stage.compute)
    var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
    var, mean = _round(var, stage.compute), _round(mean, stage.compute)
    rstd = _round(torch.rsqrt(_round(var + stage.eps, stage.compute)), stage.compute)
    y = _round(_round(x - mean, stage.compute) * rstd, stage.compute)
    for op in stage.epilogue:
        if isinstance(op, Cast):
            y = _round(y, op.dtype)
        elif isinstance(op, WeightMul):
            y = _round(y * weight.float(), op.dtype)
        elif isinstance(op, BiasAdd):
            y = _round(y + bias.float(), op.dtype)
    return y
