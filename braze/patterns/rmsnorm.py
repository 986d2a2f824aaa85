"""RMSNorm (plain, zero-centered `1+w`, with a residual add) in a post-grad ATen graph.

Every spelling decomposes to the same core, `x * rsqrt(mean(x^2, -1) + eps)`:
HF-style modules, `F.rms_norm` / `nn.RMSNorm`, Gemma's `x̂·(1+w)`, weight
before or after the cast back. The recognizer anchors on the `mean` of a
square, walks forward through that core, then through the epilogue of casts and
one weight multiply. eps and width are read from the graph.
"""

from __future__ import annotations

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
    same_shape,
    same_value,
    scalar,
    shape_of,
    single_user,
    strip_lossless_casts,
    users_outside,
    val,
)
from .stages import Cast, EpilogueOp, ResidualAdd, RMSNorm, WeightMul, dtype_name, round_to as _round

@dataclass(frozen=True)
class ResidualMatch:
    add: Node  # h = a + b
    a: Node
    b: Node


@dataclass(frozen=True)
class NormMatch:
    stage: RMSNorm  # with store=False; the pass decides what to store
    x: Node  # the normalized tensor (before any upcast)
    weight: Node | None
    output: Node  # last node of the norm (end of the epilogue)
    nodes: frozenset[Node]  # every node the fused norm replaces, output included
    anchor: Node  # the mean


def _is_square_of(node: Node) -> Node | None:
    """The tensor squared by `node` (pow(t, 2) or t * t), else None."""
    if is_op(node, aten.pow) and scalar(node.args[1]) == 2.0 and isinstance(node.args[0], Node):
        return node.args[0]
    if is_op(node, aten.mul) and isinstance(node.args[0], Node) and same_value(*node.args[:2]):
        if dtype_of(node.args[0]) == dtype_of(node.args[1]):
            return node.args[0]
    return None


def _other(node: Node, known: object) -> object:
    a, b = binary_operands(node)
    return b if a is known else a


def _add_scalar(node: Node) -> float | None:
    """c in `t + c` (either order, add.Tensor or add.Scalar, alpha 1), else None."""
    if not is_op(node, aten.add) or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = binary_operands(node)
    return scalar(b) if scalar(b) is not None else scalar(a)


