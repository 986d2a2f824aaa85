"""Gated DeltaNet's post-conv stages in a post-grad ATen graph: the L2 norm of q and k, and the gating.

- L2 norm over the last dim, computed in fp32: x * rsqrt(sum(x * x, -1, keepdim) + eps); eps a wildcard.
- gating: g = -exp(A_log) * softplus(a + dt_bias) (softplus with beta 1, any threshold) and
  beta = sigmoid(b); a, b [T, Hv], A_log and dt_bias [Hv]; Hv a wildcard.
Each recognizer returns its stage or a Miss with the reason. `PostConv` is the whole fused
site (conv update -> split into segments -> per-head L2 norm of some -> gating) that
braze.codegen.post_conv compiles; `post_conv_reference` is its pure-torch ground truth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.fx import Node

from .conv import ConvUpdate, conv_update_reference
from .fx import (
    Miss,
    aten,
    binary_operands,
    dtype_of,
    is_op,
    scalar,
    shape_of,
    strip_lossless_casts,
)
from .stages import _JsonSpec, dtype_name
from .stages import round_to as _round


@dataclass(frozen=True)
class L2Norm:
    eps: float
    out: str  # the output's dtype (the math is fp32)
    kind: str = "l2norm"


@dataclass(frozen=True)
class L2NormMatch:
    stage: L2Norm
    x: Node  # the normalized tensor, before its upcast
    output: Node
    nodes: frozenset[Node]


@dataclass(frozen=True)
class Gating:
    """g = -exp(A_log)·softplus(a + dt_bias) (fp32, softplus(s) = s above `threshold`), beta = sigmoid(b)."""

    heads: int
    threshold: float
    g_out: str
    beta_out: str
    kind: str = "gdn_gating"


@dataclass(frozen=True)
class GatingMatch:
    stage: Gating
    a: Node  # [T, Hv] (or [B, 1, Hv]: one token per sequence)
    b: Node  # [T, Hv] (or [B, 1, Hv])
    a_log: Node  # [Hv]
    dt_bias: Node  # [Hv]
    g: Node
    beta: Node
    nodes: frozenset[Node]


@dataclass(frozen=True)
class Segment:
    """Channels [start, start + heads·head_dim) of the conv output, L2-normed per head when `norm`."""

    start: int
    heads: int
    head_dim: int
    norm: L2Norm | None


@dataclass(frozen=True)
class PostConv(_JsonSpec):
    """The fused site. Inputs: x [T, C], weight [C, K], indices [T] (then a, b, A_log, dt_bias with
    gating); the state [slots, C, K-1] is mutated. Outputs: one per segment ([T, heads, head_dim] in
    the norm's dtype, else in conv.out), then g and beta [T, Hv] with gating. Each output is fp32 or
    conv.out; the op returns them packed in two flat buffers of those dtypes (`placement`)."""

    conv: ConvUpdate
    segments: tuple[Segment, ...]
    gating: Gating | None

    def __post_init__(self) -> None:
        end = 0
        for s in self.segments:
            assert s.start == end, "segments tile the channels in order"
            end += s.heads * s.head_dim
        assert end == self.conv.channels, (end, self.conv.channels)
        for dt, _ in self.output_specs():
            assert dt in ("float32", self.conv.out), f"post-conv outputs are fp32 or {self.conv.out}, not {dt}"

    def input_names(self) -> list[str]:
        return ["x", "weight"] + (["indices"] if self.conv.indexed else []) + (
            ["a", "b", "a_log", "dt_bias"] if self.gating else [])

    def output_specs(self) -> list[tuple[str, tuple[int, ...]]]:
        """(dtype, per-token shape) of each output."""
        out = [(s.norm.out if s.norm else self.conv.out, (s.heads, s.head_dim)) for s in self.segments]
        if self.gating:
            out += [(self.gating.g_out, (self.gating.heads,)), (self.gating.beta_out, (self.gating.heads,))]
        return out


    def placement(self) -> tuple[list[tuple[int, int]], tuple[int, int]]:
        """Per output (buffer, elements per token before it in that buffer); and each buffer's elements per
        token. Buffer 0 holds the fp32 outputs, buffer 1 the conv.out ones (none when conv.out is fp32)."""
        widths, place = [0, 0], []
        for dt, shape in self.output_specs():
            b = 0 if dt == "float32" else 1
            place.append((b, widths[b]))
            widths[b] += math.prod(shape)
        return place, (widths[0], widths[1])


def l2norm_reference(x: torch.Tensor, stage: L2Norm) -> torch.Tensor:
    x = x.float()
    return _round(x * torch.rsqrt((x * x).sum(-1, keepdim=True) + stage.eps), stage.out)


def gating_reference(a, b, a_log, dt_bias, stage: Gating) -> tuple[torch.Tensor, torch.Tensor]:
    s = a.float() + dt_bias.float()
    softplus = torch.where(s > stage.threshold, s, torch.log1p(torch.exp(s)))
    g = _round(-torch.exp(a_log.float()) * softplus, stage.g_out)
    return g, _round(torch.sigmoid(b.float()), stage.beta_out)


def post_conv_reference(spec: PostConv, inputs: list[torch.Tensor], state: torch.Tensor) -> list[torch.Tensor]:
    """The site's outputs (PostConv.output_specs) for `inputs` (input_names); shifts `state` in place."""
    named = dict(zip(spec.input_names(), inputs))
    x, t = named["x"], named["x"].shape[0]
    hv = spec.gating.heads if spec.gating else 0
    y = conv_update_reference(x, state, named["weight"], named.get("indices"), spec.conv)  # [T, C] fp32-held
    outs = []
    for s in spec.segments:
        seg = y[:, s.start:s.start + s.heads * s.head_dim].reshape(t, s.heads, s.head_dim)
        out = l2norm_reference(seg, s.norm) if s.norm else seg
        outs.append(out.to(getattr(torch, s.norm.out if s.norm else spec.conv.out)))
    if spec.gating:
        a, b = named["a"].reshape(t, hv), named["b"].reshape(t, hv)
        g, beta = gating_reference(a, b, named["a_log"], named["dt_bias"], spec.gating)
        outs += [g.to(getattr(torch, spec.gating.g_out)), beta.to(getattr(torch, spec.gating.beta_out))]
    return outs


# ---------------------------------------------------------------------------- recognizers


def match_l2norm(total: Node) -> L2NormMatch | Miss:
    """The L2 norm whose sum of squares is `total` (sum(x * x, -1, keepdim=True))."""
    if not is_op(total, aten.sum) or not isinstance(total.args[0], Node):
        return Miss("not a sum", candidate=False)
    sq = total.args[0]
    if not (is_op(sq, aten.mul) and sq.args[0] is sq.args[1] and isinstance(sq.args[0], Node)):
        return Miss("not a sum of squares", candidate=False)
    xf = sq.args[0]
    shape = shape_of(xf)
    dims = total.args[1] if len(total.args) > 1 else None
    keep = total.args[2] if len(total.args) > 2 else total.kwargs.get("keepdim", False)
    if not shape or dims is None or [d % len(shape) for d in dims] != [len(shape) - 1] or not keep:
        return Miss("not a sum of squares over the last dim with keepdim", candidate=False)
    add = next(iter(total.users)) if len(total.users) == 1 else None
    eps = None
    if is_op(add, aten.add):
        a, b = binary_operands(add)
        eps = scalar(b) if a is total else scalar(a)
    root = next(iter(add.users)) if eps is not None and len(add.users) == 1 else None
    x = strip_lossless_casts(xf)
    if not is_op(root, aten.rsqrt):
        return Miss("a sum of squares not followed by rsqrt(. + eps) with a constant eps",
                    "write x * rsqrt((x * x).sum(-1, keepdim=True) + eps)", node=x)
    out = next((u for u in root.users if is_op(u, aten.mul) and xf in u.args[:2]), None)
    if out is None or len(root.users) != 1:
        return Miss("rsqrt(sum of squares + eps) does not scale the same x", node=x)
    if any(dtype_of(n) != torch.float32 for n in (xf, sq, total, add, root, out)):
        return Miss(f"the L2 norm is computed in {dtype_of(out)}; braze fuses it computed in fp32",
                    "upcast first: x = x.float()", node=x)
    nodes = {sq, total, add, root, out} | ({xf} if xf is not x else set())
    return L2NormMatch(L2Norm(eps=eps, out=dtype_name(dtype_of(out))), x, out, frozenset(nodes))


def _softplus(node: Node) -> tuple[Node, float, set[Node]] | None:
    """(s, threshold, nodes) of softplus(s) with beta 1: aten.softplus or where(s > thr, s, log1p(exp(s)))."""
    if is_op(node, aten.softplus):
        beta = node.args[1] if len(node.args) > 1 else 1
        thr = node.args[2] if len(node.args) > 2 else 20
        return (node.args[0], float(thr), {node}) if beta == 1 else None
    if not is_op(node, aten.where) or len(node.args) != 3:
        return None
    cond, s, soft = node.args
    if not (is_op(cond, aten.gt) and cond.args[0] is s and scalar(cond.args[1]) is not None):
        return None
    if not (is_op(soft, aten.log1p) and is_op(soft.args[0], aten.exp) and soft.args[0].args[0] is s):
        return None
    return s, float(cond.args[1]), {node, cond, soft, soft.args[0]}


def match_gating(mul: Node) -> GatingMatch | Miss:
    """g = -exp(A_log) * softplus(a + dt_bias) ending at `mul`; beta is paired by the pass (match_beta)."""
    if not is_op(mul, aten.mul, aten.neg):
        return Miss("not a product", candidate=False)
    nodes: set[Node] = {mul}
    if is_op(mul, aten.neg):  # -(exp(A) * softplus)
        inner = mul.args[0]
        if not is_op(inner, aten.mul):
            return Miss("not a product", candidate=False)
        nodes.add(inner)
        a0, b0 = binary_operands(inner)
        pairs = [(a0, b0), (b0, a0)]
        pairs = [(e, sp) for e, sp in pairs if is_op(e, aten.exp)]
    else:
        a0, b0 = binary_operands(mul)
        pairs = [(n.args[0], sp) for n, sp in ((a0, b0), (b0, a0)) if is_op(n, aten.neg) and is_op(n.args[0], aten.exp)]
        nodes |= {n for n, _ in ((a0, b0), (b0, a0)) if is_op(n, aten.neg)}
    for e, sp in pairs:
        soft = _softplus(sp) if isinstance(sp, Node) else None
        if soft is None:
            continue
        s, thr, soft_nodes = soft
        if not is_op(s, aten.add):
            return Miss("softplus of something other than a + dt_bias", candidate=False)
        p, q = binary_operands(s)
        a_log, p_a, p_dt = e.args[0], None, None
        for u, v in ((p, q), (q, p)):
            if isinstance(u, Node) and isinstance(v, Node) and len(shape_of(u) or ()) >= 2 and len(shape_of(v) or ()) == 1:
                p_a, p_dt = u, v
        if p_a is None:
            return Miss(f"softplus(a + dt_bias) with a of shape {shape_of(p)} and dt_bias of shape {shape_of(q)}: "
                        "braze takes a [T, Hv] (or [B, 1, Hv]) and dt_bias [Hv]")
        hv = shape_of(p_a)[-1]
        if not isinstance(hv, int) or tuple(shape_of(p_dt)) != (hv,) or tuple(shape_of(strip_lossless_casts(a_log)) or ()) != (hv,):
            return Miss(f"A_log {shape_of(a_log)}, dt_bias {shape_of(p_dt)} do not match {hv} heads of a")
        if any(dtype_of(n) != torch.float32 for n in (mul, s, e)):
            return Miss(f"the gate g is computed in {dtype_of(mul)}; braze fuses it computed in fp32",
                        "upcast a and A_log: -A_log.float().exp() * softplus(a.float() + dt_bias)")
        nodes |= {e, s} | soft_nodes
        a_in = strip_lossless_casts(p_a)
        if p_a is not a_in:
            nodes.add(p_a)
        stage = Gating(heads=hv, threshold=thr, g_out="float32", beta_out="float32")
        return GatingMatch(stage, a_in, None, strip_lossless_casts(a_log), strip_lossless_casts(p_dt), mul, None,
                           frozenset(nodes))
    return Miss("not -exp(A_log) * softplus(...)", candidate=False)


def match_beta(sig: Node, heads: int) -> tuple[Node, set[Node]] | Miss:
    """beta = sigmoid(b) of b [T, heads] (through one cast): (b, nodes)."""
    if not is_op(sig, aten.sigmoid):
        return Miss("not a sigmoid", candidate=False)
    b = strip_lossless_casts(sig.args[0])
    nodes = {sig} | ({sig.args[0]} if sig.args[0] is not b else set())
    shape = shape_of(b)
    if shape is None or len(shape) < 2 or shape[-1] != heads:
        return Miss(f"sigmoid of {shape}, not of [T, {heads}]", candidate=False)
    return b, nodes
