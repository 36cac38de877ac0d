//! `caramba convert`: GGUF → Hugging Face directory.

use super::{CmdResult, Failure};
use crate::cli::ConvertArgs;
use caramba_runtime::checkpoint::{convert_gguf_to_hf, Gguf};
use caramba_runtime::tokenizer::{tokenizer_json_from_gguf, GgufTokenizerOptions};

pub fn convert(a: &ConvertArgs) -> CmdResult {
    if !a.gguf.exists() {
        return Err(Failure::usage(format!(
            "{} does not exist",
            a.gguf.display()
        )));
    }
    let gguf = Gguf::open(&a.gguf).map_err(|e| Failure::usage(e.to_string()))?;
    let tokenizer = if gguf.has_tokenizer() {
        let meta = gguf
            .tokenizer_meta()
            .map_err(|e| Failure::runtime(e.to_string()))?;
        Some(
            tokenizer_json_from_gguf(&meta, &GgufTokenizerOptions::default())
                .map_err(|e| Failure::runtime(e.to_string()))?,
        )
    } else {
        eprintln!(
            "note: {} has no tokenizer metadata; no tokenizer.json written",
            a.gguf.display()
        );
        None
    };
    drop(gguf);
    std::fs::create_dir_all(&a.out_dir)
        .map_err(|e| Failure::runtime(format!("cannot create {}: {e}", a.out_dir.display())))?;
    let out = convert_gguf_to_hf(&a.gguf, &a.out_dir, tokenizer.as_deref())
        .map_err(|e| Failure::runtime(e.to_string()))?;
    println!("wrote {} tensors to {}", out.n_tensors, a.out_dir.display());
    for f in &out.files {
        println!("  {}", f.display());
    }
    if !out.skipped.is_empty() {
        println!("skipped (no Hugging Face name): {}", out.skipped.join(", "));
    }
    Ok(())
}
