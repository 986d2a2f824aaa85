"""MoE routers as one kernel: softmax or sigmoid scores (+ a correction bias) -> top-k -> the chosen scores,
renormalized and scaled (braze.patterns.router) become `braze::router`; DeepSeek V3's group-limited choice too.

Stock Inductor runs a decode step's router as three kernels (the scores, ATen's or braze's top-k, the gather
with its normalization), each a launch over a tile of a few hundred values. Runs before the small-topk pass,
which takes the top-k sites this pass leaves.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from braze.patterns.fx import Miss, aten, is_op, val
from braze.patterns.router import Router, RouterMatch, match_router

from .base import Pass, PassContext
from .rewrite import graph_fake_mode, splice, trace_functional, view_as

OPS = ("scores", "topk", "gather", "renormalize")


def router_call(spec: Router):
    import braze.runtime.router  # noqa: F401  (registers the op)

    text = spec.to_json()

    def with_bias(logits, bias):
        return list(torch.ops.braze.router(logits, bias, text))

    def without(logits):
        return list(torch.ops.braze.router(logits, logits, text))  # (the logits stand in for the unread bias)

    return with_bias if spec.bias else without


def _ops(spec: Router) -> tuple[str, ...]:
    return ("scores", "topk", "gather") + (("renormalize",) if spec.renormalize else ())


class RouterFusion(Pass):
    name = "router"
    family = "router"

    def run(self, gm: GraphModule, ctx: PassContext) -> None:
        graph = gm.graph
        sites: list[RouterMatch] = []
        for n in list(graph.nodes):
            if not is_op(n, aten.topk):
                continue
            try:
                m = match_router(n)
            except Exception as e:  # a bug in braze's matcher must not break the user's compile
                ctx.remark("failed", "internal-error", n, "router left to Inductor after an error in braze",
                           reason=f"{type(e).__name__}: {e}", suggestion="report this as a braze bug", ops=OPS)
                continue
            if isinstance(m, RouterMatch):
                sites.append(m)
            elif isinstance(m, Miss) and m.candidate:
                ctx.remark("missed", "router-not-fused", m.node or n, "router left to Inductor and the top-k pass",
                           reason=m.reason, suggestion=m.suggestion, ops=OPS)
        ctx.bump("routers-recognized", len(sites))
        fake_mode = graph_fake_mode(graph) if sites else None
        for site in sites:
            s = site.spec
            tokens = val(site.logits).shape[0]
            why = ctx.token_check(self.family, tokens)
            if why:
                ctx.remark("missed", "token-range", site.topk, "router left to Inductor and the top-k pass",
                           reason=why, suggestion="widen FusionConfig.token_ranges['router']", ops=_ops(s))
                continue
            inputs = [site.logits] + ([site.bias] if site.bias is not None else [])
            try:
                traced = trace_functional(router_call(s), [n.meta["val"] for n in inputs], fake_mode)
            except Exception as e:  # a bug in braze must not break the user's compile
                ctx.remark("failed", "internal-error", site.topk, "router left unfused after an error in braze",
                           reason=f"{type(e).__name__}: {e}", suggestion="report this as a braze bug", ops=_ops(s))
                continue
            weights, ids = splice(graph, traced, inputs, site.topk)
            site.indices.replace_all_uses_with(view_as(graph, ids, site.indices))
            site.weights.replace_all_uses_with(view_as(graph, weights, site.weights))
            # the replaced topk is dead now: the PassManager's dead-code elimination removes it before small-topk runs
            groups = f" in the best {s.top_groups} of {s.groups} groups" if s.groups > 1 else ""
            how = f"{s.scoring}{' + bias' if s.bias else ''} -> top-{s.k} of {s.experts}{groups}" \
                + (" -> renormalize" if s.renormalize else "") + (f" -> x{s.scaling:g}" if s.scaling != 1.0 else "")
            ctx.remark("applied", "router", ids, f"fused the router ({how}) into one kernel", ops=_ops(s),
                       args={"experts": s.experts, "k": s.k, "scoring": s.scoring, "bias": s.bias,
                             "renormalize": s.renormalize, "scaling": s.scaling,
                             **({"groups": s.groups, "top_groups": s.top_groups} if s.groups > 1 else {})})
            ctx.bump("sites-fused")
