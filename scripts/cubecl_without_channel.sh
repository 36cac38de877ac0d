#!/bin/bash
# An experiment (NOTES.md, twelfth session): CubeCL 0.10 runs every launch,
# allocation and read on a device thread fed through a 32-task channel; its
# `cubecl-common` also has a handle that runs each task on the calling
# thread under a re-entrant lock (what it uses where threads are absent).
# This copies cubecl-common 0.10.0 from cargo's registry into
# target/cubecl-common-local with that handle chosen, and prints the
# `--config` that builds against it, e.g.
#
#   cfg=$(scripts/cubecl_without_channel.sh)
#   cargo build --release --features cuda --example train_bench --config "$cfg"
#
# Nothing in the repository changes; drop the --config to go back.
set -euo pipefail
cd "$(dirname "$0")/.."
src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cubecl-common-0.10.0 | head -1)
dst=target/cubecl-common-local
rm -rf "$dst" && mkdir -p target && cp -r "$src" "$dst"
mod=$dst/src/device/handle/mod.rs
python3 - "$mod" <<'PY'
import sys
p = sys.argv[1]
s = open(p).read()
old = '''#[cfg(all(feature = "std", multi_threading))]
type Inner<S> = channel::ChannelDeviceHandle<S>;'''
new = '''#[cfg(all(feature = "std", multi_threading))]
type Inner<S> = reentrant::ReentrantMutexDeviceHandle<S>;'''
assert s.count(old) == 1, "cubecl-common's handle selection moved"
open(p, 'w').write(s.replace(old, new))
PY
# The re-entrant handle expects its service registered beforehand; the
# channel's makes it on first use: do the same.
python3 - "$dst/src/device/handle/reentrant.rs" <<'PY'
import sys
p = sys.argv[1]
s = open(p).read()
old = """    fn new(device_id: DeviceId) -> Self {
        Self::locate(device_id)
    }"""
new = """    fn new(device_id: DeviceId) -> Self {
        let handle = Self::locate(device_id);
        let present = {
            let state = handle.lock.lock.lock();
            state.map.borrow().contains_key(&TypeId::of::<S>())
        };
        if !present {
            let _ = Self::insert(device_id, S::init(device_id));
        }
        handle
    }"""
assert s.count(old) == 1, "cubecl-common's re-entrant handle moved"
open(p, 'w').write(s.replace(old, new))
PY
echo "patch.crates-io.cubecl-common.path=\"$PWD/$dst\""
