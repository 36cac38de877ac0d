#!/bin/bash
# Builds the CUDA binaries the GPU machine runs and packs them, with the
# scripts they need, into device-carry/NAME (gitignored): pass that folder
# as `carry` to the device tool and run `bash device-carry/NAME/run.sh
# PARTS` there (run.sh is scripts/gpu_session.sh). On a 2-core machine a
# cold build takes about 25 minutes, an incremental one a few.
#
#   scripts/device_pack.sh tc6
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?usage: scripts/device_pack.sh NAME}
cargo build --release --features cuda --example gpu_bench --example train_bench
# Builds the suite and names its executable.
suite=$(cargo test --release -p caramba-runtime --features cuda --test gpu_suite --no-run \
    --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu_suite" and m.get("executable"):
        print(m["executable"])')
out=device-carry/$name
tmp=$(mktemp -d)
mkdir -p "$out"
cp target/release/examples/gpu_bench target/release/examples/train_bench "$tmp/"
cp "$suite" "$tmp/gpu_suite"
strip "$tmp"/*
for f in gpu_bench train_bench gpu_suite; do gzip -c "$tmp/$f" > "$out/$f.gz"; done
rm -rf "$tmp"
cp scripts/bench_torch.py scripts/bench_torch_train.py scripts/bench_torch_decode.py \
    scripts/vendor_trace_sum.py "$out/"
cp scripts/gpu_session.sh "$out/run.sh"
git rev-parse --short HEAD > "$out/COMMIT"
du -sh "$out"
