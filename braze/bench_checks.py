"""Checks for `python -m braze bench`: logits and written caches against eager, the cache snapshot that
puts every variant on the same starting state, and a switch that forces the dense MoE path."""

from __future__ import annotations

import contextlib

import torch


class CacheSnapshot:
    """Every buffer of the model as it was after prefill; `restore` puts it back in place."""

    def __init__(self, model: torch.nn.Module):
        self.buffers = list(model.named_buffers())
        self.saved = [b.detach().clone() for _, b in self.buffers]

    @torch.no_grad()
    def restore(self) -> None:
        for (_, b), s in zip(self.buffers, self.saved):
            b.copy_(s)

    def changed(self) -> dict[str, torch.Tensor]:
        """Copies of the buffers that differ from the snapshot (what a step wrote)."""
        return {name: b.detach().clone() for (name, b), s in zip(self.buffers, self.saved) if not torch.equal(b, s)}


# A router choice this close (relative) to the next one can flip when upstream rounding differs. By the
# router GEMM's dtype: a bf16 router's logits are rounded to 8 bits (2^-8 = 4e-3). By the dtype of the
# activations it reads (an fp32 router fed bf16 hidden states still sees them move by bf16 rounding):
# measured with benchmarks/router_sensitivity.py (MiniMax-M2.5 bench, fp32 router, bf16 activations, noise
# the size of a compiled mixer's error): tokens up to 3-5x the old fp32 threshold of 2e-3 were rerouted,
# none of 30 between 5x and 10x (benchmarks/results/router_sensitivity_minimax-m2.5.md). A token's threshold
# is the larger of the two.
NEAR_TIE = {torch.bfloat16: 1.5e-2, torch.float16: 1.5e-2, torch.float32: 2e-3}
NEAR_TIE_INPUTS = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 0.0}


def near_tie(router_dtype: torch.dtype, input_dtype: torch.dtype) -> float:
    """The relative router margin below which upstream rounding may pick other experts (see NEAR_TIE)."""
    return max(NEAR_TIE.get(router_dtype, NEAR_TIE[torch.bfloat16]), NEAR_TIE_INPUTS.get(input_dtype, 1e-2))


