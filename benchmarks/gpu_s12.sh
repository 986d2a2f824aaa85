#!/usr/bin/env bash
# Session 12's single-GPU calls (one H200). Results are appended to $OUT/results.tar after each step, so a run cut
# short keeps what finished.
# `fold`: the post-conv path inside the gated delta-rule kernel (FusionConfig.delta_rule_conv): its GPU tests (one
# kernel, steps and CUDA-graph replays against eager, conv state exact) and the Qwen 3.5 tiny GPU test, then Qwen
# 3.5's linear-attention mixer alone and its step at T=1/8/64 (stock Inductor, braze, braze without the fold), and the
# report's kernel counts.
# `verify`: after the fold's default token range became [1, 8]: the same GPU tests, and the step at T=1 and 64 against
# stock Inductor with the default config (at 64 the post-conv kernel stays apart).
# Usage: BRAZE_COMMIT=<sha> bash benchmarks/gpu_s12.sh fold|verify
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
keep() { tar -C "$OUT" -rf "$OUT/results.tar" results && rm -rf "$OUT/results" && mkdir -p "$OUT/results"; }
case ${1:-fold} in
  fold)
    timeout 200 python3 -m pytest -q -p no:logging -p no:cacheprovider -rs -m gpu \
      tests/passes/test_delta_rule_conv_gpu.py tests/passes/test_post_conv_gpu.py 2>&1 \
      | tee "$OUT/tests.log" | grep -v Warn | tail -8
    echo "tests: $((SECONDS - t0)) s"
    timeout 150 python3 benchmarks/qwen_layers.py --blocks linear-mixer --tokens 1,8,64 \
      --variants inductor,braze,braze-no-conv-fold --out "$OUT/results" 2>&1 | tee "$OUT/layers.log" \
      | grep "^linear-"
    echo "layers: $((SECONDS - t0)) s"; keep
    timeout 50 python3 -m braze report --model qwen3.5 --size bench --tokens 1 --device cuda \
      --json "$OUT/results/qwen3.5_report_t1.json" > "$OUT/results/qwen3.5_report_t1.txt" 2>&1
    grep -A7 "^layer" "$OUT/results/qwen3.5_report_t1.txt"; echo "report: $((SECONDS - t0)) s"; keep
    timeout 200 python3 -m braze bench --model qwen3.5 --size bench --tokens 1,8,64 --shapes static \
      --variants inductor,braze,braze-no-conv-fold --budget-s 190 --out "$OUT/results" 2>&1 \
      | tee "$OUT/bench.log" | grep -v Warn | grep "qwen\|done"
    echo "steps: $((SECONDS - t0)) s"; keep
    ;;
  verify)
    timeout 200 python3 -m pytest -q -p no:logging -p no:cacheprovider -rs -m gpu \
      tests/passes/test_delta_rule_conv_gpu.py tests/passes/test_post_conv_gpu.py 2>&1 \
      | tee "$OUT/tests.log" | grep -v Warn | tail -4
    echo "tests: $((SECONDS - t0)) s"
    timeout 150 python3 -m braze bench --model qwen3.5 --size bench --tokens 1,64 --shapes static \
      --variants inductor,braze --budget-s 140 --out "$OUT/results" 2>&1 \
      | tee "$OUT/bench.log" | grep -v Warn | grep "qwen\|report\|done"
    echo "steps: $((SECONDS - t0)) s"; keep
    ;;
esac
rmdir "$OUT/results" 2>/dev/null; true
