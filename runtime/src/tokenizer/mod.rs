//! Tokenizers: Hugging Face `tokenizer.json`, tiktoken BPE rank files, and
//! `tokenizer.json` built from GGUF metadata.

pub mod gguf_meta;
