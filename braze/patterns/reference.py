"""Pure-torch evaluation of a whole RowChain, stage by stage: the ground truth for every fused kernel."""

from __future__ import annotations

import torch

from .quant import fp8_quant_reference
from .rmsnorm import residual_add_reference, rmsnorm_reference
from .stages import RowChain


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
    if chain.norm.store:
        outs.append(y.to(getattr(torch, chain.norm.out_dtype)))
    if chain.quant:
        q, scales = fp8_quant_reference(y, chain.quant)
        outs.append(q)
        outs.extend(s.to(getattr(torch, p[-1].dtype)) for s, p in zip(scales, chain.quant.scales))
    return outs
