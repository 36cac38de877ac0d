//! Tokenizers: Hugging Face `tokenizer.json`, tiktoken BPE rank files, and
//! `tokenizer.json` built from GGUF metadata.
//!
//! [`Tokenizer`] is the one type the rest of the runtime sees. It wraps one
//! of two backends (the `tokenizers` crate, or [`TiktokenBpe`]) and carries
//! the BOS/EOS ids, which neither file format states reliably on its own.
//!
//! Conventions shared by every backend:
//! - special-token text in the input (`<|endoftext|>`) encodes to that one
//!   token, as Hugging Face tokenizers treat added special tokens;
//! - `decode` keeps special tokens and skips ids the vocabulary lacks;
//! - `vocab_size` is one past the largest id, so it sizes an embedding table.
//!
//! `decode` is lossless (`decode(encode(s)) == s` for byte-level BPEs). It
//! does not apply transformers' `clean_up_tokenization_spaces` (which the
//! SmolLM2 GGUF tokenizer turns on there and which rewrites `" ."` to `"."`
//! and the like), so decoded text can differ from transformers' `decode`
//! where such patterns occur; the ids never do.

pub mod gguf;
pub mod gguf_meta;
pub mod tiktoken;

use std::path::{Path, PathBuf};

pub use gguf::{tokenizer_json_from_gguf, GgufPreTokenizer, GgufTokenizerOptions};
pub use gguf_meta::GgufTokenizerMeta;
pub use tiktoken::TiktokenBpe;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a usable tokenizer.json: {reason}")]
    BadHfJson { path: String, reason: String },
    #[error("{path}: not a tiktoken rank file: {reason}")]
    BadRankFile { path: String, reason: String },
    #[error("pre-tokenizer regex {pattern:?} does not compile: {reason}")]
    BadPattern { pattern: String, reason: String },
    #[error("GGUF tokenizer metadata: {0}")]
    Gguf(String),
    #[error(
        "GGUF tokenizer.ggml.pre = {pre:?} is not a pre-tokenizer caramba knows (known: {known}); \
         pass GgufPreTokenizer::ByteLevel to use GPT-2's regex anyway"
    )]
    UnsupportedGgufPre { pre: String, known: String },
    #[error("cannot tell the tokenizer format of {path}: {reason}")]
    UnknownFormat { path: String, reason: String },
    #[error("encoding failed: {0}")]
    Encode(String),
    #[error("decoding failed: {0}")]
    Decode(String),
}

enum Backend {
    HuggingFace(Box<tokenizers::Tokenizer>),
    Tiktoken(Box<TiktokenBpe>),
}

