#!/bin/bash
# The SASS of one generated CUDA kernel, without a GPU: compiles it with
# NVRTC as cubecl-cuda 0.10 does (sm_90a, CUDA and CCCL include paths,
# -lineinfo; no -ftz, no fast-math flags), then ptxas for the register
# count and spills, cuobjdump for the SASS, and prints an opcode histogram
# of the whole kernel and of its hottest loop (the loop, from a backward
# branch to its target, holding the most HMMA instructions). The counts
# are static: a loop's rarely taken branches count as much as its body.
#
#   target/release/examples/kv_source q8 128 > /tmp/kv.cu.txt
#   scripts/offline_sass.sh /tmp/kv.cu.txt kv_decode_mma /tmp/kvmma
#
# The input is either one kernel's source or the output of
# `caramba compile --emit kernels --target cuda` / `examples/kv_source`
# (kernels separated by `// === title` lines); NAME picks the first kernel
# whose title contains it. Writes PREFIX.cu, .ptx, .cubin and .sass.
#
# NVRTC, ptxas and the headers are CUDA 12.9 from PyPI, cuobjdump 13.x;
# the GPU machine compiles with CUDA 13.0 and its driver, so registers and
# schedules there can differ slightly (BENCHMARKS, twenty-third session).
# The packages go into a virtual environment at $SASS_VENV (default
# /tmp/cu), made on first use.
set -euo pipefail
src=${1:?usage: offline_sass.sh SOURCE [NAME] [OUT_PREFIX]}
name=${2:-}
out=${3:-/tmp/kernel}
venv=${SASS_VENV:-/tmp/cu}
if [[ ! -x $venv/bin/python ]]; then
    python3 -m venv "$venv"
fi
site=$($venv/bin/python -c 'import site; print(site.getsitepackages()[0])')
if [[ ! -e $site/nvidia/cuda_nvrtc || ! -e $site/nvidia/cu13/bin/nvdisasm ]]; then
    $venv/bin/pip install -q nvidia-cuda-nvrtc-cu12 nvidia-cuda-nvcc-cu12 \
        nvidia-cuda-runtime-cu12 nvidia-cuda-cccl-cu12 nvidia-cuda-cuobjdump \
        nvidia-cuda-nvdisasm
fi
SITE=$site NAME=$name SRC=$src OUT=$out $venv/bin/python - <<'PY'
import ctypes, os, sys
site, name, src, out = (os.environ[k] for k in ("SITE", "NAME", "SRC", "OUT"))
text = open(src).read()
if "// === " in text:
    parts = [p for p in text.split("// === ")[1:] if name in p.split("\n", 1)[0]]
    if not parts:
        sys.exit(f"no kernel titled with `{name}` in {src}")
    print("kernel:", parts[0].split("\n", 1)[0])
    text = parts[0].split("\n", 1)[1]
open(out + ".cu", "w").write(text)
nv = site + "/nvidia/"
lib = ctypes.CDLL(nv + "cuda_nvrtc/lib/libnvrtc.so.12")
prog = ctypes.c_void_p()
assert lib.nvrtcCreateProgram(ctypes.byref(prog), text.encode(), b"k.cu", 0, None, None) == 0
opts = [b"--gpu-architecture=sm_90a", b"-lineinfo"] + [
    b"--include-path=" + (nv + d).encode()
    for d in ("cuda_runtime/include", "cuda_cccl/include", "cuda_nvcc/include")
]
rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
n = ctypes.c_size_t()
lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
log = ctypes.create_string_buffer(n.value)
lib.nvrtcGetProgramLog(prog, log)
if rc != 0:
    sys.exit(log.value.decode()[:5000])
lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
ptx = ctypes.create_string_buffer(n.value)
lib.nvrtcGetPTX(prog, ptx)
open(out + ".ptx", "wb").write(ptx.value)
PY
"$site/nvidia/cuda_nvcc/bin/ptxas" -arch=sm_90a -v "$out.ptx" -o "$out.cubin" 2>&1 |
    grep -E "registers|spill"
PATH=$site/nvidia/cu13/bin:$PATH cuobjdump -sass "$out.cubin" > "$out.sass"
OUT=$out python3 - <<'PY'
import collections, os, re
lines = open(os.environ["OUT"] + ".sass").read().splitlines()
ins = []
for l in lines:
    m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", l)
    if m:
        ins.append((int(m.group(1), 16), m.group(2).strip()))
def op(s):
    s = re.sub(r"^@!?U?P[T0-9]+\s+", "", s)
    return s.split()[0].split(".")[0]
def show(title, body):
    c = collections.Counter(op(s) for _, s in body)
    print(f"{title}: {len(body)} instructions")
    print("  " + ", ".join(f"{k} {v}" for k, v in c.most_common(16)))
show("kernel", ins)
# Loops: a branch to an earlier address closes one.
loops = []
for i, (addr, s) in enumerate(ins):
    m = re.search(r"\bBRA\s+(?:`?\(?)?0x([0-9a-f]+)", s)
    if m and int(m.group(1), 16) < addr:
        start = int(m.group(1), 16)
        body = [x for x in ins if start <= x[0] <= addr]
        loops.append((sum(op(s) == "HMMA" for _, s in body), start, addr, body))
if loops:
    h, start, end, body = max(loops, key=lambda l: (l[0], -len(l[3])))
    show(f"hottest loop {start:#x}..{end:#x} ({h} HMMA)", body)
PY
