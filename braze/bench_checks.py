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


def compare_logits(got: torch.Tensor, want: torch.Tensor, tol: float) -> dict:
    """Relative Frobenius error, max |diff|, worst token's relative error, top-1 agreement; NaN fails."""
    g, w = got.detach().float(), want.detach().float()
    if g.shape != w.shape:
        return {"passed": False, "finite": None, "tol": tol, "error": f"shape {tuple(g.shape)} != {tuple(w.shape)}"}
    finite = bool(torch.isfinite(g).all())
    diff = g - w
    rel = (diff.norm() / w.norm().clamp_min(1e-30)).item()
    token_rel = diff.norm(dim=-1) / w.norm(dim=-1).clamp_min(1e-30)  # [T]
    # A near-tie in an MoE router can flip one token's expert: its error is large and the median token's
    # small. A broken kernel moves every token.
    return {"passed": finite and rel <= tol, "finite": finite, "tol": tol, "rel_fro": _num(rel),
            "max_abs": _num(diff.abs().max().item()), "worst_token_rel": _num(token_rel.max().item()),
            "median_token_rel": _num(token_rel.median().item()),
            "top1_agree": (g.argmax(-1) == w.argmax(-1)).float().mean().item()}


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
