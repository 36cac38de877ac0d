//! `caramba perplexity`: mean next-token NLL of a checkpoint on a corpus.

use super::{backend_for, CmdResult, Failure};
use crate::cli::PerplexityArgs;
use crate::model::{open_checkpoint, tokenizer_for, Model};
use caramba_runtime::backend::Backend;
use caramba_runtime::data::NpyTokens;

pub fn perplexity(a: &PerplexityArgs) -> CmdResult {
    let backend = backend_for(a.device)?;
    if a.block_size < 2 {
        return Err(Failure::usage("--block-size must be at least 2"));
    }
    let ckpt = open_checkpoint(&a.ckpt)?;
    let mut tokens: Vec<u32> = match (&a.text, &a.data) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Failure::usage(format!("cannot read {}: {e}", path.display())))?;
            tokenizer_for(&ckpt, a.tokenizer.as_deref())?.encode(&text, false)
        }
        (None, Some(path)) => NpyTokens::open(path)
            .map_err(|e| Failure::usage(e.to_string()))?
            .to_vec(),
        (None, None) => return Err(Failure::usage("give --text <file> or --data <tokens.npy>")),
    };
    if let Some(n) = a.max_tokens {
        tokens.truncate(n);
    }
    if tokens.len() < 2 {
        return Err(Failure::usage(format!(
            "need at least 2 tokens to score, found {}",
            tokens.len()
        )));
    }
    let gpu = caramba_runtime::gpu::GpuOptions {
        fast_matmul: a.tf32,
        gemm: a.gemm.into(),
        ..Default::default()
    };
    let model = Model::load_with_options(&ckpt, backend, None, gpu, a.dtype.into())?;
    let vocab = model.config.vocab_size;
    if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(Failure::usage(format!(
            "token id {bad} is outside the model's vocabulary of {vocab}"
        )));
    }
    // A device whose buffers are smaller than a window's logits would fail
    // half-way through the run.
    let longest = a.block_size.min(tokens.len());
    if let Some((need, max)) = logits_exceed_buffers(backend, longest, vocab) {
        let fits = model.largest_prefill().unwrap_or(1);
        return Err(Failure::usage(format!(
            "a window of {longest} tokens needs a {} logits buffer ({longest} × {vocab} \
             f32), larger than the largest buffer this {backend} device allocates ({}): \
             use --block-size {fits} or less, or another --device",
            mib(need),
            mib(max)
        )));
    }
    let (mut nll, mut count) = (0.0f64, 0usize);
    let windows: Vec<&[u32]> = tokens
        .chunks(a.block_size)
        .filter(|w| w.len() >= 2)
        .collect();
    let bar = crate::progress::bar(windows.len() as u64, "scoring");
    for w in &windows {
        let logits = model.logits(w)?;
        let l = logits.as_f32().expect("logits are f32");
        for i in 0..w.len() - 1 {
            nll += nll_of(&l[i * vocab..(i + 1) * vocab], w[i + 1] as usize);
            count += 1;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mean = nll / count as f64;
    println!(
        "tokens scored: {count} ({} window(s) of up to {} tokens)",
        windows.len(),
        a.block_size
    );
    println!("mean nll: {mean:.6}");
    println!("perplexity: {:.6}", mean.exp());
    Ok(())
}

/// `(needed, largest)` bytes when a window of `window` tokens has logits
/// (one f32 buffer of window × vocab values) larger than the largest buffer
/// `backend`'s device allocates (lavapipe: 128 MiB); `None` when they fit
/// or the device has no such limit.
pub fn logits_exceed_buffers(backend: Backend, window: usize, vocab: usize) -> Option<(u64, u64)> {
    let need = (window * vocab * 4) as u64;
    let max = backend.max_buffer_bytes()?;
    (need > max).then_some((need, max))
}

/// −log softmax(logits)[target], in f64.
pub fn nll_of(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let lse = logits
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    lse - logits[target] as f64
}

/// `bytes` in MiB, for messages.
fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64)
}
