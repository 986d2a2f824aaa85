"""Benchmark: the gated delta-rule update with the gated RMSNorm of its output in one kernel
(`braze::delta_rule_gated`, one program per value head) against the two kernels it replaces (`braze::delta_rule`
over (token, head, 32-column block) programs, then the row kernel of the gated norm), at Qwen 3.5's bench widths.

    python benchmarks/delta_rule_norm.py [--tokens 1,8,64] [--heads 2,8] [--out DIR]

Each variant is captured in a CUDA graph and timed over replays (median); the floor is the recurrent state's rows
read and written once (plus q, k, v, z read and the output written) over the measured copy bandwidth. Outputs and
states are checked against the two-kernel path.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

import braze.runtime.delta_rule as rt
from braze.bench_device import copy_bandwidth, time_cuda_graph
from braze.models.gated_deltanet import RMSNormGated
from braze.patterns.delta_rule import DeltaRule
from braze.patterns.gated_norm import Gate
from braze.patterns.stages import Cast, RMSNorm, RowChain, WeightMul

WARPS = (4, 8, 16)


def chain(dv: int) -> RowChain:
    """The gated norm as braze meets it in the bench graph: o read as fp32, x̂ cast to bf16, times w, times silu(z)."""
    norm = RMSNorm(1e-6, dv, "float32", "float32", "float32", "float32",
                   (Cast("bfloat16"), WeightMul("bfloat16", "bfloat16")), store=True)
    return RowChain("float32", None, norm, None, Gate("float32", "float32", "bfloat16"))


def run(T: int, hk: int, hv: int, dk: int, dv: int, bw: float) -> list[dict]:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(T)
    spec = DeltaRule(hk, hv, dk, dv, dk ** -0.5, identity=True)
    c = chain(dv)
    q, k = (torch.nn.functional.normalize(torch.randn(T, hk, dk, device=dev, generator=g), dim=-1) for _ in range(2))
    v = torch.randn(T, hv, dv, device=dev, generator=g).bfloat16()
    gate = -torch.nn.functional.softplus(torch.randn(T, hv, device=dev, generator=g))
    beta = torch.sigmoid(torch.randn(T, hv, device=dev, generator=g))
    state0 = torch.randn(max(T, 64), hv, dk, dv, device=dev, generator=g) * 0.3
    z = torch.randn(T, hv, dv, device=dev, generator=g).bfloat16()
    w = RMSNormGated(dv, device=dev, dtype=torch.bfloat16).weight
    state = state0.clone()

    def split():
        o = torch.ops.braze.delta_rule_first_rows(q, k, v, gate, beta, state, spec.to_json())
        return torch.ops.braze.fused_rowwise([o, w, z], c.to_json())[0]

    def fused():
        return torch.ops.braze.delta_rule_gated(q, k, v, gate, beta, None, state, [w, z], spec.to_json(),
                                                c.to_json())[0]

    want = split()
    want_state = state.clone()
    floor_s = (2 * T * hv * dk * dv * 4 + T * (2 * hk * dk * 4 + hv * dv * 2 * 3)) / bw
    rows = []
    for name, fn, warps in [("two kernels", split, None)] + [(f"one kernel, {n} warps", fused, n) for n in WARPS]:
        rt.GATED_WARPS = warps
        state.copy_(state0)
        got = fn()
        ok = torch.equal(got, want) and torch.equal(state, want_state)
        diff = float((got.float() - want.float()).abs().max())
        timing = time_cuda_graph(fn, warmup=20, replays=200)
        rows.append({"T": T, "heads_k": hk, "heads_v": hv, "variant": name, "us": timing.median_s * 1e6,
                     "floor_us": floor_s * 1e6, "bit_equal": ok, "max_abs_diff": diff})
        print(f"T={T:3d} Hv={hv:3d} {name:22s} {timing.median_s * 1e6:7.2f} us (floor {floor_s * 1e6:.2f}) "
              f"equal {ok} max diff {diff:.3g}", flush=True)
    rt.GATED_WARPS = None
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,8,64")
    ap.add_argument("--heads", default="2,8", help="key,value heads per rank (bench: TP=8 per-rank 2, 8)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("delta_rule_norm benchmark: needs a CUDA GPU", file=sys.stderr)
        return 2
    hk, hv = (int(x) for x in args.heads.split(","))
    bw = copy_bandwidth(torch.device("cuda"))
    rows = []
    for T in (int(t) for t in args.tokens.split(",")):
        rows += run(T, hk, hv, 128, 128, bw)
    import triton

    meta = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "copy_bandwidth_GBps": bw / 1e9,
            "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}
    lines = ["# The gated norm inside the delta-rule kernel vs the two kernels it replaces", "",
             f"Card: {meta['card']}; torch {meta['torch']}, triton {meta['triton']}; copy bandwidth "
             f"{meta['copy_bandwidth_GBps']:.0f} GB/s. Command: `{meta['command']}`. dk = dv = 128, bf16 v and z; "
             "median of 200 CUDA-graph replays.", "",
             "| T | heads (k, v) | variant | µs | floor µs | equal to two kernels (max abs diff) |",
             "|---:|---|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['T']} | {r['heads_k']}, {r['heads_v']} | {r['variant']} | {r['us']:.2f} | "
                     f"{r['floor_us']:.2f} | {r['bit_equal']} ({r['max_abs_diff']:.3g}) |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "delta_rule_norm.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "delta_rule_norm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
