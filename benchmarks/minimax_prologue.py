"""Benchmark: MiniMax-M2.5's attention prologue at TP = P, eager vs stock Inductor vs braze, under CUDA graphs.

    torchrun --nproc-per-node 4 benchmarks/minimax_prologue.py [--tokens 1,8,64] [--variants ...] [--out DIR]
    python benchmarks/minimax_prologue.py ...            # TP = 1

The prologue is `MiniMaxM2Attention.prologue` of the bench config built for this TP size (every rank holds
the bench's per-rank heads, 12 q / 2 kv; at TP=4 that is the real model's 48 / 8): the qkv projection, the
Q and K RMSNorms over the full projected width (each rank's [T, 2] fp32 mean squares summed across ranks),
partial NeoX RoPE (64 of 128 dims) and the paged K and V cache writes. braze turns the norm into
`braze::tp_rmsnorm` (the variance exchange inside the normalizing kernel over symmetric memory) and the RoPE
+ cache writes into one head-chain launch; braze-no-collective leaves the all-reduce to NCCL. Each variant
is checked against eager on every rank, its kernels counted with the profiler and timed as the median of
CUDA-graph replays (the ranks replay together). The floor is the prologue's weight bytes over the copy
bandwidth measured on the same card. Multi-GPU runs need NCCL_NVLS_ENABLE=0 and
TORCH_SYMM_MEM_DISABLE_MULTICAST=1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import braze
from braze.bench_device import copy_bandwidth, count_cuda_kernels, time_cuda_graph
from braze.models.common import PageTable, RotaryCache, init_random, rope_inv_freq
from braze.models.minimax_m2 import MiniMaxM2Attention, MiniMaxM2Config
from prologue_util import is_gemm, kernel_times, reference, relerr, variant_fn

VARIANTS = ("eager", "inductor", "braze", "braze-no-collective")
ISSUE_TARGET = "the MiniMax-M2.5 attention prologue at TP=4 (bench config): kernels and time vs stock Inductor (issue 5)"


def bench_config(tp: int) -> MiniMaxM2Config:
    """The bench config for TP = tp: full head counts tp times the bench's per-rank ones."""
    return MiniMaxM2Config.bench(tp=tp)


def build(T: int, device: torch.device, group) -> tuple[MiniMaxM2Attention, tuple]:
    tp = dist.get_world_size(group) if group is not None else 1
    cfg = bench_config(tp)
    pages = PageTable(64, 576, cfg.block_size, device=device, seed=0)
    attn = MiniMaxM2Attention(cfg, pages, group=group, fp8=None, device=device, dtype=torch.bfloat16).eval()
    init_random(attn, 0, group)
    rotary = RotaryCache(rope_inv_freq(cfg.rotary_dim, cfg.rope_theta), pages.max_context, device)
    gen = torch.Generator().manual_seed(T)  # the same tokens on every rank (the input is replicated)
    x = torch.randn(T, cfg.hidden_size, generator=gen).to(device, torch.bfloat16)
    positions = torch.randint(0, 512, (T,), generator=gen).to(device)
    slots = torch.stack([pages.slots(s, p) for s, p in zip(range(T), positions)])
    cos, sin = rotary(positions)
    return attn, (x, cos, sin, slots)


def weight_bytes(attn: MiniMaxM2Attention) -> int:
    """This rank's parameters the prologue reads: all but o_proj."""
    return sum(p.numel() * p.element_size() for n, p in attn.named_parameters() if not n.startswith("o_proj"))


def backend_for(variant: str):
    if variant == "braze":
        return braze.backend(braze.FusionConfig())
    if variant == "braze-no-collective":
        return braze.backend(braze.FusionConfig(collective=False))
    return None


def mark(what: str) -> None:
    """With BRAZE_TRACE=1, say on stderr where this rank is (to find where a run stops)."""
    if os.environ.get("BRAZE_TRACE") == "1":
        print(f"[rank {os.environ.get('RANK', '0')}] {what}", file=sys.stderr, flush=True)


def worst(x: float, group) -> float:
    """The largest value over the ranks."""
    if group is None:
        return x
    t = torch.tensor([x], device="cuda", dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t)


