"""The post-conv path inside the gated delta-rule kernel on a GPU, where its programs really run at once: Inductor
launches the one kernel itself with both states and the arrival counters (a buffer of the compiled graph, neither
cloned nor zero-filled per call), and over many steps, eagerly and as CUDA-graph replays, the conv state comes out
exactly as eager's (a q/k shift written before every reader had read it, or not written, shows there) and the output
and recurrent state within rounding. CPU twins: tests/passes/test_delta_rule_conv.py, test_post_conv_cuda_lowering.py."""

from __future__ import annotations

import re

import pytest
import torch
from test_delta_rule_conv import inputs, layer
from torch._inductor import config as inductor_config
from torch._inductor.utils import run_and_get_code

import braze

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

STEPS = 12


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().nan_to_num(0.0), b.float().nan_to_num(0.0)
    return ((a - b).norm() / b.norm().clamp_min(1e-6)).item()


def check_states(got: list, want: list, what: str) -> None:
    # the conv state holds copies of x rounded to its dtype: exact, NaN rows (no token's) untouched
    assert torch.equal(got[1].nan_to_num(7.0), want[1].nan_to_num(7.0)), f"{what}: conv state differs"
    assert torch.isnan(got[8]).sum() == torch.isnan(want[8]).sum(), f"{what}: recurrent state rows written"
    assert rel_err(got[8], want[8]) < 1e-4, (what, rel_err(got[8], want[8]))


@pytest.mark.parametrize(("hk", "hv", "t"), [(2, 8, 1), (2, 8, 64), (16, 64, 8), (16, 64, 64)])
@torch.no_grad()
def test_one_kernel_equals_eager_over_steps_and_cuda_graph_replays(hk, hv, t):
    torch._dynamo.reset()
    dk = dv = 128
    dtype = torch.bfloat16
    fn = layer(hk, hv, dk, dv, dtype, device="cuda")
    args = [a.cuda() for a in inputs(t, hk, hv, dk, dv, 4, dtype, seed=t)]
    # (the fold's default range stops at 8 tokens, where it stops paying; correct it must be at any count)
    be = braze.backend(braze.FusionConfig(token_ranges={"delta_rule_conv": braze.TokenRange()}))
    compiled = torch.compile(fn, backend=be, fullgraph=True, dynamic=False)
    want, got = [a.clone() for a in args], [a.clone() for a in args]
    xs = [torch.randn(args[0].shape, device="cuda").to(dtype) for _ in range(STEPS)]
    with inductor_config.patch(force_disable_caches=True):
        for step in range(STEPS):
            want[0].copy_(xs[step])
            got[0].copy_(xs[step])
            w = fn(*want)
            if step == 0:
                g, code = run_and_get_code(compiled, *got)
                src = "\n".join(code)
            else:
                g = compiled(*got)
            assert rel_err(g, w) < 2e-2, (step, rel_err(g, w))
            check_states(got, want, f"step {step}")
    launches = re.findall(r"^\s*(\w+)\.run\(", src, flags=re.MULTILINE)
    assert [k for k in launches if k.startswith("braze_")] == [next(k for k in launches if "conv_delta_rule" in k)], \
        launches
    assert "_braze_counters_0" in src and not re.search(r"_braze_counters_0\.copy_|copy_\(_braze_counters_0", src)
    assert not re.search(rf"empty_strided_cuda\(\({args[1].shape[0]}, {hk}\)", src), "counters allocated per call"
    assert [r.ops[0] for r in braze.report(be).applied] == ["conv_update"], braze.report(be).applied

    # as CUDA-graph replays of the compiled step, static inputs
    static = [a.clone() for a in got]
    compiled(*static)  # warm-up outside the capture (a state step, matched by eager below)
    fn(*want)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(*static)
    torch.testing.assert_close(static[1], want[1], rtol=0, atol=0, equal_nan=True)  # capture ran nothing
    for step in range(STEPS):
        x = torch.randn(args[0].shape, device="cuda").to(dtype)
        static[0].copy_(x)
        want[0].copy_(x)
        graph.replay()
        w = fn(*want)
        assert rel_err(out, w) < 2e-2, (step, rel_err(out, w))
        check_states(static, want, f"replay {step}")
    torch._dynamo.reset()
