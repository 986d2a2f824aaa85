"""Where a compiled decode step's error comes from: each decoder layer compiled alone, on eager's own input.

    python benchmarks/layer_errors.py --model minimax-m2.5 --tokens 1 [--variants inductor,braze] [--out DIR]

The whole-step check of `python -m braze bench` compares logits, after every layer's rounding has passed
through the rest of the model (and through routers whose choice a rounding can flip). Here the model runs
eagerly once, with hooks recording each decoder layer's inputs, its output, the states it leaves and, per MoE
router, how close each token came to another routing (`braze.bench_checks.router_margins`' ratio: below 1 is a
near-tie). Then each layer is compiled alone with each variant, its states restored to what they were before
the step, and called on eager's input to that layer. Per layer and token: the relative error of the layer's
update (output minus input; the residual stream hides small updates) and of the states it writes, against
eager. A layer whose error is far above stock Inductor's is where braze's rounding differs; equal errors
everywhere with a large whole-step error point at amplification downstream (a router near-tie).

Writes DIR/layer_errors_<model>_T<T>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

import braze
from braze.bench_checks import _margin, near_tie
from braze.models import build
from braze.models.common import MoE, make_decode_inputs

VARIANTS = ("inductor", "braze")


def backend_for(variant: str):
    """inductor (stock), braze, or braze-no-<pass> (braze with FusionConfig(<pass>=False), e.g. braze-no-chain);
    a trailing `#n` (braze#2) compiles the same variant again, to see whether a result repeats."""
    name = variant.split("#")[0]
    if name == "inductor":
        return "inductor"
    if name == "braze":
        return braze.backend(braze.FusionConfig())
    if name.startswith("braze-no-"):
        return braze.backend(braze.FusionConfig(**{name.removeprefix("braze-no-").replace("-", "_"): False}))
    raise ValueError(f"unknown variant {variant!r}")


def _rows_relerr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[T] relative Frobenius error of each token's row of a vs b."""
    a, b = a.float().reshape(a.shape[0], -1), b.float().reshape(b.shape[0], -1)
    return (a - b).norm(dim=1) / b.norm(dim=1).clamp(min=1e-30)


def _relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _mixer(layer):
    """The layer's token mixer (attention or linear attention), or None."""
    return getattr(layer, "self_attn", None) or getattr(layer, "linear_attn", None)


def _routing_changes(layer, h_in, mixer_out, mixer_ref) -> list[int] | None:
    """Tokens whose experts (eager's router, on the residual stream after the mixer) differ between the
    variant's mixer output and eager's; None when the layer has no MoE after its mixer."""
    from braze.models.moe import route

    moe, norm = getattr(layer, "mlp", None), getattr(layer, "post_attention_layernorm", None)
    if not isinstance(moe, MoE) or norm is None:
        return None

    def experts(m):
        x = norm(h_in + m)
        _, idx = route(moe.gate(x.to(moe.router.dtype)), moe.router, moe.e_score_correction_bias)
        return idx.sort(-1).values

    with torch.no_grad():
        a, b = experts(mixer_out), experts(mixer_ref)
    return [int(t) for t in (a != b).any(-1).nonzero().flatten()]


def record_eager(model, batch) -> list[dict]:
    """Per decoder layer: its positional args (cloned), output, buffers before and after, router margin."""
    layers = list(model.layers)
    rec: list[dict] = [{} for _ in layers]
    handles = []
    for i, layer in enumerate(layers):
        def pre(mod, args, i=i):
            rec[i]["args"] = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
            rec[i]["before"] = {k: v.clone() for k, v in mod.named_buffers()}

        def post(mod, args, out, i=i):
            rec[i]["out"] = out.clone()
            rec[i]["after"] = {k: v.clone() for k, v in mod.named_buffers()}

        handles += [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]
        mixer = _mixer(layer)
        if mixer is not None:
            def mixer_pre(mod, args, i=i):
                rec[i]["mixer_args"] = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
                rec[i]["mixer_before"] = {k: v.clone() for k, v in mod.named_buffers()}

            def mixer_post(mod, args, out, i=i):
                rec[i]["mixer_out"] = out.clone()

            handles += [mixer.register_forward_pre_hook(mixer_pre), mixer.register_forward_hook(mixer_post)]
        mlp = getattr(layer, "mlp", None)
        if mlp is not None:
            def mlp_pre(mod, args, i=i):
                rec[i]["mlp_args"] = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)

            def mlp_post(mod, args, out, i=i):
                rec[i]["mlp_out"] = out.clone()

            handles += [mlp.register_forward_pre_hook(mlp_pre), mlp.register_forward_hook(mlp_post)]
        for moe in (m for m in layer.modules() if isinstance(m, MoE)):
            def gate_hook(gate, args, logits, moe=moe, i=i):
                margin = _margin(logits.detach().float(), moe.router, moe.e_score_correction_bias)
                rec[i]["margin"] = margin / near_tie(moe.router.dtype, rec[i]["args"][0].dtype)
            handles.append(moe.gate.register_forward_hook(gate_hook))
    try:
        with torch.no_grad():
            logits = model(*batch)
    finally:
        for h in handles:
            h.remove()
    for r in rec:
        r["logits"] = logits
    return rec


