"""Head-chain fusion on the built-in models end to end: the tiny configs compiled with braze equal eager."""

from __future__ import annotations

import pytest
import torch

import braze
from braze import models

pytestmark = pytest.mark.slow


def compiled_step_vs_eager(name: str, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, dict, dict, object, object]:
    """One fp32 decode step of model `name` (tiny), eager then braze from the same caches:
    (eager logits, braze logits, eager buffers after the step, model buffers after braze's step, backend, model)."""
    torch._dynamo.reset()
    model = models.build(name, "tiny", device=device, dtype=torch.float32)
    inputs = models.make_decode_inputs(model, 3, 8, torch.Generator().manual_seed(0))
    inputs = [x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs]
    saved = {k: v.clone() for k, v in model.named_buffers()}
    with torch.no_grad():
        ref = model(*inputs)
        ref_bufs = {k: v.clone() for k, v in model.named_buffers()}
        for k, v in model.named_buffers():
            v.copy_(saved[k])
        be = braze.backend(braze.FusionConfig(norm_quant=False))
        out = torch.compile(model, backend=be, fullgraph=True)(*inputs)
    torch._dynamo.reset()
    return ref, out, ref_bufs, dict(model.named_buffers()), be, model


def test_qwen35_tiny_qk_norm_rope_and_cache_write_fuse_and_match_eager():
    ref, out, ref_bufs, bufs, be, model = compiled_step_vs_eager("qwen3.5")
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    for k, v in bufs.items():
        torch.testing.assert_close(v, ref_bufs[k], rtol=1e-5, atol=1e-5, msg=k)
    applied = [(r.location, r.ops) for r in braze.report(be).applied if r.pass_name == "head-chain"]
    for layer in (3, 7):  # the full-attention layers of 2 x [GDN x 3, full]
        assert (f"layers.{layer}.self_attn.q_norm", ("rmsnorm", "rope")) in applied
        assert (f"layers.{layer}.self_attn.k_norm", ("rmsnorm", "rope", "store")) in applied
        assert (f"layers.{layer}.self_attn", ("store",)) in applied  # V: a plain store, in place
    for layer in (0, 1, 2, 4, 5, 6):  # the conv-state update of each linear-attention layer: a plain store
        assert (f"layers.{layer}.linear_attn", ("store",)) in applied
    assert len(applied) == 12
    missed = braze.report(be).missed
    assert {r.name for r in missed} == {"store-layout"} and len(missed) == 6  # the [T, H, dk, dv] state rows
    # gemm-merge: in_proj_qkvz ‖ in_proj_ba of each GDN layer, router ‖ shared expert ‖ its gate in each MoE,
    # and the backend re-pointed each group's weights into one buffer (the run above read them there)
    merged = [r.location for r in braze.report(be).applied if r.pass_name == "gemm-merge"]
    assert len(merged) == 6 + 8
    gdn = model.layers[0].linear_attn
    qkvz, ba = gdn.in_proj_qkvz.weight, gdn.in_proj_ba.weight
    assert qkvz.untyped_storage().data_ptr() == ba.untyped_storage().data_ptr()
    assert ba.storage_offset() == qkvz.numel()


def test_deepseek_v32_tiny_indexer_rope_and_quant_fuse_and_match_eager():
    ref, out, ref_bufs, bufs, be, _ = compiled_step_vs_eager("deepseek-v3.2")
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    for k, v in bufs.items():
        if v.dtype == torch.uint8:  # packed fp8 rows, computed by Inductor: its rounding differs from eager's (as stock)
            assert (v != ref_bufs[k]).float().mean() < 1e-3, k
        else:
            torch.testing.assert_close(v, ref_bufs[k], rtol=1e-5, atol=1e-5, msg=k)
    applied = [(r.location, r.ops) for r in braze.report(be).applied]
    for layer in (0, 1):
        # the indexer's q [T, H, 128] and k [T, 128] (LayerNorm first): NeoX RoPE -> fp8 with a power-of-two
        # scale per head
        assert (f"layers.{layer}.self_attn.indexer", ("rope", "fp8_quant")) in applied
        assert (f"layers.{layer}.self_attn.indexer.k_norm", ("layernorm", "rope", "fp8_quant")) in applied
        assert applied.count((f"layers.{layer}.self_attn", ("rope",))) == 2  # MLA's q_pe and k_pe (GPT-J)
        assert (f"layers.{layer}.self_attn", ("store",)) in applied  # the packed 656-byte MLA rows, in place
    assert not braze.report(be).missed
    merged = sorted(r.location for r in braze.report(be).applied if r.pass_name == "gemm-merge")
    assert merged == ["layers.0.self_attn.fused_qkv_a_proj", "layers.0.self_attn.indexer.wq_b",
                      "layers.1.mlp.gate", "layers.1.self_attn.fused_qkv_a_proj", "layers.1.self_attn.indexer.wq_b"]
