"""Pure-torch evaluation of a whole RowChain, stage by stage: the ground truth for every fused kernel."""

from __future__ import annotations

import torch

from .layernorm import layernorm_reference
from .quant import apply_program, fp8_quant_reference
from .rmsnorm import residual_add_reference, rmsnorm_reference
from .rope import rope_reference
from .stages import FieldWrite, HeadAbsorb, HeadChain, HeadGroup, RowChain, ScaleProduct


def row_chain_reference(chain: RowChain, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The outputs of `chain` (RowChain.output_specs order) for `inputs` (input_names order)."""
    named = dict(zip(chain.input_names(), inputs))
    x = named["x"].float()
    outs: list[torch.Tensor] = []
    if chain.residual:
        x = residual_add_reference(x, named["residual"], chain.residual)
        if chain.residual.store:
            outs.append(x.to(getattr(torch, chain.residual.dtype)))
    y = rmsnorm_reference(x, named.get("weight"), chain.norm)
    if chain.gate is not None:
        from .gated_norm import gate_reference

        y = gate_reference(y, named["gate"].reshape(y.shape), chain.gate)
    if chain.norm.store:
        outs.append(y.to(getattr(torch, chain.y_dtype)))
    if chain.quant:
        q, scales = fp8_quant_reference(y, chain.quant)
        outs.append(q)
        outs.extend(s.to(getattr(torch, p[-1].dtype)) for s, p in zip(scales, chain.quant.scales))
    return outs


def head_chain_reference(chain: HeadChain, inputs: list[torch.Tensor], caches: list[torch.Tensor],
                         field_caches: list[torch.Tensor] = ()) -> list[torch.Tensor]:
    """Outputs of `chain` for `inputs` (HeadChain.input_names order); writes `caches` (its CacheWrite)
    and `field_caches` (the group's byte caches its fields index) in place like the kernel."""
    named = dict(zip(chain.input_names(), inputs))
    t = named["x"].shape[0]
    x = named["x"].reshape(t, chain.heads, chain.head_dim).float()
    if chain.norm is not None:
        if chain.norm.kind == "layernorm":
            def norm(v):
                return layernorm_reference(v, named.get("weight"), named.get("bias"), chain.norm)
        else:
            def norm(v):
                return rmsnorm_reference(v, named.get("weight"), chain.norm)
        x = norm(x) if chain.norm.width == chain.head_dim else norm(x.reshape(t, -1)).reshape(x.shape)
    if chain.rope is not None:
        cos, sin = named["cos"], named["sin"]
        if chain.gather:
            pos = named["positions"].reshape(-1).expand(t)
            cos, sin = cos[pos], sin[pos]
        table = chain.rope.table
        cos, sin = cos.reshape(-1, table).expand(t, table), sin.reshape(-1, table).expand(t, table)
        x = rope_reference(x, cos, sin, chain.rope)
    result = x.to(getattr(torch, chain.out_dtype))
    if chain.write is not None and chain.write.layout == "bhsd":
        cache, slots = caches[0], named["slots"].expand(t)
        cache[torch.arange(t, device=cache.device), :, slots] = result.to(cache.dtype)  # [T, H, D] rows
    elif chain.write is not None:
        cache = caches[0]
        cache.view(-1, chain.heads, chain.head_dim)[named["slots"]] = result.to(cache.dtype)
    outs = [result] if chain.out else []
    values = {"result": result}
    if chain.quant is not None:
        q, scales = fp8_quant_reference(result.float(), chain.quant)  # the quant reads the rounded result
        values["q"] = q
        scales = [s.to(getattr(torch, prog[-1].dtype)) for s, prog in zip(scales, chain.quant.scales)]
        values.update((f"scale{i}", s) for i, s in enumerate(scales))
        if chain.product is not None:
            i = chain.product.scale
            scales[i] = scale_product_reference(named["head_weights"], scales[i], chain.product)
        if chain.quant_out:
            outs += [q, *scales]
    for f in chain.fields:
        write_field(field_caches[f.cache], f, named["slots"].reshape(-1), values[f.value])
    return outs


def scale_product_reference(w: torch.Tensor, scale: torch.Tensor, stage: ScaleProduct) -> torch.Tensor:
    """post(pre(w) * scale) [T, heads] (ScaleProduct), each op rounded as the graph rounds it."""
    v = apply_program(stage.pre, w.float().reshape(scale.shape))
    v = (v * scale.float()).to(getattr(torch, stage.dtype)).float()
    return apply_program(stage.post, v).to(getattr(torch, stage.out_dtype))


def write_field(cache: torch.Tensor, f: FieldWrite, slots: torch.Tensor, value: torch.Tensor) -> None:
    """The bytes of value [T, ...] (as f.dtype) into the byte cache at each token's slot (FieldWrite)."""
    t = value.shape[0]
    slot = torch.where(slots < 0, slots + f.n_slots, slots).expand(t)
    base = (slot // f.block) * f.page_stride + (slot % f.block) * f.row_stride if f.block else slot * f.row_stride
    data = value.to(getattr(torch, f.dtype)).reshape(t, -1).contiguous().view(torch.uint8)  # [T, n · size]
    addr = base[:, None] + f.offset + torch.arange(data.shape[1], device=cache.device)
    cache.view(-1)[addr] = data


def head_group_reference(group: HeadGroup, inputs: list[torch.Tensor],
                         caches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The group's outputs (see HeadGroup): the flat result buffer, then each quant chain's flat fp8
    values and scales; writes `caches` in place."""
    flat, quant, i, c = [], [], 0, 0
    fields = caches[sum(1 for ch in group.chains if ch.write is not None):]
    for chain in group.chains:
        n_in, n_c = len(chain.input_names()), 1 if chain.write is not None else 0
        if isinstance(chain, HeadAbsorb):  # [H, T, C] = bmm([H, T, D], [H, D, C]) in fp32, rounded once
            x, w = inputs[i:i + n_in]
            res = [torch.bmm(x.float().transpose(0, 1), w.float()).to(getattr(torch, chain.out_dtype))]
        else:
            res = head_chain_reference(chain, inputs[i:i + n_in], caches[c:c + n_c], fields)
        if chain.out:
            flat.append(res.pop(0).reshape(-1).to(getattr(torch, group.out_dtype)))
        quant += [r.reshape(-1) for r in res]
        i, c = i + n_in, c + n_c
    dev = inputs[0].device
    out = torch.cat(flat) if flat else torch.empty(0, dtype=getattr(torch, group.out_dtype), device=dev)
    return [out, *quant]
