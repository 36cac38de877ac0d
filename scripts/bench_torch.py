#!/usr/bin/env python3
"""PyTorch baselines for caramba's GPU benchmarks, run on the same card in the
same command as `caramba-bench` (examples/gpu_bench.rs). Prints one JSON object
per line: {"name", "ms", "gbps" or "tflops", "impl"}.

Shapes match examples/gpu_bench.rs: keep the two in step.
"""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F


def timed(fn, iters=50, warmup=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def emit(**kw):
    print(json.dumps(kw), flush=True)


def selected(name):
    """CARAMBA_BENCH_ONLY (a comma list) selects cases, as in gpu_bench.rs."""
    only = os.environ.get("CARAMBA_BENCH_ONLY")
    return only is None or name in [c.strip() for c in only.split(",")]


def main():
    dev = "cuda"
    # CARAMBA_TORCH_TF32=1 lets f32 matmuls use TF32, like `gpu_bench cuda tf32`.
    tf32 = os.environ.get("CARAMBA_TORCH_TF32") == "1"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    for dtype_name, dtype in [("f32", torch.float32), ("bf16", torch.bfloat16)]:
        if selected("kvdecode"):
            # Decode attention: B4, 32 query heads over 8 kv heads, d 128, 32k cached.
            q = torch.randn(4, 32, 1, 128, device=dev, dtype=dtype)
            k = torch.randn(4, 8, 32768, 128, device=dev, dtype=dtype)
            v = torch.randn_like(k)
            ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), iters=20)
            emit(name=f"kv_decode_{dtype_name}_b4_h32_kv8_d128_s32768", impl="torch-sdpa", ms=ms,
                 gbps=2 * k.numel() * k.element_size() / ms / 1e6)
            del q, k, v
        if selected("elementwise"):
            # SwiGLU's silu(a) * b and a residual add over 16384 x 4096 (two
            # reads and a write each), as gpu_bench.rs's `elementwise` case:
            # eager (silu's and mul's two kernels for SwiGLU) and compiled
            # (one fused kernel).
            a = torch.randn(16384, 4096, device=dev, dtype=dtype)
            b = torch.randn_like(a)
            nbytes = 3 * a.numel() * a.element_size()

            def swiglu(a, b):
                return F.silu(a) * b

            compiled = torch.compile(swiglu)
            for label, fn in [("torch", swiglu), ("torch-compile", compiled)]:
                ms = timed(lambda: fn(a, b))
                emit(name=f"swiglu_{dtype_name}", impl=label, ms=ms, gbps=nbytes / ms / 1e6)
            ms = timed(lambda: a + b)
            emit(name=f"add_{dtype_name}", impl="torch", ms=ms, gbps=nbytes / ms / 1e6)
            del a, b
        if not any(selected(c) for c in ("copy", "rmsnorm", "attention", "gemm", "elementwise")):
            continue
        # Device copy: the practical bandwidth ceiling.
        n = 16384 * 4096
        x = torch.randn(n, device=dev, dtype=dtype)
        ms = timed(lambda: x.clone())
        emit(name=f"copy_{dtype_name}", impl="torch", ms=ms, gbps=2 * n * x.element_size() / ms / 1e6)
        # RMSNorm 16384 x 4096.
        x = torch.randn(16384, 4096, device=dev, dtype=dtype)
        w = torch.randn(4096, device=dev, dtype=dtype)

        def rms(x, w):
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * w

        bytes_moved = 2 * x.numel() * x.element_size()
        ms = timed(lambda: rms(x, w))
        emit(name=f"rmsnorm_{dtype_name}", impl="torch-eager", ms=ms, gbps=bytes_moved / ms / 1e6)
        crms = torch.compile(rms)
        ms = timed(lambda: crms(x, w))
        emit(name=f"rmsnorm_{dtype_name}", impl="torch-compile", ms=ms, gbps=bytes_moved / ms / 1e6)
        # Causal attention forward, B4 H32 T4096 (head dim 64 and 128); B1 for f32.
        for hd in (64, 128):
            b = 4 if dtype == torch.bfloat16 else 1
            q = torch.randn(b, 32, 4096, hd, device=dev, dtype=dtype)
            k = torch.randn_like(q)
            v = torch.randn_like(q)
            flops = 4 * b * 32 * 4096 * 4096 * hd / 2
            ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), iters=20)
            emit(name=f"attention_causal_hd{hd}_{dtype_name}_b{b}", impl="torch-sdpa", ms=ms, tflops=flops / ms / 1e9)
        if dtype == torch.bfloat16:
            # DBA's concatenated form: d_model 2048, 32 heads, sem 128 + geo 256
            # = 12 query/key (and value) dims per head, B4 T4096, causal.
            q = torch.randn(4, 32, 4096, 12, device=dev, dtype=dtype)
            k = torch.randn_like(q)
            v = torch.randn_like(q)
            flops = 4 * 4 * 32 * 4096 * 4096 * 12 / 2
            ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), iters=20)
            emit(name="attention_dba_causal_hd12_bf16_b4", impl="torch-sdpa", ms=ms, tflops=flops / ms / 1e9)
        # GEMMs: 4096^3 and the 1B shape's MLP projection (B2 x T2048 rows);
        # f32 both exact and TF32, as `gpu_bench`'s gemm case.
        for m, k, n in [(4096, 4096, 4096), (4096, 2048, 8192)]:
            a = torch.randn(m, k, device=dev, dtype=dtype)
            bm = torch.randn(k, n, device=dev, dtype=dtype)
            modes = [("f32", False), ("tf32", True)] if dtype == torch.float32 else [(dtype_name, False)]
            for label, allow in modes:
                torch.backends.cuda.matmul.allow_tf32 = allow
                ms = timed(lambda: a @ bm, iters=20)
                emit(name=f"gemm{m}x{k}x{n}_{label}", impl="torch", ms=ms, tflops=2 * m * k * n / ms / 1e9)
            torch.backends.cuda.matmul.allow_tf32 = tf32
    if selected("copy"):
        # Elementwise bandwidth: x * x (2 reads + 1 write), f32.
        n = 16384 * 4096
        x = torch.randn(n, device=dev)
        ms = timed(lambda: x * x)
        emit(name="mul_f32 (2 reads + 1 write)", impl="torch", ms=ms, gbps=3 * 4 * n / ms / 1e6)
        del x
    # The models' forward + loss (as gpu_bench's cases of the same names),
    # random weights, B8 x T1024, f32 and bf16.
    shapes = {
        "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                        num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0),
        "llama1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0),
    }
    for which, shape in shapes.items():
        if not selected(which):
            continue
        try:
            from transformers import LlamaConfig, LlamaForCausalLM

            cfg = LlamaConfig(**shape, rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=2048)
            for dtype_name, dtype in [("f32", torch.float32), ("bf16", torch.bfloat16)]:
                model = LlamaForCausalLM(cfg).to(dev, dtype).eval()
                ids = torch.randint(0, cfg.vocab_size, (8, 1024), device=dev)
                with torch.no_grad():
                    f = lambda: model(input_ids=ids, labels=ids).loss
                    ms = timed(f, iters=5, warmup=2)
                    tag = "tf32" if tf32 and dtype == torch.float32 else dtype_name
                    name = f"{which}_forward_loss_b8_t1024_{tag}"
                    emit(name=name, impl="torch-eager", ms=ms, tokens_per_s=8 * 1024 / ms * 1e3)
                    cm = torch.compile(model)
                    f = lambda: cm(input_ids=ids, labels=ids).loss
                    ms = timed(f, iters=5, warmup=3)
                    emit(name=name, impl="torch-compile", ms=ms, tokens_per_s=8 * 1024 / ms * 1e3)
                del model
                torch.cuda.empty_cache()
        except Exception as e:  # report, don't hide
            emit(name=f"{which}_forward_loss", impl="torch", error=repr(e))
    emit(name="meta", impl="torch", torch=torch.__version__, device=torch.cuda.get_device_name(0), date=time.strftime("%Y-%m-%d"))


if __name__ == "__main__":
    sys.exit(main())
