"""Generated head-chain kernels (norm -> RoPE -> output / in-place cache write) against the reference.

Caches are poisoned; only the written slots may change, and they must hold the result.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from braze.patterns.layernorm import BiasAdd, LayerNorm
from braze.patterns.reference import head_group_reference
from braze.patterns.rope import Rope
from braze.patterns.stages import (
    CacheWrite,
    Cast,
    FieldWrite,
    FP8Quant,
    HeadChain,
    HeadGroup,
    RMSNorm,
    UnaryOp,
    WeightMul,
)
from braze.runtime import heads as rt
from braze.runtime.rowwise import _interpreter_ready

F32 = "float32"


@st.composite
def head_chains(draw) -> HeadChain:
    dtype = draw(st.sampled_from(["bfloat16", "float32"]))
    heads = draw(st.sampled_from([1, 2, 3, 8]))
    head_dim = draw(st.sampled_from([16, 64, 128]))
    bare = draw(st.integers(0, 5)) == 0  # a plain cache write: no norm, no rope
    norm = None
    if not bare and draw(st.booleans()):
        width = draw(st.sampled_from([head_dim, heads * head_dim]))
        eps = draw(st.sampled_from([1e-6, 1e-5]))
        if draw(st.booleans()):  # LayerNorm: weight and/or bias, as nn.LayerNorm / F.layer_norm
            affine = draw(st.sampled_from([(True, True), (True, False), (False, True), (False, False)]))
            epilogue = ((WeightMul(F32, dtype),) if affine[0] else ()) + ((BiasAdd(F32, dtype),) if affine[1] else ())
            norm = LayerNorm(eps, width, F32, epilogue + (Cast(dtype),))
        else:
            zc = draw(st.booleans())
            epilogue = (WeightMul(F32, dtype, zc, F32 if zc else None), Cast(dtype))
            norm = RMSNorm(eps, width, F32, F32, F32, F32, epilogue, False)
    rope = None
    if not bare and (draw(st.booleans()) or norm is None):
        r = int(head_dim * draw(st.sampled_from([1.0, 0.5, 0.25])))
        first = draw(st.booleans())
        full_table = draw(st.booleans())
        style = "neox" if full_table else draw(st.sampled_from(["neox", "gptj"]))
        mul = dtype if full_table else F32
        rope = Rope(style, head_dim, r, 0 if first else head_dim - r, r if full_table else r // 2, mul, dtype)
    quant = None
    if not bare and draw(st.integers(0, 2)) == 0:
        # one scale per head, or (in a RoPE chain, whatever segment holds each group) groups within a head
        quant = head_quant(head_dim, draw(st.booleans()), head_dim // draw(st.sampled_from([1, 1, 2, 4])))
    layout = draw(st.sampled_from(["rows", "rows", "bhsd"]))
    write = CacheWrite(draw(st.sampled_from([dtype, "float32"])), layout) \
        if quant is None and (bare or draw(st.booleans())) else None
    out = (not bare and draw(st.booleans())) or (write is None and quant is None)
    return HeadChain(dtype, heads, head_dim, norm, rope, draw(st.booleans()), out, write, quant)


def head_quant(head_dim: int, pow2: bool, group: int | None = None) -> FP8Quant:
    """One fp32 scale per head (or per `group` values of it): amax/448 floored at 1e-4, or rounded up to a
    power of two (DeepSeek's ue8m0)."""
    prog = (UnaryOp("cast", F32), UnaryOp("clamp_min", F32, 1e-4), UnaryOp("div", F32, 448.0))
    if pow2:
        prog += (UnaryOp("log2", F32), UnaryOp("ceil", F32), UnaryOp("exp2", F32))
    return FP8Quant(group or head_dim, "float8_e4m3fn", F32, "div", prog, (-448.0, 448.0), (prog,))


def make_inputs(chain: HeadChain, t: int, device: str, gen: torch.Generator):
    dt = getattr(torch, chain.in_dtype)
    wide = torch.randn(t, chain.heads, chain.head_dim + 3, generator=gen).to(device, dt)
    x = wide[:, :, 1:1 + chain.head_dim]  # strided rows and a gap between heads
    inputs = [x]
    if chain.norm is not None and chain.norm.has_weight:
        inputs.append((1 + 0.3 * torch.randn(chain.norm.width, generator=gen)).to(device, dt))
    if chain.norm is not None and getattr(chain.norm, "has_bias", False):
        inputs.append((0.5 * torch.randn(chain.norm.width, generator=gen)).to(device, dt))
    if chain.rope is not None:
        # gathered by position from a 16-row table; else one row per token, or one row for all tokens
        rows = 16 if chain.gather else (1 if torch.rand((), generator=gen) < 0.3 else t)
        inputs += [torch.randn(rows, chain.rope.table, generator=gen).to(device),
                   torch.randn(rows, chain.rope.table, generator=gen).to(device)]
        if chain.gather:
            inputs.append(torch.randint(0, rows, (t,), generator=gen).to(device))
    caches = []
    if chain.write is not None and chain.write.layout == "bhsd":
        # Hugging Face's static cache [batch, heads, seq, head_dim], here a slice of a longer one (strided);
        # one position shared by every sequence, or one each
        n = 1 if torch.rand((), generator=gen) < 0.5 else t
        slots = torch.randint(-6, 6, (n,), generator=gen).to(device)
        inputs.append(slots)
        cache = torch.full((t, chain.heads, 9, chain.head_dim), float("nan"), dtype=getattr(torch, chain.write.dtype),
                           device=device)
        caches.append(cache[:, :, :6])
    elif chain.write is not None:
        slots = torch.randperm(12, generator=gen)[:t].to(device)
        slots[0] = slots[0] - 12  # a negative slot wraps, as in eager indexing
        inputs.append(slots)
        caches.append(torch.full((3, 4, chain.heads, chain.head_dim), float("nan"),
                                 dtype=getattr(torch, chain.write.dtype), device=device))
    return inputs, caches


@given(chains=st.lists(head_chains(), min_size=1, max_size=3), t=st.sampled_from([1, 3, 5]),
       seed=st.integers(0, 999))
def test_group_kernel_matches_reference(chains, t, seed, device):
    if device == "cpu" and not _interpreter_ready():
        pytest.skip("needs the Triton interpreter")
    out_dtypes = {c.out_dtype for c in chains if c.out}
    chains = [c for c in chains if not c.out or c.out_dtype == min(out_dtypes)]  # outputs share a dtype
    group = HeadGroup(tuple(chains))
    gen = torch.Generator().manual_seed(seed)
    inputs, caches = [], []
    for chain in chains:
        i, c = make_inputs(chain, t, device, gen)
        inputs += i
        caches += c
    ref_caches = [c.cpu().clone() for c in caches]
    ref = head_group_reference(group, [i.cpu() for i in inputs], ref_caches)
    kernel = rt.heads_kernel(group)
    outs = [o.fill_(float("nan")) if o.dtype.itemsize > 1 else o.fill_(0) for o in rt._outputs(group, inputs[0])]
    on_cpu = device == "cpu"
    rt._launch(kernel, kernel.interpreted if on_cpu else kernel.jit, group, inputs, caches, outs, interpreted=on_cpu)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7}
    torch.testing.assert_close(outs[0].cpu().float(), ref[0].float(), rtol=tol[ref[0].dtype], atol=1e-5)
    assert len(outs) == len(ref)
    k = 1
    for chain in chains:
        if chain.quant is None:
            continue
        groups = chain.head_dim // chain.quant.group_size  # scales per head
        q, scale = outs[k].cpu().float().view(t, chain.heads, groups, -1), outs[k + 1].cpu().view(t, chain.heads, groups, 1)
        rq, rscale = ref[k].float().view(t, chain.heads, groups, -1), ref[k + 1].view(t, chain.heads, groups, 1)
        k += len(chain.quant_outputs())
        # The result the quant reads may differ from the reference's by one ulp of its dtype (as the
        # result does), which moves amax by as much and a power-of-two scale by a factor of 2 at a
        # boundary: compare the dequantized values, within one fp8 step of each other.
        assert not q.isnan().any()
        torch.testing.assert_close(q * scale, rq * rscale, rtol=0.13, atol=float(rscale.max()) * 2 ** -9)
        ratio = scale / rscale
        close = (ratio - 1).abs() <= 2 ** -7
        assert bool((close | (ratio == 2) | (ratio == 0.5)).all()), ratio.flatten()
    for c, r in zip(caches, ref_caches):
        if c._base is not None:  # a strided slice of a longer cache: the rest of it stays poisoned
            assert c._base[:, :, c.shape[2]:].isnan().all(), "a write landed outside the cache's slice"
        c = c.cpu()
        untouched = r.isnan()
        assert torch.equal(c.isnan(), untouched), "a slot outside the written ones changed, or one was not written"
        torch.testing.assert_close(c[~untouched].float(), r[~untouched].float(), rtol=tol[r.dtype], atol=1e-5)


