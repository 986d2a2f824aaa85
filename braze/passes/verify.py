"""The numerics gate: run a candidate site fused and unfused on random inputs before trusting it.

The unfused side is the original subgraph, evaluated node by node with real
tensors; the fused side is the replacement op run eagerly (the real Triton
kernel on CUDA; the interpreter or reference on CPU). Outputs are compared by
relative Frobenius error against a tolerance that fits their dtype; FP8 outputs
are compared after dequantizing them with their scale.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.fx import Node

from braze.patterns.fx import topo_sorted

# ||fused - ref|| / ||ref|| allowed per output dtype, before the config's multiplier.
TOLERANCE = {
    torch.float32: 1e-5,
    torch.bfloat16: 8e-3,
    torch.float16: 1e-3,
    torch.float8_e4m3fn: 7e-2,  # dequantized; one e4m3 step is 2^-3 relative
}


@dataclass(frozen=True)
class GateResult:
    ok: bool
    worst: float  # the largest error / tolerance ratio over the outputs
    detail: str


def _concrete(x: object) -> int:
    if isinstance(x, torch.SymInt):
        return int(x.node.hint) if x.node.hint is not None else 1
    return int(x)


def random_like(node: Node, generator: torch.Generator) -> torch.Tensor:
    v = node.meta["val"]
    shape = [_concrete(s) for s in v.shape]
    if v.dtype.is_floating_point:
        t = torch.randn(shape, generator=generator, dtype=torch.float32)
        return t.to(device=v.device, dtype=v.dtype)
    return torch.randint(0, 8, shape, generator=generator).to(device=v.device, dtype=v.dtype)


def evaluate_subgraph(inputs: dict[Node, torch.Tensor], outputs: Sequence[Node]) -> list[torch.Tensor]:
    """Run the nodes between `inputs` and `outputs` eagerly, as the graph wrote them."""
    needed: set[Node] = set()
    stack = list(outputs)
    while stack:
        n = stack.pop()
        if n in needed or n in inputs:
            continue
        if n.op != "call_function":
            raise ValueError(f"site depends on {n.op} `{n.name}` that is not a site input")
        needed.add(n)
        stack.extend(n.all_input_nodes)
    env = dict(inputs)
    for n in topo_sorted(needed):
        args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), lambda a: env[a])
        if n.target is operator.getitem:
            env[n] = args[0][args[1]]
        else:
            env[n] = n.target(*args, **kwargs)
    return [env[o] for o in outputs]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if not torch.equal(nan_a, nan_b):
        return float("inf")
    a, b = a[~nan_a], b[~nan_b]
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff / denom if denom > 0 else diff


def gate(
    site_inputs: Sequence[Node],
    site_outputs: Sequence[Node],
    fused: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    rtol_scale: float,
    dequant: Callable[[list[torch.Tensor]], list[tuple[torch.Tensor, torch.dtype]]] | None = None,
    seed: int = 0,
) -> GateResult:
    """Compare `fused(inputs)` with the original subgraph on random inputs of the site's shapes.

    `dequant` maps a list of site outputs to (value, dtype whose tolerance applies)
    pairs, e.g. (q * scale, float8_e4m3fn) for FP8 outputs; by default every
    output is compared as it is.
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    def as_pairs(outs: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.dtype]]:
        return dequant(outs) if dequant else [(t, t.dtype) for t in outs]

    with unset_fake_temporarily(), torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        real = [random_like(n, gen) for n in site_inputs]
        ref_raw = evaluate_subgraph(dict(zip(site_inputs, real)), site_outputs)
        # the fused op may return [T, G] where the graph had [T, G, 1]: same values
        got_raw = [g.reshape(r.shape) if g.numel() == r.numel() else g for g, r in zip(fused(real), ref_raw)]
        ref, got = as_pairs(ref_raw), as_pairs(got_raw)
        worst, detail = 0.0, []
        for i, ((g, _), (r, dt)) in enumerate(zip(got, ref)):
            tol = TOLERANCE.get(dt, 1e-2) * rtol_scale
            if g.shape != r.shape:
                return GateResult(False, float("inf"), f"output {i}: shape {tuple(g.shape)} != {tuple(r.shape)}")
            err = relative_error(g.float(), r.float())
            worst = max(worst, err / tol)
            detail.append(f"output {i} ({str(dt).removeprefix('torch.')}): relative error {err:.3g} "
                          f"(tolerance {tol:.3g})")
        return GateResult(worst <= 1.0, worst, "; ".join(detail))
