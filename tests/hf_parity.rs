//! End-to-end parity with Hugging Face transformers on a real checkpoint:
//! SmolLM2-135M-Instruct (GGUF, Q4_1-dequantized weights) on the CPU
//! reference backend against logits, greedy tokens and perplexity that
//! `scripts/hf_reference.py` dumped from transformers (tests/data/hf_reference/).
//!
//! Needs the fixture (`scripts/fixtures.sh`); without it each test says
//! SKIPPED loudly (and fails when CARAMBA_REQUIRE_FIXTURES is set, as in CI).

use caramba::commands::perplexity::nll_of;
use caramba::model::{open_checkpoint, Model};
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
