"""Diagnostic: which pairing of a MoE block's branches pays on two streams. braze's dual-stream runs the router
beside the shared expert, then the routed experts (the routed experts read the router's output, so the branch
analysis joins there). The other pairing runs the shared expert beside the router *and* the routed experts,
joined at the final add: the shared expert's GEMMs (~3.1 TB/s alone on an H200) would share HBM with the
routed experts' instead of taking their own time.

This script measures that pairing by hand before the analysis is taught it: the block's pieces are compiled
by braze apart (dual-stream off), then called on one stream or on two (the shared expert on a side stream),
captured as CUDA graphs and timed interleaved beside braze's own block (one stream; dual-stream as decided).

    python benchmarks/diag/moe_pairing.py [--model deepseek-v3.2|qwen3.5] [--tokens 1,8] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import braze
from braze import models
from braze.bench_device import capture_cuda_graph, replay_timeline
from braze.models.moe import route

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_streams import MoEBlock, _interleaved_us


def _pieces(block: MoEBlock):
    """norm, routed (router + routed experts), shared (shared expert, gated where the model gates it)."""
    (layer,) = block.layers.values()
    mlp = layer.mlp

    def routed(xn: torch.Tensor) -> torch.Tensor:
        weights, idx = route(mlp.gate(xn.to(mlp.router.dtype)), mlp.router, mlp.e_score_correction_bias)
        return mlp.experts(xn, weights, idx)

    def shared(xn: torch.Tensor) -> torch.Tensor:
        s = mlp.shared_expert(xn)
        return s * torch.sigmoid(mlp.shared_expert_gate(xn)) if mlp.shared_expert_gate is not None else s

    return layer.post_attention_layernorm, routed, shared


def run(model_name: str, tokens: list[int], size: str = "bench") -> list[dict]:
    cuda = torch.cuda.is_available()  # on CPU (a smoke run): only the results against eager
    model = models.build(model_name, size, device="cuda" if cuda else "cpu", dtype=torch.bfloat16,
                         max_batch=max(tokens), max_context=8)
    block = MoEBlock(model).eval()
    norm, routed, shared = _pieces(block)
    rows = []
    for t in tokens:
        torch._dynamo.reset()
        h = torch.randn(t, block.hidden, generator=torch.Generator().manual_seed(t)).to(block.layers[next(iter(block.layers))].post_attention_layernorm.weight.device, torch.bfloat16)
        off = braze.FusionConfig(dual_stream=False)
        c = {name: torch.compile(fn, backend=braze.backend(off), dynamic=False, fullgraph=True)
             for name, fn in (("norm", norm), ("routed", routed), ("shared", shared))}
        side = torch.cuda.Stream() if cuda else None

        def serial(h=h, c=c):
            xn = c["norm"](h)
            return h + c["routed"](xn) + c["shared"](xn)

        def shared_beside(h=h, c=c, side=side):
            xn = c["norm"](h)
            if side is None:
                return h + c["routed"](xn) + c["shared"](xn)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                s = c["shared"](xn)
            r = c["routed"](xn)
            torch.cuda.current_stream().wait_stream(side)
            return h + r + s

        steps = {"pieces-serial": serial, "pieces-shared-beside-routed": shared_beside}
        for variant, cfg in (("block-one-stream", off), ("block-dual-stream", braze.FusionConfig())):
            steps[variant] = torch.compile(block, backend=braze.backend(cfg), dynamic=False, fullgraph=True)
        graphs, row = {}, {"model": model_name, "tokens": t}
        with torch.no_grad():
            want = block(h).float()
            for name, fn in steps.items():
                got = (fn(h) if name.startswith("block") else fn()).float()
                row[f"{name}_rel_err"] = ((got - want).norm() / want.norm()).item()
                if cuda:
                    graphs[name] = capture_cuda_graph((lambda fn=fn: fn(h)) if name.startswith("block") else fn)
        if not cuda:
            print(json.dumps(row), flush=True)
            rows.append(row)
            continue
        us = _interleaved_us(graphs)
        row["us"] = us
        row["timeline"] = {name: replay_timeline(g, keep_records=True).to_dict() for name, g in graphs.items()}
        print(f"{model_name} T={t}: " + ", ".join(f"{k} {v:.1f} us" for k, v in us.items()), flush=True)
        rows.append(row)
        del graphs
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deepseek-v3.2", choices=models.MODEL_NAMES)
    p.add_argument("--tokens", default="1")
    p.add_argument("--size", default="bench", choices=("bench", "tiny"))
    p.add_argument("--out")
    args = p.parse_args()
    rows = run(args.model, [int(t) for t in args.tokens.split(",")], args.size)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": {"torch": torch.__version__, "card": torch.cuda.get_device_name() if torch.cuda.is_available()
                               else "cpu"}, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
