"""Delta-rule fusion: Gated DeltaNet's recurrent decode update (decay, u = Sᵀk, δ, S += kδᵀ, o = Sᵀq) as one kernel.

For every state write-back `copy_(state, index_put(state, [idx], S_new))` whose rows are the
gated delta rule's update (braze.patterns.delta_rule), the gather, the update, the readout o
and the write-back become `braze::delta_rule`, which updates the fp32 state rows in place
(Inductor drops the functional copy, as for the post-conv op's conv state). It runs after the
post-conv pass (whose outputs it then reads) and before the head-chain pass, which would
otherwise meet the [T, Hv, dk, dv] row write alone (a `store-layout` remark). Near misses
become `missed` remarks.

Where a gated RMSNorm reads the update's o and nothing else does (FusionConfig.delta_rule_norm), the
norm [+ the FP8 quant after it] joins the update's kernel (`braze::delta_rule_gated`, one program per
value head) and the gated-norm pass never sees it; near misses say why (`gated-norm-apart`).

Where, in addition, the update's q, k, v, g and beta are the outputs of a post-conv site the post-conv pass fused and
nothing else reads them (FusionConfig.delta_rule_conv), that site joins the same kernel
(`braze::conv_delta_rule_gated`): the post-conv op is erased, and a key head's q/k conv state is shifted by the last
of its programs to arrive at an arrival counter (POST_CONV_DESIGN.md); near misses say why (`post-conv-apart`).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.fx import GraphModule, Node

from braze.codegen.delta_rule import GATED_MAX_STATE, gated_blocks
from braze.patterns.delta_rule import (
    DeltaRule,
    DeltaRuleMatch,
    match_delta_rule,
    match_delta_rule_rows,
)
from braze.patterns.fx import (
    Miss,
    aten,
    dtype_of,
    is_cast,
    is_identity_index,
    is_lossless,
    is_op,
    is_view,
    known_eq,
    val,
)
from braze.patterns.gated_norm import GatedNormMatch
from braze.patterns.gdn import PostConv
from braze.patterns.quant import fp8_quants_by_value
from braze.patterns.stages import RowChain, dtype_name

from .base import Pass, PassContext
from .gated_norm import gated_norms, plan_gated_norm
from .post_conv import PostConvSplice
from .rewrite import graph_fake_mode, splice, trace_functional, view_as

OPS = ("repeat_interleave", "decay", "delta_rule", "state_store", "readout")

# Miss reasons -> remark names (the rest: delta-rule-not-recognized)
_NAMES = (("recurrent state is", "state-dtype"), ("state has strides", "state-layout"),
          ("[.., dv, dk] rows", "state-layout"), ("also read elsewhere", "delta-rule-value-escapes"))


def delta_rule_call(spec: DeltaRule):
    """The replacement: the fused op; returns o and the updated state (indexed), or o and the new rows."""
    import braze.runtime.delta_rule  # noqa: F401  (registers the op)

    text = spec.to_json()

    def fn(q, k, v, g, beta, idx, state):
        o = torch.ops.braze.delta_rule(q, k, v, g, beta, idx, state, text)
        return [o, state]

    def first_rows(q, k, v, g, beta, state):
        o = torch.ops.braze.delta_rule_first_rows(q, k, v, g, beta, state, text)
        return [o, state]

    def rows(q, k, v, g, beta, state):
        return torch.ops.braze.delta_rule_rows(q, k, v, g, beta, state, text)

    if spec.indexed:
        return first_rows if spec.identity else fn
    return rows


def delta_rule_gated_call(spec: DeltaRule, chain: RowChain):
    """The replacement of an update and the gated RMSNorm of its o: the chain's outputs and the state. Its
    arguments: q, k, v, g, beta, [indices (not with arange(T) rows)], state, then the chain's weight and z."""
    import braze.runtime.delta_rule  # noqa: F401  (registers the op)

    text, chain_text = spec.to_json(), chain.to_json()

    def fn(q, k, v, g, beta, *rest):
        idx, rest = (None, rest) if spec.identity else (rest[0], rest[1:])
        state, inputs = rest[0], list(rest[1:])
        outs = torch.ops.braze.delta_rule_gated(q, k, v, g, beta, idx, state, inputs, text, chain_text)
        return [*outs, state]

    return fn


