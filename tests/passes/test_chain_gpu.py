"""Head chains on a GPU: Inductor launches the generated kernel itself, and the cache write stays in place.

The in-place claim is checked on the scheduled graph: no kernel may produce a buffer the
size of a KV cache (a functional copy of the cache that reinplacing failed to remove).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch._inductor import config as inductor_config

import braze
from braze import models

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


class BufferSizes:
    """A scheduler pass that records the element count of every buffer a kernel writes."""

    def __init__(self) -> None:
        self.sizes: list[tuple[str, int]] = []

    def __call__(self, nodes: list) -> list:
        for node in nodes:
            for sub in getattr(node, "get_nodes", lambda: [node])():
                ir = getattr(sub, "node", None)
                size = getattr(ir, "get_size", lambda: None)() if ir is not None else None
                if size is not None:
                    try:
                        self.sizes.append((type(ir).__name__, math.prod(int(s) for s in size)))
                    except TypeError:
                        pass
        return nodes

    def uuid(self) -> str:
        return "test-buffer-sizes"


def test_qwen35_tiny_on_gpu_fuses_in_place_and_matches_eager():
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    model = models.build("qwen3.5", "tiny", device="cuda", dtype=torch.float32)
    inputs = models.make_decode_inputs(model, 3, 8, torch.Generator().manual_seed(0))
    inputs = [x.cuda() if isinstance(x, torch.Tensor) else x for x in inputs]
    saved = {k: v.clone() for k, v in model.named_buffers()}
    with torch.no_grad():
        ref = model(*inputs)
        ref_bufs = {k: v.clone() for k, v in model.named_buffers()}
        for k, v in model.named_buffers():
            v.copy_(saved[k])
        sizes = BufferSizes()
        be = braze.backend(braze.FusionConfig(norm_quant=False))
        with inductor_config.patch(force_disable_caches=True, _post_fusion_custom_pass=sizes):
            out, code = run_and_get_code(torch.compile(model, backend=be, fullgraph=True), *inputs)
    src = "\n".join(code)
    assert "braze_heads_" in src and "fused_heads" not in src, "the generated kernel is not launched directly"
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    for k, v in model.named_buffers():
        torch.testing.assert_close(v, ref_bufs[k], rtol=1e-5, atol=1e-5, msg=k)
    kv = {v.numel() for k, v in model.named_buffers() if k.endswith("k_cache")}
    copies = [(kind, n) for kind, n in sizes.sizes if n in kv and kind != "UserDefinedTritonKernel"]
    assert not copies, f"a kernel writes a cache-sized buffer (a copy of the cache survived): {copies}"
    assert len(braze.report(be).applied) == 4
    torch._dynamo.reset()
