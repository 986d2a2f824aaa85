"""Head chains on a GPU: Inductor launches the generated kernel itself, and the cache write stays in place.

The in-place claim is checked on Inductor's output code: no generated kernel iterates over as many
elements as a KV cache holds (a functional copy of the cache that reinplacing failed to remove), and
the wrapper copies no more tensors back into graph inputs than stock Inductor's does for the same model.
(An index_put that Inductor lowers to a scatter writes T rows: its kernel's xnumel is T·H·D.)
"""

from __future__ import annotations

import re

import pytest
import torch
from torch._inductor import config as inductor_config
from torch._inductor.utils import run_and_get_code

import braze
from braze import models

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _compile_and_code(model, inputs, backend):
    torch._dynamo.reset()
    with inductor_config.patch(force_disable_caches=True):
        out, code = run_and_get_code(torch.compile(model, backend=backend, fullgraph=True), *inputs)
    return out, "\n".join(code)


def _eager_stock_braze(name: str):
    """Model `name` (tiny, fp32, CUDA): one decode step eager, then stock Inductor, then braze, each from
    the same caches. Returns (model, eager logits, eager buffers, braze logits, braze code, stock code, backend)."""
    torch._dynamo.reset()
    model = models.build(name, "tiny", device="cuda", dtype=torch.float32)
    inputs = models.make_decode_inputs(model, 3, 8, torch.Generator().manual_seed(0))
    inputs = [x.cuda() if isinstance(x, torch.Tensor) else x for x in inputs]
    saved = {k: v.clone() for k, v in model.named_buffers()}

    def restore():
        for k, v in model.named_buffers():
            v.copy_(saved[k])

    with torch.no_grad():
        ref = model(*inputs)
        ref_bufs = {k: v.clone() for k, v in model.named_buffers()}
        restore()
        _, stock_src = _compile_and_code(model, inputs, "inductor")
        restore()
        # the post-conv and gated-norm passes off: the conv-state writes stay store-only chains
        # three tokens: W_UK's product joins the launch only at 1-2 by default (chain_absorb), so widen its range
        be = braze.backend(braze.FusionConfig(norm_quant=False, post_conv=False, delta_rule=False, gated_norm=False,
                                              token_ranges={"chain_absorb": (1, None)}))
        out, src = _compile_and_code(model, inputs, be)
    return model, ref, ref_bufs, out, src, stock_src, be


def _in_place(model, src: str, stock_src: str) -> None:
    """No kernel iterates over a whole cache; no more copies back into inputs than stock Inductor."""
    cache_sizes = {v.numel() for k, v in model.named_buffers() if k.endswith("_cache")}
    numels = {int(n) for n in re.findall(r"xnumel = (\d+)", src)}
    assert not numels & cache_sizes, f"a kernel iterates over a whole cache ({numels & cache_sizes} elements)"
    copies, stock_copies = src.count(".copy_("), stock_src.count(".copy_(")
    assert copies <= stock_copies, f"braze copies {copies} tensors back into inputs, stock Inductor {stock_copies}"



def test_qwen35_tiny_on_gpu_fuses_in_place_and_matches_eager():
    model, ref, ref_bufs, out, src, stock_src, be = _eager_stock_braze("qwen3.5")
    assert "braze_heads_" in src and "fused_heads" not in src, "the generated kernel is not launched directly"
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    for k, v in model.named_buffers():
        torch.testing.assert_close(v, ref_bufs[k], rtol=1e-5, atol=1e-5, msg=k)
    _in_place(model, src, stock_src)
    chains = [r for r in braze.report(be).applied if r.pass_name == "head-chain"]
    assert len(chains) == 12  # q, k, v of two attention layers; six conv-state writes
    torch._dynamo.reset()


def test_deepseek_v32_tiny_on_gpu_packed_caches_in_place_one_launch_and_match_eager():
    model, ref, ref_bufs, out, src, stock_src, be = _eager_stock_braze("deepseek-v3.2")
    assert "braze_heads_" in src and "fused_heads" not in src, "the generated kernel is not launched directly"
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    for k, v in model.named_buffers():
        if v.dtype == torch.uint8:  # packed fp8 bytes: a value at an fp8 rounding tie may differ by one step
            assert (v != ref_bufs[k]).float().mean() < 1e-3, k
        else:
            torch.testing.assert_close(v, ref_bufs[k], rtol=1e-5, atol=1e-5, msg=k)
    _in_place(model, src, stock_src)
    applied = braze.report(be).applied
    ops = [r.ops for r in applied]
    assert ops.count(("layernorm", "rope", "fp8_quant", "store")) == 2
    assert ops.count(("rope", "fp8_quant", "scale_mul")) == 2  # the indexer's w * q_scale, in its q chain
    assert ops.count(("rmsnorm",)) == 0  # q_c's norm: Inductor's (a tie with a first launch of its own)
    assert ops.count(("rmsnorm", "fp8_quant", "store")) == 2 and ops.count(("rope", "store")) == 2
    assert ops.count(("absorb",)) == 2  # q_nope x W_UK
    for layer in (0, 1):  # one launch writes both caches and returns q_pe, q_nope W_UK and the indexer q's fp8
        attn = f"layers.{layer}.self_attn"
        assert len({dict(r.args)["launch"] for r in applied
                    if r.location.startswith(attn) and r.pass_name == "head-chain"}) == 1
    torch._dynamo.reset()
