"""Decode GEMMs on braze's weight-stream kernel: `mm(x, Wᵀ)` / `addmm(b, x, Wᵀ)` of 1..4 token rows becomes
`braze::decode_mm(x, W, b)` where the measured plan says braze's kernel beats cuBLAS at that weight shape.

    y = x @ Wᵀ (+ b)      x [T, K], T in 1..4, W [N, K] a graph input (a weight), bf16/fp16

At decode such a GEMM streams its weight once; cuBLAS runs small weights launch-bound (a [128, 4096] weight in
6.8 µs against a 0.25 µs floor on an H200) and some large ones as split-K plus a reduction kernel. braze's
kernel (braze.codegen.decode_mm) reads the weight rows with every K chunk's load in flight at once, one
program per few rows, no split over K (the same sum order on every call). `decode_mm_plan` holds where it
won in the sweep (benchmarks/results/decode_mm.md): there the GEMM is rewritten; elsewhere it stays cuBLAS
with a `cublas-faster` remark. Only CUDA graphs are rewritten: the choice is between two GPU kernels.

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
from braze.patterns.fx import aten, describe, val

from .base import Pass, PassContext
from .gemm_merge import Sibling, _copy_location, match_sibling
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


class DecodeGemm(Pass):
    name = "decode-gemm"
    family = "decode_gemm"

    def run(self, gm: GraphModule, ctx: PassContext) -> None:
        graph = gm.graph
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
            ctx.remark("applied", "decode-gemm", node,
                       f"GEMM of {tokens} token(s) against {describe(m.weight)} [{n}, {k}] on braze's decode kernel "
                       f"({plan.block_n} rows x {plan.block_k} a program, {plan.warps} warps)",
                       ops=("gemm",), args={"tokens": tokens, "n": n, "k": k, "block_n": plan.block_n,
                                            "block_k": plan.block_k})
            self._rewrite(gm, m)
            ctx.bump("gemms-replaced")

    @staticmethod
    def _rewrite(gm: GraphModule, m: Sibling) -> None:
        graph = gm.graph
        args = (m.activation, m.weight, m.bias)
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
