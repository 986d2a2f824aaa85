"""How many distinct branch specs braze's dual-stream pass gives a built-in model, and how they differ.

    python benchmarks/stream_specs.py --model minimax-m2.5 --tokens 8 [--size bench] [--device cuda]

Every outlined pair of branches is one `braze::parallel_branches` spec, and each distinct spec costs two
Inductor compiles at the first call on CUDA; identical layers should give one. Compiles the model once
(fresh caches) with
`FusionConfig(dual_stream=True)`, then prints the number of sites and of distinct specs, and for each spec
after the first the lines of its main and side graphs' code that differ from the first's.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import tempfile

# fresh caches: a cached compile would skip braze's passes and record no spec
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp()
os.environ["BRAZE_CACHE_DIR"] = tempfile.mkdtemp()

import torch  # noqa: E402

import braze  # noqa: E402
from braze import models  # noqa: E402
from braze.passes import streams as stream_pass  # noqa: E402


def code(spec: str, which: str) -> list[str]:
    from braze.runtime.streams import decode_graph

    return decode_graph(json.loads(spec)[which]).code.splitlines()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minimax-m2.5")
    p.add_argument("--size", default="bench", choices=("tiny", "bench"))
    p.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    p.add_argument("--tokens", type=int, default=8)
    args = p.parse_args()
    specs: list[str] = []
    encode = stream_pass.encode_spec

    def recording(*a, **kw):
        specs.append(encode(*a, **kw))
        return specs[-1]

    stream_pass.encode_spec = recording
    stream_pass.ON_CPU = args.device == "cpu"  # (the pass leaves CPU graphs alone otherwise)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = models.build(args.model, args.size, device=args.device, dtype=dtype)
    inputs = [x.to(args.device) if isinstance(x, torch.Tensor) else x
              for x in models.make_decode_inputs(model, args.tokens, 8, torch.Generator().manual_seed(0))]
    be = braze.backend(braze.FusionConfig(dual_stream=True))
    with torch.no_grad():
        torch.compile(model, backend=be, fullgraph=True)(*inputs)
    distinct = list(dict.fromkeys(specs))
    print(f"{args.model} {args.size} T={args.tokens}: {len(specs)} sites, {len(distinct)} distinct specs")
    for i, s in enumerate(distinct[1:], 1):
        for which in ("main", "side"):
            diff = [ln for ln in difflib.unified_diff(code(distinct[0], which), code(s, which), lineterm="")
                    if ln[:1] in "+-" and ln[:3] not in ("+++", "---")]
            print(f"spec {i} {which}: {len(diff)} lines differ from spec 0")
            for ln in diff[:10]:
                print("   ", ln[:300])
        doc0, doc = json.loads(distinct[0]), json.loads(s)
        for k in ("main_inputs", "side_inputs", "outputs"):
            if doc0[k] != doc[k]:
                print(f"spec {i} {k}: {doc[k]} vs {doc0[k]}"[:400])


if __name__ == "__main__":
    main()
