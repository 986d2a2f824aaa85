"""The router pass and kernel: scores -> top-k -> gathered, renormalized, scaled weights become one kernel at any
expert count, k, scoring and dtype and equal eager; the kernel matches its reference (ties in index order,
NaN first) into poisoned outputs; the variants that must not fuse say why or are left to the top-k pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from braze.config import FusionConfig
from braze.models.moe import RouterSpec, route
from braze.patterns.router import Router, router_reference
from braze.testing import aten_graph, fused_ops, run_passes


def remarks(record, kind, name="router"):
    return [r for r in record.remarks if r.kind == kind and r.pass_name == name]


def distinct_logits(t, e, dtype, gen):
    """[t, e] logits with distinct values in every row, exact in bf16 (steps of 1/16 within ±8): no row has a
    tie that eager's top-k and braze's may break differently."""
    rows = torch.stack([torch.randperm(e, generator=gen) for _ in range(t)]).float()
    return ((rows - e / 2) / 16).to(dtype)


def by_expert(w, idx):
    """(weights, ids) with each row's pairs in expert order (eager's top-k(sorted=False) leaves them in any)."""
    order = idx.argsort(-1)
    return w.gather(-1, order), idx.gather(-1, order)


def check_against_eager(fn, args, tol):
    gm = aten_graph(fn, *args)
    record = run_passes(gm)
    (want_w, want_i), (got_w, got_i) = (by_expert(*fn(*args)), by_expert(*gm(*args)))
    assert torch.equal(got_i, want_i)
    torch.testing.assert_close(got_w, want_w, rtol=tol, atol=tol)
    return gm, record


@settings(max_examples=10, deadline=None)
@given(t=st.sampled_from([1, 3]), e=st.sampled_from([8, 16, 60, 256]), k=st.sampled_from([1, 2, 6, 8]),
       scoring=st.sampled_from(["softmax", "sigmoid"]), bias=st.booleans(), renormalize=st.booleans(),
       scaling=st.sampled_from([1.0, 2.5]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 99))
def test_routers_fuse_at_any_experts_k_and_scoring_and_equal_eager(t, e, k, scoring, bias, renormalize, scaling,
                                                                    dtype, seed):
    bias = bias and scoring == "sigmoid"  # (braze.models.moe.route adds a bias to sigmoid scores only)
    spec = RouterSpec(top_k=min(k, e), scoring=scoring, correction_bias=bias, renormalize=renormalize,
                      routed_scaling=scaling)
    gen = torch.Generator().manual_seed(seed)
    args = [distinct_logits(t, e, dtype, gen)] + ([torch.randn(e, generator=gen) * 0.01] if bias else [])

    def fn(logits, *b):
        return route(logits, spec, *b)

    gm, record = check_against_eager(fn, args, tol=1e-6)
    (r,) = remarks(record, "applied")
    assert dict(r.args) == {"experts": e, "k": min(k, e), "scoring": scoring, "bias": bias,
                            "renormalize": renormalize, "scaling": scaling}
    assert r.ops == ("scores", "topk", "gather") + (("renormalize",) if renormalize else ())
    assert fused_ops(gm) == ["braze.router_cpu.default"], "one kernel: no top-k, softmax or gather left"
    assert not remarks(record, "applied", "small-topk")


def test_eps_in_the_renormalizing_sum_and_logits_from_a_gemm():
    def fn(x, w):
        s = F.linear(x, w).float().sigmoid()
        idx = s.topk(3, dim=-1).indices
        g = s.gather(1, idx)
        return g / (g.sum(-1, keepdim=True) + 1e-20), idx

    gen = torch.Generator().manual_seed(1)
    gm, record = check_against_eager(fn, [torch.randn(4, 32, generator=gen).bfloat16(),
                                          torch.randn(24, 32, generator=gen).bfloat16()], tol=1e-6)
    (r,) = remarks(record, "applied")
    assert dict(r.args)["renormalize"] and "braze.router_cpu.default" in fused_ops(gm)


def test_softmax_scores_with_a_bias_on_the_choice_fuse():
    def fn(logits, b):
        p = logits.softmax(-1, dtype=torch.float32)
        idx = (p + b).topk(3, dim=-1).indices
        return p.gather(1, idx) * 2.0, idx

    gen = torch.Generator().manual_seed(5)
    args = [distinct_logits(4, 24, torch.bfloat16, gen), torch.randn(24, generator=gen) * 0.01]
    gm, record = check_against_eager(fn, args, tol=1e-6)
    (r,) = remarks(record, "applied")
    assert dict(r.args)["bias"] and not dict(r.args)["renormalize"] and fused_ops(gm) == ["braze.router_cpu.default"]


def test_a_scaled_bias_or_a_sum_over_everything_is_not_taken_for_a_router():
    """`scores + 2·bias` is not `scores + bias`, and `w / w.sum()` (no dims) is not the rows' renormalization."""
    x = distinct_logits(2, 16, torch.float32, torch.Generator().manual_seed(0))
    b = torch.randn(16) * 0.01

    def scaled_bias(logits, b):
        s = logits.sigmoid()
        idx = torch.add(s, b, alpha=2.0).topk(2).indices
        return s.gather(1, idx), idx

    def whole_sum(logits):
        s = logits.sigmoid()
        idx = s.topk(2).indices
        w = s.gather(1, idx)
        return w / w.sum(), idx

    for fn, args in ((scaled_bias, [x, b]), (whole_sum, [x])):
        gm = aten_graph(fn, *args)
        record = run_passes(gm)
        assert not [r for r in record.remarks if r.kind == "failed"]
        if fn is scaled_bias:
            assert not remarks(record, "applied")
        else:  # the gather is the router's weights; the whole-tensor sum stays Inductor's
            assert [dict(r.args)["renormalize"] for r in remarks(record, "applied")] in ([], [False])
        for got, want in zip(gm(*args), fn(*args)):
            torch.testing.assert_close(got, want)