def compare_logits(got: torch.Tensor, want: torch.Tensor, tol: float,
                   router_tie: torch.Tensor | None = None) -> dict:
    """Relative Frobenius error, max |diff|, per-token errors, top-1 agreement; NaN fails.

    Verdict: "ok" when the relative error is within `tol`. Otherwise "router near-tie" (still passing,
    flagged) when at most max(1, T/8) tokens are beyond `tol` and each of them sat at a router near-tie
    in the reference step (`router_tie` [T] below 1, see `router_margins`): rounding differences upstream
    of a near-tie legitimately pick another expert for that token, which moves its logits a lot and no
    other token's. A broken kernel moves every token. Else "mismatch".
    """
    g, w = got.detach().float(), want.detach().float()
    if g.shape != w.shape:
        return {"passed": False, "verdict": "mismatch", "finite": None, "tol": tol,
                "error": f"shape {tuple(g.shape)} != {tuple(w.shape)}"}
    finite = bool(torch.isfinite(g).all())
    diff = g - w
    rel = (diff.norm() / w.norm().clamp_min(1e-30)).item()
    token_rel = diff.norm(dim=-1) / w.norm(dim=-1).clamp_min(1e-30)  # [T]
    diverged = (~(token_rel <= tol)).nonzero().flatten().tolist()  # NaN counts as diverged
    at_ties = (router_tie is not None and bool(diverged)
               and bool((router_tie.float().cpu()[diverged] < 1).all()))
    if finite and rel <= tol:
        verdict = "ok"
    elif finite and at_ties and len(diverged) <= max(1, g.shape[0] // 8):
        verdict = "router near-tie"
    else:
        verdict = "mismatch"
    return {"passed": verdict != "mismatch", "verdict": verdict, "finite": finite, "tol": tol,
            "rel_fro": _num(rel), "max_abs": _num(diff.abs().max().item()),
            "worst_token_rel": _num(token_rel.max().item()), "median_token_rel": _num(token_rel.median().item()),
            "diverged_tokens": diverged[:64], "diverged_at_router_near_tie": at_ties,
            "top1_agree": (g.argmax(-1) == w.argmax(-1)).float().mean().item()}


@contextlib.contextmanager
def router_margins(model):
    """Record, while the block runs the model eagerly, how close each token came to a different routing:
    per MoE layer the relative margin (c_k - c_(k+1)) / |c_k| between the k-th and (k+1)-th choice values
    (and, for group-limited routing, between the last kept and first dropped group), over that router's
    `near_tie` (by its GEMM's dtype and the dtype of the activations it reads); the minimum over layers.
    Yields a list that holds the [T] ratios after the block (below 1: a near-tie); it stays empty for a
    model without MoE."""
    from braze.models.common import MoE

    per_layer: list[torch.Tensor] = []
    handles = []
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        seen: dict[str, torch.dtype] = {}

        def pre(mod, args, seen=seen):  # the activations' dtype, before the MoE casts them for its router
            seen["dtype"] = args[0].dtype

        def hook(gate, args, logits, moe=moe, seen=seen):
            margin = _margin(logits.detach().float(), moe.router, moe.e_score_correction_bias)
            per_layer.append(margin / near_tie(moe.router.dtype, seen.get("dtype", args[0].dtype)))
        handles += [moe.register_forward_pre_hook(pre), moe.gate.register_forward_hook(hook)]
    out: list[torch.Tensor] = []
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
        if per_layer:
            out.append(torch.stack(per_layer).min(0).values)


def _margin(logits: torch.Tensor, spec, bias: torch.Tensor | None) -> torch.Tensor:
    """[T] relative margin of one router's choice (see `router_margins`)."""
    if spec.scoring == "softmax":
        choice = logits.softmax(-1)
    else:
        choice = logits.sigmoid() + (bias.float() if bias is not None else 0.0)

    def gap(values: torch.Tensor, k: int) -> torch.Tensor:  # values [T, n]: k-th vs (k+1)-th largest
        if k >= values.shape[-1]:
            return torch.full_like(values[:, 0], float("inf"))
        v = values.sort(-1, descending=True).values
        return (v[:, k - 1] - v[:, k]) / v[:, k - 1].abs().clamp_min(1e-30)

    margin = torch.full_like(choice[:, 0], float("inf"))
    if spec.n_group > 1:  # as `route`: the best topk_group groups by the sum of their top-2, then top-k inside
        t, e = choice.shape
        groups = choice.view(t, spec.n_group, -1).topk(2, dim=-1).values.sum(-1)  # [T, G]
        margin = gap(groups, spec.topk_group)
        kept = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(spec.topk_group, -1).indices, True)
        choice = choice.masked_fill(~kept.repeat_interleave(e // spec.n_group, 1), float("-inf"))
    return torch.minimum(margin, gap(choice, spec.top_k))  # a dropped expert at -inf: gap inf


def compare_state(buffers: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict:
    """The caches a step wrote against eager's: worst relative error over floating buffers, and the
    fraction of differing bytes over byte-packed ones (FP8 caches: a rounding step shows here)."""
    worst_rel, worst_rel_name, worst_bytes, worst_bytes_name = 0.0, None, 0.0, None
    for name, w in want.items():
        b = buffers[name]
        if w.is_floating_point():
            rel = ((b.float() - w.float()).norm() / w.float().norm().clamp_min(1e-30)).item()
            if not rel <= worst_rel:  # NaN wins
                worst_rel, worst_rel_name = rel, name
        else:
            frac = (b.view(torch.uint8) != w.view(torch.uint8)).float().mean().item()
            if frac > worst_bytes:
                worst_bytes, worst_bytes_name = frac, name
    return {"written": sorted(want), "max_rel_err": _num(worst_rel), "max_rel_err_buffer": worst_rel_name,
            "max_bytes_differing": worst_bytes, "max_bytes_differing_buffer": worst_bytes_name}


def _num(x: float) -> float | None:
    return x if x == x and abs(x) != float("inf") else None  # JSON has no NaN/inf


@contextlib.contextmanager
def dense_moe(model):
    """Every routed-expert layer of `model` takes its dense path inside the block."""
    from braze.models.common import Experts

    experts = [m for m in model.modules() if isinstance(m, Experts)]
    saved = [m.grouped_mm for m in experts]
    for m in experts:
        m.grouped_mm = False
    try:
        yield
    finally:
        for m, g in zip(experts, saved):
            m.grouped_mm = g
