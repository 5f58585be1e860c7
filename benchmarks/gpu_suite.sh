#!/usr/bin/env bash
# GPU tests and benchmarks, several per device call (device time is scarce: start the machine once).
#   bash benchmarks/gpu_suite.sh PART...   PART: tests | throughput | mismatch | fp8_mismatch | fp8_throughput | tp |
#                                          tp_bench | sync
#   (tp, tp_bench, sync: 2 GPUs)
# Each part's time limit is below; keep one call's parts under the 600 s a device command may run,
# e.g. `mismatch tp tp_bench`, then `tests sync` on nvidia-h200-x2 (single-GPU parts run there too).
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
for part in "${@:-tests}"; do
  case "$part" in
    tests)  # over 4 min on a cold Triton cache, ~3 min warm; the store and server tests need redis / fastapi, which the
      # GPU machine lacks (they have no gpu tests)
      step gpu_tests 420 python -m pytest -m gpu tests --ignore=tests/test_store.py --ignore=tests/test_server.py \
        --ignore=tests/test_server_hardening.py --ignore=tests/test_store_outage.py \
        --ignore=tests/test_sglang_protocol.py --ignore=tests/test_weight_sync.py \
        --ignore=tests/test_sglang_weight_group.py --ignore=tests/test_packaging.py ;;
    throughput) step throughput 240 python benchmarks/throughput.py --hf-new-tokens 4 --json "$out/throughput.json" ;;
    mismatch) step mismatch 220 python benchmarks/mismatch.py ;;
    fp8_mismatch) step fp8_mismatch 300 python benchmarks/mismatch.py --rollout-dtype fp8 ;;
    fp8_throughput) step fp8_throughput 240 python benchmarks/fp8_throughput.py --json "$out/fp8_throughput.json" ;;
    tp) step tp_tests 180 python -m pytest tests/test_tp.py ;;  # needs 2 GPUs
    tp_bench)  # needs 2 GPUs
      step tp_bench 180 python benchmarks/tp.py --tp 2 --layers 4
      step tp_bench_fp32 150 python benchmarks/tp.py --tp 2 --layers 4 --dtype float32 --prompts 32 --new-tokens 64 ;;
    sync) step weight_sync 150 python benchmarks/weight_sync.py --tp 2 --layers 8 ;;  # needs 2 GPUs
    *) echo "unknown part $part (tests, throughput, mismatch, fp8_mismatch, fp8_throughput, tp, tp_bench, sync)"; exit 2 ;;
  esac
done
