"""Independent-branch analysis: the fork/join regions of the post-grad graph, their costs, and what
braze decides for each (merge the sibling GEMMs that open them, overlap them, or leave them serial).

A fork is a node whose value two or more computations read (through views); a branch is the work
only one of them leads to, up to the join, the first node that reads two branches. Branches are
found by one forward walk per fork that labels each node with the branches it depends on; the
walk ends as soon as no node of a single branch has unread users, so it covers one region, not the
rest of the graph. Forks whose branches leave the fork's layer (the residual stream, the rotary
tables every layer reads) are not candidates. A fork is reported when at least two branches start
a kernel of their own and two of them hold a GEMM or another extern call (braze's fused ops
included): a heavy branch beside pointwise or reduction work is Inductor's fusion problem, not a
scheduling one.

Decisions, by the cost model of `braze.passes.cost` at the traced token count:
- merge (a prefix to one of the two below): two or more branches open with GEMMs on the fork's
  value, which the gemm-merge pass turns into one GEMM;
- overlap: running the smaller branch beside the larger would save time by the model; the
  dual-stream pass (braze.passes.streams, on unless FusionConfig(dual_stream=False)) acts on it,
  re-deciding on the graph as gemm-merge left it;
- serial: overlapping would save too little, or the branches together are bound by bandwidth or
  compute rather than by launches.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from torch.fx import Graph, GraphModule, Node

from braze.patterns.fx import describe, module_path, val
from braze.report import layer_of

from .base import Pass, PassContext
from .cost import REFERENCE, Cost, DeviceModel, _hint, device_model, is_extern, is_free, region_cost
from .gemm_merge import gemm_activation, match_sibling

MAX_SPAN = 4000  # graph positions one fork's walk may cover; a longer region is not a local branch
# Overlap pays when it saves at least this much by the model: two events (record + wait) cost about a
# launch gap each, and gains within the model's error are not worth a second stream.
MIN_GAIN_S = 4e-6
MIN_GAIN_SHARE = 0.05
_JOINED = -1


@dataclass(frozen=True)
class Branch:
    head: Node  # the branch's first node: it reads the fork
    nodes: tuple[Node, ...]  # the nodes only this branch leads to, in graph order
    cost: Cost


@dataclass(frozen=True)
class Pairing:
    """One branch beside the rest of its fork's region: every node that depends on the fork's other branches
    and not on this one (their joins among themselves included), up to where this branch meets them. With
    three or more branches this is not a pair of single branches: DeepSeek V3.2's shared expert beside the
    router and the routed experts, which read the router's output and the fork."""

    side: Branch
    rest: Branch  # head: the rest's first node in graph order
    join: Node | None  # the first node that reads the side branch and the rest (None: the graph output)


@dataclass(frozen=True)
class Fork:
    fork: Node
    branches: tuple[Branch, ...]  # the branches that launch kernels, largest estimated time first
    join: Node | None  # the first node that reads two branches (None: they meet only at the output)
    pairings: tuple[Pairing, ...] = ()  # the largest branch beside the rest of the region, where that differs


def effective_users(node: Node) -> list[Node]:
    """The nodes that compute with `node`'s value, looking through views, slices and getitems."""
    out, seen, stack = [], set(), list(node.users)
    while stack:
        u = stack.pop()
        if u in seen:
            continue
        seen.add(u)
        if u.op == "call_function" and is_free(u):
            stack.extend(u.users)
        else:
            out.append(u)
    return out


