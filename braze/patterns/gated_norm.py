"""Gated RMSNorm `(x̂·w)·silu(z)` (Gated DeltaNet's output norm, Mamba 2's) in a post-grad ATen graph.

The norm itself is braze.patterns.rmsnorm's (any of its spellings, weight and casts
included); the gate is the multiply of its output by silu(z), z of the same rows,
computed in the dtype the graph gives it, then casts. The recognizer starts from a
recognized RMSNorm and walks forward through the gate; widths and eps stay wildcards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from .conv import _silu_nodes, _silu_of
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
    shape_of,
    single_user,
    strip_lossless_casts,
)
from .rmsnorm import NormMatch
from .stages import dtype_name
from .stages import round_to as _round


@dataclass(frozen=True)
class Gate:
    """y = y · silu(z): silu computed in fp32 and rounded to `act`, the product rounded to `dtype`,
    then to `out` (the casts after it)."""

    act: str
    dtype: str
    out: str
    kind: str = "silu_gate"


@dataclass(frozen=True)
class GatedNormMatch:
    norm: NormMatch
    gate: Gate
    z: Node  # [..., width] the gate's input (before any upcast)
    output: Node  # the gated value (after the casts that follow the product)
    nodes: frozenset[Node]  # the gate's nodes (the norm's are in norm.nodes)


def gate_reference(y: torch.Tensor, z: torch.Tensor, gate: Gate) -> torch.Tensor:
    """y (fp32-held) times silu(z), rounded like the graph; returned fp32-held."""
    zf = z.float()
    s = _round(zf * torch.sigmoid(zf), gate.act)
    return _round(_round(y * s, gate.dtype), gate.out)


def match_gate(norm: NormMatch) -> GatedNormMatch | Miss:
    """The silu gate that multiplies `norm`'s output, if there is one."""
    mul = single_user(norm.output)
    if not is_op(mul, aten.mul):
        return Miss("the norm output is not multiplied by a gate", candidate=False)
    a, b = binary_operands(mul)
    act = b if a is norm.output else a
    # silu(z) as the graph gives it: maybe computed in fp32 and cast down (a bf16 silu decomposes so)
    inner = act.args[0] if is_cast(act) else act
    s = _silu_of(inner) if isinstance(inner, Node) else None
    if s is None:
        return Miss(f"the norm output is multiplied by {describe(act) if isinstance(act, Node) else act}, "
                    "not by silu(z)", candidate=False)
    z = strip_lossless_casts(s)
    width = norm.stage.width
    zs, xs = shape_of(z), shape_of(norm.x)
    if zs is None or xs is None or not known_eq(zs[-1], width) or len(zs) != len(xs) or \
            not all(known_eq(p, q) for p, q in zip(zs, xs)):
        return Miss(f"the gate z of shape {zs} does not have the normed rows' shape {xs}",
                    "gate each row of the norm by a z row of the same width", node=mul)
    if dtype_of(inner) != torch.float32 or dtype_of(act) not in FLOAT_DTYPES:
        return Miss(f"silu(z) is computed in {dtype_of(inner)}; braze fuses the gate computed in fp32",
                    "upcast z: F.silu(z.float())", node=mul)
    nodes = _silu_nodes(act, s) | {mul} | ({s} if s is not z else set())
    out = mul
    while (u := single_user(out)) is not None and is_cast(u) and dtype_of(u) in FLOAT_DTYPES:
        out = u
        nodes.add(u)
    for n in nodes - {out}:
        extra = [u for u in n.users if u not in nodes]
        if extra:
            return Miss(f"the gate's intermediate {describe(n)} is also read by {describe(extra[0])}",
                        "read only the gated output", node=mul)
    gate = Gate(act=dtype_name(dtype_of(act)), dtype=dtype_name(dtype_of(mul)), out=dtype_name(dtype_of(out)))
    return GatedNormMatch(norm, gate, z, out, frozenset(nodes))
