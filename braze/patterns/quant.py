"""Dynamic FP8 quantization (per token or per group) in a post-grad ATen graph.

Anchored on the cast to fp8. Walking back: an optional clamp, a divide by (or
multiply with) a per-group operand, and that operand is a chain of unary ops
applied to `amax(|y|)` over the group: `amax / 448` with a floor before or after
the divide, power-of-two rounding `2^ceil(log2(s))`, or `448 / amax` for the
multiply form. The chain is recorded op by op, so any such spelling is
reproduced exactly instead of being enumerated.
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
    is_view,
    known_eq,
    same_shape,
    same_value,
    scalar,
    shape_of,
    strip_lossless_casts,
)
from .stages import FP8Quant, UnaryOp, dtype_name

FP8_SUPPORTED = (torch.float8_e4m3fn,)
FP8_ALL = tuple(
    getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, n)
)
@dataclass(frozen=True)
class QuantMatch:
    stage: FP8Quant
    y: Node  # the tensor being quantized, [..., D] (before any group view)
    q: Node  # the fp8 cast
    scale_nodes: tuple[Node, ...]  # nodes computed from amax that are used outside the site
    nodes: frozenset[Node]  # every node the fused quant replaces (q and scale_nodes included)


def is_fp8_cast(node: object) -> bool:
    return is_cast(node) and dtype_of(node) in FP8_ALL


def _unary_step(node: Node) -> tuple[Node, UnaryOp] | None:
    """(input, op) if `node` is a supported unary op of one tensor, else None."""
    dt = dtype_of(node)
    if dt not in FLOAT_DTYPES:
        return None
    d = dtype_name(dt)
    if is_cast(node):
        return node.args[0], UnaryOp("cast", d)
    if is_op(node, aten.reciprocal):
        return node.args[0], UnaryOp("reciprocal", d)
    for op, name in ((aten.log2, "log2"), (aten.ceil, "ceil"), (aten.exp2, "exp2")):
        if is_op(node, op):
            return node.args[0], UnaryOp(name, d)
    if is_op(node, aten.clamp_min) and scalar(node.args[1]) is not None:
        return node.args[0], UnaryOp("clamp_min", d, scalar(node.args[1]))
    if is_op(node, aten.clamp_max) and scalar(node.args[1]) is not None:
        return node.args[0], UnaryOp("clamp_max", d, scalar(node.args[1]))
    if is_op(node, aten.maximum, aten.minimum):
        return None
    if is_op(node, aten.pow) and scalar(node.args[0]) == 2.0 and isinstance(node.args[1], Node):
        return node.args[1], UnaryOp("exp2", d)  # pow(2, t)
    if is_op(node, aten.mul, aten.div, aten.add) and node.kwargs.get("alpha", 1) == 1:
        a, b = binary_operands(node)
        if isinstance(a, Node) and scalar(b) is not None:
            name = {aten.mul: "mul", aten.div: "div", aten.add: "add"}[node.target.overloadpacket]
            return a, UnaryOp(name, d, scalar(b))
        if isinstance(b, Node) and scalar(a) is not None:
            name = {aten.mul: "mul", aten.div: "rdiv", aten.add: "add"}[node.target.overloadpacket]
            return b, UnaryOp(name, d, scalar(a))
    return None


def _program_to_amax(node: object) -> tuple[Node, list[tuple[Node, UnaryOp]]] | None:
    """Walk back from a per-group node to `amax`; returns (amax, steps in order).

    The first step is always a cast to amax's own dtype, so a program is never
    empty and its last op names the result dtype.
    """
    steps: list[tuple[Node, UnaryOp]] = []
    if not isinstance(node, Node):
        return None
    while not is_op(node, aten.amax):
        step = _unary_step(node)
        if step is None:
            return None
        steps.append((node, step[1]))
        node = step[0]
        if not isinstance(node, Node):
            return None
    if dtype_of(node) not in FLOAT_DTYPES:
        return None
    steps.append((node, UnaryOp("cast", dtype_name(dtype_of(node)))))
    return node, steps[::-1]


def fp8_quants_by_value(graph) -> dict[Node, QuantMatch]:
    """Every dynamic FP8 quant of `graph`, keyed by the value it quantizes (through views and lossless casts)."""
    quants: dict[Node, QuantMatch] = {}
    for n in graph.nodes:
        if is_fp8_cast(n):
            q = match_fp8_quant(n)
            if isinstance(q, QuantMatch):
                y = strip_lossless_casts(q.y)
                while is_view(y):
                    y = y.args[0]
                quants[y] = q
    return quants


def match_fp8_quant(q: Node) -> QuantMatch | Miss:
    """Recognize the dynamic FP8 quant that ends in the cast `q`."""
    if not is_fp8_cast(q):
        return Miss("not an fp8 cast", candidate=False)
    if dtype_of(q) not in FP8_SUPPORTED:
        return Miss(f"quantizes to {dtype_name(dtype_of(q))}; braze fuses float8_e4m3fn only",
                    "use torch.float8_e4m3fn")
    v = q.args[0]
    lo = hi = None
    nodes = [q]
    while is_op(v, aten.clamp_min, aten.clamp_max, aten.clamp):
        if is_op(v, aten.clamp):
            lo = scalar(v.args[1]) if len(v.args) > 1 else scalar(v.kwargs.get("min"))
            hi = scalar(v.args[2]) if len(v.args) > 2 else scalar(v.kwargs.get("max"))
        elif is_op(v, aten.clamp_min):
            lo = scalar(v.args[1])
        else:
            hi = scalar(v.args[1])
        nodes.append(v)
        v = v.args[0]
    clamp = None
    if lo is not None or hi is not None:
        clamp = (lo if lo is not None else float("-inf"), hi if hi is not None else float("inf"))
    if not is_op(v, aten.div, aten.mul) or not all(isinstance(a, Node) for a in v.args[:2]):
        return Miss(f"the fp8 cast's input {describe(v)} is not a scaled tensor",
                    "quantize as (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn)")
    combine = "div" if is_op(v, aten.div) else "mul"
    nodes.append(v)
    value, operand = v.args[:2]
    found = _program_to_amax(operand)
    if found is None and combine == "mul":
        value, operand = operand, value
        found = _program_to_amax(operand)
    if dtype_of(v) not in FLOAT_DTYPES:
        return Miss(f"scaling happens in {dtype_of(v)}", candidate=False)
    if found is None:
        return Miss(f"the scale {describe(operand)} is not computed from amax(|x|) by simple ops",
                    "compute the scale as amax(|x|) / 448 (optionally floored or rounded to 2^k)")
    amax, steps = found
    absval = amax.args[0]
    if not is_op(absval, aten.abs):
        return Miss("the amax is not of |x|", "take amax of x.abs()")
    x_shape = shape_of(absval)
    dims = amax.args[1] if len(amax.args) > 1 else amax.kwargs.get("dim", [])
    keepdim = amax.args[2] if len(amax.args) > 2 else amax.kwargs.get("keepdim", False)
    if not x_shape or [d % len(x_shape) for d in dims] != [len(x_shape) - 1] or not keepdim:
        return Miss(f"amax over dims {dims} (keepdim={keepdim}); braze needs the last dim, keepdim",
                    "reduce with amax(-1, keepdim=True) over a [..., groups, group_size] view")
    if not same_value(absval.args[0], value):
        return Miss("the amax is taken of a different tensor than the one scaled",
                    "take amax of the tensor being quantized")
    if not (same_shape(shape_of(value), x_shape) and same_shape(shape_of(q), x_shape)):
        return Miss("the scaled tensor and the amax input differ in shape", candidate=True)

    # groups: value is y viewed as [..., G, g] or y itself with one group per row
    grouped = strip_lossless_casts(value)
    y = grouped
    group_size = x_shape[-1]
    if is_view(grouped):
        y = grouped.args[0]
        y_shape = shape_of(y)
        if not y_shape or not same_shape(y_shape[:-1], x_shape[:-2]) or not known_eq(y_shape[-1], x_shape[-2] * x_shape[-1]):
            return Miss("the group view does not split the last dim into [groups, group_size]",
                        "view the row as x.view(*lead, D // g, g)")
    if not isinstance(group_size, int):
        return Miss("the group size is dynamic", "use a static group size")

    # Every node computed from amax is part of the site; the ones read from
    # outside it (the scales a GEMM consumes) become outputs of the fused op.
    tree = _amax_tree(amax)
    site = set(nodes) | {absval, amax} | set(tree)
    if grouped is not y:
        site.add(grouped)
    for c in _casts_between(value, grouped):
        site.add(c)
    scale_nodes = tuple(n for n in tree if any(u not in site for u in n.users))
    for n in site - set(scale_nodes) - {q}:
        escape = [u for u in n.users if u not in site]
        if escape:
            return Miss(f"intermediate {describe(n)} of the quant is also used by {describe(escape[0])}",
                        "braze produces q and the scales; derive other values from them")
    programs = []
    for n in scale_nodes:
        _, path = _program_to_amax(n)
        programs.append(tuple(op for _, op in path))
    stage = FP8Quant(
        group_size=group_size,
        fp8_dtype=dtype_name(dtype_of(q)),
        value_dtype=dtype_name(dtype_of(v)),
        combine=combine,
        operand=tuple(op for _, op in steps),
        clamp=clamp,
        scales=tuple(programs),
    )
    return QuantMatch(stage, y, q, scale_nodes, frozenset(site))


def _amax_tree(amax: Node) -> list[Node]:
    """Nodes computed from `amax` by unary ops only (amax included)."""
    out, frontier = [amax], [amax]
    while frontier:
        n = frontier.pop()
        for u in n.users:
            step = _unary_step(u)
            if step is not None and step[0] is n and u not in out:
                out.append(u)
                frontier.append(u)
    return out


def _casts_between(node: Node, base: Node) -> list[Node]:
    out = []
    while node is not base and is_cast(node):
        out.append(node)
        node = node.args[0]
    return out


# ---------------------------------------------------------------------------
# Reference: pure torch. y: [..., D] (fp32-held values of the quant input).


def _apply(prog: tuple[UnaryOp, ...], t: torch.Tensor) -> torch.Tensor:
    for op in prog:
        c = op.const
        if op.op == "cast":
            pass
        elif op.op == "mul":
            t = t * c
        elif op.op == "div":
            t = t / c
        elif op.op == "rdiv":
            t = c / t
        elif op.op == "add":
            t = t + c
        elif op.op == "clamp_min":
            t = t.clamp_min(c)
        elif op.op == "clamp_max":
            t = t.clamp_max(c)
        elif op.op == "reciprocal":
            t = 1.0 / t
        elif op.op == "log2":
            t = torch.log2(t)
        elif op.op == "ceil":
            t = torch.ceil(t)
        elif op.op == "exp2":
            t = torch.exp2(t)
        t = t.to(getattr(torch, op.dtype)).float()
    return t


apply_program = _apply  # the names other modules use
unary_step = _unary_step


def fp8_quant_reference(y: torch.Tensor, stage: FP8Quant) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(q [..., D] fp8, scales [..., G] each) of `y` per the stage."""
    lead, d = y.shape[:-1], y.shape[-1]
    g = y.float().reshape(*lead, d // stage.group_size, stage.group_size)
    amax = g.abs().amax(-1, keepdim=True)  # [..., G, 1]
    operand = _apply(stage.operand, amax)
    scaled = g / operand if stage.combine == "div" else g * operand
    scaled = scaled.to(getattr(torch, stage.value_dtype)).float()
    if stage.clamp is not None:
        scaled = scaled.clamp(stage.clamp[0], stage.clamp[1])
    q = scaled.to(getattr(torch, stage.fp8_dtype)).reshape(*lead, d)
    scales = [_apply(p, amax).squeeze(-1) for p in stage.scales]
    return q, scales
