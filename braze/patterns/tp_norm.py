"""RMSNorms whose variance is summed across tensor-parallel ranks (MiniMax-M2.5's Q and K norms).

Under TP each rank holds a slice of the normalized width. The graph takes the
local mean of squares of each slice, all-reduces the means (packed, one
`cat([mean_q, mean_k], -1)` [T, 2] fp32 all-reduce; or one all-reduce per
norm), scales the sum (`/ P`), and normalizes its slice with its slice of the
weight. The recognizer anchors on the all-reduce and walks forward to each
side's normalization; widths, eps, the number of sides and P are read from the
graph, never assumed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.fx import Node

from .collective import AllReduceMatch
from .fx import Miss, aten, describe, dtype_of, is_op, same_value, shape_of, single_user, strip_lossless_casts
from .quant import _apply, _unary_step
from .rmsnorm import _add_scalar, _cast_chain, _epilogue, _is_square_of, mean_square_reference, rmsnorm_reference
from .stages import RMSNorm, UnaryOp, _JsonSpec, dtype_name


@dataclass(frozen=True)
class TPNorm:
    """One norm of a TP-reduced group: `norm` over the local slice (its mean is the local mean of
    squares); `post` maps the all-reduced sum of means to the global mean (e.g. `/ P`)."""

    norm: RMSNorm
    post: tuple[UnaryOp, ...]
    kind: str = field(default="tp_rmsnorm", init=False)


@dataclass(frozen=True)
class TPNormGroup(_JsonSpec):
    """Norms whose local means travel in one packed [T, N] all-reduce. Inputs, per side: x [T, D_i]
    and its weight (if the norm has one). Outputs: each side's normalized [T, D_i]."""

    sides: tuple[TPNorm, ...]

    @property
    def name(self) -> str:
        return f"tp_rmsnorm_x{len(self.sides)}"

    def input_names(self) -> list[str]:
        names = []
        for i, side in enumerate(self.sides):
            names.append(f"x{i}")
            if side.norm.has_weight:
                names.append(f"w{i}")
        return names


@dataclass(frozen=True)
class TPNormSide:
    stage: TPNorm
    x: Node  # the local slice being normalized, [T, D_i]
    weight: Node | None
    output: Node  # last node of the side's epilogue
    nodes: frozenset[Node]  # the side's nodes the fused op replaces (mean and output included)
    anchor: Node  # the side's mean


@dataclass(frozen=True)
class TPNormMatch:
    ar: AllReduceMatch
    sides: tuple[TPNormSide, ...]
    nodes: frozenset[Node]  # every node replaced: all sides, the packing, the all-reduce, the scaling


_SCALING = ("mul", "div")  # what may map the reduced sum to the global mean


def _scaling_chain(node: Node) -> tuple[Node, list[UnaryOp], list[Node]]:
    """Follow single-user scalar mul/div ops from `node`: (last node, ops, nodes)."""
    ops, nodes = [], []
    while (user := single_user(node)) is not None:
        step = _unary_step(user)
        if step is None or step[0] is not node or step[1].op not in _SCALING:
            break
        ops.append(step[1])
        nodes.append(user)
        node = user
    return node, ops, nodes


def reduced_means(ar: AllReduceMatch) -> tuple[list[Node], Node | None] | Miss:
    """The means of squares the all-reduce carries, and the packing cat (None for a single mean)."""
    src = ar.input
    if is_op(src, aten.cat):
        parts = list(src.args[0])
        dim = src.args[1] if len(src.args) > 1 else src.kwargs.get("dim", 0)
        rank = len(shape_of(src))
        if dim % rank != rank - 1:
            return Miss(f"the means are packed along dim {dim}, not the last", candidate=False)
        cat = src
    elif is_op(src, aten.clone) and isinstance(src.args[0], Node):  # what a cat of one tensor decomposes to
        parts, cat = [src.args[0]], src
    else:
        parts, cat = [src], None
    squares = [isinstance(p, Node) and is_op(p, aten.mean) and _is_square_of(p.args[0]) is not None for p in parts]
    if not any(squares):
        return Miss("the all-reduced tensor is not a mean of squares", candidate=False)
    if not all(squares):
        bad = next(p for p, ok in zip(parts, squares) if not ok)
        return Miss(f"the packed all-reduce also carries {describe(bad)}, which is not a mean of squares",
                    "all-reduce only the variances in the packed tensor")
    for p in parts:
        dims = p.args[1] if len(p.args) > 1 else p.kwargs.get("dim")
        keepdim = p.args[2] if len(p.args) > 2 else p.kwargs.get("keepdim", False)
        x_rank = len(shape_of(p.args[0]))
        if dims is None or [d % x_rank for d in dims] != [x_rank - 1] or not keepdim:
            return Miss(f"the mean {describe(p)} is not over the last dim with keepdim",
                        "use x.pow(2).mean(-1, keepdim=True)")
        if not isinstance(shape_of(p.args[0])[-1], int):
            return Miss(f"the width of {describe(p)} is dynamic", "make the projected width static")
        if dtype_of(p) != torch.float32:
            return Miss(f"the variance {describe(p)} is {dtype_of(p)}; braze reduces fp32 variances",
                        "compute the variance in fp32 (x.float().pow(2).mean(...))")
    return parts, cat


