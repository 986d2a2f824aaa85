"""How easily rounding flips a MoE router's choice: the near-tie threshold of the bench's checks, measured.

    python benchmarks/router_sensitivity.py --model minimax-m2.5 [--size bench] [--tokens 64] [--context 64]
        [--noise 4.5e-3] [--draws 20] [--device cpu] [--dtype bfloat16] [--out DIR]

`python -m braze bench` excuses a token beyond the error tolerance only when eager's router had a near-tie for
it (`braze.bench_checks.router_margins`: the relative gap between the k-th and (k+1)-th choice below
`near_tie`). Whether that threshold is right depends on how far a compiled step's rounding moves the router's
input. Here the model runs eagerly once with hooks on every decoder layer; for each layer, the residual stream
after the token mixer is perturbed as a compiled mixer perturbs it — Gaussian noise of `--noise` times the RMS
of each token's mixer output, the size `benchmarks/layer_errors.py` measured for stock Inductor and braze (4-5e-3
in bf16) — and the layer's own norm and router pick experts again. Over `--draws` draws, per token: its margin
over the threshold and whether any draw changed its experts. The table gives the share of tokens rerouted by
margin bin. Margins are in units of `NEAR_TIE` of the router GEMM's dtype alone (2e-3 for an fp32 router:
the threshold before this study, which added the activations' dtype). Writes DIR/router_sensitivity_<model>.json
and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from braze.bench_checks import NEAR_TIE, _margin
from braze.models import build
from braze.models.common import MoE, make_decode_inputs
from braze.models.moe import route

BINS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, float("inf"))


def capture(model, batch) -> list[dict]:
    """Per decoder layer with a MoE: its input h, its mixer's output, and the MoE and its norm."""
    rec: list[dict] = []
    handles = []
    for layer in model.layers:
        mixer = getattr(layer, "self_attn", None) or getattr(layer, "linear_attn", None)
        moe, norm = getattr(layer, "mlp", None), getattr(layer, "post_attention_layernorm", None)
        if mixer is None or not isinstance(moe, MoE) or norm is None:
            continue
        r = {"moe": moe, "norm": norm}
        rec.append(r)
        handles.append(layer.register_forward_pre_hook(lambda mod, args, r=r: r.__setitem__("h", args[0].clone())))
        handles.append(mixer.register_forward_hook(lambda mod, args, out, r=r: r.__setitem__("m", out.clone())))
    try:
        with torch.no_grad():
            model(*batch)
    finally:
        for h in handles:
            h.remove()
    return rec


def experts(r: dict, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted expert ids [T, k], margin over the near-tie threshold [T]) for mixer output m."""
    moe = r["moe"]
    x = r["norm"](r["h"] + m)
    logits = moe.gate(x.to(moe.router.dtype))
    _, idx = route(logits, moe.router, moe.e_score_correction_bias)
    ratio = _margin(logits.float(), moe.router, moe.e_score_correction_bias) / NEAR_TIE.get(
        moe.router.dtype, NEAR_TIE[torch.bfloat16])
    return idx.sort(-1).values, ratio


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minimax-m2.5")
    ap.add_argument("--size", default="bench")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--noise", type=float, default=4.5e-3, help="relative to each token's mixer output RMS")
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = build(args.model, args.size, device=device, dtype=dtype, max_batch=args.tokens,
                  max_context=args.context + 1, seed=args.seed).eval()
    with torch.no_grad():
        batch = tuple(make_decode_inputs(model, args.tokens, args.context, torch.Generator().manual_seed(args.seed)))
    rec = capture(model, batch)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    samples = []  # (layer, token, margin ratio, rerouted in any draw, share of draws rerouted)
    with torch.no_grad():
        for li, r in enumerate(rec):
            ref, ratio = experts(r, r["m"])
            flips = torch.zeros(args.tokens, device=device)
            rms = r["m"].float().pow(2).mean(-1, keepdim=True).sqrt()
            for _ in range(args.draws):
                noise = torch.randn(r["m"].shape, generator=gen, device=device) * rms * args.noise
                got, _ = experts(r, (r["m"].float() + noise).to(r["m"].dtype))
                flips += (got != ref).any(-1).float()
            samples += [(li, t, float(ratio[t]), bool(flips[t] > 0), float(flips[t]) / args.draws)
                        for t in range(args.tokens)]
    rows = []
    for lo, hi in zip(BINS, BINS[1:]):
        inside = [s for s in samples if lo <= s[2] < hi]
        rows.append({"bin": [lo, hi], "tokens": len(inside), "rerouted": sum(s[3] for s in inside),
                     "mean_draw_share": (sum(s[4] for s in inside) / len(inside)) if inside else None})
    meta = {"model": args.model, "size": args.size, "dtype": args.dtype, "device": args.device, "seed": args.seed,
            "tokens": args.tokens, "context": args.context, "noise": args.noise, "draws": args.draws,
            "near_tie": {str(k).removeprefix("torch."): v for k, v in NEAR_TIE.items()},
            "torch": torch.__version__, "python": platform.python_version(),
            "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}
    lines = [f"# Router choices under rounding-sized noise: {args.model} ({args.size}, {args.dtype}, {args.device})", "",
             f"Command: `{meta['command']}`. torch {meta['torch']}. {len(rec)} MoE layers × {args.tokens} tokens; "
             f"noise {args.noise:g} × each token's mixer-output RMS, {args.draws} draws. Margin: the relative gap "
             f"between the k-th and (k+1)-th choice over the near-tie threshold ({meta['near_tie']}).", "",
             "| margin / near-tie | tokens | rerouted by some draw | mean share of draws rerouting |",
             "|---|---:|---:|---:|"]
    for row in rows:
        lo, hi = row["bin"]
        share = "-" if row["mean_draw_share"] is None else f"{row['mean_draw_share']:.3f}"
        lines.append(f"| [{lo:g}, {hi:g}) | {row['tokens']} | {row['rerouted']} | {share} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"router_sensitivity_{args.model}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "bins": rows, "samples": samples}, indent=1))
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
