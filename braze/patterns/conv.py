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
    Miss,
    aten,
    binary_operands,
    describe,
    dtype_of,
    is_cast,
    is_op,
    scalar,
    shape_of,
    strip_lossless_casts,
)
from .stages import dtype_name
from .stages import round_to as _round


@dataclass(frozen=True)
class ConvUpdate:
    """y = act(Σᵢ w[c, i]·window[c, L+1-K+i]) over the window [state (L values), x] of each channel;
    the state becomes window[1:].

    braze / vLLM keep L = K-1 values per channel; Hugging Face's fallback keeps L = K (its oldest
    value is never read). `state_dtype`: the state's (and window's) dtype, x is rounded to it; the
    products are fp32 and their sum is rounded to `acc`; SiLU (act "silu", or "none") is computed in
    fp32; y is rounded to `out`. `indexed`: token t's state row is indices[t] (else row t).
    """

    channels: int
    width: int  # K taps
    state_len: int  # L >= K - 1 values per channel
    state_dtype: str
    acc: str
    act: str
    out: str
    indexed: bool = True
    kind: str = "conv_update"


@dataclass(frozen=True)
class ConvMatch:
    stage: ConvUpdate
    x: Node  # [T, C] (or [T, C, 1]) new inputs, before any cast to the state dtype
    state: Node  # [rows, C, L] graph input, written in place
    weight: Node  # [C, K] (or [C, 1, K])
    indices: Node | None  # [T] state row of each token (indexed writes)
    output: Node  # y [T, C] (or [T, C, 1])
    index_put: Node  # the new state value (index_put, or a functional copy of the whole state)
    copy: Node  # copy_(state, new value): the write back
    nodes: frozenset[Node]  # everything the fused op replaces (copy_ excluded: it is kept)


def conv_update_reference(x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor | None,
                          stage: ConvUpdate) -> torch.Tensor:
    """The stage on real tensors: shifts the state rows of the tokens IN PLACE, returns y [T, C] (fp32-held)."""
    t = x.shape[0]
    rows = indices if indices is not None else torch.arange(t, device=x.device)
    x = _round(x.reshape(t, stage.channels).float(), stage.state_dtype)
    window = torch.cat([state[rows].float(), x.unsqueeze(-1)], -1)  # [T, C, L+1]
    state.index_copy_(0, rows, window[:, :, 1:].to(state.dtype))
    taps = window[:, :, stage.state_len + 1 - stage.width:]
    acc = _round((taps * weight.float().reshape(stage.channels, stage.width)).sum(-1), stage.acc)
    if stage.act == "silu":
        acc = acc * torch.sigmoid(acc)
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
    stage = ConvUpdate(channels=C, width=km1 + 1, state_len=km1, state_dtype=dtype_name(dtype_of(state)),
                       acc="float32", act=act, out=dtype_name(dtype_of(out)))
    return ConvMatch(stage, x, state, w, idx, out, put, copy, frozenset(nodes))


def match_conv_window(copy: Node) -> ConvMatch | Miss:
    """Hugging Face's fallback (`causal_conv1d_update` without the causal-conv1d package): every row of a
    [B, C, L] state is one sequence, written whole.

      window = cat([state, x[B, C, 1]], -1)                 # [B, C, L+1]
      state.copy_(window[:, :, -L:])                        # a functional copy, then copy_ back
      y = act(conv1d(window, w[C, 1, K], groups=C)[:, :, -1:])
    """
    if copy.target is not aten.copy_.default:
        return Miss("not a copy_", candidate=False)
    state, new = copy.args[0], copy.args[1]
    if not isinstance(state, Node) or state.op != "placeholder" or not is_op(new, aten.copy) or new.args[0] is not state:
        return Miss("not a whole-state write", candidate=False)
    rows = new.args[1]
    s_shape = shape_of(state)
    if s_shape is None or len(s_shape) != 3 or not all(isinstance(d, int) for d in s_shape[1:]):
        return Miss("not a [B, C, L] state", candidate=False)
    C, L = s_shape[1], s_shape[2]
    if not (is_op(rows, aten.slice) and rows.args[1] % 3 == 2 and rows.args[2] in (1, -L) and is_op(rows.args[0], aten.cat)):
        return Miss("the written rows are not a shifted window", candidate=False)
    window = rows.args[0]
    parts = window.args[0]
    if len(parts) != 2 or parts[0] is not state or (window.args[1] if len(window.args) > 1 else 0) % 3 != 2:
        return Miss("the window is not [state, x] along the last dim", candidate=False)
    x = parts[1]
    x_shape = shape_of(x)
    if x_shape is None or len(x_shape) != 3 or x_shape[2] != 1 or dtype_of(window) != dtype_of(state):
        return Miss(f"the window appends {x_shape} {dtype_of(x)} to a {dtype_of(state)} state: braze takes one new "
                    "value per channel in the state's dtype", node=window)
    conv = next((u for u in window.users if is_op(u, aten.convolution)), None)
    if conv is None or len(window.users) != 2:
        return Miss("the shifted window is read by other ops than one depthwise conv", node=window)
    weight, bias, stride, padding, dilation, transposed, _, groups = conv.args[1:9]
    w_shape = shape_of(weight)
    if bias is not None or list(stride) != [1] or list(padding) != [0] or list(dilation) != [1] or transposed \
            or groups != C or w_shape is None or tuple(w_shape[:2]) != (C, 1) or not L + 1 >= w_shape[2] >= 2:
        return Miss(f"{describe(conv)} is not a bias-free depthwise conv1d of stride 1 without padding over the "
                    f"window (weight {w_shape}, groups {groups})", node=conv)
    K = w_shape[2]
    last = next(iter(conv.users)) if len(conv.users) == 1 else None
    if not (is_op(last, aten.slice) and last.args[1] % 3 == 2 and last.args[2] == -1 and shape_of(last)[2] == 1):
        return Miss("the conv output is not cut to its last position", node=conv)
    nodes = {window, rows, new, conv, last}
    out, act = last, "none"
    up = next(iter(last.users)) if len(last.users) == 1 else None
    base = up if is_cast(up) and dtype_of(up) == torch.float32 else last
    silu = next((u for u in base.users if _silu_of(u) is base or any(_silu_of(v) is base for v in u.users)), None)
    if silu is not None:
        end = silu if _silu_of(silu) is base else next(v for v in silu.users if _silu_of(v) is base)
        nodes |= _silu_nodes(end, base) | {base}
        out, act = end, "silu"
    if len(out.users) == 1 and is_cast(next(iter(out.users))):
        out = next(iter(out.users))
        nodes.add(out)
    stage = ConvUpdate(channels=C, width=K, state_len=L, state_dtype=dtype_name(dtype_of(state)),
                       acc=dtype_name(dtype_of(conv)), act=act, out=dtype_name(dtype_of(out)), indexed=False)
    return ConvMatch(stage, x, state, strip_lossless_casts(weight), None, out, new, copy, frozenset(nodes))