def test_op_writes_the_cache_in_place(device):
    chain = HeadChain("bfloat16", 2, 64, None, Rope("neox", 64, 32, 0, 16, F32, "bfloat16"), False, True,
                      CacheWrite("bfloat16"))
    group = HeadGroup((chain,))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 64, generator=gen).to(device, torch.bfloat16)
    cos, sin = torch.randn(3, 16, generator=gen).to(device), torch.randn(3, 16, generator=gen).to(device)
    cache = torch.zeros(4, 2, 2, 64, dtype=torch.bfloat16, device=device)
    slots = torch.tensor([5, 0, 2], device=device)
    ptr = cache.data_ptr()
    out = torch.ops.braze.fused_heads([x, cos, sin, slots], [cache], group.to_json()).view(3, 2, 64)
    assert cache.data_ptr() == ptr
    flat = cache.view(-1, 2, 64)
    assert torch.equal(flat[slots], out) and flat[[1, 3, 4, 6, 7]].abs().sum() == 0


def field_layout(sizes: list[int], block: int, n_slots: int, fields: list[tuple[str, str]]) -> list[FieldWrite]:
    """Fields of `sizes` bytes each, side by side in one row per slot (block 0) or, paged, each a
    block-long run per page (DeepSeek's index cache: all keys of a page, then all its scales)."""
    out, off = [], 0
    for (value, dtype), size in zip(fields, sizes):
        if block:
            out.append(FieldWrite(value, 0, dtype, off * block, size, n_slots, block, sum(sizes) * block))
        else:
            out.append(FieldWrite(value, 0, dtype, off, sum(sizes), n_slots))
        off += size
    return out


