"""Benchmark: all-reduce + residual add + RMSNorm, braze vs NCCL all-reduce + stock-Inductor add+norm (TP GPUs).

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \\
        torchrun --nproc-per-node 2 benchmarks/allreduce_norm.py [--hidden 7168,4096,3072] [--tokens 1,8,64,256]
        [--out DIR]

For each hidden size and token count, on every rank, with bf16 activations and a zero-centered fp32
norm weight (Qwen 3.5's layer norm; the others differ only in the weight multiply):

- stock: `dist.all_reduce(y)` in place (NCCL), then `torch.compile`d `h = y + r; rmsnorm(h)` (stock
  Inductor), i.e. what a stock-compiled model runs between two layers;
- braze one-shot: `braze::allreduce_rowwise` with the threshold above T (one kernel: one-shot all-reduce
  over symmetric memory + add + norm);
- braze nccl: the same op with threshold 0 (NCCL all-reduce, then braze's fused add + norm kernel).

Each variant is captured in a CUDA graph of `--inner` calls and timed as the median of `--replays`
replays with device events (the ranks meet on the device before each replay); the slowest rank's
time is kept, and the reported time is the median of `--rounds` such timings taken in turn with the
other variants. Kernels per call are counted with
the profiler. The path the braze op took is read from its counters (it falls back to NCCL when the
workspace or signal pad is too small, and says so here). Correctness: both braze variants against NCCL +
the eager reference on fresh inputs, before timing. In the stock variant the in-place all-reduce
compounds across replays (values grow); only its time is used.

Writes DIR/allreduce_norm_tp{P}.json and .md (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

EPS = 1e-6


def add_norm(y, r, w):
    h = y + r
    v = h.float()
    return (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + EPS) * (1.0 + w.float())).to(h.dtype), h


def spec_for(width: int) -> str:
    """The RowChain braze's pass builds for add_norm after an all-reduce (traced, so it is the pass's own)."""
    import torch.distributed._functional_collectives as funcol

    from braze import FusionConfig
    from braze.testing import aten_graph, run_passes

    def fn(x, r, w):
        return add_norm(funcol.all_reduce(x, "sum", dist.group.WORLD), r, w)

    x = torch.randn(2, width, device="cuda", dtype=torch.bfloat16)
    gm = aten_graph(fn, x, x, torch.randn(width, device="cuda"))
    record = run_passes(gm, FusionConfig(collective=True))  # off by default
    [node] = [n for n in gm.graph.nodes if "allreduce_rowwise" in str(n.target)]
    assert [r.name for r in record.remarks if r.kind == "applied"] == ["allreduce-norm"], record.remarks
    return node.args[1]


def time_graph(fn, inner: int, replays: int) -> float:
    """Median seconds per call over CUDA-graph replays of `inner` calls; the slowest rank's.

    Before each replay the ranks meet on the device (a one-value NCCL all-reduce right before the start
    event), so a rank whose host launched late does not charge its lateness to the other's first call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    token = torch.zeros(1, device="cuda")
    for _ in range(replays):
        dist.barrier()
        dist.all_reduce(token)  # on the stream: the start events of all ranks fire within a few µs
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3 / inner)
    t = torch.tensor([statistics.median(times)], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def torch_one_shot_time(x, group, inner: int, replays: int) -> float | None:
    """PyTorch's own one-shot all-reduce (symm_mem.one_shot_all_reduce, input in symmetric memory), no norm;
    None where this torch lacks it."""
    try:
        import torch.distributed._symmetric_memory as symm_mem

        buf = symm_mem.empty(x.shape, dtype=x.dtype, device=x.device)
        symm_mem.rendezvous(buf, group.group_name)
        buf.copy_(x)
        return time_graph(lambda: torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", group.group_name), inner,
                          replays)
    except Exception as e:  # noqa: BLE001 - a reference point only
        print(f"torch one-shot all-reduce unavailable: {e}", file=sys.stderr)
        return None


def init_tp(workspace_bytes: int):
    """Under torchrun: this rank's GPU, the NCCL world group and its symmetric-memory workspace, prepared
    at set-up on every rank. Returns (rank, world, group, workspace)."""
    from braze.runtime import symm_mem

    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    group = dist.group.WORLD
    return dist.get_rank(), dist.get_world_size(), group, symm_mem.prepare(group, workspace_bytes)


def tp_meta(world: int, script: str, argv: list[str] | None) -> dict:
    """What a TP benchmark's results record about the run: card, versions, the multicast settings, command."""
    import triton

    return {"card": torch.cuda.get_device_name(), "world": world, "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")},
            "command": f"torchrun --nproc-per-node {world} benchmarks/{script} "
                       + " ".join(argv if argv is not None else sys.argv[1:])}


