"""Independent-branch analysis: forks and joins on small graphs, the cost model's decisions, and what it
finds on the three tiny models (with gemm-merge's rewrite of them equal to the unmerged graph)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from braze import FusionConfig, models
from braze.passes.branches import Branch, BranchAnalysis, Fork, decide, find_forks
from braze.passes.cost import CARDS, H100, REFERENCE, Cost, device_model
from braze.passes.gemm_merge import SiblingGemmMerge
from braze.runtime.sibling_mm import share_rows
from braze.testing import aten_graph, post_grad_graph, run_passes

MERGE = FusionConfig(token_ranges={"gemm_merge": (1, 256)})  # the tiny models run at T > 1; the default is [1, 1]


def frozen(*shape: int) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(*shape), requires_grad=False)


def test_a_fork_into_two_gemm_branches_is_found_with_its_join_and_costs():
    def fn(x, wa, wb):
        h = x * 2.0  # the fork
        a = F.linear(h, wa).relu()  # [T, 64]
        b = torch.softmax(F.linear(h.sigmoid(), wb), -1)  # [T, 32]
        return a.sum(-1) + b.sum(-1)  # the join

    gm = aten_graph(fn, torch.randn(4, 16), frozen(64, 16), frozen(32, 16))
    (fork,) = find_forks(gm.graph)
    assert fork.fork.name == "mul" and fork.join is not None and fork.join.name == "add"
    # at 4 tokens both are launch-bound: the softmax branch (GEMM, max, sum, sum) outweighs GEMM -> relu -> sum
    b, a = fork.branches
    assert b.head.target is torch.ops.aten.sigmoid.default and (b.cost.kernels, b.cost.gemms) == (4, 1)
    assert a.head.target is torch.ops.aten.mm.default and (a.cost.kernels, a.cost.gemms) == (2, 1)
    assert a.cost.flops == 2 * 4 * 16 * 64 + 4 * 64 + 4  # the GEMM, relu [4, 64], the row sums [4]
    # the GEMM reads h [4, 16] and W [64, 16] and writes [4, 64]; relu and the row sum fuse behind it
    assert a.cost.bytes_moved >= (4 * 16 + 64 * 16 + 4 * 64) * 4
    assert {n.name for n in a.nodes}.isdisjoint({n.name for n in b.nodes})


def test_a_gemm_beside_pointwise_work_is_not_a_branch_pair():
    def fn(x, w):
        h = x * 2.0
        return F.linear(h, w) + h.sum(-1, keepdim=True)  # one heavy branch, one reduction

    gm = aten_graph(fn, torch.randn(4, 16), frozen(16, 16))
    assert find_forks(gm.graph) == []


def test_symbolic_token_counts_are_analysed_and_not_merged_when_unbounded():
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    def fn(x, wa, wb):
        h = x * 2.0
        return F.linear(h, wa).softmax(-1).sum(-1) + F.linear(h, wb).softmax(-1).sum(-1)

    args = (torch.randn(4, 16), frozen(64, 16), frozen(32, 16))
    with torch.no_grad():
        gm = make_fx(fn, decomposition_table=select_decomp_table(), tracing_mode="symbolic")(*args)
    record = run_passes(gm, MERGE, inputs=args)
    assert not [r for r in record.remarks if r.kind == "failed"]
    (fork,) = [r for r in record.remarks if r.name == "independent-branches"]
    assert dict(fork.args)["tokens"] == 4  # costs at the traced size
    (missed,) = [r for r in record.remarks if r.pass_name == "gemm-merge"]
    assert missed.name == "token-range" and "dynamic" in missed.reason


def test_decisions_follow_the_cost_model():
    gm = aten_graph(lambda x: (x * 2).relu() + 1, torch.randn(2, 2))
    node = next(iter(gm.graph.nodes))

    def fork(*costs: Cost) -> Fork:
        return Fork(node, tuple(Branch(node, (), c) for c in costs), None)

    launch_bound = Cost(bytes_moved=10_000, flops=10_000, kernels=8)  # ~16 us of launch gaps each
    d = decide(fork(launch_bound, launch_bound))
    assert d.kind == "overlap" and d.reason.startswith("the smaller branch beside the larger saves ~") \
        and d.side is not None
    tiny = Cost(bytes_moved=1_000, flops=1_000, kernels=1)
    assert decide(fork(launch_bound, tiny)).kind == "serial"  # the side branch hides almost nothing
    streaming = Cost(bytes_moved=int(H100.bandwidth * 50e-6), flops=0, kernels=1)  # 50 us of HBM traffic each
    assert decide(fork(streaming, streaming)).kind == "serial"  # both need the same bandwidth: no gain
    # DeepSeek V3.2's MoE at one token: the shared expert's 88 MB beside the router's three small kernels. The
    # reference model charges two launch gaps for the events and says serial; on the H200 a fork and a join inside
    # a CUDA graph measured ~0.3 us, so there the router hides under the expert's weight stream
    expert, router = Cost(bytes_moved=88_000_000, kernels=3), Cost(bytes_moved=500_000, kernels=3)
    assert decide(fork(expert, router)).kind == "serial"
    assert decide(fork(expert, router), CARDS["H200"]).kind == "overlap"
    assert device_model(gm.graph) is REFERENCE  # a CPU graph


# -- the three tiny models ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["deepseek-v3.2", "qwen3.5", "minimax-m2.5"])
def traced(request):
    model = models.build(request.param, "tiny", device="cpu", dtype=torch.float32)
    inputs = models.make_decode_inputs(model, 3, 8, torch.Generator().manual_seed(0))
    gm, example = post_grad_graph(model, inputs)
    return request.param, gm, example


def _forks(record) -> set[tuple[str, str, int]]:
    return {(r.location, dict(r.args)["decision"], len(dict(r.args)["branches"]))
            for r in record.remarks if r.name == "independent-branches"}


EXPECTED = {
    "deepseek-v3.2": {
        *((f"layers.{i}.input_layernorm", "merge+serial", 2) for i in (0, 1)),  # indexer wk ‖ MLA q_a/kv_a
        # the q_a/kv_a projection's q_c, kv_c and k_pe (at 3 tokens W_UK's product is no chain: chain_absorb [1, 2])
        *((f"layers.{i}.self_attn.fused_qkv_a_proj", "serial", 3) for i in (0, 1)),
        *((f"layers.{i}.self_attn.q_a_layernorm", "merge+serial", 2) for i in (0, 1)),  # q_b ‖ indexer wq_b
        # q_nope (its W_UK product) and q_pe: two chain launches (this graph's cache writes are not recognized,
        # so the chains group differently from the compiled model's one launch)
        *((f"layers.{i}.self_attn.q_b_proj", "serial", 2) for i in (0, 1)),
        # router, routed experts, shared expert: all launch-bound at this size, so the pair dual-stream would
        # outline (the smallest beside the largest) and the largest beside the rest save too little
        ("layers.1.post_attention_layernorm", "merge+serial", 3),
    },
    "qwen3.5": {
        *((f"layers.{i}.input_layernorm", "merge+serial", 2) for i in (0, 1, 2, 4, 5, 6)),  # in_proj_qkvz ‖ ba
        *((f"layers.{i}.post_attention_layernorm", "merge+serial", 4) for i in range(8)),  # + shared gate
    },
    "minimax-m2.5": {(f"layers.{i}.post_attention_layernorm", "serial", 2) for i in (0, 1)},  # no shared expert
}

MERGED = {
    "deepseek-v3.2": {(f"layers.{i}.self_attn.fused_qkv_a_proj", 2) for i in (0, 1)}
    | {(f"layers.{i}.self_attn.indexer.wq_b", 2) for i in (0, 1)} | {("layers.1.mlp.gate", 2)},
    "qwen3.5": {(f"layers.{i}.linear_attn.in_proj_qkvz", 2) for i in (0, 1, 2, 4, 5, 6)}
    | {(f"layers.{i}.mlp.gate", 3) for i in range(8)},
    "minimax-m2.5": set(),
}


def test_tiny_models_branches_and_decisions(traced):
    name, gm, example = traced
    gm = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    record = run_passes(gm, MERGE, inputs=example)
    assert _forks(record) == EXPECTED[name]
    applied = {(r.location, dict(r.args)["gemms"]) for r in record.remarks if r.name == "gemm-merge"}
    assert applied == MERGED[name]
    assert not [r for r in record.remarks if r.pass_name in ("branches", "gemm-merge") and r.kind != "analysis"
                and r.kind != "applied"]
    if name == "deepseek-v3.2":
        (indexer,) = [r for r in record.remarks
                      if r.name == "independent-branches" and r.location == "layers.0.input_layernorm"]
        heads = {b["location"] for b in dict(indexer.args)["branches"]}
        assert heads == {"layers.0.self_attn.fused_qkv_a_proj", "layers.0.self_attn.indexer.wk_weights_proj"}
        assert indexer.message == (
            "2 independent branches from `mul_1` (mul.Tensor) to `fused_heads_pure_cpu_1` "
            "(fused_heads_pure_cpu.default): merge+serial: 2 branches open with GEMMs on the same activation: "
            "one GEMM over their stacked weights reads it once and launches once (gemm-merge); overlap would "
            "save too little (serial ~18.4 us, overlapped ~20.4 us by the model)")


def test_tiny_models_merged_graph_equals_unmerged(traced):
    name, gm, example = traced
    if not MERGED[name]:
        pytest.skip(f"{name} has no sibling GEMMs")
    want = gm(*example)
    merged = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    record = run_passes(merged, MERGE, passes=(SiblingGemmMerge,), inputs=example)
    assert len(record.shared_weights) == len(MERGED[name])
    for group in record.shared_weights:
        assert share_rows([example[i] for i in group["inputs"]])[0] in ("shared", "already")
    got = merged(*example)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_branch_analysis_never_changes_the_graph(traced):
    _, gm, example = traced
    gm = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    before = gm.code
    run_passes(gm, MERGE, passes=(BranchAnalysis,), inputs=example)
    assert gm.code == before
