"""The three models at TP=4 (issue 5): the tiny configs on four gloo ranks equal TP=1 of the same seed
(MiniMax and Qwen through kv-head and GDN key-head replication), and the bench configs built for a TP
group of P ranks keep the bench's per-rank heads (meta device, a fake process group: shapes only).

One four-process run covers all three models, eager only (four processes share two CPU cores here).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from braze import models
from braze.models.common import load_full_state_dict, make_decode_inputs
from braze.models.deepseek_v32 import DeepseekV32Config, DeepseekV32ForCausalLM
from braze.models.minimax_m2 import MiniMaxM2Config, MiniMaxM2ForCausalLM
from braze.models.qwen3_5 import Qwen35Config, Qwen35ForCausalLM

KW = {"dtype": torch.float32, "max_batch": 3, "max_context": 32, "seed": 3}
LENS = [5, 11, 19]


def _step(model) -> torch.Tensor:
    """Prefill 3 sequences, then two decode steps; logits of both steps."""
    first = model(*make_decode_inputs(model, 3, LENS, torch.Generator().manual_seed(5)))
    second = model(*model.pages.append([0, 1, 2], first.argmax(-1)))
    return torch.cat([first, second])


def _check_minimax_replication(full: MiniMaxM2ForCausalLM, tp: MiniMaxM2ForCausalLM, rank: int, P: int) -> None:
    """Rank r holds kv head r // (P/Hkv): its k and v rows of qkv_proj and its k_norm weight slice; and
    the [T, 2] variance all-reduce divided by P gives the full-width mean."""
    cfg = full.config
    a, b = full.layers[0].self_attn, tp.layers[0].self_attn
    D, Hkv = cfg.head_dim, cfg.num_kv_heads
    head = rank // (P // Hkv)
    assert (b.heads, b.kv_heads, b.kv_replicas) == (cfg.num_heads // P, 1, P // Hkv)
    q_size, kv_size = cfg.num_heads * D, Hkv * D
    k_rows = slice(q_size + head * D, q_size + (head + 1) * D)
    v_rows = slice(q_size + kv_size + head * D, q_size + kv_size + (head + 1) * D)
    w_local = b.qkv_proj.weight[cfg.num_heads // P * D:]
    assert torch.equal(w_local, torch.cat([a.qkv_proj.weight[k_rows], a.qkv_proj.weight[v_rows]]))
    assert torch.equal(b.k_norm.weight, a.k_norm.weight[head * D:(head + 1) * D])
    g = torch.Generator().manual_seed(7)  # the same q, k on every rank
    q, k = torch.randn(4, q_size, generator=g), torch.randn(4, kv_size, generator=g)
    want_q, want_k = a.qk_norm(q, k)
    qs = q_size // P
    got_q, got_k = b.qk_norm(q[:, rank * qs:(rank + 1) * qs], k[:, head * D:(head + 1) * D])
    assert torch.allclose(got_q, want_q[:, rank * qs:(rank + 1) * qs], atol=1e-6)
    assert torch.allclose(got_k, want_k[:, head * D:(head + 1) * D], atol=1e-6)


def _reference(rank: int, make, shape: tuple[int, ...]) -> torch.Tensor:
    """The TP=1 model's logits, computed on rank 0 only (four ranks share two cores) and broadcast."""
    out = _step(make()) if rank == 0 else torch.empty(shape)
    dist.broadcast(out, src=0)
    return out