def conv_delta_rule_gated_call(post: PostConv, roles: tuple[int, int, int], spec: DeltaRule, chain: RowChain,
                               n_conv: int):
    """The replacement of a post-conv site, the update its outputs feed and the gated RMSNorm of its o: the chain's
    outputs, the conv state, the state [and the counters]. Its arguments: the post-conv op's `n_conv` inputs, the
    conv state, [indices (not with arange(T) rows)], the state, the chain's weight and z, [the counters (with more
    value heads than key heads)]."""
    import braze.runtime.delta_rule  # noqa: F401  (registers the op)

    texts = post.to_json(), ",".join(map(str, roles)), spec.to_json(), chain.to_json()

    shared = spec.heads_v != spec.heads_k  # a key head's q/k conv state has several readers: counters

    def fn(*args):
        conv_inputs, conv_state, rest = list(args[:n_conv]), args[n_conv], args[n_conv + 1:]
        idx, rest = (None, rest) if spec.identity else (rest[0], rest[1:])
        state, rest = rest[0], rest[1:]
        inputs, counters = (list(rest[:-1]), rest[-1]) if shared else (list(rest), None)
        outs = torch.ops.braze.conv_delta_rule_gated(conv_inputs, conv_state, idx, state, inputs, counters, *texts)
        return [*outs, conv_state, state] + ([counters] if shared else [])

    return fn


# Ops between o and the gated norm's input that keep o's rows in order: reshapes of the contiguous o.
_ROW_VIEWS = (aten.view, aten.reshape, aten._unsafe_view, aten.unsqueeze, aten.squeeze)


def _row_view(n: object) -> bool:
    """A reshape of the values as they lie (not `view.dtype`, which reinterprets their bytes)."""
    return is_view(n) or (is_op(n, *_ROW_VIEWS) and n.target is not aten.view.dtype)


def _o_path(x: Node, o: Node) -> tuple[list[Node], str] | str:
    """The nodes from o to the norm's input x (reshapes and at most one cast) and the dtype x holds; else why not."""
    path: list[Node] = []
    node = x
    while node is not o:
        if not isinstance(node, Node) or not (_row_view(node) or is_cast(node)):
            return f"the norm reads {getattr(node, 'name', node)!s}, not o through reshapes and a cast"
        path.append(node)
        node = node.args[0]
    if sum(is_cast(n) for n in path) > 1:
        return "o is cast more than once on its way to the norm"
    for n in [o, *path[1:]] if path else []:  # (x itself: its users are checked against the norm's)
        if len(n.users) != 1:
            return f"`{n.name}` (o on its way to the gated norm) has another user: {describe_users(n)}"
    return path, dtype_name(val(x).dtype)


def describe_users(n: Node) -> str:
    return ", ".join(u.name for u in n.users)


def miss_name(m: Miss) -> str:
    return next((name for key, name in _NAMES if key in m.reason), "delta-rule-not-recognized")


