"""The fused gated delta-rule update: `braze::delta_rule` (CUDA, a `triton_op`) and its CPU twin.

`delta_rule(q, k, v, g, beta, indices, state, spec)` runs the DeltaRule described by the JSON
`spec` (braze.patterns.delta_rule) and returns o [T, Hv, dv] fp32; the fp32 state rows
`indices` are updated IN PLACE. `delta_rule_rows(q, k, v, g, beta, state, spec)` (pure) is the
form without slot indices: row t of the state is token t's, and it returns [o, the new rows]. Traced with functionalization, the launch lands in the graph
with `state` as a cloned argument, which Inductor reinplaces because the state is a graph
input written back at the end (as for the post-conv op's conv state).

`delta_rule_gated` adds the gated RMSNorm of each value head's o [+ FP8 quant] to the in-place update;
`conv_delta_rule_gated` runs the post-conv path (braze::post_conv's inputs and conv state) before it, in the same
kernel, with a buffer of arrival counters that the kernel leaves zero.
"""

from __future__ import annotations

import torch
import triton
from torch.library import custom_op, triton_op, wrap_triton

from braze.codegen.delta_rule import blocks, braze_delta_rule, gated_blocks
from braze.patterns.delta_rule import DeltaRule, delta_rule_reference
from braze.patterns.gdn import PostConv, post_conv_reference
from braze.patterns.reference import row_chain_reference
from braze.patterns.stages import RowChain, to_dtype

from .rowwise import DIV_RN, _gate_rows, cpu_backend, interpreted


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


def _check_rows(spec: DeltaRule, indices: torch.Tensor | None, state: torch.Tensor, t: int) -> None:
    """The state and the rows `t` tokens update: one index per token, or (none) the first T rows."""
    _check(spec, indices, state)
    if indices is not None and indices.shape[0] != t:
        raise ValueError(f"braze delta_rule: {indices.shape[0]} state indices for {t} tokens")
    if indices is None and state.shape[0] < t:
        raise ValueError(f"braze delta_rule: {t} tokens for a state of {state.shape[0]} rows")


def _checked(spec: DeltaRule, q, k, v, g, beta, indices, state) -> list[torch.Tensor]:
    """The operands checked and laid out for the kernel: q, k [T, Hk, dk], v [T, Hv, dv] with unit stride in the
    last dim, g, beta [T, Hv] with unit head stride."""
    t = q.shape[0]
    _check_rows(spec, indices, state, t)
    q, k = (_rows(x, t, spec.heads_k, spec.dk, n) for x, n in ((q, "q"), (k, "k")))
    v = _rows(v, t, spec.heads_v, spec.dv, "v")
    g, beta = (_rows(x, t, spec.heads_v, 1, n).reshape(t, spec.heads_v) for x, n in ((g, "g"), (beta, "beta")))
    g, beta = (x if x.stride(1) == 1 else x.contiguous() for x in (g, beta))
    return [q, k, v, g, beta]


def _update_args(spec: DeltaRule, q, k, v, g, beta, indices, state, new, unused) -> tuple[tuple, dict]:
    """The update's pointer arguments and constexprs (`unused` stands for a pointer a form does not read)."""
    args = (q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1),
            g, g.stride(0), beta, beta.stride(0), indices.contiguous() if indices is not None else unused, state,
            new if new is not None else unused)
    const = dict(RATIO=spec.heads_v // spec.heads_k, HV=spec.heads_v, DK=spec.dk, DV=spec.dv,
                 INDEXED=indices is not None)
    return args, const


def _run(q, k, v, g, beta, indices, state, spec_json: str, new=None) -> torch.Tensor:
    """o; the state rows `indices` updated in place, or (indices None) the new rows written to `new`."""
    spec = DeltaRule.from_json(spec_json)
    if q.device.type == "cpu" and cpu_backend() == "reference":
        _checked(spec, q, k, v, g, beta, indices, state)
        return delta_rule_reference(spec, q, k, v, g, beta, indices, state, new)
    q, k, v, g, beta = _checked(spec, q, k, v, g, beta, indices, state)
    t = q.shape[0]
    o = torch.empty(t, spec.heads_v, spec.dv, dtype=torch.float32, device=q.device)
    if t == 0:
        return o
    block_k, block_v, warps = blocks(spec.dk, spec.dv)
    grid = (t, spec.heads_v, triton.cdiv(spec.dv, block_v))
    ptrs, const = _update_args(spec, q, k, v, g, beta, indices, state, new, o)
    args = (*ptrs, o, state.shape[0], spec.scale)
    const.update(BLOCK_K=block_k, BLOCK_V=block_v)
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


# -- the update with the gated RMSNorm of each value head's o in the same kernel -----------------------------

