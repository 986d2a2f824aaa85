"""Decode GEMMs on braze's weight-stream kernel: `mm(x, Wᵀ)` / `addmm(b, x, Wᵀ)` of 1..4 token rows becomes
`braze::decode_mm(x, W, b)` where the measured plan says braze's kernel beats cuBLAS at that weight shape.

    y = x @ Wᵀ (+ b)      x [T, K], T in 1..4, W [N, K] a graph input (a weight), bf16/fp16

At decode such a GEMM streams its weight once; cuBLAS runs small weights launch-bound (a [128, 4096] weight in
6.8 µs against a 0.25 µs floor on an H200) and some large ones as split-K plus a reduction kernel. braze's
kernel (braze.codegen.decode_mm) reads the weight rows with every K chunk's load in flight at once, one
program per few rows, no split over K (the same sum order on every call). `decode_mm_plan` holds where it
won in the sweep (benchmarks/results/decode_mm.md): there the GEMM is rewritten; elsewhere it stays cuBLAS
with a `cublas-faster` remark. Only CUDA graphs are rewritten: the choice is between two GPU kernels.

An RMSNorm whose output only such GEMMs read (DeepSeek V3.2's q_c norm, read by q_b and the indexer's wq_b)
is folded into them: each program normalizes the (L2-resident) activation rows itself, so the norm costs no
kernel. The head-chain pass leaves such a norm out of its launches (`norm_fold_reason`) and tags it; here it
is folded, or, if its readers changed in between, left to Inductor with a `norm-in-gemm` remark.

Runs after gemm-merge (a merged GEMM makes the same choice inside `braze::sibling_mm`) and before
dual-stream. Left alone, with a remark: weights stored transposed or computed in the graph, token counts
outside `FusionConfig.token_ranges['decode_gemm']`, symbolic token counts (the kernel is specialized on them),
other dtypes.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

import braze.runtime.decode_mm  # noqa: F401  registers braze::decode_mm
from braze.codegen.decode_mm import decode_mm_plan
from braze.patterns.fx import aten, describe, module_path, val
from braze.patterns.rmsnorm import NormMatch
from braze.patterns.stages import Cast, RMSNorm, WeightMul, dtype_name

from .base import Pass, PassContext
from .cost import _source, is_extern
from .gemm_merge import Sibling, _copy_location, gemm_activation, match_sibling
from .rewrite import graph_fake_mode

_REASONS = {
    "weight-layout": "the weight is not a row-major [N, K] graph input (stored transposed or strided)",
    "weight-computed": "the weight is computed in the graph (e.g. dequantized), not read from a graph input",
    "bias-computed": "the bias is computed in the graph, not read from a graph input",
}


DEVICES = ("cuda",)  # where the kernel choice is made (tests add "cpu" to run a rewritten graph on the interpreter)


def _candidate(node: Node) -> bool:
    """A 2-D bf16/fp16 GEMM on CUDA: what the pass looks at (FP8 `_scaled_mm` is not a candidate)."""
    if node.op != "call_function" or node.target not in (aten.mm.default, aten.addmm.default):
        return False
    if node.target is aten.addmm.default and node.kwargs:
        return False  # beta/alpha
    out = val(node)
    return isinstance(out, torch.Tensor) and out.device.type in DEVICES and out.dtype in (torch.bfloat16, torch.float16)


FOLD_KEY = "braze_norm_fold"  # meta of a norm's output node: the NormMatch the head-chain pass left for folding


def norm_form(stage: object, dtype: torch.dtype) -> tuple[str, str]:
    """(the kernel's `norm` string for this RMSNorm stage, "") or ("", why the kernel cannot compute it): statistics
    in fp32 with rsqrt, an optional cast to the GEMM's dtype, an optional (1 +) weight in fp32 or that dtype, the
    result in that dtype (braze.codegen.decode_mm.rmsnorm_reference)."""
    if not isinstance(stage, RMSNorm):
        return "", "it is not an RMSNorm"
    if stage.inverse != "rsqrt" or {stage.square, stage.mean, stage.rstd, stage.normed} != {"float32"}:
        return "", "its statistics are not computed in fp32 with rsqrt"
    xd = dtype_name(dtype)
    parts, cur, weighted = [], "float32", False
    for op in stage.epilogue:
        if isinstance(op, Cast):
            if op.dtype == cur or (op.dtype == xd and weighted):
                cur = op.dtype
                continue
            if op.dtype != xd:
                return "", f"it rounds to {op.dtype}"
            parts.append("cast")
            cur = xd
        elif isinstance(op, WeightMul) and not weighted:
            if op.zero_centered and op.offset_dtype not in (None, "float32"):
                return "", f"it rounds 1 + weight to {op.offset_dtype}"
            if op.dtype not in ("float32", xd):
                return "", f"it rounds the weighted value to {op.dtype}"
            parts.append("1+w" if op.zero_centered else "w")
            weighted, cur = True, op.dtype
        else:
            return "", "its epilogue is not one cast and one weight multiply"
    if cur != xd:
        return "", f"its output is {cur}, not the GEMM's {xd}"
    return ",".join(parts), ""


def fused_by_inductor(x: Node) -> str:
    """Why a norm of `x` costs no kernel of its own under Inductor ("" when it does): Inductor computes it in the
    kernel that produces x (a residual add, say), unless x is a graph input or the output of a GEMM or another
    extern kernel (through views and slices)."""
    src = _source(x)
    if src.op != "placeholder" and not is_extern(src):
        return f"it reads {describe(src)}, which Inductor computes the norm with (folding saves no kernel)"
    return ""


def _fold_gemms(out: Node) -> list[Node] | str:
    """The GEMMs that read the norm output `out` directly (mm, addmm, braze::sibling_mm), or why not all do."""
    gemms = []
    for u in out.users:
        if u.target is torch.ops.braze.sibling_mm.default and u.args[0] is out:
            gemms.append(u)
        elif gemm_activation(u) is out and u.target is not aten._scaled_mm.default:
            gemms.append(u)
        else:
            return f"{describe(u)} reads the norm's output and is not a GEMM on its rows"
    return gemms or "nothing reads the norm's output"


def norm_fold_reason(norm: NormMatch, ctx: PassContext) -> str:
    """"" when folding `norm` saves a kernel and every reader of its output is a GEMM this pass will run on braze's
    decode kernel with the norm folded in (each alone and all merged: gemm-merge may merge them in between), else
    why not. It saves one when the norm reads a graph input or a GEMM's (or another extern kernel's) output,
    which Inductor cannot fuse it into: DeepSeek V3.2's q_c norm reads a slice of the q_a/kv_a projection."""
    if not (ctx.config.decode_gemm and ctx.config.decode_gemm_norm):
        return "FusionConfig.decode_gemm or decode_gemm_norm is off"
    x = val(norm.x)
    if x is None or x.dim() != 2 or x.device.type not in DEVICES:
        return "the norm is not over [T, K] rows of a CUDA tensor"
    _, why = norm_form(norm.stage, x.dtype)
    if why:
        return f"the kernel does not compute this norm: {why}"
    why = fused_by_inductor(norm.x)
    if why:
        return why
    tokens = x.shape[0]
    why = ctx.token_check("decode_gemm", tokens)
    if why:
        return why
    gemms = _fold_gemms(norm.output)
    if isinstance(gemms, str):
        return gemms
    shapes = []
    for g in gemms:
        m = match_sibling(g) if g.target is not torch.ops.braze.sibling_mm.default else None
        if isinstance(m, str):
            return f"{describe(g)}: {_REASONS[m]}"
        if m is None:
            if not g.args[3]:
                return f"{describe(g)} does not take braze's decode kernel"
            shapes += [val(w).shape for w in g.args[1]]
        else:
            shapes.append(val(m.weight).shape)
    if not all(isinstance(v, int) for v in (tokens, *(d for sh in shapes for d in sh))):
        return "the token count or a weight's shape is symbolic"
    if any(val(g).dtype != x.dtype for g in gemms):
        return "a GEMM's dtype differs from the norm's input"
    k = shapes[0][1]
    for n, kk in [*shapes, (sum(sh[0] for sh in shapes), k)]:
        plan = decode_mm_plan(tokens, n, kk, x.dtype, fold_norm=True)
        if isinstance(plan, str):
            return plan
    return ""


