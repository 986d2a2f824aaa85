"""MoE routers: scores -> top-k experts -> the chosen scores, renormalized and scaled, as one site.

A decode step's router is three or four small kernels under stock Inductor (the softmax, the top-k, the gather
with its normalization), each a launch over a [T, E] tile of a few hundred values. Recognized on structure:

    scores = softmax(logits in fp32)  |  sigmoid(logits in fp32)
    choice = scores [+ bias]                     (a per-expert correction bias, sigmoid or softmax)
    idx    = topk(choice, k).indices             (the values unused)
    w      = gather(scores, idx)
    w      = w / (sum(w) [+ eps])                (optional)
    w      = w * scaling                         (optional, a Python number)

Expert counts, k, the logits' dtype and the presence of each optional step are wildcards. DeepSeek V3's
group-limited routing (the choice masked to -inf outside the best groups, a group scored by the sum of its two
largest choices) is recognized too; other choices are left alone, with a `missed` remark where the site otherwise
looks like a router.

The reference (`router_reference`) is what braze's kernel implements: the scores in fp32, the k largest
choices with ties in index order and NaN above every number (as braze's top-k orders them), the weights in
choice order.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Node

from .fx import Miss, aten, describe, dtype_of, is_cast, is_lossless, is_op, prims, scalar, shape_of, val
from .stages import FlatJsonSpec
from .topk import topk_args, topk_reference

ROUTER_MAX_EXPERTS = 4096  # one program holds a row of scores in registers
SCORINGS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class Router(FlatJsonSpec):
    """logits [T, experts] -> (weights [T, k] fp32, expert ids [T, k] int64)."""

    experts: int
    k: int
    scoring: str  # "softmax" | "sigmoid"
    bias: bool  # choice = scores + bias [experts] (fp32)
    renormalize: bool
    eps: float  # added to the sum before the renormalizing divide (0.0: none)
    scaling: float  # the weights' multiplier (1.0: none)
    # group-limited routing: the experts in `groups` equal groups, each scored by the sum of its two largest
    # choices; only the `top_groups` best groups' experts can be chosen (the others' choices are -inf)
    groups: int = 1
    top_groups: int = 1


@dataclass(frozen=True)
class RouterMatch:
    spec: Router
    logits: Node  # [T, E], before any upcast
    bias: Node | None  # [E]
    topk: Node
    indices: Node  # getitem(topk, 1)
    weights: Node  # the last node of the weights' chain
    inner: frozenset[Node]  # what the fused op replaces (indices and weights included)


def router_reference(spec: Router, logits: torch.Tensor, bias: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.float()
    scores = x.softmax(-1) if spec.scoring == "softmax" else torch.sigmoid(x)
    choice = scores + bias.float() if spec.bias else scores
    if spec.groups > 1:
        t = choice.shape[0]
        per_group = topk_reference(choice.view(t, spec.groups, -1), 2)[0].sum(-1)  # [T, G]
        keep = torch.zeros_like(per_group, dtype=torch.bool).scatter_(1, topk_reference(per_group, spec.top_groups)[1],
                                                                      True)
        choice = choice.masked_fill(~keep.repeat_interleave(spec.experts // spec.groups, dim=1), float("-inf"))
    _, idx = topk_reference(choice, spec.k)
    w = scores.gather(-1, idx)
    if spec.renormalize:
        w = w / (w.sum(-1, keepdim=True) + spec.eps)
    return w * spec.scaling, idx


def _users(node: Node) -> list[Node]:
    return list(node.users)


def _lossless_upcast(node: Node) -> Node:
    """The fp32 value's source before a lossless cast to fp32 (or the node itself)."""
    if is_cast(node) and dtype_of(node) == torch.float32 and is_lossless(dtype_of(node.args[0]), torch.float32):
        return node.args[0]
    return node


def _last_dim(dims: object, rank: int) -> bool:
    dims = [dims] if isinstance(dims, int) else list(dims) if isinstance(dims, (list, tuple)) else None
    return dims in ([-1], [rank - 1])


