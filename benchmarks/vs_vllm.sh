#!/usr/bin/env bash
# The vs_vllm run on the GPU machine, one device call per step, on ONE machine kept warm (files under /tmp
# stay only while it is held). vLLM's wheel travels in five parts plus its dependencies (../shared/peers/vllm.md):
#   bash benchmarks/vs_vllm.sh part N     (carry .vN; N = 1..5: stage that part in /tmp/st)
#   bash benchmarks/vs_vllm.sh write      write the checkpoint (transformers, 8 layers) to /tmp/ckpt
#   bash benchmarks/vs_vllm.sh vllm [ARGS] (carry .v6) assemble + install vLLM into /tmp/site, run it (routing on)
#   bash benchmarks/vs_vllm.sh ours [ARGS] this engine, routing on (every row) then off (rows a, b)
# ARGS go to `vs_vllm.py run` (e.g. --output-scale 0.25, as the 2026-12-02 run in docs/PERFORMANCE.md).
# Do not wait for background steps with `pgrep -f` on their command line: it matches the waiting shell itself.
# Results (JSON, routing .npz, logs) go to $OUT; `python benchmarks/vs_vllm.py table ...` prints the table.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
out=${OUT:-./gpu_out}
mkdir -p "$out" /tmp/st
case "$1" in
  part) cp ".v$2"/* /tmp/st/ && ls -la /tmp/st | tail -n +2 | wc -l ;;
  write) python benchmarks/vs_vllm.py write --dir /tmp/ckpt --layers "${2:-8}" > "$out/write.log" 2>&1; tail -2 "$out/write.log" ;;
  vllm)
    cp .v6/* /tmp/st/ && cd /tmp/st && cat part.0* > vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl && rm part.0* \
      && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/st/*.whl || exit 1
    cd - > /dev/null
    PYTHONPATH=/tmp/site:src:. python benchmarks/vs_vllm.py run --engine vllm --dir /tmp/ckpt --json "$out/vllm.json" \
      "${@:2}" > "$out/vllm.log" 2>&1
    echo "vllm exit $?"; grep -v Warning "$out/vllm.log" | tail -12 ;;
  ours)
    python benchmarks/vs_vllm.py run --engine routereplay --dir /tmp/ckpt --json "$out/ours.json" "${@:2}" \
      > "$out/ours.log" 2>&1
    echo "ours exit $?"; tail -8 "$out/ours.log"
    python benchmarks/vs_vllm.py run --engine routereplay --dir /tmp/ckpt --json "$out/ours_off.json" "${@:2}" \
      --routing off --rows a,b > "$out/ours_off.log" 2>&1
    echo "ours off exit $?"; tail -4 "$out/ours_off.log" ;;
  *) echo "unknown step $1"; exit 2 ;;
esac
