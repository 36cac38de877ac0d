//! Checkpoint readers and writers: Hugging Face directories (config.json +
//! safetensors), GGUF files, conversion between them.
//!
//! [`Checkpoint::open`] accepts
//! - a Hugging Face directory: `config.json` with `model.safetensors`, or with
//!   a sharded `model.safetensors.index.json`;
//! - a `.safetensors` file (or `*.index.json`) next to its `config.json`;
//! - a `.gguf` file (llama.cpp, versions 2 and 3, `llama` architecture).
//!
//! Whatever the source, tensors are addressed by their Hugging Face Llama
//! names and come back as row-major f32 with Hugging Face shapes; GGUF Q/K
//! projections have llama.cpp's row permutation undone.
//!
//! Supported element types: safetensors F32, F16, BF16; GGUF F32, F16, BF16,
//! Q8_0, Q4_0, Q4_1. Unsupported (an error naming the tensor and type): the
//! other GGUF quantizations (Q5_0, Q5_1, Q8_1, K-quants, IQ*, TQ*, MXFP4),
//! integer tensors, F64, and non-float safetensors dtypes.
//!
//! Pipeline position: this module ends at named f32 tensors and an
//! [`HfConfig`]; binding them to graph parameters is the caller's job, helped
//! by [`Checkpoint::validate`].

// `x % n == 0` rather than `is_multiple_of` (Rust 1.87): the workspace
// declares rust-version 1.85.
#![allow(clippy::manual_is_multiple_of)]

mod config;
mod convert;
mod dequant;
mod error;
mod gguf;
mod names;
mod safetensors;
#[doc(hidden)]
pub mod testing;
mod validate;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

pub use self::config::{HfConfig, RopeScaling, TokenIds};
pub use self::convert::{convert_gguf_to_hf, write_text, ConvertOutput};
pub use self::dequant::{GgmlType, SUPPORTED_TYPES as GGUF_SUPPORTED_TYPES};
pub use self::error::{CheckpointError, ValidationReport};
pub use self::gguf::{Gguf, GgufTensorInfo, GgufValue};
pub use self::names::{gguf_to_hf_name, hf_to_gguf_name, permute_rows, unpermute_rows};
pub use self::safetensors::{write_f32_safetensors, SafetensorsStore};
pub use self::validate::{compare_shapes, llama_tensor_shapes};
pub use crate::tokenizer::gguf_meta::GgufTokenizerMeta;

/// Which kind of file the tensors come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointFormat {
    Safetensors,
    Gguf,
}

enum Source {
    Safetensors(SafetensorsStore),
    Gguf {
        gguf: Gguf,
        /// Hugging Face names of the GGUF tensors that have one, sorted.
        names: Vec<String>,
    },
}

/// An open checkpoint: its config, and its tensors by Hugging Face name.
pub struct Checkpoint {
    pub config: HfConfig,
    /// For GGUF files that carry one, the tokenizer description
    /// (`tokenizer.ggml.*`); `None` for safetensors checkpoints.
    pub tokenizer: Option<GgufTokenizerMeta>,
    path: PathBuf,
    source: Source,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("format", &self.format())
            .field("config", &self.config)
            .finish()
    }
}

impl Checkpoint {
    /// Opens a Hugging Face directory, a `.safetensors` file next to its
    /// `config.json`, or a `.gguf` file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, CheckpointError> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| CheckpointError::io(path, e))?;
        if meta.is_dir() {
            return Self::open_hf_dir(path);
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.ends_with(".gguf") || has_gguf_magic(path) {
            return Self::open_gguf(path);
        }
        if name.ends_with(".safetensors") || name.ends_with(".safetensors.index.json") {
            let dir = path.parent().unwrap_or(Path::new("."));
            let config = read_config(dir, path)?;
            let store = if name.ends_with(".json") {
                SafetensorsStore::open_index(path)?
            } else {
                SafetensorsStore::open_file(path)?
            };
            return Ok(Self::from_store(path, config, store));
        }
        Err(CheckpointError::UnrecognizedPath {
            path: path.to_path_buf(),
        })
    }