def find_forks(graph: Graph) -> list[Fork]:
    """Every fork with two or more branches that launch kernels, two of them holding a GEMM or extern call."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    forks = []
    for f in graph.nodes:
        if f.op != "call_function" or is_free(f) or val(f) is None:
            continue
        heads = effective_users(f)
        if len(heads) < 2:
            continue
        fork = _walk(f, heads, order)
        if fork is not None:
            forks.append(_with_pairings(fork, heads, order))
    return forks


def _with_pairings(fork: Fork, heads: list[Node], order: dict[Node, int]) -> Fork:
    """`fork` with its pairing: the largest branch beside the rest of the region (`decide` says why only the
    largest), where the rest holds more than one other branch's work (with two branches the rest is the other
    branch: no new pairing) and both sides could be outlined (no write in place, no collective, static shapes)."""
    from .streams import why_not_outlined  # (streams imports this module)

    if len(heads) < 3:
        return fork
    walked = _labelled(fork.fork, heads, order, collapse=False)  # past the first join, until all branches meet
    if walked is None:
        return fork
    labels = walked[0]
    seeds = {h: i for i, h in enumerate(sorted(heads, key=order.__getitem__))}
    pairings = []
    for branch in fork.branches[:1]:
        i = seeds[branch.head]
        rest = sorted((n for n, lab in labels.items() if lab and i not in lab and n.op != "output"),
                      key=order.__getitem__)
        if len({labels[n] for n in rest}) < 2:
            continue  # the rest is one other branch: the pair of single branches covers it
        rest_branch = Branch(rest[0], tuple(rest), region_cost(rest))
        if not rest_branch.cost.kernels or not _has_extern(rest_branch):
            continue
        if why_not_outlined(branch) or why_not_outlined(rest_branch):
            continue
        join = min((n for n, lab in labels.items() if i in lab and len(lab) > 1), key=order.__getitem__,
                   default=None)
        pairings.append(Pairing(branch, rest_branch, None if join is None or join.op == "output" else join))
    return Fork(fork.fork, fork.branches, fork.join, tuple(pairings))


def _labelled(f: Node, heads: list[Node], order: dict[Node, int],
              collapse: bool) -> tuple[dict[Node, frozenset[int]], Node | None] | None:
    """One forward walk from the fork's heads (each a branch, numbered in graph order) labelling each node with
    the branches it depends on, and the first node that depends on two (the join). With `collapse`, a node on
    two or more branches is labelled `_JOINED` and the walk ends once no single-branch node has unwalked users;
    else labels are full sets and it ends once no node on some branches only has. None when such a node leaves
    the fork's layer (not a local region) or the walk passes MAX_SPAN graph positions."""
    layer = layer_of(module_path(f))
    seeds = {h: i for i, h in enumerate(sorted(heads, key=order.__getitem__))}
    full = frozenset(seeds.values())
    labels: dict[Node, frozenset[int]] = {}
    pending: dict[Node, int] = {}  # nodes still tracked (single-branch, or on some branches only) -> unwalked users
    heap = [(order[h], h.name, h) for h in seeds]
    heapq.heapify(heap)
    queued = set(seeds)
    seeds_left = len(seeds)
    join = None
    start = order[f]
    while heap:
        pos, _, n = heapq.heappop(heap)
        if pos - start > MAX_SPAN:
            return None
        lab = {seeds[n]} if n in seeds else set()
        seeds_left -= n in seeds
        for inp in n.all_input_nodes:
            lab |= labels.get(inp, frozenset())
            if inp in pending:
                pending[inp] -= 1
                if pending[inp] == 0:
                    del pending[inp]
        many = len(lab) > 1 or _JOINED in lab
        tracked = not many if collapse else frozenset(lab) != full
        path = module_path(n)
        outside = bool(path) and layer_of(path) != layer
        if tracked and outside:
            return None  # a branch leaves the fork's layer before it joins: not a local region
        if not collapse and outside and (pending or seeds_left):
            # its users are not walked (below), so a later node reading it through them would keep a partial label
            # and could join a rest that depends on the side (schedule() refuses such an op, but no pairing is
            # the honest answer)
            return None
        labels[n] = frozenset({_JOINED}) if collapse and many else frozenset(lab)
        if many and join is None:
            join = n
        if tracked and n.users:
            pending[n] = len(n.users)
        if not pending and not seeds_left:
            break  # every tracked node's users are walked: nothing later can be on some branches only
        # An untracked node's users matter only while tracked nodes may still meet them, and only in the fork's
        # layer (outside it, a tracked user abandons the fork anyway).
        if tracked or ((pending or seeds_left) and not outside):
            for u in n.users:
                if u not in queued:
                    queued.add(u)
                    heapq.heappush(heap, (order[u], u.name, u))
    return labels, join


