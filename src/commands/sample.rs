//! `caramba sample`: generate a continuation from a checkpoint.
//!
//! The prompt runs through the model once (prefill), filling the KV cache;
//! each later step runs only the new token against the cache (decode). With
//! `--kv-cache none` every step recomputes the whole sequence instead, the
//! head and the last layer's row-wise work on the last position only
//! (`caramba_compiler::last_position`). A
//! prompt whose logits would not fit the device's largest buffer (lavapipe:
//! 128 MiB, 682 tokens of SmolLM2's vocabulary) is prefilled in chunks of
//! as many tokens as fit, each chunk over the cache of the ones before. Each
//! step takes the last position's logits and picks the next token: argmax at
//! temperature 0, else a draw from softmax(logits / T) restricted by top-k
//! and top-p.

use super::{backend_for, CmdResult, Failure};
use crate::cli::SampleArgs;
use crate::model::{open_checkpoint, tokenizer_for, Model};
use caramba_compiler::{CacheFormat, KvCacheSpec};
use caramba_runtime::rng::SplitMix64;
use std::io::Write;
use std::time::{Duration, Instant};

pub fn sample(a: &SampleArgs) -> CmdResult {
    let backend = backend_for(a.device)?;
    if a.temperature < 0.0 || !a.temperature.is_finite() {
        return Err(Failure::usage(format!(
            "--temperature must be a non-negative number, got {}",
            a.temperature
        )));
    }
    if let Some(p) = a.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(Failure::usage(format!(
                "--top-p must be in (0, 1], got {p}"
            )));
        }
    }
    if a.top_k == Some(0) {
        return Err(Failure::usage("--top-k must be at least 1"));
    }
    if a.prefill_chunk == Some(0) {
        return Err(Failure::usage("--prefill-chunk must be at least 1"));
    }
    let cache = parse_kv_cache(&a.kv_cache).map_err(Failure::usage)?;
    if cache.is_none() && a.prefill_chunk.is_some() {
        return Err(Failure::usage(
            "--prefill-chunk needs a KV cache (each chunk attends to the ones before); drop `--kv-cache none`",
        ));
    }
    let ckpt = open_checkpoint(&a.ckpt)?;
    let tok = tokenizer_for(&ckpt, a.tokenizer.as_deref())?;
    let gpu = caramba_runtime::gpu::GpuOptions {
        fast_matmul: a.tf32,
        gemm: a.gemm.into(),
        profile: a.profile,
        ..Default::default()
    };
    // Without a cache each token reruns the sequence: only the last
    // position's logits are computed, unless the prompt's are dumped.
    let model = if a.dump_logits.is_some() {
        Model::load_with_options(&ckpt, backend, cache, gpu, a.dtype.into())?
    } else {
        Model::load_for_generation(&ckpt, backend, cache, gpu, a.dtype.into())?
    };
    let mut ids = tok.encode(&a.prompt, false);
    if a.bos {
        let bos = tok
            .bos_id()
            .ok_or_else(|| Failure::usage("--bos: this tokenizer has no BOS token"))?;
        ids.insert(0, bos);
    }
    if ids.is_empty() {
        return Err(Failure::usage(
            "the prompt is empty after tokenization; give a non-empty --prompt or --bos",
        ));
    }
    let prompt_len = ids.len();
    let vocab = model.config.vocab_size;
    let mut rng = SplitMix64::new(a.seed);
    let mut out = std::io::stdout();
    let _ = write!(out, "{}", a.prompt);
    let mut new_ids = Vec::new();
    let mut past = model.empty_cache();
    past.reserve(prompt_len + a.max_new_tokens);
    let (mut prefill, mut decode) = (Duration::ZERO, Duration::ZERO);
    for step in 0..a.max_new_tokens {
        let timer = Instant::now();
        let logits = if cache.is_none() && step == 0 && a.dump_logits.is_some() {
            model.logits(&ids)?
        } else if cache.is_none() {
            model.next_logits(&ids)?
        } else if step == 0 {
            let chunk = a.prefill_chunk.or_else(|| model.largest_prefill());
            model.prefill(&ids, &mut past, chunk, a.dump_logits.is_some())?
        } else {
            model.forward_cached(&ids[ids.len() - 1..], &mut past)?
        };
        let all = logits.as_f32().expect("logits are f32");
        if step == 0 {
            prefill = timer.elapsed();
            if let Some(path) = &a.dump_logits {
                caramba_runtime::data::write_f32_npy(
                    path,
                    &[prompt_len, vocab],
                    &all[..prompt_len * vocab],
                )
                .map_err(|e| Failure::runtime(format!("cannot write {}: {e}", path.display())))?;
            }
        } else {
            decode += timer.elapsed();
        }
        let last = &all[all.len() - vocab..];
        let next = pick(last, a.temperature, a.top_k, a.top_p, &mut rng);
        ids.push(next);
        new_ids.push(next);
        // Print the text as it grows: decode everything new, print the suffix.
        let _ = write!(out, "{}", incremental(&tok, &new_ids));
        let _ = out.flush();
        if a.stop_at_eos && Some(next) == tok.eos_id() {
            break;
        }
    }
    let _ = writeln!(out);
    if a.stats {
        let steps = new_ids.len().saturating_sub(1);
        eprintln!(
            "prefill: {prompt_len} tokens in {:.1} ms ({:.0} tokens/s) on {}",
            prefill.as_secs_f64() * 1e3,
            prompt_len as f64 / prefill.as_secs_f64(),
            model.backend()
        );
        if steps > 0 {
            eprintln!(
                "decode: {steps} tokens in {:.1} ms ({:.1} tokens/s)",
                decode.as_secs_f64() * 1e3,
                steps as f64 / decode.as_secs_f64()
            );
        }
        match cache {
            Some(_) => eprintln!(
                "KV cache ({}): {:.0} bytes/token, {:.1} KiB for {} tokens",
                a.kv_cache,
                model.cache_bytes_per_token(),
                model.cache_bytes_per_token() * ids.len() as f64 / 1024.0,
                ids.len()
            ),
            None => eprintln!("KV cache: none (every step recomputes the sequence)"),
        }
    }
    if a.profile {
        let rows = model.profile();
        let total: f64 = rows.iter().map(|r| r.secs).sum();
        let host: f64 = rows.iter().map(|r| r.host_secs).sum();
        eprintln!(
            "profile: {:.1} ms waited on {} launches, {:.1} ms of it in launch calls on the host",
            total * 1e3,
            rows.iter().map(|r| r.launches).sum::<usize>(),
            host * 1e3
        );
        for r in rows.iter().take(15) {
            eprintln!(
                "  {:>9.2} ms {:>5.1}% {:>6}×  {:>7.1} µs each ({:>7.1} µs host)  {}",
                r.secs * 1e3,
                100.0 * r.secs / total.max(1e-12),
                r.launches,
                r.secs * 1e6 / r.launches as f64,
                r.host_secs * 1e6 / r.launches as f64,
                r.op
            );
        }
    }
    if a.ids {
        let _ = writeln!(out, "prompt ids: {:?}", &ids[..prompt_len]);
        let _ = writeln!(out, "new ids: {new_ids:?}");
    }
    Ok(())
}

