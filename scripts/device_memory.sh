#!/bin/bash
# Training memory, with a trainer's exact buffers (its default) and with
# every buffer from CubeCL's pools (`CARAMBA_BENCH_POOLED=1`): run from a
# folder scripts/device_pack.sh NAME made (copy this script and
# gpu_suite_parallel.sh in). Argument: parts (train, suite). The
# twenty-eighth and twenty-ninth sessions' figures are in BENCHMARKS.md.
cd "$(dirname "$0")"
for f in *.gz; do gunzip -kf $f; done; chmod +x gpu_suite train_bench gpu_bench
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
date -u; cat COMMIT
what=${1:-train}
if [[ $what == *train* ]]; then
# pooled norecycle: 0 0 (the default), 0 1, 1 0.
for m in "llama1b 8 1b" "smollm2 32 smol"; do
  set -- $m
  for case in "0 0" "0 1" "1 0"; do
    read pooled norecycle <<< "$case"
    echo "== $1 B$2 x 2048 bf16, CARAMBA_BENCH_POOLED=$pooled CARAMBA_NO_RECYCLE=$norecycle"
    log=$OUT/train_$3_p${pooled}_r${norecycle}.txt
    CARAMBA_BENCH_POOLED=$pooled CARAMBA_NO_RECYCLE=$norecycle CARAMBA_BENCH_PROFILE=1 \
      timeout 200 ./train_bench cuda $1 $2 2048 3 bf16 > $log 2>&1
    grep -E "^\{|memory:|panicked|error|out of memory" $log | head -5
  done
done
fi
if [[ $what == *suite* ]]; then
  echo "== whole suite"
  PROCS=7 TIMEOUT=300 OUT=$OUT bash gpu_suite_parallel.sh 2>&1 | tail -15
fi
date -u
