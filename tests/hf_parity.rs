//! End-to-end parity with Hugging Face transformers on a real checkpoint:
//! SmolLM2-135M-Instruct (GGUF, Q4_1-dequantized weights) on the CPU
//! reference backend against logits, greedy tokens and perplexity that
//! `scripts/hf_reference.py` dumped from transformers (tests/data/hf_reference/).
//!
//! Needs the fixture (`scripts/fixtures.sh`); without it each test says
//! SKIPPED loudly (and fails when CARAMBA_REQUIRE_FIXTURES is set, as in CI).

use caramba::commands::perplexity::nll_of;
use caramba::commands::sample::parse_kv_cache;
use caramba::model::{open_checkpoint, Model};
use caramba_runtime::backend::Backend;
use caramba_runtime::checkpoint::testing::{fixture_path, SMOLLM2_GGUF};
use caramba_runtime::data::read_f32_npy;
use serde_json::Value;
use std::path::PathBuf;
use std::sync::OnceLock;

fn reference(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/hf_reference")
        .join(name)
}

fn json(name: &str) -> Value {
    let text = std::fs::read_to_string(reference(name))
        .unwrap_or_else(|e| panic!("missing reference {name}: {e}"));
    serde_json::from_str(&text).expect("reference json parses")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// The model, loaded once for all tests in this file.
fn model() -> Option<&'static Model> {
    static MODEL: OnceLock<Option<Model>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let path = fixture_path(SMOLLM2_GGUF)?;
            let ckpt = open_checkpoint(&path).unwrap_or_else(|e| panic!("{}", e.message));
            Some(Model::load(&ckpt).unwrap_or_else(|e| panic!("{}", e.message)))
        })
        .as_ref()
}

#[test]
fn logits_match_transformers_on_three_prompts() {
    let Some(m) = model() else { return };
    let prompts = json("prompts.json");
    let n = prompts.as_array().map(|a| a.len()).unwrap_or(0);
    assert!(n >= 3, "expected at least three reference prompts");
    let mut worst = 0.0f64;
    for i in 0..n {
        let p = &prompts[i];
        let ids = ids(&p["ids"]);
        let (shape, want) =
            read_f32_npy(&reference(&format!("logits_{i}.npy"))).expect("reference logits");
        assert_eq!(shape, vec![ids.len(), m.config.vocab_size]);
        let got = m.logits(&ids).expect("forward pass");
        let got = got.as_f32().expect("f32 logits");
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs() as f64)
            .fold(0.0, f64::max);
        let scale = want.iter().map(|v| v.abs() as f64).fold(0.0, f64::max);
        println!(
            "prompt {i} ({:?}): {} positions, max |Δ| = {diff:.3e}, max |logit| = {scale:.1}",
            p["text"],
            ids.len()
        );
        worst = worst.max(diff);
    }
    assert!(
        worst <= 2e-3,
        "max absolute logit difference {worst:.3e} exceeds 2e-3"
    );
}

#[test]
fn greedy_generation_matches_transformers() {
    let Some(m) = model() else { return };
    let g = json("greedy.json");
    let mut seq = ids(&g["prompt_ids"]);
    let want = ids(&g["new_ids"]);
    let vocab = m.config.vocab_size;
    let mut got = Vec::new();
    for _ in 0..want.len() {
        let l = m.logits(&seq).expect("forward pass");
        let l = l.as_f32().expect("f32");
        let last = &l[(seq.len() - 1) * vocab..];
        let next = (0..vocab)
            .max_by(|&a, &b| last[a].total_cmp(&last[b]))
            .expect("non-empty") as u32;
        seq.push(next);
        got.push(next);
    }
    assert_eq!(got, want, "greedy continuation differs from transformers'");
}

/// Greedy decoding through a KV cache of `spec`: prefill, then one token
/// per step.
fn greedy_cached(spec: &str, prompt: &[u32], n: usize) -> (Vec<u32>, Vec<f32>) {
    greedy_cached_on(Backend::Cpu, spec, prompt, n)
}

fn greedy_cached_on(
    backend: Backend,
    spec: &str,
    prompt: &[u32],
    n: usize,
) -> (Vec<u32>, Vec<f32>) {
    let path = fixture_path(SMOLLM2_GGUF).expect("fixture checked by the caller");
    let ckpt = open_checkpoint(&path).unwrap_or_else(|e| panic!("{}", e.message));
    let cache = parse_kv_cache(spec).unwrap();
    let m = Model::load_with(&ckpt, backend, cache).unwrap_or_else(|e| panic!("{}", e.message));
    let vocab = m.config.vocab_size;
    let mut past = m.empty_cache();
    let mut seq = prompt.to_vec();
    let mut first = Vec::new();
    for step in 0..n {
        let start = if step == 0 { 0 } else { seq.len() - 1 };
        let l = m
            .forward_cached(&seq[start..], &mut past)
            .expect("forward pass");
        let l = l.as_f32().expect("f32");
        if step == 0 {
            first = l.to_vec();
        }
        let last = &l[l.len() - vocab..];
        let next = (0..vocab)
            .max_by(|&a, &b| last[a].total_cmp(&last[b]))
            .expect("non-empty") as u32;
        seq.push(next);
    }
    assert_eq!(past.len(), seq.len() - 1);
    (seq[prompt.len()..].to_vec(), first)
}

