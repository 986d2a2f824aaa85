"""Top-k over short rows: every `aten.topk` whose rows one Triton program can sort becomes `braze::topk`.

Decode steps select over short rows (routers' top-k of the experts and of expert groups, DeepSeek V3.2's
indexer over a short context), and ATen spends 5-22 µs per call on an H100 there (a radix select, or a
segmented sort of several passes) for what a single program sorts in registers (braze.patterns.topk).
Rows longer than `MAX_ROW` (2048: ATen's radix select is faster above), more than `LONG_ROW_MAX_ROWS` rows
(or a row count not known to be at most that) of more than `LONG_ROW` values, a dynamic row length or k,
dtypes other than float32, bfloat16 and float16 and other dims are left to ATen with a `missed` remark.
"""

from __future__ import annotations

import math
import operator

import torch
from torch.fx import GraphModule
from torch.fx.experimental.symbolic_shapes import statically_known_true

from braze.patterns.fx import aten, is_op
from braze.patterns.topk import LONG_ROW, LONG_ROW_MAX_ROWS, TopK, TopKMatch, match_topk

from .base import Pass, PassContext
from .rewrite import graph_fake_mode, splice, trace_functional

OPS = ("topk",)


def topk_call(spec: TopK):
    import braze.runtime.topk  # noqa: F401  (registers the op)

    text = spec.to_json()

    def fn(x):
        return list(torch.ops.braze.topk(x, text))

    return fn


class TopKSort(Pass):
    name = "small-topk"
    family = "topk"

    def run(self, gm: GraphModule, ctx: PassContext) -> None:
        graph = gm.graph
        sites: list[TopKMatch] = []
        for n in list(graph.nodes):
            if not is_op(n, aten.topk):
                continue
            m = match_topk(n)
            if isinstance(m, TopKMatch):
                sites.append(m)
            elif m.candidate:
                ctx.remark("missed", "topk-not-taken", n, "top-k left to ATen", reason=m.reason,
                           suggestion=m.suggestion, ops=OPS)
        ctx.bump("sites-recognized", len(sites))
        fake_mode = graph_fake_mode(graph) if sites else None
        for site in sites:
            s, node = site.spec, site.node
            rows = math.prod(site.x.meta["val"].shape[:-1])  # every row, e.g. T x groups
            why = ctx.token_check(self.family, rows)
            if why:
                ctx.remark("missed", "token-range", node, "top-k left to ATen", reason=why,
                           suggestion="widen FusionConfig.token_ranges['topk']", ops=OPS)
                continue
            if s.n > LONG_ROW and not statically_known_true(rows <= LONG_ROW_MAX_ROWS):
                ctx.remark("missed", "topk-not-taken", node, "top-k left to ATen",
                           reason=f"{rows} rows of {s.n} values: above {LONG_ROW_MAX_ROWS} rows of more than "
                                  f"{LONG_ROW} ATen's radix select is as fast", ops=OPS,
                           suggestion="bound the token range (FusionConfig.token_ranges['topk'])")
                continue
            users = list(node.users)
            if not all(u.target is operator.getitem for u in users):
                ctx.remark("missed", "topk-not-taken", node, "top-k left to ATen",
                           reason="its result is used other than through its values and indices", ops=OPS)
                continue
            try:
                traced = trace_functional(topk_call(s), [site.x.meta["val"]], fake_mode)
            except Exception as e:  # a bug in braze must not break the user's compile
                ctx.remark("failed", "internal-error", node, "top-k left to ATen after an error in braze",
                           reason=f"{type(e).__name__}: {e}", suggestion="report this as a braze bug", ops=OPS)
                continue
            outs = splice(graph, traced, [site.x], node)
            for u in users:
                u.replace_all_uses_with(outs[u.args[1]])
                graph.erase_node(u)
            graph.erase_node(node)
            ctx.remark("applied", "small-topk", outs[1], f"top-{s.k} of rows of {s.n} sorted in one kernel",
                       ops=OPS, args={"n": s.n, "k": s.k, "largest": s.largest, "dtype": s.dtype})
            ctx.bump("sites-fused")