def _row_sum(node: object, of: Node, rank: int) -> bool:
    """node = of.sum(-1, keepdim=True) (a sum with no dims, or dims None, is not)."""
    return (is_op(node, aten.sum) and node.args[0] is of and len(node.args) > 2 and _last_dim(node.args[1], rank)
            and node.args[2] is True)


def _plain_add(node: object) -> bool:
    return is_op(node, aten.add) and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1


def _softmax(div: Node) -> tuple[Node, set[Node]] | None:
    """x and the nodes of softmax(x, -1) spelled as Inductor decomposes it: exp(x - amax(x)) / sum(...), or (on
    GPUs, after Inductor's online-softmax rewrite) with amax and sum from one prepare_softmax_online(x)."""
    if not is_op(div, aten.div) or len(div.args) != 2:
        return None
    exp, total = div.args
    if not is_op(exp, aten.exp) or not is_op(exp.args[0], aten.sub):
        return None
    sub, rank = exp.args[0], len(shape_of(exp))
    x, top = sub.args[0], sub.args[1]
    if is_op(total, aten.sum):
        if not _row_sum(total, exp, rank):
            return None
        if not (is_op(top, aten.amax) and top.args[0] is x and _last_dim(top.args[1], rank)):
            return None
        return x, {div, exp, total, sub, top}
    if total.target is operator.getitem and top.target is operator.getitem and total.args[0] is top.args[0] \
            and (top.args[1], total.args[1]) == (0, 1):
        online = total.args[0]
        if is_op(online, prims.prepare_softmax_online) and online.args[0] is x and _last_dim(online.args[1], rank):
            return x, {div, exp, total, sub, top, online}
    return None


def _strip_views(node: object) -> object:
    while is_op(node, aten.view, aten.reshape, aten._unsafe_view, aten.clone):
        node = node.args[0]
    return node


def _constant(node: object) -> float | None:
    """The value of a number, or of a 0-d constant node (scalar_tensor(v), or full([], v) after Inductor's folding)."""
    if is_op(node, aten.scalar_tensor):
        return scalar(node.args[0])
    if is_op(node, aten.full) and list(node.args[0]) == []:
        return scalar(node.args[1])
    return scalar(node)


