"""Where the time of a one-shot all-reduce kernel goes: its pieces timed alone on TP GPUs (issue 5).

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \\
        torchrun --nproc-per-node 2 benchmarks/collective_pieces.py [--out DIR]

Each piece is a small Triton kernel over a symmetric-memory buffer, captured in a CUDA graph of `--inner`
launches and timed like benchmarks/allreduce_norm.py (median of replays, device events, slowest rank):

- empty: a kernel that loads one value (the floor of one launch inside a graph);
- barrier-cas x1 / x2: the cross-rank barrier braze's first one-shot kernel used, once and twice (per
  program: a system-scope compare-and-swap into each peer's signal pad in turn, then polling its own);
- peer-read scalar / vector: one program per row reading a peer's row over NVLink, with the peer's
  address loaded from a table (alignment unknown: 2-byte loads) and with it declared 16-byte aligned;
- push vector: one program per row storing its row into the peer's buffer (16-byte stores), no wait;
- with --sweep: braze's one-shot all-reduce + add + RMSNorm kernel (benchmarks/allreduce_norm.py's chain)
  launched with each of several warp counts, to pick the default.

Writes DIR/collective_pieces_tp{P}.json (rank 0) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from allreduce_norm import time_graph


@triton.jit
def _empty(ctr_ptr):
    tl.load(ctr_ptr)


@triton.jit
def _barrier_cas(signal_ptrs, slot, RANK: tl.constexpr, WORLD: tl.constexpr):
    tl.debug_barrier()
    pads = signal_ptrs.to(tl.pointer_type(tl.uint64))
    for p in tl.static_range(WORLD):
        remote = tl.load(pads + p).to(tl.pointer_type(tl.int32))
        while tl.atomic_cas(remote + slot * WORLD + RANK, 0, 1, sem="release", scope="sys") != 0:
            pass
    local = tl.load(pads + RANK).to(tl.pointer_type(tl.int32))
    for p in tl.static_range(WORLD):
        while tl.atomic_cas(local + slot * WORLD + p, 1, 0, sem="acquire", scope="sys") != 1:
            pass
    tl.debug_barrier()


@triton.jit
def _barriers(signal_ptrs, RANK: tl.constexpr, WORLD: tl.constexpr, TIMES: tl.constexpr):
    row = tl.program_id(0)
    for _ in tl.static_range(TIMES):
        _barrier_cas(signal_ptrs, row, RANK, WORLD)


@triton.jit
def _peer_read(buf_ptrs, out_ptr, PEER: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
               ALIGNED: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    col = tl.arange(0, BLOCK)
    base = tl.load(buf_ptrs.to(tl.pointer_type(tl.uint64)) + PEER).to(tl.pointer_type(tl.bfloat16))
    if ALIGNED:
        base = tl.multiple_of(base, 16)
    v = tl.load(base + row * D + col, mask=col < D, other=0.0, volatile=True)
    tl.store(out_ptr + row * D + col, v, mask=col < D)


@triton.jit
def _push(x_ptr, buf_ptrs, PEER: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    col = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * D + col, mask=col < D)
    base = tl.multiple_of(tl.load(buf_ptrs.to(tl.pointer_type(tl.uint64)) + PEER).to(tl.pointer_type(tl.bfloat16)),
                          16)
    tl.store(base + row * D + col, x, mask=col < D)


def sweep_warps(args, rank: int, world: int) -> list[dict]:
    """braze's one-shot kernel for the benchmark's chain at several warp counts (same launch as the op's)."""
    from allreduce_norm import spec_for

    from braze.codegen.cache import allreduce_chain_kernel
    from braze.patterns.stages import RowChain
    from braze.runtime import symm_mem
    from braze.runtime.collective import _programs
    from braze.runtime.rowwise import _constexprs, _empty_outputs, _launch_args

    ws = symm_mem.prepare(dist.group.WORLD, 16 << 20)
    out = []
    for width in [int(h) for h in args.sweep.split(",")]:
        chain = RowChain.from_json(spec_for(width))
        kernel = allreduce_chain_kernel(chain, world)
        for T in [int(t) for t in args.sweep_tokens.split(",")]:
            x = torch.randn(T, width, device="cuda").bfloat16()
            r = torch.randn(T, width, device="cuda").bfloat16()
            w = torch.randn(width, device="cuda")
            outs = _empty_outputs(chain, x)
            largs, n = _launch_args(chain, [x, r, w], outs)
            progs = _programs(x, n)
            for warps in (2, 4, 8, 16):
                def launch():
                    kernel.jit[(progs,)](*largs[:-1], ws.handle.buffer_ptrs_dev, ws.counters, progs, n,
                                         **_constexprs(chain, kernel, interpreted=False), RANK=ws.rank,
                                         WORLD=ws.world_size, HALF_BYTES=ws.half_bytes, ITERS=-(-n // progs),
                                         num_warps=warps)
                us = time_graph(launch, args.inner, args.replays) * 1e6
                out.append({"piece": f"braze one-shot D={width} warps={warps}", "T": T, "us": us,
                            "default_warps": kernel.source.num_warps})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", default="7168")
    p.add_argument("--tokens", default="1,64")
    p.add_argument("--inner", type=int, default=20)
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--sweep", default="", help="hidden sizes for the warp sweep of the one-shot kernel")
    p.add_argument("--sweep-tokens", default="1,8,64")
    args = p.parse_args(argv)
    import torch.distributed._symmetric_memory as symm_mem

    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    rank, world = dist.get_rank(), dist.get_world_size()
    name = dist.group.WORLD.group_name
    buf = symm_mem.empty(8 << 20, dtype=torch.uint8, device="cuda").zero_()
    torch.cuda.synchronize()
    h = symm_mem.rendezvous(buf, name)
    pads = h.signal_pad_ptrs_dev
    bufs = h.buffer_ptrs_dev
    peer = (rank + 1) % world
    ctr = torch.zeros(1, dtype=torch.int32, device="cuda")
    rows = []

    def t(fn):
        return time_graph(fn, args.inner, args.replays) * 1e6

    rows.append({"piece": "empty", "T": 1, "us": t(lambda: _empty[(1,)](ctr))})
    for T in [int(x) for x in args.tokens.split(",")]:
        for times in (1, 2):
            rows.append({"piece": f"barrier-cas x{times}", "T": T,
                         "us": t(lambda: _barriers[(T,)](pads, RANK=rank, WORLD=world, TIMES=times))})
        for D in [int(x) for x in args.hidden.split(",")]:
            block = triton.next_power_of_2(D)
            warps = 8 if block >= 4096 else 4
            out = torch.empty(T, D, dtype=torch.bfloat16, device="cuda")
            x = torch.randn(T, D, device="cuda").bfloat16()
            for aligned in (False, True):
                rows.append({"piece": f"peer-read {'vector' if aligned else 'scalar'} D={D}", "T": T, "us": t(
                    lambda: _peer_read[(T,)](bufs, out, PEER=peer, D=D, BLOCK=block, ALIGNED=aligned,
                                             num_warps=warps))})
            rows.append({"piece": f"push vector D={D}", "T": T, "us": t(
                lambda: _push[(T,)](x, bufs, PEER=peer, D=D, BLOCK=block, num_warps=warps))})
    if args.sweep:
        rows += sweep_warps(args, rank, world)
    if rank == 0:
        meta = {"card": torch.cuda.get_device_name(), "world": world, "torch": torch.__version__,
                "triton": triton.__version__, "inner": args.inner, "replays": args.replays}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"collective_pieces_tp{world}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(meta)
        for r in rows:
            print(f"{r['piece']:<28} T={r['T']:<4} {r['us']:8.2f} us")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