/// Reads `--kv-cache`: `none`, one format for every path, or
/// `path=format` pairs (paths `k`, `k_sem`, `k_geo`, `v`; others fp32).
pub fn parse_kv_cache(s: &str) -> Result<Option<KvCacheSpec>, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let format = |f: &str| {
        CacheFormat::parse(f.trim()).ok_or_else(|| {
            format!("--kv-cache: unknown format {f:?} (expected fp32, fp16, q8, q4 or nf4)")
        })
    };
    if !s.contains('=') {
        return Ok(Some(KvCacheSpec::uniform(format(s)?)));
    }
    let mut spec = KvCacheSpec::uniform(CacheFormat::Fp32);
    for pair in s.split(',') {
        let (path, f) = pair
            .split_once('=')
            .ok_or_else(|| format!("--kv-cache: expected path=format, got {pair:?}"))?;
        let f = format(f)?;
        match path.trim() {
            "k" => spec.k = f,
            "k_sem" => spec.k_sem = f,
            "k_geo" => spec.k_geo = f,
            "v" => spec.v = f,
            other => {
                return Err(format!(
                    "--kv-cache: unknown path {other:?} (expected k, k_sem, k_geo or v)"
                ))
            }
        }
    }
    Ok(Some(spec))
}

/// The text the last token adds (decoding the whole continuation keeps
/// multi-byte characters split across tokens intact).
fn incremental(tok: &caramba_runtime::tokenizer::Tokenizer, new_ids: &[u32]) -> String {
    let before = tok.decode(&new_ids[..new_ids.len() - 1]);
    let now = tok.decode(new_ids);
    match now.strip_prefix(&before) {
        Some(s) => s.to_string(),
        None => String::new(),
    }
}

