"""End to end through torch.compile: equal to eager, the report lists the sites by module path, warm cache too."""

from __future__ import annotations

import pytest
import torch
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass

import braze
from braze.models.demo import build_demo

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def run(model, x, backend):
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        return compiled, compiled(x)


def test_demo_model_equals_eager_and_report_names_the_layers():
    model = build_demo()
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    be = braze.backend(braze.FusionConfig(count_stock_kernels=True))
    compiled, out = run(model, x, be)
    with torch.no_grad():
        ref = model(x)
        stock = torch.compile(model)(x)
    # braze may differ from eager only as much as stock Inductor does
    err, stock_err = (out.float() - ref.float()).abs().max(), (stock.float() - ref.float()).abs().max()
    assert err <= max(2 * stock_err, 0.1), (err, stock_err)
    rep = braze.report(compiled)
    assert rep is be.report
    assert [(r.location, r.ops) for r in rep.applied] == [
        ("layers.0.norm", ("rmsnorm", "fp8_quant")),
        ("layers.1.norm", ("residual_add", "rmsnorm", "fp8_quant")),
    ]
    assert {r.name for r in rep.missed} == {"quant-input-not-norm"}
    assert all(r.source.startswith("demo.py:") for r in rep.remarks)
    after, before = rep.kernels_per_layer()
    assert set(after) == {"layers.0", "layers.1", "final_norm"} and before is not None
    assert rep.pass_seconds < rep.compile_seconds
    text = str(rep)
    assert "norm-quant" in text and "layers.1" in text and "reason:" in text


def test_warm_cache_restores_the_same_report():
    model = build_demo()
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    cfg = braze.FusionConfig()
    first = braze.backend(cfg)
    run(model, x, first)
    torch._dynamo.reset()
    second = braze.backend(cfg)
    run(model, x, second)
    [g1], [g2] = first.report.graphs, second.report.graphs
    assert g1.cache == "miss" and g2.cache == "hit"
    assert g2.remarks == g1.remarks and g2.kernels == g1.kernels and g2.stats == g1.stats


def _entry_point_installed() -> bool:
    from importlib.metadata import entry_points

    return any(ep.name == "braze" for ep in entry_points(group="torch_dynamo_backends"))


@pytest.mark.skipif(not _entry_point_installed(), reason="braze is not pip-installed: no torch_dynamo_backends entry")
def test_string_backend_and_graph_breaks_aggregate():
    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = build_demo(layers=1)
            self.b = build_demo(layers=1)

        def forward(self, x):
            y = self.a(x)
            torch._dynamo.graph_break()
            return self.b(y)

    model = Broken()
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    compiled, out = run(model, x, "braze")
    rep = braze.report(compiled)
    mine = [g for g in rep.graphs[-2:]]
    assert len(mine) == 2
    locations = [r.location for g in mine for r in g.remarks if r.kind == "applied"]
    assert locations == ["a.layers.0.norm", "b.layers.0.norm"]


def test_dynamic_token_count_fuses_in_an_unbounded_range_and_is_missed_in_a_bounded_one():
    model = build_demo(layers=1)
    x = torch.randn(6, 256, dtype=torch.bfloat16)
    torch._dynamo.mark_dynamic(x, 0)
    compiled, _ = run(model, x, braze.backend(braze.FusionConfig(token_ranges={"norm_quant": (1, 64)})))
    [rm] = [r for r in braze.report(compiled).remarks if r.name == "token-range"]
    assert "is dynamic" in rm.reason and "[1, 64]" in rm.reason
    torch._dynamo.reset()
    be = braze.backend()
    compiled = torch.compile(model, backend=be)
    with torch.no_grad():
        for t in (6, 9, 2):
            y = torch.randn(t, 256, dtype=torch.bfloat16)
            torch._dynamo.mark_dynamic(y, 0)
            out, ref = compiled(y), model(y)
            assert (out.float() - ref.float()).abs().max() <= 0.1 * ref.float().abs().max()
    assert len(be.report.graphs) == 1 and len(be.report.applied) == 1


class CountingPass(CustomGraphPass):
    calls = 0

    def __call__(self, graph):
        CountingPass.calls += 1

    def uuid(self):
        return "counting-pass"


def test_user_post_grad_pass_still_runs():
    model = build_demo(layers=1)
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    CountingPass.calls = 0
    with inductor_config.patch(post_grad_custom_post_pass=CountingPass()):
        compiled, _ = run(model, x, braze.backend())
    assert CountingPass.calls == 1
    assert len(braze.report(compiled).applied) == 1


def test_report_of_something_not_compiled_with_braze_says_so():
    with pytest.raises(ValueError, match="was not compiled with braze"):
        braze.report(torch.nn.Linear(2, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_demo_model_on_gpu_launches_the_kernel_directly():
    from torch._inductor.utils import run_and_get_code

    model = build_demo("cuda")
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    be = braze.backend(braze.FusionConfig(verify="compile"))
    compiled = torch.compile(model, backend=be)
    with torch.no_grad():
        out, code = run_and_get_code(compiled, x)
        ref = model(x)
    src = "\n".join(code)
    assert "braze_add_rmsnorm_fp8_quant" in src and "fused_rowwise" not in src
    assert len(be.report.applied) == 2 and not be.report.failed
    assert (out.float() - ref.float()).abs().max() <= 0.1 * ref.float().abs().max()
