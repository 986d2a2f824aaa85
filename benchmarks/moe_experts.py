"""Benchmark: the routed SwiGLU experts of a decode step alone, eager vs stock Inductor vs braze (moe-experts), H100.

    python benchmarks/moe_experts.py [--models deepseek-v3.2,qwen3.5,minimax-m2.5] [--tokens 1,4,8,32]
        [--experts real,bench] [--out DIR]

The block is braze.models.moe.Experts, the experts as the three models run them: below T·k < E the
(token, expert) pairs are sorted by expert and run as two grouped GEMMs (`torch._grouped_mm`), which
stock Inductor keeps and braze replaces by its two fused kernels. Dims are each model's hidden size,
expert width and top-k, with its real expert count (DeepSeek V3.2 256, Qwen 3.5 512, MiniMax-M2.5 256)
and the bench configs' 16. Each token routes to k distinct random experts; tokens may share experts.

Per row: µs (median of 200 CUDA-graph replays), kernels (profiler, one call outside a graph) and the
braze kernels' µs, the floor = the distinct chosen experts' weight bytes (3·H·I·2 each) over the copy
bandwidth measured on the card, and the relative Frobenius error against an fp32 computation of the same
math (bf16 weights and inputs, fp32 arithmetic, no intermediate rounding).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

import braze
from braze.bench_device import copy_bandwidth, count_cuda_kernels, time_cuda_graph
from braze.models.moe import Experts

# model -> (hidden, expert width, top-k, real expert count)
DIMS = {"deepseek-v3.2": (7168, 2048, 8, 256), "qwen3.5": (4096, 1024, 10, 512), "minimax-m2.5": (3072, 1536, 8, 256)}
VARIANTS = ("eager", "inductor", "braze")


def fp32_reference(m: Experts, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
    for t in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            gate, up = (m.w13[e].float() @ x[t].float()).chunk(2)
            out[t] += weights[t, j] * (m.w2[e].float() @ (torch.nn.functional.silu(gate) * up))
    return out


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def run(model: str, experts: int, T: int, bw: float, variants: tuple[str, ...]) -> list[dict]:
    hid, inter, k, _ = DIMS[model]
    torch.manual_seed(0)
    m = Experts(experts, hid, inter, device="cuda", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        m.w13.normal_(0, hid ** -0.5)
        m.w2.normal_(0, inter ** -0.5)
    x = torch.randn(T, hid, device="cuda").to(torch.bfloat16)
    idx = torch.stack([torch.randperm(experts, device="cuda")[:k] for _ in range(T)])
    weights = torch.rand(T, k, device="cuda").softmax(-1)
    distinct = int(idx.unique().numel())
    floor_s = distinct * 3 * hid * inter * 2 / bw
    with torch.no_grad():
        ref = fp32_reference(m, x, weights, idx)
        eager = m(x, weights, idx)
    rows = []
    for variant in variants:
        torch._dynamo.reset()
        be = braze.backend() if variant == "braze" else None
        fn = m if variant == "eager" else torch.compile(m, backend=be or "inductor", fullgraph=True)
        with torch.no_grad():
            y = fn(x, weights, idx)
            call = lambda: fn(x, weights, idx)  # noqa: E731
            kc = count_cuda_kernels(call)
            timing = time_cuda_graph(call, warmup=20, replays=200)
        row = {"model": model, "experts": experts, "T": T, "top_k": k, "hidden": hid, "inter": inter,
               "distinct_experts": distinct, "variant": variant, "us": timing.median_s * 1e6,
               "p10_us": timing.p10_s * 1e6, "p90_us": timing.p90_s * 1e6, "kernels": kc.kernels,
               "kernel_names": kc.names, "kernel_us": kc.time_us, "floor_us": floor_s * 1e6,
               "x_floor": timing.median_s / floor_s, "rel_err_fp32": relerr(y, ref), "rel_err_eager": relerr(y, eager),
               "bit_equal_eager": float((y == eager).float().mean())}
        if be is not None:
            rep = braze.report(be)
            row["applied"] = [f"{r.pass_name}: {r.message}" for r in rep.applied]
            row["missed"] = [f"{r.pass_name}/{r.name}: {r.reason}" for r in rep.missed]
        rows.append(row)
        print(f"{model:14s} E={experts:3d} T={T:3d} {variant:9s} {row['us']:8.1f} us {kc.kernels:3d} kernels "
              f"{row['x_floor']:.2f}x floor ({row['floor_us']:.1f} us, {distinct} experts) err fp32 "
              f"{row['rel_err_fp32']:.2e} eager {row['rel_err_eager']:.2e}", flush=True)
    del m
    torch.cuda.empty_cache()
    return rows


def render(meta: dict, rows: list[dict]) -> str:
    lines = ["# Routed experts alone (eager vs stock Inductor vs braze's moe-experts), bf16", "",
             f"Card: {meta['card']}; torch {meta['torch']}, triton {meta['triton']}, Python {meta['python']}; "
             f"copy bandwidth {meta['copy_bandwidth_GBps']:.0f} GB/s; commit {meta['commit']}. Command: "
             f"`{meta['command']}`.",
             "Timing: median of 200 CUDA-graph replays after 20 warm-up ones; kernels from the profiler (one call "
             "outside a graph). Floor: the distinct chosen experts' weights (3·H·I bf16 each) over the copy "
             "bandwidth. Error: relative Frobenius error vs an fp32 computation of the same math.", "",
             "| model | E | T | k | distinct experts | variant | µs | × floor | floor µs | kernels | rel err vs fp32 |"
             " bit-equal to eager |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['experts']} | {r['T']} | {r['top_k']} | {r['distinct_experts']} | "
                     f"{r['variant']} | {r['us']:.1f} | {r['x_floor']:.2f} | {r['floor_us']:.1f} | {r['kernels']} | "
                     f"{r['rel_err_fp32']:.1e} | {r['bit_equal_eager']:.0%} |")
    lines += ["", "braze's kernels (profiler µs per call) and what it applied or missed:", ""]
    for r in rows:
        if r["variant"] == "braze":
            mine = ", ".join(f"`{k}` {v:.1f}" for k, v in r["kernel_us"].items() if k.startswith("braze_"))
            lines.append(f"- {r['model']} E={r['experts']} T={r['T']}: {mine or 'no braze kernel'}; "
                         f"applied {len(r['applied'])}" + (f"; missed {'; '.join(r['missed'])}" if r["missed"] else ""))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(DIMS))
    ap.add_argument("--tokens", default="1,4,8,32")
    ap.add_argument("--experts", default="real,bench", help="real (each model's count), bench (16), or both")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("moe_experts benchmark: needs a CUDA GPU", file=sys.stderr)
        return 2
    bw = copy_bandwidth(torch.device("cuda"))
    variants = tuple(args.variants.split(","))
    rows = []
    for model in args.models.split(","):
        for which in args.experts.split(","):
            experts = DIMS[model][3] if which == "real" else 16
            for T in (int(t) for t in args.tokens.split(",")):
                if T * DIMS[model][2] >= experts:  # the model runs every expert densely there: nothing to fuse
                    continue
                rows += run(model, experts, T, bw, variants)
    import triton

    from braze.bench_device import environment

    env = environment(torch.device("cuda"))
    meta = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "copy_bandwidth_GBps": bw / 1e9, "commit": env.get("git_commit"),
            "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "moe_experts.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "moe_experts.md").write_text(render(meta, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
