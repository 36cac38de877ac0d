#!/bin/bash
# The GPU machine script of the ninth session (BENCHMARKS.md): run from a
# folder holding gzipped builds of gpu_suite (cargo test --release -p
# caramba-runtime --features cuda --test gpu_suite --no-run), train_bench and
# gpu_bench (cargo build --release --features cuda --example ...), with
# scripts/bench_torch.py and scripts/bench_torch_train.py beside them
# (scripts/device_pack.sh NAME builds and packs all of it).
# Argument: a comma list of parts (suite, ptxas, rows, attn, rms, trows, train,
# cubek, nsys, llama, lprof, handoff, tsums, ncu, quick, final, recycle, vtrace,
# excl, imma).
# `imma` checks the q8 decode kernel's `f16` score products (the fallback,
# `CARAMBA_KV_IMMA=0`; the integer ones are the default): the KV tests with
# them, then Nsight Compute's kernel time of `gpu_bench`'s `kvdecode` with
# and without them (and over q4 caches), and its chain timing twice each,
# alternating.
# `ncu` profiles the attention kernels with Nsight Compute (NCU_TRAIN=1: the
# backward's too); `final` runs tests in the background while nvcc reports
# the registers of the kernel sources in cu/ (`caramba compile --emit kernels
# --target cuda`), then the attention and training benchmarks.
cd "$(dirname "$0")"
for f in *.gz; do gunzip -kf $f; done; chmod +x gpu_suite train_bench gpu_bench
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:$LD_LIBRARY_PATH
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
date -u
what=${1:-suite,attn}
if [[ $what == *suite* ]]; then
echo "== suite (attention)"
CARAMBA_REQUIRE_VENDOR_GEMM=1 timeout ${SUITE_T:-240} ./gpu_suite ${SUITE:-cuda::narrow_attention cuda::narrow_attention_backward cuda::attention cuda::attention_backward cuda::narrow_kv_attention cuda::dba_preset cuda::mixed_precision_gradients cuda::tiny_llama_bf16} > $OUT/suite.txt 2>&1
echo "rc $?"
grep -E "^test |test result|panicked" $OUT/suite.txt | head -30
fi
if [[ $what == *ptxas* ]]; then
echo "== resource usage"
NVCC=$(ls /usr/local/cuda*/bin/nvcc 2>/dev/null | head -1); echo "nvcc: $NVCC"
for f in cu/*.cu; do echo "-- $f"; $NVCC -arch=sm_90 --resource-usage -c -o /dev/null $f 2>&1 | grep -E "registers|spill|error" | head -4; done
fi
if [[ $what == *rows* ]]; then
for rows in 64 128; do echo "== ours attention rows $rows"
CARAMBA_TC_ROWS=$rows CARAMBA_BENCH_ONLY=attention timeout 120 ./gpu_bench cuda 2>&1 | grep -E "^\{|panicked|error" | grep bf16 | head
done
fi
if [[ $what == *attn* ]]; then
echo "== ours attention"
CARAMBA_BENCH_ONLY=attention timeout 120 ./gpu_bench cuda 2>&1 | grep -E "^\{|panicked|error" | head
echo "== torch attention"
CARAMBA_BENCH_ONLY=attention timeout 60 python3 bench_torch.py 2>&1 | grep -E "^\{|Error" | grep -E "attention|Error" | head -20
fi
if [[ $what == *rms* ]]; then
echo "== ours rmsnorm"
CARAMBA_BENCH_ONLY=rmsnorm timeout 120 ./gpu_bench cuda 2>&1 | grep -E "^\{|panicked|error" | head
echo "== torch rmsnorm and copy"
CARAMBA_BENCH_ONLY=rmsnorm timeout 90 python3 bench_torch.py 2>&1 | grep -E "^\{|Error" | grep -E "rmsnorm|copy|Error" | head
fi
if [[ $what == *trows* ]]; then
for rows in 64 128; do echo "== train smollm2 rows $rows"
CARAMBA_TC_ROWS=$rows CARAMBA_BENCH_PROFILE=1 timeout 150 ./train_bench cuda smollm2 8 2048 3 bf16 2>&1 | grep -E "^\{|panicked|error|attention" | head -5
done
fi
if [[ $what == *handoff* ]]; then
for sync in 1 0; do echo "== train smollm2 and llama1b, CARAMBA_VENDOR_SYNC=$sync (1: host waits around each cuBLASLt call; 0: stream handoff)"
CARAMBA_VENDOR_SYNC=$sync timeout 150 ./train_bench cuda smollm2 8 2048 5 bf16 2>&1 | grep -E "^\{|panicked|error" | head -5
CARAMBA_VENDOR_SYNC=$sync timeout 200 ./train_bench cuda llama1b 4 2048 3 bf16 2>&1 | grep -E "^\{|panicked|error" | head -5
done
fi
if [[ $what == *cubek* ]]; then
echo "== train smollm2, every GEMM on cubek (no cuBLASLt waits)"
CARAMBA_BENCH_GEMM=cubek timeout 200 ./train_bench cuda smollm2 8 2048 3 bf16 2>&1 | grep -E "^\{|panicked|error" | head -5
fi
if [[ $what == *nsys* ]]; then
echo "== nsys timeline of smollm2 training (3 timed steps after warm-up)"
NSYS=$(ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems*/bin/nsys /usr/bin/nsys 2>/dev/null | head -1); echo "nsys: $NSYS"
if [[ -n $NSYS ]]; then
timeout 300 $NSYS profile -o $OUT/train -f true --trace=cuda ./train_bench cuda smollm2 8 2048 3 bf16 2>&1 | grep -E "^\{|panicked|error" | head -3
timeout 200 $NSYS stats -q --report cuda_gpu_kern_sum --format csv -o $OUT/kern $OUT/train.nsys-rep > /dev/null 2>&1
timeout 200 $NSYS stats -q --report cuda_api_sum --format csv -o $OUT/api $OUT/train.nsys-rep > /dev/null 2>&1
ls $OUT; head -25 $OUT/kern*.csv | cut -c1-220; head -12 $OUT/api*.csv | cut -c1-200
rm -f $OUT/train.nsys-rep $OUT/train.sqlite
fi
fi
if [[ $what == *lprof* ]]; then
echo "== train llama1b b4, profiled"
CARAMBA_BENCH_PROFILE=1 timeout 300 ./train_bench cuda llama1b 4 2048 3 bf16 2>&1 | grep -vE "^\s*$|XDG" | grep -E "^\{|panicked|error|profile|ms " | head -50
fi
if [[ $what == *llama,* || $what == *llama ]]; then
echo "== train llama1b b4"
timeout 200 ./train_bench cuda llama1b 4 2048 3 bf16 2>&1 | grep -E "^\{|panicked|error" | head -5
echo "== torch llama1b b4 amp eager"
CARAMBA_TORCH_DTYPES=amp CARAMBA_TORCH_MODES=eager timeout 120 python3 bench_torch_train.py llama1b 4 2048 5 2>&1 | grep -E "^\{|Error" | tail -3
fi
if [[ $what == *train,* || $what == *train ]]; then
echo "== train smollm2"
CARAMBA_BENCH_PROFILE=1 timeout 150 ./train_bench cuda smollm2 8 2048 3 bf16 2>&1 | grep -vE "^\s*$|XDG" | grep -E "^\{|panicked|error|profile|ms " | head -50
echo "== torch smollm2 amp eager"
CARAMBA_TORCH_DTYPES=amp CARAMBA_TORCH_MODES=eager timeout 90 python3 bench_torch_train.py smollm2 8 2048 5 2>&1 | grep -E "^\{|Error" | tail -3
fi
if [[ $what == *tsums* ]]; then
for off in 1 0; do echo "== train smollm2 and llama1b, CARAMBA_NO_TRANSPOSED_SUMS=$off"
CARAMBA_NO_TRANSPOSED_SUMS=$off timeout 150 ./train_bench cuda smollm2 8 2048 5 bf16 2>&1 | grep -E "^\{|panicked|error" | head -5
CARAMBA_NO_TRANSPOSED_SUMS=$off timeout 200 ./train_bench cuda llama1b 4 2048 3 bf16 2>&1 | grep -E "^\{|panicked|error" | head -5
done
fi
if [[ $what == *ncu* ]]; then
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1); echo "ncu: $NCU"
SECS="--section LaunchStats --section Occupancy --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis --section SpeedOfLight"
echo "== ncu attention forward (bf16 cases)"
CARAMBA_BENCH_ONLY=attention timeout 300 $NCU --clock-control none -k regex:attention_tc --launch-count ${NCU_N:-3} --launch-skip ${NCU_SKIP:-0} $SECS ./gpu_bench cuda > $OUT/ncu_fwd.txt 2>&1; echo "rc $?"
grep -E "attention|Registers Per|Shared Memory Config|Achieved Occupancy|Theoretical Occupancy|Block Limit|Duration|Warp Cycles Per Issued|Issue Slots Busy|SM Busy|Stall|Compute \(SM\) Thr|Memory Thr" $OUT/ncu_fwd.txt | head -80
if [[ -n $NCU_TRAIN ]]; then
echo "== ncu attention backward (smollm2 training)"
timeout 300 $NCU --clock-control none -k regex:'attention_(dq|dkv)' --launch-count 2 $SECS ./train_bench cuda smollm2 8 2048 1 bf16 > $OUT/ncu_bwd.txt 2>&1; echo "rc $?"
grep -E "attention|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit|Duration|Warp Cycles Per Issued|Issue Slots Busy|Stall" $OUT/ncu_bwd.txt | head -60
fi
fi
if [[ $what == *quick* ]]; then
for off in 0 1; do echo "== train smollm2, CARAMBA_NO_TRANSPOSED_SUMS=$off"
CARAMBA_NO_TRANSPOSED_SUMS=$off timeout 150 ./train_bench cuda smollm2 8 2048 5 bf16 2>&1 | grep -E "^\{|panicked|error" | head -5
done
echo "== train llama1b"
timeout 200 ./train_bench cuda llama1b 4 2048 3 bf16 2>&1 | grep -E "^\{|panicked|error" | head -5
echo "== torch smollm2 amp eager"
CARAMBA_TORCH_DTYPES=amp CARAMBA_TORCH_MODES=eager timeout 90 python3 bench_torch_train.py smollm2 8 2048 5 2>&1 | grep -E "^\{|Error" | tail -3
fi
if [[ $what == *imma* ]]; then
echo "== KV tests with CARAMBA_KV_IMMA=0"
CARAMBA_KV_IMMA=0 timeout ${SUITE_T:-300} ./gpu_suite cuda::kv cuda::cached_tiny_llama cuda::narrow_kv > $OUT/suite_imma.txt 2>&1
echo "rc $?"
grep -E "^test |test result|panicked|max error" $OUT/suite_imma.txt | head -20
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
# Nsight Compute of the fourth kv_decode_mma launch of `kvdecode` into
# $OUT/NAME.txt, with the environment assignments that follow NAME.
ncu_kv() {
  local name=$1; shift
  env "$@" CARAMBA_BENCH_ONLY=kvdecode timeout 300 $NCU --clock-control none -k regex:kv_decode_mma --launch-skip 3 --launch-count 1 \
    --section SpeedOfLight --section LaunchStats --section WarpStateStats --section InstructionStats \
    ./gpu_bench cuda > $OUT/$name.txt 2>&1; echo "rc $?"
  grep -E "Duration|DRAM Throughput|Registers Per|Executed Instructions |Warp Cycles Per Issued" $OUT/$name.txt | head -8
}
for on in 0 1; do echo "== ncu kv_decode_mma, CARAMBA_KV_IMMA=$on"
ncu_kv ncu_imma$on CARAMBA_KV_IMMA=$on
done
echo "== ncu kv_decode_mma over q4 caches"
ncu_kv ncu_q4 CARAMBA_BENCH_KV=q4
for on in 0 1 0 1; do echo "== kvdecode chain timing, CARAMBA_KV_IMMA=$on"
CARAMBA_KV_IMMA=$on CARAMBA_BENCH_ONLY=kvdecode timeout 120 ./gpu_bench cuda 2>&1 | grep -E "^\{|panicked|error" | head -6
done
fi
if [[ $what == *final* ]]; then
echo "== suite in the background: ${SUITE:-narrow attention tests}"
(CARAMBA_REQUIRE_VENDOR_GEMM=1 timeout ${SUITE_T:-300} ./gpu_suite ${SUITE:-cuda::narrow_attention cuda::narrow_attention_backward cuda::tiny_llama_bf16 cuda::mixed_precision_gradients} > $OUT/suite.txt 2>&1; echo "suite rc $?" >> $OUT/suite.txt) &
SPID=$!
NVCC=$(ls /usr/local/cuda*/bin/nvcc 2>/dev/null | head -1)
for f in ${PTX_FILES:-cu/fwd_64.cu cu/fwd_128.cu cu/fwd_16.cu cu/dq_64.cu cu/dkv_64.cu}; do
  ( $NVCC -arch=sm_90 --resource-usage -c -o /dev/null $f > $OUT/$(basename $f).ptxas 2>&1 ) &
