#!/bin/bash
# The whole CUDA suite in one device call: `gpu_suite cuda::` split over
# processes that run at once. Each process has its own CubeCL server, so
# NVRTC compiles the kernels of different tests in parallel; the two
# attention tests that compile the most (`narrow_attention`,
# `narrow_attention_backward`, 4–5 minutes each) get a process each.
# Run from a folder holding a gzipped or plain `gpu_suite` (cargo test
# --release -p caramba-runtime --features cuda --test gpu_suite --no-run;
# scripts/device_pack.sh builds it). Writes each group's log to $OUT.
# PROCS (default 6) processes split the other tests; TIMEOUT (default 500 s)
# bounds each process.
cd "$(dirname "$0")"
[[ -f gpu_suite.gz ]] && gunzip -kf gpu_suite.gz
chmod +x gpu_suite
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:$LD_LIBRARY_PATH
export CARAMBA_REQUIRE_VENDOR_GEMM=1 CARAMBA_REQUIRE_GPU=1
OUT=${OUT:-/tmp}
N=${PROCS:-6}
rm -f "$OUT"/group*
./gpu_suite --list 2>/dev/null | grep '^cuda::' | sed 's/: test$//' > "$OUT/tests.txt"
slow='cuda::narrow_attention(_backward)?$'
grep -E "$slow" "$OUT/tests.txt" | awk -v o="$OUT" '{print > (o "/group" NR)}'
grep -vE "$slow" "$OUT/tests.txt" | awk -v o="$OUT" -v n="$N" '{print > (o "/group" (3 + NR % n))}'
for g in $(ls "$OUT"/group* | grep -v '\.log$'); do
  ( timeout "${TIMEOUT:-500}" ./gpu_suite $(cat "$g") --exact --test-threads 1 > "$g.log" 2>&1
    echo "$(basename "$g"): exit $?" ) &
done
wait
cat "$OUT"/group*.log | grep -E "^test .* (FAILED|ok)$|panicked" | sort | uniq -c | sort -rn | head -80
echo "passed: $(cat "$OUT"/group*.log | grep -cE '^test .* ok$') of $(wc -l < "$OUT/tests.txt")"