def _group_limited(masked: Node) -> tuple[Node, int, int, set[Node]] | Miss:
    """(the choice before masking, groups, top groups, nodes) of DeepSeek V3's group-limited choice:

        group_scores = choice.view(T, G, -1).topk(2).values.sum(-1)
        keep = zeros(T, G).scatter(1, group_scores.topk(top_groups).indices, 1)
        masked = where(keep expanded to [T, E] == 0, -inf, choice)      (masked_fill)
    """
    def miss(why: str) -> Miss:
        return Miss(f"the experts are chosen by {describe(masked)}, not the scores (+ a bias) or DeepSeek V3's "
                    f"group-limited choice: {why}", "route without expert groups, or as braze.models.moe.route does",
                    node=masked)

    if is_op(masked, aten.where) and len(masked.args) == 3:
        cond, fill, choice = masked.args
        fill_value = _constant(fill)
    elif is_op(masked, aten.masked_fill) and len(masked.args) == 3:
        choice, cond, fill_value = masked.args
        fill = None
    else:
        return miss("not a masked choice")
    if fill_value != float("-inf"):
        return miss(f"the dropped experts' choices are {fill_value}, not -inf")
    if not (is_op(cond, aten.eq) and scalar(cond.args[1]) == 0.0):
        return miss("the mask is not `group mask == 0`")
    expand = _strip_views(cond.args[0])
    if not (is_op(expand, aten.expand) and is_op(expand.args[0], aten.unsqueeze)):
        return miss("the group mask is not expanded over each group's experts")
    scatter = expand.args[0].args[0]
    if not (is_op(scatter, aten.scatter) and scatter.args[1] in (1, -1) and scalar(scatter.args[3]) == 1.0
            and is_op(scatter.args[0], aten.full) and scalar(scatter.args[0].args[1]) == 0.0):
        return miss("the group mask is not zeros scattered with ones at the chosen groups")
    gidx = scatter.args[2]
    gtopk = gidx.args[0] if gidx.target is operator.getitem and gidx.args[1] == 1 else None
    if not is_op(gtopk, aten.topk):
        return miss("the groups are not chosen by a top-k")
    gscores, top_groups, gdim, glargest = topk_args(gtopk)
    if gdim not in (-1, 1) or not glargest or not isinstance(top_groups, int):
        return miss("the groups are not the largest top-k of their scores")
    if not (is_op(gscores, aten.sum) and len(gscores.args) > 1 and _last_dim(gscores.args[1], 3)
            and not (len(gscores.args) > 2 and gscores.args[2])):
        return miss("a group's score is not a sum over its experts' top choices")
    vals = gscores.args[0]
    two = vals.args[0] if vals.target is operator.getitem and vals.args[1] == 0 else None
    if not is_op(two, aten.topk):
        return miss("a group's score is not the sum of its top choices")
    gview, n2, tdim, tlargest = topk_args(two)
    if n2 != 2 or tdim not in (-1, 2) or not tlargest:
        return miss(f"a group's score sums its top {n2}, braze's kernel the top 2")
    if _strip_views(gview) is not choice or len(shape_of(gview) or ()) != 3:
        return miss("the group scores are not taken from the choice viewed as [T, groups, experts per group]")
    _, groups, per = shape_of(gview)
    if not all(isinstance(d, int) for d in (groups, per)) or per < 2 or not 0 < top_groups <= groups:
        return miss(f"{groups} groups of {per} experts, top {top_groups}")
    # the mask must give expert e its group e // per, as the scores' view does: [T, G] -> [T, G, 1] -> [T, G, per]
    if expand.args[0].args[1] not in (-1, 2) or list(shape_of(expand) or ())[1:] != [groups, per]:
        return miss(f"the group mask is spread over the experts as {shape_of(expand)}, not [T, {groups}, {per}]")
    nodes = {masked, cond, expand, expand.args[0], scatter, scatter.args[0], gidx, gtopk, gscores, vals, two, gview}
    nodes |= {n for n in (fill,) if isinstance(n, Node)}
    n = cond.args[0]
    while n is not expand:
        nodes.add(n)
        n = n.args[0]
    n = gview
    while n is not choice:
        nodes.add(n)
        n = n.args[0]
    for u in gtopk.users:
        nodes.add(u)
    for u in two.users:
        nodes.add(u)
    return choice, groups, top_groups, nodes


