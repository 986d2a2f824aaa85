"""All-reduce -> residual add -> RMSNorm (-> FP8 quant), fused into one braze op per site.

A site is a sum all-reduce (functional collective + wait, group read from the
graph) whose result feeds a residual add whose sum is RMS-normalized (or is
normalized directly), optionally followed by a dynamic FP8 quant of the norm
output. It becomes `braze::allreduce_rowwise`, which produces the new residual,
the norm output and/or q and its scales (see braze.runtime.collective). Every
other all-reduce that braze sees gets a `missed` remark saying why: its result
has another reader, it is not normalized, the norm cannot be fused, ...
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from braze.patterns.collective import AllReduceMatch, is_wait, match_all_reduce
from braze.patterns.fx import Miss, aten, describe, is_op, is_view, strip_lossless_casts, val
from braze.patterns.quant import QuantMatch, is_fp8_cast, match_fp8_quant
from braze.patterns.rmsnorm import NormMatch, _is_square_of, match_residual_add, match_rmsnorm, residual_stage
from braze.patterns.stages import RowChain, dtype_name
from braze.patterns.tp_norm import reduced_means
from braze.runtime.collective import one_shot_gap

from .base import Pass, PassContext, _symbol_bounds
from .norm_quant import _args, _dequantizer, fused_call
from .rewrite import graph_fake_mode, splice, trace_functional, view_as
from .verify import gate


@dataclass(frozen=True)
class Site:
    chain: RowChain
    ar: AllReduceMatch
    reduced: Node  # the reduced value as the residual add reads it (the wait, or a view of it)
    inputs: tuple[Node, ...]  # the tensor reduced, then RowChain.input_names()[1:]
    outputs: tuple[Node, ...]  # original nodes, RowChain.output_specs order
    anchor: Node  # where remarks point: the norm's mean


def fused_allreduce_call(spec: str, group_name: str, symm_max_tokens: int):
    """The replacement: braze's all-reduce + row-chain op (see braze.runtime.collective)."""
    import braze.runtime.collective  # noqa: F401  registers the op

    def fn(*inputs: torch.Tensor) -> list[torch.Tensor]:
        return torch.ops.braze.allreduce_rowwise(list(inputs), spec, group_name, symm_max_tokens)

    return fn


def ops_of(chain: RowChain) -> tuple[str, ...]:
    return ("all_reduce", *(["residual_add"] if chain.residual else []), "rmsnorm",
            *(["fp8_quant"] if chain.quant else []))


def _one_shot_gap(site: Site, rows: object, ctx: PassContext) -> str | None:
    """Why some launch of this site on CUDA could take braze's NCCL + kernel path, or None. That path is
    slower than stock Inductor's all-reduce + add + norm (3 kernels against 2: the functional all-reduce
    copies its input; allreduce_norm_tp2.md / _tp4.md), so a site is fused only where every launch it can
    see takes the one-shot kernel."""
    x = val(site.ar.input)
    hi = rows if isinstance(rows, int) else _symbol_bounds(rows)[1] if isinstance(rows, torch.SymInt) else None
    width = x.shape[-1]
    if not isinstance(width, int):
        return f"the row width {width} is dynamic"
    why = one_shot_gap(x.device, hi, width * x.element_size(), site.ar.group_name, ctx.config.symm_max_tokens)
    return None if why is None else f"{why}: such launches would take the NCCL path, slower than stock Inductor's"


