"""Benchmark: Qwen 3.5's layers one at a time, eager vs stock Inductor vs braze, under CUDA graphs (issue 6).

    python benchmarks/qwen_layers.py [--tokens 1,8,64] [--blocks linear-mixer,full-mixer,linear-layer,full-layer]
        [--variants eager,inductor,braze[,braze-no-norm-fold,...]] [--out DIR]

The bench config (TP=1), T sequences of 512 cached tokens each decoding one token. A block is one of

- linear-mixer: layer 0's Gated DeltaNet (in_proj GEMMs, conv update, q/k L2 norm, gating, the recurrent
  update, gated RMSNorm, out_proj), on the normed hidden state;
- full-mixer: layer 3's gated attention (qkv GEMM, zero-centered QK-norm, partial RoPE, KV-cache write,
  paged attention, sigmoid output gate, o_proj);
- linear-layer / full-layer: the whole decoder layer (input norm, mixer, residual, post norm, MoE, residual).

For each block and T: µs (median of CUDA-graph replays), kernels (profiler), device µs by kernel kind (GEMM,
grouped GEMM, attention, Inductor Triton, braze, other), each braze kernel's µs, and two floors over the copy
bandwidth measured on the card: the block's (its weights — routed experts: the T·k of E a step reads while T·k < E, else all — and
its state or cache traffic) and the non-GEMM floor (the state/cache traffic alone, what the pointwise work
around the GEMMs must at least move: the GDN's conv and recurrent state rows read and written, the KV rows
attention reads). Every variant's output and the states it leaves are compared with eager's.

The comparison the issue asks for, each fused kernel against the stock kernels it replaces, is the
"non-GEMM" columns: braze's kernels plus whatever Inductor kernels remain vs stock Inductor's Triton kernels
and other non-GEMM kernels of the same block.
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
from braze.bench_variants import VARIANT_SWITCHES
from braze.models import build
from braze.models.common import make_decode_inputs
from braze.models.qwen3_5 import StepInputs

BLOCKS = ("linear-mixer", "full-mixer", "linear-layer", "full-layer")
VARIANTS = ("eager", "inductor", "braze")
GEMM_KINDS = ("GEMM", "grouped GEMM")


def block_module(model, block: str):
    layer = model.layers[0 if block.startswith("linear") else model.config.layer_types.index("full_attention")]
    if block.endswith("mixer"):
        return layer.linear_attn if block.startswith("linear") else layer.self_attn
    return layer


def state_bytes(mod, T: int, seq_lens: torch.Tensor) -> int:
    """Bytes of state and cache the block must move for T tokens: GDN conv and recurrent state rows read and
    written; each attention token's cached K and V rows read (its new row written)."""
    total = 0
    for m in mod.modules():
        if hasattr(m, "ssm_state"):
            total += 2 * T * (m.conv_state[0].numel() * m.conv_state.element_size()
                              + m.ssm_state[0].numel() * m.ssm_state.element_size())
        if hasattr(m, "k_cache"):
            row = m.k_cache.shape[-2] * m.k_cache.shape[-1] * m.k_cache.element_size()  # one token, K or V
            total += 2 * row * int(seq_lens.sum()) + 2 * row * T
    return total


def weight_bytes(mod, T: int) -> int:
    """Parameters a step of T tokens reads: all, but of a MoE's routed experts only `experts_read` of E."""
    from braze.models.moe import MoE, experts_read

    total = sum(p.numel() * p.element_size() for p in mod.parameters())
    for m in mod.modules():
        if isinstance(m, MoE):
            routed = sum(p.numel() * p.element_size() for p in m.experts.parameters())
            E = m.gate.weight.shape[0]
            total -= routed - routed * experts_read(T, m.router.top_k, E) // E
    return total


