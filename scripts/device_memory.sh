#!/bin/bash
# Training memory with a trainer's buffers planned by liveness (its
# default), exact, and pooled (`CARAMBA_BENCH_BUFFERS`): run from a folder
# scripts/device_pack.sh NAME made (copy this script and
# gpu_suite_parallel.sh in). Argument: parts (train, elementwise, rope,
# decode, suite). The twenty-eighth to thirty-second sessions' figures are in
# BENCHMARKS.md.
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
    # ":norope": optimized without RoPE in the projections' epilogues
    # (as before the thirty-second session).
    without=; [[ $mode == *:norope ]] && without=fuse-rope-matmul
    echo "== $1 B$2 x 2048 bf16, CARAMBA_BENCH_BUFFERS=$buffers CARAMBA_NO_IN_PLACE=$no_in_place CARAMBA_BENCH_WITHOUT=$without"
    log=$OUT/train_$3_${mode/:/_}.txt
    CARAMBA_BENCH_WITHOUT=$without CARAMBA_NO_IN_PLACE=$no_in_place CARAMBA_BENCH_BUFFERS=$buffers timeout 200 ./train_bench cuda $1 $2 2048 3 bf16 > $log 2>&1
    grep -E "^\{|buffer plan:|second step|panicked|error|out of memory" $log | head -6
    grep -oE '"fuse-rope-matmul": [0-9]+' $log | head -1
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
if [[ $what == *rope* ]]; then
  # RoPE in the projections' epilogues (thirty-second session) against
  # without (CARAMBA_BENCH_WITHOUT=fuse-rope-matmul): SmolLM2-shaped
  # cached decode (f32) and the bf16 forwards, twice each, alternating.
  for round in 1 2; do for without in "" fuse-rope-matmul; do
    echo "== ours, round $round, CARAMBA_BENCH_WITHOUT=$without"
    CARAMBA_BENCH_WITHOUT=$without CARAMBA_BENCH_ONLY=decode timeout 150 ./gpu_bench cuda > $OUT/decode_${round}_${without:-with}.txt 2>&1
    grep -E "^\{|panicked|error" $OUT/decode_${round}_${without:-with}.txt | head -4
    grep -A12 "profile of" $OUT/decode_${round}_${without:-with}.txt | head -13
    CARAMBA_BENCH_WITHOUT=$without CARAMBA_BENCH_ONLY=smollm2,llama1b timeout 150 ./gpu_bench cuda bf16 2>&1 | grep -E "^\{|panicked|error" | head -6
  done; done
fi
if [[ $what == *decode* ]]; then
  # The thirty-second session's two changes to a decode step, alone and
  # together: "both" (the default), "noadds" (CARAMBA_NO_FOLDED_ADDS=1),
  # "neither" (no folded adds, no fuse-rope-matmul: as before the session).
  for round in 1 2; do for mode in both noadds neither; do
    no_adds=0; [[ $mode != both ]] && no_adds=1
    without=; [[ $mode == neither ]] && without=fuse-rope-matmul
    echo "== decode, round $round, $mode"
    CARAMBA_NO_FOLDED_ADDS=$no_adds CARAMBA_BENCH_WITHOUT=$without CARAMBA_BENCH_ONLY=decode timeout 150 ./gpu_bench cuda > $OUT/decode_${round}_$mode.txt 2>&1
    grep -E "^\{|panicked|error" $OUT/decode_${round}_$mode.txt | head -4
    grep -A8 "profile of" $OUT/decode_${round}_$mode.txt | head -9
    [[ $mode == noadds ]] && continue
    CARAMBA_NO_FOLDED_ADDS=$no_adds CARAMBA_BENCH_WITHOUT=$without CARAMBA_BENCH_ONLY=smollm2,llama1b timeout 150 ./gpu_bench cuda bf16 2>&1 | grep -E "^\{|panicked|error" | head -6
  done; done
fi
if [[ $what == *suite* ]]; then
  echo "== whole suite"
  PROCS=7 TIMEOUT=300 OUT=$OUT bash gpu_suite_parallel.sh 2>&1 | tail -15
fi
date -u
