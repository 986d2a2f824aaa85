# Sourced by the benchmarks/gpu_*.sh scripts: $OUT (default ./gpu_out) with a results folder, the environment
# every GPU run keeps (NVLink multicast off), env.txt with the commit, card and versions, and t0 for timings.
OUT=${OUT:-gpu_out}
mkdir -p "$OUT/results"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
{ echo "commit ${BRAZE_COMMIT:-unknown}"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c 'import torch, triton, sys; print("torch", torch.__version__, "triton", triton.__version__, "python", sys.version.split()[0])'
} | tee "$OUT/env.txt"
t0=$SECONDS