/// A text tokenizer with known special ids.
pub struct Tokenizer {
    backend: Backend,
    vocab_size: usize,
    bos: Option<u32>,
    eos: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind())
            .field("vocab_size", &self.vocab_size)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`. BOS and EOS come from a
    /// `tokenizer_config.json` beside it when there is one (its `bos_token`
    /// and `eos_token`); otherwise they are unset. Use
    /// [`Tokenizer::with_special_ids`] to set them.
    pub fn from_hf_file(path: &Path) -> Result<Self, TokenizerError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut tok = Self::from_hf_json_named(&text, &path.display().to_string())?;
        let config = path.with_file_name("tokenizer_config.json");
        if let Ok(config) = std::fs::read_to_string(&config) {
            if let Ok(config) = serde_json::from_str::<serde_json::Value>(&config) {
                let id_of = |key: &str| {
                    let v = config.get(key)?;
                    let s = v.as_str().or_else(|| v.get("content")?.as_str())?;
                    tok.token_to_id(s)
                };
                let (bos, eos) = (id_of("bos_token"), id_of("eos_token"));
                tok.bos = bos;
                tok.eos = eos;
            }
        }
        Ok(tok)
    }

    /// Loads a Hugging Face `tokenizer.json` from its text; BOS/EOS unset.
    pub fn from_hf_json(json: &str) -> Result<Self, TokenizerError> {
        Self::from_hf_json_named(json, "<memory>")
    }

    fn from_hf_json_named(json: &str, name: &str) -> Result<Self, TokenizerError> {
        let inner: tokenizers::Tokenizer =
            json.parse()
                .map_err(|e: tokenizers::Error| TokenizerError::BadHfJson {
                    path: name.to_string(),
                    reason: e.to_string(),
                })?;
        let vocab_size = inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&m| m as usize + 1);
        Ok(Self {
            backend: Backend::HuggingFace(Box::new(inner)),
            vocab_size,
            bos: None,
            eos: None,
        })
    }

    /// cl100k_base from its rank file; EOS is `<|endoftext|>`, and there is no BOS.
    pub fn cl100k_base(path: &Path) -> Result<Self, TokenizerError> {
        let bpe = TiktokenBpe::cl100k_base(path)?;
        let eos = bpe.special_id("<|endoftext|>");
        Ok(Self::from_tiktoken(bpe, None, eos))
    }

    /// Wraps a tiktoken-style BPE with the given special ids.
    pub fn from_tiktoken(bpe: TiktokenBpe, bos: Option<u32>, eos: Option<u32>) -> Self {
        Self {
            vocab_size: bpe.vocab_size(),
            backend: Backend::Tiktoken(Box::new(bpe)),
            bos,
            eos,
        }
    }

    /// Builds the tokenizer a GGUF file describes (see [`tokenizer_json_from_gguf`]);
    /// BOS and EOS are the file's.
    pub fn from_gguf_meta(
        meta: &GgufTokenizerMeta,
        options: &GgufTokenizerOptions,
    ) -> Result<Self, TokenizerError> {
        let json = tokenizer_json_from_gguf(meta, options)?;
        let mut tok = Self::from_hf_json_named(&json, "<tokenizer.json built from GGUF>")?;
        tok.bos = meta.bos_token_id;
        tok.eos = meta.eos_token_id;
        Ok(tok)
    }

    /// Reads a GGUF file's tokenizer metadata and builds its tokenizer.
    pub fn from_gguf_file(
        path: &Path,
        options: &GgufTokenizerOptions,
    ) -> Result<Self, TokenizerError> {
        let meta = crate::checkpoint::Gguf::open(path)
            .and_then(|g| g.tokenizer_meta())
            .map_err(|e| TokenizerError::Gguf(e.to_string()))?;
        Self::from_gguf_meta(&meta, options)
    }

    /// Loads by file name: `*.json` as Hugging Face, `cl100k_base.tiktoken` as
    /// cl100k_base, `*.gguf` with the default [`GgufTokenizerOptions`].
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let unknown = |reason: &str| TokenizerError::UnknownFormat {
            path: path.display().to_string(),
            reason: reason.to_string(),
        };
        if name.ends_with(".json") {
            Self::from_hf_file(path)
        } else if name.ends_with(".gguf") {
            Self::from_gguf_file(path, &GgufTokenizerOptions::default())
        } else if name.ends_with(".tiktoken") {
            if name.starts_with("cl100k_base") {
                Self::cl100k_base(path)
            } else {
                Err(unknown(
                    "only cl100k_base's regex and special tokens are built in; \
                     load other rank files with TiktokenBpe::from_file",
                ))
            }
        } else {
            Err(unknown(
                "expected a tokenizer.json (*.json) or a *.tiktoken rank file",
            ))
        }
    }

    /// Overrides the BOS and EOS ids.
    pub fn with_special_ids(mut self, bos: Option<u32>, eos: Option<u32>) -> Self {
        self.bos = bos;
        self.eos = eos;
        self
    }

    /// Encodes `text`. `add_special` runs the tokenizer's post-processor
    /// (e.g. adding BOS); tiktoken encodings have none, so it changes nothing there.
    ///
    /// # Panics
    /// If the backend fails, which for a tokenizer that loaded means a bug in
    /// it; use [`Tokenizer::try_encode`] to get the error instead.
    pub fn encode(&self, text: &str, add_special: bool) -> Vec<u32> {
        self.try_encode(text, add_special)
            .unwrap_or_else(|e| panic!("tokenizer failed on a {}-byte text: {e}", text.len()))
    }

    pub fn try_encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
        match &self.backend {
            Backend::HuggingFace(t) => t
                .encode_fast(text, add_special)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| TokenizerError::Encode(e.to_string())),
            Backend::Tiktoken(t) => t.encode(text),
        }
    }

    /// Decodes `ids` to text, keeping special tokens. Bytes that do not form
    /// valid UTF-8 (a sequence cut mid-character) become U+FFFD.
    ///
    /// # Panics
    /// If the backend fails; see [`Tokenizer::try_decode`].
    pub fn decode(&self, ids: &[u32]) -> String {
        self.try_decode(ids)
            .unwrap_or_else(|e| panic!("tokenizer failed to decode {} ids: {e}", ids.len()))
    }

    pub fn try_decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        match &self.backend {
            Backend::HuggingFace(t) => t
                .decode(ids, false)
                .map_err(|e| TokenizerError::Decode(e.to_string())),
            Backend::Tiktoken(t) => Ok(String::from_utf8_lossy(&t.decode_bytes(ids)).into_owned()),
        }
    }

    /// One past the largest token id (special tokens included).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// The token's text as the vocabulary spells it (`Ġhello` for byte-level
    /// BPE). tiktoken tokens are raw bytes, shown here as lossy UTF-8.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match &self.backend {
            Backend::HuggingFace(t) => t.id_to_token(id),
            Backend::Tiktoken(t) => t
                .token_bytes(id)
                .map(|b| String::from_utf8_lossy(b).into_owned()),
        }
    }

    /// The id of a token spelled as [`Tokenizer::id_to_token`] spells it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.backend {
            Backend::HuggingFace(t) => t.token_to_id(token),
            Backend::Tiktoken(t) => {
                t.special_id(token)
                    .or_else(|| match t.encode_ordinary(token).ok()?.as_slice() {
                        [id] if t.token_bytes(*id) == Some(token.as_bytes()) => Some(*id),
                        _ => None,
                    })
            }
        }
    }

    /// `"huggingface"` or `"tiktoken"`.
    pub fn kind(&self) -> &'static str {
        match self.backend {
            Backend::HuggingFace(_) => "huggingface",
            Backend::Tiktoken(_) => "tiktoken",
        }
    }
}

#[cfg(test)]
mod tests;
