#!/usr/bin/env bash
# The TP-reduced QK-norm alone (benchmarks/tp_norm.py) at TP=2 and TP=4 on a host of 4 H100s, one call of the
# `device` tool. Usage (repo root on the GPU machine): BRAZE_COMMIT=<sha> bash benchmarks/gpu_tp_norm.sh
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT/results"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
echo "commit ${BRAZE_COMMIT:-unknown}" | tee "$OUT/env.txt"
t0=$SECONDS
for P in 2 4; do
  timeout 200 torchrun --nproc-per-node $P benchmarks/tp_norm.py --tokens "${TOKENS:-1,4,8,16,64,128}" \
    --out "$OUT/results" 2>&1 | tee "$OUT/tp_norm_tp$P.log" | grep -v -i warn | grep "^T=\|^|\|Error" | tail -20
  echo "TP=$P: $((SECONDS - t0)) s"
done
tar -C "$OUT" -cf "$OUT/results.tar" results && rm -rf "$OUT/results"