    fn open_hf_dir(dir: &Path) -> Result<Self, CheckpointError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let store = if single.is_file() {
            SafetensorsStore::open_file(&single)?
        } else if index.is_file() {
            SafetensorsStore::open_index(&index)?
        } else {
            return Err(CheckpointError::MissingFile {
                path: dir.to_path_buf(),
                what: "model.safetensors or model.safetensors.index.json".into(),
            });
        };
        let config = read_config(dir, dir)?;
        Ok(Self::from_store(dir, config, store))
    }

    fn from_store(path: &Path, config: HfConfig, store: SafetensorsStore) -> Self {
        Checkpoint {
            config,
            tokenizer: None,
            path: path.to_path_buf(),
            source: Source::Safetensors(store),
        }
    }

    fn open_gguf(path: &Path) -> Result<Self, CheckpointError> {
        let gguf = Gguf::open(path)?;
        let config = gguf.hf_config()?;
        let tokenizer = if gguf.has_tokenizer() {
            Some(gguf.tokenizer_meta()?)
        } else {
            None
        };
        let mut names: Vec<String> = gguf
            .tensors()
            .iter()
            .filter_map(|t| gguf_to_hf_name(&t.name))
            .collect();
        names.sort();
        Ok(Checkpoint {
            config,
            tokenizer,
            path: path.to_path_buf(),
            source: Source::Gguf { gguf, names },
        })
    }

    /// The path given to [`Checkpoint::open`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn format(&self) -> CheckpointFormat {
        match self.source {
            Source::Safetensors(_) => CheckpointFormat::Safetensors,
            Source::Gguf { .. } => CheckpointFormat::Gguf,
        }
    }

    /// The underlying GGUF file, for raw metadata and tensor records.
    pub fn gguf(&self) -> Option<&Gguf> {
        match &self.source {
            Source::Gguf { gguf, .. } => Some(gguf),
            Source::Safetensors(_) => None,
        }
    }

    /// Hugging Face names of all tensors, sorted. GGUF tensors without a
    /// Hugging Face counterpart (e.g. `rope_freqs.weight`) are not listed.
    pub fn names(&self) -> Vec<String> {
        match &self.source {
            Source::Safetensors(s) => s.names(),
            Source::Gguf { names, .. } => names.clone(),
        }
    }

    /// A tensor's row-major shape, or `None` when absent.
    pub fn shape(&self, hf_name: &str) -> Option<Vec<usize>> {
        match &self.source {
            Source::Safetensors(s) => s.shape(hf_name),
            Source::Gguf { gguf, .. } => gguf
                .tensor_info(&hf_to_gguf_name(hf_name)?)
                .map(|t| t.shape()),
        }
    }

    /// A tensor by Hugging Face name, converted to f32: (shape, row-major data).
    pub fn tensor_f32(&self, hf_name: &str) -> Result<(Vec<usize>, Vec<f32>), CheckpointError> {
        match &self.source {
            Source::Safetensors(s) => s.tensor_f32(hf_name).map_err(|e| match e {
                CheckpointError::TensorNotFound { tensor, .. } => CheckpointError::TensorNotFound {
                    path: self.path.clone(),
                    tensor,
                },
                other => other,
            }),
            Source::Gguf { gguf, .. } => gguf.hf_tensor_f32(hf_name, &self.config),
        }
    }

    /// Checks that every `(name, shape)` the model expects is present with
    /// that shape. On success returns the report (listing unused tensors);
    /// otherwise an error listing every missing tensor and mismatch at once.
    pub fn validate<I, S, D>(&self, expected: I) -> Result<ValidationReport, CheckpointError>
    where
        I: IntoIterator<Item = (S, D)>,
        S: AsRef<str>,
        D: AsRef<[usize]>,
    {
        let report = compare_shapes(expected, &self.names(), |n| self.shape(n));
        if report.is_ok() {
            Ok(report)
        } else {
            Err(CheckpointError::Mismatch {
                path: self.path.clone(),
                report,
            })
        }
    }
}

/// Reads `dir/config.json`; `for_path` is what the user asked to open.
fn read_config(dir: &Path, for_path: &Path) -> Result<HfConfig, CheckpointError> {
    let config = dir.join("config.json");
    if !config.is_file() {
        return Err(CheckpointError::MissingFile {
            path: for_path.to_path_buf(),
            what: format!("{} (the model's Hugging Face config)", config.display()),
        });
    }
    HfConfig::from_file(&config)
}

fn has_gguf_magic(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}
