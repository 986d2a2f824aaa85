"""Qwen 3.5 under tensor parallelism: TP=2 (gloo, two CPU processes) equals TP=1 with the same weights."""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from braze.models.common import make_decode_inputs
from braze.models.qwen3_5 import Qwen35Config, Qwen35ForCausalLM


def _decode_twice(model: Qwen35ForCausalLM) -> torch.Tensor:
    """Prefill 3 sequences (3, 6 and 13 tokens), then two decode steps; logits of both steps."""
    batch = make_decode_inputs(model, 3, [3, 6, 13], torch.Generator().manual_seed(5))
    first = model(*batch)
    second = model(*model.pages.append([0, 1, 2], first.argmax(-1)))
    return torch.cat([first, second])


@torch.no_grad()
def _tp_worker(rank: int, world_size: int) -> None:
    kw = dict(dtype=torch.float32, max_batch=3, max_context=24)

    # Same seed -> same full weights, sliced per rank: Hk' = 1, Hv' = 2, q heads 2, kv heads 1.
    cfg = Qwen35Config.tiny()
    full = Qwen35ForCausalLM(cfg, seed=3, **kw)
    tp = Qwen35ForCausalLM(cfg, group=dist.group.WORLD, seed=3, **kw)
    gdn, attn = tp.layers[0].linear_attn, tp.layers[3].self_attn
    assert (gdn.hk, gdn.hv, attn.h, attn.hkv) == (1, 2, 2, 1)
    a, b = _decode_twice(full), _decode_twice(tp)
    assert torch.allclose(a, b, atol=1e-5), f"rank {rank}: max |diff| {(a - b).abs().max():.2e}"

    # One kv head, replicated on both ranks: load the TP=1 model's weights into the TP=2 one.
    cfg = dataclasses.replace(cfg, num_kv_heads=1)
    full = Qwen35ForCausalLM(cfg, seed=4, **kw)
    tp = Qwen35ForCausalLM(cfg, group=dist.group.WORLD, seed=0, **kw)
    assert tp.layers[3].self_attn.kv_replicas == 2
    tp.load_full_state_dict(full.state_dict())
    a, b = _decode_twice(full), _decode_twice(tp)
    assert torch.allclose(a, b, atol=1e-5), f"rank {rank}, replicated kv: max |diff| {(a - b).abs().max():.2e}"


def test_tp2_equals_tp1(tp_runner):
    tp_runner(2, _tp_worker)
