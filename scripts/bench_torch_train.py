#!/usr/bin/env python3
"""PyTorch training baselines next to examples/train_bench.rs: the same
Llama shapes (transformers' LlamaForCausalLM, random weights), AdamW
(weight decay 0.1), next-token loss, clipping at 1.0, on the same card in the
same command. Prints one JSON line per (model, precision, mode).

usage: bench_torch_train.py [smollm2|llama1b] [batch] [seq] [steps]
"""
import json
import os
import sys
import time

import torch

SHAPES = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0),
    "llama1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0),
}


def main():
    from transformers import LlamaConfig, LlamaForCausalLM

    which = sys.argv[1] if len(sys.argv) > 1 else "smollm2"
    b = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    t = int(sys.argv[3]) if len(sys.argv) > 3 else 1024
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 5
    # CARAMBA_TORCH_TF32=1 lets f32 matmuls use TF32, like `train_bench ... tf32`.
    tf32 = os.environ.get("CARAMBA_TORCH_TF32") == "1"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    cfg = LlamaConfig(**SHAPES[which], rms_norm_eps=1e-5, tie_word_embeddings=True,
                      max_position_embeddings=max(2048, t))
    # CARAMBA_TORCH_DTYPES (default "f32,bf16"; "amp" is f32 weights under
    # bf16 autocast, what caramba's `use_amp: true` does) and
    # CARAMBA_TORCH_MODES (default "eager,compile") pick the lines.
    dtypes = {"f32": torch.float32, "bf16": torch.bfloat16, "amp": torch.float32}
    wanted = os.environ.get("CARAMBA_TORCH_DTYPES", "f32,bf16").split(",")
    modes = os.environ.get("CARAMBA_TORCH_MODES", "eager,compile").split(",")
    # CARAMBA_TORCH_CHECKPOINT=1: each decoder layer's activations
    # recomputed in the backward (transformers' gradient checkpointing,
    # non-reentrant), as caramba's `activation_checkpointing: true`.
    ckpt = os.environ.get("CARAMBA_TORCH_CHECKPOINT") == "1"
    for dtype_name, dtype in [(d, dtypes[d]) for d in wanted]:
        amp = dtype_name == "amp"
        for mode in modes:
            try:
                torch.manual_seed(0)
                model = LlamaForCausalLM(cfg).to("cuda", dtype).train()
                if ckpt:
                    model.gradient_checkpointing_enable(
                        gradient_checkpointing_kwargs={"use_reentrant": False})
                n = sum(p.numel() for p in model.parameters())
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
                fwd = torch.compile(model) if mode == "compile" else model
                ids = torch.randint(0, cfg.vocab_size, (b, t), device="cuda")

                def step():
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                        loss = fwd(input_ids=ids, labels=ids).loss
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    return loss

                for _ in range(2):
                    step()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                for _ in range(steps):
                    loss = step()
                loss.item()
                torch.cuda.synchronize()
                secs = (time.perf_counter() - start) / steps
                tps = b * t / secs
                print(json.dumps(dict(
                    name=f"train_{which}_b{b}_t{t}_{'tf32' if tf32 and dtype_name == 'f32' else dtype_name}",
                    impl=f"torch-{mode}{'-checkpointed' if ckpt else ''}", ms_per_step=round(secs * 1e3, 1), tokens_per_s=round(tps),
                    mfu=round(6 * n * tps / (67e12 if dtype_name == "f32" else 989e12), 3),
                    peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1),
                    # The caching allocator's high-water mark: comparable
                    # with train_bench's reserved_gib (CubeCL's pools).
                    reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 1))), flush=True)
                del model, opt, fwd
                torch.cuda.empty_cache()
            except Exception as e:  # report, don't hide
                print(json.dumps(dict(name=f"train_{which}_b{b}_t{t}_{dtype_name}", impl=f"torch-{mode}",
                                      error=repr(e)[:300])), flush=True)
                torch.cuda.empty_cache()
    print(json.dumps(dict(name="meta", torch=torch.__version__, device=torch.cuda.get_device_name(0),
                          date=time.strftime("%Y-%m-%d"))))


if __name__ == "__main__":
    main()
