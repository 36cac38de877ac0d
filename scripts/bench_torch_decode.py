#!/usr/bin/env python3
"""PyTorch baseline next to `gpu_bench cuda` case `decode`: SmolLM2-135M-shaped
cached generation (transformers' LlamaForCausalLM, random weights), a
16-token prompt (or CONTEXT tokens) then one token per step with the KV
cache, greedy, batch 1. Prints one JSON line per precision, tokens/s over
64 steps (or STEPS). transformers' default cache (`DynamicCache`)
concatenates each step's keys and values onto the cache's tensors.

usage: bench_torch_decode.py [STEPS] [CONTEXT]
"""
import json
import sys
import time

import torch


def main():
    from transformers import LlamaConfig, LlamaForCausalLM

    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    context = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                      head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=True,
                      max_position_embeddings=max(2048, context + steps + 16))
    for name, dtype in [("f32", torch.float32), ("bf16", torch.bfloat16)]:
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to("cuda", dtype).eval()
        ids = torch.randint(0, cfg.vocab_size, (1, context), device="cuda")

        def generate(n):
            with torch.no_grad():
                out = model(input_ids=ids, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(n):
                    out = model(input_ids=tok, past_key_values=past, use_cache=True)
                    past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
                    tok.item()  # the token comes back each step, as in sampling
                return (time.perf_counter() - start) / n

        generate(8)
        secs = generate(steps)
        suffix = "" if context == 16 else f"_ctx{context}"
        print(json.dumps({"name": f"smollm2_decode_{name}{suffix}", "impl": "torch_eager",
                          "ms": secs * 1e3, "tokens_per_s": 1.0 / secs}), flush=True)


if __name__ == "__main__":
    main()
