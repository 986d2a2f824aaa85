"""Which head chains share a launch: greedy groups over the same tokens, moving cheap pure ops up.

A group is one `braze::fused_heads` launch inserted after the last of its inputs (braze.passes.chain).
"""

from __future__ import annotations

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
# defining one earlier changes no value; DeepSeek's q_b projection moves above the indexer this way
# and its q_pe RoPE shares the indexer q's launch.
_MOVABLE_GEMMS = {aten.mm.default, aten.addmm.default, aten.bmm.default}


def _hoistable(node: Node, limit: int, order: dict[Node, int], out: list[Node]) -> bool:
    """Whether `node` can be defined before position `limit` (moving cheap pure ops); collects them."""
    if order[node] < limit:
        return True
    if node.op != "call_function" or node.target not in _MOVABLE | _MOVABLE_GEMMS:
        return False
    if not all(_hoistable(a, limit, order, out) for a in node.all_input_nodes):
        return False
    if node not in out:
        out.append(node)
    return True


def _hoist(nodes: list[Node]) -> None:
    """Move each node right after the last of its inputs (dependencies first)."""
    order = {n: i for i, n in enumerate(nodes[0].graph.nodes)} if nodes else {}
    for n in sorted(nodes, key=order.get):
        order = {m: i for i, m in enumerate(n.graph.nodes)}
        last = max(n.all_input_nodes, key=order.get)
        last.append(n)


def group_siblings(graph: torch.fx.Graph, sites: list[HeadSite]) -> tuple[list[list[HeadSite]], list[HeadSite]]:
    """Greedy groups of chains that can share one launch, and the chains that could not be placed.

    A group is inserted after the last of its inputs, so it may hold chains only while
    every node its chains replace is first used after every input of the group, once
    the cheap pure ops (views, slices, casts) that produce late inputs move earlier.
    Chains over different token counts or output dtypes never share a launch, nor do chains
    with quant outputs and writing chains (the writing op returns one buffer: runtime/heads.py).
    Chains writing bytes of one packed store must share a launch (one op writes that cache);
    when they cannot, none of them is fused.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}

    def inputs(site: HeadSite) -> list[Node]:
        return [*site.inputs, *([site.cache] if site.cache is not None else []), *(c.store.cache for c in site.claims)]

    def first_use(site: HeadSite) -> int:
        used = []
        if site.result is not None:
            used += [order[u] for u in site.result.users]
        if site.store is not None:
            used += [order[u] for u in site.store.index_put.users]
        used += [order[u] for n in site.quant_nodes() for u in n.users]
        for c in site.claims:
            used += [order[u] for u in c.store.final.users]
        return min(used, default=len(order))

    def tokens(site: HeadSite) -> object:
        return val(site.inputs[0]).shape[0]

    def fits(members: list[HeadSite], hoist: list[Node]) -> bool:
        writes = any(s.chain.write is not None or s.chain.fields for s in members)
        quants = any(s.chain.quant_outputs() for s in members)
        dtypes = {s.chain.out_dtype for s in members if s.chain.out}
        if writes and quants or len(dtypes) > 1 or not all(known_eq(tokens(members[0]), tokens(s)) for s in members):
            return False
        limit = min(first_use(s) for s in members)
        if not all(_hoistable(n, limit, order, hoist) for s in members for n in inputs(s)):
            return False
        # no member may read a value a member of the launch replaces, and no moved node may read a value
        # any chain replaces (that value is redefined where its own launch lands, maybe below the move)
        replaced = {n for s in members for n in replaced_by(s)}
        return not any(n in replaced for s in members for n in inputs(s)) and \
            not any(a in replaced_anywhere for n in hoist for a in n.all_input_nodes)

    def replaced_by(site: HeadSite) -> list[Node]:
        out = [site.result] if site.result is not None else []
        if site.store is not None:
            out.append(site.store.index_put)
        out += site.quant_nodes()
        return out + [c.store.final for c in site.claims]

    replaced_anywhere = {n for s in sites for n in replaced_by(s)}
    # units: chains tied by a packed store they write together
    units: list[list[HeadSite]] = []
    for site in sites:
        caches = {c.store.cache for c in site.claims}
        tied = [u for u in units if caches & {c.store.cache for s in u for c in s.claims}]
        merged = [site] + [s for u in tied for s in u]
        units = [u for u in units if not any(u is t for t in tied)] + [merged]
    groups: list[list[HeadSite]] = []
    moves: list[list[Node]] = []
    dropped: list[HeadSite] = []
    for unit in sorted(units, key=lambda u: min(first_use(s) for s in u)):
        hoist: list[Node] = []
        if groups and fits(groups[-1] + unit, hoist):
            groups[-1] += unit
            moves[-1] = hoist
            continue
        hoist = []
        # a chain alone always fits unless it reads an input defined after its outputs' first use
        # (head weights of a scale product); then it is dropped like a unit that cannot share a launch
        if fits(unit, hoist) or (len(unit) == 1 and unit[0].product is None):
            groups.append(list(unit))
            moves.append(hoist)
        else:
            dropped += unit
    for hoist in moves:
        if hoist:
            _hoist(hoist)
    return groups, dropped