def run_block(model, block: str, T: int, batch, bw: float, variants: tuple[str, ...]) -> list[dict]:
    mod = block_module(model, block)
    ids, positions, slot_mapping, block_table, seq_lens = batch[:5]
    cos, sin = model.rotary(positions)
    step = StepInputs(cos, sin, slot_mapping, block_table, seq_lens, torch.arange(T, device=ids.device))
    gen = torch.Generator(device=ids.device).manual_seed(T)
    x = torch.randn(T, model.config.hidden_size, device=ids.device, generator=gen).to(model.embed_tokens.dtype)
    buffers = dict(mod.named_buffers())
    before = {k: v.clone() for k, v in buffers.items()}
    with torch.no_grad():
        ref = mod(x, step)
    ref_state = {k: v.clone() for k, v in buffers.items() if not torch.equal(v, before[k])}
    floor_s = (weight_bytes(mod, T) + state_bytes(mod, T, seq_lens)) / bw
    non_gemm_floor_s = state_bytes(mod, T, seq_lens) / bw
    rows = []
    for variant in variants:
        torch._dynamo.reset()
        for k, v in buffers.items():
            v.copy_(before[k])
        be = braze.backend(braze.FusionConfig(**VARIANT_SWITCHES.get(variant, {}))) \
            if variant.startswith("braze") else None
        fn = mod if variant == "eager" else torch.compile(mod, fullgraph=True, dynamic=False,
                                                          backend=be or "inductor")
        with torch.no_grad():
            out = fn(x, step)
            err = float((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30))
            state_err = max((float((buffers[k].float() - v.float()).norm() / v.float().norm().clamp(min=1e-30))
                             for k, v in ref_state.items()), default=0.0)
            call = lambda: fn(x, step)  # noqa: E731
            kc = count_cuda_kernels(call)
            timing = time_cuda_graph(call, warmup=20, replays=200)
        by_kind = kc.to_dict()["by_kind"]
        gemm_us = sum(v["us"] for k, v in by_kind.items() if k in GEMM_KINDS)
        gemm_n = sum(v["kernels"] or 0 for k, v in by_kind.items() if k in GEMM_KINDS)
        other_us = sum(v["us"] for k, v in by_kind.items() if k not in GEMM_KINDS and k != "memcpy/memset")
        row = {"block": block, "T": T, "variant": variant, "us": timing.median_s * 1e6,
               "p10_us": timing.p10_s * 1e6, "p90_us": timing.p90_s * 1e6, "kernels": kc.kernels,
               "memcpy": kc.memcpy, "memset": kc.memset, "gemm_kernels": gemm_n, "gemm_us": gemm_us,
               "non_gemm_kernels": kc.kernels - gemm_n, "non_gemm_us": other_us, "by_kind": by_kind,
               "braze_kernels_us": {k: v for k, v in kc.time_us.items() if k.startswith("braze_")},
               "floor_us": floor_s * 1e6, "x_floor": timing.median_s / floor_s,
               "non_gemm_floor_us": non_gemm_floor_s * 1e6, "rel_err": err, "state_rel_err": state_err}
        if be is not None:
            rep = braze.report(be)
            row["applied"] = [f"{r.pass_name}: {' -> '.join(r.ops)}" for r in rep.applied]
            row["missed"] = [f"{r.pass_name}/{r.name}: {r.reason}" for r in rep.missed]
        rows.append(row)
        print(f"{block:12s} T={T:3d} {variant:9s} {row['us']:8.1f} us  {kc.kernels:3d} kernels "
              f"({row['non_gemm_kernels']} non-GEMM, {other_us:.1f} us)  {row['x_floor']:.2f}x floor  "
              f"rel err {err:.2e} state {state_err:.2e}", flush=True)
    for k, v in buffers.items():
        v.copy_(before[k])
    return rows


def render(meta: dict, rows: list[dict]) -> str:
    lines = ["# Qwen 3.5 layers one at a time (bench config, TP=1, bf16): eager vs stock Inductor vs braze", "",
             f"Card: {meta['card']}; torch {meta['torch']}, triton {meta['triton']}, Python {meta['python']}; copy "
             f"bandwidth {meta['copy_bandwidth_GBps']:.0f} GB/s. Command: `{meta['command']}`.",
             "Timing: median of 200 CUDA-graph replays after 20 warm-up ones (the block alone, static shapes); "
             "kernels and their device time from the profiler (one call outside a graph). Floor: the block's "
             "weight bytes (routed experts: T·k of E while T·k < E, else all E) plus its state and cache traffic, over "
             "the copy bandwidth. Non-GEMM floor: the state and cache traffic alone. Errors: relative Frobenius "
             "error of the output and of the states the block writes, vs eager.", "",
             "| block | T | variant | µs | kernels (GEMM + other) | × floor | floor µs | non-GEMM µs | "
             "non-GEMM floor µs | rel err out / state |",
             "|---|---:|---|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['block']} | {r['T']} | {r['variant']} | {r['us']:.1f} | {r['kernels']} "
                     f"({r['gemm_kernels']} + {r['non_gemm_kernels']}) | {r['x_floor']:.2f} | {r['floor_us']:.1f} | "
                     f"{r['non_gemm_us']:.1f} | {r['non_gemm_floor_us']:.2f} | "
                     f"{r['rel_err']:.1e} / {r['state_rel_err']:.1e} |")
    lines += ["", "Each braze kernel (profiler µs per call):", ""]
    for r in rows:
        if r["variant"] == "braze":
            mine = ", ".join(f"`{k[:48]}` {v:.1f}" for k, v in r["braze_kernels_us"].items())
            lines.append(f"- {r['block']} T={r['T']}: {mine or 'none'}")
    lines += ["", "What braze applied and missed:", ""]
    for r in rows:
        if r["variant"] == "braze":
            lines.append(f"- {r['block']} T={r['T']}: applied {'; '.join(r['applied']) or 'nothing'}"
                         + (f"; missed {'; '.join(r['missed'])}" if r["missed"] else ""))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,8,64")
    ap.add_argument("--blocks", default=",".join(BLOCKS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    blocks, variants = tuple(args.blocks.split(",")), tuple(args.variants.split(","))
    for got, allowed in ((blocks, BLOCKS), (variants, VARIANTS + tuple(VARIANT_SWITCHES))):
        if set(got) - set(allowed):
            ap.error(f"unknown {sorted(set(got) - set(allowed))}; expected some of {', '.join(allowed)}")
    if not torch.cuda.is_available():
        print("qwen_layers benchmark: needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    tokens = [int(t) for t in args.tokens.split(",")]
    bw = copy_bandwidth(device)
    model = build("qwen3.5", "bench", device=device, dtype=torch.bfloat16, max_batch=max(tokens),
                  max_context=args.context + 1, seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        full = make_decode_inputs(model, max(tokens), args.context, gen)
    rows = []
    for T in tokens:
        batch = tuple(t[:T] for t in full)
        for block in blocks:
            rows += run_block(model, block, T, batch, bw, variants)
    import triton

    meta = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "copy_bandwidth_GBps": bw / 1e9,
            "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "qwen3.5_layers.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "qwen3.5_layers.md").write_text(render(meta, rows))
    print(render(meta, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
