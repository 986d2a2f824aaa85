"""Routed SwiGLU experts run as two grouped GEMMs over the (token, expert) pairs sorted by expert, and its reference.

The decode-time MoE of braze's models and of Hugging Face's `grouped_mm` experts, in a post-grad graph:

    ids = idx.view(S)                          # idx [T, k] chosen experts, S = T·k pairs, p = t·k + j
    perm = sort(ids).indices                   # pairs grouped by expert
    offs = cumsum(count of each expert in ids) # [E] int32 group ends (eq/sum, histc or bincount)
    gu = _grouped_mm(x[perm // k], W13, offs)  # [S, 2I]; W13 [E, H, 2I]
    h = silu(gu[:, :I]) · gu[:, I:]            # [S, I]
    ys = _grouped_mm(h, W2, offs)              # [S, H]; W2 [E, I, H]
    y = Σ_j ys[inverse of perm].view(T, k, H) · w[:, :, None]      (braze: weights after un-sorting)
      = Σ_j (ys · w.view(S)[perm][:, None])[inverse of perm].view(T, k, H)   (Hugging Face: before)

Row p of each grouped GEMM depends only on its own input row and its expert, so the sort is only
there to make the GEMMs grouped; the fused op computes every pair in (token, slot) order and never
sorts. Matched on structure: T, k, E, H, I are read from the graph.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Node

from .conv import _silu_of
from .fx import (
    Miss,
    aten,
    binary_operands,
    describe,
    dtype_of,
    is_cast,
    is_op,
    is_view,
    prims,
    scalar,
    shape_of,
)
from .stages import FlatJsonSpec

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Experts(FlatJsonSpec):
    """The fused site: x [T, H], W13 [E, H, 2I], W2 [E, I, H] (bf16), idx [T, k], w [T, k] -> y [T, H].

    Rounding as the graph does it: each GEMM's output to bf16, silu(gate) to bf16 when `round_act`,
    the product h to bf16, the weighted sum over the k slots in fp32, then to `out`."""

    tokens: int
    top_k: int
    experts: int
    hidden: int
    inter: int
    round_act: bool = True
    out: str = "bfloat16"
    # a shared expert of the routed experts' shape, every token's: "none", "plain" (weight 1) or "sigmoid"
    # (weight sigmoid(g) of a [T, 1] gate logit, rounded to bf16 as the graph rounds it)
    shared: str = "none"


@dataclass(frozen=True)
class ExpertsMatch:
    spec: Experts
    x: Node  # [T, H]
    w13: Node  # [E, H, 2I] (the grouped GEMM's operand, a view of the stored weight)
    w2: Node  # [E, I, H]
    idx: Node  # [T, k] expert ids
    weights: Node  # [T, k] routing weights
    output: Node  # replaced by the fused op
    inner: frozenset[Node]


def experts_reference(spec: Experts, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, idx: torch.Tensor,
                      weights: torch.Tensor, ws13: torch.Tensor | None = None, ws2: torch.Tensor | None = None,
                      gate_logit: torch.Tensor | None = None) -> torch.Tensor:
    """Pure torch, pair by pair in (token, slot) order, rounding where the graph rounds; with spec.shared, token t's
    shared expert (ws13 [H, 2I], ws2 [I, H]) is one more pair, weighted 1 or sigmoid(gate_logit[t]) (bf16)."""
    t, k = spec.tokens, spec.top_k
    ids = idx.reshape(t * k)
    xs = x.repeat_interleave(k, dim=0)  # [S, H]

    def swiglu(gu: torch.Tensor) -> torch.Tensor:
        gate, up = gu[:, :spec.inter], gu[:, spec.inter:]
        act = torch.nn.functional.silu(gate.float())
        act = act.to(gate.dtype) if spec.round_act else act
        return (act * up.float()).to(gate.dtype)

    h = swiglu(torch.bmm(xs.unsqueeze(1), w13[ids]).squeeze(1))  # [S, 2I] bf16 (fp32 accumulation) -> [S, I]
    ys = torch.bmm(h.unsqueeze(1), w2[ids]).squeeze(1)  # [S, H]
    y = (ys.float().view(t, k, -1) * weights.float().view(t, k, 1)).sum(1)
    if spec.shared != "none":  # added as the graph adds it: y rounded to the output dtype, the term in bf16
        shared = swiglu(x @ ws13) @ ws2  # [T, H] bf16, each GEMM rounded to bf16
        if spec.shared == "sigmoid":
            shared = shared * torch.sigmoid(gate_logit.float()).to(x.dtype).view(t, 1)
        y = y.to(_DTYPES[spec.out]).float() + shared.float()
    return y.to(_DTYPES[spec.out])


def _getitem(node: object, i: int) -> Node | None:
    if isinstance(node, Node) and node.target is operator.getitem and node.args[1] == i:
        return node.args[0]
    return None


def _sort_indices_of(node: object) -> Node | None:
    """s in `sort(s).indices` (ascending, last dim) or `argsort(s)`."""
    src = _getitem(node, 1)
    if not is_op(src, aten.sort):
        return None
    a = list(src.args) + [None] * 4
    dim = src.kwargs.get("dim", a[2] if src.target is aten.sort.stable else a[1])
    desc = src.kwargs.get("descending", a[3] if src.target is aten.sort.stable else a[2])
    if dim not in (None, -1, 0) or desc:
        return None
    return src.args[0]


def _sort_values_of(node: object) -> Node | None:
    src = _getitem(node, 0)
    return src.args[0] if is_op(src, aten.sort) else None


def _strip_casts(node: object) -> object:
    while is_cast(node):
        node = node.args[0]
    return node


def _counts_ids(node: object, e: int) -> Node | None:
    """ids in a per-expert count of `ids` over E experts: eq(ids[:, None], arange(E)).sum(0), histc(ids, E, 0,
    E-1) or bincount(ids, minlength=E); casts in between allowed."""
    node = _strip_casts(node)
    if is_op(node, aten.sum) and len(node.args) > 1 and list(node.args[1]) == [0]:
        eq = _strip_casts(node.args[0])
        if is_op(eq, aten.eq):
            a, b = binary_operands(eq)
            for col, ar in ((a, b), (b, a)):
                if is_op(ar, prims.iota) and ar.args[0] == e and ar.kwargs.get("start", 0) == 0 \
                        and ar.kwargs.get("step", 1) == 1 and is_op(col, aten.unsqueeze) and col.args[1] in (1, -1):
                    return col.args[0]
    if is_op(node, aten.histc):
        a = list(node.args) + [None] * 3
        bins, lo, hi = (node.kwargs.get(n, v) for n, v in (("bins", a[1]), ("min", a[2]), ("max", a[3])))
        if bins == e and scalar(lo) == 0 and scalar(hi) == e - 1:
            return _strip_casts(node.args[0])
    if is_op(node, aten.bincount):
        if node.kwargs.get("minlength", node.args[2] if len(node.args) > 2 else 0) == e and \
                node.kwargs.get("weights", node.args[1] if len(node.args) > 1 else None) is None:
            return node.args[0]
    return None


def _offsets_ids(offs: Node, e: int) -> Node | Miss:
    """ids whose per-expert counts `offs` accumulates: offs = cumsum(counts) as int32 (cast or dtype=)."""
    node = _strip_casts(offs)
    if not (is_op(node, aten.cumsum) and node.args[1] in (0, -1)):
        return Miss(f"the grouped GEMMs' offsets {describe(offs)} are not a cumulative sum of expert counts",
                    "compute offs = cumsum(bincount / histc / one-hot sum of the expert ids)")
    ids = _counts_ids(node.args[0], e)
    if ids is None:
        return Miss(f"the grouped GEMMs' offsets sum {describe(node.args[0])}, not a count of the expert ids over "
                    f"{e} experts", "count with bincount(ids, minlength=E), histc(ids, E, 0, E-1) or an eq/sum")
    return ids


def _pair_ids(node: Node) -> Node | None:
    """idx [T, k] in ids = idx.view(T·k) (or reshape/flatten)."""
    if is_view(node):
        src = node.args[0]
        if len(shape_of(src) or ()) == 2 and len(shape_of(node) or ()) == 1:
            return src
    return None


def _silu_gate_up(h: Node, gu: Node, inter: int) -> tuple[bool, set[Node]] | Miss:
    """(round_act, nodes) when h = silu(gu[:, :I]) · gu[:, I:] (silu rounded to bf16 or not)."""
    if not is_op(h, aten.mul):
        return Miss(f"the second grouped GEMM reads {describe(h)}, not silu(gate) · up", "", candidate=False)
    a, b = binary_operands(h)

    def half(n: object) -> int | None:  # which half of gu a slice takes: 0 gate, 1 up
        n = _strip_casts(n)
        if is_op(n, aten.slice) and n.args[0] is gu and n.args[1] in (1, -1):
            lo, hi = (n.args + (None, None, None, None))[2:4]
            step = n.args[4] if len(n.args) > 4 else 1
            if step == 1 and (lo, hi) == (0, inter):
                return 0
            if step == 1 and lo == inter and (hi is None or hi >= 2 * inter):  # slice ends clamp
                return 1
        return None

    for act, up in ((a, b), (b, a)):
        if half(up) != 1:
            continue
        round_act = is_cast(act) and dtype_of(act) == dtype_of(gu)
        s = _silu_of(act.args[0] if round_act else act)
        if s is None or half(s) != 0:
            continue
        nodes = {h}
        frontier = [act, up]
        while frontier:  # the act chain and the two slices, up to gu
            n = frontier.pop()
            if n is gu or n in nodes:
                continue
            nodes.add(n)
            frontier.extend(x for x in n.all_input_nodes)
        return round_act, nodes
    return Miss(f"{describe(h)} is not silu(gate) · up over the two halves of the first grouped GEMM "
                f"({describe(gu)}, halves of {inter})", "only SwiGLU experts with [gate | up] halves fuse")


def match_experts(g2: Node) -> ExpertsMatch | Miss:
    """The routed experts ending at the second grouped GEMM `g2`, up to the weighted sum over the k slots."""
    if not is_op(g2, aten._grouped_mm):
        return Miss("not a grouped GEMM", candidate=False)
    if len(g2.args) != 3 or any(v is not None for v in g2.kwargs.values()):
        return Miss(f"{describe(g2)} has a bias, scales or an output dtype", "", candidate=False)
    h, w2, offs = g2.args
    mul_in = h
    if not is_op(mul_in, aten.mul):
        return Miss(f"the grouped GEMM {describe(g2)} does not read silu(gate) · up", candidate=False)
    # the first grouped GEMM: the slices' source
    gu = next((n for n in _ancestors(mul_in, 8) if is_op(n, aten._grouped_mm)), None)
    if gu is None:
        return Miss(f"the grouped GEMM {describe(g2)} is not fed by another grouped GEMM", candidate=False)
    if len(gu.args) != 3 or any(v is not None for v in gu.kwargs.values()):
        return Miss(f"{describe(gu)} has a bias, scales or an output dtype", "", candidate=False)
    xs, w13, offs1 = gu.args
    if offs1 is not offs:
        return Miss(f"the two grouped GEMMs {describe(gu)} and {describe(g2)} read different offsets",
                    "group both GEMMs with the same offsets")
    if any(dtype_of(n) != torch.bfloat16 for n in (xs, w13, h, w2)):
        return Miss("grouped GEMMs whose operands are not all bf16", "")
    e, hid, two_i = shape_of(w13)
    pairs = shape_of(xs)[0]
    if not all(isinstance(d, int) for d in (pairs, e, hid, two_i, *shape_of(w2))):
        return Miss(f"the experts' sizes are dynamic (pairs {pairs}, experts {e}, hidden {hid}, width {two_i}): the "
                    "fused kernels are specialized on them", "compile with static shapes (dynamic=False) for decode steps")
    inter = two_i // 2
    if two_i % 2 or tuple(shape_of(w2)) != (e, inter, hid):
        return Miss(f"weights {shape_of(w13)} and {shape_of(w2)} are not [E, H, 2I] and [E, I, H]",
                    "only SwiGLU experts with [gate | up] halves fuse")
    act = _silu_gate_up(h, gu, inter)
    if isinstance(act, Miss):
        return act
    round_act, act_nodes = act
    # the gathered input rows: x[perm // k]
    if not (is_op(xs, aten.index) and len(xs.args[1]) == 1 and is_op(xs.args[1][0], aten.div)
            and xs.args[1][0].kwargs.get("rounding_mode") == "floor"):
        return Miss(f"the first grouped GEMM reads {describe(xs)}, not x[perm // k]", "gather the tokens with x[perm // k]")
    x, (div,) = xs.args
    perm, k = div.args[0], div.args[1]
    ids = _sort_indices_of(perm)
    idx = _pair_ids(ids) if ids is not None else None
    if idx is None or not isinstance(k, int) or tuple(shape_of(idx))[1] != k:
        return Miss(f"the tokens are gathered by {describe(perm)} // {k}, not by the sort of the [T, k] expert ids",
                    "sort the flattened top-k ids and gather x[perm // k]")
    t = shape_of(idx)[0]
    if tuple(shape_of(x)) != (t, hid):
        return Miss(f"the gathered input {describe(x)} is {shape_of(x)}, expected [{t}, {hid}]", "")
    counted = _offsets_ids(offs, e)
    if isinstance(counted, Miss):
        return counted
    if counted is not ids and _sort_values_of(counted) is not ids:
        return Miss(f"the offsets count {describe(counted)}, not the sorted expert ids {describe(ids)}", "")
    end = _combine(g2, perm, idx, t, k, hid)
    if isinstance(end, Miss):
        return end
    output, weights, combine_nodes = end
    inner = frozenset(act_nodes | combine_nodes | {gu, g2})
    for n in inner - {output}:
        outside = [u for u in n.users if u not in inner]
        if outside:
            return Miss(f"{describe(n)} is also read by {describe(outside[0])}",
                        "the experts' intermediates must have no other reader", node=n)
    out = dtype_of(output)
    if out not in (torch.bfloat16, torch.float32):
        return Miss(f"the experts' output is {out}", "")
    spec = Experts(tokens=t, top_k=k, experts=e, hidden=hid, inter=inter, round_act=round_act,
                   out=str(out).removeprefix("torch."))
    return ExpertsMatch(spec, x, w13, w2, idx, weights, output, inner)


def _ancestors(node: Node, depth: int) -> list[Node]:
    seen, frontier = [], [node]
    for _ in range(depth):
        frontier = [a for n in frontier for a in n.all_input_nodes if a not in seen]
        seen.extend(frontier)
    return seen


def _inverse_of(node: object, perm: Node) -> bool:
    """node = the inverse permutation of perm: argsort(perm), or empty.index_put([perm], arange(S))."""
    if _sort_indices_of(node) is perm:
        return True
    if is_op(node, aten.index_put) and list(node.args[1]) == [perm]:
        ar = node.args[2]
        return is_op(ar, prims.iota) and ar.kwargs.get("start", 0) == 0 and ar.kwargs.get("step", 1) == 1
    return False


def _combine(g2: Node, perm: Node, idx: Node, t: int, k: int, hid: int) -> tuple[Node, Node, set[Node]] | Miss:
    """From the second grouped GEMM to Σ_j over the slots: (output node, weights [T, k], nodes)."""
    nodes: set[Node] = set()

    def only_user(n: Node) -> Node | None:
        return next(iter(n.users)) if len(n.users) == 1 else None

    def weight_of(m: Node, rows: Node) -> Node | None:  # w in m = rows * w[..., None] (rows maybe cast)
        a, b = binary_operands(m)
        for r, w in ((a, b), (b, a)):
            if _strip_casts(r) is rows and is_op(w, aten.unsqueeze) \
                    and tuple(shape_of(w)) == tuple(shape_of(w.args[0])) + (1,):
                nodes.update({m, w} | ({r} if r is not rows else set()))
                return w.args[0]
        return None

    n = only_user(g2)
    weights = None
    if is_op(n, aten.mul):  # Hugging Face: ys · w.view(S)[perm][:, None], then un-sorted
        wp = weight_of(n, g2)
        if not (is_op(wp, aten.index) and list(wp.args[1]) == [perm] and is_view(wp.args[0])
                and len(shape_of(wp.args[0].args[0]) or ()) == 2):
            return Miss(f"{describe(n)} weights the sorted rows by something other than w.view(S)[perm]", "")
        weights = wp.args[0].args[0]
        nodes.update({wp, wp.args[0]})
        n = only_user(n)
    if not (is_op(n, aten.index) and len(n.args[1]) == 1 and _inverse_of(n.args[1][0], perm)):
        return Miss(f"the expert outputs are not put back in (token, slot) order by the inverse of {describe(perm)}",
                    "un-sort with ys[argsort(perm)]", candidate=False)
    nodes.add(n)
    v = only_user(n)
    if not (is_view(v) and tuple(shape_of(v)) == (t, k, hid)):
        return Miss(f"the un-sorted rows are not viewed as [{t}, {k}, {hid}]", "", candidate=False)
    nodes.add(v)
    m = only_user(v)
    if weights is None:
        if is_cast(m) and dtype_of(m) == torch.float32:
            nodes.add(m)
            m = only_user(m)
        weights = weight_of(m, v) if is_op(m, aten.mul) else None
        if weights is None:
            return Miss(f"the un-sorted expert outputs are not weighted by the routing weights ({describe(m)})",
                        "", candidate=False)
        m = only_user(m)
    s = m
    if not (is_op(s, aten.sum) and list(s.args[1]) in ([1], [-2]) and not (len(s.args) > 2 and s.args[2])):
        return Miss("the weighted expert outputs are not summed over the k slots", "", candidate=False)
    nodes.add(s)
    if dtype_of(s) != torch.float32:
        return Miss("the weighted sum over the slots is not fp32", "")
    if tuple(shape_of(weights) or ()) != (t, k) or dtype_of(weights) not in (torch.float32, torch.bfloat16):
        return Miss(f"routing weights {describe(weights)} are not [{t}, {k}] floats", "")
    out = only_user(s)
    if is_cast(out):
        nodes.add(out)
        return out, weights, nodes
    return s, weights, nodes


@dataclass(frozen=True)
class SharedMatch:
    """A shared expert added to the routed experts' output: out = y + down(silu(gate(x))·up(x)) [· sigmoid(g)]."""

    gate: str  # "plain" | "sigmoid"
    w13: Node  # [H, 2I] (the first GEMM's operand, a view of the stored weight)
    w2: Node  # [I, H]
    gate_logit: Node | None  # g [T, 1] ("sigmoid")
    output: Node  # the add, replaced by the fused op
    inner: frozenset[Node]


