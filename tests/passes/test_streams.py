"""Dual-stream scheduling on CPU (streams are a no-op there): which forks move onto two streams, what
must stay on one, and that the outlined graph, its branches compiled by Inductor, equals the original."""

from __future__ import annotations

import copy
import operator
import os

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

import braze.testing
from braze import FusionConfig, TokenRange
from braze.passes import streams as stream_pass
from braze.passes.branches import BranchAnalysis, decide, find_forks
from braze.passes.streams import DualStream, outline, why_not_outlined
from braze.runtime import streams
from braze.testing import aten_graph, run_passes

ON = FusionConfig(dual_stream=True)


@pytest.fixture(autouse=True)
def outline_cpu_graphs(monkeypatch):
    """These tests check the rewrite on CPU graphs, which the pass leaves alone outside tests."""
    monkeypatch.setattr(stream_pass, "ON_CPU", True)


def frozen(*shape: int, seed: int = 0) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), requires_grad=False)


def two_heavy_branches(x, wa, wb, wc):
    """Two chains of small kernels (launch-bound at 4 tokens) from one fork: overlap pays by the model."""
    h = x * 2.0
    a = F.linear(F.linear(h, wa).softmax(-1), wc).softmax(-1)
    a = F.linear(a.softmax(-1), wc.t()).softmax(-1).cumsum(-1)
    b = torch.softmax(F.linear(h.tanh(), wb), -1).cumsum(-1)
    b = (b - b.mean(-1, keepdim=True)).softmax(-1).cumsum(-1).softmax(-1)
    return a.sum(-1) + b.sum(-1), b


ARGS = (torch.randn(4, 16), frozen(64, 16, seed=1), frozen(32, 16, seed=2), frozen(16, 64, seed=3))


