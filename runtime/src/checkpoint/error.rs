//! The one error type of the checkpoint module. Every variant names the file,
//! and where it applies the tensor or metadata key, what was expected and what
//! was found, so the CLI can print it as is.

use std::fmt;
use std::path::PathBuf;

/// Anything that can go wrong while opening, reading, validating or converting
/// a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "{path}: not a checkpoint; expected a Hugging Face directory (config.json + \
         model.safetensors or model.safetensors.index.json), a .safetensors file next to \
         its config.json, or a .gguf file"
    )]
    UnrecognizedPath { path: PathBuf },

    #[error("{path}: missing {what}")]
    MissingFile { path: PathBuf, what: String },

    #[error("{path}: invalid config: {message}")]
    Config { path: PathBuf, message: String },

    #[error("{path}: invalid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },

    #[error("{path}: not a GGUF file: expected magic \"GGUF\", found {found:?}")]
    BadMagic { path: PathBuf, found: Vec<u8> },

    #[error("{path}: unsupported GGUF version {version} (supported: 2, 3)")]
    UnsupportedGgufVersion { path: PathBuf, version: u32 },

    #[error(
        "{path}: truncated while reading {what}: needed {needed} bytes at offset {offset}, \
         but the file is {file_len} bytes"
    )]
    Truncated {
        path: PathBuf,
        what: String,
        offset: u64,
        needed: u64,
        file_len: u64,
    },

    #[error("{path}: damaged GGUF file: {message}")]
    Damaged { path: PathBuf, message: String },

    #[error("{path}: metadata key `{key}` is missing")]
    MissingMetadata { path: PathBuf, key: String },

    #[error("{path}: metadata key `{key}`: expected {expected}, found {found}")]
    BadMetadata {
        path: PathBuf,
        key: String,
        expected: String,
        found: String,
    },

    #[error("{path}: unsupported model: {message}")]
    UnsupportedModel { path: PathBuf, message: String },

    #[error("{path}: no tensor named `{tensor}`")]
    TensorNotFound { path: PathBuf, tensor: String },

    #[error(
        "{path}: tensor `{tensor}` has type {found}, which is not supported \
         (supported: {supported})"
    )]
    UnsupportedTensorType {
        path: PathBuf,
        tensor: String,
        found: String,
        supported: &'static str,
    },

    #[error(
        "{path}: tensor `{tensor}`: data [{start}, {end}) lies past the end of the data \
         ({available} bytes available)"
    )]
    TensorOutOfBounds {
        path: PathBuf,
        tensor: String,
        start: u64,
        end: u64,
        available: u64,
    },

    #[error("{path}: tensor `{tensor}` has shape {shape:?}: {expected}")]
    BadShape {
        path: PathBuf,
        tensor: String,
        shape: Vec<usize>,
        expected: String,
    },

    #[error("{path}: checkpoint does not match the model:\n{report}")]
    Mismatch {
        path: PathBuf,
        report: ValidationReport,
    },
}

impl CheckpointError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CheckpointError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Every way a checkpoint failed to match the tensors a model graph expects,
/// collected at once so the user fixes them in one go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ValidationReport {
    /// Tensors the model expects that the checkpoint lacks: (name, expected shape).
    pub missing: Vec<(String, Vec<usize>)>,
    /// Tensors present with another shape: (name, expected, found).
    pub shape_mismatches: Vec<(String, Vec<usize>, Vec<usize>)>,
    /// Tensors in the checkpoint the model does not use (not an error by itself).
    pub unused: Vec<String>,
}

impl ValidationReport {
    /// True when nothing is missing and every shape matches.
    pub fn is_ok(&self) -> bool {
        self.missing.is_empty() && self.shape_mismatches.is_empty()
    }
}

impl fmt::Display for ValidationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, shape) in &self.missing {
            writeln!(f, "  missing tensor `{name}` (expected shape {shape:?})")?;
        }
        for (name, expected, found) in &self.shape_mismatches {
            writeln!(
                f,
                "  tensor `{name}`: expected shape {expected:?}, found {found:?}"
            )?;
        }
        if !self.unused.is_empty() {
            writeln!(
                f,
                "  ({} tensor(s) in the checkpoint are not used by the model)",
                self.unused.len()
            )?;
        }
        Ok(())
    }
}