def match_router(topk: Node) -> RouterMatch | Miss:
    """The router around `topk` (an aten.topk whose indices select the scores it ranked), or why not."""
    if not is_op(topk, aten.topk):
        return Miss("not a topk", candidate=False)
    choice, k, dim, largest = topk_args(topk)
    cv = val(choice)
    if cv is None or cv.dim() != 2 or dim not in (-1, 1) or not largest or not isinstance(k, int):
        return Miss("not a largest top-k over the last dim of a 2-d tensor", candidate=False)
    gets = _users(topk)
    if not all(u.target is operator.getitem for u in gets) or any(u.args[1] == 0 and u.users for u in gets):
        return Miss("the top-k values are read", candidate=False)
    indices = next((u for u in gets if u.args[1] == 1), None)
    if indices is None:
        return Miss("the top-k indices are unused", candidate=False)
    gathers = [u for u in indices.users if is_op(u, aten.gather)]
    if len(gathers) != 1:
        return Miss("no single gather of scores at the chosen experts", candidate=False)
    gather = gathers[0]
    scores = gather.args[0]
    if gather.args[1] not in (-1, 1) or gather.args[2] is not indices:
        return Miss("the gather is not along the experts", candidate=False)
    # from here on the site looks like a router: a miss says why
    inner: set[Node] = {topk, *gets, gather}
    bias = None
    groups, top_groups = 1, 1
    if choice is not scores and not (_plain_add(choice) and scores in choice.args[:2]):
        limited = _group_limited(choice)
        if isinstance(limited, Miss):
            return limited
        choice, groups, top_groups, group_nodes = limited
        inner |= group_nodes
    if choice is not scores:
        if not (_plain_add(choice) and scores in choice.args[:2]):
            return Miss(f"the experts are chosen by {choice.target}, not the scores (+ a bias)", node=topk)
        bias = choice.args[1] if choice.args[0] is scores else choice.args[0]
        if not isinstance(bias, Node) or shape_of(bias) != (cv.shape[1],) or dtype_of(bias) != torch.float32:
            return Miss(f"the choice adds {bias} to the scores, not an fp32 [{cv.shape[1]}] bias", node=choice)
        inner.add(choice)
    if dtype_of(scores) != torch.float32:
        return Miss(f"the scores are {dtype_of(scores)}; braze's router computes them in fp32",
                    "score in fp32 (softmax(dtype=torch.float32) or logits.float())", node=scores)
    soft = _softmax(scores)
    if soft is not None:
        x, nodes = soft
        scoring = "softmax"
    elif is_op(scores, aten.sigmoid):
        x, nodes, scoring = scores.args[0], {scores}, "sigmoid"
    else:
        return Miss(f"the scores are {scores.target}, not a softmax or a sigmoid of the logits", node=scores)
    inner |= nodes
    logits = _lossless_upcast(x)
    if logits is not x:
        if all(u in inner for u in x.users):
            inner.add(x)
        else:  # the upcast is read elsewhere too: it stays, and the op reads it
            logits = x
    if dtype_of(logits) not in (torch.float32, torch.bfloat16, torch.float16):
        return Miss(f"the logits are {dtype_of(logits)}", node=x)
    experts = cv.shape[1]
    if not isinstance(experts, int) or experts > ROUTER_MAX_EXPERTS:
        return Miss(f"{experts} experts: braze's router takes a static count of at most {ROUTER_MAX_EXPERTS}",
                    node=topk)
    if not 0 < k <= experts:
        return Miss(f"k={k} of {experts} experts", node=topk)
    # the weights: gather [/ (sum [+ eps])] [* scaling]
    w, renorm, eps, scaling = gather, False, 0.0, 1.0
    users = _users(w)
    total = next((u for u in users if is_op(u, aten.sum) and u.args[0] is w), None)
    div = next((u for u in users if is_op(u, aten.div) and u.args[0] is w), None)
    if total is not None and div is not None and len(users) == 2:
        if not _row_sum(total, w, 2):
            return Miss("the weights are normalized by another sum than their row's", node=total)
        den = div.args[1]
        if den is total:
            inner |= {total, div}
        elif _plain_add(den) and den.args[0] is total and scalar(den.args[1]) is not None \
                and len(total.users) == 1:
            eps = scalar(den.args[1])
            inner |= {total, den, div}
        else:
            return Miss("the weights are divided by something other than their sum (+ a number)", node=div)
        if len(total.users) != 1:
            return Miss("the weights' sum is also read elsewhere", node=total)
        w, renorm = div, True
    if len(w.users) == 1:
        mul = next(iter(w.users))
        if is_op(mul, aten.mul) and mul.args[0] is w and scalar(mul.args[1]) is not None:
            scaling, w = scalar(mul.args[1]), mul
            inner.add(mul)
    # nothing inside may be read outside (the indices and the weights are the op's outputs)
    for n in inner - {indices, w}:
        outside = [u for u in n.users if u not in inner]
        if outside:
            return Miss(f"{n} is also read by {outside[0]}: the router's intermediate escapes",
                        "read only the weights and the expert ids", node=n)
    spec = Router(experts=experts, k=k, scoring=scoring, bias=bias is not None, renormalize=renorm, eps=eps,
                  scaling=scaling, groups=groups, top_groups=top_groups)
    return RouterMatch(spec, logits, bias, topk, indices, w, frozenset(inner))
