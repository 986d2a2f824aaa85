"""Benchmark: the TP-reduced QK-norm (MiniMax-M2.5), braze's one-shot kernel vs its NCCL path vs stock (TP GPUs).

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \\
        torchrun --nproc-per-node P benchmarks/tp_norm.py [--widths 1536,256] [--tokens 1,2,4,8,16,32,64,128]
        [--inner 20,1] [--out DIR]

On every rank, bf16 q and k slices of the widths given (default: the MiniMax bench's per-rank 12 q and 2 kv
heads of 128), bf16 weight slices, eps 1e-6, the variance summed over the ranks and divided by P:

- stock: `torch.compile`d local means of squares packed as [T, 2] fp32, `dist.all_reduce` (NCCL),
  `torch.compile`d normalization (what a stock-compiled model runs);
- braze one-shot: `braze::tp_rmsnorm` with its one-shot kernel (the exchange of the means inside the
  normalizing kernel, over symmetric memory);
- braze NCCL: the same op with `TP_NORM_ONE_SHOT` off (local means kernel, NCCL all-reduce, normalize kernel).

Each is timed for each `--inner` as `benchmarks/allreduce_norm.py` times (a CUDA graph of `inner` calls, the
median of replays, the slowest rank), in interleaved rounds. inner=1 is one launch per replay, as in the
prologue benchmark, where nothing else runs between two ranks' meetings. Both braze paths are checked
against the eager reference over NCCL before timing. Writes DIR/tp_norm_tp{P}.json and .md (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from allreduce_norm import count_kernels, init_tp, time_graph, tp_meta

EPS = 1e-6


def local_means(xs):
    return torch.stack([x.float().pow(2).mean(-1) for x in xs], -1)


def finish(xs, ws, v, world: int):
    v = v / world
    return [(x.float() * torch.rsqrt(v[:, i:i + 1] + EPS)).to(x.dtype) * w for i, (x, w) in enumerate(zip(xs, ws))]


def spec_for(widths: tuple[int, ...], world: int) -> str:
    from braze.patterns.stages import Cast, RMSNorm, UnaryOp, WeightMul
    from braze.patterns.tp_norm import TPNorm, TPNormGroup

    f32 = "float32"
    return TPNormGroup(tuple(TPNorm(RMSNorm(EPS, d, f32, f32, f32, f32, (Cast("bfloat16"),
                                            WeightMul("bfloat16", "bfloat16")), True),
                                    (UnaryOp("div", f32, float(world)),)) for d in widths)).to_json()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="1536,256")
    p.add_argument("--tokens", default="1,2,4,8,16,32,64,128")
    p.add_argument("--inner", default="20,1", help="calls per captured graph, one timing per value")
    p.add_argument("--replays", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or "WORLD_SIZE" not in os.environ:
        print("tp_norm benchmark: run under torchrun on >= 2 GPUs", file=sys.stderr)
        return 2

    import braze.runtime.collective as rc
    from braze.runtime import symm_mem

    rank, world, group, _ = init_tp(16 << 20)
    widths = tuple(int(w) for w in args.widths.split(","))
    spec = spec_for(widths, world)
    inners = [int(i) for i in args.inner.split(",")]
    rows = []
    for T in [int(t) for t in args.tokens.split(",")]:
        gen = torch.Generator(device="cuda").manual_seed(rank * 7919 + T)
        xs = [torch.randn(T, d, device="cuda", generator=gen).bfloat16() for d in widths]
        ws = [(1 + 0.1 * torch.randn(d, device="cuda", generator=gen)).bfloat16() for d in widths]
        inputs = [t for pair in zip(xs, ws) for t in pair]
        torch._dynamo.reset()
        c_local = torch.compile(local_means, dynamic=False)
        c_finish = torch.compile(finish, dynamic=False)

        def stock():
            v = c_local(xs)
            dist.all_reduce(v, group=group)
            return c_finish(xs, ws, v, world)

        def braze_op():
            return torch.ops.braze.tp_rmsnorm(inputs, spec, group.group_name, 1 << 20)

        def with_one_shot(on: bool):
            def fn():
                rc.TP_NORM_ONE_SHOT = on  # read at each call, captured per graph
                return braze_op()
            return fn

        variants = {"stock": stock, "one-shot": with_one_shot(True), "nccl": with_one_shot(False)}
        with torch.no_grad():
            v = local_means(xs)
            dist.all_reduce(v, group=group)
            ref = finish(xs, ws, v, world)
            checks = {}
            for name in ("one-shot", "nccl"):
                before = dict(rc.PATH_COUNTS)
                out = variants[name]()
                took = [k for k in rc.PATH_COUNTS if rc.PATH_COUNTS[k] != before[k]]
                checks[name] = {"path": took[0] if took else "?",
                                "max_abs_diff": max(float((a.float() - b.float()).abs().max())
                                                    for a, b in zip(out, ref))}
            row = {"tokens": T, "world": world, "widths": list(widths), "checks": checks,
                   "kernels": {n: count_kernels(f) for n, f in variants.items()}, "us": {}, "rounds_us": {}}
            for inner in inners:
                rounds = {n: [] for n in variants}
                for _ in range(args.rounds):
                    for name, fn in variants.items():
                        rounds[name].append(time_graph(fn, inner, args.replays) * 1e6)
                row["us"][inner] = {n: statistics.median(ts) for n, ts in rounds.items()}
                row["rounds_us"][inner] = {n: [round(t, 2) for t in ts] for n, ts in rounds.items()}
            rc.TP_NORM_ONE_SHOT = True
        rows.append(row)
        if rank == 0:
            timing = "  ".join(f"inner={i}: " + " ".join(f"{n} {t:6.2f}" for n, t in row["us"][i].items())
                               for i in inners)
            print(f"T={T:<4} {timing}  kernels {row['kernels']}  paths "
                  f"{checks['one-shot']['path']}/{checks['nccl']['path']}  max|diff| "
                  f"{checks['one-shot']['max_abs_diff']:.2e}/{checks['nccl']['max_abs_diff']:.2e}", flush=True)
    if rank == 0:
        meta = {**tp_meta(world, "tp_norm.py", argv),
                "timing": f"CUDA graph of `inner` calls, median of {args.replays} replays (ranks meet on the "
                          f"device before each), slowest rank; median of {args.rounds} interleaved rounds"}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"tp_norm_tp{world}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        lines = [f"# TP-reduced Q/K norm at TP={world} (widths {widths} per rank): braze vs stock", "",
                 f"Card: {meta['card']} × {world}; torch {meta['torch']}, triton {meta['triton']}, CUDA "
                 f"{meta['cuda']}. Command: `{meta['command']}`. Timing: {meta['timing']}.", "",
                 "| T | inner | stock µs | braze one-shot µs | braze NCCL path µs | one-shot / stock | "
                 "NCCL path / stock | kernels stock / one-shot / NCCL path |",
                 "|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            k = r["kernels"]
            for i in inners:
                u = r["us"][i]
                lines.append(f"| {r['tokens']} | {i} | {u['stock']:.2f} | {u['one-shot']:.2f} | {u['nccl']:.2f} | "
                             f"{u['one-shot'] / u['stock']:.2f} | {u['nccl'] / u['stock']:.2f} | "
                             f"{k['stock']} / {k['one-shot']} / {k['nccl']} |")
        (out / f"tp_norm_tp{world}.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    symm_mem.release_all()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
