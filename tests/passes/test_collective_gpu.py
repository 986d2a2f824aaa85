"""The collective fusions on 2 or 4 GPUs: the one-shot symmetric-memory kernels against NCCL + the eager
reference over many random inputs, T from 1 to above the threshold, CUDA-graph capture, the compiled path.

Run under torchrun, one pytest per rank (skipped otherwise):

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \\
        torchrun --nproc-per-node 2 -m pytest -q -m gpu tests/passes/test_collective_gpu.py
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(int(os.environ.get("WORLD_SIZE", "1")) < 2, reason="run under torchrun with >= 2 GPUs"),
]

THRESHOLD = 64  # symm_max_tokens for these tests: T above it takes the NCCL path
TOKENS = (1, 2, 7, 64, 65, 200)


@pytest.fixture(scope="module")
def group():
    if not dist.is_initialized():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
    from braze.runtime import symm_mem

    symm_mem.prepare(dist.group.WORLD, 1 << 23)  # at set-up, on every rank: 8 MiB
    yield dist.group.WORLD
    symm_mem.release_all()


def _spec(width: int, quant: bool, dtype: str, zero_centered: bool, weight_dtype: str):
    from braze.patterns.stages import (
        Cast,
        FP8Quant,
        ResidualAdd,
        RMSNorm,
        RowChain,
        UnaryOp,
        WeightMul,
    )

    f32 = "float32"
    norm = RMSNorm(1e-6, width, f32, f32, f32, f32,
                   (WeightMul(f32, weight_dtype, zero_centered, f32 if zero_centered else None), Cast(dtype)), True)
    q = FP8Quant(width, "float8_e4m3fn", f32, "div", (UnaryOp("cast", f32), UnaryOp("div", f32, 448.0),
                 UnaryOp("clamp_min", f32, 1e-12)), (-448.0, 448.0),
                 ((UnaryOp("cast", f32), UnaryOp("div", f32, 448.0), UnaryOp("clamp_min", f32, 1e-12)),))
    return RowChain(dtype, ResidualAdd(dtype, True), norm, q if quant else None)


def _check(got, ref, what):
    for i, (a, b) in enumerate(zip(got, ref)):
        if a.dtype == torch.float8_e4m3fn:
            continue  # compared dequantized below
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -6, atol=1e-2, msg=f"{what}: output {i}")


@pytest.mark.parametrize("width", [41, 3072, 4096, 7168])
@pytest.mark.parametrize("variant", ["plain-bf16", "zero-centered-fp32-weight", "quant"])
def test_one_shot_allreduce_chain_matches_nccl_and_the_reference(group, width, variant):
    from braze.patterns.reference import row_chain_reference
    from braze.runtime.collective import PATH_COUNTS

    rank, world = dist.get_rank(), dist.get_world_size()
    chain = _spec(width, variant == "quant", "bfloat16", variant.startswith("zero"),
                  "float32" if variant.startswith("zero") else "bfloat16")
    spec = chain.to_json()
    for seed in range(8):
        for t in TOKENS:
            gen = torch.Generator(device="cuda").manual_seed(1000 * seed + t)  # same draws on every rank
            xs = [torch.randn(t, width, device="cuda", generator=gen).bfloat16() for _ in range(world)]
            r = torch.randn(t, width, device="cuda", generator=gen).bfloat16()
            w = torch.randn(width, device="cuda", generator=gen).to(torch.float32 if "fp32" in variant else
                                                                    torch.bfloat16)
            one_shot = PATH_COUNTS["one-shot"]
            got = torch.ops.braze.allreduce_rowwise([xs[rank], r, w], spec, group.group_name, THRESHOLD)
            assert PATH_COUNTS["one-shot"] == one_shot + (t <= THRESHOLD), "wrong path taken"
            if t <= THRESHOLD:  # the one-shot sum: fp32 in rank order, one rounding (every rank's x is known here)
                reduced = sum(x.float() for x in xs).bfloat16()
            else:  # NCCL's own sum (at 4 ranks it rounds per hop: not the same bits as one rounding)
                reduced = xs[rank].clone()
                dist.all_reduce(reduced, group=group)
            ref = row_chain_reference(chain, [reduced, r, w])
            _check(got, ref, f"rank {rank} seed {seed} T={t}")
            if variant == "quant":
                dq = got[-2].float() * got[-1]  # q [T, D] times its per-token scale [T, 1]
                dq_ref = ref[-2].float() * ref[-1]
                torch.testing.assert_close(dq, dq_ref, rtol=0.13, atol=2e-2)


def _captured(step):
    """`step` run once on a side stream (lazy set-up), then captured: (graph, the outputs it writes)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    return graph, outs