/// With an fp32 KV cache, the prefill's logits are transformers' and greedy
/// decoding gives transformers' tokens; a q8 cache (9 bits per value) keeps
/// the first tokens, and the 4-bit formats run and stay close at the start.
#[test]
fn cached_generation_matches_transformers() {
    if model().is_none() {
        return;
    }
    let g = json("greedy.json");
    let prompt = ids(&g["prompt_ids"]);
    let want = ids(&g["new_ids"]);
    let (got, _) = greedy_cached("fp32", &prompt, want.len());
    assert_eq!(
        got, want,
        "cached greedy continuation differs from transformers'"
    );
    let p = &json("prompts.json")[0];
    let (_, first) = greedy_cached("fp32", &ids(&p["ids"]), 1);
    let (_, want_logits) = read_f32_npy(&reference("logits_0.npy")).expect("reference logits");
    let diff = first
        .iter()
        .zip(&want_logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        diff <= 2e-3,
        "prefill logits differ from transformers' by {diff:.3e}"
    );
    let (q8, _) = greedy_cached("q8", &prompt, 4);
    assert_eq!(q8, want[..4], "q8 cache");
    for spec in ["nf4", "k=q8,v=q4"] {
        let (got, _) = greedy_cached(spec, &prompt, 2);
        assert_eq!(got[0], want[0], "{spec} cache: first token");
    }
}

/// On wgpu (lavapipe in CI) the cache stays in device memory between
/// steps and the fused graph attends over it with `kv_attention`: the q8
/// cache gives transformers' first tokens there too.
#[test]
fn cached_generation_on_wgpu_matches_transformers() {
    if model().is_none() {
        return;
    }
    if !Backend::Wgpu.available() {
        assert!(
            std::env::var_os("CARAMBA_REQUIRE_GPU").is_none(),
            "no wgpu adapter and CARAMBA_REQUIRE_GPU is set"
        );
        eprintln!("*** SKIPPED: no wgpu adapter ***");
        return;
    }
    let g = json("greedy.json");
    let want = ids(&g["new_ids"]);
    let (got, _) = greedy_cached_on(Backend::Wgpu, "q8", &ids(&g["prompt_ids"]), 4);
    assert_eq!(got, want[..4], "q8 cache on wgpu");
}

#[test]
fn perplexity_on_kjv_matches_transformers() {
    let Some(m) = model() else { return };
    let p = json("perplexity.json");
    let tokens = ids(&p["ids"]);
    let want = p["perplexity"].as_f64().expect("perplexity");
    let vocab = m.config.vocab_size;
    let l = m.logits(&tokens).expect("forward pass");
    let l = l.as_f32().expect("f32");
    let nll: f64 = (0..tokens.len() - 1)
        .map(|i| nll_of(&l[i * vocab..(i + 1) * vocab], tokens[i + 1] as usize))
        .sum();
    let ppl = (nll / (tokens.len() - 1) as f64).exp();
    println!("perplexity: ours {ppl:.6}, transformers {want:.6}");
    assert!(
        (ppl / want - 1.0).abs() < 0.005,
        "perplexity {ppl} differs from transformers' {want} by more than 0.5%"
    );
}

/// `caramba convert` writes a Hugging Face directory whose weights give the
/// same logits as the GGUF, and whose tokenizer.json encodes like
/// transformers' tokenizer for that GGUF (the KJV reference ids and the edge
/// cases) and decodes back to the text.
#[test]
fn converted_directory_matches_the_gguf_and_transformers() {
    let Some(m) = model() else { return };
    let gguf = fixture_path(SMOLLM2_GGUF).expect("fixture present when model() is");
    let out = std::env::temp_dir().join(format!("caramba-convert-{}", std::process::id()));
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_caramba"))
        .args(["convert", gguf.to_str().unwrap(), out.to_str().unwrap()])
        .status()
        .expect("caramba runs");
    assert!(status.success(), "caramba convert failed");

    let ckpt = open_checkpoint(&out).unwrap_or_else(|e| panic!("{}", e.message));
    let converted = Model::load(&ckpt).unwrap_or_else(|e| panic!("{}", e.message));
    let ids = [504u32, 3575, 282, 4649, 314];
    let a = m.logits(&ids).unwrap();
    let b = converted.logits(&ids).unwrap();
    assert_eq!(
        a.max_abs_diff(&b),
        0.0,
        "converted weights give different logits"
    );

    let tok =
        caramba::model::tokenizer_for(&ckpt, None).unwrap_or_else(|e| panic!("{}", e.message));
    let cases = json("tokenizer_cases.json");
    for c in cases.as_array().expect("cases") {
        let text = c["text"].as_str().expect("text");
        assert_eq!(
            tok.encode(text, false),
            ids_of(&c["ids"]),
            "encoding of {text:?}"
        );
        assert_eq!(tok.decode(&ids_of(&c["ids"])), text, "decoding of {text:?}");
    }
    let meta = json("tokenizer_kjv.json");
    let n_verses = meta["n_verses"].as_u64().expect("n_verses") as usize;
    let kjv = std::fs::read_to_string(
        caramba_runtime::checkpoint::testing::fixture_path("kjv.jsonl").expect("kjv fixture"),
    )
    .expect("kjv readable");
    let text = kjv
        .lines()
        .take(n_verses)
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("jsonl")["text"]
                .as_str()
                .expect("text")
                .to_string()
        })
        .collect::<Vec<_>>()
        .join(" ");
    let want = caramba_runtime::data::NpyTokens::open(&reference("tokenizer_kjv.npy"))
        .expect("reference ids")
        .to_vec();
    let got = tok.encode(&text, false);
    assert_eq!(got.len(), want.len(), "KJV token count");
    assert!(got == want, "KJV encoding differs from transformers'");
    assert_eq!(tok.decode(&got), text, "KJV round trip");
    let _ = std::fs::remove_dir_all(&out);
}

fn ids_of(v: &Value) -> Vec<u32> {
    ids(v)
}