class DeltaRuleFusion(Pass):
    name = "delta-rule"
    family = "delta_rule"

    def run(self, gm: GraphModule, ctx: PassContext) -> None:
        graph = gm.graph
        sites: list[DeltaRuleMatch] = []
        for n in list(graph.nodes):
            if n.target is aten.copy_.default:
                m = match_delta_rule(n)
                if isinstance(m, DeltaRuleMatch):
                    sites.append(m)
                elif m.candidate:
                    ctx.remark("missed", miss_name(m), m.node or n, "delta-rule update not fused",
                               reason=m.reason, suggestion=m.suggestion, ops=("delta_rule",))
        taken = {n for site in sites for n in site.inner}
        for n in list(graph.nodes):  # the form without slot indices (Hugging Face's): S1 is a value, not written back
            if n.target is aten.add.Tensor and n not in taken:
                m = match_delta_rule_rows(n)
                if isinstance(m, DeltaRuleMatch):
                    sites.append(m)
                    taken |= m.inner
                elif m.candidate:
                    ctx.remark("missed", miss_name(m), m.node or n, "delta-rule update not fused",
                               reason=m.reason, suggestion=m.suggestion, ops=("delta_rule",))
        ctx.bump("updates-recognized", len(sites))
        fake_mode = graph_fake_mode(graph) if sites else None
        gated = self._gated_norms(graph, ctx) if sites else {}
        quants = fp8_quants_by_value(graph) if gated else {}
        for site in sites:
            why = ctx.token_check(self.family, val(site.q).shape[0])
            if why:
                ctx.remark("missed", "token-range", site.output, "delta-rule update not fused", reason=why,
                           suggestion="widen FusionConfig.token_ranges['delta_rule']", ops=OPS)
                continue
            if site.spec.indexed and is_identity_index(site.indices, val(site.q).shape[0]):
                # state_indices = arange(T): rows 0..T-1, updated in place with no index read
                site = replace(site, spec=replace(site.spec, identity=True), indices=None)
            inputs = [site.q, site.k, site.v, site.g, site.beta] + ([site.indices] if site.indices is not None
                                                                     else []) + [site.state]
            fold = self._fold(site, gated.get(site.output), quants, ctx)
            if fold is not None:
                try:
                    conv = self._conv_fold(graph, site, fold, ctx)
                    if conv is not None:
                        self._splice_conv_gated(graph, site, inputs, fold, conv, fake_mode, ctx)
                    else:
                        self._splice_gated(graph, site, inputs, fold, fake_mode, ctx)
                    continue
                except Exception as e:  # a bug in braze must not break the user's compile: the update alone
                    ctx.remark("failed", "internal-error", site.output, "gated RMSNorm left out of the delta-rule "
                               "kernel after an error in braze", reason=f"{type(e).__name__}: {e}",
                               suggestion="report this as a braze bug", ops=("delta_rule", "rmsnorm", "silu_gate"))
            try:
                traced = trace_functional(delta_rule_call(site.spec), [n.meta["val"] for n in inputs], fake_mode)
            except Exception as e:  # a bug in braze must not break the user's compile
                ctx.remark("failed", "internal-error", site.output, "delta-rule update left unfused after an error "
                           "in braze", reason=f"{type(e).__name__}: {e}", suggestion="report this as a braze bug",
                           ops=("delta_rule",))
                continue
            o, state = splice(graph, traced, inputs, site.output)
            site.output.replace_all_uses_with(view_as(graph, o, site.output))
            if site.spec.indexed:
                site.copy.args = (site.copy.args[0], state)
            else:  # the new rows replace S1 wherever it is read (the cache update, a copy back)
                site.new_state.replace_all_uses_with(view_as(graph, state, site.new_state))
            s = site.spec
            ctx.remark("applied", "delta-rule", site.output, "fused the gated delta-rule update into one kernel "
                       "(state rows updated in place)" if s.indexed else "fused the gated delta-rule update into one "
                       "kernel (new state rows)", ops=OPS if s.heads_v != s.heads_k else OPS[1:],
                       args={"heads_k": s.heads_k, "heads_v": s.heads_v, "dk": s.dk, "dv": s.dv, "scale": s.scale,
                             **({"rows": "arange(T)"} if s.identity else {})})
            ctx.bump("sites-fused")
        if sites:
            from .post_conv import _restore_topological_order

            _restore_topological_order(graph)  # S1's readers may precede q, the op's last input

    # -- the gated RMSNorm of o inside the update's kernel ---------------------------------------------------

    @staticmethod
    def _gated_norms(graph, ctx: PassContext) -> dict[Node, GatedNormMatch]:
        """The gated RMSNorms of the graph by the node their input comes from through reshapes and casts."""
        if not (ctx.config.gated_norm and ctx.config.delta_rule_norm):
            return {}
        out: dict[Node, GatedNormMatch] = {}
        for m in gated_norms(graph, None):  # (the gated-norm pass remarks on near misses)
            node = m.norm.x
            while _row_view(node) or is_cast(node):
                node = node.args[0]
            out[node] = m
        return out

    def _fold(self, site: DeltaRuleMatch, m: GatedNormMatch | None, quants, ctx: PassContext):
        """(chain, its extra inputs, the values its outputs replace) when the gated norm of o can run inside the
        update's kernel; else None (with a remark when a gated norm reads o)."""
        if m is None:
            return None
        s = site.spec

        def apart(name: str, reason: str, suggestion: str = "") -> None:
            ctx.remark("missed", name, m.norm.anchor, "gated RMSNorm of the delta-rule output runs as a kernel of "
                       "its own", reason=reason, suggestion=suggestion, ops=("delta_rule", "rmsnorm", "silu_gate"))

        if not s.indexed:
            return apart("gated-norm-apart", "the update writes new state rows (Hugging Face's form): only the "
                         "in-place forms carry the norm")
        path = _o_path(m.norm.x, site.output)
        if isinstance(path, str):
            return apart("gated-norm-apart", path)
        _, x_dtype = path
        if not known_eq(m.norm.stage.width, s.dv) or not known_eq(val(m.norm.x).numel(), val(site.output).numel()):
            return apart("gated-norm-apart", f"the norm's rows of {m.norm.stage.width} values are not the value "
                         f"heads ({s.dv} values)")
        inside = set(m.norm.nodes) | set(m.nodes)
        if any(u not in inside and not (is_cast(u) and all(w in inside for w in u.users)) for u in m.norm.x.users):
            return apart("gated-norm-apart", f"o as the norm reads it (`{m.norm.x.name}`) has another user: "
                         f"{describe_users(m.norm.x)}")
        if gated_blocks(s.dk, s.dv) is None:
            return apart("gated-norm-apart", f"a [{s.dk}, {s.dv}] state row is more than one program holds "
                         f"({GATED_MAX_STATE} fp32 values)")
        why = ctx.token_check("delta_rule_norm", val(site.q).shape[0])
        if why:
            return apart("token-range", why, "widen FusionConfig.token_ranges['delta_rule_norm']")
        planned = plan_gated_norm(m, quants, ctx, family="gated_norm")
        if planned is None:
            return None
        chain, inputs, outputs = planned
        if chain.n_groups != 1 or chain.in_dtype != x_dtype:
            return apart("gated-norm-apart", f"the chain ({chain.name}) does not take one row per value head")
        return chain, inputs[1:], outputs

    @staticmethod
    def _splice_gated(graph, site: DeltaRuleMatch, inputs: list[Node], fold, fake_mode, ctx: PassContext) -> None:
        chain, extra, outputs = fold
        traced = trace_functional(delta_rule_gated_call(site.spec, chain),
                                  [n.meta["val"] for n in inputs + extra], fake_mode)
        new = splice(graph, traced, inputs + extra, site.output)
        *outs, state = new
        for old, out in zip(outputs, outs):
            old.replace_all_uses_with(view_as(graph, out, old))
        site.copy.args = (site.copy.args[0], state)
        s = site.spec
        ops = OPS if s.heads_v != s.heads_k else OPS[1:]
        ops = ops + ("rmsnorm", "silu_gate") + (("fp8_quant",) if chain.quant else ())
        ctx.remark("applied", "delta-rule", site.output, "fused the gated delta-rule update and the gated RMSNorm "
                   f"of its output{' -> FP8 quant' if chain.quant else ''} into one kernel (state rows updated in "
                   "place, one program per value head)", ops=ops,
                   args={"heads_k": s.heads_k, "heads_v": s.heads_v, "dk": s.dk, "dv": s.dv, "scale": s.scale,
                         "norm_eps": chain.norm.eps, **({"rows": "arange(T)"} if s.identity else {})})
        ctx.bump("sites-fused")
        ctx.bump("gated-norms-folded")

    # -- the post-conv path inside the same kernel ------------------------------------------------------------

    @staticmethod
    def _conv_fold(graph, site: DeltaRuleMatch, fold, ctx: PassContext):
        """(the post-conv splice, the segments that are q, k and v) when the post-conv site whose outputs this
        update reads can run inside the gated kernel as well; else None (with a remark when one feeds it)."""
        sites: list[PostConvSplice] = ctx.shared.get("post_conv", [])
        if not sites or not ctx.config.delta_rule_conv:
            return None
        held = {n: (rec, i) for rec in sites for i, n in enumerate(rec.outputs)}
        found = []
        for x in (site.q, site.k, site.v, site.g, site.beta):
            while x not in held and (_row_view(x) or (is_cast(x) and is_lossless(dtype_of(x.args[0]), dtype_of(x)))):
                x = x.args[0]
            found.append(held.get(x))
        if found[0] is None:
            return None  # the update's q is not a post-conv output: nothing to fold, nothing to say
        rec = found[0][0]

        def apart(reason: str, suggestion: str = "", name: str = "post-conv-apart"):
            ctx.remark("missed", name, site.output, "post-conv path runs as a kernel of its own, before the "
                       "delta-rule kernel", reason=reason, suggestion=suggestion,
                       ops=("conv_update", "delta_rule"))

        if any(f is None or f[0] is not rec for f in found):
            return apart("the update's operands are not all outputs of one post-conv site")
        spec, n_seg = rec.spec, len(rec.spec.segments)
        roles = tuple(i for _, i in found[:3])
        if spec.gating is None or [i for _, i in found[3:]] != [n_seg, n_seg + 1]:
            return apart("the update's g and beta are not the post-conv site's gating")
        if sorted(roles) != list(range(n_seg)):
            return apart(f"the conv output has {n_seg} segments, not the update's q, k and v")
        if rec.replayed:
            return apart("the L2 norm is taken after the heads are repeated (Hugging Face's form)")
        s = site.spec
        want = ((s.heads_k, s.dk), (s.heads_k, s.dk), (s.heads_v, s.dv))
        for i, (heads, dim), what in zip(roles, want, "qkv"):
            seg = spec.segments[i]
            if seg.heads * seg.head_dim != heads * dim or (seg.norm is not None and seg.head_dim != dim):
                return apart(f"the {what} segment ({seg.heads} x {seg.head_dim}) is not {heads} heads of {dim}")
        if spec.gating.heads != s.heads_v:
            return apart(f"the gating's {spec.gating.heads} heads are not the {s.heads_v} value heads")
        _, _, outputs = fold
        dying = _dies_with(graph, set(outputs) | {site.output, site.copy.args[1]})
        alive = [n for n in rec.outputs if n.users and n not in dying]
        if alive:
            return apart(f"a post-conv output (`{alive[0].name}`) is also read elsewhere: {describe_users(alive[0])}")
        rows = val(rec.conv_state).shape[0]
        if s.heads_v != s.heads_k and not isinstance(rows, int):
            return apart(f"the conv state's row count ({rows}) is dynamic: the key heads' arrival counters are a "
                         "buffer of fixed size", "mark the conv state static")
        why = ctx.token_check("delta_rule_conv", val(site.q).shape[0])
        if why:
            return apart(why, "widen FusionConfig.token_ranges['delta_rule_conv']", name="token-range")
        return rec, roles

    @staticmethod
    def _splice_conv_gated(graph, site: DeltaRuleMatch, inputs: list[Node], fold, conv, fake_mode,
                           ctx: PassContext) -> None:
        chain, extra, outputs = fold
        rec, roles = conv
        s = site.spec
        shared = s.heads_v != s.heads_k
        counters, persist = _counters(graph, ctx, rec.conv_state, s.heads_k, fake_mode) if shared else (None, False)
        counters = [counters] if shared else []
        update = inputs[5:]  # [indices,] state
        args = [*rec.inputs, rec.conv_state, *update, *extra, *counters]
        fn = conv_delta_rule_gated_call(rec.spec, roles, s, chain, len(rec.inputs))
        traced = trace_functional(fn, [n.meta["val"] for n in args], fake_mode)
        new = splice(graph, traced, args, site.output)
        outs, (conv_state, state, *new_counters) = new[:len(outputs)], new[len(outputs):]
        for old, out in zip(outputs, outs):
            old.replace_all_uses_with(view_as(graph, out, old))
        site.copy.args = (site.copy.args[0], state)
        rec.state.replace_all_uses_with(conv_state)  # the write-back of the conv state (and any other reader)
        for buf, written in zip(counters if persist else [], new_counters):
            with graph.inserting_before(next(n for n in graph.nodes if n.op == "output")):
                # zero again when the kernel ends; the copy back lets Inductor update the buffer in place
                graph.call_function(aten.copy_.default, (buf, written))
        _erase_dead(graph, rec.nodes)
        # the post-conv op is gone: its `applied` remark gives way to this one, which lists its ops
        ctx.record.remarks.remove(rec.remark)
        ctx.record.bump("post-conv", "applied", -1)
        ctx.record.bump("post-conv", "sites-fused", -1)
        ctx.record.bump("post-conv", "folded-into-delta-rule")
        ops = ("conv_update", "silu", "split", "l2norm", "gdn_gating") + (OPS if s.heads_v != s.heads_k else OPS[1:])
        ops = ops + ("rmsnorm", "silu_gate") + (("fp8_quant",) if chain.quant else ())
        ctx.remark("applied", "delta-rule", site.output, "fused the post-conv path, the gated delta-rule update and "
                   f"the gated RMSNorm of its output{' -> FP8 quant' if chain.quant else ''} into one kernel (conv "
                   "and recurrent state rows updated in place, one program per value head)", ops=ops,
                   args={"heads_k": s.heads_k, "heads_v": s.heads_v, "dk": s.dk, "dv": s.dv, "scale": s.scale,
                         "norm_eps": chain.norm.eps, "conv_width": rec.spec.conv.width,
                         **({"rows": "arange(T)"} if s.identity else {})})
        ctx.bump("sites-fused")
        ctx.bump("gated-norms-folded")
        ctx.bump("post-conv-folded")