@torch.no_grad()
def _tp4_worker(rank: int, world_size: int) -> None:
    group = dist.group.WORLD
    qwen = dataclasses.replace(Qwen35Config.tiny(), num_layers=4)  # one [GDN×3, full] group: the GDN prefill is slow on CPU
    minimax_full = MiniMaxM2ForCausalLM(MiniMaxM2Config.tiny(), **KW)
    minimax = MiniMaxM2ForCausalLM(MiniMaxM2Config.tiny(), group=group, **KW)
    _check_minimax_replication(minimax_full, minimax, rank, world_size)
    # Loading a full (TP=1) state dict, the path Hugging Face weights take, replicates the same way.
    loaded = MiniMaxM2ForCausalLM(MiniMaxM2Config.tiny(), group=group, **{**KW, "seed": 0})
    load_full_state_dict(loaded, minimax_full.state_dict(), group)
    for (n, x), (_, y) in zip(loaded.named_parameters(), minimax.named_parameters()):
        assert torch.equal(x, y), f"rank {rank}: {n} loaded from the full state dict differs from the seeded draw"
    del minimax_full, loaded
    deepseek = DeepseekV32ForCausalLM(DeepseekV32Config.tiny(), group=group, **KW)
    assert deepseek.layers[0].self_attn.heads == 1
    qwen_tp = Qwen35ForCausalLM(qwen, group=group, **KW)
    gdn, attn = qwen_tp.layers[0].linear_attn, qwen_tp.layers[3].self_attn
    assert (gdn.hk, gdn.hv, gdn.key_replicas, attn.h, attn.hkv, attn.kv_replicas) == (1, 1, 2, 1, 1, 2)
    cases = [
        # DeepSeek's all-reduce sums in another order; an fp32 ulp that moves an FP8 cache value across a
        # rounding boundary shows up as ~1e-5 in the logits (as in its TP=2 test).
        ("deepseek-v3.2", lambda: DeepseekV32ForCausalLM(DeepseekV32Config.tiny(), **KW), deepseek, 2e-4),
        ("minimax-m2.5", lambda: MiniMaxM2ForCausalLM(MiniMaxM2Config.tiny(), **KW), minimax, 1e-5),
        ("qwen3.5", lambda: Qwen35ForCausalLM(qwen, **KW), qwen_tp, 1e-5),
    ]
    for name, make_full, tp, atol in cases:
        b = _step(tp)
        a = _reference(rank, make_full, tuple(b.shape))
        err = (a - b).abs().max().item()
        assert err < atol, f"{name}, rank {rank}: TP={world_size} vs TP=1 max |diff| {err:.2e}"


def test_tiny_models_tp4_equal_tp1(tp_runner):
    tp_runner(4, _tp4_worker)


# ---------------------------------------------------------------------------- bench configs per rank

# name -> per-rank head counts of a model, which bench(tp=P) must keep at every P
PER_RANK = {
    "deepseek-v3.2": lambda m: (m.layers[0].self_attn.heads, m.layers[0].self_attn.indexer.heads),
    "minimax-m2.5": lambda m: (m.layers[0].self_attn.heads, m.layers[0].self_attn.kv_heads,
                               m.layers[0].self_attn.kv_replicas),
    "qwen3.5": lambda m: (m.layers[3].self_attn.h, m.layers[3].self_attn.hkv, m.layers[0].linear_attn.hk,
                          m.layers[0].linear_attn.hv),
}
EXPECTED = {"deepseek-v3.2": (16, 64), "minimax-m2.5": (12, 2, 1), "qwen3.5": (4, 1, 2, 8)}


@pytest.fixture
def fake_world():
    """A single-process fake process group of 4 ranks (collectives do nothing): enough to build models
    whose shapes depend on the group's size."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=4)
    try:
        yield {1: None, 2: dist.new_group([0, 1]), 4: dist.group.WORLD}
    finally:
        dist.destroy_process_group()


@torch.no_grad()
def test_bench_configs_keep_per_rank_heads_at_every_tp(fake_world):
    for P, group in fake_world.items():
        assert models.tp_size(group) == P
        for name in models.MODEL_NAMES:
            model = models.build(name, "bench", group=group, device="meta", max_batch=2, max_context=128)
            heads = PER_RANK[name](model)
            assert heads == EXPECTED[name], f"{name} at TP={P}: per-rank heads {heads}"
            if name == "minimax-m2.5" and P == 4:  # the published deployment: 48 q / 8 kv heads
                assert (model.config.num_heads, model.config.num_kv_heads) == (48, 8)
            if name == "deepseek-v3.2":  # the indexer is replicated and the MLP widths split: they do not grow
                assert (model.config.index_heads, model.config.dense_inter) == (64, 2304)
                assert model.layers[0].mlp.down_proj.weight.shape[1] == 2304 // P
