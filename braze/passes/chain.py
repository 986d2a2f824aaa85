"""Chain fusion: per-head [norm ->] RoPE [-> FP8 quant] [-> in-place cache write] as one kernel.

For every RoPE the recognizer finds, the pass grows the chain backwards to an RMSNorm or
LayerNorm whose output only the rotation reads, and forwards to a per-head FP8 quant or a
cache write of the rotated rows; the chain becomes one generated kernel
(braze.codegen.heads). A cache write no chain reaches (V rows, conv state, packed byte
rows) becomes a store-only chain. Writes are taken over in place: the fused op mutates
the cache, so Inductor's reinplacing removes the functional copy (CHAIN_DESIGN.md).
Sibling chains over the same tokens share one launch. What is not covered yet is listed
in CHAIN_DESIGN.md.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch.fx import GraphModule, Node

from braze.patterns.fx import (
    aten,
    is_op,
    known_eq,
    shape_of,
    strip_lossless_casts,
    val,
)
from braze.patterns.layernorm import LayerNormMatch, match_layernorm
from braze.patterns.quant import QuantMatch, fp8_quants_by_value
from braze.patterns.rmsnorm import NormMatch, match_rmsnorm
from braze.patterns.rope import RopeMatch, _strip, match_rope
from braze.patterns.scale_product import (
    ScaleProductMiss,
    match_scale_product,
)
from braze.patterns.stages import HeadAbsorb, HeadChain, HeadGroup, dtype_name, to_dtype
from braze.patterns.store import StoreMatch, match_store

from .base import Pass, PassContext
from .chain_bytes import (
    ByteStores,
    Claim,
    base_of,
    byte_dtype_ok,
    consumed_by_bytes,
    per_token,
)
from .chain_groups import group_siblings, hoist
from .decode_gemm import FOLD_KEY, fused_by_inductor, norm_fold_reason
from .chain_sites import (
    HeadSite,
    _as_tokens,
    _only_feeds,
    _through_views,
    absorb_site,
    norm_site,
    store_site,
)
from .rewrite import graph_fake_mode, splice, trace_functional, view_as


def fused_heads_call(group: HeadGroup, n_inputs: int):
    """The replacement: one launch for the group; returns each output chain's [T, H, hd] and the written caches."""
    import braze.runtime.heads  # noqa: F401  registers the ops

    spec = group.to_json()

    def fn(*args: torch.Tensor) -> list[torch.Tensor]:
        inputs, caches = list(args[:n_inputs]), list(args[n_inputs:])
        t = inputs[0].shape[0]
        if caches:  # the writing op fills the quant chains' buffers in place too (it returns one tensor)
            quant = [torch.empty(t * math.prod(shape), dtype=to_dtype(dt), device=inputs[0].device)
                     for dt, shape in group.quant_outputs()]
            flat = torch.ops.braze.fused_heads(inputs, caches + quant, spec)
        else:
            flat, *quant = torch.ops.braze.fused_heads_pure(inputs, spec)
        outs, off = [], 0
        for chain, width in zip(group.chains, group.out_widths()):
            if width:
                outs.append(flat[t * off:t * (off + width)].view(t, chain.heads, chain.head_dim))
                off += width
        shapes = [(c.heads, t, c.head_dim) if isinstance(c, HeadAbsorb) else (t, *shape)  # [H, T, C]: the bmm's
                  for c in group.chains for _, shape in c.quant_outputs()]
        shaped = [q.view(*shape) for q, shape in zip(quant, shapes)]
        return outs + shaped + caches  # returning the caches gives their written values

    return fn


def _quant_read_elsewhere(quant: QuantMatch, claims: list[Claim]) -> bool:
    """Whether the quant's fp8 values or scales have readers besides itself and the claimed byte images."""
    return any(u not in quant.nodes and not consumed_by_bytes(u, claims)
               for n in (quant.q, *quant.scale_nodes) for u in n.users)