/// Picks the next token from one position's logits.
pub fn pick(
    logits: &[f32],
    temperature: f64,
    top_k: Option<usize>,
    top_p: Option<f64>,
    rng: &mut SplitMix64,
) -> u32 {
    let argmax = || {
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        best as u32
    };
    if temperature == 0.0 {
        return argmax();
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if let Some(k) = top_k {
        idx.truncate(k.max(1));
    }
    let max = logits[idx[0]] as f64;
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / temperature).exp())
        .collect();
    let sum: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    if let Some(p) = top_p {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, q) in probs.iter().enumerate() {
            acc += q;
            if acc >= p {
                keep = i + 1;
                break;
            }
        }
        idx.truncate(keep);
        probs.truncate(keep);
        let s: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= s);
    }
    let mut u = rng.next_f64();
    for (i, q) in probs.iter().enumerate() {
        if u < *q {
            return idx[i] as u32;
        }
        u -= q;
    }
    idx[probs.len() - 1] as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_cache_specs() {
        use caramba_ir::QuantFormat;
        assert_eq!(parse_kv_cache("none").unwrap(), None);
        assert_eq!(
            parse_kv_cache("Q8").unwrap(),
            Some(KvCacheSpec::uniform(CacheFormat::Quant(QuantFormat::Q8)))
        );
        let s = parse_kv_cache("k_sem=q8, k_geo=nf4,v=fp16")
            .unwrap()
            .unwrap();
        assert_eq!(s.k, CacheFormat::Fp32);
        assert_eq!(s.k_sem, CacheFormat::Quant(QuantFormat::Q8));
        assert_eq!(s.k_geo, CacheFormat::Quant(QuantFormat::Nf4));
        assert_eq!(s.v, CacheFormat::Fp16);
        for bad in ["int8", "k=q8,x=fp16", "k:q8", "k=q3"] {
            let e = parse_kv_cache(bad).unwrap_err();
            assert!(e.starts_with("--kv-cache"), "{e}");
        }
    }

    #[test]
    fn greedy_and_restricted_sampling() {
        let logits = [0.0f32, 3.0, 1.0, 2.0];
        let mut rng = SplitMix64::new(1);
        assert_eq!(pick(&logits, 0.0, None, None, &mut rng), 1);
        // top-k 1 is greedy whatever the temperature.
        for _ in 0..20 {
            assert_eq!(pick(&logits, 5.0, Some(1), None, &mut rng), 1);
        }
        // top-k 2 only ever yields the two best.
        for _ in 0..50 {
            let t = pick(&logits, 1.0, Some(2), None, &mut rng);
            assert!(t == 1 || t == 3);
        }
        // A tiny top-p keeps only the best.
        for _ in 0..20 {
            assert_eq!(pick(&logits, 1.0, None, Some(0.01), &mut rng), 1);
        }
    }
}
