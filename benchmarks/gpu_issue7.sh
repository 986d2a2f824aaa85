#!/usr/bin/env bash
# Issue 7's GPU batch (one call): the DeepSeek V3.2 decode step with and without gemm-merge / dual-stream,
# the gemm-merge and dual-stream GPU tests (each file in its own process), then the MoE block alone.
# At most 8 files come back: card.txt, 4 logs, the bench's md/json/png.
#   BRAZE_COMMIT=<sha> TOTAL_S=<wall seconds for everything> bash benchmarks/gpu_issue7.sh   (writes under $OUT)
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
TOTAL_S=${TOTAL_S:-280}
left() { echo $((TOTAL_S - SECONDS)); }
mkdir -p "$OUT/results"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/card.txt" 2>&1
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" >> "$OUT/card.txt"

timeout $(( $(left) - 75 )) python3 -m braze bench --model deepseek-v3.2 --size bench --tokens 1 --shapes static \
  --variants braze,braze-streams,braze-merge,inductor --budget-s 95 --out "$OUT/results" > "$OUT/bench.log" 2>&1
echo "bench rc=$? at ${SECONDS}s"
timeout $(( $(left) > 40 ? 40 : $(left) )) python3 -m pytest -q -p no:logging -rs -s tests/passes/test_streams_gpu.py \
  > "$OUT/test_streams_gpu.log" 2>&1
echo "streams tests rc=$? at ${SECONDS}s"
timeout $(( $(left) > 5 ? $(left) : 5 )) python3 -m pytest -q -p no:logging -rs -s tests/passes/test_gemm_merge_gpu.py \
  > "$OUT/test_gemm_merge_gpu.log" 2>&1
echo "gemm-merge tests rc=$? at ${SECONDS}s"
if [ "$(left)" -gt 30 ]; then
  timeout $(left) python3 benchmarks/moe_streams.py --size bench --tokens 1 > "$OUT/moe_streams.log" 2>&1
  echo "moe block rc=$? at ${SECONDS}s"
fi
tail -n 4 "$OUT"/*.log
