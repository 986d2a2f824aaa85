"""Gated RMSNorm fusion: (x̂·w)·silu(z) [-> FP8 quant] as one generated row kernel.

For every RMSNorm whose output is multiplied by silu(z) (braze.patterns.gated_norm), the
pass builds a RowChain with a gate stage (braze.codegen.rowwise) and replaces the gated
output; when the gated rows are FP8-quantized with one scale per row-sized group (the
next linear is FP8 and its groups align with the norm's rows, as Qwen 3.5's 128-wide
value heads and 128-value groups do), the quant joins the same kernel. It runs before
the norm-quant pass, which would otherwise report that quant as reading a non-norm.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import GraphModule, Node

from braze.patterns.fx import aten, is_op, is_view, known_eq, val
from braze.patterns.gated_norm import GatedNormMatch, match_gate
from braze.patterns.quant import QuantMatch, fp8_quants_by_value
from braze.patterns.rmsnorm import NormMatch, match_rmsnorm
from braze.patterns.stages import RowChain, dtype_name

from .base import Pass, PassContext
from .norm_quant import fused_call
from .rewrite import graph_fake_mode, splice, trace_functional, view_as


def _through_views(node: Node) -> Node:
    while is_view(node):
        node = node.args[0]
    return node


class GatedNormFusion(Pass):
    name = "gated-norm"
    family = "gated_norm"

    def run(self, gm: GraphModule, ctx: PassContext) -> None:
        graph = gm.graph
        quants = fp8_quants_by_value(graph)
        matches = gated_norms(graph, ctx)
        ctx.bump("gated-norms-recognized", len(matches))
        fake_mode = graph_fake_mode(graph)
        for m in matches:
            try:
                planned = plan_gated_norm(m, quants, ctx)
                if planned is None:
                    continue
                chain, inputs, outputs = planned
                traced = trace_functional(fused_call(chain.to_json()), [val(i) for i in inputs], fake_mode)
            except Exception as e:  # a bug in braze must not break the user's compile
                ctx.remark("failed", "internal-error", m.norm.anchor, "gated RMSNorm left unfused after an error in braze",
                           reason=f"{type(e).__name__}: {e}", suggestion="report this as a braze bug",
                           ops=("rmsnorm", "silu_gate"))
                continue
            new = splice(graph, traced, inputs, m.norm.anchor)
            for old, out in zip(outputs, new):
                old.replace_all_uses_with(view_as(graph, out, old))
            ops = ("rmsnorm", "silu_gate") + (("fp8_quant",) if chain.quant else ())
            args = {"width": chain.width, "eps": chain.norm.eps}
            if chain.quant:
                args["group_size"] = chain.quant.group_size
            ctx.remark("applied", "gated-norm", m.norm.anchor, f"fused {' -> '.join(ops)} into one kernel",
                       ops=ops, args=args)
            ctx.bump("sites-fused")


def gated_norms(graph, ctx: PassContext | None) -> list[GatedNormMatch]:
    """Every gated RMSNorm of the graph; a near miss gets a `gate-not-fused` remark (a look-ahead passes no ctx)."""
    matches: list[GatedNormMatch] = []
    for n in graph.nodes:
        if not is_op(n, aten.mean):
            continue
        norm = match_rmsnorm(n)
        if not isinstance(norm, NormMatch):
            continue
        m = match_gate(norm)
        if isinstance(m, GatedNormMatch):
            matches.append(m)
        elif m.candidate and ctx is not None:
            ctx.remark("missed", "gate-not-fused", m.node or norm.anchor, "gated RMSNorm left to Inductor",
                       reason=m.reason, suggestion=m.suggestion, ops=("rmsnorm", "silu_gate"))
    return matches


def plan_gated_norm(m: GatedNormMatch, quants: dict[Node, QuantMatch], ctx: PassContext,
                    family: str = "gated_norm") -> tuple[RowChain, list[Node], list[Node]] | None:
    """The row chain of a gated norm (with the FP8 quant after it where its groups are the norm's rows), its
    inputs (x, [weight], z) and the graph values its outputs replace; None (with a remark) outside the token
    range of `family`."""
    norm, width = m.norm, m.norm.stage.width
    x_val = val(norm.x)
    rows = 1
    for s in x_val.shape[:-1]:
        rows = rows * s
    why = ctx.token_check(family, rows)
    if why:
        ctx.remark("missed", "token-range", norm.anchor, "gated RMSNorm not fused", reason=why,
                   suggestion=f"widen FusionConfig.token_ranges['{family}']", ops=("rmsnorm", "silu_gate"))
        return None
    quant = quants.get(_through_views(m.output)) or quants.get(m.output)
    if quant is not None and not known_eq(quant.stage.group_size, width):
        ctx.remark("missed", "quant-layout", quant.q, "FP8 quant left out of the gated RMSNorm",
                   reason=f"quantizes groups of {quant.stage.group_size} values across rows of {width}: "
                          "braze's row kernel quantizes one group per normed row",
                   ops=("rmsnorm", "silu_gate", "fp8_quant"))
        quant = None
    if quant is not None and not quant.scale_nodes:
        quant = None
    inside = set(norm.nodes) | set(m.nodes) | (set(quant.nodes) if quant else set())
    store = quant is None or any(u not in inside and not _only_views_into(u, set(quant.nodes))
                                 for u in m.output.users)
    chain = RowChain(in_dtype=dtype_name(x_val.dtype), residual=None,
                     norm=dataclasses.replace(norm.stage, store=store),
                     quant=quant.stage if quant else None, gate=m.gate)
    inputs = [norm.x] + ([norm.weight] if norm.weight is not None else []) + [m.z]
    outputs = ([m.output] if store else []) + ([quant.q, *quant.scale_nodes] if quant else [])
    return chain, inputs, outputs


def _only_views_into(node: Node, targets: set[Node]) -> bool:
    if node in targets:
        return True
    return (is_view(node) or node.target is torch.ops.prims.convert_element_type.default) and \
        all(_only_views_into(u, targets) for u in node.users)