# Warps of the gated kernel instead of gated_blocks' choice (benchmarks/delta_rule_norm.py sweeps it); None: its.
GATED_WARPS: int | None = None


def _gated_outputs(chain: RowChain, t: int, heads: int, device: torch.device) -> list[torch.Tensor]:
    return [torch.empty((t, heads, *trail), dtype=to_dtype(dt), device=device) for _, dt, trail in chain.output_specs()]


def _run_gated(q, k, v, g, beta, indices, state, inputs, outs, spec_json: str, chain_json: str) -> None:
    """The chain's outputs over o (rows t·Hv + h) into `outs`: the state rows `indices` (None: rows 0..T-1) updated
    in place."""
    from braze.codegen.cache import delta_rule_gated_kernel

    spec, chain = DeltaRule.from_json(spec_json), RowChain.from_json(chain_json)
    if q.device.type == "cpu" and cpu_backend() == "reference":
        _checked(spec, q, k, v, g, beta, indices, state)
        o = delta_rule_reference(spec, q, k, v, g, beta, indices, state, state if indices is None else None)
        for out, want in zip(outs, row_chain_reference(chain, [o.to(to_dtype(chain.in_dtype)), *inputs])):
            out.copy_(want.view(out.shape))
        return
    q, k, v, g, beta = _checked(spec, q, k, v, g, beta, indices, state)
    t = q.shape[0]
    if t == 0:
        return
    kernel = delta_rule_gated_kernel(spec, chain)
    block_k, block_v, warps = gated_blocks(spec.dk, spec.dv)
    warps = GATED_WARPS or warps
    ptrs, const = _update_args(spec, q, k, v, g, beta, indices, state, state if indices is None else None, q)
    named = dict(zip(chain.input_names()[1:], inputs))
    stage: list[object] = [named["weight"].contiguous()] if chain.norm.has_weight else []
    stage += _gate_rows(named["gate"], chain.width)
    args = (*ptrs, state.shape[0], spec.scale, *stage, *outs, t * spec.heads_v)
    interp = q.device.type == "cpu"
    const.update(BLOCK_K=block_k, BLOCK_V=block_v, D=chain.width, G=1, GS=chain.width, BLOCK_G=1, BLOCK_GS=block_v,
                 SOFT_ROUND=interp, DIV_RN=interp or DIV_RN)
    grid = (t, spec.heads_v)
    if interp:
        kernel.interpreted[grid](*args, **const)
    else:
        wrap_triton(kernel.jit)[grid](*args, **const, num_warps=warps)


@triton_op("braze::delta_rule_gated", mutates_args=("state",))
def delta_rule_gated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     indices: torch.Tensor | None, state: torch.Tensor, inputs: list[torch.Tensor], spec: str,
                     chain: str) -> list[torch.Tensor]:
    """`delta_rule` (indices None: `delta_rule_first_rows`) followed by the RowChain `chain` (a gated RMSNorm of
    each value head's o cast to chain.in_dtype, [+ FP8 quant]) in one kernel; `inputs` are the chain's weight
    and z. Returns the chain's outputs as [T, Hv, ...]."""
    outs = _gated_outputs(RowChain.from_json(chain), q.shape[0], DeltaRule.from_json(spec).heads_v, q.device)
    if q.device.type == "cpu":
        torch.ops.braze.delta_rule_gated_cpu(q, k, v, g, beta, indices, state, inputs, outs, spec, chain)
    else:
        _run_gated(q, k, v, g, beta, indices, state, inputs, outs, spec, chain)
    return outs


# (the outputs are arguments it writes: an op that mutates an input and returns a list cannot be functionalized)
@custom_op("braze::delta_rule_gated_cpu", mutates_args=("state", "outs"))
def delta_rule_gated_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                         indices: torch.Tensor | None, state: torch.Tensor, inputs: list[torch.Tensor],
                         outs: list[torch.Tensor], spec: str, chain: str) -> None:
    _run_gated(q, k, v, g, beta, indices, state, inputs, outs, spec, chain)


# -- the post-conv path, the update and the gated RMSNorm in one kernel -------------------------------------


def counters_shape(conv_state_rows: int, heads_k: int) -> tuple[int, int]:
    """The arrival counters of `conv_delta_rule_gated`: one int32 per (conv state row, key head)."""
    return (conv_state_rows, heads_k)


