#!/usr/bin/env bash
# Tensor-parallel decode steps of the three bench models at TP=P (each rank holds the bench's per-rank heads),
# braze (collective fusions on, the default) vs braze without them vs stock Inductor, static shapes; and, with
# PROLOGUE=1, the MiniMax-M2.5 attention prologue at TP=P. One call of the `device` tool on a host of P GPUs.
# Usage (repo root on the GPU machine): BRAZE_COMMIT=<sha> bash benchmarks/gpu_tp.sh P
set -uo pipefail
P=${1:?usage: gpu_tp.sh P}
source "$(dirname "$0")/gpu_env.sh"
if [[ ${PROLOGUE:-0} == 1 ]]; then
  timeout "${PROLOGUE_TIMEOUT:-150}" torchrun --nproc-per-node "$P" benchmarks/minimax_prologue.py --tokens "${PROLOGUE_TOKENS:-1,8,64}" \
    --out "$OUT/results" 2>&1 | tee "$OUT/prologue_tp$P.log" | grep -v Warn | tail -14
  echo "prologue: $((SECONDS - t0)) s"
fi
timeout "${STEPS_TIMEOUT:-420}" torchrun --nproc-per-node "$P" -m braze bench --model "${MODELS:-all}" --size bench \
  --tokens "${TOKENS:-1,8}" --shapes static --variants "${VARIANTS:-inductor,braze,braze-no-collective}" \
  --budget-s "${STEPS_BUDGET:-380}" --out "$OUT/results" 2>&1 | tee "$OUT/steps_tp$P.log" | grep -v Warn | grep "bench \|FAIL\|Error" | tail -40
echo "total: $((SECONDS - t0)) s"
tar -C "$OUT" -cf "$OUT/results.tar" results && rm -rf "$OUT/results"
