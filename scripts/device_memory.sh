#!/bin/bash
# Training memory with a trainer's buffers planned by liveness (its
# default), exact, and pooled (`CARAMBA_BENCH_BUFFERS`): run from a folder
# scripts/device_pack.sh NAME made (copy this script and
# gpu_suite_parallel.sh in). Argument: parts (train, suite). The
# twenty-eighth to thirtieth sessions' figures are in BENCHMARKS.md.
cd "$(dirname "$0")"
for f in *.gz; do gunzip -kf $f; done; chmod +x gpu_suite train_bench gpu_bench
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
date -u; cat COMMIT
what=${1:-train}
if [[ $what == *train* ]]; then
for m in "llama1b 8 1b" "smollm2 32 smol"; do
  set -- $m
  for buffers in planned exact pooled; do
    echo "== $1 B$2 x 2048 bf16, CARAMBA_BENCH_BUFFERS=$buffers"
    log=$OUT/train_$3_$buffers.txt
    CARAMBA_BENCH_BUFFERS=$buffers timeout 200 ./train_bench cuda $1 $2 2048 3 bf16 > $log 2>&1
    grep -E "^\{|buffer plan:|second step|panicked|error|out of memory" $log | head -6
  done
done
fi
if [[ $what == *suite* ]]; then
  echo "== whole suite"
  PROCS=7 TIMEOUT=300 OUT=$OUT bash gpu_suite_parallel.sh 2>&1 | tail -15
fi
date -u
