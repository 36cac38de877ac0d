//! The tokenizer description carried in a GGUF file's metadata
//! (`tokenizer.ggml.*` keys), extracted by the GGUF reader and turned into a
//! `tokenizer.json` by the tokenizer module.

/// Everything under `tokenizer.ggml.*` that a BPE tokenizer needs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GgufTokenizerMeta {
    /// `tokenizer.ggml.model`, e.g. `gpt2` (byte-level BPE) or `llama` (SentencePiece).
    pub model: String,
    /// `tokenizer.ggml.pre`, the pre-tokenizer flavour (e.g. `smollm`, `llama-bpe`).
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`, indexed by token id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.merges`, each "left right".
    pub merges: Vec<String>,
    /// `tokenizer.ggml.token_type` (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte).
    pub token_types: Vec<i32>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub unknown_token_id: Option<u32>,
    pub padding_token_id: Option<u32>,
    pub add_bos_token: Option<bool>,
    pub add_eos_token: Option<bool>,
    /// `tokenizer.chat_template`, if any.
    pub chat_template: Option<String>,
}