def match_rmsnorm(mean: Node) -> NormMatch | Miss:
    """Recognize the RMSNorm whose variance is `mean`."""
    if not is_op(mean, aten.mean) or not isinstance(mean.args[0], Node):
        return Miss("not a mean", candidate=False)
    squared = _is_square_of(mean.args[0])
    if squared is None:
        return Miss("not a mean of squares", candidate=False)
    x_shape = shape_of(squared)
    if not x_shape:
        return Miss("input has no shape", candidate=False)
    rank = len(x_shape)
    dims = mean.args[1] if len(mean.args) > 1 else mean.kwargs.get("dim")
    keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    if dims is None or [d % rank for d in dims] != [rank - 1]:
        return Miss(f"reduces over dims {dims}, not the last dim", "normalize over the last dim only")
    if not keepdim:
        return Miss("mean without keepdim", "use mean(-1, keepdim=True)")
    width = x_shape[-1]
    if not isinstance(width, int):
        return Miss(f"row width {width} is dynamic", "make the hidden size static")
    if dtype_of(squared) not in FLOAT_DTYPES:
        return Miss(f"input dtype {dtype_of(squared)} is not a float dtype", candidate=False)

    core = [mean.args[0], mean]
    if len(mean.users) > 1:
        return Miss(f"the variance {describe(mean)} is read by {len(mean.users)} ops (e.g. two different eps)",
                    "compute each norm's variance once, with one eps")
    add = single_user(mean)
    eps = _add_scalar(add) if add is not None else None
    if eps is None:
        return Miss(f"the variance {describe(mean)} is not followed by `+ eps` with a constant eps",
                    "write mean(x^2) + eps with a Python float eps")
    core.append(add)
    # pick the chain's next op among the users; any other user is reported as an escape below
    root = next((u for u in add.users if is_op(u, aten.rsqrt, aten.sqrt)), None)
    normalized: Node | None = None
    inverse = "rsqrt"

    def multiplies_x(rstd: Node) -> Node | None:
        return next((u for u in rstd.users if is_op(u, aten.mul) and same_value(_other(u, rstd), squared)), None)

    if is_op(root, aten.rsqrt):
        rstd = root
        core.append(rstd)
        normalized = multiplies_x(rstd)
    elif is_op(root, aten.sqrt):
        core.append(root)
        recip = next((u for u in root.users if is_op(u, aten.reciprocal)), None)
        div = next((u for u in root.users if is_op(u, aten.div) and u.args[1] is root
                    and same_value(u.args[0], squared)), None)
        if recip is not None:
            core.append(recip)
            inverse, rstd = "recip_sqrt", recip
            normalized = multiplies_x(recip)
        elif div is not None:
            normalized, rstd, inverse = div, root, "div_sqrt"
    else:
        return Miss(f"`mean + eps` feeds {describe(next(iter(add.users)))}, not rsqrt or sqrt",
                    "use torch.rsqrt(var + eps)")
    if normalized is None:
        return Miss("the inverse RMS does not multiply the same tensor whose variance it is",
                    "normalize the tensor the variance was taken of")
    core.append(normalized)
    if not (dtype_of(mean) == dtype_of(add) == dtype_of(rstd)):
        return Miss("the variance changes dtype between mean, + eps and rsqrt",
                    "keep the variance in one dtype")

    x = strip_lossless_casts(squared)
    epilogue, weight, output, tail = _epilogue(normalized, width)
    nodes = frozenset(core + tail)
    # upcasts of x (x.float()) that only the norm reads belong to it
    casts = {c for start in (squared, _other(normalized, rstd)) for c in _cast_chain(start, x)}
    nodes |= {c for c in casts if set(c.users) <= nodes | casts}
    for n in nodes - {output}:
        escape = users_outside(n, nodes)
        if escape:
            return Miss(
                f"intermediate {describe(n)} is also used by {describe(escape[0])}",
                "braze can produce the norm output and the residual sum, not inner values; "
                "compute the extra value from the norm output instead",
            )
    stage = RMSNorm(
        eps=eps,
        width=width,
        square=dtype_name(dtype_of(mean.args[0])),
        mean=dtype_name(dtype_of(mean)),
        rstd=dtype_name(dtype_of(rstd)),
        normed=dtype_name(dtype_of(normalized)),
        epilogue=tuple(epilogue),
        store=False,
        inverse=inverse,
    )
    return NormMatch(stage, x, weight, output, nodes, mean)


def _cast_chain(node: object, base: Node) -> list[Node]:
    out = []
    while isinstance(node, Node) and node is not base and is_cast(node):
        out.append(node)
        node = node.args[0]
    return out


def _weight_operand(node: Node, y: Node, width: int) -> tuple[Node, bool, str | None] | None:
    """(weight, zero_centered, offset dtype) if `node` multiplies y by a [width] weight."""
    other = _other(node, y)
    if not isinstance(other, Node):
        return None
    zero_centered, offset_dtype = False, None
    if _add_scalar(other) == 1.0:
        a, b = binary_operands(other)
        inner = a if isinstance(a, Node) else b
        zero_centered, offset_dtype, other = True, dtype_name(dtype_of(other)), inner
    w = strip_lossless_casts(other)
    shape = shape_of(w)
    if shape is None or len(shape) == 0 or not known_eq(shape[-1], width) or not all(known_eq(s, 1) for s in shape[:-1]):
        return None
    if dtype_of(w) not in FLOAT_DTYPES:
        return None
    return w, zero_centered, offset_dtype


