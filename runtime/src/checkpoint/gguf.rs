//! A reader for llama.cpp's GGUF files (versions 2 and 3).
//!
//! Layout: magic `GGUF`, version (u32), tensor count (u64), metadata count
//! (u64); then the metadata key/value pairs; then one info record per tensor
//! (name, dims innermost first, ggml type, offset into the data section);
//! then padding to `general.alignment` (default 32) and the data section.
//!
//! The file is memory-mapped and every offset is bounds-checked when the file
//! is opened, so a truncated or damaged file is an error naming what was being
//! read, never a panic. This module stops at raw tensors, metadata, and the
//! Hugging Face view of them (`hf_config`, `hf_tensor_f32`, `tokenizer_meta`);
//! choosing between GGUF and safetensors is `Checkpoint`'s job.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::config::{HfConfig, RopeScaling, TokenIds};
use super::dequant::{dequantize, GgmlType, SUPPORTED_TYPES};
use super::names::{hf_to_gguf_name, permutation_of, unpermute_rows, Permuted};
use super::CheckpointError;
use crate::tokenizer::gguf_meta::GgufTokenizerMeta;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// The value as an integer, whatever its integer width; `None` otherwise.
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            GgufValue::U8(v) => v as i64,
            GgufValue::I8(v) => v as i64,
            GgufValue::U16(v) => v as i64,
            GgufValue::I16(v) => v as i64,
            GgufValue::U32(v) => v as i64,
            GgufValue::I32(v) => v as i64,
            GgufValue::U64(v) => i64::try_from(v).ok()?,
            GgufValue::I64(v) => v,
            _ => return None,
        })
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            // Through the shortest decimal that round-trips, so an f32
            // `1e-5` reads as the f64 `1e-5` its writer meant, not
            // `9.999999747378752e-6`.
            GgufValue::F32(v) => v.to_string().parse().ok(),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            GgufValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A short description for error messages, e.g. `u32 7` or `array of 3`.
    pub fn describe(&self) -> String {
        match self {
            GgufValue::U8(v) => format!("u8 {v}"),
            GgufValue::I8(v) => format!("i8 {v}"),
            GgufValue::U16(v) => format!("u16 {v}"),
            GgufValue::I16(v) => format!("i16 {v}"),
            GgufValue::U32(v) => format!("u32 {v}"),
            GgufValue::I32(v) => format!("i32 {v}"),
            GgufValue::F32(v) => format!("f32 {v}"),
            GgufValue::Bool(v) => format!("bool {v}"),
            GgufValue::String(s) if s.len() > 40 => format!("a string of {} bytes", s.len()),
            GgufValue::String(s) => format!("string {s:?}"),
            GgufValue::Array(a) => format!("an array of {} values", a.len()),
            GgufValue::U64(v) => format!("u64 {v}"),
            GgufValue::I64(v) => format!("i64 {v}"),
            GgufValue::F64(v) => format!("f64 {v}"),
        }
    }
}

/// One tensor's record from the GGUF header.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// Dimensions as GGUF lists them: innermost (contiguous) first.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// Row-major shape as Hugging Face and PyTorch write it (`dims` reversed).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// An open, memory-mapped GGUF file.
pub struct Gguf {
    path: PathBuf,
    mmap: Mmap,
    pub version: u32,
    /// Metadata in file order.
    metadata: Vec<(String, GgufValue)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
    pub alignment: u64,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
}

impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gguf")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Gguf {
    /// Opens and memory-maps `path`, parses the header and checks every
    /// tensor's extent against the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, CheckpointError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| CheckpointError::io(&path, e))?;
        let len = file
            .metadata()
            .map_err(|e| CheckpointError::io(&path, e))?
            .len();
        if len < 4 {
            return Err(CheckpointError::Truncated {
                path,
                what: "the GGUF magic".into(),
                offset: 0,
                needed: 4,
                file_len: len,
            });
        }
        // SAFETY: the map is read-only; like every mmap-based model loader we
        // assume the file is not modified while it is open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| CheckpointError::io(&path, e))?;
        Self::parse(path, mmap)
    }

    fn parse(path: PathBuf, mmap: Mmap) -> Result<Self, CheckpointError> {
        let mut r = Reader {
            path: &path,
            bytes: &mmap,
            pos: 0,
        };
        let magic = r.take(4, "the GGUF magic")?;
        if magic != MAGIC {
            return Err(CheckpointError::BadMagic {
                path: path.clone(),
                found: magic.to_vec(),
            });
        }
        let version = r.u32("the GGUF version")?;
        if version != 2 && version != 3 {
            return Err(CheckpointError::UnsupportedGgufVersion {
                path: path.clone(),
                version,
            });
        }
        let n_tensors = r.u64("the tensor count")?;
        let n_kv = r.u64("the metadata count")?;

        let mut metadata = Vec::new();
        let mut metadata_index = HashMap::new();
        for i in 0..n_kv {
            let key = r.string(&format!("the key of metadata entry {i}"))?;
            let ty = r.u32(&format!("the type of metadata `{key}`"))?;
            let value = r.value(ty, &key, 0)?;
            metadata_index.insert(key.clone(), metadata.len());
            metadata.push((key, value));
        }

        let mut tensors = Vec::new();
        let mut tensor_index = HashMap::new();
        for i in 0..n_tensors {
            let name = r.string(&format!("the name of tensor {i}"))?;
            let n_dims = r.u32(&format!("the rank of tensor `{name}`"))?;
            if n_dims > MAX_DIMS {
                return Err(damaged(
                    &path,
                    format!("tensor `{name}` has {n_dims} dimensions; expected at most {MAX_DIMS}"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64(&format!("the dimensions of tensor `{name}`"))?);
            }
            let ty = GgmlType::from_id(r.u32(&format!("the type of tensor `{name}`"))?);
            let offset = r.u64(&format!("the data offset of tensor `{name}`"))?;
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(damaged(&path, format!("tensor `{name}` appears twice")));
            }
            tensors.push(GgufTensorInfo {
                name,
                dims,
                ty,
                offset,
            });
        }

        let alignment = match metadata_index.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(&i) => match &metadata[i].1 {
                GgufValue::U32(a) if *a > 0 && a.is_power_of_two() => *a as u64,
                other => {
                    return Err(CheckpointError::BadMetadata {
                        path,
                        key: "general.alignment".into(),
                        expected: "a u32 power of two".into(),
                        found: other.describe(),
                    })
                }
            },
        };
        let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
        let file_len = mmap.len() as u64;
        let data_len = file_len.saturating_sub(data_offset);

        for t in &tensors {
            check_extent(&path, t, alignment, data_len)?;
        }

        Ok(Gguf {
            path,
            mmap,
            version,
            metadata,
            metadata_index,
            tensors,
            tensor_index,
            alignment,
            data_offset,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All metadata, in file order.
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// All tensor records, in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, gguf_name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(gguf_name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor (bounds-checked at open), or `None` when its
    /// type's block layout is unknown, so its size is too.
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> Option<&[u8]> {
        let size = info.ty.byte_size(info.n_elements())?;
        let start = (self.data_offset + info.offset) as usize;
        self.mmap.get(start..start + size as usize)
    }

    /// A tensor by its GGUF name, dequantized, in GGUF's row order (Q/K rows
    /// still permuted). The shape is row-major (`dims` reversed).
    pub fn tensor_f32(&self, gguf_name: &str) -> Result<(Vec<usize>, Vec<f32>), CheckpointError> {
        let info = self
            .tensor_info(gguf_name)
            .ok_or_else(|| CheckpointError::TensorNotFound {
                path: self.path.clone(),
                tensor: gguf_name.to_string(),
            })?;
        let unsupported = || CheckpointError::UnsupportedTensorType {
            path: self.path.clone(),
            tensor: info.name.clone(),
            found: info.ty.to_string(),
            supported: SUPPORTED_TYPES,
        };
        if !info.ty.is_supported() {
            return Err(unsupported());
        }
        let data = self
            .tensor_bytes(info)
            .and_then(|bytes| dequantize(info.ty, bytes))
            .ok_or_else(unsupported)?;
        Ok((info.shape(), data))
    }

    /// A tensor by its Hugging Face name, in Hugging Face layout: Q and K
    /// projections have llama.cpp's row permutation undone, using the head
    /// counts of `config`.
    pub fn hf_tensor_f32(
        &self,
        hf_name: &str,
        config: &HfConfig,
    ) -> Result<(Vec<usize>, Vec<f32>), CheckpointError> {
        let gguf_name =
            hf_to_gguf_name(hf_name).ok_or_else(|| CheckpointError::TensorNotFound {
                path: self.path.clone(),
                tensor: hf_name.to_string(),
            })?;
        if self.tensor_info(&gguf_name).is_none() {
            return Err(CheckpointError::TensorNotFound {
                path: self.path.clone(),
                tensor: format!("{hf_name}` (GGUF `{gguf_name}`)"),
            });
        }
        let (shape, data) = self.tensor_f32(&gguf_name)?;
        let n_head = match permutation_of(hf_name) {
            None => return Ok((shape, data)),
            Some(Permuted::Query) => config.num_attention_heads,
            Some(Permuted::Key) => config.num_key_value_heads,
        };
        let [rows, cols] = shape[..] else {
            return Err(CheckpointError::BadShape {
                path: self.path.clone(),
                tensor: gguf_name,
                shape,
                expected: "expected a matrix".into(),
            });
        };
        if rows % (2 * n_head) != 0 {
            return Err(CheckpointError::BadShape {
                path: self.path.clone(),
                tensor: gguf_name,
                shape,
                expected: format!("expected the rows to split into {n_head} heads of even size"),
            });
        }
        Ok((shape, unpermute_rows(&data, rows, cols, n_head)))
    }

    fn require(&self, key: &str) -> Result<&GgufValue, CheckpointError> {
        self.get(key)
            .ok_or_else(|| CheckpointError::MissingMetadata {
                path: self.path.clone(),
                key: key.to_string(),
            })
    }

    fn bad(&self, key: &str, expected: &str, found: &GgufValue) -> CheckpointError {
        CheckpointError::BadMetadata {
            path: self.path.clone(),
            key: key.to_string(),
            expected: expected.to_string(),
            found: found.describe(),
        }
    }

    fn usize_of(&self, key: &str, value: &GgufValue) -> Result<usize, CheckpointError> {
        value
            .as_i64()
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| self.bad(key, "a non-negative integer", value))
    }

    fn required_usize(&self, key: &str) -> Result<usize, CheckpointError> {
        self.usize_of(key, self.require(key)?)
    }

    fn optional_usize(&self, key: &str) -> Result<Option<usize>, CheckpointError> {
        self.get(key).map(|v| self.usize_of(key, v)).transpose()
    }

    fn optional_u32(&self, key: &str) -> Result<Option<u32>, CheckpointError> {
        self.get(key)
            .map(|v| {
                v.as_i64()
                    .and_then(|x| u32::try_from(x).ok())
                    .ok_or_else(|| self.bad(key, "a u32 token id", v))
            })
            .transpose()
    }

    fn optional_f64(&self, key: &str) -> Result<Option<f64>, CheckpointError> {
        self.get(key)
            .map(|v| v.as_f64().ok_or_else(|| self.bad(key, "a number", v)))
            .transpose()
    }

    fn optional_string(&self, key: &str) -> Result<Option<String>, CheckpointError> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| self.bad(key, "a string", v))
            })
            .transpose()
    }

    fn optional_bool(&self, key: &str) -> Result<Option<bool>, CheckpointError> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| self.bad(key, "a bool", v)))
            .transpose()
    }

    fn string_array(&self, key: &str) -> Result<Vec<String>, CheckpointError> {
        let Some(v) = self.get(key) else {
            return Ok(Vec::new());
        };
        let arr = v
            .as_array()
            .ok_or_else(|| self.bad(key, "an array of strings", v))?;
        arr.iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| self.bad(key, "an array of strings", x))
            })
            .collect()
    }

    /// The Hugging Face `config.json` equivalent of the `llama.*` metadata.
    ///
    /// Only `general.architecture = llama` is accepted. Linear RoPE scaling is
    /// recovered; Llama 3.1-style scaling (stored by llama.cpp as a
    /// `rope_freqs.weight` tensor, without its parameters) is an error rather
    /// than a silently wrong model.
    pub fn hf_config(&self) -> Result<HfConfig, CheckpointError> {
        let arch_key = "general.architecture";
        let arch = self.require(arch_key)?;
        if arch.as_str() != Some("llama") {
            return Err(CheckpointError::UnsupportedModel {
                path: self.path.clone(),
                message: format!(
                    "`{arch_key}` is {}; only `llama` is supported",
                    arch.describe()
                ),
            });
        }
        let hidden_size = self.required_usize("llama.embedding_length")?;
        let num_hidden_layers = self.required_usize("llama.block_count")?;
        let num_attention_heads = self.required_usize("llama.attention.head_count")?;
        let num_key_value_heads = self
            .optional_usize("llama.attention.head_count_kv")?
            .unwrap_or(num_attention_heads);
        let intermediate_size = self.required_usize("llama.feed_forward_length")?;
        let rms_norm_eps = self
            .optional_f64("llama.attention.layer_norm_rms_epsilon")?
            .ok_or_else(|| CheckpointError::MissingMetadata {
                path: self.path.clone(),
                key: "llama.attention.layer_norm_rms_epsilon".into(),
            })?;
        let max_position_embeddings = self.required_usize("llama.context_length")?;
        let rope_theta = self
            .optional_f64("llama.rope.freq_base")?
            .unwrap_or(10000.0);
        if num_attention_heads == 0 {
            return Err(self.bad(
                "llama.attention.head_count",
                "a positive integer",
                &GgufValue::U32(0),
            ));
        }
        let head_dim = match self.optional_usize("llama.attention.key_length")? {
            Some(d) => d,
            None => match self.optional_usize("llama.rope.dimension_count")? {
                Some(d) => d,
                None => hidden_size / num_attention_heads,
            },
        };

        let rope_scaling = match self.optional_string("llama.rope.scaling.type")?.as_deref() {
            None | Some("none") => None,
            Some("linear") => {
                let factor = self
                    .optional_f64("llama.rope.scaling.factor")?
                    .ok_or_else(|| CheckpointError::MissingMetadata {
                        path: self.path.clone(),
                        key: "llama.rope.scaling.factor".into(),
                    })?;
                Some(RopeScaling::Linear { factor })
            }
            Some(other) => {
                return Err(CheckpointError::UnsupportedModel {
                    path: self.path.clone(),
                    message: format!("rope scaling type `{other}` (supported: none, linear)"),
                })
            }
        };
        if self.tensor_info("rope_freqs.weight").is_some() {
            return Err(CheckpointError::UnsupportedModel {
                path: self.path.clone(),
                message: "the file carries `rope_freqs.weight` (Llama 3.1 RoPE scaling), whose \
                          parameters GGUF does not record"
                    .into(),
            });
        }

        let vocab_size = match self.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
            Some(tokens) => tokens.len(),
            None => match self.optional_usize("llama.vocab_size")? {
                Some(v) => v,
                None => match self.tensor_info("token_embd.weight") {
                    Some(t) => t.shape()[0],
                    None => {
                        return Err(CheckpointError::MissingMetadata {
                            path: self.path.clone(),
                            key: "tokenizer.ggml.tokens".into(),
                        })
                    }
                },
            },
        };

        let config = HfConfig {
            architectures: vec!["LlamaForCausalLM".into()],
            model_type: Some("llama".into()),
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            intermediate_size,
            hidden_act: Some("silu".into()),
            rope_theta,
            rope_scaling,
            rms_norm_eps,
            tie_word_embeddings: self.tensor_info("output.weight").is_none(),
            vocab_size,
            bos_token_id: self.optional_u32("tokenizer.ggml.bos_token_id")?,
            eos_token_id: self
                .optional_u32("tokenizer.ggml.eos_token_id")?
                .map(TokenIds::One),
            max_position_embeddings,
            torch_dtype: Some("float32".into()),
        };
        config.check().map_err(|message| CheckpointError::Config {
            path: self.path.clone(),
            message: format!("from GGUF metadata: {message}"),
        })?;
        Ok(config)
    }

    /// True when the file carries a tokenizer (`tokenizer.ggml.model`).
    pub fn has_tokenizer(&self) -> bool {
        self.get("tokenizer.ggml.model").is_some()
    }

    /// The `tokenizer.ggml.*` metadata, for the tokenizer module to turn into
    /// a `tokenizer.json`. `tokenizer.ggml.model` is required; lists that are
    /// absent come back empty.
    pub fn tokenizer_meta(&self) -> Result<GgufTokenizerMeta, CheckpointError> {
        let model_key = "tokenizer.ggml.model";
        let model =
            self.optional_string(model_key)?
                .ok_or_else(|| CheckpointError::MissingMetadata {
                    path: self.path.clone(),
                    key: model_key.into(),
                })?;
        let types_key = "tokenizer.ggml.token_type";
        let token_types = match self.get(types_key) {
            None => Vec::new(),
            Some(v) => {
                let expected = "an array of i32 token types";
                let arr = v
                    .as_array()
                    .ok_or_else(|| self.bad(types_key, expected, v))?;
                arr.iter()
                    .map(|x| {
                        x.as_i64()
                            .and_then(|t| i32::try_from(t).ok())
                            .ok_or_else(|| self.bad(types_key, expected, x))
                    })
                    .collect::<Result<_, _>>()?
            }
        };
        let tokens = self.string_array("tokenizer.ggml.tokens")?;
        if !token_types.is_empty() && token_types.len() != tokens.len() {
            return Err(CheckpointError::BadMetadata {
                path: self.path.clone(),
                key: types_key.into(),
                expected: format!("one type per token ({} tokens)", tokens.len()),
                found: format!("{} types", token_types.len()),
            });
        }
        Ok(GgufTokenizerMeta {
            model,
            pre: self.optional_string("tokenizer.ggml.pre")?,
            tokens,
            merges: self.string_array("tokenizer.ggml.merges")?,
            token_types,
            bos_token_id: self.optional_u32("tokenizer.ggml.bos_token_id")?,
            eos_token_id: self.optional_u32("tokenizer.ggml.eos_token_id")?,
            unknown_token_id: self.optional_u32("tokenizer.ggml.unknown_token_id")?,
            padding_token_id: self.optional_u32("tokenizer.ggml.padding_token_id")?,
            add_bos_token: self.optional_bool("tokenizer.ggml.add_bos_token")?,
            add_eos_token: self.optional_bool("tokenizer.ggml.add_eos_token")?,
            chat_template: self.optional_string("tokenizer.chat_template")?,
        })
    }
}

