"""The causal depthwise conv1d decode update (Gated DeltaNet, Mamba) in a post-grad ATen graph.

One decode token per sequence, K taps, per channel c of x [T, C]:
  window = cat([state[idx], x.unsqueeze(-1)], -1)        # [T, C, K]
  state[idx] = window[:, :, 1:]                          # in place: index_put + copy_ back
  y = act(sum(window * weight[C, K], -1))                # act = SiLU (or none)
The recognizer anchors on the copy_ that writes the state back, follows the window to
the tap sum and the activation, and reads C, K and the dtypes from the graph: channel
count and conv width are wildcards. The reference is `conv_update_reference`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from .fx import (
    Miss, aten, binary_operands, describe, dtype_of, is_cast, is_op, is_view, scalar, shape_of, strip_lossless_casts,
)
from .stages import dtype_name, round_to as _round


@dataclass(frozen=True)
class ConvUpdate:
    """y = act(Σᵢ w[c, i]·window[c, i]) over the window [state (K-1), x] of each channel.

    `state_dtype`: the state's (and window's) dtype; x is rounded to it. `compute`: the dtype
    of the products and the sum (fp32 only, see the recognizer). `act`: "silu" or "none";
    `out`: the dtype y is rounded to at the end.
    """

    channels: int
    width: int  # K taps; the state holds K - 1 values per channel
    state_dtype: str
    compute: str
    act: str
    out: str
    kind: str = "conv_update"


@dataclass(frozen=True)
class ConvMatch:
    stage: ConvUpdate
    x: Node  # [T, C] new inputs (before any cast to the state dtype)
    state: Node  # [slots, C, K-1] graph input, written in place
    weight: Node  # [C, K]
    indices: Node  # [T] state slot of each token
    output: Node  # y [T, C]
    index_put: Node
    copy: Node  # copy_(state, index_put): the write back
    nodes: frozenset[Node]  # everything the fused op replaces (copy_ excluded: it is kept)


def conv_update_reference(x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor,
                          stage: ConvUpdate) -> torch.Tensor:
    """The stage on real tensors: shifts `state` rows `indices` IN PLACE, returns y [T, C] (fp32-held)."""
    window = torch.cat([state[indices].float(), _round(x.float(), stage.state_dtype).unsqueeze(-1)], -1)
    state.index_copy_(0, indices, window[:, :, 1:].to(state.dtype))
    acc = _round((_round(window * weight.float().reshape(stage.channels, stage.width), stage.compute)).sum(-1),
                 stage.compute)
    if stage.act == "silu":
        acc = _round(acc * torch.sigmoid(acc), stage.compute)
    return _round(acc, stage.out)


def _silu_of(node: Node) -> Node | None:
    """s in silu(s) spelled as aten.silu, s / (1 + exp(-s)) or s * sigmoid(s)."""
    if is_op(node, aten.silu):
        return node.args[0]
    if is_op(node, aten.div):
        s, den = binary_operands(node)
        if is_op(den, aten.add) and scalar(den.args[1]) == 1.0 and is_op(den.args[0], aten.exp) \
                and is_op(den.args[0].args[0], aten.neg) and den.args[0].args[0].args[0] is s:
            return s
    if is_op(node, aten.mul):
        a, b = binary_operands(node)
        for s, sig in ((a, b), (b, a)):
            if is_op(sig, aten.sigmoid) and sig.args[0] is s:
                return s
    return None


def _silu_nodes(out: Node, s: Node) -> set[Node]:
    nodes, frontier = {out}, [out]
    while frontier:
        n = frontier.pop()
        for a in n.all_input_nodes:
            if a is not s and a not in nodes:
                nodes.add(a)
                frontier.append(a)
    return nodes


def match_conv_update(copy: Node) -> ConvMatch | Miss:
    """Recognize the causal conv update whose state write-back is `copy` (copy_(state, index_put(...)))."""
    if copy.target is not aten.copy_.default:
        return Miss("not a copy_", candidate=False)
    state, put = copy.args[0], copy.args[1]
    if not isinstance(state, Node) or state.op != "placeholder" or not is_op(put, aten.index_put):
        return Miss("not an indexed write into a graph input", candidate=False)
    base, indices, rows = put.args[:3]
    if base is not state or len(indices) != 1 or not isinstance(indices[0], Node):
        return Miss("not a row write state[idx] = rows", candidate=False)
    idx = indices[0]
    # rows = window[:, :, 1:], window = cat([state[idx], x.unsqueeze(-1)], -1)
    if not (is_op(rows, aten.slice) and len(rows.args) >= 3 and rows.args[2] == 1 and is_op(rows.args[0], aten.cat)):
        return Miss("the written rows are not a shifted window", candidate=False)
    window = rows.args[0]
    s_shape = shape_of(state)
    if s_shape is None or len(s_shape) != 3 or rows.args[1] % 3 != 2:
        return Miss("not a [slots, C, K-1] state shifted along its last dim", candidate=False)
    parts = window.args[0]
    cat_dim = window.args[1] if len(window.args) > 1 else 0
    if len(parts) != 2 or cat_dim % 3 != 2:
        return Miss("the window is not [state, x] along the last dim", candidate=False)
    gathered, new = parts
    if not (is_op(gathered, aten.index) and gathered.args[0] is state and len(gathered.args[1]) == 1
            and gathered.args[1][0] is idx):
        return Miss(f"the window starts with {describe(gathered)}, not the state rows of the written slots",
                    "read the window as state[idx] with the same indices the write uses", node=window)
    if not (is_op(new, aten.unsqueeze) and new.args[1] % 3 == 2):
        return Miss(f"the window ends with {describe(new)}, not x.unsqueeze(-1)", node=window)
    x = new.args[0]
    cast = None
    if is_cast(x):
        cast, x = x, x.args[0]
    x_shape, w_dtype = shape_of(x), dtype_of(window)
    C, km1 = s_shape[1], s_shape[2]
    if x_shape is None or len(x_shape) != 2 or not isinstance(C, int) or not isinstance(km1, int):
        return Miss(f"x of shape {x_shape}, state of shape {s_shape}: braze takes x [T, C] and a static "
                    "[slots, C, K-1] state", node=window)
    if dtype_of(state) != w_dtype or dtype_of(state) not in (torch.float32, torch.bfloat16, torch.float16):
        return Miss(f"a {dtype_of(state)} state and a {w_dtype} window", node=window)
    # the conv: sum(window (cast) * weight (cast), -1), then the activation
    prod = next((u for u in window.users if is_op(u, aten.mul)), None)
    up = window
    if prod is None:
        up = next((u for u in window.users if is_cast(u)), None)
        prod = next((u for u in up.users if is_op(u, aten.mul)), None) if up is not None else None
    if prod is None:
        return Miss("the shifted window is not multiplied by conv taps", node=window)
    a, b = binary_operands(prod)
    weight = b if a is up else a
    w = strip_lossless_casts(weight) if isinstance(weight, Node) else None
    w_shape = shape_of(w)
    if w is None or w_shape is None or tuple(w_shape) != (C, km1 + 1):
        return Miss(f"conv taps of shape {w_shape}; expected [C, K] = [{C}, {km1 + 1}]",
                    "keep the depthwise conv weight as [channels, taps]", node=prod)
    total = next((u for u in prod.users if is_op(u, aten.sum)), None)
    if total is None or len(prod.users) != 1 or [d % 3 for d in total.args[1]] != [2] or \
            (len(total.args) > 2 and total.args[2]):
        return Miss("the products are not summed over the taps alone", node=prod)
    compute = dtype_of(total)
    if compute != torch.float32 or dtype_of(prod) != torch.float32:
        return Miss(f"the taps are summed in {compute}; braze's conv update computes in fp32",
                    "upcast the window and the taps (window.float() * weight.float())", node=total)
    out, act, nodes = total, "none", {gathered, new, window, prod, total, rows, put}
    if cast is not None:
        nodes.add(cast)
    if up is not window:
        nodes.add(up)
    if weight is not w:
        nodes.add(weight)
    silu = next((u for u in total.users if _silu_of(u) is total
                 or any(_silu_of(v) is total for v in u.users)), None)
    if silu is not None:
        end = silu if _silu_of(silu) is total else next(v for v in silu.users if _silu_of(v) is total)
        nodes |= _silu_nodes(end, total)
        out, act = end, "silu"
    if len(out.users) == 1 and is_cast(next(iter(out.users))):
        out = next(iter(out.users))
        nodes.add(out)
    stage = ConvUpdate(channels=C, width=km1 + 1, state_dtype=dtype_name(dtype_of(state)), compute="float32",
                       act=act, out=dtype_name(dtype_of(out)))
    return ConvMatch(stage, x, state, w, idx, out, put, copy, frozenset(nodes))


def through_views(node: Node) -> Node:
    while is_view(node):
        node = node.args[0]
    return node
