#!/usr/bin/env bash
# The vs_vllm run on the GPU machine, one device call per step, on ONE machine kept warm (files under /tmp
# stay only while it is held: send the next call at once). vLLM's wheel travels in five parts plus its
# dependencies (../shared/peers/vllm.md):
#   bash benchmarks/vs_vllm.sh part N        (carry .vN; N = 1..5: stage that part in /tmp/st)
#   bash benchmarks/vs_vllm.sh write [L]     write the checkpoint (transformers, L = 8 layers) to /tmp/ckpt
#   bash benchmarks/vs_vllm.sh vllm NAME [ARGS]  (carry .v6 the first time) install vLLM into /tmp/site once,
#                                            then run it: $OUT/NAME.json (e.g. `vllm vllm`, then
#                                            `vllm vllm_off --routing off --rows a,b`)
#   bash benchmarks/vs_vllm.sh ours [ARGS]   this engine in alternating processes: routing on (every row), off,
#                                            on, off (rows a, b): on / off from the best of two runs each; the
#                                            first also alternates 3 passes of row a without / with routing returned
#   bash benchmarks/vs_vllm.sh onoff ROWS N  N more off / on process pairs on ROWS (a process's decode step
#                                            varies by ~5% at row a: 2026-12-02 in docs/PERFORMANCE.md)
#   bash benchmarks/vs_vllm.sh pair [ARGS]   routing on / off in ONE process (two engines taking turns, no
#                                            process spread): `vs_vllm.py onoff` ARGS, $OUT/pair.json
# ARGS go to `vs_vllm.py run` (e.g. --output-scale 0.25). Each process stops at 580 s (its JSON keeps the rows
# done). Do not wait for background steps with `pgrep -f` on their command line: it matches the waiting shell.
# Results (JSON, routing .npz, logs) go to $OUT; `python benchmarks/vs_vllm.py table $OUT/*.json` prints the table.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
out=${OUT:-./gpu_out}
mkdir -p "$out" /tmp/st
proc() {  # json name, vs_vllm.py command, args...: one process, its JSON and log under $out
  local name=$1 cmd=$2
  shift 2
  timeout -s INT 580 python benchmarks/vs_vllm.py "$cmd" --dir /tmp/ckpt --json "$out/$name.json" "$@" \
    > "$out/$name.log" 2>&1
  echo "$name exit $?"; grep -v Warning "$out/$name.log" | tail -30
}
run() { proc "$1" run "${@:2}"; }  # json name, args...: one engine process
case "$1" in
  part) cp ".v$2"/* /tmp/st/ && ls -la /tmp/st | tail -n +2 | wc -l ;;
  write) python benchmarks/vs_vllm.py write --dir /tmp/ckpt --layers "${2:-8}" > "$out/write.log" 2>&1; tail -2 "$out/write.log" ;;
  vllm)
    if [ ! -d /tmp/site/vllm ]; then
      cp .v6/* /tmp/st/ && cd /tmp/st && cat part.0* > vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl && rm part.0* \
        && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/st/*.whl || exit 1
      cd - > /dev/null
    fi
    PYTHONPATH=/tmp/site:src:. run "$2" --engine vllm "${@:3}" ;;
  ours)
    t0=$SECONDS
    run ours --engine routereplay --return-pairs 3 "${@:2}"
    for name in ours_off ours_on2 ours_off2; do
      [ $((SECONDS - t0)) -lt 380 ] || { echo "skipped $name (time)"; continue; }
      routing=on; [[ $name == *off* ]] && routing=off
      run "$name" --engine routereplay "${@:2}" --routing "$routing" --rows a,b
    done ;;
  onoff)  # onoff ROWS N: N more off/on process pairs of this engine on ROWS (e.g. `onoff a 5`), off first
    for i in $(seq "$3"); do
      for routing in off on; do run "onoff_${routing}_$i" --engine routereplay --routing "$routing" --rows "$2"; done
    done ;;
  pair) proc pair onoff "${@:2}" ;;
  *) echo "unknown step $1"; exit 2 ;;
esac
