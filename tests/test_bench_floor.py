"""The decode-step floor counts each tensor by its rule, checked against sums written out by hand."""

from __future__ import annotations

import pytest
import torch

from braze.bench_floor import decode_floor
from braze.models import build


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def test_minimax_tiny_by_hand():
    m = build("minimax-m2.5", "tiny", max_batch=4, max_context=40)  # E=8, k=2, 2 layers
    cfg, ctx = m.config, 20
    experts = sum(nbytes(p) for n, p in m.named_parameters() if ".experts." in n)
    other = sum(nbytes(p) for n, p in m.named_parameters() if ".experts." not in n and n != "embed_tokens")
    kv_row = cfg.num_kv_heads * cfg.head_dim * 2  # bf16 bytes a token, per cache
    for T, n_exp in ((1, 2), (3, 6), (4, 8)):  # T·k < E: T·k experts; T·k = E: all
        f = decode_floor(m, T, ctx)
        b = f.bytes_by_kind
        assert b["routed experts"] == experts * n_exp // 8
        assert b["weights"] == other
        assert b["embedding rows"] == T * cfg.hidden_size * 2
        assert b["kv caches"] == 2 * cfg.num_layers * T * (ctx + 2) * kv_row  # K and V: read ctx+1, write 1
        assert b["activations"] == T * cfg.vocab_size * 2
        assert b["other buffers"] == cfg.num_layers * cfg.num_experts * 4  # correction biases, fp32
        assert f.experts_read == {"layers.0.mlp": n_exp, "layers.1.mlp": n_exp}
        assert f.total_bytes == sum(b.values())
    # Flops: 2·T per weight element of every dense GEMM, k experts per token.
    f = decode_floor(m, 3, ctx)
    dense = sum(p.numel() for n, p in m.named_parameters()
                if p.dim() == 2 and n != "embed_tokens" and ".experts." not in n)
    per_expert = sum(p[0].numel() for n, p in m.named_parameters() if ".experts." in n)
    assert f.gemm_flops == 2 * 3 * dense + 2 * 3 * cfg.top_k * per_expert


def test_deepseek_sparse_mla_reads_top_k_rows_and_inputs_count():
    m = build("deepseek-v3.2", "tiny", max_batch=2, max_context=64)  # index_topk 16, fp8 caches
    inputs = (torch.zeros(2, dtype=torch.long), torch.zeros(2, 4, dtype=torch.int32))
    short, long = decode_floor(m, 2, 10), decode_floor(m, 2, 40, inputs)
    layers = m.config.num_layers
    assert short.bytes_by_kind["sparse-attention cache"] == layers * 2 * (11 + 1) * 656
    assert long.bytes_by_kind["sparse-attention cache"] == layers * 2 * (16 + 1) * 656  # top-k of 41 visible
    assert long.bytes_by_kind["kv caches"] == layers * 2 * (41 + 1) * 132  # index keys: 128 fp8 + 4-byte scale
    assert long.bytes_by_kind["activations"] == 2 * 8 + 2 * 4 * 4 + 2 * m.config.vocab_size * 2
    assert list(short.experts_read) == ["layers.1.mlp"]  # layer 0 is dense


def test_qwen_state_read_and_written():
    m = build("qwen3.5", "tiny", max_batch=3, max_context=16)
    f = decode_floor(m, 2, 8)
    state = sum(nbytes(b) // b.shape[0] for n, b in m.named_buffers() if n.endswith(("conv_state", "ssm_state")))
    assert f.bytes_by_kind["recurrent state"] == 2 * 2 * state


def test_floor_seconds_takes_the_larger():
    f = decode_floor(build("minimax-m2.5", "tiny", max_batch=1, max_context=8), 1, 4)
    s = f.seconds(1e9, 1e9)
    assert s["bytes_s"] == f.total_bytes / 1e9 and s["flops_s"] == f.gemm_flops / 1e9
    assert s["floor_s"] == max(s["bytes_s"], s["flops_s"])
    assert f.seconds(1e9, None)["flops_s"] is None


def test_unknown_cache_layout_is_an_error():
    m = build("minimax-m2.5", "tiny", max_batch=1, max_context=8)
    m.layers[0].self_attn.k_cache = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="layers.0.self_attn.k_cache: expected a paged cache"):
        decode_floor(m, 1, 4)