def _tp_spec(widths: tuple[int, ...], world: int) -> str:
    from braze.patterns.stages import Cast, RMSNorm, UnaryOp, WeightMul
    from braze.patterns.tp_norm import TPNorm, TPNormGroup

    f32 = "float32"
    return TPNormGroup(tuple(TPNorm(RMSNorm(1e-6, d, f32, f32, f32, f32, (Cast("bfloat16"),
                                            WeightMul("bfloat16", "bfloat16")), True),
                                    (UnaryOp("div", f32, float(world)),)) for d in widths)).to_json()


@pytest.fixture
def tp_norm_one_shot(monkeypatch):
    """The TP norms' one-shot kernel on (braze.runtime.collective.TP_NORM_ONE_SHOT, the default unless
    BRAZE_TP_NORM_ONE_SHOT=0), whatever the environment says."""
    import braze.runtime.collective as rc

    monkeypatch.setattr(rc, "TP_NORM_ONE_SHOT", True)


def test_one_shot_tp_norm_survives_back_to_back_graph_replays(group, tp_norm_one_shot):
    # The hang of commit 4d41bf4 (MiniMax prologue, 4 ranks, T=8): launches back to back with nothing between
    # them let ranks drift, and a warp that cleared a slot before a slower warp of its program read it left
    # that warp polling. 64 launches per graph, 30 replays, against the NCCL path.
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = _tp_spec((1536, 256), world)
    gen = torch.Generator(device="cuda").manual_seed(11 + rank)
    inputs = [torch.randn(8, 1536, device="cuda", generator=gen).bfloat16(), torch.randn(1536, device="cuda").bfloat16(),
              torch.randn(8, 256, device="cuda", generator=gen).bfloat16(), torch.randn(256, device="cuda").bfloat16()]
    ref = torch.ops.braze.tp_rmsnorm(inputs, spec, group.group_name, 0)  # the NCCL path

    def step():
        outs = None
        for _ in range(64):
            outs = torch.ops.braze.tp_rmsnorm(inputs, spec, group.group_name, THRESHOLD)
        return outs

    graph, outs = _captured(step)
    from braze.runtime.collective import PATH_COUNTS

    before = PATH_COUNTS["one-shot"]
    step()
    assert PATH_COUNTS["one-shot"] == before + 64, "the launches did not take the one-shot kernel"
    for _ in range(30):
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=1e-2)


@pytest.mark.parametrize("widths", [(48, 16), (1536, 256), (3072, 512)])
def test_one_shot_tp_norm_matches_the_nccl_path(group, widths, tp_norm_one_shot):
    from braze.runtime.collective import PATH_COUNTS

    rank, world = dist.get_rank(), dist.get_world_size()
    spec = _tp_spec(widths, world)
    for seed in range(8):
        for t in TOKENS:
            gen = torch.Generator(device="cuda").manual_seed(7 + 1000 * seed + t + rank)  # per-rank slices
            inputs = []
            for d in widths:
                inputs += [torch.randn(t, d, device="cuda", generator=gen).bfloat16(),
                           torch.randn(d, device="cuda", generator=gen).bfloat16()]
            one_shot = PATH_COUNTS["one-shot"]
            got = torch.ops.braze.tp_rmsnorm(inputs, spec, group.group_name, THRESHOLD)
            assert PATH_COUNTS["one-shot"] == one_shot + (t <= THRESHOLD)
            ref = torch.ops.braze.tp_rmsnorm(inputs, spec, group.group_name, 0)  # the NCCL path
            for a, b in zip(got, ref):
                torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=1e-2)