def layer_errors(model, batch, variants: tuple[str, ...], only: set[int] | None = None) -> tuple[list[dict], dict]:
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    rec = record_eager(model, batch)
    rows = []
    for i, (layer, r) in enumerate(zip(model.layers, rec)):
        if only is not None and i not in only:
            continue
        h_in = r["args"][0]
        update_ref = r["out"].float() - h_in.float()
        row = {"layer": i, "kind": type(getattr(layer, "linear_attn", None) or getattr(layer, "self_attn", layer)).__name__,
               "router_margin": None if "margin" not in r else [float(m) for m in r["margin"]], "variants": {}}
        for variant in variants:
            torch._dynamo.reset()
            for k, v in layer.named_buffers():
                v.copy_(r["before"][k])
            backend = backend_for(variant)
            fn = torch.compile(layer, fullgraph=True, dynamic=False, backend=backend)
            with torch.no_grad():
                out = fn(*r["args"])
            per_token = _rows_relerr(out.float() - h_in.float(), update_ref)
            changed = {k for k in r["after"] if not torch.equal(r["after"][k], r["before"][k])}
            state = {k: _relerr(dict(layer.named_buffers())[k], r["after"][k]) for k in sorted(changed)}
            v = {"update_rel_err_per_token": [float(e) for e in per_token],
                 "output_rel_err": _relerr(out, r["out"]), "state_rel_err": state}
            if variant.startswith("braze"):
                rep = braze.report(backend)
                v["applied"] = sorted({r_.name for r_ in rep.applied})
            if "mixer_out" in r:  # the mixer alone, on eager's input to it: its output's error per token
                torch._dynamo.reset()
                mixer = _mixer(layer)
                for k, b in mixer.named_buffers():
                    b.copy_(r["mixer_before"][k])
                backend = backend_for(variant)
                with torch.no_grad():
                    m_out = torch.compile(mixer, fullgraph=True, dynamic=False, backend=backend)(*r["mixer_args"])
                v["mixer_rel_err_per_token"] = [float(e) for e in _rows_relerr(m_out, r["mixer_out"])]
                flips = _routing_changes(layer, r["args"][0], m_out, r["mixer_out"])
                if flips is not None:
                    v["tokens_routed_differently"] = flips
            if "mlp_out" in r:  # the MLP / MoE alone, on eager's input to it
                torch._dynamo.reset()
                with torch.no_grad():
                    f_out = torch.compile(layer.mlp, fullgraph=True, dynamic=False,
                                          backend=backend_for(variant))(*r["mlp_args"])
                v["mlp_rel_err_per_token"] = [float(e) for e in _rows_relerr(f_out, r["mlp_out"])]
            row["variants"][variant] = v
        rows.append(row)
        margin = "-" if row["router_margin"] is None else f"{min(row['router_margin']):.2f}"
        print(f"layer {i} ({row['kind']}): router margin / near-tie {margin}; " + "; ".join(
            f"{n} update err max {max(v['update_rel_err_per_token']):.2e} mixer "
            f"{max(v.get('mixer_rel_err_per_token', [0.0])):.2e} mlp {max(v.get('mlp_rel_err_per_token', [0.0])):.2e} rerouted {v.get('tokens_routed_differently', '-')} state "
            f"{max(v['state_rel_err'].values(), default=0.0):.2e}" for n, v in row["variants"].items()), flush=True)
    for k, v in model.named_buffers():
        v.copy_(buffers[k])
    return rows, {"logits": rec[0]["logits"]}


