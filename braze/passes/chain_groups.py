"""Which head chains share a launch: greedy groups over the same tokens, moving cheap pure ops up.

A group is one `braze::fused_heads` launch inserted after the last of its inputs (braze.passes.chain).
Groups are spliced in list order, each after its nodes moved: a moved node may read a value an earlier
group replaces (it then lands after that launch), never one its own or a later group replaces.
Optional chains (a norm read only by GEMMs, e.g. DeepSeek's q_c RMSNorm, or MLA's absorbed W_UK product) join a
group only where that saves kernels: each is kept only if the grouping with it launches fewer kernels in all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.fx import Node

from braze.patterns.fx import aten, known_eq, val

if TYPE_CHECKING:
    from .chain import HeadSite


# Pure, cheap ops that may move earlier in the graph so sibling chains can share a launch.
_MOVABLE = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.slice.Tensor, aten.select.int,
    aten.unsqueeze.default, aten.squeeze.dim, aten.permute.default, aten.alias.default, aten.expand.default,
    torch.ops.prims.convert_element_type.default,
}


# Matmuls move too: pure, and reading only their operands (never a cache a fused launch writes), so
# defining one earlier changes no value; DeepSeek's q_b projection moves above the indexer's scores
# this way (reading the q_c norm of the first launch) and its q_pe RoPE shares the indexer q's launch.
_MOVABLE_GEMMS = {aten.mm.default, aten.addmm.default, aten.bmm.default}


def _hoistable(node: Node, limit: int, order: dict[Node, int], out: list[Node]) -> bool:
    """Whether `node` can be defined before position `limit` (moving cheap pure ops); collects them."""
    if order[node] < limit:
        return True
    if node.op == "get_attr":  # a constant (a weight when the graph was traced with its parameters)
        if node not in out:
            out.append(node)
        return True
    if node.op != "call_function" or node.target not in _MOVABLE | _MOVABLE_GEMMS:
        return False
    if not all(_hoistable(a, limit, order, out) for a in node.all_input_nodes):
        return False
    if node not in out:
        out.append(node)
    return True


def hoist(nodes: list[Node]) -> None:
    """Move each node right after the last of its inputs (dependencies first)."""
    order = {n: i for i, n in enumerate(nodes[0].graph.nodes)} if nodes else {}
    for n in sorted(nodes, key=order.get):
        order = {m: i for i, m in enumerate(n.graph.nodes)}
        if not n.all_input_nodes:  # a constant: first after the placeholders
            next(m for m in n.graph.nodes if m.op != "placeholder").prepend(n)
            continue
        last = max(n.all_input_nodes, key=order.get)
        last.append(n)


@dataclass
class Grouping:
    groups: list[list[HeadSite]]
    moves: list[list[Node]]  # per group, the nodes to move up before it is spliced
    dropped: list[HeadSite]  # chains of a packed store that cannot share a launch
    unplaced: list[HeadSite]  # optional chains no group took

    @property
    def kernels(self) -> int:
        """Launches, plus a kernel (at least) for each chain left to Inductor."""
        return len(self.groups) + len(self.dropped) + len(self.unplaced)


def group_siblings(graph: torch.fx.Graph, sites: list[HeadSite], optional: list[HeadSite] = ()) -> Grouping:
    """Greedy groups of chains that can share one launch (see _Grouper); with `optional` chains, each is kept
    (in turn, on top of those kept before it) where the grouping with it launches fewer kernels in all than the
    one without it, counting an optional chain left out as a kernel of its own (a tie leaves it out: Inductor's
    norm or cuBLAS's bmm is the same count, and braze's launch stays smaller). One at a time, so a chain that
    cannot save a kernel (in any layer) does not keep the others out."""
    best = _Grouper(graph, sites).run(sites, [])
    kept: list[HeadSite] = []
    cost = best.kernels + len(optional)
    for site in optional:
        trial = [*kept, site]
        grouping = _Grouper(graph, [*sites, *trial]).run(sites, trial)
        trial_cost = grouping.kernels + len(optional) - len(trial)
        if trial_cost < cost:
            best, kept, cost = grouping, trial, trial_cost
    placed = {id(s) for g in best.groups for s in g}
    return dataclasses.replace(best, unplaced=[s for s in optional if id(s) not in placed])


class _Grouper:
    """A group is inserted after the last of its inputs, so it may hold chains only while
    every node its chains replace is first used after every input of the group, once
    the cheap pure ops (views, slices, casts, matmuls) that produce late inputs move earlier.
    Chains over different token counts or output dtypes never share a launch.
    Chains writing bytes of one packed store must share a launch (one op writes that cache);
    when they cannot, none of them is fused.
    """

    def __init__(self, graph: torch.fx.Graph, sites: list[HeadSite]) -> None:
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        self.replaced_anywhere = {n for s in sites for n in _replaced_by(s)}

    def inputs(self, site: HeadSite) -> list[Node]:
        return [*site.inputs, *([site.cache] if site.cache is not None else []), *(c.store.cache for c in site.claims)]

    def first_use(self, site: HeadSite) -> int:
        order = self.order
        used = []
        if site.result is not None:
            used += [order[u] for u in site.result.users]
        if site.store is not None:
            used += [order[u] for u in site.store.index_put.users]
        used += [order[u] for n in site.quant_nodes() for u in n.users]
        for c in site.claims:
            used += [order[u] for u in c.store.final.users]
        return min(used, default=len(order))

    def fits(self, members: list[HeadSite], hoist: list[Node], earlier: dict[Node, float]) -> float | None:
        """Where the launch of `members` would land (a position in the original order), or None when
        they cannot share one; collects the nodes to move in `hoist`. `earlier`: values replaced by the
        groups before, and where their launches land."""
        dtypes = {s.chain.out_dtype for s in members if s.chain.out}
        tokens = [val(s.inputs[0]).shape[0] for s in members]
        if len(dtypes) > 1 or not all(known_eq(tokens[0], t) for t in tokens):
            return None
        limit = min(self.first_use(s) for s in members)
        if not all(_hoistable(n, limit, self.order, hoist) for s in members for n in self.inputs(s)):
            return None
        # no member may read a value a member of the launch replaces, and a moved node may read a value
        # a chain replaces only when an earlier launch replaces it, landing before this one's first use
        replaced = {n for s in members for n in _replaced_by(s)}
        if any(n in replaced for s in members for n in self.inputs(s)):
            return None
        moved = set(hoist)
        pos: dict[Node, float] = {}

        def where(n: Node) -> float:  # where n is defined once the moves are done
            if n not in moved:
                return self.order[n]
            if n not in pos:
                pos[n] = max([earlier[a] if a in earlier else where(a) for a in n.all_input_nodes], default=0)
            return pos[n]

        for n in hoist:
            for a in n.all_input_nodes:
                if a in replaced or (a in self.replaced_anywhere and not (a in earlier and earlier[a] < limit)):
                    return None
        land = max(where(n) for s in members for n in self.inputs(s))
        return land if land < limit else None

    def run(self, sites: list[HeadSite], optional: list[HeadSite]) -> Grouping:
        # units: chains tied by a packed store they write together
        units: list[list[HeadSite]] = []
        for site in [*sites, *optional]:
            caches = {c.store.cache for c in site.claims}
            tied = [u for u in units if caches & {c.store.cache for s in u for c in s.claims}]
            merged = [site] + [s for u in tied for s in u]
            units = [u for u in units if not any(u is t for t in tied)] + [merged]
        out = Grouping([], [], [], [])
        lands: list[float] = []
        for unit in sorted(units, key=lambda u: min(self.first_use(s) for s in u)):
            # without optional chains a unit joins the last group or starts one (as it always has);
            # with them, the first group it fits, so a norm may lead a launch that later siblings join
            tries = range(len(out.groups)) if optional else range(max(len(out.groups) - 1, 0), len(out.groups))
            for k in tries:
                placed = self._join(out, lands, k, unit)
                if placed:
                    break
            else:
                hoist: list[Node] = []
                land = self.fits(unit, hoist, self._earlier(out, lands, len(out.groups)))
                # a chain alone always fits unless it reads an input defined after its outputs' first use
                # (head weights of a scale product); then it is dropped like a unit that cannot share a launch
                if land is not None or (len(unit) == 1 and unit[0].product is None):
                    out.groups.append(list(unit))
                    out.moves.append(hoist if land is not None else [])  # a failed fit may have collected some
                    lands.append(land if land is not None else max(self.order[n] for n in self.inputs(unit[0])))
                else:
                    out.dropped += unit
        keep = [k for k, g in enumerate(out.groups) if not all(s in optional for s in g)]
        out.unplaced = [s for k, g in enumerate(out.groups) if k not in keep for s in g]
        out.groups, out.moves = [out.groups[k] for k in keep], [out.moves[k] for k in keep]
        return out

    def _earlier(self, out: Grouping, lands: list[float], k: int) -> dict[Node, float]:
        return {n: lands[j] + 0.5 for j in range(k) for s in out.groups[j] for n in _replaced_by(s)}

    def _join(self, out: Grouping, lands: list[float], k: int, unit: list[HeadSite]) -> bool:
        """Add `unit` to group k if it fits there and every later group still fits after it."""
        hoist: list[Node] = []
        land = self.fits(out.groups[k] + unit, hoist, self._earlier(out, lands, k))
        if land is None:
            return False
        groups, moves, new_lands = list(out.groups), list(out.moves), list(lands)
        groups[k], moves[k], new_lands[k] = out.groups[k] + unit, hoist, land
        trial = Grouping(groups, moves, [], [])
        for j in range(k + 1, len(groups)):
            later: list[Node] = []
            again = self.fits(groups[j], later, self._earlier(trial, new_lands, j))
            if again is None and (len(groups[j]) > 1 or moves[j]):  # only a lone chain that moves nothing
                return False
            moves[j], new_lands[j] = (later, again) if again is not None else (moves[j], new_lands[j])
        out.groups[:], out.moves[:], lands[:] = groups, moves, new_lands
        return True


def _replaced_by(site: HeadSite) -> list[Node]:
    out = [site.result] if site.result is not None else []
    if site.store is not None:
        out.append(site.store.index_put)
    out += site.quant_nodes()
    return out + [c.store.final for c in site.claims]
