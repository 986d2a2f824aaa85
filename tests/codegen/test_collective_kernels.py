"""The collective kernels: generated source, and the one-shot kernels run under the Triton interpreter in two
real processes over shared host memory (the stand-in for symmetric memory), equal to the references.

What this checks: indexing, the rank-order sum, the chain after it, the exchange of TP norm means, and the
push protocol (every buffer back to all sentinel after every launch, the launch counter advanced once per
launch, both halves used, back-to-back launches of different sizes, a program taking several rows, an
input whose bits are the sentinel). What it cannot check: the GPU memory model over NVLink and speed;
tests/passes/test_collective_gpu.py does, on GPUs.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch.distributed as dist

from braze.codegen.collective import generate_allreduce_chain, generate_tp_norm
from braze.patterns.reference import row_chain_reference
from braze.patterns.stages import (
    Cast,
    FP8Quant,
    ResidualAdd,
    RMSNorm,
    RowChain,
    UnaryOp,
    WeightMul,
)
from braze.patterns.tp_norm import (
    TPNorm,
    TPNormGroup,
    finish_reference,
    local_means_reference,
)
from braze.testing import make_shared_workspace_files, shared_workspace

F32 = "float32"


def _chain(width: int, quant: bool, dtype: str = "bfloat16") -> RowChain:
    norm = RMSNorm(1e-6, width, F32, F32, F32, F32, (WeightMul(F32, F32, True, F32), Cast(dtype)), not quant)
    q = FP8Quant(width, "float8_e4m3fn", F32, "div", (UnaryOp("cast", F32), UnaryOp("div", F32, 448.0),
                 UnaryOp("clamp_min", F32, 1e-12)), (-448.0, 448.0),
                 ((UnaryOp("cast", F32), UnaryOp("div", F32, 448.0), UnaryOp("clamp_min", F32, 1e-12)),))
    return RowChain(dtype, ResidualAdd(dtype, True), norm, q if quant else None)


def _tp_group(widths: tuple[int, ...], p: int) -> TPNormGroup:
    sides = []
    for w in widths:
        norm = RMSNorm(1e-6, w, F32, F32, F32, F32, (Cast("bfloat16"), WeightMul("bfloat16", "bfloat16")), True)
        sides.append(TPNorm(norm, (UnaryOp("div", F32, float(p)),)))
    return TPNormGroup(tuple(sides))


@pytest.mark.parametrize("world", [2, 4, 8])
def test_generated_sources_are_valid_python(world):
    for chain in (_chain(41, False), _chain(7168, True)):
        src = generate_allreduce_chain(chain, world).source
        compile(src, "<one-shot>", "exec")
        assert "volatile=True" in src and "tl.atomic_add(ctr_ptr + 1" in src and "atomic_cas" not in src
    for phase in ("local", "finish", "symm"):
        compile(generate_tp_norm(_tp_group((48, 16), world), phase).source, "<tp-norm>", "exec")


@pytest.mark.parametrize("world", [2, 4])
def test_a_slot_is_cleared_only_after_every_warp_of_the_program_read_it(world):
    # Warps can hold copies of one element (the chain kernel's probe, the TP norms' [N] means): the clearing
    # store must come after a CTA barrier that follows the polling loop (one per peer once unrolled).
    for src in (generate_allreduce_chain(_chain(7168, True), world).source,
                generate_tp_norm(_tp_group((1536, 256), world), "symm").source):
        lines = [ln.strip() for ln in src.splitlines()]
        clears = [i for i, ln in enumerate(lines) if ln.startswith("tl.store(mine")]
        assert len(clears) == 1, src  # inside the unrolled loop over peers
        for i in clears:
            assert lines[i - 1] == "tl.debug_barrier()", "\n".join(lines[i - 4:i + 1])
            assert lines[i - 2].endswith("volatile=True)") and lines[i - 3].startswith("while "), lines[i - 3:i]


@torch.no_grad()
def _one_shot_worker(rank: int, world_size: int, folder: str) -> None:
    from braze.runtime.collective import _one_shot_chain, _one_shot_tp

    ws = shared_workspace(folder, rank, world_size)
    launches = 0

    def check_state():
        nonlocal launches
        launches += 1
        dist.barrier()  # every rank is done with this launch and none has started the next
        assert all(bool((b == 0xFF).all()) for b in ws.handle.buffers), "buffer not all sentinel after a launch"
        assert ws.counters.tolist() == [launches, 0], ws.counters.tolist()
        dist.barrier()

    for step, (t, width, quant) in enumerate([(1, 41, False), (3, 257, True), (2, 41, False), (5, 64, False)]):
        chain = _chain(width, quant)
        gen = torch.Generator().manual_seed(step)  # the same draws on every rank
        xs = [torch.randn(t, width, generator=gen).bfloat16() for _ in range(world_size)]
        if step == 3:  # a value whose bits are the sentinel (a NaN) is sent as another NaN: no hang
            xs[1][0, 5] = torch.tensor(-1, dtype=torch.int16).view(torch.bfloat16)
        r, w = torch.randn(t, width, generator=gen).bfloat16(), torch.randn(width, generator=gen)
        outs = _one_shot_chain(chain, [xs[rank], r, w], ws)
        total = sum(x.float() for x in xs).bfloat16()  # one rounding of the fp32 sum, as the kernel does
        ref = row_chain_reference(chain, [total, r, w])
        if step == 3:
            assert bool(outs[0][0, 5].isnan()) and bool(outs[1][0].isnan().all()), "the NaN row"
            outs, ref = [o[1:] for o in outs], [o[1:] for o in ref]
        assert torch.equal(outs[0], ref[0]), f"rank {rank} step {step}: residual"
        if quant:
            assert torch.equal(outs[2], ref[2]), f"rank {rank} step {step}: scales"
            assert torch.equal(outs[1].float(), ref[1].float()), f"rank {rank} step {step}: q"
        else:
            torch.testing.assert_close(outs[1].float(), ref[1].float(), rtol=2 ** -8, atol=0)
        check_state()

    group = _tp_group((48, 16), world_size)
    for t in (1, 5, 2):
        gen = torch.Generator().manual_seed(10 + t)
        slices = [[torch.randn(t, s.norm.width, generator=gen).bfloat16() for s in group.sides]
                  for _ in range(world_size)]
        weights = [torch.randn(s.norm.width, generator=gen).bfloat16() for s in group.sides]
        inputs = [a for x, w in zip(slices[rank], weights) for a in (x, w)]
        outs = _one_shot_tp(group, inputs, ws)
        reduced = sum(local_means_reference(group, xs) for xs in slices)
        for got, ref in zip(outs, finish_reference(group, inputs, reduced)):
            torch.testing.assert_close(got.float(), ref.float(), rtol=2 ** -8, atol=1e-6)
        check_state()


def test_one_shot_kernels_under_the_interpreter_on_two_processes_equal_the_references(tp_runner):
    folder = tempfile.mkdtemp(prefix="braze-symm-", dir="/dev/shm" if _has_shm() else None)
    make_shared_workspace_files(folder, 2)
    tp_runner(2, _one_shot_worker, folder)


def _has_shm() -> bool:
    import os

    return os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)


def test_a_workspace_admits_only_launches_that_fit_one_slot_per_rank_in_half_its_buffer():
    from braze.runtime.symm_mem import Workspace

    ws = Workspace("g", torch.empty(0), None, rank=0, world_size=4, nbytes=(1 << 20) + 24, signal_pad_bytes=4096)
    assert ws.half_bytes == (1 << 19) + 0  # (2^20 + 24) / 2 rounded down to 16 bytes
    assert ws.fits(1 << 17)  # 4 ranks x 2^17 bytes = the whole half
    assert not ws.fits((1 << 17) + 1)  # one byte over
