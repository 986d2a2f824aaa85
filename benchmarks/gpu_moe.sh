#!/usr/bin/env bash
# Session 7's single-GPU calls for the moe-experts fusion. `tests`: its GPU kernel test and pass tests, then the
# routed experts alone (benchmarks/moe_experts.py); `steps`: the three bench models' decode steps at T=1 (the
# only bench T where T·k < E, so the only one the fusion changes) vs stock Inductor; `layers`: Qwen 3.5's layers
# at T=1. Usage: BRAZE_COMMIT=<sha> bash benchmarks/gpu_moe.sh tests|steps|layers
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
case ${1:-tests} in
  tests)
    timeout 150 python3 -m pytest -q -p no:logging -p no:cacheprovider -rs tests/codegen/test_moe_kernel.py \
      tests/passes/test_moe.py 2>&1 | tee "$OUT/moe_tests.log" | tail -6
    echo "tests: $((SECONDS - t0)) s"
    timeout ${MOE_TIMEOUT:-400} python3 benchmarks/moe_experts.py --tokens "${TOKENS:-1,8}" --out "$OUT/results" 2>&1 \
      | tee "$OUT/moe_experts.log" | grep -v Warn | tail -40
    echo "moe_experts: $((SECONDS - t0)) s" ;;
  steps)
    timeout 90 python3 -m pytest -q -p no:logging -p no:cacheprovider -rs tests/codegen/test_moe_kernel.py 2>&1 \
      | tee "$OUT/moe_tests.log" | tail -4
    timeout 570 python3 -m braze bench --model "${MODELS:-deepseek-v3.2,qwen3.5,minimax-m2.5}" --size bench --tokens 1 \
      --shapes static --variants inductor,braze --budget-s "${BUDGET:-500}" --out "$OUT/results" 2>&1 \
      | tee "$OUT/bench.log" | grep -v Warn | tail -30
    echo "steps: $((SECONDS - t0)) s"
    tar -C "$OUT" -cf "$OUT/results.tar" results && rm -rf "$OUT/results" ;;
  layers)
    timeout 300 python3 benchmarks/qwen_layers.py --tokens 1 --blocks linear-layer,full-layer --out "$OUT/results" 2>&1 \
      | tee "$OUT/layers.log" | grep -v Warn | tail -12
    echo "layers: $((SECONDS - t0)) s" ;;
esac
if [[ ${1:-} == tune ]]; then
  timeout 420 python3 benchmarks/moe_tune.py --tokens "${TOKENS:-1,8}" --kernels "${KERNELS:-down}" --models "${MODELS:-deepseek-v3.2,qwen3.5,minimax-m2.5}" --configs "${CONFIGS:-}" --out "$OUT/results" 2>&1 \
    | tee "$OUT/moe_tune.log" | grep -v Warn | tail -30
  echo "tune: $((SECONDS - t0)) s"
fi
if [[ ${1:-} == both ]]; then  # the routed experts alone, then the steps (the kernels' tiles changed)
  timeout 250 python3 benchmarks/moe_experts.py --tokens 1,8 --out "$OUT/results" 2>&1 | tee "$OUT/moe_experts.log" \
    | grep -v Warn | tail -30
  echo "moe_experts: $((SECONDS - t0)) s"
  timeout 300 python3 -m braze bench --model deepseek-v3.2,qwen3.5,minimax-m2.5 --size bench --tokens 1 --shapes static \
    --variants inductor,braze --budget-s 260 --out "$OUT/results" 2>&1 | tee "$OUT/bench.log" | grep -v Warn | tail -14
  echo "steps: $((SECONDS - t0)) s"
  timeout 150 python3 benchmarks/qwen_layers.py --tokens 1 --blocks linear-layer,full-layer --out "$OUT/results" 2>&1 \
    | tee "$OUT/layers.log" | grep -v Warn | tail -8
  echo "layers: $((SECONDS - t0)) s"
  tar -C "$OUT" -cf "$OUT/results.tar" results && rm -rf "$OUT/results"
fi
if [[ ${1:-} == merge ]]; then  # where sibling-GEMM merging pays (issues 4 and 7): the prologue at small T, the steps at T=1
  timeout 200 python3 benchmarks/deepseek_prologue.py --tokens 1,2,4,8 --variants inductor,braze,braze-merge \
    --out "$OUT/results" 2>&1 | tee "$OUT/prologue.log" | grep -v Warn | tail -14
  echo "prologue: $((SECONDS - t0)) s"
  timeout 380 python3 -m braze bench --model deepseek-v3.2,qwen3.5,minimax-m2.5 --size bench --tokens 1 --shapes static \
    --variants inductor,braze,braze-merge --budget-s 350 --out "$OUT/results" 2>&1 | tee "$OUT/bench.log" \
    | grep -v Warn | grep "T=1\|done" | tail -12
  echo "steps: $((SECONDS - t0)) s"
  tar -C "$OUT" -cf "$OUT/results.tar" results && rm -rf "$OUT/results"
fi
