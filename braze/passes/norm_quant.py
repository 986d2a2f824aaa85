"""RMSNorm (+ residual add) -> FP8 dynamic quant, fused into one generated kernel.

A site is an fp8 cast recognized as a dynamic quant whose input is the output
of a recognized RMSNorm. The norm's output and the residual sum are produced
too when anything else reads them. Near misses (a quant of something that is
not a norm, a norm with an escaping intermediate, an fp8 dtype braze does not
support, a token count outside the configured range) become `missed` remarks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from braze.patterns.fx import Miss, aten, describe, is_op, strip_lossless_casts, val
from braze.patterns.quant import QuantMatch, is_fp8_cast, match_fp8_quant
from braze.patterns.rmsnorm import NormMatch, match_residual_add, match_rmsnorm, residual_stage
from braze.patterns.stages import RowChain, dtype_name

from .base import Pass, PassContext
from .rewrite import graph_fake_mode, splice, trace_functional, view_as
from .verify import gate


@dataclass(frozen=True)
class Site:
    chain: RowChain
    inputs: tuple[Node, ...]  # RowChain.input_names order
    outputs: tuple[Node, ...]  # original nodes, RowChain.output_specs order
    anchor: Node  # where remarks point: the norm's mean


def fused_call(spec: str):
    """The replacement: braze's fused row-chain op (see braze.runtime.rowwise)."""
    import braze.runtime.rowwise  # noqa: F401  registers the op

    def fn(*inputs: torch.Tensor) -> list[torch.Tensor]:
        return torch.ops.braze.fused_rowwise(list(inputs), spec)

    return fn


class NormQuantFusion(Pass):
    name = "norm-quant"
    family = "norm_quant"

    def build_chain(self, norm: NormMatch, quant: QuantMatch, residual: object, norm_store: bool) -> RowChain:
        """The RowChain of a site (tests override this to plant a wrong replacement)."""
        return RowChain(
            in_dtype=dtype_name(val(norm.x).dtype),
            residual=residual,
            norm=dataclasses.replace(norm.stage, store=norm_store),
            quant=quant.stage,
        )

    def run(self, gm: GraphModule, ctx: PassContext) -> None:
        graph = gm.graph
        norms: dict[Node, NormMatch] = {}
        norm_misses: dict[Node, Miss] = {}
        for node in graph.nodes:
            if is_op(node, aten.mean):
                m = match_rmsnorm(node)
                if isinstance(m, NormMatch):
                    norms[strip_lossless_casts(m.output)] = m
                elif m.candidate:
                    norm_misses[node] = m
        ctx.bump("rmsnorms-recognized", len(norms))
        fake_mode = graph_fake_mode(graph)
        for node in list(graph.nodes):
            if not is_fp8_cast(node) or node.graph is not graph:
                continue
            ctx.bump("fp8-casts-seen")
            try:
                planned = self._plan(node, norms, norm_misses, fake_mode, ctx)
            except Exception as e:  # a bug in braze must not break the user's compile
                ctx.remark("failed", "internal-error", node, "RMSNorm -> FP8 quant left unfused after an error in braze",
                           reason=f"{type(e).__name__}: {e}", suggestion="report this as a braze bug, with this remark",
                           ops=("rmsnorm", "fp8_quant"))
                continue
            if planned is None:
                continue
            site, traced = planned
            self._replace(graph, site, traced, ctx)
            ctx.remark("applied", "norm-quant", site.anchor,
                       f"fused {' -> '.join(_ops(site))} into one kernel",
                       ops=_ops(site), args=_args(site.chain))

    def _plan(self, node: Node, norms: dict[Node, NormMatch], norm_misses: dict[Node, Miss], fake_mode,
              ctx: PassContext) -> tuple[Site, torch.fx.GraphModule] | None:
        """Everything short of changing the graph: the site, its checks, the traced replacement."""
        site = self._site(node, norms, norm_misses, ctx)
        if site is None:
            return None
        why = ctx.token_check(self.family, _rows(site.inputs[0]))
        if why:
            ctx.remark("missed", "token-range", site.anchor, "RMSNorm -> FP8 quant not fused",
                       reason=why, suggestion="widen FusionConfig.token_ranges['norm_quant']", ops=_ops(site))
            return None
        spec = site.chain.to_json()
        if ctx.config.verify == "compile":
            result = gate(site.inputs, site.outputs, lambda xs: fused_call(spec)(*xs),
                          ctx.config.verify_rtol, dequant=_dequantizer(site.chain))
            ctx.bump("sites-verified")
            if not result.ok:
                ctx.remark("failed", "numerics-gate", site.anchor,
                           "fused RMSNorm -> FP8 quant disagrees with the unfused graph; left unfused",
                           reason=result.detail, suggestion="report this as a braze bug, with the model and this remark",
                           ops=_ops(site), args={"error_ratio": round(result.worst, 4)})
                return None
        traced = trace_functional(fused_call(spec), [n.meta["val"] for n in site.inputs], fake_mode)
        return site, traced

    def _site(self, q: Node, norms: dict[Node, NormMatch], norm_misses: dict[Node, Miss],
              ctx: PassContext) -> Site | None:
        quant = match_fp8_quant(q)
        if isinstance(quant, Miss):
            if quant.candidate:
                ctx.remark("missed", "quant-not-recognized", q, "FP8 cast not fused",
                           reason=quant.reason, suggestion=quant.suggestion, ops=("fp8_quant",))
            return None
        y = strip_lossless_casts(quant.y)
        norm = norms.get(y)
        if norm is None:
            miss = _upstream_miss(y, norm_misses)
            if miss is not None:
                ctx.remark("missed", "norm-not-fusable", miss[0], "RMSNorm -> FP8 quant not fused",
                           reason=miss[1].reason, suggestion=miss[1].suggestion, ops=("rmsnorm", "fp8_quant"))
            else:
                ctx.remark("missed", "quant-input-not-norm", q, "FP8 quant not fused",
                           reason=f"the quantized tensor comes from {describe(y)}, not from an RMSNorm",
                           suggestion="braze fuses quant with a preceding RMSNorm; activation+quant "
                                      "fusion is not implemented yet", ops=("fp8_quant",))
            return None
        if norm.stage.width % quant.stage.group_size:
            ctx.remark("missed", "group-size", norm.anchor, "RMSNorm -> FP8 quant not fused",
                       reason=f"group size {quant.stage.group_size} does not divide the width {norm.stage.width}",
                       ops=("rmsnorm", "fp8_quant"))
            return None
        inside = norm.nodes | quant.nodes
        norm_store = any(u not in inside for u in norm.output.users)
        residual = match_residual_add(norm.x)
        inputs: list[Node] = [norm.x]
        outputs: list[Node] = []
        res_stage = None
        if residual is not None:
            res_stage = residual_stage(residual, inside)
            inputs = [residual.a, residual.b]
            if res_stage.store:
                outputs.append(residual.add)
        if norm.weight is not None:
            inputs.append(norm.weight)
        if norm_store:
            outputs.append(norm.output)
        outputs.append(quant.q)
        outputs.extend(quant.scale_nodes)
        if not quant.scale_nodes:
            ctx.remark("missed", "scale-unused", q, "RMSNorm -> FP8 quant not fused",
                       reason="no scale of the quant is used after it", ops=("rmsnorm", "fp8_quant"))
            return None
        chain = self.build_chain(norm, quant, res_stage, norm_store)
        return Site(chain, tuple(inputs), tuple(outputs), norm.anchor)

    def _replace(self, graph: torch.fx.Graph, site: Site, traced: torch.fx.GraphModule, ctx: PassContext) -> None:
        new_outputs = splice(graph, traced, site.inputs, site.anchor)
        assert len(new_outputs) == len(site.outputs)
        for old, new in zip(site.outputs, new_outputs):
            old.replace_all_uses_with(view_as(graph, new, old))
        if ctx.config.dump_dir:
            from braze.codegen.cache import dump, rowwise_kernel

            dump(rowwise_kernel(site.chain), ctx.config.dump_dir)
        ctx.bump("sites-fused")


