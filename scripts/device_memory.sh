#!/bin/bash
# Training memory, with the executor's recycler on and off
# (`CARAMBA_NO_RECYCLE`): run from a folder scripts/device_pack.sh NAME
# made (copy this script and gpu_suite_parallel.sh in). Argument: parts
# (train, suite). The twenty-eighth session's figures are in BENCHMARKS.md.
cd "$(dirname "$0")"
for f in *.gz; do gunzip -kf $f; done; chmod +x gpu_suite train_bench gpu_bench
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
date -u; cat COMMIT
what=${1:-train}
if [[ $what == *train* ]]; then
for off in 0 1; do
  echo "== llama1b B8 x 2048 bf16, CARAMBA_NO_RECYCLE=$off"
  CARAMBA_NO_RECYCLE=$off CARAMBA_BENCH_PROFILE=1 timeout 200 ./train_bench cuda llama1b 8 2048 3 bf16 > $OUT/train_1b_$off.txt 2>&1
  grep -E "^\{|memory:|panicked|error|out of memory" $OUT/train_1b_$off.txt | head -5
done
for off in 0 1; do
  echo "== smollm2 B32 x 2048 bf16, CARAMBA_NO_RECYCLE=$off"
  CARAMBA_NO_RECYCLE=$off CARAMBA_BENCH_PROFILE=1 timeout 150 ./train_bench cuda smollm2 32 2048 3 bf16 > $OUT/train_smol_$off.txt 2>&1
  grep -E "^\{|memory:|panicked|error|out of memory" $OUT/train_smol_$off.txt | head -5
done
fi
if [[ $what == *suite* ]]; then
  echo "== whole suite"
  PROCS=7 TIMEOUT=300 OUT=$OUT bash gpu_suite_parallel.sh 2>&1 | tail -15
fi
date -u
