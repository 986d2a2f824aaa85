#!/usr/bin/env bash
# Session 17's single-GPU calls (one H200), after dual-stream went on by default. Results are appended to
# $OUT/results.tar after each step, so a run cut short keeps what finished.
# `default`: the dual-stream and GEMM-merge GPU tests; the three models' decode steps at T=1/8/64 with the
# defaults (`braze`: merging + dual-stream) and with dual-stream off (`braze-no-streams`).
# `regions`: the overlapped region alone, one MoE block per model, one stream vs the cost model's choice vs every
# fork overlapped (benchmarks/moe_streams.py), T=1/8/64, within what is left of TOTAL_S.
# Usage: BRAZE_COMMIT=<sha> [TOTAL_S=<s>] bash benchmarks/gpu_s17.sh default|regions
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
case ${1:-default} in
  default)
    timeout 150 python3 -m pytest -q -p no:logging -p no:cacheprovider -rs tests/passes/test_streams_gpu.py \
      tests/passes/test_gemm_merge_gpu.py 2>&1 | tee "$OUT/tests.log" | grep -v Warn | tail -3
    echo "tests: $((SECONDS - t0)) s"
    bench deepseek-v3.2 1,8,64 braze,braze-no-streams bench_ds.log
    bench qwen3.5 1,8,64 braze,braze-no-streams bench_qwen.log
    bench minimax-m2.5 1,8,64 braze,braze-no-streams bench_mm.log
    ;;
  regions)
    for m in deepseek-v3.2 qwen3.5 minimax-m2.5; do
      [ "$(left)" -gt 60 ] || break
      timeout $(($(left) - 5)) python3 benchmarks/moe_streams.py --model "$m" --size bench --tokens 1,8,64 \
        --out "$OUT/results/moe_streams_$m.json" 2>&1 | tee -a "$OUT/regions.log" | grep "MoE block\|Error"
      echo "regions $m: $((SECONDS - t0)) s"; keep
    done
    ;;
esac
# `diag`: the dual-stream branches of DeepSeek V3.2's MoE block at T=1 and the code Inductor makes of them
# (benchmarks/diag/branch_code.py, TORCH_LOGS=output_code).
if [ "${1:-}" = diag ]; then
  TORCH_LOGS=output_code timeout 120 python3 benchmarks/diag/branch_code.py --tokens 1 > "$OUT/branch_code.log" 2>&1
  grep -c "def call\|==== branch" "$OUT/branch_code.log"; grep "^==== \|triton_.*= async_compile\|extern_kernels\|\.run(" \
    "$OUT/branch_code.log" | cut -c1-200 | head -60
fi
# `verify`: after the spec encodes branches node by node and the fork's dtype casts stay outside: the dual-stream
# GPU tests, the side branch's kernels (diag), DeepSeek V3.2's MoE block and step at T=1 with and without.
if [ "${1:-}" = verify ]; then
  timeout 60 python3 -m pytest -q -p no:logging -p no:cacheprovider tests/passes/test_streams_gpu.py 2>&1 \
    | tee "$OUT/tests.log" | tail -1
  TORCH_LOGS=output_code timeout 60 python3 benchmarks/diag/branch_code.py --tokens 1 > "$OUT/branch_code.log" 2>&1
  grep "^==== branch\|\.run(\|extern_kernels\.\w*(" "$OUT/branch_code.log" | sed 's/.*output_code\] //' | cut -c1-110
  echo "diag: $((SECONDS - t0)) s"
  timeout 60 python3 benchmarks/moe_streams.py --model deepseek-v3.2 --size bench --tokens 1 \
    --out "$OUT/results/moe_streams_deepseek-v3.2.json" 2>&1 | tee "$OUT/regions.log" | grep "MoE block\|Error"
  echo "regions: $((SECONDS - t0)) s"; keep
  bench deepseek-v3.2 1 braze,braze-no-streams bench_ds.log
fi
