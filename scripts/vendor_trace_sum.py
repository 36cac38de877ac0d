#!/usr/bin/env python3
"""Sums CARAMBA_VENDOR_TRACE lines (kernels/src/vendor_gemm.rs) of a
train_bench run read on stdin, after its warm-up step, per timed step:
how long the host spent resolving buffers (blocking get_resource calls,
each waiting for CubeCL's device thread to reach it), waiting, calling
cuBLASLt and releasing. Usage: ... 2>&1 | vendor_trace_sum.py STEPS"""
import re
import sys

UNIT = {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1e3}
DUR = r"([0-9.]+)(ns|µs|us|ms|s)"
LINE = re.compile(
    r"vendor .*: resources " + DUR + r" sync " + DUR + r" call " + DUR + r" (wait|release) " + DUR
)


def ms(v, u):
    return float(v) * UNIT[u]


steps = int(sys.argv[1]) if len(sys.argv) > 1 else 1
timed = False
n = 0
tot = [0.0, 0.0, 0.0, 0.0]
for line in sys.stdin:
    if "warm-up step" in line:
        timed = True
    if line.startswith("{"):
        print(line.rstrip())
    m = LINE.search(line)
    if not (timed and m):
        continue
    g = m.groups()
    n += 1
    for i, (v, u) in enumerate([(g[0], g[1]), (g[2], g[3]), (g[4], g[5]), (g[7], g[8])]):
        tot[i] += ms(v, u)
print(
    f"products/step {n / steps:.0f}; host ms/step: resources {tot[0] / steps:.2f}, "
    f"sync {tot[1] / steps:.2f}, call {tot[2] / steps:.2f}, after {tot[3] / steps:.2f}"
)
