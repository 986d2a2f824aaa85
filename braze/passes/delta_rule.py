"""Delta-rule fusion: Gated DeltaNet's recurrent decode update (decay, u = Sᵀk, δ, S += kδᵀ, o = Sᵀq) as one kernel.

For every state write-back `copy_(state, index_put(state, [idx], S_new))` whose rows are the
gated delta rule's update (braze.patterns.delta_rule), the gather, the update, the readout o
and the write-back become `braze::delta_rule`, which updates the fp32 state rows in place
(Inductor drops the functional copy, as for the post-conv op's conv state). It runs after the
post-conv pass (whose outputs it then reads) and before the head-chain pass, which would
otherwise meet the [T, Hv, dk, dv] row write alone (a `store-layout` remark). Near misses
become `missed` remarks; the post-conv path stays a kernel of its own (POST_CONV_DESIGN.md).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.fx import GraphModule

from braze.patterns.delta_rule import (
    DeltaRule,
    DeltaRuleMatch,
    match_delta_rule,
    match_delta_rule_rows,
)
from braze.patterns.fx import Miss, aten, is_identity_index, val

from .base import Pass, PassContext
from .rewrite import graph_fake_mode, splice, trace_functional, view_as

OPS = ("repeat_interleave", "decay", "delta_rule", "state_store", "readout")

# Miss reasons -> remark names (the rest: delta-rule-not-recognized)
_NAMES = (("recurrent state is", "state-dtype"), ("state has strides", "state-layout"),
          ("[.., dv, dk] rows", "state-layout"), ("also read elsewhere", "delta-rule-value-escapes"))


def delta_rule_call(spec: DeltaRule):
    """The replacement: the fused op; returns o and the updated state (indexed), or o and the new rows."""
    import braze.runtime.delta_rule  # noqa: F401  (registers the op)

    text = spec.to_json()

    def fn(q, k, v, g, beta, idx, state):
        o = torch.ops.braze.delta_rule(q, k, v, g, beta, idx, state, text)
        return [o, state]

    def first_rows(q, k, v, g, beta, state):
        o = torch.ops.braze.delta_rule_first_rows(q, k, v, g, beta, state, text)
        return [o, state]

    def rows(q, k, v, g, beta, state):
        return torch.ops.braze.delta_rule_rows(q, k, v, g, beta, state, text)

    if spec.indexed:
        return first_rows if spec.identity else fn
    return rows


def miss_name(m: Miss) -> str:
    return next((name for key, name in _NAMES if key in m.reason), "delta-rule-not-recognized")


class DeltaRuleFusion(Pass):
    name = "delta-rule"
    family = "delta_rule"

    def run(self, gm: GraphModule, ctx: PassContext) -> None:
        graph = gm.graph
        sites: list[DeltaRuleMatch] = []
        for n in list(graph.nodes):
            if n.target is aten.copy_.default:
                m = match_delta_rule(n)
                if isinstance(m, DeltaRuleMatch):
                    sites.append(m)
                elif m.candidate:
                    ctx.remark("missed", miss_name(m), m.node or n, "delta-rule update not fused",
                               reason=m.reason, suggestion=m.suggestion, ops=("delta_rule",))
        taken = {n for site in sites for n in site.inner}
        for n in list(graph.nodes):  # the form without slot indices (Hugging Face's): S1 is a value, not written back
            if n.target is aten.add.Tensor and n not in taken:
                m = match_delta_rule_rows(n)
                if isinstance(m, DeltaRuleMatch):
                    sites.append(m)
                    taken |= m.inner
                elif m.candidate:
                    ctx.remark("missed", miss_name(m), m.node or n, "delta-rule update not fused",
                               reason=m.reason, suggestion=m.suggestion, ops=("delta_rule",))
        ctx.bump("updates-recognized", len(sites))
        fake_mode = graph_fake_mode(graph) if sites else None
        for site in sites:
            why = ctx.token_check(self.family, val(site.q).shape[0])
            if why:
                ctx.remark("missed", "token-range", site.output, "delta-rule update not fused", reason=why,
                           suggestion="widen FusionConfig.token_ranges['delta_rule']", ops=OPS)
                continue
            if site.spec.indexed and is_identity_index(site.indices, val(site.q).shape[0]):
                # state_indices = arange(T): rows 0..T-1, updated in place with no index read
                site = replace(site, spec=replace(site.spec, identity=True), indices=None)
            inputs = [site.q, site.k, site.v, site.g, site.beta] + ([site.indices] if site.indices is not None
                                                                     else []) + [site.state]
            try:
                traced = trace_functional(delta_rule_call(site.spec), [n.meta["val"] for n in inputs], fake_mode)
            except Exception as e:  # a bug in braze must not break the user's compile
                ctx.remark("failed", "internal-error", site.output, "delta-rule update left unfused after an error "
                           "in braze", reason=f"{type(e).__name__}: {e}", suggestion="report this as a braze bug",
                           ops=("delta_rule",))
                continue
            o, state = splice(graph, traced, inputs, site.output)
            site.output.replace_all_uses_with(view_as(graph, o, site.output))
            if site.spec.indexed:
                site.copy.args = (site.copy.args[0], state)
            else:  # the new rows replace S1 wherever it is read (the cache update, a copy back)
                site.new_state.replace_all_uses_with(view_as(graph, state, site.new_state))
            s = site.spec
            ctx.remark("applied", "delta-rule", site.output, "fused the gated delta-rule update into one kernel "
                       "(state rows updated in place)" if s.indexed else "fused the gated delta-rule update into one "
                       "kernel (new state rows)", ops=OPS if s.heads_v != s.heads_k else OPS[1:],
                       args={"heads_k": s.heads_k, "heads_v": s.heads_v, "dk": s.dk, "dv": s.dv, "scale": s.scale,
                             **({"rows": "arange(T)"} if s.identity else {})})
            ctx.bump("sites-fused")
        if sites:
            from .post_conv import _restore_topological_order

            _restore_topological_order(graph)  # S1's readers may precede q, the op's last input