def _run_conv_gated(conv_inputs, conv_state, indices, state, inputs, counters, outs, post_json: str, roles: str,
                    spec_json: str, chain_json: str) -> None:
    """The post-conv site's outputs `roles` (q, k, v) and its g, beta feed `_run_gated`, inside one kernel: the
    conv state rows shifted in place; the arrival `counters` are zero before and after."""
    from braze.codegen.cache import conv_delta_rule_gated_kernel

    from .post_conv import check, conv_args

    post, spec, chain = PostConv.from_json(post_json), DeltaRule.from_json(spec_json), RowChain.from_json(chain_json)
    order = tuple(int(r) for r in roles.split(","))
    check(post, conv_inputs, conv_state)
    x = conv_inputs[0]
    rows = counters_shape(conv_state.shape[0], spec.heads_k)
    if spec.heads_v == spec.heads_k:
        if counters is not None:
            raise ValueError("braze conv_delta_rule_gated: counters with one value head per key head (none read)")
    elif counters is None or tuple(counters.shape) != rows or counters.dtype != torch.int32 \
            or not counters.is_contiguous():
        got = "none" if counters is None else f"{tuple(counters.shape)} {counters.dtype}"
        raise ValueError(f"braze conv_delta_rule_gated: counters {got}, expected a contiguous int32 {list(rows)}")
    if x.device.type == "cpu" and cpu_backend() == "reference":
        res = post_conv_reference(post, conv_inputs, conv_state)
        q, k, v = (res[i] for i in order)
        _run_gated(q, k, v, res[-2], res[-1], indices, state, inputs, outs, spec_json, chain_json)
        return
    t = x.shape[0]
    _check_rows(spec, indices, state, t)
    if t == 0:
        return
    kernel = conv_delta_rule_gated_kernel(post, order, spec, chain)
    block_k, block_v, warps = gated_blocks(spec.dk, spec.dv)
    warps = GATED_WARPS or warps
    named = dict(zip(chain.input_names()[1:], inputs))
    stage: list[object] = [named["weight"].contiguous()] if chain.norm.has_weight else []
    stage += _gate_rows(named["gate"], chain.width)
    update = [indices.contiguous() if indices is not None else x, state, state.shape[0], spec.scale]
    args = (*conv_args(post, conv_inputs, conv_state), counters if counters is not None else x, *update, *stage, *outs,
            t * spec.heads_v)
    interp = x.device.type == "cpu"
    const = dict(RATIO=spec.heads_v // spec.heads_k, HK=spec.heads_k, HV=spec.heads_v, DK=spec.dk, DV=spec.dv,
                 INDEXED=indices is not None, BLOCK_K=block_k, BLOCK_V=block_v, D=chain.width, G=1, GS=chain.width,
                 BLOCK_G=1, BLOCK_GS=block_v, SOFT_ROUND=interp, DIV_RN=interp or DIV_RN)
    grid = (t, spec.heads_v)
    if interp:
        kernel.interpreted[grid](*args, **const)
    else:
        wrap_triton(kernel.jit)[grid](*args, **const, num_warps=warps)


@triton_op("braze::conv_delta_rule_gated", mutates_args=("conv_state", "state", "counters"))
def conv_delta_rule_gated(conv_inputs: list[torch.Tensor], conv_state: torch.Tensor, indices: torch.Tensor | None,
                          state: torch.Tensor, inputs: list[torch.Tensor], counters: torch.Tensor | None, post: str,
                          roles: str, spec: str, chain: str) -> list[torch.Tensor]:
    """`post_conv` (its inputs and conv state) feeding `delta_rule_gated` in one kernel: the post-conv outputs
    `roles` ("q,k,v": segment indices) and its g, beta are the update's operands. `counters` (int32
    [conv state rows, Hk], zero; None with one value head per key head) are the key heads' arrival counters, zero
    again when the kernel ends. Returns the chain's outputs as [T, Hv, ...]."""
    t = conv_inputs[0].shape[0]
    outs = _gated_outputs(RowChain.from_json(chain), t, DeltaRule.from_json(spec).heads_v, conv_inputs[0].device)
    if conv_inputs[0].device.type == "cpu":
        torch.ops.braze.conv_delta_rule_gated_cpu(conv_inputs, conv_state, indices, state, inputs, counters, outs,
                                                  post, roles, spec, chain)
    else:
        _run_conv_gated(conv_inputs, conv_state, indices, state, inputs, counters, outs, post, roles, spec, chain)
    return outs


@custom_op("braze::conv_delta_rule_gated_cpu", mutates_args=("conv_state", "state", "counters", "outs"))
def conv_delta_rule_gated_cpu(conv_inputs: list[torch.Tensor], conv_state: torch.Tensor,
                              indices: torch.Tensor | None, state: torch.Tensor, inputs: list[torch.Tensor],
                              counters: torch.Tensor | None, outs: list[torch.Tensor], post: str, roles: str, spec: str,
                              chain: str) -> None:
    _run_conv_gated(conv_inputs, conv_state, indices, state, inputs, counters, outs, post, roles, spec, chain)