def match_shared_expert(site: ExpertsMatch) -> SharedMatch | Miss:
    """The shared expert (same widths as the routed ones, reading the same x) added to `site`'s output."""
    y = site.output
    if len(y.users) != 1:
        return Miss("the experts' output has several readers", candidate=False)
    add = next(iter(y.users))
    if not is_op(add, aten.add) or add.kwargs.get("alpha", 1) != 1 or len(add.args) != 2 or y not in add.args:
        return Miss("the experts' output is not added to anything", candidate=False)
    term = add.args[1] if add.args[0] is y else add.args[0]
    nodes: set[Node] = set()
    gate, g = "plain", None
    down = term
    if is_op(term, aten.mul):
        a, b = binary_operands(term)
        for d, sg in ((a, b), (b, a)):
            if is_op(d, aten.mm) and is_op(sg, aten.sigmoid):
                down, gate, g = d, "sigmoid", sg.args[0]
                nodes |= {term, sg}
                break
        else:
            return Miss(f"the experts' output is added to {describe(term)}", candidate=False)
    if not (is_op(down, aten.mm) and is_op(down.args[0], aten.mul)):
        return Miss(f"the experts' output is added to {describe(term)}, not a SwiGLU expert", candidate=False)
    h, w2 = down.args
    gu = next((n for n in _ancestors(h, 8) if is_op(n, aten.mm)), None)
    if gu is None:
        return Miss(f"{describe(down)} does not read silu(gate) · up of another GEMM", candidate=False)
    # from here on it is a shared SwiGLU expert: a miss says why it stays apart
    s = site.spec
    x, w13 = gu.args
    if x is not site.x:
        return Miss(f"the shared expert reads {describe(x)}, the routed experts {describe(site.x)}", node=gu)
    if tuple(shape_of(w13) or ()) != (s.hidden, 2 * s.inter) or tuple(shape_of(w2) or ()) != (s.inter, s.hidden):
        return Miss(f"a shared expert of weights {shape_of(w13)} and {shape_of(w2)}; the routed experts' are "
                    f"[{s.hidden}, {2 * s.inter}] and [{s.inter}, {s.hidden}]: the fused kernels run experts of one shape",
                    node=gu)
    if any(dtype_of(n) != torch.bfloat16 for n in (w13, w2, h, term)):
        return Miss("the shared expert is not all bf16", node=gu)
    act = _silu_gate_up(h, gu, s.inter)
    if isinstance(act, Miss):
        return Miss(act.reason, act.suggestion, node=gu)
    round_act, act_nodes = act
    if round_act != s.round_act:
        return Miss("the shared expert rounds silu(gate) differently from the routed experts", node=gu)
    if g is not None:
        if tuple(shape_of(g) or ()) != (s.tokens, 1) or dtype_of(g) != torch.bfloat16:
            return Miss(f"the shared expert's gate {describe(g)} is not a bf16 [{s.tokens}, 1] logit", node=g)
    nodes |= act_nodes | {gu, down}
    for n in nodes:
        outside = [u for u in n.users if u not in nodes and u is not add]
        if outside:
            return Miss(f"{describe(n)} is also read by {describe(outside[0])}",
                        "the shared expert's intermediates must have no other reader", node=n)
    return SharedMatch(gate, w13, w2, g, add, frozenset(nodes))
