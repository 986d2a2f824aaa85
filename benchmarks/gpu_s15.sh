#!/usr/bin/env bash
# Session 15's single-GPU calls (one H200). Results are appended to $OUT/results.tar after each step, so a run cut
# short keeps what finished.
# `confirm`: issue 4 at HEAD: the chain GPU tests, DeepSeek V3.2's prologue at T=1/2/4 with L2 flushed before every
# replay (stock, braze, braze with every GEMM on cuBLAS); then issue 7: the branch cost model's constants on this
# card (benchmarks/stream_overhead.py) and DeepSeek's step at T=1/8/64, stock, braze and braze without GEMM merging.
# `absorb`: the absorbed W_UK product inside the chain launch against cuBLAS's bmm, per T (the prologue at
# T=1/2/4/8/16, braze-absorb-any-t vs braze-no-absorb); DeepSeek's step at T=1/8/64 with the absorb's token range
# and with dual-stream as the H200 cost model decides; the MoE block alone (moe_streams.py); the dual-stream GPU tests.
# `streams`: with the H200's launch gap calibrated: DeepSeek's step at T=1/8 with and without dual-stream; Qwen 3.5's
# step at T=1/8/64 with and without GEMM merging and with dual-stream.
# `final`: the GEMM-merge GPU test (its Qwen 3.5 case failed in `branches`; it now prints layer 0's branch
# analysis); DeepSeek's step at T=64 with and without dual-stream; compile time with the branch passes after the
# outlined branches got positional names (Qwen 3.5 at T=8, DeepSeek at T=1). Session 15 ran an earlier version of
# this mode (39d7af4: a standalone merge diagnosis instead of the test, and timeouts too short).
# `branches`: MiniMax M2.5's step at T=1/8/64 and DeepSeek's at T=64, with and without dual-stream; compile time
# with and without the branch passes (benchmarks/branches_compile_time.py, fresh caches); the GEMM-merge GPU test.
# Usage: BRAZE_COMMIT=<sha> bash benchmarks/gpu_s15.sh confirm|absorb|streams|branches|final
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
case ${1:-confirm} in
  confirm)
    timeout 150 python3 -m pytest -q -p no:logging -p no:cacheprovider -rs -m gpu tests/passes/test_chain_gpu.py 2>&1 \
      | tee "$OUT/tests.log" | grep -v Warn | tail -3
    echo "tests: $((SECONDS - t0)) s"
    PYTHONPATH=$PWD:$PWD/benchmarks timeout 150 python3 benchmarks/deepseek_prologue.py --tokens 1,2,4 \
      --variants inductor,braze,braze-no-decode-gemm --out "$OUT/results" 2>&1 | tee "$OUT/prologue.log" \
      | grep "^T=\|Error"
    echo "prologue: $((SECONDS - t0)) s"
    timeout 60 python3 benchmarks/stream_overhead.py --out "$OUT/results/stream_overhead.json" > "$OUT/overhead.log" 2>&1
    tail -n 25 "$OUT/overhead.log"; keep
    bench deepseek-v3.2 1,8,64 inductor,braze,braze-no-merge bench_ds.log
    ;;
  absorb)
    PYTHONPATH=$PWD:$PWD/benchmarks timeout 200 python3 benchmarks/deepseek_prologue.py --tokens 1,2,4,8,16 \
      --variants braze-absorb-any-t,braze-no-absorb --out "$OUT/results" 2>&1 | tee "$OUT/prologue.log" \
      | grep "^T=\|Error"
    echo "prologue: $((SECONDS - t0)) s"; keep
    TOTAL_S=$((SECONDS - t0 + 200)) bench deepseek-v3.2 1,8,64 braze,braze-streams bench_ds.log
    timeout 90 python3 benchmarks/moe_streams.py --size bench --tokens 1 \
      --out "$OUT/results/moe_streams.json" 2>&1 | tee "$OUT/moe_streams.log" | grep "^T=\|Error"; keep
    timeout $(($(left) - 5)) python3 -m pytest -q -p no:logging -p no:cacheprovider -rs tests/passes/test_streams_gpu.py \
      2>&1 | tee "$OUT/tests.log" | grep -v Warn | tail -3
    ;;
  streams)
    TOTAL_S=$((SECONDS - t0 + 150)) bench deepseek-v3.2 1,8 braze,braze-streams bench_ds.log
    bench qwen3.5 1,8,64 braze,braze-no-merge,braze-streams bench_qwen.log
    ;;
  branches)
    TOTAL_S=$((SECONDS - t0 + 190)) bench minimax-m2.5 1,8,64 braze,braze-streams bench_mm.log
    TOTAL_S=$((SECONDS - t0 + 90)) bench deepseek-v3.2 64 braze,braze-streams bench_ds64.log
    for mt in deepseek-v3.2:1 qwen3.5:8; do
      [ "$(left)" -gt 100 ] || break
      timeout 120 python3 benchmarks/branches_compile_time.py --model "${mt%:*}" --size bench --device cuda \
        --repeats 1 --tokens "${mt#*:}" 2>&1 | tee -a "$OUT/compile.log" | tail -1
    done
    [ "$(left)" -gt 40 ] && timeout $(($(left) - 5)) python3 -m pytest -q -p no:logging -p no:cacheprovider -rs \
      tests/passes/test_gemm_merge_gpu.py 2>&1 | tee -a "$OUT/tests.log" | grep -v Warn | tail -3
    ;;
  final)
    timeout 100 python3 -m pytest -q -p no:logging -p no:cacheprovider -rs -s tests/passes/test_gemm_merge_gpu.py \
      2>&1 | tee "$OUT/tests.log" | grep -v Warn | grep "storage\|remarks\|passed\|failed" | tail -8
    TOTAL_S=$((SECONDS - t0 + 110)) bench deepseek-v3.2 64 braze,braze-streams bench_ds64.log
    for mt in qwen3.5:8 deepseek-v3.2:1; do
      timeout 150 python3 benchmarks/branches_compile_time.py --model "${mt%:*}" --size bench --device cuda \
        --repeats 1 --tokens "${mt#*:}" 2>&1 | tee -a "$OUT/compile.log" | tail -1
    done
    ;;
esac
rmdir "$OUT/results" 2>/dev/null; true
