//! Builds a Hugging Face `tokenizer.json` from a GGUF file's tokenizer
//! metadata ([`GgufTokenizerMeta`]), for byte-level BPE files
//! (`tokenizer.ggml.model = "gpt2"`).
//!
//! What it produces: a BPE model with the file's vocabulary and merges, the
//! control tokens (type 3) as special added tokens, a ByteLevel decoder, no
//! normalizer, and a post-processor only when asked to add BOS.
//!
//! The pre-tokenizer is the one place where "the tokenizer this GGUF
//! describes" is ambiguous: GGUF names it only by a flavour string
//! (`tokenizer.ggml.pre`), and readers disagree on what a flavour means.
//! [`GgufPreTokenizer`] picks whose reading to follow; see its variants.
//! This module stops at the JSON text; loading it is `tokenizers`' job.

use std::collections::HashSet;

use serde_json::{json, Map, Value};

use super::gguf_meta::GgufTokenizerMeta;
use super::TokenizerError;

/// GGUF `token_type` values (llama.cpp's `LLAMA_TOKEN_TYPE_*`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Llama-3's split regex (`tokenizer.ggml.pre` = `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's split regex (`tokenizer.ggml.pre` = `qwen2`): Llama-3's with single digits.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Whose reading of `tokenizer.ggml.pre` to follow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GgufPreTokenizer {
    /// As Hugging Face transformers builds the tokenizer when it loads the
    /// GGUF (`from_pretrained(..., gguf_file=...)`): flavours it knows get
    /// their split regex, and every other flavour, `smollm` included, gets
    /// GPT-2's plain ByteLevel regex. This is what the model's transformers
    /// reference outputs were computed with, so it is the default; for
    /// SmolLM2 it reproduces transformers 5.17's ids exactly (checked against
    /// `tests/data/hf_reference/`).
    #[default]
    Transformers,
    /// As the model's original `tokenizer.json` (and llama.cpp) split text.
    /// For `smollm` this adds `Digits(individual_digits)` in front of
    /// ByteLevel, which differs from [`GgufPreTokenizer::Transformers`] only
    /// where whitespace runs meet digits (`"a  1"`: `[a, ĠĠ, 1]` here,
    /// `[a, Ġ, Ġ, 1]` there).
    Original,
    /// GPT-2's ByteLevel regex whatever the file says: the explicit
    /// fallback for flavours neither reading knows.
    ByteLevel,
}

/// Choices for [`tokenizer_json_from_gguf`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GgufTokenizerOptions {
    /// Add a post-processor that puts BOS in front of every encoding made
    /// with `add_special = true`. Off by default: transformers and llama.cpp
    /// add no BOS for SmolLM2 (`tokenizer.ggml.add_bos_token = false`).
    pub add_bos: bool,
    pub pre_tokenizer: GgufPreTokenizer,
}

/// The flavours of `tokenizer.ggml.pre` this module knows, per reading.
/// `None` (no `pre` key), `default` and `gpt2` mean GPT-2's regex in both.
pub const KNOWN_PRES: &[&str] = &[
    "default",
    "gpt2",
    "smollm",
    "llama-bpe",
    "llama3",
    "llama-v3",
    "qwen2",
];

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split_then_byte_level(regex: &str) -> Value {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
        byte_level(false),
    ]})
}

/// The pre-tokenizer for `pre` under `reading`, or an error naming the known flavours.
fn pre_tokenizer(pre: Option<&str>, reading: GgufPreTokenizer) -> Result<Value, TokenizerError> {
    use GgufPreTokenizer::*;
    let pre = match (reading, pre) {
        (ByteLevel, _) | (_, None) => return Ok(byte_level(true)),
        (_, Some(p)) => p,
    };
    Ok(match (pre, reading) {
        ("default" | "gpt2", _) => byte_level(true),
        ("smollm", Transformers) => byte_level(true),
        ("smollm", Original) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level(true),
        ]}),
        ("llama-bpe" | "llama3" | "llama-v3", _) => split_then_byte_level(LLAMA3_SPLIT),
        ("qwen2", _) => split_then_byte_level(QWEN2_SPLIT),
        _ => {
            return Err(TokenizerError::UnsupportedGgufPre {
                pre: pre.to_string(),
                known: KNOWN_PRES.join(", "),
            })
        }
    })
}

