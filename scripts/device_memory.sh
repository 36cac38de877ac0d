#!/bin/bash
# Training memory with a trainer's buffers planned by liveness (its
# default), exact, and pooled (`CARAMBA_BENCH_BUFFERS`): run from a folder
# scripts/device_pack.sh NAME made (copy this script and
# gpu_suite_parallel.sh in). Argument: parts (train, elementwise, rope,
# decode, append, nsys, suite). The twenty-eighth to thirty-third sessions'
# figures are in BENCHMARKS.md.
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
    # ":nolce": the head's logits and the loss apart (as before the
    # thirty-fourth session: logits and their gradient stored whole).
    [[ $mode == *:nolce* ]] && without=fuse-linear-cross-entropy
    # ":idorder": nodes run in id order (CARAMBA_ID_ORDER=1), as before the
    # thirty-fourth session's memory order.
    id_order=0; [[ $mode == *idorder* ]] && id_order=1
    # ":apart": the fused loss's gradients in a pass of their own
    # (CARAMBA_LOSS_APART=1), as before the thirty-fifth session.
    apart=0; [[ $mode == *apart* ]] && apart=1
    # ":recompute": activation checkpointing (CARAMBA_BENCH_RECOMPUTE=1).
    recompute=0; [[ $mode == *recompute* ]] && recompute=1
    echo "== $1 B$2 x 2048 bf16, CARAMBA_BENCH_BUFFERS=$buffers CARAMBA_NO_IN_PLACE=$no_in_place CARAMBA_BENCH_WITHOUT=$without CARAMBA_ID_ORDER=$id_order CARAMBA_LOSS_APART=$apart CARAMBA_BENCH_RECOMPUTE=$recompute"
    log=$OUT/train_$3_${mode//:/_}.txt
    CARAMBA_BENCH_RECOMPUTE=$recompute CARAMBA_LOSS_APART=$apart CARAMBA_ID_ORDER=$id_order CARAMBA_BENCH_WITHOUT=$without CARAMBA_NO_IN_PLACE=$no_in_place CARAMBA_BENCH_BUFFERS=$buffers timeout 200 ./train_bench cuda $1 $2 2048 3 bf16 > $log 2>&1
    grep -E "^\{|buffer plan:|second step|panicked|error|out of memory" $log | head -6
    grep -oE '"fuse-rope-matmul": [0-9]+' $log | head -1
    grep -E "warm-up" $log | head -1
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
if [[ $what == *append* ]]; then
  # KV caches appended in place (thirty-third session) against copied
  # every step (CARAMBA_NO_APPEND=1): SmolLM2-shaped cached decode (f32
  # cache) after prompts of 16, 4096 and 16384 tokens, two rounds
  # alternating; then transformers' eager decode after the same prompts.
  # CONTEXTS and ROUNDS override the prompts and the rounds; NO_TORCH=1
  # skips transformers.
  for round in $(seq ${ROUNDS:-2}); do for ctx in ${CONTEXTS:-16 4096 16384}; do for mode in append copy; do
    no_append=0; [[ $mode == copy ]] && no_append=1
    echo "== decode, round $round, context $ctx, $mode"
    log=$OUT/decode_${round}_${ctx}_$mode.txt
    CARAMBA_NO_APPEND=$no_append CARAMBA_BENCH_DECODE_CONTEXT=$ctx CARAMBA_BENCH_ONLY=decode timeout 150 ./gpu_bench cuda > $log 2>&1
    grep -E "^\{|panicked|error|appended" $log | head -4
    grep -A8 "profile of" $log | head -9
  done; done; done
  [[ ${NO_TORCH:-0} == 1 ]] || for ctx in ${CONTEXTS:-16 4096 16384}; do
    echo "== torch: decode, context $ctx"
    timeout 150 python3 bench_torch_decode.py 64 $ctx 2>&1 | grep -E "^\{|Error" | head -3
  done
fi
if [[ $what == *nsys* ]]; then
  # Where a decode step's host time goes: the CUDA API calls (count, total,
  # average) under Nsight Systems, SmolLM2-shaped decode after 16 tokens.
  if command -v nsys > /dev/null; then
    CARAMBA_BENCH_ONLY=decode timeout 300 nsys profile -t cuda,osrt --stats=true -o $OUT/decode_nsys -f true ./gpu_bench cuda > $OUT/decode_nsys.txt 2>&1
    grep -E "^\{" $OUT/decode_nsys.txt | head -2
    grep -B2 -A25 "cuda_api_sum" $OUT/decode_nsys.txt | head -40
    rm -f $OUT/decode_nsys.nsys-rep $OUT/decode_nsys.sqlite
  else
    echo "no nsys here"
  fi
fi
if [[ $what == *suite* ]]; then
  echo "== whole suite"
  PROCS=7 TIMEOUT=300 OUT=$OUT bash gpu_suite_parallel.sh 2>&1 | tail -15
fi
date -u
