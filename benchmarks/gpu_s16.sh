#!/usr/bin/env bash
# Session 16's single-GPU calls (one H200). Results are appended to $OUT/results.tar after each step, so a run cut
# short keeps what finished.
# `diag`: where dual-stream's and merging's compile time goes: benchmarks/branches_compile_time.py with the four
# configurations (off, merge, streams, on) for DeepSeek V3.2 at T=1 and Qwen 3.5 at T=8, fresh caches, with the
# branch compiles' seconds and Dynamo/Inductor's phases; the GEMM-merge GPU test (failed at d3cd7b3, prints layer
# 0's branch analysis); DeepSeek's step at T=64 with and without dual-stream (never measured).
# `compile`: the dual-stream GPU tests; after identical layers' router kernels outline to one spec: compile time
# off vs on (merging + dual-stream), two repeats in alternating order, for DeepSeek V3.2 at T=1, Qwen 3.5 at T=8
# and MiniMax M2.5 at T=8 (the tests run first, so no compile pays for a cold machine; the number of branch
# compiles is twice the number of distinct specs). Session 16 ran it at cb9d9fe with a warm-up compile instead,
# which pushed DeepSeek past its timeout; next: run it at HEAD, about 9 minutes.
# `specs`: how many distinct branch specs dual-stream gives MiniMax M2.5 and Qwen 3.5 at T=8 and DeepSeek V3.2 at
# T=1/8, and how they differ (benchmarks/stream_specs.py).
# Usage: BRAZE_COMMIT=<sha> bash benchmarks/gpu_s16.sh diag|compile|specs
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
compile_time() {  # model tokens configs timeout [extra args]
  timeout "$4" python3 benchmarks/branches_compile_time.py --model "$1" --size bench --device cuda --repeats 1 \
    --tokens "$2" --configs "$3" "${@:5}" 2>&1 | tee -a "$OUT/compile.log" | grep "first call\|Error"
  echo "compile $1: $((SECONDS - t0)) s"
}
case ${1:-diag} in
  diag)
    compile_time deepseek-v3.2 1 merge,streams,on 170
    compile_time qwen3.5 8 merge,streams,on 130
    timeout 100 python3 -m pytest -q -p no:logging -p no:cacheprovider -rs -s tests/passes/test_gemm_merge_gpu.py \
      2>&1 | tee "$OUT/tests.log" | grep -v Warn | grep "storage\|remarks\|passed\|failed" | tail -8
    echo "tests: $((SECONDS - t0)) s"
    bench deepseek-v3.2 64 braze,braze-streams bench_ds64.log
    ;;
  compile)
    timeout 100 python3 -m pytest -q -p no:logging -p no:cacheprovider -rs tests/passes/test_streams_gpu.py 2>&1 \
      | tee "$OUT/tests.log" | grep -v Warn | tail -3
    echo "tests: $((SECONDS - t0)) s"
    compile_time deepseek-v3.2 1 on 200 --repeats 2
    compile_time qwen3.5 8 on 140 --repeats 2
    compile_time minimax-m2.5 8 on 140 --repeats 2
    ;;
  specs)
    for mt in minimax-m2.5:8 deepseek-v3.2:1 qwen3.5:8 deepseek-v3.2:8; do
      [ "$(left)" -gt 45 ] || break
      timeout $(($(left) - 5)) python3 benchmarks/stream_specs.py --model "${mt%:*}" --tokens "${mt#*:}" 2>&1 \
        | tee -a "$OUT/specs.log" | grep -v Warn | grep -A24 "distinct\|Error" | cut -c1-250
      echo "specs $mt: $((SECONDS - t0)) s"
    done
    ;;
esac