def _tokens(ts: list[int] | None) -> str:
    return "-" if ts is None else ("none" if not ts else ", ".join(map(str, ts)))


def render(meta: dict, rows: list[dict]) -> str:
    vs = list(rows[0]["variants"]) if rows else []
    lines = [f"# Per-layer error of the compiled decode step: {meta['model']} ({meta['size']}, TP=1, {meta['dtype']}), "
             f"T={meta['T']}", "",
             f"Card: {meta['card']}; torch {meta['torch']}, triton {meta['triton']}, Python {meta['python']}. "
             f"Command: `{meta['command']}`.",
             "Each decoder layer compiled alone (static shapes), called on eager's input to it with its states "
             "restored; error of its update (output − input) per token vs eager, and of the states it writes; the "
             "layer's token mixer likewise, alone on eager's input to it (its output's error per token). "
             "Router margin: the smallest over tokens of the relative gap between the k-th and (k+1)-th choice, "
             "over the near-tie threshold (below 1: a rounding can flip the routing). Rerouted: the tokens whose "
             "experts eager's router picks differently on the residual stream with the variant's mixer output "
             "than with eager's.", "",
             "| layer | mixer | router margin / near-tie | " + " | ".join(
                 f"{v} update err (worst token) | {v} mixer err (worst token) | {v} rerouted | {v} state err"
                 for v in vs) + " |",
             "|---:|---|---:|" + "---:|---:|---|---:|" * len(vs)]
    for r in rows:
        margin = "-" if r["router_margin"] is None else f"{min(r['router_margin']):.2f}"
        cells = " | ".join(f"{max(r['variants'][v]['update_rel_err_per_token']):.2e} | "
                           f"{max(r['variants'][v].get('mixer_rel_err_per_token', [0.0])):.2e} | "
                           f"{_tokens(r['variants'][v].get('tokens_routed_differently'))} | "
                           f"{max(r['variants'][v]['state_rel_err'].values(), default=0.0):.2e}" for v in vs)
        lines.append(f"| {r['layer']} | {r['kind']} | {margin} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minimax-m2.5")
    ap.add_argument("--tokens", default="1")
    ap.add_argument("--size", default="bench")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0, help="weights and prompts")
    ap.add_argument("--layers", default="", help="comma-separated layer indices (default: all)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    variants = tuple(args.variants.split(","))
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    import triton

    for T in [int(t) for t in args.tokens.split(",")]:
        model = build(args.model, args.size, device=device, dtype=dtype, max_batch=T,
                      max_context=args.context + 1, seed=args.seed).eval()
        with torch.no_grad():
            batch = tuple(make_decode_inputs(model, T, args.context, torch.Generator().manual_seed(args.seed)))
        only = {int(i) for i in args.layers.split(",")} if args.layers else None
        rows, _ = layer_errors(model, batch, variants, only)
        meta = {"model": args.model, "seed": args.seed, "size": args.size, "dtype": args.dtype, "T": T, "card": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
                "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = (f"layer_errors_{args.model}_T{T}" + (f"_layers{args.layers.replace(',', '-')}" if args.layers else "")
                + (f"_seed{args.seed}" if args.seed else ""))
        (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (out / f"{stem}.md").write_text(render(meta, rows))
        print(render(meta, rows))
        del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
