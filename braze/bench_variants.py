"""The callables `python -m braze bench` compares: eager, stock Inductor and braze, compiled with static or
dynamic token counts, and the Dynamo limits the run needs."""

from __future__ import annotations

import torch

VARIANTS = ("eager", "inductor", "braze")
# braze variants beyond the defaults, on request (--variants), to measure what each switch buys: the
# FusionConfig switches each one sets ("braze" is FusionConfig())
VARIANT_SWITCHES = {"braze-merge": {"gemm_merge": True}, "braze-no-merge": {"gemm_merge": False},
                    "braze-streams": {"dual_stream": True}, "braze-no-streams": {"dual_stream": False},
                    "braze-no-decode-gemm": {"decode_gemm": False}, "braze-no-gemm-norm": {"decode_gemm_norm": False},
                    "braze-collective": {"collective": True}, "braze-no-collective": {"collective": False},
                    "braze-no-delta": {"delta_rule": False}, "braze-no-topk": {"topk": False},
                    "braze-no-router": {"router": False}, "braze-no-norm-fold": {"delta_rule_norm": False},
                    "braze-no-conv-fold": {"delta_rule_conv": False},
                    "braze-no-shared": {"moe_shared": False}, "braze-shared": {"moe_shared_max_mb": 1e9},
                    "braze-no-absorb": {"chain_absorb": False},
                    "braze-absorb-any-t": {"token_ranges": {"chain_absorb": (1, None)}}}
# braze variants that change a run-time setting instead (set around every call, so a CUDA-graph capture sees it)
RUNTIME_SWITCHES = {"braze-side-high": {"SIDE_PRIORITY": "high"}}
EXTRA_VARIANTS = tuple(VARIANT_SWITCHES) + tuple(RUNTIME_SWITCHES)


class Variants:
    """The callables under test. static: after a Dynamo reset, a fresh compile for every (T, variant)
    with `dynamic=False`. dynamic: one compile per variant, reused across T; T > 1 is marked dynamic
    (T = 1 is specialized by Dynamo anyway), so the T > 1 steps share a graph wherever the shape-decided
    choices (the sparse-MoE rule) agree."""

    def __init__(self, model, shapes: str):
        self.model, self.shapes = model, shapes
        self.compiled: dict[str, tuple[object, object]] = {}
        self.last_graphs: dict[str, list] = {}  # variant -> braze graph records of the last compile

    def get(self, variant: str, batch: tuple[torch.Tensor, ...]) -> tuple[object, object]:
        """(callable, braze backend or None) for `variant`, ready for `batch`."""
        if self.shapes == "static":
            torch._dynamo.reset()
            return compile_variant(variant, self.model, dynamic=False)
        if batch[0].shape[0] > 1:
            for x in batch:
                torch._dynamo.maybe_mark_dynamic(x, 0)
        if variant not in self.compiled:
            self.compiled[variant] = compile_variant(variant, self.model, dynamic=None)
        return self.compiled[variant]

    def graphs(self, variant: str, backend, since: int) -> tuple[list, bool]:
        """braze's graph records for this T: the new ones, or (reused=True) those of the graph that served it."""
        new = backend.report.graphs[since:]
        if new:
            self.last_graphs[variant] = new
            return new, False
        return self.last_graphs.get(variant, []), True


def compile_variant(variant: str, model, dynamic: bool | None) -> tuple[object, object]:
    """The callable for a variant, and its braze backend (None for the others)."""
    if variant == "eager":
        return model, None
    if variant == "inductor":
        return torch.compile(model, dynamic=dynamic, fullgraph=True), None
    import braze

    backend = braze.backend(braze.FusionConfig(**VARIANT_SWITCHES.get(variant, {})))
    compiled = torch.compile(model, backend=backend, dynamic=dynamic, fullgraph=True)
    if variant in RUNTIME_SWITCHES:
        compiled = _with_runtime(compiled, RUNTIME_SWITCHES[variant])
    return compiled, backend


def _with_runtime(fn, settings: dict):
    """`fn` with braze.runtime.streams' module settings replaced for the length of each call."""
    import braze.runtime.streams as streams

    def call(*args):
        saved = {k: getattr(streams, k) for k in settings}
        for k, v in settings.items():
            setattr(streams, k, v)
        try:
            return fn(*args)
        finally:
            for k, v in saved.items():
                setattr(streams, k, v)
    return call


def dynamo_limits():
    """Room for every graph the run compiles, and an error instead of a silent fall-back to eager when a
    variant still runs out of it (its numbers would be eager's)."""
    import torch._dynamo.config as dynamo_config

    limits = {"recompile_limit": 64, "fail_on_recompile_limit_hit": True}
    return dynamo_config.patch({k: v for k, v in limits.items() if hasattr(dynamo_config, k)})
