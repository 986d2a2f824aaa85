"""Post-conv fusion: Gated DeltaNet's conv update -> split -> L2 norm of q, k -> gating as one kernel.

For every causal conv update the recognizer finds (braze.patterns.conv), the pass takes
the conv output's split into segments (q, k, v: any number, any widths), the per-head L2
norm of the segments that have one, and the gating g = -exp(A_log)·softplus(a + dt_bias),
beta = sigmoid(b) whose results meet the segments' within a few ops (in the recurrent
update they all feed). The site becomes one generated kernel (braze.codegen.post_conv)
whose outputs replace the normed q, k, the plain v, g and beta; the conv state is shifted
in place (the fused op mutates it, so Inductor drops the functional copy, as for the
head-chain cache writes). It runs before the head-chain pass, which otherwise takes the
conv state write alone as a store-only chain. Near misses become `missed` remarks.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace

import torch
from torch.fx import Graph, GraphModule, Node

from braze.patterns.conv import ConvMatch, match_conv_update, match_conv_window
from braze.patterns.fx import (
    Miss,
    aten,
    describe,
    dtype_of,
    is_cast,
    is_identity_index,
    is_lossless,
    is_op,
    is_view,
    known_eq,
    shape_of,
    val,
)
from braze.patterns.gdn import (
    GatingMatch,
    L2NormMatch,
    PostConv,
    Segment,
    match_beta,
    match_gating,
    match_l2norm,
)
from braze.patterns.stages import dtype_name

from .base import Pass, PassContext
from .rewrite import graph_fake_mode, splice, trace_functional, view_as

_REACH = 10  # ops between the post-conv outputs and the gating's where both feed the recurrent update


@dataclass
class _Site:
    conv: ConvMatch
    segments: list[Segment]
    replaced: list[Node]  # per segment, the node its output replaces
    gating: GatingMatch | None
    beta: tuple[Node, Node] | None  # (b, sigmoid)
    # per segment, the row-preserving ops (repeat_interleave, transposes) between the segment and its
    # L2 norm; they are replayed on the fused op's normed output
    paths: list[list[Node]] | None = None


@dataclass(frozen=True)
class PostConvSplice:
    """A fused post-conv site as the pass left it, for the delta-rule pass to fold into its kernel."""

    spec: PostConv
    inputs: list[Node]  # the op's inputs (PostConv.input_names), the state apart
    conv_state: Node  # the conv state (a graph input)
    outputs: list[Node]  # the nodes holding each output (PostConv.output_specs order)
    state: Node  # the op's shifted state, which the write-back copies into conv_state
    replayed: bool  # some output is the normed rows after replayed row moves (Hugging Face's repeats)
    nodes: frozenset[Node]  # every node the splice added
    remark: object  # its `applied` remark (report.Remark), withdrawn when a later pass takes the site over


def post_conv_call(spec: PostConv):
    """The replacement: the fused op; returns its outputs and the shifted state."""
    from braze.runtime.post_conv import unpack  # registers the op

    text = spec.to_json()

    def fn(*args: torch.Tensor) -> list[torch.Tensor]:
        inputs, state = list(args[:-1]), args[-1]
        bufs = torch.ops.braze.post_conv(inputs, state, text)
        return [*unpack(spec, bufs, inputs[0].shape[0]), state]

    return fn


def _reach(nodes: list[Node], depth: int = _REACH) -> set[Node]:
    """Nodes within `depth` uses of `nodes` (the graph's output excluded: meeting there proves nothing)."""
    seen, frontier = set(nodes), list(nodes)
    for _ in range(depth):
        frontier = [u for n in frontier for u in n.users if u not in seen and u.op != "output"]
        seen.update(frontier)
    return seen


def _closure(nodes: list[Node], step) -> set[Node]:
    """Every node reachable from `nodes` by repeated `step` (a node -> its neighbours), `nodes` excluded
    unless reached again."""
    seen: set[Node] = set()
    stack = list(nodes)
    while stack:
        for a in step(stack.pop()):
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def _ancestors(nodes: list[Node]) -> set[Node]:
    """Every node that `nodes` depend on."""
    return _closure(nodes, lambda n: n.all_input_nodes)


def _descendants(nodes: list[Node]) -> set[Node]:
    """Every node that depends on `nodes`."""
    return _closure(nodes, lambda n: n.users)


def _escapes(nodes: frozenset[Node] | set[Node], keep: set[Node]) -> Node | None:
    """A node of `nodes` read from outside them (other than the `keep` results), else None."""
    for n in nodes:
        if n in keep:
            continue
        if any(u not in nodes for u in n.users):
            return n
    return None


class PostConvFusion(Pass):
    name = "post-conv"
    family = "post_conv"

    def run(self, gm: GraphModule, ctx: PassContext) -> None:
        graph = gm.graph
        convs: list[ConvMatch] = []
        for n in graph.nodes:
            if n.target is aten.copy_.default:
                m = match_conv_update(n)
                if isinstance(m, Miss) and not m.candidate:
                    m = match_conv_window(n)
                if isinstance(m, ConvMatch):
                    convs.append(m)
                elif m.candidate:
                    ctx.remark("missed", "conv-not-recognized", m.node or n, "causal conv update not fused",
                               reason=m.reason, suggestion=m.suggestion, ops=("conv_update",))
        ctx.bump("conv-updates-recognized", len(convs))
        if not convs:
            return
        l2: dict[Node, L2NormMatch | Miss] = {}
        gates: list[GatingMatch] = []
        for n in graph.nodes:
            if is_op(n, aten.sum):
                m = match_l2norm(n)
                if isinstance(m, L2NormMatch) or (m.candidate and m.node is not None):
                    l2[m.x if isinstance(m, L2NormMatch) else m.node] = m
            elif is_op(n, aten.mul, aten.neg):
                g = match_gating(n)
                if isinstance(g, GatingMatch):
                    gates.append(g)
                elif g.candidate:
                    ctx.remark("missed", "gating-not-fused", n, "gating left to Inductor",
                               reason=g.reason, suggestion=g.suggestion, ops=("gdn_gating",))
        sigmoids = [n for n in graph.nodes if is_op(n, aten.sigmoid)]
        fake_mode = graph_fake_mode(graph)
        taken: set[Node] = set()
        for conv in convs:
            try:
                site = self._site(conv, l2, gates, sigmoids, taken, ctx)
                if site is None:
                    continue
                why = ctx.token_check(self.family, val(conv.x).shape[0])
                if why:
                    ctx.remark("missed", "token-range", conv.output, "post-conv path not fused", reason=why,
                               suggestion="widen FusionConfig.token_ranges['post_conv']", ops=self._ops(site))
                    continue
                if conv.stage.indexed and is_identity_index(conv.indices, val(conv.x).shape[0]):
                    # state_indices = arange(T): token t's row is row t, so the kernel reads no index
                    conv = replace(conv, stage=replace(conv.stage, indexed=False), indices=None)
                spec = PostConv(conv.stage, tuple(site.segments), self._gating_stage(site))
                if site.gating is not None and spec.gating.beta_out not in ("float32", conv.stage.out):
                    ctx.remark("missed", "gating-not-fused", site.beta[1], "gating left to Inductor",
                               reason=f"beta in {spec.gating.beta_out}: the fused op returns fp32 and "
                                      f"{conv.stage.out} values", ops=("gdn_gating",))
                    site.gating = site.beta = None
                    spec = PostConv(conv.stage, tuple(site.segments), None)
                x = conv.x
                if len(shape_of(x)) == 3:  # [B, C, 1]: one token per sequence
                    with graph.inserting_after(x):
                        x = graph.call_function(aten.squeeze.dim, (conv.x, -1))
                    x.meta["val"] = val(conv.x).squeeze(-1)
                inputs = [x, conv.weight] + ([conv.indices] if conv.stage.indexed else [])
                if site.gating is not None:
                    inputs += [site.gating.a, site.beta[0], site.gating.a_log, site.gating.dt_bias]
                traced = trace_functional(post_conv_call(spec), [n.meta["val"] for n in inputs + [conv.state]],
                                          fake_mode)
            except Exception as e:  # a bug in braze must not break the user's compile
                ctx.remark("failed", "internal-error", conv.output, "post-conv path left unfused after an error in braze",
                           reason=f"{type(e).__name__}: {e}", suggestion="report this as a braze bug",
                           ops=("conv_update",))
                continue
            before = set(graph.nodes)
            outs, state = self._replace(graph, site, traced, inputs + [conv.state], fake_mode)
            if site.gating is not None:
                taken |= {site.gating.g, site.beta[1]}
            remark = ctx.remark("applied", "post-conv", conv.index_put,
                                f"fused {' -> '.join(self._ops(site))} into one kernel", ops=self._ops(site),
                                args=self._args(spec))
            ctx.shared.setdefault("post_conv", []).append(
                PostConvSplice(spec, inputs, conv.state, outs, state, any(map(_moves_rows, site.paths or ())),
                               frozenset(set(graph.nodes) - before), remark))
            ctx.bump("sites-fused")
        _restore_topological_order(graph)

    # ---- planning

    def _site(self, conv: ConvMatch, l2: dict, gates: list[GatingMatch], sigmoids: list[Node], taken: set[Node],
              ctx: PassContext) -> _Site | None:
        ops = ("conv_update",)
        leak = _escapes(conv.nodes, {conv.output, conv.index_put})
        if leak is not None or any(u is not conv.copy for u in conv.index_put.users):
            ctx.remark("missed", "conv-intermediate-escapes", conv.output, "causal conv update not fused",
                       reason=f"{describe(leak or conv.index_put)} is also read outside the conv update",
                       suggestion="read only the conv output and the written state", ops=ops)
            return None
        y, C = conv.output, conv.stage.channels
        slices = self._split(_same_order(y), C)
        segments: list[Segment] = []
        replaced: list[Node] = []
        paths: list[list[Node]] = []
        if slices is None:  # the whole output, as it is
            segments.append(Segment(0, 1, C, None))
            replaced.append(y)
            paths.append([])
        for start, node in slices or []:
            width = shape_of(node)[-1]
            seg, out, path = self._segment(node, start, width, l2, ctx)
            segments.append(seg)
            replaced.append(out)
            paths.append(path)
        site = _Site(conv, segments, replaced, None, None, paths)
        self._pair_gating(site, gates, sigmoids, taken, ctx)
        return site

    @staticmethod
    def _split(y: Node, channels: int) -> list[tuple[int, Node]] | None:
        """(start, slice) of each segment when every reader of y is a slice of the last dim and they tile it."""
        parts, rank = [], len(shape_of(y))
        for u in y.users:
            if not (is_op(u, aten.slice) and u.args[1] % rank == rank - 1 and (len(u.args) < 5 or u.args[4] == 1)):
                return None
            start, end = u.args[2], min(u.args[3], channels)
            parts.append((start, end, u))
        parts.sort(key=lambda p: p[0])
        edge = 0
        for start, end, _ in parts:
            if start != edge:
                return None
            edge = end
        return [(s, u) for s, _, u in parts] if edge == channels and len(parts) > 1 else None

    def _segment(self, node: Node, start: int, width: int, l2: dict,
                 ctx: PassContext) -> tuple[Segment, Node, list[Node]]:
        """The segment's stage, the node its output replaces, and the ops replayed on that output."""
        path, cand = _rows_path(node, l2)
        m = l2.get(cand) if cand is not None else None
        if isinstance(m, Miss):
            ctx.remark("missed", "l2norm-not-fused", cand, "L2 norm left to Inductor", reason=m.reason,
                       suggestion=m.suggestion, ops=("l2norm",))
        elif m is not None:
            hd = shape_of(cand)[-1]
            inside = set(m.nodes) | set(path)
            if any(len(n.users) != 1 for n in [node] + path[:-1]) or _escapes(inside, {m.output}) is not None:
                ctx.remark("missed", "l2norm-input-escapes", cand, "L2 norm left to Inductor",
                           reason=f"the normalized values {describe(cand)} are also read elsewhere",
                           suggestion="read only the normed q and k", ops=("l2norm",))
            elif isinstance(hd, int) and width % hd == 0:
                return Segment(start, width // hd, hd, m.stage), m.output, path
        views = [u for u in node.users if is_view(u) and len(shape_of(u) or ()) >= 3]
        if len(views) == 1 and len(node.users) == 1 and isinstance(shape_of(views[0])[-1], int) \
                and width % shape_of(views[0])[-1] == 0:
            hd = shape_of(views[0])[-1]
            return Segment(start, width // hd, hd, None), views[0], []
        return Segment(start, 1, width, None), node, []

    def _pair_gating(self, site: _Site, gates: list[GatingMatch], sigmoids: list[Node], taken: set[Node],
                     ctx: PassContext) -> None:
        """The gating whose g and beta meet this site's outputs within _REACH ops (the recurrent update)."""
        near = _reach(site.replaced)
        t = val(site.conv.x).shape[0]
        # A g or sigmoid the conv input depends on (another layer's, e.g. a shared-expert gate σ(x·w) of
        # T·Hv values when Hv = 1), or one computed from the conv's own outputs, cannot be this site's:
        # the fused op would feed its own input (a cycle).
        foreign = _ancestors([site.conv.x]) | _descendants([site.conv.x])
        for g in gates:
            hv = g.stage.heads
            if g.g in taken or g.g in foreign or not (_reach([g.g]) & near) \
                    or not known_eq(val(g.a).numel(), t * hv):
                continue
            for sig in sigmoids:
                if sig in taken or sig in foreign or not (_reach([sig]) & near):
                    continue
                beta = match_beta(sig, hv)
                if isinstance(beta, Miss) or not known_eq(val(beta[0]).numel(), t * hv):
                    continue
                b, nodes = beta
                leak = _escapes(set(g.nodes), {g.g}) or _escapes(nodes, {sig})
                if leak is not None:
                    ctx.remark("missed", "gating-not-fused", g.g, "gating left to Inductor",
                               reason=f"{describe(leak)} is also read outside the gating", ops=("gdn_gating",))
                    return
                site.gating, site.beta = g, (b, sig)
                return
            ctx.remark("missed", "gating-not-fused", g.g, "gating left to Inductor",
                       reason="no beta = sigmoid(b) of the same heads meets the post-conv outputs", ops=("gdn_gating",))
            return

    @staticmethod
    def _gating_stage(site: _Site):
        if site.gating is None:
            return None
        import dataclasses

        return dataclasses.replace(site.gating.stage, g_out=dtype_name(dtype_of(site.gating.g)),
                                   beta_out=dtype_name(dtype_of(site.beta[1])))

    @staticmethod
    def _ops(site: _Site) -> tuple[str, ...]:
        ops = ["conv_update"] + (["silu"] if site.conv.stage.act == "silu" else [])
        if len(site.segments) > 1:
            ops.append("split")
        if any(s.norm is not None for s in site.segments):
            ops.append("l2norm")
        if site.gating is not None:
            ops.append("gdn_gating")
        return tuple(ops)

    @staticmethod
    def _args(spec: PostConv) -> dict[str, object]:
        segs = ",".join(f"{s.heads}x{s.head_dim}{'(l2)' if s.norm else ''}" for s in spec.segments)
        args: dict[str, object] = {"channels": spec.conv.channels, "conv_width": spec.conv.width, "segments": segs}
        eps = {s.norm.eps for s in spec.segments if s.norm}
        if eps:
            args["eps"] = sorted(eps)[0] if len(eps) == 1 else sorted(eps)
        if spec.gating:
            args["gating_heads"] = spec.gating.heads
        return args

    # ---- rewriting

    @staticmethod
    def _replace(graph: Graph, site: _Site, traced: GraphModule, args: list[Node], fake_mode) -> tuple[list[Node], Node]:
        """Splice the op in; returns the nodes now holding each output (PostConv.output_specs order) and the state."""
        new = splice(graph, traced, args, site.conv.output)
        outs, state = new[:-1], new[-1]
        held = []
        for old, out, path in zip(site.replaced, outs, site.paths):
            if path:  # the L2 norm was taken after row-preserving ops: apply them to the normed rows
                out = _replay(graph, view_as(graph, out, path[0].args[0]), path, fake_mode)
            held.append(view_as(graph, out, old))
            old.replace_all_uses_with(held[-1])
        if site.gating is not None:
            g, beta = outs[len(site.replaced):]
            for old, out in ((site.gating.g, g), (site.beta[1], beta)):
                held.append(view_as(graph, out, old))
                old.replace_all_uses_with(held[-1])
        conv = site.conv
        held_state = view_as(graph, state, conv.index_put)
        conv.index_put.replace_all_uses_with(held_state)
        conv.copy.args = (conv.copy.args[0], state)
        return held, state


def _same_order(y: Node) -> Node:
    """y through views and size-1 permutes that keep its logical element order (HF's [B, C, 1] -> [B, 1, C])."""
    while len(y.users) == 1:
        u = next(iter(y.users))
        if is_view(u):
            y = u
        elif is_op(u, aten.permute):
            shape = shape_of(y)
            kept = [d for d in u.args[1] if not known_eq(shape[d], 1)]
            if kept != sorted(kept):
                break
            y = u
        else:
            break
    return y


# Ops that move or repeat whole rows of the last dim, never mixing values within a row: an L2 norm
# of their result is their result of the L2 norm (repeat_interleave decomposes into these).
_ROW_OPS = (aten.view, aten.reshape, aten._unsafe_view, aten.unsqueeze, aten.expand, aten.clone, aten.permute)


def _rows_path(node: Node, l2: dict) -> tuple[list[Node], Node | None]:
    """The single-user chain of row ops from a segment to the input of an L2 norm (in `l2`), if any."""
    path: list[Node] = []
    cur, d = node, None
    for _ in range(12):
        if cur in l2 and cur is not node:
            return path, cur
        if len(cur.users) != 1:
            break
        u = next(iter(cur.users))
        shape, ushape = shape_of(cur), shape_of(u)
        if ushape is None or shape is None:
            break
        if is_cast(u) and is_lossless(dtype_of(cur), dtype_of(u)):
            pass
        elif not is_op(u, *_ROW_OPS):
            break
        elif is_op(u, aten.unsqueeze) and u.args[1] % (len(shape) + 1) == len(shape):
            break
        elif is_op(u, aten.permute) and u.args[1][-1] % len(shape) != len(shape) - 1:
            break
        elif d is not None and not known_eq(ushape[-1], d):
            break
        if d is None and is_view(u):
            d = ushape[-1]
        path.append(u)
        cur = u
    if cur in l2 and cur is not node:
        return path, cur
    return [], None


def _moves_rows(path: list[Node]) -> bool:
    """Whether replaying `path` reorders or repeats rows (HF's repeat_interleave, a transpose), beyond reshapes and
    casts that keep every value where it is."""
    return any(not (is_view(n) or is_cast(n) or is_op(n, aten.unsqueeze, aten.squeeze)) for n in path)


def _replay(graph: Graph, start: Node, path: list[Node], fake_mode) -> Node:
    """`path`'s ops applied again, to `start` in place of the path's first input. Its casts (lossless
    upcasts to the norm's fp32) are dropped: the fused op's normed values are fp32 already."""
    from torch.fx.node import map_arg

    env = {path[0].args[0]: start}
    cur = start
    for n in path:
        if is_cast(n):
            env[n] = env[n.args[0]]
            continue
        args = map_arg(n.args, lambda a: env.get(a, a))
        assert n.args[0] in env, "a row op off the path"
        with graph.inserting_after(cur):
            new = graph.call_function(n.target, args, n.kwargs)
        with fake_mode:
            new.meta["val"] = n.target(*map_arg(args, lambda a: a.meta["val"]), **n.kwargs)
        for key in ("nn_module_stack", "stack_trace"):
            if key in n.meta:
                new.meta[key] = n.meta[key]
        env[n] = cur = new
    return cur


def _restore_topological_order(graph: Graph) -> None:
    """Reorder nodes so each follows its inputs, keeping the original order wherever it is valid.

    The fused op lands after the last of its inputs; a reader of a replaced result (g, say)
    may have stood before that point."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    if all(order[a] < order[n] for n in graph.nodes for a in n.all_input_nodes):
        return
    waiting = {n: len(set(n.all_input_nodes)) for n in graph.nodes}
    ready = [(order[n], n.name, n) for n, k in waiting.items() if k == 0]
    heapq.heapify(ready)
    result: list[Node] = []
    while ready:
        _, _, n = heapq.heappop(ready)
        result.append(n)
        for u in n.users:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, (order[u], u.name, u))
    assert len(result) == len(order), "the graph has a cycle"
    prev = result[0]
    for n in result[1:]:
        prev.append(n)
        prev = n