def read_field(cache: torch.Tensor, f: FieldWrite, slots: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the values of field f at each slot [T, n] as f.dtype, the byte addresses [T, n · size])."""
    slot = torch.where(slots < 0, slots + f.n_slots, slots)
    base = (slot // f.block) * f.page_stride + (slot % f.block) * f.row_stride if f.block else slot * f.row_stride
    addr = base[:, None] + f.offset + torch.arange(n * f.size)
    return cache.view(-1)[addr].contiguous().view(getattr(torch, f.dtype)), addr


@given(dtype=st.sampled_from(["bfloat16", "float32"]), heads=st.sampled_from([1, 3, 4]),
       head_dim=st.sampled_from([32, 128]), block=st.sampled_from([0, 1, 4]), norm=st.booleans(),
       pow2=st.booleans(), t=st.sampled_from([1, 3, 5]), seed=st.integers(0, 999))
def test_byte_fields_pack_quant_values_scales_and_rope_into_byte_caches(dtype, heads, head_dim, block, norm, pow2, t,
                                                                         seed, device):
    """DeepSeek's packed caches, generalized: a norm -> per-head fp8 chain writes its fp8 values and fp32
    scales, a GPT-J RoPE chain its bf16 result, as bytes of one row per slot or paged runs. Every byte
    outside the written fields keeps its poison; the written values decode to the reference's."""
    if device == "cpu" and not _interpreter_ready():
        pytest.skip("needs the Triton interpreter")
    width = heads * head_dim
    n_slots = 12
    sizes = [width, 4 * heads, 2 * 64]
    fields = field_layout(sizes, block, n_slots, [("q", "float8_e4m3fn"), ("scale0", F32), ("result", "bfloat16")])
    rms = RMSNorm(1e-6, width, F32, F32, F32, F32, (WeightMul(F32, dtype), Cast(dtype)), False) if norm else None
    quant_chain = HeadChain(dtype, heads, head_dim, rms, None, False, False, None, head_quant(head_dim, pow2),
                            fields=tuple(fields[:2]), quant_out=False)
    rope_chain = HeadChain(F32, 1, 64, None, Rope("gptj", 64, 64, 0, 32, F32, F32), True, False, None,
                           fields=(fields[2],))
    group = HeadGroup((quant_chain, rope_chain))
    gen = torch.Generator().manual_seed(seed)
    slots = torch.randperm(n_slots, generator=gen)[:t]
    slots[0] -= n_slots  # a negative slot wraps, as in eager indexing
    inputs = [torch.randn(t, heads, head_dim, generator=gen).to(getattr(torch, dtype)) * 3]
    if norm:
        inputs.append((1 + 0.3 * torch.randn(width, generator=gen)).to(getattr(torch, dtype)))
    inputs.append(slots)
    inputs += [torch.randn(t, 1, 64, generator=gen), torch.randn(16, 32, generator=gen),
               torch.randn(16, 32, generator=gen), torch.randint(0, 16, (t,), generator=gen), slots]
    cache = torch.randint(0, 256, (n_slots * sum(sizes),), generator=gen, dtype=torch.uint8)
    ref_cache = cache.clone()
    ref = head_group_reference(group, inputs, [ref_cache])
    assert len(ref) == 1 and ref[0].numel() == 0  # everything went into the cache
    inputs, cache = [i.to(device) for i in inputs], cache.to(device)
    kernel = rt.heads_kernel(group)
    outs = rt._outputs(group, inputs[0])
    on_cpu = device == "cpu"
    rt._launch(kernel, kernel.interpreted if on_cpu else kernel.jit, group, inputs, [cache], outs, interpreted=on_cpu)
    cache = cache.cpu()
    written = torch.zeros_like(cache, dtype=torch.bool)
    got = {}
    for f, n in zip(fields, (width, heads, 64)):
        got[f.value], addr = read_field(cache, f, slots, n)
        want, _ = read_field(ref_cache, f, slots, n)
        written[addr.flatten()] = True
        got[f.value + "_ref"] = want
    assert torch.equal(cache[~written], ref_cache[~written]), "a byte outside the written fields changed"
    torch.testing.assert_close(got["result"].float(), got["result_ref"].float(), rtol=2 ** -7, atol=1e-5)
    q, scale = got["q"].float().view(t, heads, -1), got["scale0"].view(t, heads, 1)
    rq, rscale = got["q_ref"].float().view(t, heads, -1), got["scale0_ref"].view(t, heads, 1)
    assert not q.isnan().any()
    # one ulp of the normed value may move amax, and a power-of-two scale by 2 at a boundary (as above)
    torch.testing.assert_close(q * scale, rq * rscale, rtol=0.13, atol=float(rscale.max()) * 2 ** -9)


