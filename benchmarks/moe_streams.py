"""The overlapped region alone: one MoE block of a model (RMSNorm -> router + routed experts (+ shared
expert)), compiled by braze with and without dual-stream scheduling, timed as CUDA graphs per T, the variants'
replays interleaved.

    python benchmarks/moe_streams.py [--model deepseek-v3.2|minimax-m2.5|qwen3.5] [--size bench|tiny]
        [--tokens 1,8,64] [--out FILE.json]

This is the per-layer time of the region dual-stream acts on in the decode step (DeepSeek V3.2: the
shared expert on the side stream beside the router and the routed experts; see braze/passes/STREAMS_DESIGN.md).
Variants:
`braze-no-streams` (one stream), `braze` (the defaults: dual-stream where the cost model says it pays),
`braze-streams-forced` (every fork overlapped, even where the cost model says serial, to check that
decision), with --side-high `braze-side-high` (the defaults with the side stream at the device's highest
priority). Each variant's row has the timeline of one replay (`bench_device.replay_timeline`, every kernel's
start and stream). On CPU (no streams) it only checks that both compiles agree with eager and prints what braze
decided.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics

import torch
from torch import nn

import braze
import braze.runtime.streams
from braze import models
from braze.bench_device import capture_cuda_graph, replay_timeline
from braze.models.moe import MoE
from braze.passes import branches

VARIANTS = ("braze-no-streams", "braze", "braze-streams-forced")
# --side-high adds the defaults with the side stream at the device's highest priority (session 18: no change)
SIDE_HIGH = "braze-side-high"


class MoEBlock(nn.Module):
    """post_attention_layernorm + mlp of one MoE layer of a built model, under the model's own module
    paths (`layers.<i>.…`), so braze sees and names one layer as in the step."""

    def __init__(self, model: nn.Module):
        super().__init__()
        index, layer = next((i, l) for i, l in enumerate(model.layers) if isinstance(l.mlp, MoE))
        block = nn.Module()
        block.post_attention_layernorm, block.mlp = layer.post_attention_layernorm, layer.mlp
        self.layers = nn.ModuleDict({str(index): block})
        self.hidden = layer.post_attention_layernorm.weight.shape[-1]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        (layer,) = self.layers.values()
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


@contextlib.contextmanager
def _side_priority(variant: str):
    """The side stream at the device's highest priority for `braze-side-high` (kept by the kernels captured)."""
    saved = braze.runtime.streams.SIDE_PRIORITY
    braze.runtime.streams.SIDE_PRIORITY = "high" if variant == SIDE_HIGH else saved
    try:
        yield
    finally:
        braze.runtime.streams.SIDE_PRIORITY = saved


def _interleaved_us(graphs: dict[str, torch.cuda.CUDAGraph], rounds: int = 10, replays: int = 50) -> dict:
    """Median µs per replay of each graph, timed in rounds that rotate which graph goes first: a graph timed
    right after a compile reads ~10 µs slow on the H200 (clocks still low), which one-after-the-other
    timing charged to whichever variant came first."""
    samples: dict[str, list[float]] = {name: [] for name in graphs}
    names = list(graphs)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            for _ in range(10):
                graphs[name].replay()
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(replays)]
            for start, end in events:
                start.record()
                graphs[name].replay()
                end.record()
            torch.cuda.synchronize()
            samples[name] += [start.elapsed_time(end) * 1e3 for start, end in events]
    return {name: statistics.median(v) for name, v in samples.items()}


def run(model_name: str, size: str, tokens: list[int], device: str, variants: tuple[str, ...] = VARIANTS) -> list[dict]:
    model = models.build(model_name, size, device=device, dtype=torch.bfloat16, max_batch=max(tokens), max_context=8)
    block = MoEBlock(model).eval()
    rows = []
    for t in tokens:
        h = torch.randn(t, block.hidden, generator=torch.Generator().manual_seed(t)).to(device, torch.bfloat16)
        with torch.no_grad():
            want = block(h)
        graphs, by_variant = {}, {}
        for variant in variants:
            torch._dynamo.reset()
            be = braze.backend(braze.FusionConfig(dual_stream=variant != "braze-no-streams"))
            step = torch.compile(block, backend=be, dynamic=False, fullgraph=True)
            with torch.no_grad(), _forced(variant.endswith("forced")), _side_priority(variant):
                got = step(h)
                row = {"model": model_name, "tokens": t, "variant": variant,
                       "rel_err_vs_eager": ((got.float() - want.float()).norm() / want.float().norm()).item(),
                       "dual_stream": [r.message for r in braze.report(be).applied if r.name == "dual-stream"],
                       "dual_stream_missed": [r.reason for r in braze.report(be).missed if r.name == "dual-stream"]}
                if device == "cuda":  # captured now, timed below beside the other variants
                    graphs[variant] = capture_cuda_graph(lambda step=step, h=h: step(h))
            rows.append(row)
            by_variant[variant] = row
        if graphs:
            for variant, us in _interleaved_us(graphs).items():
                by_variant[variant]["us"] = us
            for variant, graph in graphs.items():  # busy / idle / overlapped time of one replay
                by_variant[variant]["timeline"] = replay_timeline(graph, keep_records=True).to_dict()
        for row in by_variant.values():
            print(json.dumps(row), flush=True)
        del graphs
    torch._dynamo.reset()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deepseek-v3.2", choices=models.MODEL_NAMES)
    p.add_argument("--size", default="bench", choices=("bench", "tiny"))
    p.add_argument("--tokens", default="1")
    p.add_argument("--out")
    p.add_argument("--side-high", action="store_true", help=f"also time {SIDE_HIGH}")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":  # the pass leaves CPU graphs alone outside tests; here the CPU check wants the rewrite
        import braze.passes.streams

        braze.passes.streams.ON_CPU = True
    rows = run(args.model, args.size, [int(t) for t in args.tokens.split(",")], device,
               VARIANTS + ((SIDE_HIGH,) if args.side_high else ()))
    for t in sorted({r["tokens"] for r in rows}):
        us = {r["variant"]: r.get("us") for r in rows if r["tokens"] == t}
        if us.get("braze") and us.get("braze-no-streams"):
            one, chosen, forced = us["braze-no-streams"], us["braze"], us["braze-streams-forced"]
            high = us.get("braze-side-high")
            print(f"{args.model} T={t}: MoE block {one:.1f} us on one stream, {chosen:.1f} us with dual-stream as "
                  f"the cost model decides ({chosen - one:+.1f} us), {forced:.1f} us with every fork overlapped "
                  f"({forced - one:+.1f} us)" + (f", {high:.1f} us as decided with the side stream at high "
                                                 f"priority ({high - one:+.1f} us)" if high else ""))
    if args.out:
        env = {"torch": torch.__version__, "card": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
        with open(args.out, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