def _epilogue(normalized: Node, width: int) -> tuple[list[EpilogueOp], Node | None, Node, list[Node]]:
    """Casts and at most one weight multiply after the normalization."""
    ops: list[EpilogueOp] = []
    weight: Node | None = None
    tail: list[Node] = []
    y = normalized
    while True:
        user = single_user(y)
        if user is None:
            break
        if is_cast(user) and dtype_of(user) in FLOAT_DTYPES:
            ops.append(Cast(dtype_name(dtype_of(user))))
        elif weight is None and is_op(user, aten.mul) and (found := _weight_operand(user, y, width)):
            weight, zero_centered, offset_dtype = found
            if zero_centered:
                tail.extend(a for a in user.args if isinstance(a, Node) and a is not y
                            and is_op(a, aten.add) and len(a.users) == 1)
            ops.append(WeightMul(dtype_name(dtype_of(user)), dtype_name(dtype_of(weight)),
                                 zero_centered, offset_dtype))
        else:
            break
        tail.append(user)
        y = user
    # the weight's own casts (e.g. weight.float()) are replaced only when unshared
    return ops, weight, y, tail


def match_residual_add(x: Node) -> ResidualMatch | None:
    """`x = a + b` of two same-shape, same-dtype tensors feeding the norm."""
    if not is_op(x, aten.add) or x.kwargs.get("alpha", 1) != 1 or len(x.args) < 2:
        return None
    a, b = x.args[:2]
    if not (isinstance(a, Node) and isinstance(b, Node)):
        return None
    va, vb, vx = val(a), val(b), val(x)
    if va is None or vb is None or vx is None:
        return None
    if not (same_shape(va.shape, vx.shape) and same_shape(vb.shape, vx.shape)) or not (va.dtype == vb.dtype == vx.dtype):
        return None
    return ResidualMatch(x, a, b)


def residual_stage(res: ResidualMatch, norm_nodes: frozenset[Node]) -> ResidualAdd:
    """The residual stage; h is stored when anything besides the norm reads it."""
    readers = [u for u in res.add.users if u not in norm_nodes]
    return ResidualAdd(dtype=dtype_name(dtype_of(res.add)), store=bool(readers))


# ---------------------------------------------------------------------------
# Reference: pure torch, the same rounding as the graph. Shapes: x [..., D].



def residual_add_reference(x: torch.Tensor, r: torch.Tensor, stage: ResidualAdd) -> torch.Tensor:
    """h = x + r rounded to the stage dtype; returned in fp32."""
    return _round(x.float() + r.float(), stage.dtype)


def mean_square_reference(x: torch.Tensor, stage: RMSNorm) -> torch.Tensor:
    """mean(x^2) over the last dim, [..., 1], rounded as the stage's graph rounds it."""
    x = x.float()
    sq = _round(x * x, stage.square)
    return _round(sq.sum(-1, keepdim=True) / stage.width, stage.mean)


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor | None, stage: RMSNorm,
                      mean: torch.Tensor | None = None) -> torch.Tensor:
    """The stage's RMSNorm of fp32-held `x`, returned in fp32 (rounded to out dtype).

    `mean` [..., 1]: the variance when it was computed elsewhere (e.g. reduced across ranks).
    """
    x = x.float()
    if mean is None:
        mean = mean_square_reference(x, stage)
    var = _round(mean + stage.eps, stage.rstd)
    if stage.inverse == "rsqrt":
        y = _round(x * _round(torch.rsqrt(var), stage.rstd), stage.normed)
    elif stage.inverse == "recip_sqrt":
        y = _round(x * _round(1.0 / _round(torch.sqrt(var), stage.rstd), stage.rstd), stage.normed)
    else:
        y = _round(x / _round(torch.sqrt(var), stage.rstd), stage.normed)
    for op in stage.epilogue:
        if isinstance(op, Cast):
            y = _round(y, op.dtype)
        else:
            assert weight is not None
            w = weight.float()
            if op.zero_centered:
                w = _round(1.0 + w, op.offset_dtype or "float32")
            y = _round(y * w, op.dtype)
    return y
