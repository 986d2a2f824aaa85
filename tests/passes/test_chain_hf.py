"""The head-chain pass on Hugging Face transformers' own modeling code, not braze's models.

Llama (RMSNorm -> NeoX RoPE over full-width cos/sin, a static KV cache) and Qwen3 (per-head QK RMSNorm
before RoPE) at tiny configs: a decode step of B sequences, one token each ([B, heads, 1, head_dim]
tensors) compiled with braze must equal eager, caches included, and the report must list the chains.
"""

from __future__ import annotations

import pytest
import torch

import braze

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


def _decode_step_matches_eager(model, cfg, batch: int = 2, prompt: int = 5):
    """One decode step after a prompt, eager vs braze, each on its own freshly prefilled static cache
    (restoring a StaticCache's tensors does not restore the step: two eager steps from restored
    tensors differ)."""
    from transformers import StaticCache

    torch._dynamo.reset()
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
    pos = torch.tensor([prompt])
    results = []
    for compiled in (False, True):
        cache = StaticCache(config=cfg, max_batch_size=batch, max_cache_len=16)
        with torch.no_grad():
            logits = model(ids, past_key_values=cache, use_cache=True, cache_position=torch.arange(prompt)).logits
            nxt = logits[:, -1:].argmax(-1)

            def step(ids, pos, cache=cache):
                return model(ids, past_key_values=cache, use_cache=True, cache_position=pos,
                             position_ids=pos[None].expand(batch, 1)).logits

            be = braze.backend(braze.FusionConfig(norm_quant=False)) if compiled else None
            out = torch.compile(step, backend=be, fullgraph=True)(nxt, pos) if compiled else step(nxt, pos)
        results.append((out, [t.clone() for layer in cache.layers for t in (layer.keys, layer.values)]))
    (want, want_cache), (got, got_cache) = results
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for g, w in zip(got_cache, want_cache):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    return braze.report(be)


def test_hf_llama_rope_and_static_cache_writes_fuse_in_its_own_layout():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64)
    report = _decode_step_matches_eager(LlamaForCausalLM(cfg).eval(), cfg)
    applied = [(r.location.split("model.")[-1], r.ops) for r in report.applied]
    for layer in (0, 1):  # q rotated; k rotated and written in place into the static cache; v written
        at = f"layers.{layer}.self_attn"
        assert sorted(ops for loc, ops in applied if loc == at) == [("rope",), ("rope", "store"), ("store",)], applied
        # one launch: v_proj's matmul moves above k's first use so v's write joins q and k
        assert len({dict(r.args)["launch"] for r in report.applied if r.location.endswith(at)}) == 1
    assert not report.missed, [str(r) for r in report.missed]


def test_hf_qwen3_qk_norm_rope_and_cache_write_fuse():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64)
    report = _decode_step_matches_eager(Qwen3ForCausalLM(cfg).eval(), cfg)
    ops = sorted(r.ops for r in report.applied)
    assert ops == [("rmsnorm", "rope")] * 2 + [("rmsnorm", "rope", "store")] * 2 + [("store",)] * 2, \
        [str(r) for r in report.remarks]
