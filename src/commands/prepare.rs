//! `caramba prepare`: tokenize a corpus into a `.npy` of token ids.

use super::{CmdResult, Failure};
use crate::cli::PrepareArgs;
use caramba_runtime::data::{prepare_with, PrepareOptions};
use caramba_runtime::tokenizer::Tokenizer;

pub fn prepare(a: &PrepareArgs) -> CmdResult {
    let tok = Tokenizer::from_file(&a.tokenizer).map_err(|e| {
        Failure::usage(format!(
            "cannot load tokenizer {}: {e}",
            a.tokenizer.display()
        ))
    })?;
    if !a.input.exists() {
        return Err(Failure::usage(format!(
            "{} does not exist",
            a.input.display()
        )));
    }
    let opts = PrepareOptions {
        field: a.field.clone(),
        progress: !a.quiet,
    };
    let s = prepare_with(&tok, &a.input, &a.output, &opts)
        .map_err(|e| Failure::usage(e.to_string()))?;
    println!(
        "wrote {} tokens from {} document(s) ({} bytes) to {} as {}{}",
        s.tokens,
        s.documents,
        s.input_bytes,
        a.output.display(),
        s.dtype.descr(),
        s.eos_separator
            .map(|e| format!(", documents separated by EOS {e}"))
            .unwrap_or_default()
    );
    Ok(())
}