def test_softmax_after_inductors_online_rewrite_fuses():
    """On GPUs Inductor's post-grad patterns turn softmax's amax and sum into one prepare_softmax_online before
    braze's pass runs: that spelling is a softmax too."""
    from torch._inductor.inductor_prims import prepare_softmax_online

    def fn(logits):
        x = logits.float()
        top, total = prepare_softmax_online(x, -1)
        p = (x - top).exp() / total
        idx = p.topk(4, dim=-1, sorted=False).indices
        w = p.gather(1, idx)
        return w / w.sum(-1, keepdim=True), idx

    gm, record = check_against_eager(fn, [distinct_logits(3, 16, torch.bfloat16, torch.Generator().manual_seed(2))],
                                     tol=1e-6)
    (r,) = remarks(record, "applied")
    assert dict(r.args)["scoring"] == "softmax" and fused_ops(gm) == ["braze.router_cpu.default"]


@settings(max_examples=8, deadline=None)
@given(t=st.sampled_from([1, 3]), groups=st.sampled_from([2, 4, 8]), per=st.sampled_from([2, 4, 32]),
       top=st.integers(1, 4), k=st.sampled_from([1, 4, 8]), seed=st.integers(0, 99))
def test_group_limited_routing_fuses_and_equals_eager(t, groups, per, top, k, seed):
    """DeepSeek V3's router: sigmoid + bias, the best `top` groups by their top-2 sums, top-k within them."""
    e, top = groups * per, min(top, groups)
    spec = RouterSpec(top_k=min(k, top * per), scoring="sigmoid", correction_bias=True, n_group=groups,
                      topk_group=top, routed_scaling=2.5)
    gen = torch.Generator().manual_seed(seed)
    args = [distinct_logits(t, e, torch.float32, gen), torch.randn(e, generator=gen) * 0.01]
    gm, record = check_against_eager(lambda x, b: route(x, spec, b), args, tol=1e-6)
    (r,) = remarks(record, "applied")
    assert (dict(r.args)["groups"], dict(r.args)["top_groups"]) == (groups, top)
    assert fused_ops(gm) == ["braze.router_cpu.default"], "no top-k, scatter or mask left"