def match_tp_norm(ar: AllReduceMatch) -> TPNormMatch | Miss:
    """Recognize the norms whose means of squares `ar` sums across ranks."""
    found = reduced_means(ar)
    if isinstance(found, Miss):
        return found
    means, cat = found
    shared = [ar.start, ar.wait] + ([cat] if cat is not None else [])
    reduced, pre_ops, pre_nodes = _scaling_chain(ar.wait)
    shared += pre_nodes
    column = [u for u in reduced.users if _column(u, reduced) == 0]
    if len(means) == 1:
        starts = column if len(reduced.users) == 1 and column else [reduced]
        shared += [s for s in starts if s is not reduced]
    else:
        starts = [None] * len(means)
        for u in reduced.users:
            i = _column(u, reduced)
            if i is None or i >= len(means) or starts[i] is not None:
                return Miss(f"the reduced variances are read by {describe(u)}, not one column slice per norm",
                            "read each norm's variance as var[:, i:i+1]")
            starts[i] = u
        if any(s is None for s in starts):
            return Miss("a packed variance is reduced but never used", candidate=False)
        shared += starts
    sides = []
    for mean, start in zip(means, starts):
        side = _side(mean, start, pre_ops)
        if isinstance(side, Miss):
            return side
        sides.append(side)
    nodes = frozenset(shared).union(*(s.nodes for s in sides))
    for n in nodes - {s.output for s in sides}:
        escape = [u for u in n.users if u not in nodes]
        if escape:
            return Miss(f"intermediate {describe(n)} is also used by {describe(escape[0])}",
                        "braze produces the normalized tensors; derive other values from them")
    return TPNormMatch(ar, tuple(sides), nodes)


def _column(node: Node, src: Node) -> int | None:
    """i when node is src[..., i:i+1] (a last-dim slice of width one)."""
    if not is_op(node, aten.slice) or node.args[0] is not src:
        return None
    rank = len(shape_of(src))
    dim, start, end = (list(node.args[1:4]) + [0, None, None])[:3]
    step = node.args[4] if len(node.args) > 4 else 1
    if dim % rank != rank - 1 or not isinstance(start, int) or step != 1:
        return None
    return start if isinstance(end, int) and end == start + 1 else None


def _side(mean: Node, start: Node, pre_ops: list[UnaryOp]) -> TPNormSide | Miss:
    squared = _is_square_of(mean.args[0])
    node, post_ops, post_nodes = _scaling_chain(start)
    add = single_user(node)
    eps = _add_scalar(add) if add is not None else None
    if eps is None:
        return Miss(f"the reduced variance {describe(node)} is not followed by `+ eps` with a constant eps",
                    "write var + eps with a Python float eps")
    rstd = single_user(add)
    if not is_op(rstd, aten.rsqrt):
        return Miss(f"`var + eps` feeds {describe(next(iter(add.users)))}, not rsqrt",
                    "normalize as x * torch.rsqrt(var + eps)")
    normalized = next((u for u in rstd.users if is_op(u, aten.mul)
                       and any(same_value(a, squared) for a in u.args[:2] if a is not rstd)), None)
    if normalized is None or len(rstd.users) != 1:
        return Miss("the inverse RMS does not multiply (only) the tensor whose variance was reduced",
                    "normalize the tensor the variance was taken of")
    if not (dtype_of(add) == dtype_of(rstd) == torch.float32):
        return Miss("the reduced variance leaves fp32 before rsqrt", "keep the variance in fp32")
    width = shape_of(squared)[-1]
    epilogue, weight, output, tail = _epilogue(normalized, width)
    x = strip_lossless_casts(squared)
    nodes = frozenset([mean.args[0], mean, *post_nodes, add, rstd, normalized, *tail])
    if start is not node:
        nodes |= {start}
    other = next(a for a in normalized.args[:2] if a is not rstd)
    casts = {c for s in (squared, other) for c in _cast_chain(s, x)}
    nodes |= {c for c in casts if set(c.users) <= nodes | casts | {mean}}
    f32 = "float32"
    stage = RMSNorm(eps=eps, width=width, square=dtype_name(dtype_of(mean.args[0])), mean=f32, rstd=f32,
                    normed=dtype_name(dtype_of(normalized)), epilogue=tuple(epilogue), store=True)
    return TPNormSide(TPNorm(stage, tuple(pre_ops + post_ops)), x, weight, output, nodes | {mean}, mean)


# ---------------------------------------------------------------------------
# Reference: pure torch. x_i [T, D_i]; `all_reduce` sums a [T, N] fp32 tensor over the group.


def local_means_reference(group: TPNormGroup, xs: list[torch.Tensor]) -> torch.Tensor:
    """[T, N] fp32: each side's local mean of squares."""
    return torch.cat([mean_square_reference(x, s.norm) for x, s in zip(xs, group.sides)], dim=-1)


def finish_reference(group: TPNormGroup, inputs: list[torch.Tensor], reduced: torch.Tensor) -> list[torch.Tensor]:
    """Each side normalized with its column of the reduced [T, N] means."""
    named = dict(zip(group.input_names(), inputs))
    outs = []
    for i, side in enumerate(group.sides):
        mean = _apply(side.post, reduced[..., i:i + 1].float())
        y = rmsnorm_reference(named[f"x{i}"], named.get(f"w{i}"), side.norm, mean=mean)
        outs.append(y.to(getattr(torch, side.norm.out_dtype)))
    return outs


def tp_norm_reference(group: TPNormGroup, inputs: list[torch.Tensor],
                      all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """The group's outputs: local means -> one packed all-reduce -> normalize each side."""
    named = dict(zip(group.input_names(), inputs))
    means = local_means_reference(group, [named[f"x{i}"] for i in range(len(group.sides))])
    return finish_reference(group, inputs, all_reduce(means))
