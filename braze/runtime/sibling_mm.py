"""`braze::sibling_mm`: one GEMM for several weights that multiply the same activation, and the
storage sharing that lets it read them without a copy.

    y = x @ cat(W_0, ..., W_{n-1})ᵀ (+ cat(b_0, ..., b_{n-1}))      x [M, K], W_i [N_i, K] -> y [M, ΣN_i]

The weights are the model's own parameters. braze's backend re-points them once, at set-up, into
row blocks of one buffer (`share_rows`); the op then checks, on every call, that its weights are
still adjacent row blocks of one storage and reads them as one [ΣN, K] view: no copy, and an
in-place weight update (`p.copy_(...)`, `load_state_dict`) is seen at once, also by CUDA-graph
replays, because there is only one copy of the weights. When the check fails (a parameter was
replaced by a new tensor, or sharing was refused) the op concatenates the weights on every call:
slower, never stale. Nothing is cached, so nothing can go out of date.

With `decode` (set by the pass from FusionConfig.decode_gemm), on CUDA at 1..4 token rows the GEMM runs on
braze's decode kernel where `decode_mm_plan` says it beats cuBLAS (the merged DeepSeek V3.2 [2304, 7168] weight
at one token: 11.6 against 13.7 µs, decode_mm.md), else torch.mm.
"""

from __future__ import annotations

import warnings

import torch
from torch.library import custom_op

from braze.codegen.decode_mm import decode_mm_plan, rmsnorm_reference

from .decode_mm import _run as decode_mm_run


def rows_view(weights: list[torch.Tensor]) -> torch.Tensor | None:
    """The [ΣN, K] view of `weights` when they are adjacent, row-major row blocks of one storage, else None."""
    first = weights[0]
    if first.dim() != 2:
        return None
    k = first.shape[1]
    storage = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    for w in weights:
        if (w.dim() != 2 or w.shape[1] != k or w.dtype != first.dtype or w.device != first.device
                or (w.shape[0] > 1 and w.stride(0) != k) or (k > 1 and w.stride(1) != 1)
                or w.untyped_storage().data_ptr() != storage or w.storage_offset() != offset):
            return None
        offset += w.shape[0] * k
    rows = sum(w.shape[0] for w in weights)
    return first.as_strided((rows, k), (k, 1), first.storage_offset())


_warned: set[tuple[int, ...]] = set()


def _merged_weight(weights: list[torch.Tensor]) -> torch.Tensor:
    view = rows_view(weights)
    if view is not None:
        return view
    key = tuple(id(w) for w in weights)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            "braze::sibling_mm: the merged weights no longer share one storage (a parameter was replaced "
            "by a new tensor?); concatenating them on every call: correct, but slower than unmerged. "
            "Update parameters in place (copy_ / load_state_dict) or recompile (torch._dynamo.reset()).",
            stacklevel=2,
        )
    return torch.cat(weights)


@custom_op("braze::sibling_mm", mutates_args=())
def sibling_mm(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
               decode: bool = False, norm_weight: torch.Tensor | None = None, norm: str = "",
               eps: float = 0.0) -> torch.Tensor:
    """x [M, K] @ cat(weights)ᵀ (+ cat(biases), one per weight, or none: []) -> [M, ΣN]; `decode`: on CUDA, take
    braze's decode kernel where its plan says it beats cuBLAS (FusionConfig.decode_gemm). `norm` (NORM_FORMS of
    braze.codegen.decode_mm): x is first RMS-normalized, inside the decode kernel or, where that is not taken,
    by the reference in torch."""
    w = _merged_weight(weights)
    if decode and x.is_cuda and x.dim() == 2 and x.stride(1) == 1 and w.stride(1) == 1:
        plan = decode_mm_plan(x.shape[0], w.shape[0], w.shape[1], w.dtype, fold_norm=bool(norm))
        if not isinstance(plan, str) and x.dtype == w.dtype:
            return decode_mm_run(x, w, torch.cat(biases) if biases else None, config=plan, norm_weight=norm_weight,
                                 norm=norm, eps=eps)
    x = rmsnorm_reference(x, norm_weight, norm, eps)
    if not biases:
        return torch.mm(x, w.t())
    return torch.addmm(torch.cat(biases), x, w.t())


@sibling_mm.register_fake
def _(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor], decode: bool = False,
      norm_weight: torch.Tensor | None = None, norm: str = "", eps: float = 0.0) -> torch.Tensor:
    rows = sum(w.shape[0] for w in weights)
    return x.new_empty((x.shape[0], rows))


def share_rows(weights: list[torch.Tensor]) -> tuple[str, int]:
    """Re-point `weights` (parameters [N_i, K], same K, dtype and device) into adjacent row blocks of one
    new buffer, values unchanged. Returns (what happened, bytes of the new buffer).

    "shared": re-pointed; the old storages are freed once nothing else holds them, so no extra memory.
    "already": they already are adjacent row blocks of one storage (a recompile, another graph).
    "refused: ...": left alone; the op then concatenates per call (correct, slower).
    A CUDA graph captured before this call that reads these weights (by code other than this compile)
    keeps the old addresses and must be captured again.
    """
    if rows_view(weights) is not None:
        return "already", 0
    if len({id(w) for w in weights}) != len(weights):
        return "refused: the same weight appears twice", 0
    for w in weights:
        if type(w.data) is not torch.Tensor:
            return "refused: a weight is a tensor subclass (DTensor, quantized, ...)", 0
        if not isinstance(w, torch.nn.Parameter) or w.requires_grad:
            return "refused: a weight is not a parameter frozen for inference (requires_grad=False)", 0
        if w.dim() != 2 or not w.is_contiguous() or w.storage_offset() != 0:
            return "refused: a weight is not a contiguous [N, K] tensor of its own", 0
        if w.untyped_storage().nbytes() != w.numel() * w.element_size():
            return "refused: a weight shares its storage with other tensors (tied or a view)", 0
    first = weights[0]
    if any(w.shape[1] != first.shape[1] or w.dtype != first.dtype or w.device != first.device for w in weights):
        return "refused: the weights differ in width, dtype or device", 0
    with torch.no_grad():
        buf = torch.cat([w.detach() for w in weights])
        row = 0
        for w in weights:
            n = w.shape[0]
            w.data = buf[row:row + n]
            row += n
    return "shared", buf.numel() * buf.element_size()