def _shape(m: Sibling) -> tuple[int, int, int]:
    """(tokens, N, K) of a matched GEMM."""
    w = val(m.weight)
    return val(m.activation).shape[0], w.shape[0], w.shape[1]


class DecodeGemm(Pass):
    name = "decode-gemm"
    family = "decode_gemm"

    def run(self, gm: GraphModule, ctx: PassContext) -> None:
        graph = gm.graph
        for node in list(graph.nodes):
            norm = node.meta.get(FOLD_KEY)
            if isinstance(norm, NormMatch) and norm.output is node:
                self._fold(gm, norm, ctx)
        for node in list(graph.nodes):
            if not _candidate(node):
                continue
            m = match_sibling(node)
            if isinstance(m, str):
                ctx.remark("missed", m, node, "GEMM left to cuBLAS", reason=_REASONS[m], ops=("gemm",))
                continue
            x, w = val(m.activation), val(m.weight)
            tokens, n, k = x.shape[0], w.shape[0], w.shape[1]
            why = ctx.token_check(self.family, tokens)
            if why:
                ctx.remark("missed", "token-range", node, "GEMM left to cuBLAS", reason=why,
                           suggestion="widen FusionConfig.token_ranges['decode_gemm'] (the kernel takes 1..4)",
                           ops=("gemm",))
                continue
            if not all(isinstance(s, int) for s in (tokens, n, k)):
                ctx.remark("missed", "dynamic-shape", node, "GEMM left to cuBLAS",
                           reason="the token count or the weight's shape is symbolic; the kernel is specialized "
                                  "on both (its tiles and its unrolled K loop)", ops=("gemm",))
                continue
            if x.dtype != w.dtype:
                ctx.remark("missed", "dtype", node, "GEMM left to cuBLAS",
                           reason=f"x is {x.dtype}, the weight {w.dtype}", ops=("gemm",))
                continue
            plan = decode_mm_plan(tokens, n, k, w.dtype)
            if isinstance(plan, str):  # measured slower there (or a shape the kernel does not take)
                ctx.remark("missed", "cublas-faster", node, "GEMM left to cuBLAS", reason=plan, ops=("gemm",))
                continue
            self._applied(ctx, m, plan)
            self._rewrite(gm, m)

    @staticmethod
    def _applied(ctx: PassContext, m: Sibling, plan: object) -> None:
        tokens, n, k = _shape(m)
        ctx.remark("applied", "decode-gemm", m.gemm,
                   f"GEMM of {tokens} token(s) against {describe(m.weight)} [{n}, {k}] on braze's decode kernel "
                   f"({plan.block_n} rows x {plan.block_k} a program, {plan.warps} warps)",
                   ops=("gemm",), args={"tokens": tokens, "n": n, "k": k, "block_n": plan.block_n,
                                        "block_k": plan.block_k})
        ctx.bump("gemms-replaced")

    def _fold(self, gm: GraphModule, norm: NormMatch, ctx: PassContext) -> None:
        """The RMSNorm `norm` into every GEMM that reads it (the head-chain pass left it out of its launches)."""
        del norm.output.meta[FOLD_KEY]
        why = norm_fold_reason(norm, ctx)
        if why:
            ctx.remark("missed", "norm-in-gemm", norm.anchor, "RMSNorm left to Inductor (a kernel of its own)",
                       reason=why, ops=("rmsnorm", "gemm"))
            return
        form, _ = norm_form(norm.stage, val(norm.x).dtype)
        extra = (norm.weight, form, float(norm.stage.eps))
        gemms = _fold_gemms(norm.output)
        names = ", ".join(module_path(g) or g.name for g in gemms)
        for g in gemms:
            if g.target is torch.ops.braze.sibling_mm.default:
                g.args = (norm.x, g.args[1], g.args[2], True, *extra)
            else:
                m = match_sibling(g)
                self._applied(ctx, m, decode_mm_plan(*_shape(m), val(m.weight).dtype, fold_norm=True))
                self._rewrite(gm, m, norm.x, extra)
        # the norm's nodes are dead now: the pass manager's dead-code pass after this pass erases them
        ctx.remark("applied", "norm-in-gemm", norm.anchor,
                   f"RMSNorm over {norm.stage.width} values (eps={norm.stage.eps:g}, {form}) computed inside the "
                   f"decode GEMM kernel of {len(gemms)} GEMM(s) reading it ({names}): no kernel of its own",
                   ops=("rmsnorm", "gemm"), args={"gemms": len(gemms), "form": form})
        ctx.bump("norms-folded")

    @staticmethod
    def _rewrite(gm: GraphModule, m: Sibling, x_node: Node | None = None, norm: tuple = ()) -> None:
        """mm/addmm -> braze::decode_mm; with `norm` (weight, form, eps), of x_node's rows normalized."""
        graph = gm.graph
        args = (m.activation if x_node is None else x_node, m.weight, m.bias, *norm)
        x, w = val(m.activation), val(m.weight)
        with graph_fake_mode(graph):  # the op's output, without tracing its kernel launch
            out = x.new_empty((x.shape[0], w.shape[0]))
        with graph.inserting_before(m.gemm):
            new = graph.call_function(torch.ops.braze.decode_mm.default, args)
        new.meta["val"] = out
        _copy_location(m.gemm, new)
        w_t = m.gemm.args[1] if m.gemm.target is aten.mm.default else m.gemm.args[2]
        m.gemm.replace_all_uses_with(new)
        graph.erase_node(m.gemm)
        if not w_t.users:
            graph.erase_node(w_t)
