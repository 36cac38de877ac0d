//! GGUF → Hugging Face directory: `config.json` and an f32
//! `model.safetensors` with Hugging Face names and Q/K rows in Hugging Face
//! order, plus an optional `tokenizer.json` supplied by the caller.
//!
//! Every file is written atomically (temporary sibling, then rename). Tensors
//! are dequantized one at a time, so memory stays near one tensor's size.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::config::HfConfig;
use super::gguf::Gguf;
use super::names::gguf_to_hf_name;
use super::safetensors::{write_atomically, write_f32_safetensors};
use super::CheckpointError;

/// What [`convert_gguf_to_hf`] wrote.
#[derive(Clone, Debug)]
pub struct ConvertOutput {
    pub config: HfConfig,
    /// The files written, in order: config.json, model.safetensors and,
    /// when given, tokenizer.json.
    pub files: Vec<PathBuf>,
    /// Number of tensors in model.safetensors.
    pub n_tensors: usize,
    /// GGUF tensors with no Hugging Face counterpart, left out.
    pub skipped: Vec<String>,
}

/// Converts the GGUF file at `gguf_path` into a Hugging Face directory
/// `out_dir` (created if needed).
///
/// `tokenizer_json` is the hook for the tokenizer: the CLI builds it from
/// [`Gguf::tokenizer_meta`] with the tokenizer module and passes the text
/// here, to be written atomically as `out_dir/tokenizer.json`. With `None`
/// no tokenizer file is written.
pub fn convert_gguf_to_hf(
    gguf_path: &Path,
    out_dir: &Path,
    tokenizer_json: Option<&str>,
) -> Result<ConvertOutput, CheckpointError> {
    let gguf = Gguf::open(gguf_path)?;
    let config = gguf.hf_config()?;

    let mut tensors = Vec::new(); // (hf name, hf shape)
    let mut skipped = Vec::new();
    for info in gguf.tensors() {
        match gguf_to_hf_name(&info.name) {
            Some(hf) => tensors.push((hf, info.shape())),
            None => skipped.push(info.name.clone()),
        }
    }
    // Fail on an unreadable tensor before writing anything.
    for info in gguf.tensors() {
        if gguf_to_hf_name(&info.name).is_some() && !info.ty.is_supported() {
            return Err(CheckpointError::UnsupportedTensorType {
                path: gguf_path.to_path_buf(),
                tensor: info.name.clone(),
                found: info.ty.to_string(),
                supported: super::dequant::SUPPORTED_TYPES,
            });
        }
    }

    std::fs::create_dir_all(out_dir).map_err(|e| CheckpointError::io(out_dir, e))?;
    let config_path = out_dir.join("config.json");
    let model_path = out_dir.join("model.safetensors");

    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    write_f32_safetensors(&model_path, &tensors, &metadata, |i| {
        gguf.hf_tensor_f32(&tensors[i].0, &config)
            .map(|(_, data)| data)
    })?;
    write_text(&config_path, &config.to_json_pretty())?;
    let mut files = vec![config_path, model_path];
    if let Some(text) = tokenizer_json {
        let path = out_dir.join("tokenizer.json");
        write_text(&path, text)?;
        files.push(path);
    }
    Ok(ConvertOutput {
        config,
        files,
        n_tensors: tensors.len(),
        skipped,
    })
}

/// Writes a text file atomically.
pub fn write_text(path: &Path, text: &str) -> Result<(), CheckpointError> {
    write_atomically(path, |out| {
        out.write_all(text.as_bytes())?;
        out.write_all(b"\n")?;
        Ok(())
    })
}
