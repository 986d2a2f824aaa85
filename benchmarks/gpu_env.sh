# Sourced by the benchmarks/gpu_*.sh scripts: $OUT (default ./gpu_out) with a results folder, the environment
# every GPU run keeps (NVLink multicast off), env.txt with the commit, card and versions, and t0 for timings.
# Helpers (scripts from session 15 on use them; older ones define their own): `keep` appends $OUT/results to
# $OUT/results.tar (a run cut short keeps what finished), `left` the seconds left of TOTAL_S (default 570),
# `bench MODEL TOKENS VARIANTS LOG` one `python -m braze bench` within what is left; (session 18 on)
# `gpu_tests LIMIT FILE...` the GPU tests into $OUT/tests.log, `regions LIMIT MODEL:TOKENS...` the MoE blocks alone
# (benchmarks/moe_streams.py, plus $REGIONS_ARGS) into $OUT/regions.log.
OUT=${OUT:-gpu_out}
mkdir -p "$OUT/results"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
{ echo "commit ${BRAZE_COMMIT:-unknown}"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c 'import torch, triton, sys; print("torch", torch.__version__, "triton", triton.__version__, "python", sys.version.split()[0])'
} | tee "$OUT/env.txt"
t0=$SECONDS
keep() { tar -C "$OUT" -rf "$OUT/results.tar" results && rm -rf "$OUT/results" && mkdir -p "$OUT/results"; }
left() { echo $((${TOTAL_S:-570} - (SECONDS - t0))); }
bench() {  # model tokens variants log
  timeout $(($(left) - 10)) python3 -m braze bench --model "$1" --size bench --tokens "$2" --shapes static \
    --variants "$3" --budget-s $(($(left) - 40)) --out "$OUT/results" 2>&1 | tee "$OUT/$4" | grep -v Warn \
    | grep "$1\|done"
  echo "$1: $((SECONDS - t0)) s"; keep
}
gpu_tests() {  # limit test files...
  local limit=$1; shift
  timeout "$limit" python3 -m pytest -q -p no:logging -p no:cacheprovider -rs "$@" 2>&1 | tee "$OUT/tests.log" \
    | grep -v Warn | tail -3
  echo "tests: $((SECONDS - t0)) s"
}
regions() {  # limit model:tokens...
  local limit=$1 mt; shift
  for mt in "$@"; do
    timeout "$limit" python3 benchmarks/moe_streams.py --model "${mt%%:*}" --size bench --tokens "${mt##*:}" \
      ${REGIONS_ARGS:-} --out "$OUT/results/moe_streams_${mt%%:*}.json" 2>&1 | tee -a "$OUT/regions.log" | grep "MoE block\|Error"
    echo "regions $mt: $((SECONDS - t0)) s"; keep
  done
}