def test_group_scores_of_another_kind_are_left_with_the_reason():
    """DeepSeek V2 scores a group by its largest choice, vLLM's grouped top-k masks with 0.0, and a mask spread
    over the experts in another order than the groups' view: braze's kernel does none of these; the routers stay
    with Inductor and the top-k pass, with the reason."""
    gen = torch.Generator().manual_seed(0)
    x, bias = distinct_logits(3, 32, torch.float32, gen), torch.randn(32, generator=gen) * 0.01

    def grouped(logits, b, *, by_max=False, fill=float("-inf"), interleaved=False):
        s = logits.sigmoid()
        choice = s + b
        per_group = choice.view(3, 4, -1)
        gscore = per_group.max(-1).values if by_max else per_group.topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(gscore).scatter_(1, gscore.topk(2, dim=-1).indices, 1.0)
        # (interleaved: expert e in group e % 4, a mask the scores' view does not describe)
        mask = keep.unsqueeze(1).expand(3, 8, 4).reshape(3, 32) if interleaved else \
            keep.unsqueeze(-1).expand(3, 4, 8).reshape(3, 32)
        idx = choice.masked_fill(mask == 0, fill).topk(4, dim=-1).indices
        w = s.gather(1, idx)
        return w / w.sum(-1, keepdim=True), idx

    for kw, why in (({"by_max": True}, "not a sum over its experts' top choices"),
                    ({"fill": 0.0}, "choices are 0.0, not -inf"),
                    ({"interleaved": True}, "the group mask is spread over the experts as")):
        gm, record = check_against_eager(lambda a, b, kw=kw: grouped(a, b, **kw), [x, bias], tol=1e-6)
        (m,) = remarks(record, "missed")
        assert m.name == "router-not-fused" and why in m.reason, m.reason
        assert "braze.router_cpu.default" not in fused_ops(gm)


def test_scores_read_elsewhere_or_in_bf16_or_top_values_read_are_not_fused():
    gen = torch.Generator().manual_seed(0)
    x = distinct_logits(2, 16, torch.float32, gen)

    def escapes(logits):  # the softmax is also returned: it escapes
        p = logits.softmax(-1)
        idx = p.topk(2).indices
        return p.gather(1, idx), idx, p

    gm, record = check_against_eager(lambda lg: escapes(lg)[:2], [x], tol=1e-6)  # (sanity: fused when private)
    assert remarks(record, "applied")
    gm = aten_graph(escapes, x)
    record = run_passes(gm)
    (m,) = remarks(record, "missed")
    assert "escapes" in m.reason and "braze.router_cpu.default" not in fused_ops(gm)
    for got, want in zip(gm(x), escapes(x)):
        torch.testing.assert_close(got, want)

    def bf16_scores(logits):
        p = logits.bfloat16().softmax(-1)
        idx = p.topk(2).indices
        return p.gather(1, idx), idx

    record = run_passes(aten_graph(bf16_scores, x))
    (m,) = remarks(record, "missed")
    assert "the scores are torch.bfloat16" in m.reason

    def values_read(logits):  # topk's values are used: a plain top-k, for the small-topk pass
        p = logits.softmax(-1)
        v, idx = p.topk(2)
        return v * 2, idx

    record = run_passes(aten_graph(values_read, x))
    assert not remarks(record, "applied") and not remarks(record, "missed")
    assert remarks(record, "applied", "small-topk")