def _walk(f: Node, heads: list[Node], order: dict[Node, int]) -> Fork | None:
    walked = _labelled(f, heads, order, collapse=True)
    if walked is None:
        return None
    labels, join = walked
    seeds = {h: i for i, h in enumerate(sorted(heads, key=order.__getitem__))}
    members: dict[int, list[Node]] = {i: [] for i in seeds.values()}
    for n, lab in labels.items():
        (i,) = lab
        if i != _JOINED and n.op != "output":
            members[i].append(n)
    branches = []
    for head, i in seeds.items():
        nodes = sorted(members[i], key=order.__getitem__)
        cost = region_cost(nodes)
        if cost.kernels:
            branches.append(Branch(head, tuple(nodes), cost))
    if sum(1 for b in branches if _has_extern(b)) < 2:
        return None  # one heavy branch beside pointwise or reduction work: Inductor's fusion covers it
    branches.sort(key=lambda b: (-b.cost.seconds(), order[b.head]))
    return Fork(f, tuple(branches), join)


def _has_extern(b: Branch) -> bool:
    return any(is_extern(n) for n in b.nodes)


@dataclass(frozen=True)
class Decision:
    kind: str  # "merge+serial", "merge+overlap", "serial" or "overlap"
    reason: str
    merged: tuple[Node, ...] = ()  # the GEMM heads gemm-merge turns into one GEMM
    side: Branch | None = None  # overlap: the branch that would run on the second stream
    main: Branch | None = None  # overlap of a pairing: the rest of the region, on the current stream
    pairing: Pairing | None = None


def decide(fork: Fork, device: DeviceModel = REFERENCE) -> Decision:
    """What the cost model decides for a fork (see the module doc): merge the GEMMs that open branches
    on the same activation, then overlap the branches or leave them serial."""
    merged = tuple(b.head for b in fork.branches
                   if gemm_activation(b.head) is fork.fork and not isinstance(match_sibling(b.head), str))
    merged = merged if len(merged) >= 2 else ()
    parts = []
    if merged:
        parts.append(f"{len(merged)} branches open with GEMMs on the same activation: one GEMM over their "
                     "stacked weights reads it once and launches once (gemm-merge)")
    # the smallest branch by estimated time, preferring one that is not part of the merged GEMM, beside the
    # largest other one: the pair dual-stream outlines (a third branch stays on the current stream)
    side = next((b for b in reversed(fork.branches) if b.head not in merged), fork.branches[-1])
    main = next(b for b in fork.branches if b is not side)
    serial, overlapped = _overlap((main, side), device)
    gain = serial - overlapped
    summary = f"serial ~{serial * 1e6:.1f} us, overlapped ~{overlapped * 1e6:.1f} us by the model"
    prefix = "merge+" if merged else ""
    # The largest branch beside the rest of the region, where that saves at least MIN_GAIN_S more than the pair
    # (it outlines more of the graph: a larger branch to compile, for a gain the model sees). Only the largest
    # (`_with_pairings` offers no other): its long weight stream leaves SMs and bandwidth for the rest's small
    # kernels on the other stream. A middle branch beside the rest first meets the rest's small kernels (graph
    # order) and measured worse on an H200: DeepSeek V3.2's MoE at T=8, shared expert beside router + dense
    # experts -9.8 us against -17.6 for the router beside the dense experts (results README, session 18).
    for p in fork.pairings:
        p_serial, p_overlapped = _overlap((p.side, p.rest), device)
        p_gain = p_serial - p_overlapped
        if p_gain < max(gain, 0.0) + MIN_GAIN_S or p_gain < MIN_GAIN_S or p_gain < MIN_GAIN_SHARE * p_serial:
            continue
        until = describe(p.join) if p.join is not None else "the graph output"
        parts.append(f"the branch from {describe(p.side.head)} beside the rest of the region ({len(p.rest.nodes)} "
                     f"nodes from {describe(p.rest.head)} up to {until}) saves ~{p_gain * 1e6:.1f} us (serial "
                     f"~{p_serial * 1e6:.1f} us, overlapped ~{p_overlapped * 1e6:.1f} us by the model; the smallest "
                     f"branch beside the largest: ~{gain * 1e6:.1f} us)")
        return Decision(prefix + "overlap", "; ".join(parts), merged, p.side, p.rest, p)
    if gain < MIN_GAIN_S or gain < MIN_GAIN_SHARE * serial:
        parts.append(f"overlap would save too little ({summary})")
        return Decision(prefix + "serial", "; ".join(parts), merged)
    parts.append(f"the smaller branch beside the larger saves ~{gain * 1e6:.1f} us ({summary})")
    return Decision(prefix + "overlap", "; ".join(parts), merged, side, main)


