"""The recurrent gated delta-rule update of one decode token in a post-grad ATen graph, and its reference.

Per (token t, value head h), with the fp32 state row S = state[idx[t], h] of shape [dk, dv]:

    S ← e^{g}·S;  u = Sᵀk;  δ = β(v − u);  S ← S + k δᵀ;  o = Sᵀ(q·scale)

q and k are read per key head: value head h reads key head h // (Hv/Hk) (Hugging Face and braze
expand them with `repeat_interleave`, which decomposes into unsqueeze -> expand -> clone -> view).
The state rows are gathered by slot indices and written back with `index_copy_` / `index_put`,
so the graph holds `copy_(state, index_put(state, [idx], S_new))`. Matched on structure:
head counts, dims, the scale and the token count are read from the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from .fx import (
    Miss,
    aten,
    binary_operands,
    describe,
    dtype_of,
    is_cast,
    is_op,
    is_view,
    known_eq,
    scalar,
    shape_of,
    strip_lossless_casts,
    val,
)
from .stages import FlatJsonSpec


@dataclass(frozen=True)
class DeltaRule(FlatJsonSpec):
    """The fused site: q, k [T, Hk, dk], v [T, Hv, dv], g, beta [T, Hv] -> o [T, Hv, dv] fp32; the fp32
    state [slots, Hv, dk, dv] is updated in place at the rows `indices` [T]."""

    heads_k: int
    heads_v: int
    dk: int
    dv: int
    scale: float  # q's multiplier (dk^-½ in Qwen 3.5); 1.0 when the graph has none
    # True: the state rows `indices` [T] are updated in place; False: row t of the state is token t's and
    # the new rows go to a fresh [T, Hv, dk, dv] tensor (the state is only read)
    indexed: bool = True
    # (indexed only) the indices are arange(T): rows 0..T-1 are updated in place and no index is read
    identity: bool = False


@dataclass(frozen=True)
class DeltaRuleMatch:
    spec: DeltaRule
    q: Node  # [T, Hk, dk] (before its expansion to the value heads)
    k: Node
    v: Node  # [T, Hv, dv]
    g: Node  # [T, Hv]
    beta: Node  # [T, Hv]
    indices: Node | None  # [T]; None: row t of the state is token t's
    state: Node  # the graph input [slots, Hv, dk, dv]
    output: Node  # o [T, Hv, dv]
    copy: Node | None  # copy_(state, index_put(...)); None when not indexed
    new_state: Node  # S1, the updated rows
    inner: frozenset[Node]  # values only the update reads: replaced with it


def delta_rule_reference(spec: DeltaRule, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                         beta: torch.Tensor, indices: torch.Tensor | None, state: torch.Tensor,
                         new_state: torch.Tensor | None = None) -> torch.Tensor:
    """o [T, Hv, dv] fp32; updates the rows `indices` of `state` in place (spec.indexed; rows 0..T-1 with
    spec.identity, `indices` unused), else writes the new rows into `new_state` [T, Hv, dk, dv] (row t of
    `state` is token t's). Bytes per token and value head:
    the state row (4·dk·dv) read and written once, q, k (dk each), v (dv), g, beta, o (4·dv)."""
    r = spec.heads_v // spec.heads_k
    qe = q.float().repeat_interleave(r, dim=1) * spec.scale  # [T, Hv, dk]
    ke = k.float().repeat_interleave(r, dim=1)
    t = q.shape[0]
    rows = state[indices] if spec.indexed and not spec.identity else state[:t]
    s = rows * g.float().exp()[:, :, None, None]  # [T, Hv, dk, dv]
    u = (s * ke.unsqueeze(-1)).sum(-2)  # [T, Hv, dv]
    delta = beta.float().unsqueeze(-1) * (v.float() - u)
    s = s + ke.unsqueeze(-1) * delta.unsqueeze(-2)
    if spec.indexed and spec.identity:
        state[:t] = s
    elif spec.indexed:
        state.index_copy_(0, indices, s)
    else:
        new_state.copy_(s)
    return (s * qe.unsqueeze(-1)).sum(-2)


# ---------------------------------------------------------------------------- recognizer

_SIZE1_OPS = (aten.unsqueeze, aten.view, aten.reshape, aten._unsafe_view, aten.expand)


def _unbroadcast(node: object, rank: int) -> object:
    """`node` of `rank` dims before the ops that only add size-1 dims (unsqueeze, views that keep the
    other sizes in order)."""
    while isinstance(node, Node) and is_op(node, *_SIZE1_OPS) and len(shape_of(node) or ()) > rank:
        src = node.args[0]
        a, b = shape_of(src), shape_of(node)
        if a is None or b is None:
            break
        if [d for d in a if not known_eq(d, 1)] != [d for d in b if not known_eq(d, 1)]:
            break
        if is_op(node, aten.expand) and len(a) == len(b) and any(not known_eq(x, y) for x, y in zip(a, b)):
            break
        node = src
    return node


def _mul_parts(node: object) -> tuple[Node, Node] | None:
    if not is_op(node, aten.mul):
        return None
    a, b = binary_operands(node)
    return (a, b) if isinstance(a, Node) and isinstance(b, Node) else None


def _sum_over(node: object) -> tuple[Node, int] | None:
    """(x, dim) of sum(x, [dim]) without keepdim, dim made negative."""
    if not is_op(node, aten.sum) or len(node.args) < 2 or len(node.args[1]) != 1:
        return None
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    rank = len(shape_of(node.args[0]) or ())
    return None if keep or not rank else (node.args[0], node.args[1][0] % rank - rank)


def _expanded(node: Node, heads_v: object) -> tuple[Node, int]:
    """(x [T, Hk, d], Hv/Hk) for the value-head expansion of x (repeat_interleave), or (node, 1)."""
    if is_view(node) and is_op(node.args[0], aten.clone) and is_op(node.args[0].args[0], aten.expand):
        ex = node.args[0].args[0]
        un = ex.args[0]
        shape = shape_of(ex)
        if is_op(un, aten.unsqueeze) and len(shape) == 4 and un.args[1] % 4 == 2 and isinstance(shape[2], int):
            return strip_lossless_casts(un.args[0]), shape[2]
    return strip_lossless_casts(node), 1


def match_delta_rule(copy: Node) -> DeltaRuleMatch | Miss:
    """The delta-rule update whose state write-back is `copy` (copy_(state, index_put(state, [idx], S)))."""
    if not is_op(copy, aten.copy_) or not isinstance(copy.args[1], Node):
        return Miss("not a copy", candidate=False)
    state, put = copy.args[0], copy.args[1]
    if not (is_op(put, aten.index_put) and put.args[0] is state and len(put.args[1]) == 1
            and not (len(put.args) > 3 and put.args[3])):
        return Miss("not a row write-back", candidate=False)
    idx, written = put.args[1][0], put.args[2]
    if len(shape_of(state) or ()) != 4 or not isinstance(idx, Node) or len(shape_of(idx) or ()) != 1:
        return Miss("not [slots, H, d, d] state rows picked by one index", candidate=False)
    cast = is_cast(written)
    s1 = written.args[0] if cast else written
    return _match_update(s1, state, idx, put, copy, written, cast)


def match_delta_rule_rows(s1: Node) -> DeltaRuleMatch | Miss:
    """The update S1 = e^g·S + k δᵀ of a state S whose row t is token t's (no slot indices, nothing written
    back in place: Hugging Face's `torch_recurrent_gated_delta_rule`, whose new state goes to its cache by
    assignment). The fused op then writes the new rows into a fresh tensor that replaces S1."""
    if not is_op(s1, aten.add) or len(shape_of(s1) or ()) != 4 or any(is_op(u, aten.index_put) for u in s1.users):
        return Miss("not a state update", candidate=False)
    for a in binary_operands(s1):
        parts = _mul_parts(a)
        for x, y in (parts, parts[::-1]) if parts else ():
            if is_op(_unbroadcast(y, 2), aten.exp) and not is_op(strip_lossless_casts(x), aten.index) \
                    and len(shape_of(x) or ()) == 4 and len(shape_of(y) or ()) == 4:
                return _match_update(s1, strip_lossless_casts(x), None, None, None, s1, False)
    return Miss("not e^g·S + k δᵀ", candidate=False)


def _match_update(s1: Node, state: Node, idx: Node | None, put: Node | None, copy: Node | None, written: Node,
                  cast: bool) -> DeltaRuleMatch | Miss:
    if not is_op(s1, aten.add):
        return Miss("the written rows are not S + k δᵀ", candidate=False)
    # S1 = S0 + outer, S0 = rows(state) · e^g: the rows gathered by idx, or the state itself
    s0 = outer = gather = decay = None
    for a, b in (binary_operands(s1), binary_operands(s1)[::-1]):
        parts = _mul_parts(a)
        for x, y in (parts, parts[::-1]) if parts else ():
            src = strip_lossless_casts(x)
            rows = (is_op(src, aten.index) and src.args[0] is state) if idx is not None else src is state
            if rows:
                s0, outer, gather, decay = a, b, x, _unbroadcast(y, 2)
    if s0 is None or not is_op(decay, aten.exp) or not _mul_parts(outer):
        return Miss("the written rows are not e^g·S + k δᵀ of the gathered rows", candidate=False)
    g = decay.args[0]
    if idx is not None and list(strip_lossless_casts(gather).args[1]) != [idx]:
        return Miss("the rows are gathered with other indices than they are written to", node=s1)
    # u = sum(S0 · k, dk): k's column, and the dim reduced, tell the layout
    u = kcol = None
    for user in s0.users:
        for x, y in (_mul_parts(user), _mul_parts(user)[::-1]) if _mul_parts(user) else ():
            if x is s0 and len(user.users) == 1 and _sum_over(next(iter(user.users))):
                u, kcol = next(iter(user.users)), y
    if u is None:
        return Miss("no u = Σ S·k over the decayed state", node=s1)
    if _sum_over(u)[1] != -2:
        return Miss("the state holds [.., dv, dk] rows (u is reduced over its last dim)",
                    "keep the recurrent state as [slots, Hv, dk, dv] (Hugging Face's layout)", node=s1)
    k_e = _unbroadcast(kcol, 3)
    # outer = k ⊗ δ, δ = β·(v − u)
    o1, o2 = _mul_parts(outer)
    drow = o2 if _unbroadcast(o1, 3) is k_e else o1 if _unbroadcast(o2, 3) is k_e else None
    delta = _unbroadcast(drow, 3) if drow is not None else None
    parts = _mul_parts(delta)
    beta = diff = None
    for x, y in (parts, parts[::-1]) if parts else ():
        if is_op(y, aten.sub) and y.args[1] is u:
            beta, diff = _unbroadcast(x, 2), y
    if beta is None:
        return Miss("the state update is not k δᵀ with δ = β·(v − u)", node=s1)
    v = strip_lossless_casts(diff.args[0])
    # o = Σ S1 · (q·scale) over dk
    out = qcol = None
    for user in s1.users:
        parts = _mul_parts(user)
        for x, y in (parts, parts[::-1]) if parts else ():
            if x is s1 and len(user.users) == 1 and _sum_over(next(iter(user.users))) == (user, -2):
                out, qcol = next(iter(user.users)), y
    if out is None:
        return Miss("no o = Σ S·q read from the updated state", node=s1)
    q_s, scale = _unbroadcast(qcol, 3), 1.0
    if is_op(q_s, aten.mul) and scalar(binary_operands(q_s)[1]) is not None:
        q_s, scale = binary_operands(q_s)[0], scalar(binary_operands(q_s)[1])
    t, hv, dk, dv = shape_of(s1)
    q, rq = _expanded(q_s, hv)
    k, rk = _expanded(k_e, hv)
    shapes = {"q": (q, None), "k": (k, None), "v": (v, (t, hv, dv)), "g": (g, (t, hv)), "beta": (beta, (t, hv))}
    if idx is None:
        shapes["state"] = (state, (t, hv, dk, dv))
    for name, (n, want) in shapes.items():
        have = shape_of(n)
        if want is not None and (have is None or len(have) != len(want)
                                 or not all(known_eq(a, b) for a, b in zip(have, want))):
            return Miss(f"{name} of shape {have}, expected {want}", node=s1)
    hk = shape_of(q)[1] if len(shape_of(q) or ()) == 3 else None
    if rq != rk or hk is None or shape_of(k)[1] != hk or not isinstance(hv, int) or hv != hk * rq \
            or not known_eq(shape_of(q)[2], dk) or not known_eq(shape_of(k)[2], dk):
        return Miss("q and k are not [T, Hk, dk] key heads expanded alike to the value heads", node=s1)
    # near misses on dtype and layout, once the structure is known
    sv = val(state)
    if dtype_of(state) != torch.float32 or cast:
        return Miss(f"the recurrent state is {dtype_of(state)}; braze's kernel updates fp32 state rows",
                    "keep the recurrent state in fp32 (Qwen 3.5's mamba_ssm_dtype)", node=s1)
    if not sv.is_contiguous():
        return Miss(f"the state has strides {tuple(sv.stride())}, not a contiguous [slots, Hv, dk, dv]",
                    "pass the state buffer itself, not a view of it", node=s1)
    for name, n in (("g", g), ("beta", beta), ("q", q), ("k", k)):
        if dtype_of(n) != torch.float32:
            return Miss(f"{name} is {dtype_of(n)}; the update takes fp32 q, k, g and beta",
                        "compute q, k (their L2 norm), g and beta in fp32", node=s1)
    inner = {s1, s0, outer, u, delta, diff, drow, kcol, qcol}
    if idx is not None:  # the gather (and its upcast); the state itself is an input
        inner |= {gather, strip_lossless_casts(gather)}
    elif gather is not state:
        inner.add(gather)  # a lossless upcast of the state
    inner |= set(s0.users) | {out.args[0]} | set(u.args[:1])
    if put is not None:
        inner.add(put)
    if written is not s1:
        inner.add(written)
    for n in list(inner):  # the broadcast views between the values and their uses
        cur = n
        while isinstance(cur, Node) and is_op(cur, *_SIZE1_OPS) and cur not in (k_e, q_s):
            inner.add(cur)
            cur = cur.args[0]
    free = {out, copy} | ({s1} if idx is None else set())  # may be read by anything
    leak = next((n for n in sorted(inner, key=lambda n: n.name) if n not in free
                 and any(x not in inner and x not in free for x in n.users)), None)
    if leak is not None:
        return Miss(f"{describe(leak)} (an intermediate of the state update) is also read elsewhere",
                    "read only the output o and the written state", node=leak)
    spec = DeltaRule(heads_k=int(hk), heads_v=int(hv), dk=int(dk), dv=int(dv), scale=float(scale),
                     indexed=idx is not None)
    return DeltaRuleMatch(spec, q, k, v, g, beta, idx, state, out, copy, s1, frozenset(inner))
