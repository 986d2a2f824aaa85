#!/usr/bin/env bash
# Ran in session 6 at commit 5e5d852 (results: benchmarks/results/session6_gpu/next/; everything passed and the
# TP norm's one-shot default went on): kept as the command behind those results.
# What the next GPU session had to run first (left open by session 5, whose device time ran out), on a host of
# 4 H100s, in one call: (1) the collective GPU tests on 4 ranks, including the reproducer of the TP-norm hang
# (`test_one_shot_tp_norm_survives_back_to_back_graph_replays`, with the barrier fix of commit b0f2041);
# (2) the MiniMax-M2.5 attention prologue at TP=4 with the TP norm's one-shot kernel on
# (BRAZE_TP_NORM_ONE_SHOT=1), T=1 and 8, the case that hung; (3) if both pass, the MiniMax decode step at TP=4
# with it on; (4) the gemm-merge GPU test pair on one GPU. If (1)-(3) pass, turn `TP_NORM_ONE_SHOT`'s default on (braze/runtime/collective.py). Then, on 2 GPUs,
# `bash benchmarks/gpu_tp.sh 2` (the TP=2 decode steps with the per-rank bench heads).
# Usage (repo root on the GPU machine): BRAZE_COMMIT=<sha> bash benchmarks/gpu_next.sh
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT/results"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
echo "commit ${BRAZE_COMMIT:-unknown}" | tee "$OUT/env.txt"
t0=$SECONDS
timeout 240 torchrun --nproc-per-node 4 -m pytest -q -p no:cacheprovider -m gpu tests/passes/test_collective_gpu.py 2>&1 \
  | tee "$OUT/collective_tests_tp4.log" | tail -8
tests_rc=${PIPESTATUS[0]}
echo "tests rc $tests_rc: $((SECONDS - t0)) s"
BRAZE_TP_NORM_ONE_SHOT=1 BRAZE_TRACE=1 BRAZE_HANG_DUMP_S=150 timeout 180 torchrun --nproc-per-node 4 \
  benchmarks/minimax_prologue.py --tokens 1,8 --variants inductor,braze,braze-no-collective --out "$OUT/results" 2>&1 \
  | tee "$OUT/prologue_tp4.log" | grep "^T=\|Timeout\|Error" | tail -12
prologue_rc=${PIPESTATUS[0]}
echo "prologue rc $prologue_rc: $((SECONDS - t0)) s"
if [[ $tests_rc == 0 && $prologue_rc == 0 ]]; then
  BRAZE_TP_NORM_ONE_SHOT=1 timeout 150 torchrun --nproc-per-node 4 -m braze bench --model minimax-m2.5 --size bench \
    --tokens 1,8 --shapes static --variants inductor,braze --budget-s 130 --out "$OUT/results" 2>&1 \
    | tee "$OUT/steps_tp4.log" | grep "bench " | tail -8
fi
# the gemm-merge pair in one process (the Qwen case failed its sharing check after DeepSeek's in session 5;
# the test now prints the gemm-merge remarks when it does)
CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m pytest -q -p no:cacheprovider -s tests/passes/test_gemm_merge_gpu.py 2>&1 \
  | tee "$OUT/gemm_merge_gpu.log" | grep -v -i warn | tail -12
echo "total: $((SECONDS - t0)) s"
tar -C "$OUT" -cf "$OUT/results.tar" results && rm -rf "$OUT/results"
