"""The fused gated delta-rule update: `braze::delta_rule` (CUDA, a `triton_op`) and its CPU twin.

`delta_rule(q, k, v, g, beta, indices, state, spec)` runs the DeltaRule described by the JSON
`spec` (braze.patterns.delta_rule) and returns o [T, Hv, dv] fp32; the fp32 state rows
`indices` are updated IN PLACE. `delta_rule_rows(q, k, v, g, beta, state, spec)` (pure) is the
form without slot indices: row t of the state is token t's, and it returns [o, the new rows]. Traced with functionalization, the launch lands in the graph
with `state` as a cloned argument, which Inductor reinplaces because the state is a graph
input written back at the end (as for the post-conv op's conv state).
"""

from __future__ import annotations

import torch
import triton
from torch.library import custom_op, triton_op, wrap_triton

from braze.codegen.delta_rule import blocks, braze_delta_rule
from braze.patterns.delta_rule import DeltaRule, delta_rule_reference

from .rowwise import cpu_backend, interpreted


def _rows(x: torch.Tensor, t: int, heads: int, d: int, what: str) -> torch.Tensor:
    """x as [T, heads, d] with unit stride in d (a view where it can be)."""
    if x.numel() != t * heads * d:
        raise ValueError(f"braze delta_rule: {what} of shape {tuple(x.shape)}, expected [{t}, {heads}, {d}]")
    x = x.reshape(t, heads, d)
    return x if x.stride(-1) == 1 else x.contiguous()


def _check(spec: DeltaRule, indices: torch.Tensor | None, state: torch.Tensor) -> None:
    want = (spec.heads_v, spec.dk, spec.dv)
    if state.dim() != 4 or tuple(state.shape[1:]) != want or state.dtype != torch.float32 \
            or not state.is_contiguous():
        raise ValueError(f"braze delta_rule: state {tuple(state.shape)} {state.dtype} (contiguous: "
                         f"{state.is_contiguous()}), expected a contiguous fp32 [slots, {', '.join(map(str, want))}]")
    if indices is not None and indices.dim() != 1:
        raise ValueError(f"braze delta_rule: indices of shape {tuple(indices.shape)}, expected [T]")


def _run(q, k, v, g, beta, indices, state, spec_json: str, new=None) -> torch.Tensor:
    """o; the state rows `indices` updated in place, or (indices None) the new rows written to `new`."""
    spec = DeltaRule.from_json(spec_json)
    _check(spec, indices, state)
    t = q.shape[0]
    if indices is not None and indices.shape[0] != t:
        raise ValueError(f"braze delta_rule: {indices.shape[0]} state indices for {t} tokens")
    if indices is None and state.shape[0] < t:
        raise ValueError(f"braze delta_rule: {t} tokens for a state of {state.shape[0]} rows")
    if q.device.type == "cpu" and cpu_backend() == "reference":
        return delta_rule_reference(spec, q, k, v, g, beta, indices, state, new)
    q, k = (_rows(x, t, spec.heads_k, spec.dk, n) for x, n in ((q, "q"), (k, "k")))
    v = _rows(v, t, spec.heads_v, spec.dv, "v")
    g, beta = (_rows(x, t, spec.heads_v, 1, n).reshape(t, spec.heads_v) for x, n in ((g, "g"), (beta, "beta")))
    g, beta = (x if x.stride(1) == 1 else x.contiguous() for x in (g, beta))
    o = torch.empty(t, spec.heads_v, spec.dv, dtype=torch.float32, device=q.device)
    if t == 0:
        return o
    block_k, block_v, warps = blocks(spec.dk, spec.dv)
    grid = (t, spec.heads_v, triton.cdiv(spec.dv, block_v))
    args = (q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1),
            g, g.stride(0), beta, beta.stride(0), indices.contiguous() if indices is not None else o, state,
            new if new is not None else o, o, state.shape[0], spec.scale)  # (o stands for the unused pointer)
    const = dict(RATIO=spec.heads_v // spec.heads_k, HV=spec.heads_v, DK=spec.dk, DV=spec.dv,
                 BLOCK_K=block_k, BLOCK_V=block_v, INDEXED=indices is not None)
    if q.device.type == "cpu":
        interpreted(braze_delta_rule)[grid](*args, **const)
    else:
        wrap_triton(braze_delta_rule)[grid](*args, **const, num_warps=warps)
    return o