done
wait $(jobs -p | grep -v "^$SPID$") 2>/dev/null
for f in $OUT/*.ptxas; do echo "-- $f"; grep -E "registers|spill|error" $f | head -4; done
wait $SPID
grep -E "^test |test result|panicked|suite rc" $OUT/suite.txt | head -30
for mt in 2 1; do echo "== ours attention, CARAMBA_TC_MT=$mt"
CARAMBA_TC_MT=$mt CARAMBA_BENCH_ONLY=attention timeout 100 ./gpu_bench cuda 2>&1 | grep -E "^\{|panicked|error" | grep -v f32 | head
done
echo "== torch attention"
CARAMBA_BENCH_ONLY=attention timeout 60 python3 bench_torch.py 2>&1 | grep -E "^\{|Error" | grep -E "attention|Error" | grep -v f32 | head -20
echo "== train smollm2"
timeout 120 ./train_bench cuda smollm2 8 2048 5 bf16 2>&1 | grep -E "^\{|panicked|error" | head -5
echo "== torch smollm2 amp eager"
CARAMBA_TORCH_DTYPES=amp CARAMBA_TORCH_MODES=eager timeout 90 python3 bench_torch_train.py smollm2 8 2048 5 2>&1 | grep -E "^\{|Error" | head -1
echo "== train llama1b"
timeout 150 ./train_bench cuda llama1b 4 2048 3 bf16 2>&1 | grep -E "^\{|panicked|error" | head -5
echo "== torch llama1b amp eager"
CARAMBA_TORCH_DTYPES=amp CARAMBA_TORCH_MODES=eager timeout 100 python3 bench_torch_train.py llama1b 4 2048 5 2>&1 | grep -E "^\{|Error" | head -1
fi
if [[ $what == *recycle* ]]; then
echo "== suite in the background: ${SUITE}"
(CARAMBA_REQUIRE_VENDOR_GEMM=1 timeout ${SUITE_T:-200} ./gpu_suite ${SUITE} > $OUT/suite.txt 2>&1; echo "suite rc $?" >> $OUT/suite.txt) &
SPID=$!
echo "== torch smollm2 amp eager (suite compiling alongside)"
CARAMBA_TORCH_DTYPES=amp CARAMBA_TORCH_MODES=eager timeout 90 python3 bench_torch_train.py smollm2 8 2048 5 2>&1 | grep -E "^\{|Error" | head -1
echo "== torch llama1b amp eager (suite compiling alongside)"
CARAMBA_TORCH_DTYPES=amp CARAMBA_TORCH_MODES=eager timeout 100 python3 bench_torch_train.py llama1b 4 2048 5 2>&1 | grep -E "^\{|Error" | head -1
wait $SPID
grep -E "^test |test result|panicked|suite rc" $OUT/suite.txt | head -30
for off in 1 0; do echo "== train smollm2 and llama1b, CARAMBA_NO_RECYCLE=$off"
CARAMBA_NO_RECYCLE=$off timeout 120 ./train_bench cuda smollm2 8 2048 5 bf16 2>&1 | grep -E "^\{|panicked|error" | head -5
CARAMBA_NO_RECYCLE=$off timeout 150 ./train_bench cuda llama1b 4 2048 3 bf16 2>&1 | grep -E "^\{|panicked|error" | head -5
done
fi
if [[ $what == *vtrace* ]]; then
# Where the calling thread's time goes around each cuBLASLt product
# (scripts/vendor_trace_sum.py beside the builds): resolving the three
# buffers (blocking calls that wait for CubeCL's device thread), the call.
for off in 1 0; do echo "== vendor trace, smollm2, CARAMBA_NO_EXCLUSIVE=$off"
CARAMBA_NO_EXCLUSIVE=$off CARAMBA_VENDOR_TRACE=1 timeout 120 ./train_bench cuda smollm2 8 2048 2 bf16 2>&1 | python3 vendor_trace_sum.py 2
done
fi
if [[ $what == *excl* ]]; then
# The A/B of queuing each run on CubeCL's device thread in one hand-off
# (on_device_thread) against a hand-off per CubeCL call (CARAMBA_NO_EXCLUSIVE=1).
for off in 1 0 1 0; do echo "== train smollm2 and llama1b, CARAMBA_NO_EXCLUSIVE=$off"
CARAMBA_NO_EXCLUSIVE=$off timeout 120 ./train_bench cuda smollm2 8 2048 5 bf16 2>&1 | grep -E "^\{|panicked|error" | head -5
[[ -z $EXCL_SHORT ]] && CARAMBA_NO_EXCLUSIVE=$off timeout 150 ./train_bench cuda llama1b 4 2048 3 bf16 2>&1 | grep -E "^\{|panicked|error" | head -5
done
for off in 1 0; do echo "== decode and smollm2 forward, CARAMBA_NO_EXCLUSIVE=$off"
CARAMBA_NO_EXCLUSIVE=$off CARAMBA_BENCH_ONLY=decode,smollm2 timeout 150 ./gpu_bench cuda 2>&1 | grep -E "^\{|panicked|error" | head -8
done
fi