fn damaged(path: &Path, message: String) -> CheckpointError {
    CheckpointError::Damaged {
        path: path.to_path_buf(),
        message,
    }
}

/// Checks that a tensor's data is aligned, lies inside the data section and
/// that its innermost dimension is a whole number of quantization blocks.
fn check_extent(
    path: &Path,
    t: &GgufTensorInfo,
    alignment: u64,
    data_len: u64,
) -> Result<(), CheckpointError> {
    if t.offset % alignment != 0 {
        return Err(damaged(
            path,
            format!(
                "tensor `{}`: data offset {} is not a multiple of the alignment {alignment}",
                t.name, t.offset
            ),
        ));
    }
    let n = t
        .dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            damaged(
                path,
                format!("tensor `{}`: dimensions {:?} overflow", t.name, t.dims),
            )
        })?;
    // A type without a known layout cannot be sized; reading it is an error
    // later, naming the type.
    let Some((block, _)) = t.ty.block_layout() else {
        return Ok(());
    };
    let inner = t.dims.first().copied().unwrap_or(1);
    if inner % block as u64 != 0 {
        return Err(CheckpointError::BadShape {
            path: path.to_path_buf(),
            tensor: t.name.clone(),
            shape: t.shape(),
            expected: format!(
                "type {} needs the innermost dimension to be a multiple of {block}",
                t.ty
            ),
        });
    }
    let size = t.ty.byte_size(n).ok_or_else(|| {
        damaged(
            path,
            format!("tensor `{}`: byte size of {:?} overflows", t.name, t.dims),
        )
    })?;
    let end = t.offset.checked_add(size);
    match end {
        Some(end) if end <= data_len => Ok(()),
        _ => Err(CheckpointError::TensorOutOfBounds {
            path: path.to_path_buf(),
            tensor: t.name.clone(),
            start: t.offset,
            end: t.offset.saturating_add(size),
            available: data_len,
        }),
    }
}