@triton_op("braze::delta_rule", mutates_args=("state",))
def delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
               indices: torch.Tensor, state: torch.Tensor, spec: str) -> torch.Tensor:
    if q.device.type == "cpu":
        return torch.ops.braze.delta_rule_cpu(q, k, v, g, beta, indices, state, spec)
    return _run(q, k, v, g, beta, indices, state, spec)


@custom_op("braze::delta_rule_cpu", mutates_args=("state",))
def delta_rule_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                   indices: torch.Tensor, state: torch.Tensor, spec: str) -> torch.Tensor:
    return _run(q, k, v, g, beta, indices, state, spec)


@delta_rule_cpu.register_fake
def _(q, k, v, g, beta, indices, state, spec):
    s = DeltaRule.from_json(spec)
    return torch.empty(indices.shape[0], s.heads_v, s.dv, dtype=torch.float32, device=q.device)


def _run_first_rows(q, k, v, g, beta, state, spec_json: str) -> torch.Tensor:
    # the kernel's unindexed form reads row t and stores to new[t]: new = state updates rows 0..T-1 in place
    # (each program reads and writes its own block only)
    return _run(q, k, v, g, beta, None, state, spec_json, new=state)


@triton_op("braze::delta_rule_first_rows", mutates_args=("state",))
def delta_rule_first_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                          state: torch.Tensor, spec: str) -> torch.Tensor:
    """`delta_rule` with indices arange(T) (DeltaRule.identity): the state rows 0..T-1, updated in place."""
    if q.device.type == "cpu":
        return torch.ops.braze.delta_rule_first_rows_cpu(q, k, v, g, beta, state, spec)
    return _run_first_rows(q, k, v, g, beta, state, spec)


@custom_op("braze::delta_rule_first_rows_cpu", mutates_args=("state",))
def delta_rule_first_rows_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                              beta: torch.Tensor, state: torch.Tensor, spec: str) -> torch.Tensor:
    return _run_first_rows(q, k, v, g, beta, state, spec)


@delta_rule_first_rows_cpu.register_fake
def _(q, k, v, g, beta, state, spec):
    s = DeltaRule.from_json(spec)
    return torch.empty(q.shape[0], s.heads_v, s.dv, dtype=torch.float32, device=q.device)


def _new_rows(spec: DeltaRule, q: torch.Tensor) -> torch.Tensor:
    return torch.empty(q.shape[0], spec.heads_v, spec.dk, spec.dv, dtype=torch.float32, device=q.device)


def _run_rows(q, k, v, g, beta, state, spec_json: str) -> list[torch.Tensor]:
    new = _new_rows(DeltaRule.from_json(spec_json), q)
    return [_run(q, k, v, g, beta, None, state, spec_json, new), new]


@triton_op("braze::delta_rule_rows", mutates_args=())
def delta_rule_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                    state: torch.Tensor, spec: str) -> list[torch.Tensor]:
    if q.device.type == "cpu":
        return torch.ops.braze.delta_rule_rows_cpu(q, k, v, g, beta, state, spec)
    return _run_rows(q, k, v, g, beta, state, spec)


@custom_op("braze::delta_rule_rows_cpu", mutates_args=())
def delta_rule_rows_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                        state: torch.Tensor, spec: str) -> list[torch.Tensor]:
    return _run_rows(q, k, v, g, beta, state, spec)


@delta_rule_rows_cpu.register_fake
def _(q, k, v, g, beta, state, spec):
    s = DeltaRule.from_json(spec)
    return [torch.empty(q.shape[0], s.heads_v, s.dv, dtype=torch.float32, device=q.device), _new_rows(s, q)]