def test_switch_and_token_range():
    spec = RouterSpec(top_k=2)
    x = distinct_logits(3, 16, torch.float32, torch.Generator().manual_seed(0))
    for config, name in ((FusionConfig(router=False), None), (FusionConfig(token_ranges={"router": (1, 2)}),
                                                              "token-range")):
        gm = aten_graph(lambda lg: route(lg, spec), x)
        record = run_passes(gm, config)
        assert not remarks(record, "applied")
        assert [m.name for m in remarks(record, "missed")] == ([name] if name else [])


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_kernel_equals_reference_with_ties_nan_and_poisoned_outputs(scoring):
    from braze.runtime.router import _run

    gen = torch.Generator().manual_seed(3)
    e, k = 40, 5
    logits = torch.randn(6, e, generator=gen)
    logits[1] = 0.5  # every value tied: the lowest indices, in order
    logits[2, 7] = float("nan")  # NaN first, as braze's top-k orders it
    logits[3, ::3] = 2.0  # ties at the top
    bias = torch.randn(e, generator=gen) * 0.01
    for spec in (Router(e, k, scoring, False, True, 0.0, 1.0), Router(e, k, scoring, True, False, 0.0, 2.0),
                 Router(e, k, scoring, True, True, 0.0, 1.0, groups=8, top_groups=3)):
        out = (torch.full((6, k), float("nan")), torch.full((6, k), -7, dtype=torch.int64))
        w, idx = _run(logits, bias, spec.to_json(), out=out)
        assert w is out[0] and idx is out[1]
        want_w, want_i = router_reference(spec, logits, bias if spec.bias else None)
        assert torch.equal(idx, want_i), (idx, want_i)
        torch.testing.assert_close(w, want_w, rtol=1e-6, atol=1e-6, equal_nan=True)
        if not spec.bias and spec.groups == 1:
            # a NaN logit: first under a sigmoid; a softmax row of NaN ties everywhere (the lowest indices)
            assert idx[1].tolist() == list(range(k)) and idx[2, 0] == (7 if scoring == "sigmoid" else 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_kernel_on_cuda_equals_reference_over_shapes_and_dtypes(scoring):
    from braze.runtime.router import _run

    gen = torch.Generator().manual_seed(11)
    for e, k, t, dtype in ((16, 10, 1, torch.bfloat16), (256, 8, 1, torch.float32), (256, 8, 64, torch.bfloat16),
                           (512, 10, 7, torch.float32), (60, 4, 33, torch.float16), (4096, 16, 3, torch.float32)):
        logits = torch.randn(t, e, generator=gen).to(dtype).cuda()
        logits[0, : e // 2] = logits[0, e // 2:]  # ties inside a row
        bias = (torch.randn(e, generator=gen) * 0.01).cuda()
        specs = [Router(e, k, scoring, False, True, 0.0, 1.0), Router(e, k, scoring, True, True, 1e-20, 2.5)]
        if e % 8 == 0 and k <= 3 * e // 8:
            specs.append(Router(e, k, scoring, True, True, 0.0, 2.5, groups=8, top_groups=3))
        for spec in specs:
            out = (torch.full((t, k), float("nan"), device="cuda"),
                   torch.full((t, k), -7, dtype=torch.int64, device="cuda"))
            w, idx = _run(logits, bias, spec.to_json(), out=out)
            want_w, want_i = router_reference(spec, logits.cpu(), bias.cpu() if spec.bias else None)
            # the kernel's exp and sigmoid may differ from ATen's CPU ones by an ulp: every row must agree except
            # one whose k-th and (k+1)-th choices are within 1e-5 of each other (none, in practice)
            x = logits.cpu().float()
            s = x.softmax(-1) if scoring == "softmax" else x.sigmoid()
            c = (s + bias.cpu() if spec.bias else s).sort(-1, descending=True).values  # (groups: a looser edge)
            edge = (c[:, k - 1] - c[:, k]).abs() <= 1e-5 * c[:, k - 1].abs() if k < e else torch.zeros(t, dtype=bool)
            agree = (idx.cpu() == want_i).all(-1)
            assert (agree | edge).all(), (e, k, t, dtype, spec, (~agree).nonzero())
            torch.testing.assert_close(w.cpu()[agree], want_w[agree], rtol=1e-5, atol=1e-6)