def run(T: int, device: torch.device, bw: float, variants: tuple[str, ...], group) -> list[dict]:
    attn, inputs = build(T, device, group)
    caches, ref, ref_caches = reference(attn, inputs)
    floor_s = weight_bytes(attn) / bw
    rows = []
    for variant in variants:
        be = backend_for(variant)
        fn = variant_fn(attn, caches, variant, be)
        with torch.no_grad():
            mark(f"T={T} {variant}: first call")
            out = fn(*inputs)
            torch.cuda.synchronize()
            mark(f"T={T} {variant}: first call done")
            err = worst(relerr(out, ref), group)
            cache_err = worst(max(relerr(v, ref_caches[k]) for k, v in attn.named_buffers()), group)
            step = lambda: fn(*inputs)  # noqa: E731
            kernels = count_cuda_kernels(step)
            mark(f"T={T} {variant}: counted")
            times = kernel_times(step)
            mark(f"T={T} {variant}: profiled")
            if group is not None:
                dist.barrier(group)
            timing = time_cuda_graph(step, warmup=20, replays=200)
            mark(f"T={T} {variant}: timed")
        us = worst(timing.median_s * 1e6, group)  # the slowest rank's median: a TP step waits for it
        row = {"T": T, "variant": variant, "us": us, "us_this_rank": timing.median_s * 1e6,
               "kernels": kernels.kernels, "memcpy": kernels.memcpy, "memset": kernels.memset,
               "kernel_names": kernels.names, "floor_us": floor_s * 1e6, "x_floor": us * 1e-6 / floor_s,
               "rel_err": err, "cache_rel_err": cache_err, "kernel_us": times,
               "gemm_us": sum(v for k, v in times.items() if is_gemm(k)),
               "other_us": sum(v for k, v in times.items() if not is_gemm(k))}
        if be is not None:
            rep = braze.report(be)
            row["applied"] = [f"{r.pass_name}: {' -> '.join(r.ops)}" for r in rep.applied]
            row["missed"] = [f"{r.name}: {r.reason}" for r in rep.missed]
        rows.append(row)
        if group is None or dist.get_rank(group) == 0:
            print(f"T={T:3d} {variant:20s} {us:8.1f} us  {row['kernels']:3d} kernels  {row['x_floor']:.2f}x floor  "
                  f"rel err {err:.2e}  caches {cache_err:.2e}", flush=True)
    return rows


def write(rows: list[dict], meta: dict, out: Path, tp: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"minimax_prologue_tp{tp}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    stock = {r["T"]: r["us"] for r in rows if r["variant"] == "inductor"}
    lines = [f"# MiniMax-M2.5 attention prologue at TP={tp} (bench config: 12 q / 2 kv heads per rank, bf16)", "",
             f"Card: {meta['card']} × {tp}; torch {meta['torch']}, triton {meta['triton']}, Python {meta['python']}; "
             f"copy bandwidth {meta['copy_bandwidth_GBps']:.0f} GB/s. Command: `{meta['command']}`.",
             "Timing: median of 200 CUDA-graph replays after 20 warm-up ones, the slowest rank's; kernels from "
             "the profiler (one call outside a graph, rank 0). Floor: one rank's prologue weight bytes over the "
             "copy bandwidth. Errors: the worst rank's relative error of q and of the K/V caches vs eager. "
             "Asked for: " + ISSUE_TARGET + ".", "",
             "| T | variant | µs | vs stock | kernels (memcpy, memset) | × floor | floor µs | rel err q | rel err caches |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        vs = f"{stock[r['T']] / r['us']:.2f}×" if r["T"] in stock else "-"
        lines.append(f"| {r['T']} | {r['variant']} | {r['us']:.1f} | {vs} | {r['kernels']} ({r['memcpy']}, "
                     f"{r['memset']}) | {r['x_floor']:.2f} | {r['floor_us']:.1f} | {r['rel_err']:.2e} | "
                     f"{r['cache_rel_err']:.2e} |")
    lines += ["", "Kernel time on rank 0 (profiler, 20 calls outside a graph, µs of device time per call).", "",
              "| T | variant | GEMM µs | other µs | kernels by time |", "|---:|---|---:|---:|---|"]
    for r in rows:
        top = ", ".join(f"`{k[:40]}` {v:.1f}" for k, v in sorted(r["kernel_us"].items(), key=lambda kv: -kv[1])[:6])
        lines.append(f"| {r['T']} | {r['variant']} | {r['gemm_us']:.1f} | {r['other_us']:.1f} | {top} |")
    lines.append("")
    for r in rows:
        if "applied" in r:
            lines.append(f"- T={r['T']} {r['variant']}: applied: {'; '.join(r['applied']) or 'none'}"
                         + (f"; missed: {'; '.join(r['missed'])}" if r["missed"] else ""))
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,8,64")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if os.environ.get("BRAZE_HANG_DUMP_S"):  # every thread's Python stack on stderr after that many seconds
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["BRAZE_HANG_DUMP_S"]), exit=True)
    variants = tuple(args.variants.split(","))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; expected some of {', '.join(VARIANTS)}")
    group, tp, rank = None, 1, 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=5),
                                device_id=torch.device("cuda", torch.cuda.current_device()))
        group, tp, rank = dist.group.WORLD, dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device())
    bw = copy_bandwidth(device)
    rows = []
    for T in [int(t) for t in args.tokens.split(",")]:
        rows += run(T, device, bw, variants, group)
    if rank == 0:
        import triton

        meta = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                "python": platform.python_version(), "copy_bandwidth_GBps": bw / 1e9, "tp": tp,
                "command": ("torchrun --nproc-per-node {tp} " if tp > 1 else "python ").format(tp=tp)
                + " ".join(sys.argv), "target": ISSUE_TARGET}
        write(rows, meta, Path(args.out), tp)
    if group is not None:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