def _overlap(branches: tuple[Branch, ...], device: DeviceModel) -> tuple[float, float]:
    """(serial, overlapped) seconds of `branches` by the model: overlapped, the longest branch or the time
    their bytes (or FLOPs) take together through the shared HBM (or tensor cores), plus the fork and join."""
    times = [b.cost.seconds(device) for b in branches]
    total = sum((b.cost for b in branches), Cost())
    shared = max(total.bytes_moved / device.bandwidth, total.flops / device.flops)
    return sum(times), max(max(times), shared) + device.fork_join


class BranchAnalysis(Pass):
    name = "branches"
    family = None  # analysis only: it never changes the graph

    def run(self, gm: GraphModule, ctx: PassContext) -> None:
        try:
            forks = find_forks(gm.graph)
            device = device_model(gm.graph)
            decisions = [decide(f, device) for f in forks]
        except Exception as e:  # a bug in braze's analysis must not break the user's compile
            ctx.remark("failed", "internal-error", next(iter(gm.graph.nodes)), "branch analysis skipped after an "
                       "error in braze", reason=f"{type(e).__name__}: {e}", suggestion="report this as a braze bug")
            return
        ctx.bump("forks", len(forks))
        for fork, decision in zip(forks, decisions):
            ctx.bump(f"decided-{decision.kind}")
            tokens = val(fork.fork).shape[0] if val(fork.fork).dim() else 1
            join = describe(fork.join) if fork.join is not None else "the graph output"
            branches = [{"head": describe(b.head), "location": module_path(b.head), "nodes": len(b.nodes),
                         "kernels": b.cost.kernels, "gemms": b.cost.gemms, "bytes": b.cost.bytes_moved,
                         "flops": b.cost.flops, "est_us": round(b.cost.seconds(device) * 1e6, 2)}
                        for b in fork.branches]
            args = {"decision": decision.kind, "tokens": _hint(tokens), "device_model": device.name,
                    "branches": branches, "merged": [n.name for n in decision.merged]}
            if decision.side is not None:
                args["side_stream_nodes"] = [n.name for n in decision.side.nodes if not is_free(n)]
            if decision.pairing is not None:
                p = decision.pairing
                args["pairing"] = {"side": describe(p.side.head), "rest_head": describe(p.rest.head),
                                   "rest_nodes": len(p.rest.nodes), "rest_kernels": p.rest.cost.kernels,
                                   "rest_est_us": round(p.rest.cost.seconds(device) * 1e6, 2),
                                   "join": describe(p.join) if p.join is not None else None}
            reason = decision.reason
            if decision.side is not None and not ctx.config.dual_stream:
                reason += "; dual_stream is off, so they stay on one stream"
            ctx.remark("analysis", "independent-branches", fork.fork,
                       f"{len(fork.branches)} independent branches from {describe(fork.fork)} to {join}: "
                       f"{decision.kind}: {reason}",
                       ops=tuple(_head_op(b.head) for b in fork.branches), args=args)


def _head_op(node: Node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]
