"""MoE routers: scores -> top-k experts -> the chosen scores, renormalized and scaled, as one site.

A decode step's router is three or four small kernels under stock Inductor (the softmax, the top-k, the gather
with its normalization), each a launch over a [T, E] tile of a few hundred values. Recognized on structure:

    scores = softmax(logits in fp32)  |  sigmoid(logits in fp32)
    choice = scores [+ bias]                     (a per-expert correction bias, sigmoid or softmax)
    idx    = topk(choice, k).indices             (the values unused)
    w      = gather(scores, idx)
    w      = w / (sum(w) [+ eps])                (optional)
    w      = w * scaling                         (optional, a Python number)

Expert counts, k, the logits' dtype and the presence of each optional step are wildcards. Group-limited
routing (DeepSeek's top groups first: a masked choice) and a choice other than the scores (+ bias) are left
alone, with a `missed` remark where the site otherwise looks like a router.

The reference (`router_reference`) is what braze's kernel implements: the scores in fp32, the k largest
choices with ties in index order and NaN above every number (as braze's top-k orders them), the weights in
choice order.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Node

from .fx import Miss, aten, dtype_of, is_cast, is_lossless, is_op, prims, scalar, shape_of, val
from .stages import FlatJsonSpec
from .topk import topk_reference

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
    if is_op(total, aten.sum) and total.args[0] is exp:
        if not _last_dim(total.args[1], rank) or not (len(total.args) > 2 and total.args[2]):
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


def match_router(topk: Node) -> RouterMatch | Miss:
    """The router around `topk` (an aten.topk whose indices select the scores it ranked), or why not."""
    if not is_op(topk, aten.topk):
        return Miss("not a topk", candidate=False)
    args = list(topk.args) + [None] * 5
    choice, k = args[0], args[1]
    dim = topk.kwargs.get("dim", args[2] if args[2] is not None else -1)
    largest = topk.kwargs.get("largest", args[3] if args[3] is not None else True)
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
    if choice is not scores:
        if not (is_op(choice, aten.add) and scores in choice.args[:2]):
            return Miss(f"the experts are chosen by {choice.target}, not the scores (+ a bias): group-limited "
                        "routing is not fused", "route without expert groups", node=topk)
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
        if list(total.args[1]) not in ([-1], [1]) or not (len(total.args) > 2 and total.args[2]):
            return Miss("the weights are normalized by another sum than their row's", node=total)
        den = div.args[1]
        if den is total:
            inner |= {total, div}
        elif is_op(den, aten.add) and den.args[0] is total and scalar(den.args[1]) is not None \
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
                  scaling=scaling)
    return RouterMatch(spec, logits, bias, topk, indices, w, frozenset(inner))
