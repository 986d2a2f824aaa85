"""The overlapped region alone: one DeepSeek V3.2 MoE block (RMSNorm -> router + routed experts + shared
expert), compiled by braze with and without dual-stream scheduling, timed as a CUDA graph per T.

    python benchmarks/moe_streams.py [--size bench|tiny] [--tokens 1,8,64] [--out FILE.json]

This is the per-layer time of the region dual-stream acts on in the decode step (the router on the
side stream beside the shared expert; see braze/passes/STREAMS_DESIGN.md). `braze-streams-forced`
overlaps the fork even where the cost model says serial, to check that decision. On CPU (no streams) it
only checks that both compiles agree with eager and prints what braze decided.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math

import torch
from torch import nn

import braze
from braze.models.common import RMSNorm, init_random
from braze.models.deepseek_v32 import DeepseekV32Config
from braze.models.moe import MoE, RouterSpec
from braze.passes import branches


class MoEBlock(nn.Module):
    """post_attention_layernorm + mlp of one DeepSeek V3.2 MoE layer (module paths as in the model:
    `layers.0.…`, so braze sees one layer)."""

    def __init__(self, cfg: DeepseekV32Config, device, dtype: torch.dtype):
        super().__init__()
        layer = nn.Module()
        layer.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device=device, dtype=dtype)
        router = RouterSpec(top_k=cfg.top_k, scoring="sigmoid", correction_bias=True, n_group=cfg.n_group,
                            topk_group=cfg.topk_group, renormalize=True, routed_scaling=cfg.routed_scaling)
        layer.mlp = MoE(cfg.hidden_size, cfg.num_experts, cfg.moe_inter, router,
                        shared_inter=cfg.moe_inter * cfg.n_shared_experts, device=device, dtype=dtype)
        self.layers = nn.ModuleList([layer])
        init_random(self, seed=0)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        layer = self.layers[0]
        return h + layer.mlp(layer.post_attention_layernorm(h))  # [T, hidden]


@contextlib.contextmanager
def _forced(on: bool):
    """Overlap every fork the branch analysis finds, whatever the cost model says (to measure what the
    decisions it turned down would have saved)."""
    if not on:
        yield
        return
    saved = branches.MIN_GAIN_S, branches.MIN_GAIN_SHARE
    branches.MIN_GAIN_S = branches.MIN_GAIN_SHARE = -math.inf
    try:  # the config is the same as braze-streams': a cached graph would bring back that compile's decisions
        with torch._inductor.config.patch(fx_graph_cache=False):
            yield
    finally:
        branches.MIN_GAIN_S, branches.MIN_GAIN_SHARE = saved


def run(size: str, tokens: list[int], device: str) -> list[dict]:
    cfg = getattr(DeepseekV32Config, size)()
    block = MoEBlock(cfg, device, torch.bfloat16)
    rows = []
    for t in tokens:
        h = torch.randn(t, cfg.hidden_size, generator=torch.Generator().manual_seed(t)).to(device, torch.bfloat16)
        with torch.no_grad():
            want = block(h)
        for variant in ("braze", "braze-streams", "braze-streams-forced"):
            torch._dynamo.reset()
            be = braze.backend(braze.FusionConfig(dual_stream=variant != "braze"))
            step = torch.compile(block, backend=be, dynamic=False, fullgraph=True)
            with torch.no_grad(), _forced(variant.endswith("forced")):
                got = step(h)
                row = {"tokens": t, "variant": variant,
                       "rel_err_vs_eager": ((got.float() - want.float()).norm() / want.float().norm()).item(),
                       "dual_stream": [r.message for r in braze.report(be).applied if r.name == "dual-stream"],
                       "dual_stream_missed": [r.reason for r in braze.report(be).missed if r.name == "dual-stream"]}
                if device == "cuda":
                    from braze.bench_device import time_cuda_graph

                    timing = time_cuda_graph(lambda step=step, h=h: step(h), warmup=10, replays=100)
                    row["us"] = timing.median_s * 1e6
            rows.append(row)
            print(json.dumps(row), flush=True)
    torch._dynamo.reset()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="bench", choices=("bench", "tiny"))
    p.add_argument("--tokens", default="1")
    p.add_argument("--out")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":  # the pass leaves CPU graphs alone outside tests; here the CPU check wants the rewrite
        import braze.passes.streams

        braze.passes.streams.ON_CPU = True
    rows = run(args.size, [int(t) for t in args.tokens.split(",")], device)
    for t in sorted({r["tokens"] for r in rows}):
        us = {r["variant"]: r.get("us") for r in rows if r["tokens"] == t}
        if us.get("braze") and us.get("braze-streams"):
            print(f"T={t}: MoE block {us['braze']:.1f} us on one stream, {us['braze-streams']:.1f} us with "
                  f"dual-stream as the cost model decides ({us['braze-streams'] - us['braze']:+.1f} us), "
                  f"{us['braze-streams-forced']:.1f} us with every fork overlapped "
                  f"({us['braze-streams-forced'] - us['braze']:+.1f} us)")
    if args.out:
        env = {"torch": torch.__version__, "card": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
        with open(args.out, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