class _Deferred:
    """The pass context with remarks held back: sites may be built twice (packed_row claims dropped)."""

    def __init__(self, ctx: PassContext) -> None:
        self._ctx, self._remarks = ctx, []

    def remark(self, *args, **kwargs) -> None:
        self._remarks.append((args, kwargs))

    def token_check(self, *args):
        return self._ctx.token_check(*args)

    def replay(self) -> None:
        for args, kwargs in self._remarks:
            self._ctx.remark(*args, **kwargs)


class HeadChainFusion(Pass):
    name = "head-chain"
    family = "chain"

    def run(self, gm: GraphModule, ctx: PassContext) -> None:
        graph = gm.graph
        norms: dict[Node, NormMatch | LayerNormMatch] = {}
        for n in graph.nodes:
            m = match_rmsnorm(n) if is_op(n, aten.mean) else match_layernorm(n) if is_op(n, aten.var_mean) else None
            if isinstance(m, (NormMatch, LayerNormMatch)):
                norms[strip_lossless_casts(m.output)] = m
        ropes = []
        for n in graph.nodes:
            if n.op == "call_function" and is_op(n, aten.cat, aten.add, aten.view, torch.ops.prims.convert_element_type):
                m = match_rope(n)
                if isinstance(m, RopeMatch):
                    ropes.append(m)
        ropes = [m for m in ropes if not any(m.output in o.nodes and o is not m for o in ropes)]
        stores: dict[Node, StoreMatch] = {}
        for n in graph.nodes:
            if n.target is aten.copy_.default:
                s = match_store(n)
                if isinstance(s, StoreMatch):
                    for src in s.sources():
                        stores[src] = s
                elif s.candidate:
                    ctx.remark("missed", "store-not-recognized", s.node or n, "cache write not fused",
                               reason=s.reason, suggestion=s.suggestion, ops=("store",))
        quants = fp8_quants_by_value(graph)
        ctx.bump("ropes-recognized", len(ropes))
        self._order = {n: i for i, n in enumerate(graph.nodes)}
        byte = ByteStores.collect(graph)
        # a packed byte store is taken only when chains compute every piece of it; else its claims are
        # dropped and the chains are built again without them
        excluded: set[Node] = set()
        for _ in range(3):
            deferred = _Deferred(ctx)
            sites = self._build_sites(ropes, norms, stores, quants, byte, excluded, deferred)
            claimed = {id(c.piece) for s in sites for c in s.claims}
            partial = {c.store.copy for s in sites for c in s.claims if not byte.complete(c.store, claimed)}
            if not partial:
                break
            for copy in partial:
                ctx.remark("missed", "packed-row-partial", copy, "packed byte row left to Inductor",
                           reason="some of its bytes come from values no fused chain computes",
                           suggestion="build every piece of the row from a norm/RoPE/FP8 chain", ops=("store",))
            excluded |= partial
        else:
            deferred = _Deferred(ctx)
            sites = self._build_sites(ropes, norms, stores, quants, ByteStores([]), excluded, deferred)
        deferred.replay()
        # cache writes no chain took: a plain store, fused alone (in place, O(T) bytes) or beside a sibling
        taken = {s.store.copy for s in sites if s.store is not None} | {c.store.copy for s in sites for c in s.claims}
        # results a chain replaces with its own output: a store of them stays with Inductor (as a chain input
        # it could land in the same launch as the chain that produces it; quant outputs cannot: quant and
        # writing chains never share a launch)
        produced = {s.result for s in sites if s.result is not None}
        for store in {s.copy: s for s in stores.values()}.values():
            if store.copy in taken or produced & set(store.sources()):
                continue
            site = store_site(store, ctx)
            if site is None:
                continue
            why = ctx.token_check(self.family, val(site.inputs[0]).shape[0])
            if why:
                ctx.remark("missed", "token-range", site.anchor, "cache write not fused", reason=why,
                           suggestion="widen FusionConfig.token_ranges['chain']", ops=("store",))
                continue
            sites.append(site)
        # norms read only by GEMMs: a norm-only chain, kept only where it shares a launch that saves a kernel
        optional = []
        used = {s.anchor for s in sites}
        for m in {id(m): m for m in norms.values()}.values():
            site = norm_site(m) if m.anchor not in used else None
            if site is not None and isinstance(m, NormMatch) and not norm_fold_reason(m, ctx):
                m.output.meta[FOLD_KEY] = m  # the decode-gemm pass computes it inside the GEMMs: no launch needed
                continue
            # a norm Inductor computes inside the kernel of its input (a residual add) saves no kernel in a launch
            if site is not None and not fused_by_inductor(m.x) and not ctx.token_check(
                    self.family, val(site.inputs[0]).shape[0]):
                optional.append(site)
        # per-head products against a weight (MLA's absorbed W_UK): kept only where they join another launch
        if sites and ctx.config.chain_absorb:
            for n in list(graph.nodes):
                site = absorb_site(n) if n.target is aten.bmm.default else None
                if site is None:
                    continue
                if reason := ctx.token_check("chain_absorb", val(site.inputs[0]).shape[0]):
                    ctx.remark("missed", "absorb-tokens", site.anchor, "per-head product left to cuBLAS's bmm",
                               reason=reason + " (FusionConfig.token_ranges['chain_absorb']): each program of the "
                               "launch runs every token through its weight tile, so its time grows with the tokens",
                               ops=("absorb",))
                else:
                    optional.append(site)
        fake_mode = graph_fake_mode(graph)
        grouping = group_siblings(graph, sites, optional)
        for site in grouping.unplaced:  # (the [T, H, D] view an absorb site added goes with the dead-code pass)
            if isinstance(site.chain, HeadAbsorb):
                ctx.remark("missed", "absorb-alone", site.anchor, "per-head product left to cuBLAS's bmm",
                           reason="no chain launch over the same tokens can take it (alone it would save no kernel)",
                           ops=("absorb",))
        groups, moves, dropped = grouping.groups, grouping.moves, grouping.dropped
        for site in [s for s in dropped if s.product is not None and not s.claims]:
            ctx.remark("missed", "scale-product-order", site.product.output, "scale product left to Inductor",
                       reason="the head weights are computed after the quant's values are first read",
                       suggestion="compute the head weights before the quant's outputs are used", ops=self._ops(site))
            dropped.remove(site)
            plain = dataclasses.replace(site, chain=dataclasses.replace(site.chain, product=None),
                                        inputs=site.inputs[:-1], product=None)
            groups.append([plain])
            moves.append([])
        for site in dropped:
            ctx.remark("missed", "packed-row-launch", site.anchor, "packed byte row left to Inductor",
                       reason="the chains that compute its pieces cannot share one launch (a piece is read "
                              "before another is computed)", ops=self._ops(site))
        for launch, group in enumerate(groups):
            # the byte caches the group's fields write, each once; a field names its cache by index
            field_caches = list({c.store.cache: None for s in group for c in s.claims})
            chains = tuple(s.chain if not s.claims else dataclasses.replace(s.chain, fields=tuple(
                dataclasses.replace(f, cache=field_caches.index(c.store.cache)) for f, c in zip(s.chain.fields, s.claims)))
                for s in group)
            spec = HeadGroup(chains)
            # moved after the launches before it are spliced: a moved GEMM that reads a value one of
            # them replaces lands after that launch
            hoist(moves[launch])
            args = [a for s in group for a in s.inputs] + [s.cache for s in group if s.cache is not None] + field_caches
            n_in = sum(len(s.inputs) for s in group)
            try:
                traced = trace_functional(fused_heads_call(spec, n_in), [a.meta["val"] for a in args], fake_mode)
            except Exception as e:
                ctx.remark("failed", "internal-error", group[0].anchor, "head chains left unfused after an error in braze",
                           reason=f"{type(e).__name__}: {e}", suggestion="report this as a braze bug", ops=("rope",))
                continue
            self._replace(graph, group, traced, args, field_caches)
            for site in group:
                note = f" (one launch with {len(group) - 1} sibling chain(s))" if len(group) > 1 else ""
                ctx.remark("applied", "head-chain", site.anchor,
                           f"fused {' -> '.join(self._ops(site))} into one kernel{note}",
                           ops=self._ops(site), args={**self._args(site.chain), "group": len(group),
                                                          "launch": launch})
            ctx.bump("chains-fused", len(group))
            ctx.bump("launches", 1)

    def _build_sites(self, ropes, norms, stores, quants, byte: ByteStores, excluded: set[Node],
                     ctx: _Deferred) -> list[HeadSite]:
        """A site per RoPE, then per FP8 quant whose bytes a packed store writes (no RoPE before it)."""
        byte = ByteStores([s for s in byte.stores if s.copy not in excluded],
                          {k: [c for c in v if c.store.copy not in excluded] for k, v in byte.by_value.items()})
        sites: list[HeadSite] = []
        seeds = [("rope", r) for r in ropes] + [("quant", q) for q in {id(q): q for q in quants.values()}.values()]
        for kind, seed in seeds:
            try:
                if kind == "rope":
                    site = self._site(seed, norms, stores, quants, byte, ctx)
                elif any(s.quant is seed for s in sites):
                    continue
                else:
                    site = self._quant_site(seed, norms, byte, ctx)
            except Exception as e:  # a bug in braze must not break the user's compile
                anchor = seed.output if kind == "rope" else seed.q
                ctx.remark("failed", "internal-error", anchor, "head chain left unfused after an error in braze",
                           reason=f"{type(e).__name__}: {e}", suggestion="report this as a braze bug", ops=(kind,))
                continue
            if site is None:
                continue
            why = ctx.token_check(self.family, val(site.inputs[0]).shape[0])
            if why:
                ctx.remark("missed", "token-range", site.anchor, "head chain not fused", reason=why,
                           suggestion="widen FusionConfig.token_ranges['chain']", ops=self._ops(site))
                continue
            sites.append(site)
        return sites

    @staticmethod
    def _quant_fields(quant: QuantMatch, heads: int, head_dim: int, byte: ByteStores) -> tuple[list, list]:
        """Byte fields of a per-head quant's fp8 values and scales, and the claims behind them."""
        fields, claims = [], []
        for c in byte.claims(quant.q):
            if per_token(c.piece.source) == heads * head_dim and c.piece.dtype == torch.float8_e4m3fn:
                fields.append(c.field("q"))
                claims.append(c)
        per_head = head_dim // quant.stage.group_size  # scales per head
        for i, node in enumerate(quant.scale_nodes):
            for c in byte.claims(node):
                if per_token(c.piece.source) == heads * per_head and byte_dtype_ok(c.piece.dtype):
                    fields.append(c.field(f"scale{i}"))
                    claims.append(c)
        return fields, claims

    def _quant_site(self, quant: QuantMatch, norms, byte: ByteStores, ctx: _Deferred) -> HeadSite | None:
        """[norm ->] FP8 quant whose fp8 values and scales only a packed byte store reads: the chain
        writes the bytes itself (the kv_c latent of DeepSeek's MLA row: RMSNorm -> 4 groups of 128)."""
        if not (byte.claims(quant.q) or any(byte.claims(n) for n in quant.scale_nodes)):
            return None
        y = quant.y
        width, group = per_token(y), quant.stage.group_size
        if width is None or not isinstance(group, int) or width % group:
            return None
        heads, head_dim = width // group, group
        fields, claims = self._quant_fields(quant, heads, head_dim, byte)
        if not fields:
            return None
        base = strip_lossless_casts(base_of(y))
        norm = norms.get(base) or norms.get(base_of(base)) or norms.get(y)
        if norm is not None and not (_only_feeds(norm.output, set(quant.nodes))
                                     and (known_eq(norm.stage.width, width) or known_eq(norm.stage.width, head_dim))):
            norm = None
        source = norm.x if norm is not None else y
        source = _as_tokens(source, heads, head_dim)
        if source is None or val(source).dim() not in (2, 3) or per_token(source) != width:
            return None
        quant_out = _quant_read_elsewhere(quant, claims)
        if quant_out:  # a writing launch returns no quant outputs: the bytes stay with Inductor
            return None
        chain = HeadChain(in_dtype=dtype_name(val(source).dtype), heads=heads, head_dim=head_dim,
                          norm=norm.stage if norm is not None else None, rope=None, gather=False, out=False,
                          write=None, quant=quant.stage, fields=tuple(fields), quant_out=quant_out)
        inputs = [source]
        if norm is not None and norm.weight is not None:
            inputs.append(norm.weight)
        if norm is not None and getattr(norm, "bias", None) is not None:
            inputs.append(norm.bias)
        inputs.append(claims[0].write.slots)
        if any(c.write.slots is not claims[0].write.slots for c in claims):
            return None
        return HeadSite(chain, tuple(inputs), None, None, None, norm.anchor if norm is not None else quant.q,
                        quant, tuple(claims))

    @staticmethod
    def _ops(site: HeadSite) -> tuple[str, ...]:
        c = site.chain
        if isinstance(c, HeadAbsorb):
            return ("absorb",)
        return tuple(([c.norm.kind] if c.norm else []) + (["rope"] if c.rope else []) + (["fp8_quant"] if c.quant else [])
                     + (["scale_mul"] if c.product else []) + (["store"] if c.write or c.fields else []))

    @staticmethod
    def _args(chain: HeadChain) -> dict[str, object]:
        args: dict[str, object] = {"heads": chain.heads, "head_dim": chain.head_dim}
        if isinstance(chain, HeadAbsorb):
            return {**args, "in_dim": chain.in_dim}
        if chain.rope is not None:
            args.update(rope=chain.rope.style, rotary_dim=chain.rope.rotary_dim, rope_offset=chain.rope.offset)
        if chain.norm is not None:
            args.update(eps=chain.norm.eps, norm="per-head" if chain.norm.width == chain.head_dim else "row",
                        norm_kind=chain.norm.kind)
        if chain.quant is not None:
            args.update(quant_group=chain.quant.group_size, scales=len(chain.quant.scales))
        return args

    def _site(self, rope: RopeMatch, norms: dict[Node, NormMatch | LayerNormMatch], stores: dict[Node, StoreMatch],
              quants: dict[Node, QuantMatch], byte: ByteStores, ctx: _Deferred) -> HeadSite | None:
        stage = rope.stage
        x = rope.x
        x_shape = shape_of(x)
        # [B, H, 1, D]: one new token per sequence with heads before the sequence dim (Hugging Face layout)
        one_token = x_shape is not None and len(x_shape) == 4 and known_eq(x_shape[2], 1)
        if x_shape is None or not (len(x_shape) in (2, 3) or one_token):
            ctx.remark("missed", "rope-layout", rope.output, "RoPE not fused",
                       reason=f"rotates a tensor of shape {x_shape}; braze takes [T, heads, head_dim], [T, head_dim] "
                              "or one token per sequence as [B, heads, 1, head_dim]",
                       suggestion="flatten batch and sequence into one token dim", ops=("rope",))
            return None
        heads = x_shape[1] if len(x_shape) >= 3 else 1
        if not isinstance(heads, int):
            return None
        # grow backwards: a norm whose output only this rotation reads (through the [B, 1, H, D] ->
        # [B, H, 1, D] transpose of the Hugging Face layout)
        base = x.args[0] if one_token and is_op(x, aten.permute) and list(x.args[1]) == [0, 2, 1, 3] else x
        norm = norms.get(_through_views(base)) or norms.get(base)
        source = x
        if norm is not None and not _only_feeds(norm.output, set(rope.nodes) | {x}):
            norm = None
        if norm is not None:
            width = norm.stage.width
            if not (known_eq(width, stage.head_dim) or known_eq(width, heads * stage.head_dim)):
                norm = None
            else:
                source = norm.x
        # the tables: cos = table[positions] (gathered in the kernel) or given rows
        cos, sin = _strip(rope.cos), _strip(rope.sin)
        gather = is_op(cos, aten.index) and is_op(sin, aten.index) and cos.args[1][0] is sin.args[1][0]
        tables = [cos.args[0], sin.args[0], cos.args[1][0]] if gather else [cos, sin]
        t = (shape_of(x) or [None])[0]
        if gather:  # positions: one per token, or one for every token (broadcast)
            pos_val = val(cos.args[1][0])
            if pos_val is None or not (known_eq(pos_val.numel(), t) or known_eq(pos_val.numel(), 1)):
                ctx.remark("missed", "rope-tables", rope.output, "RoPE not fused",
                           reason=f"{tuple(pos_val.shape) if pos_val is not None else 'unknown'} positions for {t} "
                                  "tokens: braze takes one position per token or one for all",
                           ops=("rope",))
                return None
        if not gather:  # one table row per token, or one row for every token (broadcast)
            for tab in (cos, sin):
                numel = val(tab).numel() if val(tab) is not None else None
                if numel is None or not (known_eq(numel, stage.table) or known_eq(numel, t * stage.table)):
                    ctx.remark("missed", "rope-tables", rope.output, "RoPE not fused",
                               reason=f"cos/sin of shape {shape_of(tab)} give neither one row of {stage.table} per "
                                      "token nor one row for all tokens",
                               suggestion="index the tables by position ([T, dim]) or pass one row", ops=("rope",))
                    return None
        # grow forwards: a cache write of the rotated rows
        store = stores.get(_through_views(rope.output)) or stores.get(rope.output)
        if store is not None:
            row = 1
            for s in store.row_shape:
                row *= s
            cache_val = val(store.cache)
            if row != heads * stage.head_dim or cache_val is None or not cache_val.is_contiguous():
                ctx.remark("missed", "store-layout", store.copy, "cache write left unfused",
                           reason=f"cache rows of {store.row_shape} do not hold the {heads}x{stage.head_dim} rotated "
                                  f"values contiguously", ops=("rope", "store"))
                store = None
        # grow forwards: an FP8 quant of the rotated values (when nothing is stored), one scale per head
        # or per group of a divisor of the head, whichever dims the group spans
        quant = quants.get(_through_views(rope.output)) or quants.get(rope.output)
        group = quant.stage.group_size if quant is not None else None
        if quant is not None and (store is not None or not (isinstance(group, int) and stage.head_dim % group == 0)):
            ctx.remark("missed", "quant-layout", quant.q, "FP8 quant left out of the head chain",
                       reason=(f"quantizes groups of {group} values; the chain quantizes each head of "
                               f"{stage.head_dim} or groups that divide it") if store is None else
                              "the rotated values are also written to a cache: a chain quantizes or stores",
                       ops=("rope", "fp8_quant"))
            quant = None

        # grow forwards: bytes of the result (or of a cast of it) and of the quant's values in packed stores
        fields, claims = [], []
        if store is None:
            for c in byte.claims(rope.output, through_cast=True):
                if per_token(c.piece.source) == heads * stage.head_dim and byte_dtype_ok(c.piece.dtype):
                    fields.append(c.field("result"))
                    claims.append(c)
        if quant is not None:
            qf, qc = self._quant_fields(quant, heads, stage.head_dim, byte)
            fields += qf
            claims += qc
        if any(c.write.slots is not claims[0].write.slots for c in claims):
            fields, claims = [], []

        def consumed(u: Node) -> bool:
            if store is not None and _only_feeds(u, {store.index_put}):
                return True
            if claims and consumed_by_bytes(u, claims):
                return True
            return quant is not None and (u in quant.nodes or _only_feeds(u, set(quant.nodes)))

        result_users = [u for u in rope.output.users if not consumed(u)]
        quant_out = quant is not None and _quant_read_elsewhere(quant, claims)
        if quant_out and claims:  # a writing launch returns no quant outputs: the bytes stay with Inductor
            fields, claims = [], []
            result_users = [u for u in rope.output.users if not consumed(u)]
        # grow forwards: a quant scale multiplied by per-(token, head) weights (DeepSeek's indexer)
        product = None
        if quant_out and quant.stage.group_size == stage.head_dim:
            chain_nodes = frozenset(rope.nodes) | (frozenset(norm.nodes) if norm is not None else frozenset())
            found = match_scale_product(quant, t, heads, self._order, chain_nodes)
            if isinstance(found, ScaleProductMiss):
                ctx.remark("missed", found.name, found.node, "scale product left to Inductor", reason=found.reason,
                           suggestion=found.suggestion, ops=("rope", "fp8_quant", "mul"))
            else:
                product = found
        chain = HeadChain(
            in_dtype=dtype_name(val(source).dtype), heads=heads, head_dim=stage.head_dim,
            norm=norm.stage if norm is not None else None, rope=stage, gather=gather,
            out=bool(result_users) or (store is None and quant is None and not fields),
            write=store.stage if store is not None else None,
            quant=quant.stage if quant is not None else None, fields=tuple(fields), quant_out=quant_out,
            product=product.stage if product is not None else None)
        source = _as_tokens(source, heads, stage.head_dim)
        if source is None:
            ctx.remark("missed", "rope-layout", rope.output, "RoPE not fused",
                       reason=f"the chain's input has shape {shape_of(norm.x if norm else x)}, not tokens x heads x "
                              "head_dim with at most one singleton sequence dim", ops=("rope",))
            return None
        inputs = [source]
        if norm is not None and norm.weight is not None:
            inputs.append(norm.weight)
        if norm is not None and getattr(norm, "bias", None) is not None:
            inputs.append(norm.bias)
        inputs += tables
        if store is not None:
            inputs.append(store.slots)
        elif claims:
            inputs.append(claims[0].write.slots)
        if product is not None:
            inputs.append(product.w)
        return HeadSite(chain, tuple(inputs), store.cache if store else None,
                        rope.output if chain.out else None, store, norm.anchor if norm is not None else rope.output,
                        quant, tuple(claims), product)

    @staticmethod
    def _replace(graph: torch.fx.Graph, group: list[HeadSite], traced: GraphModule, args: list[Node],
                 field_caches: list[Node]) -> None:
        new = splice(graph, traced, args, group[0].anchor)
        n_out = sum(1 for s in group if s.chain.out)
        n_quant = sum(len(s.chain.quant_outputs()) for s in group)
        outs, quant = iter(new[:n_out]), iter(new[n_out:n_out + n_quant])
        caches = iter(new[n_out + n_quant:])
        for site in group:
            if site.chain.out:
                site.result.replace_all_uses_with(view_as(graph, next(outs), site.result))
        for site in group:
            for old in site.quant_nodes():
                old.replace_all_uses_with(view_as(graph, next(quant), old))
        for site in group:
            if site.store is not None:
                new_cache = next(caches)
                put, copy = site.store.index_put, site.store.copy
                # readers of the written cache read the fused op's result; the copy_ back into the
                # input takes it directly, which is what lets Inductor drop the functional clone
                put.replace_all_uses_with(view_as(graph, new_cache, put))
                copy.args = (copy.args[0], new_cache)
        # packed byte stores: readers of the written cache read the op's result; the index_put /
        # slice_scatter chain that built it goes dead
        stores = {c.store.cache: c.store for s in group for c in s.claims}
        for cache, new_cache in zip(field_caches, caches):
            store = stores[cache]
            store.final.replace_all_uses_with(view_as(graph, new_cache, store.final))
            store.copy.args = (store.copy.args[0], new_cache)
