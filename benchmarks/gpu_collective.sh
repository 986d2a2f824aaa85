#!/usr/bin/env bash
# The collective fusions' GPU runs (issue 5), on one host of P GPUs, batched (device time is scarce):
# the torchrun GPU tests, the AR + residual + RMSNorm microbenchmark, and the decode-step benchmark of the
# three bench models at TP=P (with and without the collective fusions, which are off by default).
# Usage (repo root, on the GPU machine): BRAZE_COMMIT=<sha> bash benchmarks/gpu_collective.sh P [tests|micro|steps|all]
# Results land under $OUT (default ./gpu_out): env.txt, collective_tests_tpP.log, allreduce_norm_tpP.log,
# steps_tpP.log, and results/ (allreduce_norm_tpP.json/.md, <model>_bench_tpP.json/.md/.png).
set -uo pipefail
P=${1:?usage: gpu_collective.sh P [tests|micro|steps|all]}
what=${2:-all}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT/results"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
{
  echo "commit ${BRAZE_COMMIT:-unknown}"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c 'import torch, triton, sys; print("torch", torch.__version__, "triton", triton.__version__, "python", sys.version.split()[0])'
} | tee "$OUT/env.txt"
if [[ $what == tests || $what == all ]]; then
  timeout "${TEST_TIMEOUT:-300}" torchrun --nproc-per-node "$P" -m pytest -q -p no:cacheprovider -m gpu \
    tests/passes/test_collective_gpu.py 2>&1 | tee "$OUT/collective_tests_tp$P.log" | tail -20
fi
if [[ $what == micro || $what == all ]]; then
  timeout "${MICRO_TIMEOUT:-400}" torchrun --nproc-per-node "$P" benchmarks/allreduce_norm.py \
    --inner 50 --out "$OUT/results" 2>&1 | tee "$OUT/allreduce_norm_tp$P.log" | grep -v Warn | tail -20
fi
# The bench models built for P ranks keep the bench's per-rank heads (`bench(tp=P)`), so all three run at every P.
steps_models=${STEPS_MODELS:-all}
if [[ $what == steps || $what == all ]]; then
  timeout "${STEPS_TIMEOUT:-500}" torchrun --nproc-per-node "$P" -m braze bench --model "$steps_models" --size bench \
    --tokens 1,8,64 --variants eager,inductor,braze,braze-collective --budget-s "${STEPS_BUDGET:-450}" \
    --out "$OUT/results" 2>&1 | tee "$OUT/steps_tp$P.log" \
    | grep -v Warn | tail -40
fi