def count_kernels(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _us(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", default="7168,4096,3072")
    p.add_argument("--tokens", default="1,8,64,256")
    p.add_argument("--inner", type=int, default=20)
    p.add_argument("--replays", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3, help="interleaved timings of each variant; the median is kept")
    p.add_argument("--workspace-mib", type=int, default=16)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or "WORLD_SIZE" not in os.environ:
        print("allreduce_norm benchmark: run under torchrun on >= 2 GPUs", file=sys.stderr)
        return 2

    from braze.patterns.reference import row_chain_reference
    from braze.patterns.stages import RowChain
    from braze.runtime import symm_mem
    from braze.runtime.collective import PATH_COUNTS

    rank, world, group, ws = init_tp(args.workspace_mib << 20)
    rows = []
    for width in [int(h) for h in args.hidden.split(",")]:
        spec = spec_for(width)
        chain = RowChain.from_json(spec)
        for T in [int(t) for t in args.tokens.split(",")]:
            gen = torch.Generator(device="cuda").manual_seed(rank * 7919 + T)
            x = torch.randn(T, width, device="cuda", generator=gen).bfloat16()
            y = x.clone()
            r = torch.randn(T, width, device="cuda", generator=torch.Generator(device="cuda").manual_seed(T)).bfloat16()
            w = 0.1 * torch.randn(width, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
            torch._dynamo.reset()
            stock_norm = torch.compile(add_norm, dynamic=False)

            def stock():
                dist.all_reduce(y, group=group)
                return stock_norm(y, r, w)

            def braze_one_shot():
                return torch.ops.braze.allreduce_rowwise([x, r, w], spec, group.group_name, 1 << 30)

            def braze_nccl():
                return torch.ops.braze.allreduce_rowwise([x, r, w], spec, group.group_name, 0)

            with torch.no_grad():
                reduced = x.clone()
                dist.all_reduce(reduced, group=group)
                ref = row_chain_reference(chain, [reduced, r, w])
                errors = {}
                for name, fn in (("one-shot", braze_one_shot), ("nccl", braze_nccl)):
                    before = dict(PATH_COUNTS)
                    out = fn()
                    took = [k for k in PATH_COUNTS if PATH_COUNTS[k] != before[k]]
                    errors[name] = {"path": took[0] if took else "?",
                                    **{f"out{i}_max_abs_diff": float((a.float() - b.float()).abs().max())
                                       for i, (a, b) in enumerate(zip(out, ref))}}
                rounds = {"stock": [], "one-shot": [], "nccl": []}
                for _ in range(args.rounds):  # interleaved, so a slow phase of the machine hits all three
                    for name, fn in (("stock", stock), ("one-shot", braze_one_shot), ("nccl", braze_nccl)):
                        rounds[name].append(time_graph(fn, args.inner, args.replays))
                t_stock, t_one, t_nccl = (statistics.median(rounds[n]) for n in ("stock", "one-shot", "nccl"))
                # reference points: the all-reduce alone, NCCL's and PyTorch's one-shot over symmetric memory
                t_nccl_ar = time_graph(lambda: dist.all_reduce(y, group=group), args.inner, args.replays)
                t_torch_one = torch_one_shot_time(x, group, args.inner, args.replays)
                k = {n: count_kernels(f) for n, f in (("stock", stock), ("one-shot", braze_one_shot),
                                                      ("nccl", braze_nccl))}
            row = {"hidden": width, "tokens": T, "world": world, "stock_us": t_stock * 1e6,
                   "nccl_allreduce_only_us": t_nccl_ar * 1e6,
                   "torch_one_shot_allreduce_only_us": None if t_torch_one is None else t_torch_one * 1e6,
                   "one_shot_us": t_one * 1e6, "nccl_kernel_us": t_nccl * 1e6,
                   "one_shot_over_stock": t_one / t_stock, "nccl_kernel_over_stock": t_nccl / t_stock,
                   "kernels": k, "checks": errors,
                   "rounds_us": {n: [round(v * 1e6, 2) for v in ts] for n, ts in rounds.items()}}
            rows.append(row)
            if rank == 0:
                print(f"D={width:<5} T={T:<4} stock {t_stock * 1e6:7.2f} us ({k['stock']} k)  one-shot "
                      f"{t_one * 1e6:7.2f} us ({k['one-shot']} k, {errors['one-shot']['path']})  nccl+kernel "
                      f"{t_nccl * 1e6:7.2f} us ({k['nccl']} k)  ratio {t_one / t_stock:4.2f} / "
                      f"{t_nccl / t_stock:4.2f}  [NCCL AR alone {t_nccl_ar * 1e6:.2f}, torch one-shot AR alone "
                      f"{_us(row['torch_one_shot_allreduce_only_us'])}]", flush=True)
    if rank == 0:
        meta = {**tp_meta(world, "allreduce_norm.py", argv), "workspace_bytes": ws.nbytes,
                "timing": f"CUDA graph of {args.inner} calls, median of {args.replays} replays (barrier and a "
                          "device-side NCCL meeting before each), device events, slowest rank; median of "
                          f"{args.rounds} interleaved rounds"}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"allreduce_norm_tp{world}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        lines = [f"# all-reduce + residual + RMSNorm at TP={world}: braze vs NCCL + stock Inductor", "",
                 f"Card: {meta['card']}; torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}; "
                 f"symmetric-memory workspace {ws.nbytes} B (two halves).",
                 f"Command: `{meta['command']}`. Timing: {meta['timing']}.", "",
                 "| hidden | T | stock µs | braze one-shot µs (path) | braze NCCL+kernel µs | one-shot / stock | "
                 "NCCL+kernel / stock | kernels stock / one-shot / NCCL+kernel | NCCL AR alone µs | "
                 "torch one-shot AR alone µs |",
                 "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['hidden']} | {r['tokens']} | {r['stock_us']:.2f} | {r['one_shot_us']:.2f} "
                         f"({r['checks']['one-shot']['path']}) | {r['nccl_kernel_us']:.2f} | "
                         f"{r['one_shot_over_stock']:.2f} | {r['nccl_kernel_over_stock']:.2f} | "
                         f"{r['kernels']['stock']} / {r['kernels']['one-shot']} / {r['kernels']['nccl']} | "
                         f"{r['nccl_allreduce_only_us']:.2f} | {_us(r['torch_one_shot_allreduce_only_us'])} |")
        (out / f"allreduce_norm_tp{world}.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    symm_mem.release_all()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