def _rows(x: Node) -> object:
    shape = val(x).shape
    rows = 1
    for s in shape[:-1]:
        rows = rows * s
    return rows


def _ops(site: Site) -> tuple[str, ...]:
    ops = ["residual_add"] if site.chain.residual else []
    ops.append("rmsnorm")
    if site.chain.quant:
        ops.append("fp8_quant")
    return tuple(ops)


def _args(chain: RowChain) -> dict[str, object]:
    args: dict[str, object] = {"width": chain.width, "eps": chain.norm.eps}
    if any(getattr(op, "zero_centered", False) for op in chain.norm.epilogue):
        args["zero_centered"] = True
    if chain.quant:
        args["group_size"] = chain.quant.group_size
        args["scale"] = "power-of-two" if any(op.op == "exp2" for op in chain.quant.operand) else "fp32"
    return args


def _dequantizer(chain: RowChain):
    """Site outputs -> values to compare: q times its scale when the scale is the divisor."""
    specs = chain.output_specs()
    names = [s[0] for s in specs]
    quant = chain.quant
    divisor = None
    if quant and quant.combine == "div":
        for i, prog in enumerate(quant.scales):
            if prog == quant.operand:
                divisor = names.index(f"scale{i}")

    def dequant(outs: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.dtype]]:
        pairs = []
        for name, t in zip(names, outs):
            if name == "q" and divisor is not None:
                s = outs[divisor].float().reshape(-1, chain.n_groups, 1)
                dq = t.float().reshape(-1, chain.n_groups, chain.width // chain.n_groups) * s
                pairs.append((dq.reshape(-1, chain.width), torch.float8_e4m3fn))
            else:
                pairs.append((t, t.dtype))
        return pairs

    return dequant


def _upstream_miss(y: Node, misses: dict[Node, Miss], depth: int = 12) -> tuple[Node, Miss] | None:
    """A norm near-miss whose mean lies within `depth` nodes upstream of y."""
    frontier, seen = [y], set()
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if n in misses:
                return n, misses[n]
            for a in n.all_input_nodes:
                if a not in seen:
                    seen.add(a)
                    nxt.append(a)
        frontier = nxt
    return None
