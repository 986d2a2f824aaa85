"""Diagnostic: the code of the branches dual-stream outlines in one MoE block and what Inductor compiles them to
(TORCH_LOGS=output_code), to see where the step's extra kernels per overlapped layer come from.

    TORCH_LOGS=output_code python benchmarks/diag/branch_code.py [--model deepseek-v3.2] [--tokens 1] > log 2>&1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import braze
from braze import models
from braze.passes import streams as stream_pass
from braze.runtime import streams as rs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_streams import MoEBlock

_seen: set = set()
_branch = rs._branch


def _spy(doc, which, inputs, key):
    if (key, which) not in _seen:
        _seen.add((key, which))
        gm = rs._Bound(doc[which], rs.TritonCalls(**doc["triton"][which])).gm
        print(f"==== branch {which}: inputs {[(tuple(x.shape), x.stride(), x.dtype) for x in inputs]}")
        print(gm.code)
        print(f"==== outputs {doc['outputs']}", flush=True)
    return _branch(doc, which, inputs, key)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deepseek-v3.2", choices=models.MODEL_NAMES)
    p.add_argument("--tokens", type=int, default=1)
    args = p.parse_args()
    rs._branch = _spy
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        stream_pass.ON_CPU = rs.COMPILE_ON_CPU = True
    model = models.build(args.model, "bench" if device == "cuda" else "tiny", device=device, dtype=torch.bfloat16,
                         max_batch=args.tokens, max_context=8)
    block = MoEBlock(model).eval()
    h = torch.randn(args.tokens, block.hidden, device=device, dtype=torch.bfloat16)
    be = braze.backend(braze.FusionConfig())
    with torch.no_grad():
        torch.compile(block, backend=be, dynamic=False, fullgraph=True)(h)
    print(braze.report(be))


if __name__ == "__main__":
    main()
