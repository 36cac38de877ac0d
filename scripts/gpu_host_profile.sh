#!/bin/bash
# Where a training step's host time goes on the GPU machine, which has no
# perf of its own: this machine's perf and the libraries it links, carried
# there. Prepare a folder (gitignored, e.g. device-carry/perf) here:
#
#   mkdir -p F/lib && cp "$(readlink -f /usr/bin/perf)" F/perf
#   for l in $(ldd /usr/bin/perf | awk '{print $3}' | grep -vE 'libc.so|libm.so|ld-linux|^$'); do cp -L $l F/lib/; done
#   cp target/release/examples/train_bench F/train_bench_sym && strip --strip-debug F/train_bench_sym
#   gzip -9 F/perf F/train_bench_sym F/lib/*; cp scripts/gpu_host_profile.sh F/run.sh
#
# then run F/run.sh there (carry F). It samples every thread at 999 Hz
# (cpu-clock: the machine has no hardware events) over STEPS SmolLM2 steps
# and reports the second half of the run (the warm-up's kernel compilation
# excluded) per thread, then by symbol for the main thread and for CubeCL's
# device thread (`DSD-0-0`), which runs every launch and allocation.
cd "$(dirname "$0")"
for f in *.gz lib/*.gz; do [[ -e $f ]] && gunzip -f $f; done; chmod +x perf train_bench_sym
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib
P="env LD_LIBRARY_PATH=$PWD/lib ./perf"
STEPS=${STEPS:-300}
$P record -e cpu-clock -F 999 -o $OUT/perf.data ./train_bench_sym cuda smollm2 8 2048 $STEPS bf16 2>&1 | grep -E "^\{|warm|error|panicked" | tail -3
T="--time 50%-100%"
echo "== samples per thread, second half of the run (steady state)"
$P report -i $OUT/perf.data --stdio -n --no-children $T --sort comm 2>/dev/null | grep -v "^$" | head -12
echo "== main thread"
$P report -i $OUT/perf.data --stdio -n --no-children $T --comm train_bench_sym --sort dso,sym 2>/dev/null | grep -v "^#" | grep -v "^$" | head -45
echo "== device thread"
$P report -i $OUT/perf.data --stdio -n --no-children $T --comm DSD-0-0 --sort dso,sym 2>/dev/null | grep -v "^#" | grep -v "^$" | head -30
rm -f $OUT/perf.data
