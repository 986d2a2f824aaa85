"""`python -m braze report ...`: compile a built-in model with braze, run a decode step, print the report."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m braze", description="braze: fusion compiler for LLM inference")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("report", help="compile a built-in model, run a decode step, print what braze fused")
    r.add_argument("--model", default="demo", help="demo, or a model family from braze.models")
    r.add_argument("--size", default="tiny", choices=("tiny", "bench"))
    r.add_argument("--tokens", type=int, default=4, help="tokens in the decode step")
    r.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    r.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    r.add_argument("--plot", metavar="FILE", help="also draw kernels per layer as a PNG")
    r.add_argument("--verify", action="store_true", help="run the compile-time numerics gate")
    r.add_argument("--dump-dir", help="write generated kernels and graphs here")
    b = sub.add_parser("bench", help="time a decode step of built-in models: eager vs stock Inductor vs braze")
    from braze.bench import add_arguments

    add_arguments(b)
    return p


def _model_and_inputs(name: str, size: str, tokens: int, device: str):
    import torch

    if name == "demo":
        from braze.models.demo import build_demo

        model = build_demo(device, hidden=256 if size == "tiny" else 7168)
        x = torch.randn(tokens, model.layers[0].norm.weight.shape[0], device=device, dtype=torch.bfloat16)
        return model, (x,)
    from braze import models

    if name not in getattr(models, "MODEL_NAMES", ()):
        known = ", ".join(("demo",) + tuple(getattr(models, "MODEL_NAMES", ())))
        raise SystemExit(f"unknown model {name!r}; known: {known}")
    model = models.build(name, size, device=device)
    gen = torch.Generator().manual_seed(0)
    inputs = models.make_decode_inputs(model, tokens, 8, gen)
    return model, tuple(inputs)


def report_command(args: argparse.Namespace) -> int:
    import torch

    import braze

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA GPU on this machine", file=sys.stderr)
        return 2
    config = braze.FusionConfig(verify="compile" if args.verify else "off", dump_dir=args.dump_dir,
                                count_stock_kernels=True)
    model, inputs = _model_and_inputs(args.model, args.size, args.tokens, args.device)
    backend = braze.backend(config)
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        # the step updates caches and recurrent states in place: eager must start from the same ones
        before = {name: buf.clone() for name, buf in model.named_buffers()}
        got = compiled(*inputs)
        for name, buf in model.named_buffers():
            buf.copy_(before[name])
        want = model(*inputs)
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    rep = braze.report(backend)
    print(rep)
    print(f"\ncompiled vs eager: max |diff| {err:.3g} (max |eager| {scale:.3g})")
    if args.json:
        Path(args.json).write_text(rep.to_json())
        print(f"wrote {args.json}")
    if args.plot:
        rep.plot(args.plot)
        print(f"wrote {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "report":
        if args.device == "cpu" and "TRITON_INTERPRET" not in os.environ:
            # On CPU, fused ops run their Triton kernels under the interpreter, which
            # must be chosen before triton is first imported (importing braze did):
            # start again with it chosen.
            env = dict(os.environ, TRITON_INTERPRET="1")
            argv = sys.argv[1:] if argv is None else argv
            os.execve(sys.executable, [sys.executable, "-m", "braze", *argv], env)
        return report_command(args)
    if args.command == "bench":
        from braze.bench import bench_command

        return bench_command(args, argv)
    return 1


if __name__ == "__main__":
    sys.exit(main())