@given(heads=st.sampled_from([1, 3, 4]), head_dim=st.sampled_from([64, 128]), pow2=st.booleans(),
       w_dtype=st.sampled_from(["bfloat16", "float32"]), post=st.booleans(), t=st.sampled_from([1, 3, 5]),
       seed=st.integers(0, 999))
def test_scale_product_is_stored_in_place_of_the_scale(heads, head_dim, pow2, w_dtype, post, t, seed, device):
    """DeepSeek's indexer q: NeoX RoPE -> fp8 per head, the head weights w [T, H] (a strided slice of a
    projection) times the quant scale with constant factors before (and after) the product."""
    if device == "cpu" and not _interpreter_ready():
        pytest.skip("needs the Triton interpreter")
    from braze.patterns.stages import ScaleProduct

    pre = (UnaryOp("cast", w_dtype), UnaryOp("cast", F32), UnaryOp("mul", F32, 128 ** -0.5 * 64 ** -0.5))
    product = ScaleProduct(0, w_dtype, pre, F32, (UnaryOp("mul", F32, 0.75),) if post else ())
    rope = Rope("neox", head_dim, 64, 0, 32, F32, "bfloat16")
    chain = HeadChain("bfloat16", heads, head_dim, None, rope, True, False, None, head_quant(head_dim, pow2),
                      product=product)
    group = HeadGroup((chain,))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, heads, head_dim, generator=gen).to(torch.bfloat16) * 3
    proj = torch.randn(t, 2 * heads + 1, generator=gen).to(getattr(torch, w_dtype))
    w = proj[:, 1:1 + 2 * heads:2]  # [T, H], row stride 2H + 1, head stride 2
    inputs = [x, torch.randn(16, 32, generator=gen), torch.randn(16, 32, generator=gen),
              torch.randint(0, 16, (t,), generator=gen), w]
    ref = head_group_reference(group, inputs, [])
    plain = head_group_reference(HeadGroup((dataclasses.replace(chain, product=None),)), inputs, [])
    inputs = [i.to(device) for i in inputs]
    kernel = rt.heads_kernel(group)
    outs = rt._outputs(group, inputs[0])
    outs[2].fill_(float("nan"))
    on_cpu = device == "cpu"
    rt._launch(kernel, kernel.interpreted if on_cpu else kernel.jit, group, inputs, [], outs, interpreted=on_cpu)
    assert len(outs) == len(ref) == 3 and outs[2].dtype == torch.float32
    got, want, scale = outs[2].cpu().view(t, heads), ref[2].view(t, heads), plain[2].view(t, heads)
    assert not got.isnan().any(), "a head's product was not written"
    # the reference's product is the head weights times its own scale
    factor = 0.75 if post else 1.0
    torch.testing.assert_close(want, (w.float() * 128 ** -0.5 * 64 ** -0.5) * scale * factor, rtol=1e-6, atol=0)
    # the kernel's scale may differ by a factor of 2 where one ulp of the rotated value moves amax across a
    # power of two (as in the tests above); elsewhere the product is exact up to fp32 rounding
    ratio = got / want.where(want != 0, torch.ones_like(want))
    ok = ((ratio - 1).abs() <= 2 ** -7) | (ratio == 2) | (ratio == 0.5) | ((got == 0) & (want == 0))
    assert bool(ok.all()), ratio