/// GPT-2's byte-to-character map: the characters a byte-level vocabulary is spelled in.
fn byte_level_alphabet() -> HashSet<char> {
    let mut chars = HashSet::new();
    let mut next = 256u32;
    for b in 0..=255u32 {
        let printable = (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
        let c = if printable {
            b
        } else {
            next += 1;
            next - 1
        };
        chars.insert(char::from_u32(c).expect("byte-level code points are valid"));
    }
    chars
}

fn added_token(id: usize, content: &str, special: bool) -> Value {
    json!({
        "id": id, "content": content, "single_word": false, "lstrip": false,
        "rstrip": false, "normalized": false, "special": special,
    })
}

/// A Hugging Face `tokenizer.json` (as text) for a byte-level BPE GGUF.
///
/// Special tokens: control tokens (type 3) become special added tokens, so
/// their text in the input maps to one id and they survive decoding.
/// Under [`GgufPreTokenizer::Transformers`] only those spelled in the
/// byte-level alphabet are added, as transformers does; user-defined tokens
/// (type 4) stay plain vocabulary there, and become non-special added tokens
/// under the other readings, as llama.cpp treats them.
pub fn tokenizer_json_from_gguf(
    meta: &GgufTokenizerMeta,
    options: &GgufTokenizerOptions,
) -> Result<String, TokenizerError> {
    let gguf = |msg: String| TokenizerError::Gguf(msg);
    if meta.model != "gpt2" {
        return Err(gguf(format!(
            "tokenizer.ggml.model is `{}`; only `gpt2` (byte-level BPE) can be built",
            meta.model
        )));
    }
    if meta.tokens.is_empty() {
        return Err(gguf("tokenizer.ggml.tokens is empty".into()));
    }
    if !meta.token_types.is_empty() && meta.token_types.len() != meta.tokens.len() {
        return Err(gguf(format!(
            "tokenizer.ggml.token_type has {} entries for {} tokens",
            meta.token_types.len(),
            meta.tokens.len()
        )));
    }

    let mut vocab = Map::new();
    for (id, token) in meta.tokens.iter().enumerate() {
        if let Some(first) = vocab.insert(token.clone(), json!(id)) {
            return Err(gguf(format!(
                "token {token:?} appears twice (ids {first} and {id}); ids would not round-trip"
            )));
        }
    }

    let mut merges = Vec::with_capacity(meta.merges.len());
    for (i, merge) in meta.merges.iter().enumerate() {
        let mut parts = merge.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                merges.push(json!([a, b]));
            }
            _ => {
                return Err(gguf(format!(
                    "tokenizer.ggml.merges[{i}] = {merge:?} is not `left right`"
                )))
            }
        }
    }

    let alphabet = byte_level_alphabet();
    let transformers = options.pre_tokenizer == GgufPreTokenizer::Transformers;
    let mut added = Vec::new();
    for (id, (token, &ty)) in meta.tokens.iter().zip(&meta.token_types).enumerate() {
        match ty {
            TOKEN_TYPE_CONTROL if !transformers || token.chars().all(|c| alphabet.contains(&c)) => {
                added.push(added_token(id, token, true));
            }
            TOKEN_TYPE_USER_DEFINED if !transformers => added.push(added_token(id, token, false)),
            _ => {}
        }
    }

    let post_processor = if options.add_bos {
        let bos_id = meta.bos_token_id.ok_or_else(|| {
            gguf("add_bos is set but the file has no tokenizer.ggml.bos_token_id".into())
        })?;
        let bos = meta.tokens.get(bos_id as usize).ok_or_else(|| {
            gguf(format!(
                "bos_token_id {bos_id} is outside the {} tokens",
                meta.tokens.len()
            ))
        })?;
        json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos.as_str(): {"id": bos, "ids": [bos_id], "tokens": [bos]}},
        })
    } else {
        Value::Null
    };

    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(meta.pre.as_deref(), options.pre_tokenizer)?,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    });
    Ok(tokenizer.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphabet_has_256_distinct_characters() {
        let a = byte_level_alphabet();
        assert_eq!(a.len(), 256);
        assert!(a.contains(&'Ġ') && a.contains(&'a') && !a.contains(&' '));
    }

    #[test]
    fn unknown_pre_is_an_error_naming_the_known_ones() {
        let err = pre_tokenizer(Some("mystery"), GgufPreTokenizer::Transformers).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("mystery") && msg.contains("smollm"), "{msg}");
        // The explicit fallback accepts it.
        assert!(pre_tokenizer(Some("mystery"), GgufPreTokenizer::ByteLevel).is_ok());
    }

    #[test]
    fn non_gpt2_model_is_rejected() {
        let meta = GgufTokenizerMeta {
            model: "llama".into(),
            tokens: vec!["a".into()],
            ..Default::default()
        };
        let err = tokenizer_json_from_gguf(&meta, &Default::default()).unwrap_err();
        assert!(err.to_string().contains("only `gpt2`"), "{err}");
    }
}