/// Bounds-checked little-endian cursor over the mapped file.
struct Reader<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

/// Nested arrays deeper than this are treated as damage, not recursed into.
const MAX_ARRAY_DEPTH: usize = 8;

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], CheckpointError> {
        let available = (self.bytes.len() - self.pos) as u64;
        if n > available {
            return Err(CheckpointError::Truncated {
                path: self.path.to_path_buf(),
                what: what.to_string(),
                offset: self.pos as u64,
                needed: n,
                file_len: self.bytes.len() as u64,
            });
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], CheckpointError> {
        Ok(self
            .take(N as u64, what)?
            .try_into()
            .expect("take returns N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32, CheckpointError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, CheckpointError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, CheckpointError> {
        let at = self.pos;
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| {
            damaged(
                self.path,
                format!("{what} at offset {at} is not valid UTF-8"),
            )
        })
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<GgufValue, CheckpointError> {
        let what = format!("the value of metadata `{key}`");
        Ok(match ty {
            0 => GgufValue::U8(u8::from_le_bytes(self.array(&what)?)),
            1 => GgufValue::I8(i8::from_le_bytes(self.array(&what)?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.array(&what)?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => {
                let [b] = self.array(&what)?;
                match b {
                    0 => GgufValue::Bool(false),
                    1 => GgufValue::Bool(true),
                    other => {
                        return Err(damaged(
                            self.path,
                            format!("metadata `{key}`: expected a bool (0 or 1), found {other}"),
                        ))
                    }
                }
            }
            8 => GgufValue::String(self.string(&what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(damaged(
                        self.path,
                        format!("metadata `{key}`: arrays nested deeper than {MAX_ARRAY_DEPTH}"),
                    ));
                }
                let elem_ty = self.u32(&what)?;
                let count = self.u64(&what)?;
                // Every element takes at least one byte, so a count beyond the
                // remaining bytes is damage; checking first avoids a huge
                // allocation from a corrupt count.
                let remaining = (self.bytes.len() - self.pos) as u64;
                if count > remaining {
                    return Err(CheckpointError::Truncated {
                        path: self.path.to_path_buf(),
                        what: format!("the {count} elements of metadata `{key}`"),
                        offset: self.pos as u64,
                        needed: count,
                        file_len: self.bytes.len() as u64,
                    });
                }
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(elem_ty, key, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(u64::from_le_bytes(self.array(&what)?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(&what)?)),
            other => {
                return Err(damaged(
                    self.path,
                    format!("metadata `{key}`: unknown value type {other} (expected 0..=12)"),
                ))
            }
        })
    }
}
