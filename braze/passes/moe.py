"""Routed-experts fusion: the sorted, grouped-GEMM SwiGLU experts of a small decode step as two kernels.

For every second grouped GEMM of a SwiGLU expert pair (braze.patterns.moe) the sort of the
(token, expert) pairs, the gathers, both grouped GEMMs, the SwiGLU, the un-sort and the weighted sum
over the k slots become `braze::moe_experts`, which computes each pair in place with no sort. Only
while the pairs do not outnumber the experts (S = T·k <= E): each pair then reads its expert's weights
about once, as the grouped GEMMs do; with more pairs than experts the GEMV kernels would read an
expert's weights once per pair, and the grouped GEMMs are left alone (a `pairs-exceed-experts` remark).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.fx import GraphModule

from braze.patterns.fx import Miss, aten, is_op, val
from braze.patterns.moe import Experts, ExpertsMatch, match_experts, match_shared_expert

from .base import Pass, PassContext
from .rewrite import graph_fake_mode, splice, trace_functional, view_as

OPS = ("sort", "gather", "grouped_mm", "silu_mul", "grouped_mm", "unsort", "weighted_sum")
SHARED_OPS = ("shared_gate_up", "shared_silu_mul", "shared_down", "shared_add")


def experts_call(spec: Experts):
    import braze.runtime.moe  # noqa: F401  (registers the op)

    text = spec.to_json()

    def fn(x, w13, w2, idx, weights):
        return [torch.ops.braze.moe_experts(x, w13, w2, idx, weights, text)]

    def with_shared(x, w13, w2, idx, weights, ws13, ws2, *gate):
        g = gate[0] if gate else x  # (x stands in for the unread gate of a plain shared expert)
        return [torch.ops.braze.moe_experts_shared(x, w13, w2, idx, weights, ws13, ws2, g, text)]

    return fn if spec.shared == "none" else with_shared


class ExpertsFusion(Pass):
    name = "moe-experts"
    family = "moe"

    def run(self, gm: GraphModule, ctx: PassContext) -> None:
        graph = gm.graph
        sites: list[ExpertsMatch] = []
        for n in list(graph.nodes):
            if not is_op(n, aten._grouped_mm):
                continue
            m = match_experts(n)
            if isinstance(m, ExpertsMatch):
                sites.append(m)
            elif m.candidate:
                ctx.remark("missed", "experts-not-recognized", m.node or n, "routed experts not fused",
                           reason=m.reason, suggestion=m.suggestion, ops=OPS)
        ctx.bump("sites-recognized", len(sites))
        fake_mode = graph_fake_mode(graph) if sites else None
        for site in sites:
            s = site.spec
            pairs = s.tokens * s.top_k
            why = ctx.token_check(self.family, s.tokens)
            if why:
                ctx.remark("missed", "token-range", site.output, "routed experts not fused", reason=why,
                           suggestion="widen FusionConfig.token_ranges['moe']", ops=OPS)
                continue
            if pairs > s.experts:
                ctx.remark("missed", "pairs-exceed-experts", site.output, "routed experts left to the grouped GEMMs",
                           reason=f"{s.tokens} tokens x top-{s.top_k} = {pairs} (token, expert) pairs for {s.experts} "
                           "experts: the fused kernels would read an expert's weights once per pair choosing it, "
                           "the grouped GEMMs once", suggestion="", ops=OPS)
                continue
            inputs = [site.x, site.w13, site.w2, site.idx, site.weights]
            shared = match_shared_expert(site) if ctx.config.moe_shared else Miss("off", candidate=False)
            if not isinstance(shared, Miss):
                mb = _weight_mb(shared.w13, shared.w2)
                if mb is None or mb > ctx.config.moe_shared_max_mb:
                    shared = Miss(f"its weights are {'of unknown size' if mb is None else f'{mb:.3g} MB'}, above "
                                  f"FusionConfig.moe_shared_max_mb = {ctx.config.moe_shared_max_mb:g} (a large shared "
                                  "expert is faster as cuBLAS GEMMs beside the fused routed experts)",
                                  node=site.output, suggestion="raise FusionConfig.moe_shared_max_mb to fold it")
            if isinstance(shared, Miss):
                if shared.candidate:
                    ctx.remark("missed", "shared-expert-apart", shared.node or site.output, "shared expert left to "
                               "Inductor beside the fused routed experts", reason=shared.reason,
                               suggestion=shared.suggestion, ops=SHARED_OPS)
                shared = None
            else:
                s = replace(s, shared=shared.gate)
                inputs += [shared.w13, shared.w2] + ([shared.gate_logit] if shared.gate_logit is not None else [])
            output = shared.output if shared is not None else site.output
            try:
                traced = trace_functional(experts_call(s), [n.meta["val"] for n in inputs], fake_mode)
            except Exception as e:  # a bug in braze must not break the user's compile
                ctx.remark("failed", "internal-error", site.output, "routed experts left unfused after an error "
                           "in braze", reason=f"{type(e).__name__}: {e}", suggestion="report this as a braze bug",
                           ops=OPS)
                continue
            (y,) = splice(graph, traced, inputs, output)
            output.replace_all_uses_with(view_as(graph, y, output))
            what = "the routed SwiGLU experts" + (f" and the shared expert ({shared.gate})" if shared else "")
            ctx.remark("applied", "moe-experts", site.output, f"fused {what} into two kernels (no sort, no gathers)",
                       ops=OPS + (SHARED_OPS if shared else ()),
                       args={"tokens": s.tokens, "top_k": s.top_k, "experts": s.experts, "hidden": s.hidden,
                             "inter": s.inter, **({"shared": shared.gate} if shared else {})})
            ctx.bump("sites-fused")


def _weight_mb(*weights) -> float | None:
    """MB of the weights (static sizes), or None when a size is symbolic."""
    total = 0
    for w in weights:
        v = val(w)
        if v is None or not isinstance(v.numel(), int):
            return None
        total += v.numel() * v.element_size()
    return total / 1e6
