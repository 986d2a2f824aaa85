"""TP-reduced RMSNorms (MiniMax-M2.5's Q and K norms over the whole projected width) -> one braze op.

A site is an all-reduce of local means of squares (one packed [T, N] tensor,
or one all-reduce per norm) followed by each norm's normalization with its
local weight slice. It becomes `braze::tp_rmsnorm`: the local means, one packed
[T, N] fp32 all-reduce, the normalization (on CUDA at small T one kernel with the
exchange inside it, unless `braze.runtime.collective.TP_NORM_ONE_SHOT` is turned
off; see COLLECTIVE_DESIGN.md). Separate all-reduces of the same group and tokens that
do not depend on each other are packed into one. RoPE and the cache write after
the norm are left to the head-chain pass, which runs later.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from braze.patterns.collective import is_wait, match_all_reduce
from braze.patterns.fx import Miss, known_eq, topo_sorted, val
from braze.patterns.tp_norm import TPNormGroup, TPNormMatch, match_tp_norm

from .base import Pass, PassContext
from .rewrite import graph_fake_mode, splice, trace_functional, view_as


def fused_tp_norm_call(spec: str, group_name: str, symm_max_tokens: int):
    """The replacement: braze's TP-reduced norm op (see braze.runtime.collective)."""
    import braze.runtime.collective  # noqa: F401  registers the op

    def fn(*inputs: torch.Tensor) -> list[torch.Tensor]:
        return torch.ops.braze.tp_rmsnorm(list(inputs), spec, group_name, symm_max_tokens)

    return fn


def _inputs(m: TPNormMatch) -> list[Node]:
    return [n for s in m.sides for n in (s.x, s.weight) if n is not None]


def _rows(m: TPNormMatch) -> object:
    rows = 1
    for s in val(m.sides[0].x).shape[:-1]:
        rows = rows * s
    return rows


class TPNormFusion(Pass):
    name = "tp-norm"
    family = "collective"

    def run(self, gm: GraphModule, ctx: PassContext) -> None:
        graph = gm.graph
        matches: list[TPNormMatch] = []
        for wait in [n for n in graph.nodes if is_wait(n)]:
            ar = match_all_reduce(wait)
            if isinstance(ar, Miss):
                continue  # the all-reduce + norm pass reports all-reduces it cannot read
            m = match_tp_norm(ar)
            if isinstance(m, Miss):
                if m.candidate:
                    ctx.remark("missed", "tp-norm-not-fusable", wait, "TP-reduced RMSNorm not fused",
                               reason=m.reason, suggestion=m.suggestion, ops=("all_reduce", "rmsnorm"),
                               args={"group": ar.group_name})
                continue
            why = ctx.token_check(self.family, _rows(m))
            if why:
                ctx.remark("missed", "token-range", m.sides[0].anchor, "TP-reduced RMSNorm not fused", reason=why,
                           suggestion="widen FusionConfig.token_ranges['collective']", ops=("all_reduce", "rmsnorm"))
                continue
            matches.append(m)
        ctx.bump("tp-norm-sites", len(matches))
        fake_mode = graph_fake_mode(graph)
        renamed: dict[Node, Node] = {}  # outputs already replaced -> their new nodes (a later site may read them)
        for packed in _pack(graph, matches):
            spec = TPNormGroup(tuple(s.stage for m in packed for s in m.sides))
            inputs = [renamed.get(n, n) for m in packed for n in _inputs(m)]
            group_name = packed[0].ar.group_name
            try:
                fn = fused_tp_norm_call(spec.to_json(), group_name, ctx.config.symm_max_tokens)
                traced = trace_functional(fn, [n.meta["val"] for n in inputs], fake_mode)
            except Exception as e:  # a bug in braze must not break the user's compile
                ctx.remark("failed", "internal-error", packed[0].ar.wait,
                           "TP-reduced RMSNorm left unfused after an error in braze", reason=f"{type(e).__name__}: {e}",
                           suggestion="report this as a braze bug, with this remark", ops=("all_reduce", "rmsnorm"))
                continue
            outputs = [s.output for m in packed for s in m.sides]
            new_outputs = splice(graph, traced, inputs, packed[0].sides[0].anchor)
            for old, new in zip(outputs, new_outputs):
                renamed[old] = view_as(graph, new, old)
                old.replace_all_uses_with(renamed[old])
            graph.eliminate_dead_code()
            for m in packed:  # the original collectives must not run as well
                for node in (m.ar.wait, m.ar.start):
                    if not getattr(node, "_erased", False):
                        assert not node.users, f"{node} still has readers after its site was replaced"
                        graph.erase_node(node)
            ctx.bump("sites-fused")
            anchor = packed[0].sides[0].anchor
            ctx.remark("applied", "tp-norm", anchor,
                       f"fused {len(spec.sides)} RMSNorm(s) with {len(packed)} all-reduce(s) of their variances "
                       f"into one op with one packed [T, {len(spec.sides)}] fp32 all-reduce",
                       ops=("rmsnorm_local_variance", "all_reduce", "rmsnorm"),
                       args={"widths": [s.norm.width for s in spec.sides], "eps": spec.sides[0].norm.eps,
                             "group": group_name, "all_reduces_replaced": len(packed)})


def _pack(graph: torch.fx.Graph, matches: list[TPNormMatch]) -> list[list[TPNormMatch]]:
    """Matches grouped into ops: a match joins an earlier group of the same group name and token count when
    the fused op, placed after all their inputs, still comes before every reader of their outputs."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    groups: list[list[TPNormMatch]] = []
    for m in matches:
        for g in groups:
            if g[0].ar.group_name != m.ar.group_name or not known_eq(_rows(g[0]), _rows(m)):
                continue
            members = g + [m]
            last_input = order[topo_sorted([n for x in members for n in _inputs(x)])[-1]]
            readers = [u for x in members for s in x.sides for u in s.output.users]
            replaced = {n for x in members for n in x.nodes}
            if all(order[u] > last_input for u in readers) and not any(
                    n in replaced for x in members for n in _inputs(x)):
                g.append(m)
                break
        else:
            groups.append([m])
    return groups
