#!/usr/bin/env bash
# Every GPU test and benchmark in one device call (the device time is scarce: start the machine once).
#   single GPU:  bash benchmarks/gpu_suite.sh single      (nvidia-h200)
#   two GPUs:    bash benchmarks/gpu_suite.sh tp [+mismatch]   (nvidia-h200-x2: tensor parallelism)
# Logs go to $OUT (or ./gpu_out); the last lines of each log are printed.
set -uo pipefail
cd "$(dirname "$0")/.."
# Faulthandler: a step that outruns its limit gets SIGABRT first, so every Python process of it
# (spawned tensor-parallel workers included) prints where it hangs before being killed.
export PYTHONPATH=src:. PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 NCCL_NVLS_ENABLE=0 \
  TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${OUT:-./gpu_out}
mkdir -p "$out"
step() {  # name, time limit (s), command...
  local name=$1 limit=$2
  shift 2
  "$@" > "$out/$name.log" 2>&1 &
  local pid=$!
  (sleep "$limit"; pkill -ABRT -f spawn_main; kill -ABRT "$pid"; sleep 5; pkill -KILL -f spawn_main
   kill -KILL "$pid") 2>/dev/null &
  local watchdog=$!
  wait "$pid"
  local rc=$?
  kill "$watchdog" 2>/dev/null
  echo "== $name (exit $rc)"
  tail -n 14 "$out/$name.log"
}
python -c 'import torch, triton, transformers as t; print("torch", torch.__version__, "triton", triton.__version__,
  "transformers", t.__version__, "GPUs", torch.cuda.device_count(), torch.cuda.get_device_name())'
case "${1:-single}" in
  single)
    step gpu_tests 240 python -m pytest -m gpu tests
    step throughput 240 python benchmarks/throughput.py --hf-new-tokens 4 --json "$out/throughput.json"
    step mismatch 240 python benchmarks/mismatch.py
    ;;
  tp)
    step tp_tests 200 python -m pytest -x tests/test_tp.py
    step tp_bench 240 python benchmarks/tp.py --tp 2 --layers 4
    [ "${2:-}" = "+mismatch" ] && step mismatch 240 python benchmarks/mismatch.py
    ;;
esac