class AllReduceNormFusion(Pass):
    name = "allreduce-norm"
    family = "collective"

    def run(self, gm: GraphModule, ctx: PassContext) -> None:
        graph = gm.graph
        norms: dict[Node, NormMatch] = {}
        norm_misses: dict[Node, Miss] = {}
        quants: dict[Node, QuantMatch] = {}
        for node in graph.nodes:
            if is_op(node, aten.mean):
                m = match_rmsnorm(node)
                if isinstance(m, NormMatch):
                    norms[m.x] = m
                elif m.candidate and (squared := _is_square_of(node.args[0])) is not None:
                    norm_misses[strip_lossless_casts(squared)] = m
            elif is_fp8_cast(node):
                q = match_fp8_quant(node)
                if isinstance(q, QuantMatch):
                    quants[strip_lossless_casts(q.y)] = q
        fake_mode = graph_fake_mode(graph)
        for wait in [n for n in graph.nodes if is_wait(n)]:
            if getattr(wait, "_erased", False):
                continue
            ar = match_all_reduce(wait)
            if isinstance(ar, Miss):
                if ar.candidate:
                    ctx.remark("missed", "allreduce-not-recognized", wait, "all-reduce not fused",
                               reason=ar.reason, suggestion=ar.suggestion, ops=("all_reduce",))
                continue
            ctx.bump("all-reduces-seen")
            try:
                site = self._site(ar, norms, norm_misses, quants, ctx)
                if site is None:
                    continue
                traced = self._plan(site, fake_mode, ctx)
            except Exception as e:  # a bug in braze must not break the user's compile
                ctx.remark("failed", "internal-error", wait, "all-reduce left unfused after an error in braze",
                           reason=f"{type(e).__name__}: {e}", suggestion="report this as a braze bug, with this remark",
                           ops=("all_reduce",))
                continue
            if traced is None:
                continue
            self._replace(graph, site, traced, ctx)
            ctx.remark("applied", "allreduce-norm", site.anchor,
                       f"fused {' -> '.join(ops_of(site.chain))} into one op",
                       ops=ops_of(site.chain), args={**_args(site.chain), "group": ar.group_name})

    def _site(self, ar: AllReduceMatch, norms: dict[Node, NormMatch], norm_misses: dict[Node, Miss],
              quants: dict[Node, QuantMatch], ctx: PassContext) -> Site | None:
        def missed(name: str, reason: str, suggestion: str = "") -> None:
            ctx.remark("missed", name, ar.wait, "all-reduce not fused", reason=reason, suggestion=suggestion,
                       ops=("all_reduce",), args={"group": ar.group_name})

        means = reduced_means(ar)
        if not isinstance(means, Miss) or means.candidate:
            return None  # a reduce of variances: the TP-norm pass's site, reported there
        reduced = node = ar.wait
        width = val(ar.wait).shape[-1]
        while len(node.users) == 1 and is_view(next(iter(node.users))):
            node = next(iter(node.users))  # e.g. [T, D] -> [T, D, 1] -> [T, D]: the same rows
            if val(node) is not None and val(node).shape[-1] == width:
                reduced = node
        users = list(reduced.users)
        res = match_residual_add(users[0]) if len(users) == 1 else None
        if res is not None and (res.a is reduced) != (res.b is reduced):
            h, other = res.add, (res.b if res.a is reduced else res.a)
        else:
            res, h, other = None, reduced, None
        norm = norms.get(h)
        if norm is None:
            miss = norm_misses.get(h)
            if miss is not None:
                missed("norm-not-fusable", miss.reason, miss.suggestion)
            elif len(users) > 1 and any(u in norms for u in users):
                missed("reduced-value-escapes", self._escape_reason(ar, [u for u in users if u not in norms]),
                       "read the residual sum or the norm output instead of the reduced value; reduce into a "
                       "fresh tensor, not in place into a graph input")
            else:
                readers = ", ".join(describe(u) for u in (h.users if h is not reduced else users)) or "nothing"
                what = "the residual sum" if res is not None else "the reduced value"
                missed("no-norm-after-allreduce", f"{what} {describe(h)} is read by {readers}, not by an RMSNorm",
                       "braze fuses an all-reduce with the residual add and RMSNorm that follow it")
            return None
        if res is None and any(u not in norm.nodes for u in users):
            escape = next(u for u in users if u not in norm.nodes)
            missed("reduced-value-escapes", self._escape_reason(ar, [escape]),
                   "read the norm output or the residual sum instead of the reduced value; reduce into a fresh "
                   "tensor, not in place into a graph input")
            return None
        quant = quants.get(norm.output)
        if quant is not None and (norm.stage.width % quant.stage.group_size or not quant.scale_nodes):
            quant = None  # the quant stays with Inductor; the all-reduce and norm still fuse
        inside = norm.nodes | (quant.nodes if quant else frozenset())
        norm_store = quant is None or any(u not in inside for u in norm.output.users)
        inputs, outputs = [ar.input], []
        res_stage = None
        if res is not None:
            res_stage = residual_stage(res, inside)
            inputs.append(other)
            if res_stage.store:
                outputs.append(res.add)
        if norm.weight is not None:
            inputs.append(norm.weight)
        if norm_store:
            outputs.append(norm.output)
        if quant is not None:
            outputs += [quant.q, *quant.scale_nodes]
        chain = RowChain(in_dtype=dtype_name(val(ar.input).dtype), residual=res_stage,
                         norm=dataclasses.replace(norm.stage, store=norm_store), quant=quant.stage if quant else None)
        return Site(chain, ar, reduced, tuple(inputs), tuple(outputs), norm.anchor)

    @staticmethod
    def _escape_reason(ar: AllReduceMatch, readers: list[Node]) -> str:
        return (f"the all-reduced value {describe(ar.wait)} is also read by "
                f"{', '.join(describe(u) for u in readers)}; the fused op produces the new residual and the norm "
                "output, not the reduced value")

    def _plan(self, site: Site, fake_mode, ctx: PassContext) -> torch.fx.GraphModule | None:
        ops = ops_of(site.chain)
        rows = 1
        for s in val(site.ar.input).shape[:-1]:
            rows = rows * s
        why = ctx.token_check(self.family, rows)
        if why:
            ctx.remark("missed", "token-range", site.anchor, "all-reduce -> RMSNorm not fused", reason=why,
                       suggestion="widen FusionConfig.token_ranges['collective']", ops=ops)
            return None
        why = _one_shot_gap(site, rows, ctx)
        if why:
            ctx.remark("missed", "one-shot-coverage", site.anchor, "all-reduce -> RMSNorm not fused", reason=why,
                       suggestion="bound the token count (torch._check) or raise FusionConfig.symm_max_tokens and "
                                  "prepare a larger workspace (braze.runtime.symm_mem.prepare(group, nbytes))",
                       ops=ops)
            return None
        spec = site.chain.to_json()
        if ctx.config.verify == "compile":
            # the local part only (what runs after the reduce): gating the collective would communicate
            # while compiling
            local_inputs = (site.reduced, *site.inputs[1:])
            result = gate(local_inputs, site.outputs, lambda xs: fused_call(spec)(*xs), ctx.config.verify_rtol,
                          dequant=_dequantizer(site.chain))
            ctx.bump("sites-verified")
            if not result.ok:
                ctx.remark("failed", "numerics-gate", site.anchor,
                           "fused residual add -> RMSNorm disagrees with the unfused graph; left unfused",
                           reason=result.detail, ops=ops, args={"error_ratio": round(result.worst, 4)},
                           suggestion="report this as a braze bug, with the model and this remark")
                return None
        fn = fused_allreduce_call(spec, site.ar.group_name, ctx.config.symm_max_tokens)
        return trace_functional(fn, [n.meta["val"] for n in site.inputs], fake_mode)

    def _replace(self, graph: torch.fx.Graph, site: Site, traced: torch.fx.GraphModule, ctx: PassContext) -> None:
        new_outputs = splice(graph, traced, site.inputs, site.anchor)
        assert len(new_outputs) == len(site.outputs)
        for old, new in zip(site.outputs, new_outputs):
            old.replace_all_uses_with(view_as(graph, new, old))
        # the original collective must not run as well: everything it fed is dead now
        graph.eliminate_dead_code()
        for node in (site.ar.wait, site.ar.start):
            if not getattr(node, "_erased", False):  # DCE may keep a collective; it must not run twice
                assert not node.users, f"{node} still has readers after its site was replaced"
                graph.erase_node(node)
        if ctx.config.dump_dir:
            from braze.codegen.cache import dump, rowwise_kernel

            dump(rowwise_kernel(site.chain), ctx.config.dump_dir)
        ctx.bump("sites-fused")
