"""Head-chain fusion on the built-in models end to end: the tiny configs compiled with braze equal eager."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import braze
from braze import models

pytestmark = pytest.mark.slow


# the steps decode 3 tokens; gemm-merge's default range is one token, widened so the merged graph is tested
MERGE_AT_3 = {"gemm_merge": (1, 256)}


def compiled_step_vs_eager(name: str, device: str = "cpu", config: braze.FusionConfig | None = None,
                           layers: int | None = None) -> tuple[torch.Tensor, torch.Tensor, dict, dict, object, object]:
    """One fp32 decode step of model `name` (tiny, cut to its first `layers` layers when given: a shorter compile),
    eager then braze from the same caches: (eager logits, braze logits, eager buffers after the step, model buffers
    after braze's step, backend, model)."""
    torch._dynamo.reset()
    model = models.build(name, "tiny", device=device, dtype=torch.float32)
    if layers is not None:
        model = type(model)(dataclasses.replace(model.config, num_layers=layers), device=device, dtype=torch.float32)
    inputs = models.make_decode_inputs(model, 3, 8, torch.Generator().manual_seed(0))
    inputs = [x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs]
    saved = {k: v.clone() for k, v in model.named_buffers()}
    with torch.no_grad():
        ref = model(*inputs)
        ref_bufs = {k: v.clone() for k, v in model.named_buffers()}
        for k, v in model.named_buffers():
            v.copy_(saved[k])
        be = braze.backend(config or braze.FusionConfig(norm_quant=False, token_ranges=MERGE_AT_3))
        out = torch.compile(model, backend=be, fullgraph=True)(*inputs)
    torch._dynamo.reset()
    return ref, out, ref_bufs, dict(model.named_buffers()), be, model


def test_qwen35_tiny_qk_norm_rope_and_cache_write_fuse_and_match_eager():
    # the post-conv and delta-rule passes off: the conv state write is left to the chain pass, as a plain store
    config = braze.FusionConfig(norm_quant=False, post_conv=False, delta_rule=False, gated_norm=False,
                                token_ranges=MERGE_AT_3)
    ref, out, ref_bufs, bufs, be, model = compiled_step_vs_eager("qwen3.5", config=config, layers=4)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    for k, v in bufs.items():
        torch.testing.assert_close(v, ref_bufs[k], rtol=1e-5, atol=1e-5, msg=k)
    applied = [(r.location, r.ops) for r in braze.report(be).applied if r.pass_name == "head-chain"]
    # one [GDN x 3, full] group of the tiny config
    assert ("layers.3.self_attn.q_norm", ("rmsnorm", "rope")) in applied
    assert ("layers.3.self_attn.k_norm", ("rmsnorm", "rope", "store")) in applied
    assert ("layers.3.self_attn", ("store",)) in applied  # V: a plain store, in place
    for layer in (0, 1, 2):  # the conv-state update of each linear-attention layer: a plain store
        assert (f"layers.{layer}.linear_attn", ("store",)) in applied
    assert len(applied) == 6
    missed = braze.report(be).missed
    assert {r.name for r in missed} == {"store-layout"} and len(missed) == 3  # the [T, H, dk, dv] state rows
    # gemm-merge: in_proj_qkvz ‖ in_proj_ba of each GDN layer, router ‖ shared expert ‖ its gate in each MoE,
    # and the backend re-pointed each group's weights into one buffer (the run above read them there)
    merged = [r.location for r in braze.report(be).applied if r.pass_name == "gemm-merge"]
    assert len(merged) == 3 + 4
    gdn = model.layers[0].linear_attn
    qkvz, ba = gdn.in_proj_qkvz.weight, gdn.in_proj_ba.weight
    assert qkvz.untyped_storage().data_ptr() == ba.untyped_storage().data_ptr()
    assert ba.storage_offset() == qkvz.numel()


def test_deepseek_v32_tiny_attention_prologue_is_one_launch_and_matches_eager():
    # three tokens: W_UK's product joins the launch only at 1-2 by default (chain_absorb), so widen its range
    config = braze.FusionConfig(norm_quant=False, token_ranges={**MERGE_AT_3, "chain_absorb": (1, None)})
    ref, out, ref_bufs, bufs, be, _ = compiled_step_vs_eager("deepseek-v3.2", config=config)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    for k, v in bufs.items():
        if v.dtype == torch.uint8:  # packed fp8 rows and scales, now built by braze's kernel
            assert (v != ref_bufs[k]).float().mean() < 1e-3, k
        else:
            torch.testing.assert_close(v, ref_bufs[k], rtol=1e-5, atol=1e-5, msg=k)
    applied = braze.report(be).applied
    ops = [(r.location, r.ops) for r in applied]
    for layer in (0, 1):
        attn = f"layers.{layer}.self_attn"
        # the indexer's q [T, H, 128]: NeoX RoPE -> fp8 with a power-of-two scale per head, stored as
        # the head weights times the scale (w * q_scale, constants folded)
        assert (f"{attn}.indexer", ("rope", "fp8_quant", "scale_mul")) in ops
        # its k: LayerNorm -> RoPE -> fp8, fp8 bytes and scale bytes written into the paged index cache
        assert (f"{attn}.indexer.k_norm", ("layernorm", "rope", "fp8_quant", "store")) in ops
        # MLA's packed 656-byte row: kv_c RMSNorm -> fp8 (4 groups of 128) values and scales, k_pe GPT-J
        # RoPE as bf16 bytes; and q_pe's RoPE
        assert (f"{attn}.kv_a_layernorm", ("rmsnorm", "fp8_quant", "store")) in ops
        assert (attn, ("rope", "store")) in ops and (attn, ("rope",)) in ops
        # q_nope times the absorbed W_UK (a bmm against a view of kv_b's weight): an optional chain, taken where it
        # joins a launch
        assert (attn, ("absorb",)) in ops
        # all six in one launch, behind the q_b and wq_b GEMMs: it writes both caches and returns q_pe, q_nope W_UK
        # and the indexer q's fp8 values. q_c's RMSNorm (read only by those GEMMs) stays with Inductor: leading a
        # first launch with the cache-writing chains would be the same number of kernels
        chains = [r for r in applied if r.location.startswith(attn) and r.pass_name == "head-chain"]
        assert len(chains) == 6 and len({dict(r.args)["launch"] for r in chains}) == 1, chains
        assert (f"{attn}.q_a_layernorm", ("rmsnorm",)) not in ops
    assert not braze.report(be).missed
    merged = sorted(r.location for r in braze.report(be).applied if r.pass_name == "gemm-merge")
    assert merged == ["layers.0.self_attn.fused_qkv_a_proj", "layers.0.self_attn.indexer.wq_b",
                      "layers.1.mlp.gate", "layers.1.self_attn.fused_qkv_a_proj", "layers.1.self_attn.indexer.wq_b"]
