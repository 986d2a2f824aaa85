"""An RMSNorm read only by decode GEMMs, folded into braze's decode kernel (braze/passes/decode_gemm.py).

DeepSeek V3.2's q_c norm reads a slice of the q_a/kv_a projection and is read only by q_b and the indexer's wq_b.
Folded, it costs no kernel, and the chains behind those GEMMs share one launch with the k chain that writes the
cache (a writing launch that also returns fp8 values and scales). The graphs here are traced on CPU with the pass
told to act there and the kernels run under Triton's interpreter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from test_decode_gemm import monkeypatch_module  # noqa: F401  (a fixture)

from braze import FusionConfig
from braze.codegen.decode_mm import rmsnorm_reference
from braze.models.common import apply_rope
from braze.models.fp8 import quant_fp8_group
from braze.passes import decode_gemm
from braze.passes.decode_gemm import norm_form
from braze.patterns.stages import Cast, RMSNorm, WeightMul
from braze.testing import aten_graph, run_passes

BF16 = torch.bfloat16


# the pass acts on CPU graphs and the op runs its kernel under the interpreter, for this module's tests
pytestmark = pytest.mark.usefixtures("monkeypatch_module")


def rms(x, w, form, eps=1e-6, stats=torch.float32):
    """The RMSNorm spellings people write: HF's Llama/DeepSeek ("cast,w"), weight in fp32 then cast ("w"), Qwen 3.5's
    zero-centered ("1+w"); `stats` bf16 computes the statistics without an upcast (the kernel does not fold that)."""
    h = x.to(stats)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if form == "cast,w":
        return w * h.to(x.dtype)
    if form == "w":
        return (h * w.float()).to(x.dtype)
    return (h * (1.0 + w.float())).to(x.dtype)


def prologue(x, wa, wn, wq, wi, cos_t, sin_t, pos, k_cache, slots, *, form="cast,w", heads=2, extra_reader=False,
             stats=torch.float32):
    """DeepSeek's shape: x -> [q_c | k] projection; q_c normed and read by two GEMMs whose outputs are rotated (and
    one quantized to fp8); k rotated and cached."""
    t = x.shape[0]
    q_c, k = F.linear(x, wa).split([64, 32], dim=-1)
    q_c = rms(q_c, wn, form, stats=stats)
    k = apply_rope(k.reshape(t, 1, 32), cos_t[pos], sin_t[pos], style="gptj")
    k_cache.view(-1, 1, 32)[slots] = k
    q = apply_rope(F.linear(q_c, wq).view(t, heads, 32), cos_t[pos], sin_t[pos], style="gptj")
    iq = apply_rope(F.linear(q_c, wi).view(t, heads, 32), cos_t[pos], sin_t[pos], style="neox")
    iq8, scale = quant_fp8_group(iq, 32, ue8m0=True)
    out = (q, iq8.float() * scale.repeat_interleave(32, -1), k_cache.view(-1, 32)[slots].float().sum())
    return out + (q_c.float().sum(),) if extra_reader else out


def case(t, seed, config=None, heads=2, **kw):
    gen = torch.Generator().manual_seed(seed)
    args = (torch.randn(t, 96, generator=gen).to(BF16), (torch.randn(96, 96, generator=gen) / 10).to(BF16),
            (0.3 * torch.randn(64, generator=gen) + (0 if kw.get("form") == "1+w" else 1)).to(BF16),
            (torch.randn(heads * 32, 64, generator=gen) / 8).to(BF16),
            (torch.randn(heads * 32, 64, generator=gen) / 8).to(BF16), torch.randn(16, 16, generator=gen),
            torch.randn(16, 16, generator=gen), torch.randint(0, 16, (t,), generator=gen),
            torch.full((6, 2, 32), float("nan"), dtype=BF16), torch.randperm(12, generator=gen)[:t])

    def fn(*a):
        return prologue(*a, heads=heads, **kw)

    gm = aten_graph(fn, *args)
    record = run_passes(gm, config or FusionConfig(norm_quant=False))
    gm.graph.lint()
    got_cache, want_cache = args[8].clone(), args[8].clone()
    got = gm(*args[:8], got_cache, args[9])
    want = fn(*args[:8], want_cache, args[9])
    # q (bf16 after a GEMM and a rotation: an ulp or two of the largest values), the indexer q (fp8: a different GEMM rounding
    # may flip a value by one e4m3 step, 1/8 relative), the cache rows
    for g, w, rtol in zip(got, want, (2 ** -6, 0.13, 2 ** -6, 2 ** -6)):
        torch.testing.assert_close(g.float(), w.float(), rtol=rtol, atol=0.06)  # |values| up to ~8: 2 bf16 ulps
    assert torch.equal(got_cache.isnan(), want_cache.isnan())  # only the written slots changed
    torch.testing.assert_close(got_cache[~want_cache.isnan()], want_cache[~want_cache.isnan()], rtol=2 ** -6, atol=1e-2)
    return record, gm


def named(record, name):
    return [(r.kind, r.name) for r in record.remarks if r.name == name]


def launches(record):
    return {r.ops: dict(r.args)["launch"] for r in record.remarks if r.kind == "applied" and r.pass_name == "head-chain"}


def norm_ops(gm):
    return [n for n in gm.graph.nodes if n.target in (torch.ops.aten.rsqrt.default, torch.ops.aten.mean.dim)]


@settings(max_examples=4, phases=(Phase.explicit, Phase.reuse, Phase.generate))  # ~3 s an example
@given(t=st.sampled_from([1, 2]), form=st.sampled_from(["cast,w", "w", "1+w"]), seed=st.integers(0, 999))
def test_norm_read_by_decode_gemms_is_folded_and_the_chains_share_one_launch(t, form, seed):
    record, gm = case(t, seed, form=form)
    assert named(record, "norm-in-gemm") == [("applied", "norm-in-gemm")], [str(r) for r in record.remarks]
    (fold,) = [r for r in record.remarks if r.name == "norm-in-gemm"]
    assert dict(fold.args) == {"gemms": 2, "form": form}
    assert not norm_ops(gm)  # no norm left to Inductor
    folded = [n for n in gm.graph.nodes if n.target is torch.ops.braze.decode_mm.default and len(n.args) > 3]
    assert len(folded) == 2 and {n.args[4] for n in folded} == {form}
    # k's RoPE + cache write, q's RoPE and the indexer q's RoPE + fp8: one launch, behind the two GEMMs
    assert set(launches(record)) == {("rope", "store"), ("rope",), ("rope", "fp8_quant")}
    assert record.stats["head-chain"]["launches"] == 1


@pytest.mark.parametrize("variant", ["extra-reader", "switch-off", "tokens", "four-tokens", "bf16-stats", "cpu-graph"])
def test_norms_that_must_not_fold_stay_with_inductor(variant, monkeypatch):
    config = FusionConfig(norm_quant=False, decode_gemm_norm=variant != "switch-off")
    kw = {"extra_reader": variant == "extra-reader", "stats": BF16 if variant == "bf16-stats" else torch.float32}
    if variant == "cpu-graph":  # the pass acts on CUDA graphs only
        monkeypatch.setattr(decode_gemm, "DEVICES", ("cuda",))
    # five tokens: outside the decode range; four: the plan measured the fold slower there
    record, gm = case({"tokens": 5, "four-tokens": 4}.get(variant, 1), 0, config, **kw)
    assert not named(record, "norm-in-gemm"), variant
    assert not [n for n in gm.graph.nodes if n.target is torch.ops.braze.decode_mm.default and len(n.args) > 3]
    # Inductor computes the norm (with braze's chain launch behind the GEMMs, it would tie a launch of its own)
    assert norm_ops(gm) and ("rmsnorm",) not in launches(record)
    assert record.stats["head-chain"]["launches"] == 1


def test_a_norm_of_a_residual_sum_is_not_folded():
    """Inductor computes such a norm in the add's kernel: folding it would save no kernel."""
    def f(x, r, wn, wq, wk):
        h = x + r
        n = rms(h, wn, "cast,w")
        return F.linear(n, wq), F.linear(n, wk), h

    args = (torch.randn(1, 64).to(BF16), torch.randn(1, 64).to(BF16), torch.ones(64, dtype=BF16),
            torch.randn(32, 64).to(BF16), torch.randn(16, 64).to(BF16))
    gm = aten_graph(f, *args)
    record = run_passes(gm, FusionConfig())
    assert not named(record, "norm-in-gemm") and norm_ops(gm)
    for a, b in zip(gm(*args), f(*args)):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_norm_forms_the_kernel_takes_and_the_ones_it_does_not():
    f32 = dict(square="float32", mean="float32", rstd="float32", normed="float32", store=False)
    w = WeightMul("bfloat16", "bfloat16")
    assert norm_form(RMSNorm(1e-6, 64, epilogue=(Cast("bfloat16"), w), **f32), BF16) == ("cast,w", "")
    assert norm_form(RMSNorm(1e-6, 64, epilogue=(WeightMul("float32", "bfloat16", True, "float32"), Cast("bfloat16")),
                             **f32), BF16) == ("1+w", "")
    assert norm_form(RMSNorm(1e-6, 64, epilogue=(Cast("bfloat16"),), **f32), BF16) == ("cast", "")
    assert norm_form(RMSNorm(1e-6, 64, epilogue=(), **f32), BF16)[1] == "its output is float32, not the GEMM's bfloat16"
    assert norm_form(RMSNorm(1e-6, 64, epilogue=(Cast("float16"), w), **f32), BF16)[1] == "it rounds to float16"
    assert "rsqrt" in norm_form(RMSNorm(1e-6, 64, epilogue=(Cast("bfloat16"),), inverse="div_sqrt", **f32), BF16)[1]
    x, nw = torch.randn(3, 64).to(BF16), torch.randn(64).to(BF16)
    torch.testing.assert_close(rmsnorm_reference(x, nw, "cast,w", 1e-6), rms(x, nw, "cast,w"), rtol=0, atol=0)
    torch.testing.assert_close(rmsnorm_reference(x, nw, "1+w", 1e-6), rms(x, nw, "1+w"), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:braze::sibling_mm")  # run_passes does not re-point the weights
def test_merged_gemms_fold_the_norm_into_the_merged_gemm():
    """With parameters for weights, gemm-merge stacks q and the indexer's q GEMMs first; the norm folds into the
    merged one (`braze::sibling_mm`, which on CUDA runs braze's kernel and elsewhere the reference norm + mm)."""
    gen = torch.Generator().manual_seed(3)
    x, wn = torch.randn(1, 64, generator=gen).to(BF16), (1 + 0.3 * torch.randn(64, generator=gen)).to(BF16)
    wq, wi = (torch.randn(96, 64, generator=gen) / 8).to(BF16), (torch.randn(32, 64, generator=gen) / 8).to(BF16)
    wa = (torch.randn(64, 64, generator=gen) / 8).to(BF16)

    def f(x, wa, wn, wq, wi):
        q_c = rms(F.linear(x, wa), wn, "cast,w")
        return F.linear(q_c, wq), F.linear(q_c, wi)

    params = (x, *(torch.nn.Parameter(a, requires_grad=False) for a in (wa, wn, wq, wi)))
    gm = aten_graph(f, *params)
    record = run_passes(gm, FusionConfig(), inputs=params)
    assert named(record, "norm-in-gemm") == [("applied", "norm-in-gemm")] and not norm_ops(gm)
    (merged,) = [n for n in gm.graph.nodes if n.target is torch.ops.braze.sibling_mm.default]
    assert merged.args[3] is True and merged.args[5:] == ("cast,w", 1e-6)
    for a, b in zip(gm(*params), f(*params)):
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -6, atol=2e-2)
