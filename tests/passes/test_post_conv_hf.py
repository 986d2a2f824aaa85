"""The post-conv and gated-norm passes on Hugging Face's own Qwen 3.5 modeling code (transformers' torch
fallbacks for causal_conv1d_update and the recurrent delta rule, as run without causal-conv1d / fla)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

import braze
from braze.models.qwen3_5 import Qwen35Config

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


def _states(cache) -> list[torch.Tensor]:
    out = []
    for layer in cache.layers:
        for name in ("conv_states", "recurrent_states"):
            t = getattr(layer, name, {}).get(0)
            if t is not None:
                out.append(t.clone())
        if getattr(layer, "keys", None) is not None:
            out += [layer.keys.clone(), layer.values.clone()]
    return out


@torch.no_grad()
def test_hf_qwen35_gated_deltanet_decode_step_fuses_post_conv_delta_rule_and_gated_norm_and_equals_eager():
    from transformers.cache_utils import DynamicCache

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
    from test_qwen3_5 import (
        hf_model,  # the tiny HF model with random, perturbed weights
    )

    # a linear-attention layer (Hk 2, Hv 4: HF repeats q and k to the value heads before its L2 norm) and a
    # full-attention one (the cache needs one); the prompt runs eager, the GDN layer's decode step compiles
    cfg = dataclasses.replace(Qwen35Config.tiny(), num_layers=2, full_attention_interval=2)
    model = hf_model(cfg)
    gdn = model.model.layers[0].linear_attn
    ids = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    h = torch.randn(2, 1, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        cache = DynamicCache(config=model.config)
        model(ids, cache=cache, use_cache=True)

        def step(h, cache=cache):
            return gdn(h, cache=cache)

        be = braze.backend(braze.FusionConfig()) if compiled else None
        out = torch.compile(step, backend=be, fullgraph=True)(h) if compiled else step(h)
        results.append((out, _states(cache)))
    torch._dynamo.reset()
    (want, want_states), (got, got_states) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_states, want_states, strict=True):  # conv state (shifted in place), recurrent state
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    applied = [(r.name, r.ops) for r in braze.report(be).applied]
    # HF repeats q and k to the value heads before its recurrent step: the delta-rule op reads them per value head
    assert sorted(applied) == [("delta-rule", ("decay", "delta_rule", "state_store", "readout")),
                               ("gated-norm", ("rmsnorm", "silu_gate")),
                               ("post-conv", ("conv_update", "silu", "split", "l2norm", "gdn_gating"))]
    assert not braze.report(be).missed, [str(r) for r in braze.report(be).missed]