def ops(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def test_overlapped_branches_equal_the_original():
    gm = aten_graph(two_heavy_branches, *ARGS)
    want = gm(*ARGS)
    record = run_passes(gm, ON, (DualStream,), inputs=ARGS)
    (r,) = record.remarks
    assert r.kind == "applied" and r.name == "dual-stream"
    args = dict(r.args)
    assert args["stream1"][0] == "tanh" and "mm" in args["stream0"]  # the softmax chain is the smaller branch
    assert ops(gm).count("braze.parallel_branches.default") == 1
    assert "aten.mm.default" not in ops(gm)  # both branches moved into the op
    got = gm(*ARGS)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_the_same_branches_in_two_layers_are_one_spec_compiled_once():
    """Each layer's outlined branches are named by position, so identical layers give the op identical specs and
    it compiles each branch once for all of them (its cache is keyed by the spec and the input shapes)."""
    def layer(x, wa, wb, wc):
        h = x * 2.0
        a = F.linear(F.linear(h, wa).softmax(-1), wc).softmax(-1).cumsum(-1)  # [4, 16]
        b = torch.softmax(F.linear(h.tanh(), wb), -1).cumsum(-1).softmax(-1).cumsum(-1)  # [4, 32]
        return a + b[:, :16]

    def two_layers(x, wa, wb, wc, va, vb, vc):
        return layer(layer(x, wa, wb, wc), va, vb, vc)

    args = ARGS + (frozen(64, 16, seed=4), frozen(32, 16, seed=5), frozen(16, 64, seed=6))
    gm = aten_graph(two_layers, *args)
    want = gm(*args)
    run_passes(gm, ON, (DualStream,), inputs=args)
    specs = [n.args[0] for n in gm.graph.nodes if n.target is torch.ops.braze.parallel_branches.default]
    assert len(specs) == 2 and specs[0] == specs[1]
    torch.testing.assert_close(gm(*args), want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(os.environ.get("BRAZE_COMPILE_BRANCH_TEST") != "1",
                    reason="opt-in (two Inductor CPU compiles, ~100 s on 2 cores): BRAZE_COMPILE_BRANCH_TEST=1")
def test_overlapped_branches_compiled_by_inductor_on_cpu_equal_the_original(monkeypatch):
    monkeypatch.setattr(streams, "COMPILE_ON_CPU", True)
    gm = aten_graph(two_heavy_branches, *ARGS)
    want = gm(*ARGS)
    run_passes(gm, ON, (DualStream,), inputs=ARGS)
    assert ops(gm).count("braze.parallel_branches.default") == 1
    before = len(streams._compiled)
    got = gm(*ARGS)
    assert len(streams._compiled) == before + 2  # both branches went through Inductor
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_on_by_default_off_with_one_switch_and_outside_the_token_range():
    gm = aten_graph(two_heavy_branches, *ARGS)
    assert not run_passes(gm, FusionConfig(dual_stream=False), (DualStream,), inputs=ARGS).remarks
    assert "braze.parallel_branches.default" not in ops(gm)
    (r,) = run_passes(copy.deepcopy(gm), FusionConfig(), (DualStream,), inputs=ARGS).remarks
    assert r.kind == "applied" and r.name == "dual-stream"
    narrow = FusionConfig(dual_stream=True, token_ranges={"dual_stream": TokenRange(8, 64)})
    (r,) = run_passes(gm, narrow, (DualStream,), inputs=ARGS).remarks
    assert r.kind == "missed" and "4 tokens is outside the configured range [8, 64]" in r.reason
    assert "braze.parallel_branches.default" not in ops(gm)


def test_a_cpu_graph_stays_on_one_stream_outside_tests(monkeypatch):
    monkeypatch.setattr(stream_pass, "ON_CPU", False)
    gm = aten_graph(two_heavy_branches, *ARGS)
    record = run_passes(gm, ON, (DualStream,), inputs=ARGS)
    (r,) = record.remarks
    assert r.kind == "missed" and r.name == "dual-stream"
    assert r.reason == "the graph runs on the CPU, which has no second stream to overlap them on"
    assert "braze.parallel_branches.default" not in ops(gm)


def test_a_branch_that_writes_in_place_stays_on_one_stream():
    def fn(x, wa, wb, wc, buf):
        out, b = two_heavy_branches(x, wa, wb, wc)
        buf.add_(b)  # an in-place update at the end of the side branch (functionalized: copy_ into `buf`)
        return out

    args = (*ARGS, torch.zeros(4, 32))
    gm = aten_graph(fn, *args)
    (fork,) = find_forks(gm.graph)
    reasons = [why_not_outlined(b) for b in fork.branches]
    assert any("writes in place" in why for why in reasons)
    (r,) = run_passes(gm, ON, (DualStream,), inputs=args).remarks
    assert r.kind == "missed" and "writes in place" in r.reason


def test_a_branch_that_communicates_stays_on_one_stream():
    """Collectives keep one order on every rank and braze's fused ones share a workspace per group: never
    on a side stream."""
    import torch.distributed._functional_collectives as funcol

    from braze.testing import single_rank_group

    with single_rank_group() as group:
        def fn(x, wa, wb, wc):
            h = x * 2.0
            a = F.linear(F.linear(h, wa).softmax(-1), wc).softmax(-1)
            a = F.linear(a.softmax(-1), wc.t()).softmax(-1).cumsum(-1)
            b = torch.softmax(F.linear(h.tanh(), wb), -1)
            b = funcol.all_reduce(b, "sum", group).cumsum(-1).softmax(-1)
            return a.sum(-1) + b.sum(-1)

        gm = aten_graph(fn, *ARGS)
        (fork,) = find_forks(gm.graph)
        assert any("communicates across ranks" in why_not_outlined(b) for b in fork.branches)
        remarks = run_passes(gm, ON, (DualStream,), inputs=ARGS).remarks
        assert not [r for r in remarks if r.kind == "applied"]
        missed = [r for r in remarks if r.kind == "missed"]
        assert missed and all("communicates across ranks" in r.reason for r in missed)


def test_a_branch_with_symbolic_sizes_stays_on_one_stream():
    from torch._inductor.decomposition import select_decomp_table

    with torch.no_grad():
        gm = make_fx(two_heavy_branches, decomposition_table=select_decomp_table(), tracing_mode="symbolic")(*ARGS)
    (fork,) = find_forks(gm.graph)
    assert all("symbolic sizes" in why_not_outlined(b) for b in fork.branches)


def test_outline_takes_external_inputs_and_returns_values_used_outside():
    gm = aten_graph(two_heavy_branches, *ARGS)
    (fork,) = find_forks(gm.graph)
    side = fork.branches[-1]
    sub, inputs, outputs, calls = outline(side.nodes)
    assert calls == stream_pass.TritonCalls()  # no Triton kernel call in it
    assert [n.name for n in inputs] == ["mul", "permute_4"]  # the fork and the transposed weight (a view)
    assert {u.name for o in outputs for u in o.users} >= {"add"}  # the join reads the side branch's last sum
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 2


def _kernel_call_branch(kernel: object, block: int = 64) -> tuple[torch.fx.Graph, tuple[torch.fx.Node, ...]]:
    """A graph calling `kernel` on 8 values as a traced braze op leaves it (side-table indices of its own)."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table, triton_kernel_wrapper_functional

    g = torch.fx.Graph()
    x, out = g.placeholder("x"), g.placeholder("out")
    for p in (x, out):
        p.meta["val"] = torch.empty(8)
    k = g.call_function(triton_kernel_wrapper_functional, kwargs={
        "kernel_idx": kernel_side_table.add_kernel(kernel),
        "constant_args_idx": kernel_side_table.add_constant_args({"n": 8, "BLOCK": block}),
        "grid": [(1, 1, 1)], "tma_descriptor_metadata": {}, "kwargs": {"x_ptr": x, "out_ptr": out},
        "tensors_to_clone": ["out_ptr"]})
    k.meta["val"] = {"out_ptr": torch.empty(8)}
    r = g.call_function(operator.getitem, (k, "out_ptr"))
    r.meta["val"] = torch.empty(8)
    g.output((r,))
    return g, (k, r)


def _spec(kernel: object, block: int = 64) -> str:
    """The op's spec for main = the kernel call, side = x + 1."""
    _, nodes = _kernel_call_branch(kernel, block)
    main, _, _, calls = outline(nodes)
    g = torch.fx.Graph()
    x = g.placeholder("x")
    g.output((g.call_function(torch.ops.aten.add.Tensor, (x, 1.0)),))
    meta = [{"shape": [8], "stride": [1], "dtype": "float32"}] * 2
    return streams.encode_spec(main, torch.fx.GraphModule(torch.nn.Module(), g), [0, 1], [0], meta, calls)


# A kernel as braze's kernel cache generates them: a module `braze_kernels.<name>` loaded from a file.
GENERATED = """import triton
import triton.language as tl


@triton.jit
def braze_test_double(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2.0, mask=offs < n)
"""


def _generated_kernel() -> object:
    from braze.codegen.cache import load_generated

    return load_generated("braze_kernels.braze_test_double", GENERATED).braze_test_double


def _runs_the_kernel(spec: str) -> None:
    x = torch.randn(8)
    got, side = torch.ops.braze.parallel_branches(spec, [x, torch.full((8,), float("nan"))])
    torch.testing.assert_close(got, x * 2.0)  # the kernel ran (Triton's interpreter on CPU), with BLOCK=64
    torch.testing.assert_close(side, x + 1.0)


def _wrapped(fn=braze.testing.double_kernel, warps: int = 4, **kw):
    """The kernel as torch wraps it for a launch with `num_warps`: a new single-config autotuner per trace."""
    return triton.autotune(configs=[triton.Config({}, num_warps=warps)], key=[], **kw)(fn)


def test_identical_triton_kernel_calls_give_one_spec_whatever_their_side_table_indices():
    """Each trace of a braze op enters its kernel's constants in Inductor's side table again, and a launch with
    `num_warps` a new autotuner around its kernel, so two identical layers' calls differ in both indices. The
    spec names kernels and constants by what they are: identical calls give one spec (one compile), other
    constants or configs another."""
    kernel = braze.testing.double_kernel
    same = [_spec(kernel), _spec(kernel)]
    assert same[0] == same[1]
    assert _spec(kernel, block=32) != same[0]
    assert _spec(_wrapped()) == _spec(_wrapped()) != same[0]
    assert _spec(_wrapped(warps=8)) != _spec(_wrapped())
    _runs_the_kernel(same[1])
    _runs_the_kernel(_spec(_wrapped()))
    assert _spec(_wrapped(_generated_kernel())) == _spec(_wrapped(_generated_kernel())) != _spec(_wrapped())
    _runs_the_kernel(_spec(_wrapped(_generated_kernel())))


def test_a_spec_runs_after_the_side_table_is_emptied():
    """`torch._dynamo.reset()` empties the side table, and the next trace numbers its entries from 0 again (here
    a kernel that negates and other constants take the first indices): the op enters the spec's kernel and
    constants anew, so the branch still runs the doubling kernel with BLOCK=64."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    @triton.jit
    def negate(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, -tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

    spec = _spec(_wrapped())
    _runs_the_kernel(spec)
    torch._dynamo.reset()
    kernel_side_table.add_kernel(negate)
    kernel_side_table.add_constant_args({"n": 2, "BLOCK": 2})
    _runs_the_kernel(spec)


def test_a_spec_runs_in_another_process():
    """Inductor's FX graph cache replays the outer graph, spec included, in a process where braze's passes never
    ran: the spec alone must find the kernel and its constants there."""
    import json
    import subprocess
    import sys

    specs = [_spec(_wrapped()), _spec(_wrapped(_generated_kernel()))]  # the second kernel braze generated
    code = ("import json, sys, torch, braze.runtime.streams\n"
            "x = torch.arange(8.0)\n"
            "for spec in json.load(sys.stdin):\n"
            "    got, side = torch.ops.braze.parallel_branches(spec, [x, torch.full((8,), float('nan'))])\n"
            "    assert torch.equal(got, x * 2) and torch.equal(side, x + 1), (got, side)\n"
            "assert 'braze_kernels.braze_test_double' in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(specs), capture_output=True, text=True,
                         check=False, env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_a_buffer_the_branch_creates_stays_a_call_in_the_spec():
    """A Triton kernel's output buffer made inside the branch (`empty`, as a traced braze op makes it) must stay
    a call when the op loads the spec: GraphModule's own pickle traced the code again and turned it into a
    constant tensor, which Inductor then passed in as an input and copied before every launch."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table, triton_kernel_wrapper_functional

    g = torch.fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(8)
    out = g.call_function(torch.ops.aten.empty.memory_format, ([8],),
                          {"dtype": torch.float32, "device": torch.device("cpu"), "pin_memory": False})
    k = g.call_function(triton_kernel_wrapper_functional, kwargs={
        "kernel_idx": kernel_side_table.add_kernel(braze.testing.double_kernel),
        "constant_args_idx": kernel_side_table.add_constant_args({"n": 8, "BLOCK": 64}),
        "grid": [(1, 1, 1)], "tma_descriptor_metadata": {}, "kwargs": {"x_ptr": x, "out_ptr": out},
        "tensors_to_clone": ["out_ptr"]})
    r = g.call_function(operator.getitem, (k, "out_ptr"))
    r.meta["val"] = torch.empty(8)
    g.output((r,))
    main, *_, calls = outline(tuple(n for n in g.nodes if n.op == "call_function"))
    side = torch.fx.symbolic_trace(lambda y: (y + 1.0,))
    meta = [{"shape": [8], "stride": [1], "dtype": "float32"}] * 2
    spec = streams.encode_spec(main, side, [0], [0], meta, calls)
    import json

    loaded = streams.decode_graph(json.loads(spec)["main"])
    assert not [n for n in loaded.graph.nodes if n.op == "get_attr"]
    assert [n.target for n in loaded.graph.nodes if n.op == "call_function"][0] == torch.ops.aten.empty.memory_format
    got, plus_one = torch.ops.braze.parallel_branches(spec, [torch.arange(8.0)])
    assert torch.equal(got, torch.arange(8.0) * 2) and torch.equal(plus_one, torch.arange(8.0) + 1)


def test_a_spec_encodes_operators_passed_as_arguments():
    """`with_effects(token, op, ...)` passes an operator as an argument; operators do not pickle, so the spec
    names them as it names node targets."""
    g = torch.fx.Graph()
    token, x = g.placeholder("token"), g.placeholder("x")
    call = g.call_function(torch.ops.higher_order.with_effects, (token, torch.ops.aten.mm.default, x, [x]),
                           {"op": torch.ops.higher_order.triton_kernel_wrapper_functional, "s": slice(0, 2)})
    g.output((call,))
    loaded = streams.decode_graph(streams.encode_graph(torch.fx.GraphModule(torch.nn.Module(), g)))
    (got,) = [n for n in loaded.graph.nodes if n.op == "call_function"]
    assert got.target is torch.ops.higher_order.with_effects and got.args[1] is torch.ops.aten.mm.default
    assert [a.name for a in (got.args[0], got.args[2], got.args[3][0])] == ["token", "x", "x"]
    assert got.kwargs == {"op": torch.ops.higher_order.triton_kernel_wrapper_functional, "s": slice(0, 2)}


def test_a_kernel_no_other_process_can_find_is_not_outlined():
    """A kernel made at run time (not a module-level `@triton.jit` function), or a wrapper whose hooks would not
    survive the trip, keeps its branch on one stream, with the reason."""
    from braze.passes.streams import why_not_portable

    @triton.jit
    def local(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        pass

    assert "made at run time" in why_not_portable(_kernel_call_branch(local)[1][0])
    assert "hooks" in why_not_portable(_kernel_call_branch(_wrapped(reset_to_zero=["out_ptr"]))[1][0])
    assert why_not_portable(_kernel_call_branch(_wrapped())[1][0]) == ""
    with pytest.raises(ValueError, match="made at run time"):
        outline(_kernel_call_branch(local)[1])


def test_through_the_backend_inductor_launches_the_op_and_the_report_lists_the_side_stream():
    from torch._inductor.utils import run_and_get_code

    import braze

    torch._dynamo.reset()
    be = braze.backend(ON)
    with torch.no_grad():
        out, code = run_and_get_code(torch.compile(two_heavy_branches, backend=be, fullgraph=True), *ARGS)
    torch._dynamo.reset()
    assert "torch.ops.braze.parallel_branches.default(" in "\n".join(code)
    for got, want in zip(out, two_heavy_branches(*ARGS)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    report = braze.report(be)
    assert [r.name for r in report.applied] == ["dual-stream"]
    (nodes,) = report.side_stream_nodes().values()
    assert nodes[:2] == ["tanh", "mm_3"] and len(nodes) == 22


# -- a mixture of experts: the router beside the shared expert --------------------------------------


def moe_layer(x, wg, w13, w2, ws13, ws2, scale_late=False, shared_first=False):
    """Router -> routed experts, and a shared expert, from one activation (DeepSeek V3.2's MoE in small).
    The shared expert is written after the routed one, as the models do, so the views of its weights come
    after work that reads the router's outputs in the traced graph (unless `shared_first`)."""
    h = x * 2.0  # the fork (the post-attention norm's output)
    t, k = h.shape[0], 2
    if shared_first:
        shared = F.linear(F.silu(F.linear(h, ws13)), ws2)
    weights, idx = F.linear(h, wg).softmax(-1).topk(k, -1)  # router: [T, k] each
    order = idx.flatten().argsort(stable=True)
    ends = (idx.flatten()[:, None] == torch.arange(wg.shape[0], device=h.device)).sum(0).cumsum(0)  # [E] group ends, as for grouped GEMMs
    ys = F.linear(F.relu(F.linear(h[order // k], w13)), w2)[order.argsort()].view(t, k, -1)
    routed = (ys * weights.unsqueeze(-1)).sum(1) * (ends[-1] / (t * k))  # reads the fork and the router (ends[-1] = T·k)
    if not shared_first:
        shared = F.linear(F.silu(F.linear(h, ws13)), ws2 * 2.0 if scale_late else ws2)
    return routed + 0.5 * shared  # (a plain `routed + mm` would become one addmm: the join)


MOE_ARGS = (torch.randn(1, 256), frozen(8, 256, seed=1), frozen(64, 256, seed=2), frozen(256, 64, seed=3),
            frozen(16384, 256, seed=4), frozen(256, 16384, seed=5))


def test_the_router_runs_beside_the_shared_expert_once_the_weight_views_move_before_them():
    gm = aten_graph(moe_layer, *MOE_ARGS)
    want = gm(*MOE_ARGS)
    late = next(n for n in gm.graph.nodes if n.name == "permute_4")  # the shared down-projection's weight view
    (r,) = run_passes(gm, ON, (DualStream,), inputs=MOE_ARGS).remarks
    assert r.kind == "applied" and r.name == "dual-stream", r.reason
    args = dict(r.args)
    assert args["stream1"] == ["mm_3", "neg", "exp_1", "add", "div_3", "mm_4", "mul_3"]  # the shared expert
    assert args["stream0"][:3] == ["mm", "amax", "sub"] and len(args["stream0"]) == 24  # the router (launch-bound)
    assert {"topk", "sort", "cumsum", "iota", "sort_1"} <= set(args["stream0"])  # the iota moved into its branch
    assert r.message.startswith("7 nodes from `mm_3` (mm.default) run on the side stream beside 24 nodes from `mm`")
    assert r.message.endswith("saves ~10.1 us (serial ~30.1 us, overlapped ~20.0 us by the model)")
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    (call,) = [n for n in gm.graph.nodes if n.target is torch.ops.braze.parallel_branches.default]
    assert late in call.args[1] and order[late] < order[call]
    index = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.index.Tensor)
    assert order[call] < order[index]  # the routed experts read the router's outputs from the op
    torch.testing.assert_close(gm(*MOE_ARGS), want, rtol=0, atol=0)


def test_a_weight_computed_after_the_routed_experts_keeps_the_branches_on_one_stream():
    fn = lambda *a: moe_layer(*a, scale_late=True)
    gm = aten_graph(fn, *MOE_ARGS)
    want = gm(*MOE_ARGS)
    (r,) = run_passes(gm, ON, (DualStream,), inputs=MOE_ARGS).remarks
    assert (r.kind, r.name) == ("missed", "dual-stream")
    assert r.reason == ("`index` (index.Tensor) uses a branch value before `permute_4` (permute.default), which a "
                        "branch reads, is computed (braze moves only views, dtype casts and creation ops of earlier values)")
    assert "braze.parallel_branches.default" not in ops(gm)
    torch.testing.assert_close(gm(*MOE_ARGS), want, rtol=0, atol=0)


def test_a_weight_written_in_place_between_fork_and_use_keeps_the_branches_on_one_stream():
    gm = aten_graph(moe_layer, *MOE_ARGS)
    w_down = [n for n in gm.graph.nodes if n.op == "placeholder"][5]  # the shared expert's down weight
    index = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.index.Tensor)
    with gm.graph.inserting_before(index):  # doubled in place after the router, before the shared expert reads it
        gm.graph.call_function(torch.ops.aten.mul_.Tensor, (w_down, 2.0)).meta["val"] = w_down.meta["val"]
    gm.recompile()
    fresh = lambda: [a.clone() if isinstance(a, torch.Tensor) else a for a in MOE_ARGS]
    want = gm(*fresh())
    (r,) = run_passes(gm, ON, (DualStream,), inputs=MOE_ARGS).remarks
    assert (r.kind, r.name) == ("missed", "dual-stream")
    assert r.reason == ("`mul__tensor` (mul_.Tensor) writes in place into `permute_4` (permute.default), which a branch "
                        "reads, between where the branches would run and where they ran")
    torch.testing.assert_close(gm(*fresh()), want, rtol=0, atol=0)


def test_a_cast_of_the_fork_stays_outside_only_where_a_generated_kernel_computes_the_fork():
    from braze.passes.branches import Branch
    from braze.passes.cost import Cost
    from braze.passes.streams import without_fused_casts

    def f(x, w):
        h = x * 2.0  # pointwise: Inductor's kernel can write the fp64 copy too
        m = x @ w  # a GEMM: the cast would be a kernel of its own either way
        return h.to(torch.float64).exp(), m.to(torch.float64).exp()

    gm = aten_graph(f, torch.randn(4, 4), torch.randn(4, 4))
    casts = [n for n in gm.graph.nodes if n.target is torch.ops.prims.convert_element_type.default]
    for cast in casts:
        branch = Branch(cast, (cast, *cast.users), Cost())
        kept = without_fused_casts(branch, cast.args[0])
        assert kept == (branch if cast.args[0].target is torch.ops.aten.mm.default else
                        Branch(next(iter(cast.users)), tuple(cast.users), Cost()))
    with gm.graph.inserting_after(casts[0]):  # to another device: not a dtype cast, it stays in the branch
        moved = gm.graph.call_function(torch.ops.aten._to_copy.default, (casts[0].args[0],), {"device": "meta"})
    branch = Branch(moved, (moved, *casts[0].users), Cost())
    assert without_fused_casts(branch, casts[0].args[0]) == branch


def _late_cast_branches(x, wa, wb, wc, scale):
    """two_heavy_branches, the smaller branch scaled by `scale` cast to fp32 just before its use."""
    h = x * 2.0
    a = F.linear(F.linear(h, wa).softmax(-1), wc).softmax(-1)
    a = F.linear(a.softmax(-1), wc.t()).softmax(-1).cumsum(-1)
    b = torch.softmax(F.linear(h.tanh(), wb), -1).cumsum(-1)
    b = (b - b.mean(-1, keepdim=True)).softmax(-1).cumsum(-1) * scale.to(torch.float32)
    return a.sum(-1) + b.sum(-1), b


def test_a_cast_moves_before_the_branches_unless_its_input_is_written_in_place_in_between():
    """A dtype cast of an earlier value moves before the branches like a view, but it copies: moved before a
    write in place into its input it would read the old value, so then the branches stay on one stream."""
    args = ARGS + (torch.randn(32, dtype=torch.bfloat16),)
    fresh = lambda: [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    gm = aten_graph(_late_cast_branches, *args)
    want = gm(*fresh())
    (r,) = run_passes(copy.deepcopy(gm), ON, (DualStream,), inputs=args).remarks
    assert r.kind == "applied"  # the cast, computed after the branches' first node, moved before it
    scale = [n for n in gm.graph.nodes if n.op == "placeholder"][4]
    cast = next(n for n in scale.users if n.target is torch.ops.prims.convert_element_type.default)
    with gm.graph.inserting_before(cast):
        gm.graph.call_function(torch.ops.aten.mul_.Tensor, (scale, 3.0)).meta["val"] = scale.meta["val"]
    gm.recompile()
    want = gm(*fresh())
    (r,) = run_passes(gm, ON, (DualStream,), inputs=args).remarks
    assert (r.kind, r.name) == ("missed", "dual-stream")
    assert r.reason == (f"`mul__tensor` (mul_.Tensor) writes in place into `{cast.name}` (convert_element_type.default), "
                        "which a branch reads, between where the branches would run and where they ran")
    for g, w in zip(gm(*fresh()), want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@settings(max_examples=8, deadline=None)
@given(tokens=st.sampled_from([1, 3]), width=st.sampled_from([256, 257, 384]),
       layout=st.sampled_from(["shared-last", "shared-first", "weight-computed-late"]))
def test_moe_variants_overlap_exactly_when_every_late_input_can_move(tokens, width, layout):
    """shared-last: the weight views come late and move; shared-first: nothing to move; a down weight
    computed after the routed experts cannot move, so the branches stay on one stream. Results equal."""
    args = (torch.randn(tokens, width), frozen(8, width, seed=1), frozen(64, width, seed=2), frozen(width, 64, seed=3),
            frozen(16384, width, seed=4), frozen(width, 16384, seed=5))
    fn = lambda *a: moe_layer(*a, scale_late=layout == "weight-computed-late",
                              shared_first=layout == "shared-first")
    gm = aten_graph(fn, *args)
    want = gm(*args)
    (fork,) = find_forks(gm.graph)
    assert decide(fork).kind.endswith("overlap")  # the cost model's call, the same for every layout
    (r,) = run_passes(gm, ON, (DualStream,), inputs=args).remarks
    assert (r.kind, r.name) == (("missed" if layout == "weight-computed-late" else "applied"), "dual-stream")
    assert ops(gm).count("braze.parallel_branches.default") == (r.kind == "applied")
    torch.testing.assert_close(gm(*args), want, rtol=0, atol=0)


def test_deepseek_moe_router_beside_the_shared_expert():
    """DeepSeek V3.2 tiny at one token, bf16 (the sparse grouped-GEMM expert path), its shared expert widened
    so that, as at the bench size, the cost model finds overlapping it with the router worthwhile."""
    import copy

    from braze import models
    from braze.models.deepseek_v32 import DeepseekV32Config, DeepseekV32ForCausalLM
    from braze.testing import post_grad_graph

    cfg = DeepseekV32Config.tiny().replace(n_shared_experts=96)  # shared expert 256 -> 12288 -> 256
    model = DeepseekV32ForCausalLM(cfg, device="cpu", dtype=torch.bfloat16, max_batch=1, max_context=32)
    gm, example = post_grad_graph(model, models.make_decode_inputs(model, 1, 8, torch.Generator().manual_seed(0)))
    # the same passes on one stream: what the two-stream graph must equal bit for bit (braze's fused kernels sum
    # in their own order, so the unfused graph is only close)
    serial = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    run_passes(serial, FusionConfig(gemm_merge=True, dual_stream=False, router=False), inputs=example)
    want = serial(*example)
    gm = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    # the router unfused (its three top-ks, gathers and group mask) is the branch whose overlap with the shared
    # expert this test is about; fused (FusionConfig.router) it is one GEMM and one kernel, and the cost model
    # finds no overlap worth a second stream in this graph
    record = run_passes(gm, FusionConfig(gemm_merge=True, dual_stream=True, router=False), inputs=example)
    (fork,) = [r for r in record.remarks if r.name == "independent-branches" and "overlap" in dict(r.args)["decision"]]
    assert fork.location == "layers.1.post_attention_layernorm"
    # the routed experts are fused (moe-experts), so the router's branch ends at their op
    assert fork.message == (
        "2 independent branches from `mul_64` (mul.Tensor) to `moe_experts_cpu` (moe_experts_cpu.default): overlap: "
        "the smaller branch beside the larger saves ~5.7 us (serial ~21.7 us, overlapped ~16.0 us by the model)")
    (r,) = [r for r in record.remarks if r.pass_name == "dual-stream"]
    assert r.kind == "applied" and r.location == "layers.1.post_attention_layernorm"
    assert r.message == (
        "11 nodes from `mm_13` (mm.default) run on the side stream beside 24 nodes from `mm_12` (mm.default) (both "
        "compiled by Inductor); the smaller branch beside the larger saves "
        "~5.7 us (serial ~21.7 us, overlapped ~16.0 us by the model)")
    args = dict(r.args)
    assert args["side_head"] == "layers.1.mlp.shared_expert.gate_up_proj"
    assert args["stream1"][0] == "mm_13" and args["stream1"][-1] == "mm_14"  # gate_up ... down projection
    assert {"mm_12", "gather_2", "div_19"} <= set(args["stream0"])  # the router
    # the router's fp32 cast of the normed input stays in the outer graph, where Inductor computes it in the
    # norm's kernel; outlined it would be a kernel of its own
    assert "convert_element_type_120" not in args["stream0"] and "convert_element_type_120" in {n.name for n in gm.graph.nodes}
    assert sum(name.startswith("topk_cpu") for name in args["stream0"]) == 3  # its three top-k (small-topk)
    assert ops(gm).count("braze.parallel_branches.default") == 1
    got = gm(*example)
    for g, w in zip(got, want):
        assert torch.equal(g, w)  # on CPU the branches run as the same ATen ops: bit for bit


def test_through_the_backend_the_moe_router_and_shared_expert_take_two_streams():
    """CPU twin of the GPU MoE test: braze's whole pass pipeline (canonicalize first) still finds the overlap."""
    import braze

    torch._dynamo.reset()
    be = braze.backend(FusionConfig(dual_stream=True, gemm_merge=False))
    with torch.no_grad():
        out = torch.compile(moe_layer, backend=be, fullgraph=True)(*MOE_ARGS)
    torch._dynamo.reset()
    # fp32: Inductor's CPU kernels (vectorized, threaded) sum in another order than eager; one value of 256 came
    # out 1.3e-5 relative (1.2e-4 at 9.2) off in a CI run of session 16, and once under load before
    torch.testing.assert_close(out, moe_layer(*MOE_ARGS), rtol=1e-4, atol=1e-4)
    (r,) = [r for r in braze.report(be).applied if r.pass_name == "dual-stream"]
    assert r.name == "dual-stream" and dict(r.args)["stream1"][0] == "mm_3"


def shared_beside_routed(x, wg, wbig, ws1, ws2, buf=None):
    """A MoE-shaped fork: a small router, routed work that reads the fork and the router (its first node joins
    them), and a shared expert joined at the end. The routed GEMM's weight is `wbig`: at 64 MB it streams long
    enough for the shared expert to hide beside it, which running it beside the router alone cannot."""
    h = x * 2.0
    r = F.linear(torch.tanh(h), wg).softmax(-1)  # the router
    if buf is not None:
        buf.add_(r)  # an in-place update in the router's branch (functionalized: copy_ into `buf`)
    routed = F.linear(h * r.sum(-1, keepdim=True), wbig)
    shared = F.linear(F.silu(F.linear(h, ws1)), ws2)
    return routed[:, :256] + shared


def _pairing_args(n: int, in_place: bool = False, shared: int = 16384) -> tuple:
    return (torch.randn(1, 256), frozen(8, 256, seed=1), frozen(n, 256, seed=2), frozen(shared, 256, seed=3),
            frozen(256, shared, seed=4), *((torch.zeros(1, 8),) if in_place else ()))


def test_the_shared_expert_runs_beside_the_router_and_the_routed_work():
    args = _pairing_args(65536)
    gm = aten_graph(shared_beside_routed, *args)
    want = gm(*args)
    (fork,) = find_forks(gm.graph)
    (p,) = fork.pairings  # the shared expert beside the rest (the router beside the rest is the shared expert)
    assert p.side.head.name == "mm_2" and p.join.name == "add_1"
    assert [n.name for n in p.rest.nodes] == ["tanh", "mm", "amax", "sub", "exp", "sum_1", "div", "sum_2", "mul_1",
                                              "mm_1", "slice_1"]  # the router, the join and the routed GEMM
    record = run_passes(gm, ON, (BranchAnalysis, DualStream), inputs=args)
    analysis, r = record.remarks
    assert dict(analysis.args)["decision"] == "overlap" and dict(analysis.args)["pairing"] == {
        "side": "`mm_2` (mm.default)", "rest_head": "`tanh` (tanh.default)", "rest_nodes": 11, "rest_kernels": 5,
        "rest_est_us": dict(analysis.args)["pairing"]["rest_est_us"], "join": "`add_1` (add.Tensor)"}
    assert r.kind == "applied" and r.name == "dual-stream", r.reason
    assert r.message == (
        "6 nodes from `mm_2` (mm.default) run on the side stream beside 11 nodes from `tanh` (tanh.default) (both "
        "compiled by Inductor); the branch from `mm_2` (mm.default) beside the rest of the region (11 nodes from "
        "`tanh` (tanh.default) up to `add_1` (add.Tensor)) saves ~10.0 us (serial ~44.2 us, overlapped ~34.2 us by "
        "the model; the smallest branch beside the largest: ~4.0 us)")
    args_ = dict(r.args)
    assert args_["stream1"] == ["mm_2", "neg", "exp_1", "add", "div_1", "mm_3"]  # the shared expert
    assert args_["stream0"] == [n.name for n in p.rest.nodes]  # router, join, routed GEMM on the current stream
    assert ops(gm).count("braze.parallel_branches.default") == 1 and "aten.mm.default" not in ops(gm)
    torch.testing.assert_close(gm(*args), want, rtol=0, atol=0)


@settings(max_examples=8, deadline=None)
@given(n=st.sampled_from([512, 65536]), in_place=st.booleans())
def test_a_branch_pairs_with_the_rest_of_the_region_only_where_it_pays_and_can_be_outlined(n, in_place):
    """The shared expert goes beside the router and the routed work where the routed GEMM streams long enough
    (64 MB) and nothing in the region writes in place; else the single branches' decision stands (the router
    beside the shared expert, which saves ~4 us by the model, or one stream where a branch writes in place)."""
    args = _pairing_args(n, in_place)
    fresh = lambda: [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    gm = aten_graph(shared_beside_routed, *fresh())
    want = gm(*fresh())
    (fork,) = find_forks(gm.graph)
    decision = decide(fork)
    assert (decision.pairing is not None) == (n == 65536 and not in_place)
    assert not in_place or not fork.pairings  # a region that writes in place is never offered as a rest
    (r,) = run_passes(gm, ON, (DualStream,), inputs=args).remarks
    if in_place:
        assert (r.kind, r.name) == ("missed", "dual-stream") and "writes in place" in r.reason
    else:
        assert r.kind == "applied" and ("beside the rest of the region" in r.message) == (n == 65536)
    torch.testing.assert_close(gm(*fresh()), want, rtol=0, atol=0)


def _in_layer(gm, outside: set[str] = frozenset()):
    """Tag every call with a module path in layers.0 (the names in `outside`: layers.1)."""
    for n in gm.graph.nodes:
        if n.op == "call_function":
            n.meta["nn_module_stack"] = {"m": ("layers.1.x" if n.name in outside else "layers.0.mlp", torch.nn.Module)}


def test_no_pairing_when_a_join_outside_the_layer_could_feed_the_rest():
    """The shared expert's join with the routed work sits in another layer; a node of the rest reads it through a
    node the walk does not follow (outside the layer). The rest is then not known: no pairing is offered."""
    def fn(x, wg, wbig, ws1, ws2):
        h = x * 2.0
        r = F.linear(torch.tanh(h), wg).softmax(-1)
        routed = F.linear(h * r.sum(-1, keepdim=True), wbig)
        shared = F.linear(F.silu(F.linear(h, ws1)), ws2)
        joined = routed[:, :256] + shared
        return joined, (joined * 0.5).sum() + r.sum()  # reads the join (the side) and the router

    args = _pairing_args(65536)
    gm = aten_graph(fn, *args)
    join = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.add.Tensor and n.name == "add_1")
    _in_layer(gm, {join.name})
    want = gm(*args)
    (fork,) = find_forks(gm.graph)
    assert fork.pairings == ()
    run_passes(gm, ON, (DualStream,), inputs=args)
    for g, w in zip(gm(*args), want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_a_pairing_that_cannot_be_outlined_falls_back_to_the_pair():
    """The model prefers the shared expert beside the rest, but the rest reads a value computed late (exp(z),
    not movable): the op cannot sit where its inputs are ready. The router beside the shared expert can."""
    def fn(x, wg, wbig, ws1, ws2, z):
        h = x * 2.0
        r = F.linear(torch.tanh(h), wg).softmax(-1)
        shared = F.linear(F.silu(F.linear(h, ws1)), ws2)
        early = r.sum() + shared.sum()  # the router meets the shared expert early
        routed = F.linear(h * r.sum(-1, keepdim=True) + torch.exp(z), wbig)
        return routed[:, :256] + shared + early

    args = (*_pairing_args(65536), torch.randn(1, 256))
    gm = aten_graph(fn, *args)
    want = gm(*args)
    (fork,) = find_forks(gm.graph)
    assert decide(fork).pairing is not None
    (r,) = run_passes(gm, ON, (DualStream,), inputs=args).remarks
    assert r.kind == "applied" and r.name == "dual-stream", r.reason
    assert "the smaller branch beside the larger saves" in r.message
    assert "the largest branch beside the rest of the region would save more, but " in r.message
    assert "uses a branch value before" in r.message  # schedule()'s reason for the pairing
    torch.testing.assert_close(gm(*args), want, rtol=0, atol=0)
