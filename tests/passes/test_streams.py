"""Dual-stream scheduling on CPU (streams are a no-op there): which forks move onto two streams, what
must stay on one, and that the outlined graph, its branches compiled by Inductor, equals the original."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from braze import FusionConfig, TokenRange
from braze.passes.branches import find_forks
from braze.passes.streams import DualStream, outline, why_not_outlined
from braze.runtime import streams
from braze.testing import aten_graph, run_passes

ON = FusionConfig(dual_stream=True)


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


def test_off_by_default_and_outside_the_token_range():
    gm = aten_graph(two_heavy_branches, *ARGS)
    assert not run_passes(gm, FusionConfig(), (DualStream,), inputs=ARGS).remarks
    narrow = FusionConfig(dual_stream=True, token_ranges={"dual_stream": TokenRange(8, 64)})
    (r,) = run_passes(gm, narrow, (DualStream,), inputs=ARGS).remarks
    assert r.kind == "missed" and "4 tokens is outside the configured range [8, 64]" in r.reason
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
    sub, inputs, outputs = outline(side.nodes)
    assert [n.name for n in inputs] == ["mul", "permute_4"]  # the fork and the transposed weight (a view)
    assert {u.name for o in outputs for u in o.users} >= {"add"}  # the join reads the side branch's last sum
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 2


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
