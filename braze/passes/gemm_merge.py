"""Sibling-GEMM merging: GEMMs that read the same activation become one GEMM over their weights.

    q_c, kv_c, k_pe = x @ W_qkv_aᵀ ;  ik, w = x @ W_wk_wᵀ      ->  y = x @ [W_qkv_a; W_wk_w]ᵀ, then slices

At decode the token count T is small, each GEMM is memory-bound (it streams its weight once), and
its cost is the weight bytes plus a launch; one GEMM over the stacked weights moves the same bytes
in one launch and reads the activation once. The weights must not be stacked on every step (that
would move them twice), and must not be copied once and cached (a weight updated in place would
leave the copy stale, and a CUDA-graph replay never re-checks a cache). So the merged GEMM
(`braze::sibling_mm`) reads the parameters themselves, which the backend re-points once, at
set-up, into adjacent row blocks of one buffer: no extra memory, updates seen at once. The op
checks the adjacency on every call and concatenates when it no longer holds (a parameter replaced
by a new tensor): slower, never wrong.

Merged: `mm(x, permute(W))` and `addmm(b, x, permute(W))` whose W [N, K] (row-major) and b [N] are
parameters (graph inputs that the backend sees are `nn.Parameter`s with requires_grad=False), all
of one dtype, reading the same activation node, at token counts within
`FusionConfig.token_ranges['gemm_merge']` where every member is memory-bound by the cost model.
Left alone, with a `missed` remark: weights stored transposed ([K, N]) or computed in the graph
(dequantized FP8), FP8 `_scaled_mm` siblings (not built yet), mixed dtypes, weights braze cannot
identify as parameters, compute-bound sizes.
GEMMs on different activations are never siblings; a GEMM whose input depends on another's output
reads another node, so it is not a sibling either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Node

import braze.runtime.sibling_mm  # noqa: F401  registers braze::sibling_mm
from braze.patterns.fx import aten, describe, module_path, topo_sorted, val

from .base import Pass, PassContext
from .cost import Cost, DeviceModel, _hint, device_model, gemm_flops, nbytes
from .rewrite import graph_fake_mode


@dataclass(frozen=True)
class Sibling:
    """One merge candidate: `gemm` reads `activation` times `weight`ᵀ (+ `bias`)."""

    gemm: Node
    activation: Node
    weight: Node  # placeholder [N, K]
    bias: Node | None  # placeholder [N] (addmm)

    @property
    def rows(self) -> int:
        return val(self.weight).shape[0]


def gemm_activation(node: Node) -> Node | None:
    """The activation operand of a 2-D GEMM with a weight on the right, else None."""
    if node.op != "call_function":
        return None
    if node.target is aten.mm.default:
        return node.args[0]
    if node.target is aten.addmm.default and not node.kwargs:
        return node.args[1]
    if node.target is aten._scaled_mm.default:
        return node.args[0]  # the quantized activation
    return None


def match_sibling(node: Node) -> Sibling | str:
    """A GEMM braze can merge, or the reason (short, for a remark) it cannot."""
    if node.target is aten._scaled_mm.default:
        return "scaled-mm"
    act = gemm_activation(node)
    w_t = node.args[1] if node.target is aten.mm.default else node.args[2]
    if not (isinstance(w_t, Node) and w_t.op == "call_function"
            and (w_t.target is aten.t.default
                 or (w_t.target is aten.permute.default and list(w_t.args[1]) == [1, 0]))):
        if isinstance(w_t, Node) and w_t.op == "placeholder":
            return "weight-layout"  # stored [K, N]: a column block, not a row block, of a stacked weight
        return "weight-computed"
    weight = w_t.args[0]
    if not isinstance(weight, Node) or weight.op != "placeholder":
        return "weight-computed"
    w = val(weight)
    if w is None or w.dim() != 2 or (w.shape[0] > 1 and w.stride(0) != w.shape[1]) or w.stride(1) != 1:
        return "weight-layout"
    bias = None
    if node.target is aten.addmm.default:
        bias = node.args[0]
        b = val(bias)
        if not (isinstance(bias, Node) and bias.op == "placeholder" and b is not None and b.dim() == 1):
            return "bias-computed"
    return Sibling(node, act, weight, bias)


def sibling_gemms(graph: Graph) -> list[tuple[Node, list[Node]]]:
    """(activation, its GEMMs) for every activation that two or more 2-D weight GEMMs read, in graph order."""
    out = []
    for n in graph.nodes:
        gemms = [u for u in n.users if gemm_activation(u) is n]
        if len(gemms) >= 2:
            out.append((n, gemms))
    return out


_REASONS = {
    "weight-layout": ("the weight is not a row-major [N, K] graph input (stored transposed or strided)",
                      "store the weight as [out, in] (nn.Linear's layout)"),
    "weight-computed": ("the weight is computed in the graph (e.g. dequantized), not read as a parameter",
                        "merge the weights in the model, or keep the weight as a parameter"),
    "bias-computed": ("the bias is computed in the graph, not read as a parameter", ""),
    "scaled-mm": (("FP8 scaled GEMMs are not merged yet: their weight scales would have to be stacked too, and "
                   "128x128 block scales stack only where every weight has a multiple of 128 rows"),
                  "FusionConfig(gemm_merge=...) covers bf16/fp16/fp32 GEMMs today"),
}


class SiblingGemmMerge(Pass):
    name = "gemm-merge"
    family = "gemm_merge"

    def run(self, gm: GraphModule, ctx: PassContext) -> None:
        graph = gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        inputs = _aligned_inputs(placeholders, ctx.inputs)
        device = device_model(graph)
        for act, gemms in sibling_gemms(graph):
            members: list[Sibling] = []
            for g in gemms:
                m = match_sibling(g)
                if isinstance(m, str):
                    reason, suggestion = _REASONS[m]
                    ctx.remark("missed", m, g, f"GEMM not merged with its {len(gemms) - 1} sibling(s)",
                               reason=reason, suggestion=suggestion, ops=("gemm",))
                else:
                    members.append(m)
            for group in _by_kind(members):
                self._merge(graph, act, group, placeholders, inputs, device, ctx)

    def _merge(self, graph: Graph, act: Node, group: list[Sibling], placeholders: list[Node],
               inputs: tuple | None, device: DeviceModel, ctx: PassContext) -> None:
        if len(group) < 2:
            return
        first = group[0].gemm
        ops = ("gemm",) * len(group)
        if len({val(s.weight).dtype for s in group} | {val(act).dtype}) != 1:
            ctx.remark("missed", "dtype", first, f"{len(group)} sibling GEMMs not merged",
                       reason="the weights and the activation differ in dtype", ops=ops)
            return
        why = self._not_parameters(group, placeholders, inputs)
        if why:
            ctx.remark("missed", "not-parameters", first, f"{len(group)} sibling GEMMs not merged", reason=why,
                       suggestion="compile through braze's backend with nn.Parameter weights (requires_grad=False)",
                       ops=ops)
            return
        tokens = val(act).shape[0]
        why = ctx.token_check(self.family, tokens)
        if why:
            ctx.remark("missed", "token-range", first, f"{len(group)} sibling GEMMs not merged", reason=why,
                       suggestion="widen FusionConfig.token_ranges['gemm_merge']", ops=ops)
            return
        # decide at the largest token count the graph may see (the range bounds a dynamic one)
        t = tokens if isinstance(tokens, int) else ctx.config.token_range(self.family).hi
        costs = [_gemm_cost(s, t) for s in group]
        bound = [c for c in costs if not device.memory_bound(c.bytes_moved, c.flops)]
        if bound:
            ctx.remark("missed", "compute-bound", first, f"{len(group)} sibling GEMMs not merged",
                       reason=f"at {t} tokens {len(bound)} of them are compute-bound: merging saves no weight "
                              "traffic there", ops=ops)
            return
        # the merged GEMM takes braze's decode kernel where FusionConfig.decode_gemm would for a plain GEMM
        decode = ctx.config.decode_gemm and ctx.token_check("decode_gemm", tokens) is None
        self._rewrite(graph, act, group, decode)
        index = [placeholders.index(s.weight) for s in group]
        ctx.record.shared_weights.append({"inputs": index, "location": module_path(first)})
        before = sum((c for c in costs), Cost())
        k, size = _hint(val(act).shape[1]), val(act).element_size()
        after = Cost(before.bytes_moved - (len(group) - 1) * t * k * size, before.flops, 1, 1)  # x read once
        rows = [s.rows for s in group]
        weight_bytes = sum(nbytes(s.weight) for s in group)
        ctx.remark("applied", "gemm-merge", first,
                   f"merged {len(group)} GEMMs reading {describe(act)} into one over {sum(rows)} weight rows "
                   f"({', '.join(module_path(s.gemm) or s.gemm.name for s in group)}); memory-bound at {t} "
                   f"tokens: {len(group)} launches -> 1; extra memory: none (the backend re-points the "
                   f"weights into one buffer)",
                   ops=ops, args={"gemms": len(group), "rows": rows, "weight_bytes": weight_bytes,
                                  "tokens": t, "est_us_before": round(before.seconds(device) * 1e6, 2),
                                  "est_us_after": round(after.seconds(device) * 1e6, 2)})
        ctx.bump("gemms-merged", len(group))
        ctx.bump("launches-saved", len(group) - 1)

    @staticmethod
    def _not_parameters(group: list[Sibling], placeholders: list[Node], inputs: tuple | None) -> str:
        if inputs is None:
            return ("braze does not know what the graph's inputs hold (the pass runs outside braze's backend, or "
                    "the inputs it was given do not line up with the graph's placeholders)")
        weights = [s.weight for s in group] + [s.bias for s in group if s.bias is not None]
        if len(set(weights)) != len(weights):
            return "a weight is read by two of the GEMMs"
        for node in weights:
            t = inputs[placeholders.index(node)]
            if not isinstance(t, torch.nn.Parameter) or t.requires_grad:
                return f"{describe(node)} is not a parameter frozen for inference (requires_grad=False)"
        return ""

    @staticmethod
    def _rewrite(graph: Graph, act: Node, group: list[Sibling], decode: bool) -> None:
        weights = [s.weight for s in group]
        biases = [s.bias for s in group] if group[0].bias is not None else []
        fake_mode = graph_fake_mode(graph)
        with fake_mode:
            out_val = torch.ops.braze.sibling_mm.default(
                val(act), [val(w) for w in weights], [val(b) for b in biases], decode)
        with graph.inserting_after(topo_sorted([act, *weights, *biases])[-1]):
            merged = graph.call_function(torch.ops.braze.sibling_mm.default, (act, weights, biases, decode))
        merged.meta["val"] = out_val
        _copy_location(group[0].gemm, merged)
        row, anchor = 0, merged
        for s in group:
            with graph.inserting_after(anchor):
                piece = graph.call_function(aten.slice.Tensor, (merged, 1, row, row + s.rows))
            piece.meta["val"] = out_val[:, row:row + s.rows]
            _copy_location(s.gemm, piece)
            s.gemm.replace_all_uses_with(piece)
            graph.erase_node(s.gemm)
            row, anchor = row + s.rows, piece


def _by_kind(members: list[Sibling]) -> list[list[Sibling]]:
    """mm and addmm siblings merge separately (a merged GEMM has a bias for all rows or none)."""
    plain = [m for m in members if m.bias is None]
    biased = [m for m in members if m.bias is not None]
    return [g for g in (plain, biased) if g]


def _gemm_cost(s: Sibling, tokens: int) -> Cost:
    """One member GEMM at `tokens` rows: activation + weight (+ bias) read, output written."""
    a, w = val(s.activation), val(s.weight)
    n, k = _hint(w.shape[0]), _hint(w.shape[1])
    size = w.element_size()
    moved = (tokens * k + n * k + tokens * n + (n if s.bias is not None else 0)) * size
    return Cost(moved, gemm_flops(s.gemm) * tokens // max(_hint(a.shape[0]), 1), 1, 1)


def _aligned_inputs(placeholders: list[Node], inputs: tuple | None) -> tuple | None:
    """The real inputs when they line up with the placeholders (count, and shape of every tensor), else None."""
    if inputs is None or len(inputs) != len(placeholders):
        return None
    for node, x in zip(placeholders, inputs):
        v = val(node)
        if isinstance(x, torch.Tensor) != (v is not None):
            return None
        if v is not None and (x.dtype != v.dtype or x.dim() != v.dim()
                              or any(isinstance(s, int) and s != xs for s, xs in zip(v.shape, x.shape))):
            return None
    return tuple(inputs)


def _copy_location(src: Node, dst: Node) -> None:
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]
