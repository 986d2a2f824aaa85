"""Study: decode-time GEMMs (few token rows against a large weight) — cuBLAS via torch.mm vs a plain Triton kernel.

    python benchmarks/skinny_gemm.py [--tokens 1,8,64] [--out DIR]

Why: at T = 1..64 a decode GEMM y[T, N] = x[T, K] · W[N, K]ᵀ is a read of W (2·N·K bytes) and little
else, so its floor is those bytes over the copy bandwidth. The DeepSeek V3.2 attention prologue's five
projections read 69.7 MB in 41.5 µs of device time on an H100 (benchmarks/results/deepseek_prologue.md),
~1.7 TB/s against ~2.9 TB/s copy bandwidth, and the issue-4 target (≤ 1.8× the floor for the whole
prologue) cannot be met while the GEMMs alone take 1.74× of it. This script measures, per weight shape
of the three bench configs, how close torch.mm (what stock Inductor and braze call) and a simple Triton
kernel (best of a small sweep of tile shapes: an autotuned choice, said so in the table) come to the
floor. It changes nothing in braze; it decides whether a decode-GEMM kernel is worth building.

Timing: a CUDA graph that runs the GEMM over `copies` distinct weight buffers (4× L2 in all, at most 128) so
calls read HBM, median of replays, divided by the copies.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import triton
import triton.language as tl

# (model, weight, N, K) at the bench configs (TP=1 except DeepSeek's per-rank TP=8 heads)
SHAPES = [
    ("deepseek-v3.2", "fused_qkv_a_proj", 2112, 7168),
    ("deepseek-v3.2", "indexer.wk_weights_proj", 192, 7168),
    ("deepseek-v3.2", "q_b_proj", 3072, 1536),
    ("deepseek-v3.2", "indexer.wq_b", 8192, 1536),
    ("deepseek-v3.2", "qkv_a ‖ wk_weights (merged)", 2304, 7168),
    ("deepseek-v3.2", "q_b ‖ wq_b (merged)", 11264, 1536),
    ("deepseek-v3.2", "o_proj", 7168, 2048),
    ("qwen3.5", "in_proj_qkvz", 16384, 4096),
    ("qwen3.5", "in_proj_ba", 128, 4096),
    ("qwen3.5", "out_proj", 4096, 8192),
    ("minimax-m2.5", "qkv_proj", 8192, 3072),
    ("minimax-m2.5", "o_proj", 3072, 6144),
]


@triton.jit
def skinny_mm_kernel(x_ptr, w_ptr, y_ptr, T, N, K: tl.constexpr, stride_xt, stride_wn, stride_yt,
                     BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # one program: BLOCK_N output columns for every token row; reads its BLOCK_N weight rows once
    n0 = tl.program_id(0) * BLOCK_N
    rt = tl.arange(0, BLOCK_T)
    rn = n0 + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        w = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K),
                    other=0.0)  # [BLOCK_N, BLOCK_K]
        x = tl.load(x_ptr + rt[:, None] * stride_xt + kk[None, :], mask=(rt[:, None] < T) & (kk[None, :] < K),
                    other=0.0)  # [BLOCK_T, BLOCK_K]
        if BLOCK_T >= 16 and BLOCK_N >= 16:
            acc = tl.dot(x, tl.trans(w), acc)
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    tl.store(y_ptr + rt[:, None] * stride_yt + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rt[:, None] < T) & (rn[None, :] < N))


def skinny_mm(x: torch.Tensor, w: torch.Tensor, block_n: int, block_k: int, warps: int,
              out: torch.Tensor | None = None) -> torch.Tensor:
    T, K = x.shape
    N = w.shape[0]
    y = torch.empty(T, N, dtype=x.dtype, device=x.device) if out is None else out
    block_t = max(1, triton.next_power_of_2(T))
    skinny_mm_kernel[(triton.cdiv(N, block_n),)](x, w, y, T, N, K, x.stride(0), w.stride(0), y.stride(0),
                                                 BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k,
                                                 num_warps=warps)
    return y


def configs(T: int) -> list[tuple[int, int, int]]:
    """(BLOCK_N, BLOCK_K, warps) swept per shape: a small grid, enough to see what the kernel can do."""
    if T >= 16:
        return [(bn, bk, 4) for bn in (32, 64) for bk in (64, 128)]
    bk = 256 if T > 4 else 512
    return [(bn, bk, w) for bn in (2, 4, 8, 16) for w in (4, 8)]


def time_per_call(fn, copies: int, replays: int = 50) -> float:
    """µs per call: one CUDA graph runs fn(i) for every weight copy i; median replay / copies."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(copies):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(copies):
            fn(i)
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / copies)
    return sorted(times)[len(times) // 2]


def measure(T: int, model: str, name: str, N: int, K: int, bw: float, l2: int) -> dict:
    """One shape at T tokens: torch.mm and the best Triton config, µs per call, against the floor."""
    dev = torch.device("cuda")
    wbytes = N * K * 2
    copies = max(4, min(128, -(-4 * l2 // wbytes)))  # > L2 in all but the smallest weights
    ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) * K**-0.5 for _ in range(copies)]
    x = torch.randn(T, K, device=dev, dtype=torch.bfloat16)
    ref = x.float() @ ws[0].float().t()
    ys = torch.empty(copies, T, N, device=dev, dtype=torch.bfloat16)
    t_mm = time_per_call(lambda i: torch.mm(x, ws[i].t(), out=ys[i]), copies)
    best = None
    for cfg in configs(T):
        y = skinny_mm(x, ws[0], *cfg)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, f"{name} T={T} config {cfg}: rel err {err:.2e}"
        t = time_per_call(lambda i, c=cfg: skinny_mm(x, ws[i], *c, out=ys[i]), copies)
        if best is None or t < best[0]:
            best = (t, cfg, err)
    floor = (wbytes + 2 * T * (K + N)) / bw * 1e6
    print(f"T={T:3d} {model:14s} {name:30s} N={N:6d} K={K:5d} floor {floor:6.2f} µs  torch.mm "
          f"{t_mm:6.2f} ({t_mm / floor:4.2f}×)  triton {best[0]:6.2f} ({best[0] / floor:4.2f}×) {best[1]}", flush=True)
    return {"model": model, "weight": name, "T": T, "N": N, "K": K, "weight_mb": wbytes / 1e6, "floor_us": floor,
            "copies": copies, "torch_mm_us": t_mm, "triton_us": best[0], "triton_config": best[1],
            "triton_rel_err": best[2]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,8,64")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    dev = torch.device("cuda")
    from braze.bench_device import copy_bandwidth

    bw = copy_bandwidth(dev)  # bytes/s, read + write
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    rows = [measure(T, *shape, bw, l2) for T in (int(t) for t in args.tokens.split(",")) for shape in SHAPES]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"card": torch.cuda.get_device_name(dev), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "copy_bandwidth_gbs": bw / 1e9}
    (out / "skinny_gemm.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    lines = [
        "# Decode GEMMs: torch.mm (cuBLAS) vs a plain Triton kernel, against the weight-read floor",
        "",
        (f"Card: {env['card']}; torch {env['torch']}, triton {env['triton']}, Python {env['python']}; copy "
         f"bandwidth {bw / 1e9:.0f} GB/s. Command: `python benchmarks/skinny_gemm.py --tokens {args.tokens}`."),
        ("Timing: CUDA graph over distinct weight copies (4× L2 in all, at most 128 copies), median of 50 "
         "replays, per call. Triton: best of a sweep of (BLOCK_N, BLOCK_K, warps) per row, i.e. autotuned; "
         "every config checked against fp32 (rel err < 1e-2). Floor: weight + activation bytes over the copy "
         "bandwidth."),
        "",
        "| T | model | weight | N | K | MB | floor µs | torch.mm µs (× floor) | Triton µs (× floor) | Triton config |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['T']} | {r['model']} | {r['weight']} | {r['N']} | {r['K']} | {r['weight_mb']:.1f} | "
                     f"{r['floor_us']:.2f} | {r['torch_mm_us']:.2f} ({r['torch_mm_us'] / r['floor_us']:.2f}×) | "
                     f"{r['triton_us']:.2f} ({r['triton_us'] / r['floor_us']:.2f}×) | {r['triton_config']} |")
    (out / "skinny_gemm.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