def _dies_with(graph, roots: set[Node]) -> set[Node]:
    """`roots` and every node that only they (transitively) read: what is dead once the roots' uses are replaced."""
    dying = set(roots)
    for n in reversed(list(graph.nodes)):
        if n in dying or n.op != "call_function" or not n.users or n.target is aten.copy_.default:
            continue
        if all(u in dying for u in n.users):
            dying.add(n)
    return dying


def _erase_dead(graph, nodes) -> None:
    """Erase the nodes of `nodes` nothing reads any more (a spliced op whose every output was replaced)."""
    pending = [n for n in nodes if not getattr(n, "_erased", False)]
    changed = True
    while changed:
        changed = False
        for n in list(pending):
            if not n.users:
                graph.erase_node(n)
                pending.remove(n)
                changed = True


def _counters(graph, ctx: PassContext, conv_state: Node, heads_k: int, fake_mode) -> tuple[Node, bool]:
    """The arrival counters of one fused site, int32 [conv state rows, Hk], zero; and whether they persist.

    On a GPU (or any device but the CPU) a get_attr of a new zeroed buffer of the graph module, which the kernel
    leaves zero: no zero-fill runs per call (two dims: Inductor inlines 1-D constants of up to 8 values, which then
    could not be updated). On the CPU (the interpreter, the tests) a zero-filled tensor the graph makes: Inductor
    hands a buffer of the module to a CPU fallback op's fake kernel as a real tensor, which fake tensor propagation
    rejects."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from braze.runtime.delta_rule import counters_shape

    like = val(conv_state)
    shape = counters_shape(like.shape[0], heads_k)
    if like.device.type == "cpu":
        with graph.inserting_before(next(n for n in graph.nodes if n.op not in ("placeholder", "get_attr"))):
            node = graph.call_function(aten.full.default, (list(shape), 0),
                                       {"dtype": torch.int32, "device": like.device, "pin_memory": False})
        with fake_mode:
            node.meta["val"] = torch.zeros(shape, dtype=torch.int32, device=like.device)
        return node, False
    gm = ctx.gm
    name = next(f"_braze_counters_{i}" for i in range(1 << 16) if not hasattr(gm, f"_braze_counters_{i}"))
    with unset_fake_temporarily():
        try:
            value = torch.zeros(shape, dtype=torch.int32, device=like.device)
        except (RuntimeError, AssertionError):  # a graph for a device this process has not (analysis only)
            value = None
    if value is None:
        with fake_mode:
            value = torch.zeros(shape, dtype=torch.int32, device=like.device)
    gm.register_buffer(name, value)
    with graph.inserting_before(next(iter(graph.nodes))):
        node = graph.get_attr(name)
    node.meta["val"] = value if value.__class__ is not torch.Tensor else fake_mode.from_tensor(value)
    return node, True
