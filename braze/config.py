"""FusionConfig: what braze may fuse, where, and how it checks itself."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

# Fusion families with a switch and a token range each. A family appears here
# only once braze implements it.
FAMILIES = ("norm_quant", "chain", "chain_absorb", "collective", "post_conv", "delta_rule", "gated_norm",
            "delta_rule_norm", "delta_rule_conv", "moe", "router", "topk", "gemm_merge", "decode_gemm",
            "dual_stream")
VERIFY_MODES = ("off", "compile")


@dataclass(frozen=True)
class TokenRange:
    """Token counts [lo, hi] (inclusive; hi None = unbounded) where a fusion applies."""

    lo: int = 1
    hi: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.lo, int) or isinstance(self.lo, bool) or self.lo < 0:
            raise ValueError(f"TokenRange.lo={self.lo!r}: expected an int >= 0")
        if self.hi is not None and (not isinstance(self.hi, int) or isinstance(self.hi, bool) or self.hi < self.lo):
            raise ValueError(f"TokenRange.hi={self.hi!r}: expected None or an int >= lo ({self.lo})")

    def __contains__(self, n: int) -> bool:
        return self.lo <= n and (self.hi is None or n <= self.hi)

    def __str__(self) -> str:
        return f"[{self.lo}, {'inf' if self.hi is None else self.hi}]"


# Sibling GEMMs merge at one token: there the merged GEMM is faster on an H100 (DeepSeek V3.2's prologue 70.3 ->
# 59.5 µs, its step 2112.6 -> 2066.2 µs), while from 2 tokens cuBLAS splits the merged GEMMs over more kernels
# (13 instead of 9 in the prologue: 55.2 -> 53.6 µs at T=2, 55.1 -> 74.9 at T=4, 54.8 -> 76.1 at T=8;
# benchmarks/results/deepseek_prologue_s9.md). The cost model still requires every member memory-bound.
# Two streams only while the branches are small: above 64 tokens a branch's GEMMs fill the GPU alone.
_DEFAULT_RANGES = {"gemm_merge": TokenRange(1, 1), "dual_stream": TokenRange(1, 64),
                   # the kernel takes 1..4 token rows; decode_mm_plan says at which weight shapes it wins
                   "decode_gemm": TokenRange(1, 4),
                   # MLA's W_UK product inside the chain launch runs every token through one program per weight
                   # tile, so its time grows with T. DeepSeek V3.2's prologue on an H200, L2 flushed, with it vs
                   # cuBLAS's bmm: T=1 28.4 vs 31.8 µs, T=2 41.2 vs 43.0, T=4 46.2 vs 43.7, T=8 54.4 vs 44.5
                   # (session15_gpu/2_absorb); its step at T=64 took 3438 µs with it, 3043 without
                   "chain_absorb": TokenRange(1, 2),
                   # time-neutral at T=1 and 8, 1.2 µs slower per layer at 64 (H200, session12_gpu/3_fold_final)
                   "delta_rule_conv": TokenRange(1, 8)}


def _default_ranges() -> tuple[tuple[str, TokenRange], ...]:
    return tuple((f, _DEFAULT_RANGES.get(f, TokenRange())) for f in FAMILIES)


@dataclass(frozen=True)
class FusionConfig:
    """Everything that changes what braze does to a graph (it is part of the cache key).

    norm_quant: fuse RMSNorm (+ residual add) -> FP8 dynamic quant.
    chain: fuse per-head [RMSNorm ->] RoPE [-> in-place cache write] chains.
    chain_absorb: with chain, also run MLA's absorbed W_UK product (a per-head bmm against a weight) inside a
        chain launch where it joins one; each program runs every token through one weight tile, so only at
        the few tokens of its token range.
    post_conv: fuse Gated DeltaNet's causal conv update -> split -> L2 norm -> gating.
    delta_rule: fuse Gated DeltaNet's recurrent decode update (decay, u = Sᵀk, δ = β(v − u),
        S += kδᵀ, o = Sᵀq, the fp32 state rows written in place) into one kernel.
    gated_norm: fuse the gated RMSNorm (x̂·w)·silu(z) [-> FP8 quant].
    delta_rule_norm: with delta_rule and gated_norm, compute the gated RMSNorm of the update's output (one row
        per value head) inside the delta-rule kernel, one program per value head holding its whole state row
        (heads of at most 16384 state values); a `gated-norm-apart` remark says why one stays a kernel of its own.
    delta_rule_conv: with post_conv and delta_rule_norm, also run the post-conv path (conv update, L2 norm of
        q and k, gating) inside that kernel: each program redoes its key head's conv, and the last of a key
        head's programs to arrive (a counter per conv state row and key head, a zeroed int32 buffer the
        compiled graph holds) shifts its q/k conv state; a `post-conv-apart` remark says why one stays apart.
        Default token range [1, 8]: one launch fewer per linear-attention layer at the same kernel time there; at 64
        tokens the redone conv costs more than the launch it saves.
    moe: fuse the routed SwiGLU experts of a small decode step (sort -> grouped GEMMs -> SwiGLU ->
        un-sort -> weighted sum) into two kernels that compute each (token, expert) pair unsorted,
        while the pairs do not outnumber the experts; a shared expert of the same widths added to
        them (plain or sigmoid-gated) becomes one more pair per token (moe_shared).
    moe_shared: with moe, take a shared expert of the routed experts' widths into their two kernels,
        while its weights are at most `moe_shared_max_mb` MB; else (or off) it stays cuBLAS GEMMs and
        Inductor kernels beside them, with a `shared-expert-apart` remark.
    moe_shared_max_mb: the largest shared expert (gate, up and down weights) folded into the MoE kernels.
        48: on an H200 at T=1 the fold made Qwen 3.5's step 7.8% faster (25 MB shared experts) and
        DeepSeek V3.2's 4.0% slower (88 MB; its gate/up kernel lost more than the cuBLAS GEMMs it
        replaced), benchmarks/results/README.md session 11.
    router: fuse a MoE router (softmax or sigmoid scores, + a correction bias, DeepSeek V3's group-limited
        choice, top-k, the chosen scores renormalized and scaled) into one kernel.
    topk: run each `aten.topk` over rows of at most 2048 values (routers, DeepSeek V3.2's indexer over a
        short context) as one Triton kernel, a sort per row or a rank of each value (1.1-6.7x ATen's on
        an H100 where it applies, topk.md); ties come out in index order. Its token range bounds the
        rows (the product of the dims before the last).
    gemm_merge: merge GEMMs that read the same activation into one GEMM over their weights,
        which the backend re-points into one buffer (no extra memory); only while memory-bound, at
        one token by default (-1.9% of DeepSeek V3.2's step and -2.0% of Qwen 3.5's at T=1 on an H200,
        results README session 15; from T=2 the merged GEMMs add cuBLAS split-K kernels and lose).
        Weights must be frozen nn.Parameters (requires_grad=False), else a `not-parameters` remark says
        why nothing merged.
    decode_gemm: run a 2-D GEMM of 1..4 token rows against a [N, K] weight read from a graph input on braze's
        weight-stream kernel (braze.codegen.decode_mm) where `decode_mm_plan` says it beats cuBLAS at that shape
        (H200 sweep, decode_mm.md); CUDA graphs only: it is a GPU kernel choice. Merged sibling GEMMs make the
        same choice inside `braze::sibling_mm`. On an H200 at T=1 it takes 1.0-1.6% off the steps of the three
        models (DeepSeek V3.2 1510.0 -> 1493.5 µs), 2.1% off Qwen 3.5's at T=4 (results README, session 13).
    decode_gemm_norm: with decode_gemm, compute an RMSNorm that only such GEMMs read, and that Inductor would
        run as a kernel of its own (DeepSeek V3.2's q_c norm), inside their decode kernel: no kernel for the norm,
        and the chains behind those GEMMs need no launch before them.
    dual_stream: run the smaller of two independent branches on a side CUDA stream where the cost
        model (with the card's measured constants, passes/cost.py CARDS) says it pays, or the largest branch
        beside the rest of its region where that pays more (DeepSeek V3.2's shared expert beside router and
        routed experts at T=1; the dense experts beside router and shared expert from T=8); both sides compiled
        by Inductor; graphs on CUDA only. On an H200 (results README, session 18) it takes 1.4% / 4.3% off
        DeepSeek V3.2's step at T=1 / 8, 6.9% / 6.1% off Qwen 3.5's at T=8 / 64, and 4.4% / 2.5% off MiniMax
        M2.5's (session 17); 11-32 µs per overlapped MoE block; it changes nothing where it does not act. Its cost
        is compile time: each distinct overlapped pair compiles apart at the first call (identical layers share
        one spec: two compiles per model in the bench configs); the first call with merging and dual-stream
        measured -8% to +19% of it without them in session 17, within the 20% braze allows a pass (not measured
        again since the rest of a region is outlined, session 18).
    collective: fuse all-reduce -> residual add -> RMSNorm (-> FP8 quant), and the
        TP-reduced norms whose variances are all-reduced (MiniMax-M2.5's QK-norm). On CUDA the
        all-reduce + norm is fused only where every launch the graph can see takes the one-shot
        kernel (T bounded by `symm_max_tokens`, the workspace holds it): that kernel takes 0.35-0.57x
        the time of NCCL + stock Inductor on 2 H100s and 0.55-0.99x on 4 at T <= 256
        (benchmarks/results/allreduce_norm_tp2.md, _tp4.md), while braze's NCCL path above it is
        1.1-1.3x (a `one-shot-coverage` remark says why a site was left).
    symm_max_tokens: up to this many tokens a fused collective runs as one kernel with a
        one-shot all-reduce over symmetric memory (CUDA), if the group's workspace holds it;
        above it, NCCL then braze's kernel. 256: the largest T measured, and faster than NCCL +
        stock there at every hidden size measured on 2 H100s (benchmarks/allreduce_norm.py).
    verify: "off", or "compile" to run each candidate site fused vs unfused on
        random inputs of its real shapes at compile time and refuse mismatches.
    verify_rtol: relative error allowed by the numerics gate, as a multiple of
        the output dtype's resolution.
    token_ranges: family -> TokenRange (or (lo, hi)) of token counts where it applies.
    dump_dir: where to write generated kernels and graphs before/after braze.
    count_stock_kernels: also compile each graph with stock Inductor to count
        its kernels for the report (doubles compile time).
    """

    norm_quant: bool = True
    chain: bool = True
    chain_absorb: bool = True
    collective: bool = True
    symm_max_tokens: int = 256
    post_conv: bool = True
    delta_rule: bool = True  # 10-12 µs faster per Qwen 3.5 step than without (H100: qwen3.5_bench_tp1_static_delta_rule.md)
    gated_norm: bool = True
    delta_rule_norm: bool = True
    delta_rule_conv: bool = True
    moe: bool = True
    moe_shared: bool = True
    moe_shared_max_mb: float = 48.0
    router: bool = True
    topk: bool = True
    gemm_merge: bool = True  # GPU tests passed (gpu_tests.md, session 6); token range [1, 1] (see above)
    decode_gemm: bool = True
    decode_gemm_norm: bool = True
    dual_stream: bool = True
    verify: str = "off"
    verify_rtol: float = 1.0
    token_ranges: Mapping[str, TokenRange] | tuple = field(default_factory=_default_ranges)
    dump_dir: str | None = None
    count_stock_kernels: bool = False

    def __post_init__(self) -> None:
        for f in ("norm_quant", "chain", "chain_absorb", "collective", "post_conv", "delta_rule", "gated_norm",
                  "delta_rule_norm", "delta_rule_conv", "moe", "moe_shared", "router", "topk", "gemm_merge",
                  "decode_gemm", "decode_gemm_norm", "dual_stream", "count_stock_kernels"):
            v = getattr(self, f)
            if not isinstance(v, bool):
                raise ValueError(f"FusionConfig.{f}={v!r}: expected True or False")
        if not isinstance(self.symm_max_tokens, int) or isinstance(self.symm_max_tokens, bool) \
                or self.symm_max_tokens < 0:
            raise ValueError(f"FusionConfig.symm_max_tokens={self.symm_max_tokens!r}: expected an int >= 0 "
                             "(0 turns the one-shot kernels off)")
        if not isinstance(self.moe_shared_max_mb, (int, float)) or isinstance(self.moe_shared_max_mb, bool) \
                or not self.moe_shared_max_mb >= 0:
            raise ValueError(f"FusionConfig.moe_shared_max_mb={self.moe_shared_max_mb!r}: expected a number >= 0")
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"FusionConfig.verify={self.verify!r}: expected one of {VERIFY_MODES}")
        if not isinstance(self.verify_rtol, (int, float)) or isinstance(self.verify_rtol, bool) or self.verify_rtol <= 0:
            raise ValueError(f"FusionConfig.verify_rtol={self.verify_rtol!r}: expected a number > 0")
        if self.dump_dir is not None and not isinstance(self.dump_dir, str):
            raise ValueError(f"FusionConfig.dump_dir={self.dump_dir!r}: expected None or a path string")
        object.__setattr__(self, "token_ranges", self._normalize_ranges(self.token_ranges))

    @staticmethod
    def _normalize_ranges(ranges: object) -> tuple[tuple[str, TokenRange], ...]:
        items = ranges.items() if isinstance(ranges, Mapping) else ranges
        merged = dict(_default_ranges())
        try:
            pairs = list(items)
        except TypeError:
            raise ValueError(f"FusionConfig.token_ranges={ranges!r}: expected a mapping family -> TokenRange") from None
        for pair in pairs:
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise ValueError(f"FusionConfig.token_ranges={ranges!r}: expected a mapping family -> TokenRange")
            family, rng = pair
            if family not in FAMILIES:
                raise ValueError(f"FusionConfig.token_ranges: unknown family {family!r}; expected one of {FAMILIES}")
            if isinstance(rng, tuple) and len(rng) == 2:
                rng = TokenRange(*rng)
            if not isinstance(rng, TokenRange):
                raise ValueError(
                    f"FusionConfig.token_ranges[{family!r}]={rng!r}: expected a TokenRange or a (lo, hi) pair"
                )
            merged[family] = rng
        return tuple(sorted(merged.items()))

    def enabled(self, family: str) -> bool:
        return bool(getattr(self, family))

    def token_range(self, family: str) -> TokenRange:
        return dict(self.token_ranges)[family]

    def fingerprint(self) -> str:
        """A stable text of every field, for cache keys."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["token_ranges"] = [(k, r.lo, r.hi) for k, r in self.token_ranges]
        return json.dumps(d, sort_keys=True, default=str)