def test_the_one_shot_op_replays_in_a_cuda_graph(group):
    rank, world = dist.get_rank(), dist.get_world_size()
    chain = _spec(4096, False, "bfloat16", True, "float32")
    spec = chain.to_json()
    x = torch.randn(8, 4096, device="cuda").bfloat16()
    r, w = torch.randn(8, 4096, device="cuda").bfloat16(), torch.randn(4096, device="cuda")

    def step():
        return torch.ops.braze.allreduce_rowwise([x, r, w], spec, group.group_name, THRESHOLD)

    graph, outs = _captured(step)
    for i in range(20):  # new inputs each replay, read in place by the captured kernel
        x.copy_(torch.randn(8, 4096, device="cuda", generator=torch.Generator(device="cuda").manual_seed(i + rank)))
        graph.replay()
        eager = step()
        for a, b in zip(outs, eager):
            assert torch.equal(a, b), f"rank {rank} replay {i}"
    assert world >= 2


def test_compiled_layer_fuses_and_matches_eager_on_the_tp_group(group):
    import braze

    rank, world = dist.get_rank(), dist.get_world_size()
    # with 4 ranks: two TP groups of 2 inside the world; the graph's group must be the one reduced over
    tp = group
    if world >= 4:
        pairs = [dist.new_group([2 * i, 2 * i + 1]) for i in range(world // 2)]
        tp = pairs[rank // 2]

    def layer(x, wt, r, w):
        y = x @ wt
        dist.all_reduce(y, group=tp)
        h = y + r
        v = h.float()
        return (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + w.float())).to(h.dtype), h

    gen = torch.Generator(device="cuda").manual_seed(rank)
    x = torch.randn(8, 512, device="cuda", generator=gen).bfloat16()
    wt = (0.05 * torch.randn(512, 4096, device="cuda", generator=gen)).bfloat16()
    r, w = torch.randn(8, 4096, device="cuda").bfloat16(), torch.randn(4096, device="cuda")
    torch._dynamo.reset()
    be = braze.backend(braze.FusionConfig(collective=True, symm_max_tokens=THRESHOLD))
    got = torch.compile(layer, backend=be, fullgraph=True)(x, wt, r, w)
    ref = layer(x, wt, r, w)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -6, atol=2e-2)
    [rm] = braze.report(be).applied
    assert rm.name == "allreduce-norm" and dict(rm.args)["group"] == tp.group_name


def test_one_shot_rows_beyond_the_sm_count_and_the_workspace_state_after_launches(group):
    """T above the SM count (a program takes several rows), then the protocol's state: every buffer all
    sentinel again, and the same launch count on every rank."""
    from braze.patterns.reference import row_chain_reference
    from braze.runtime import symm_mem
    from braze.runtime.collective import PATH_COUNTS

    rank, world = dist.get_rank(), dist.get_world_size()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    chain = _spec(1024, False, "bfloat16", True, "float32")
    for t in (sms + 1, 2 * sms + 5, 3):
        gen = torch.Generator(device="cuda").manual_seed(t)
        xs = [torch.randn(t, 1024, device="cuda", generator=gen).bfloat16() for _ in range(world)]
        r, w = torch.randn(t, 1024, device="cuda", generator=gen).bfloat16(), torch.randn(1024, device="cuda")
        one_shot = PATH_COUNTS["one-shot"]
        got = torch.ops.braze.allreduce_rowwise([xs[rank], r, w], chain.to_json(), group.group_name, 1 << 20)
        assert PATH_COUNTS["one-shot"] == one_shot + 1
        ref = row_chain_reference(chain, [sum(x.float() for x in xs).bfloat16(), r, w])
        _check(got, ref, f"rank {rank} T={t}")
    torch.cuda.synchronize()
    dist.barrier()
    ws = symm_mem.lookup(group.group_name)
    assert bool((ws.buffer == 0xFF).all()), "a buffer element is not the sentinel after the launches"
    counts = [torch.zeros(2, dtype=torch.int32, device="cuda") for _ in range(world)]
    dist.all_gather(counts, ws.counters)
    assert all(c.tolist() == counts[0].tolist() for c in counts) and counts[0][1] == 0, counts
