#!/bin/bash
# Training memory with a trainer's buffers planned by liveness (its
# default), exact, and pooled (`CARAMBA_BENCH_BUFFERS`): run from a folder
# scripts/device_pack.sh NAME made (copy this script and
# gpu_suite_parallel.sh in). Argument: parts (train, elementwise, suite). The
# twenty-eighth to thirty-first sessions' figures are in BENCHMARKS.md.
cd "$(dirname "$0")"
for f in *.gz; do gunzip -kf $f; done; chmod +x gpu_suite train_bench gpu_bench
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
date -u; cat COMMIT
what=${1:-train}
if [[ $what == *train* ]]; then
for m in "llama1b 8 1b" "smollm2 32 smol"; do
  set -- $m
  # MODES: buffers[:in-place], e.g. "planned planned:off exact pooled";
  # "off" sets CARAMBA_NO_IN_PLACE=1 (the loss's gradient in a buffer of
  # its own, as before the thirty-first session).
  for mode in ${MODES:-planned planned:off exact}; do
    buffers=${mode%%:*}
    no_in_place=0; [[ $mode == *:off ]] && no_in_place=1
    echo "== $1 B$2 x 2048 bf16, CARAMBA_BENCH_BUFFERS=$buffers CARAMBA_NO_IN_PLACE=$no_in_place"
    log=$OUT/train_$3_${mode/:/_}.txt
    CARAMBA_NO_IN_PLACE=$no_in_place CARAMBA_BENCH_BUFFERS=$buffers timeout 200 ./train_bench cuda $1 $2 2048 3 bf16 > $log 2>&1
    grep -E "^\{|buffer plan:|second step|panicked|error|out of memory" $log | head -6
  done
done
fi
if [[ $what == *elementwise* ]]; then
  # CARAMBA_ELEM_PAIRS: default (pairs for 4-byte storage), 0 (never),
  # all (every storage); twice each, alternating.
  for round in 1 2; do for pairs in default 0 all; do
    echo "== ours: elementwise, CARAMBA_ELEM_PAIRS=$pairs"
    if [[ $pairs == default ]]; then unset CARAMBA_ELEM_PAIRS; else export CARAMBA_ELEM_PAIRS=$pairs; fi
    CARAMBA_BENCH_ONLY=elementwise timeout 120 ./gpu_bench cuda 2>&1 | grep -E "^\{|panicked|error" | head
  done; done
  unset CARAMBA_ELEM_PAIRS
  echo "== torch: elementwise and copy"
  CARAMBA_BENCH_ONLY=elementwise,copy timeout 120 python3 bench_torch.py 2>&1 | grep -E "^\{|Error" | grep -E "swiglu|add|copy|mul|Error" | head
fi
if [[ $what == *suite* ]]; then
  echo "== whole suite"
  PROCS=7 TIMEOUT=300 OUT=$OUT bash gpu_suite_parallel.sh 2>&1 | tail -15
fi
date -u
