//! Token datasets: `.npy` files of token ids, `NpyDataset`, corpus preparation.

pub mod dataset;
pub mod npy;
pub mod prepare;

use std::path::PathBuf;

pub use dataset::{NpyDataset, Split};
pub use npy::{
    read_f32_npy, write_f32_npy, write_npy, write_tokens, NpyDtype, NpyElement, NpyTokens,
};
pub use prepare::{prepare, prepare_with, PrepareOptions, PrepareStats};

use crate::tokenizer::TokenizerError;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: bad .npy file: {reason}", path.display())]
    BadNpy { path: PathBuf, reason: String },
    #[error("token {value} at index {index} does not fit the .npy dtype '{dtype}'")]
    TokenOutOfRange {
        index: usize,
        value: u32,
        dtype: &'static str,
    },
    #[error(
        "the {split} split has {have} tokens but needs at least {need} \
         (block_size {block_size} + 1); the data has {total} tokens in all"
    )]
    TooFewTokens {
        split: &'static str,
        have: usize,
        need: usize,
        total: usize,
        block_size: usize,
    },
    #[error("{0}")]
    Config(String),
    #[error("{}:{line}: {reason}", path.display())]
    Jsonl {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{}: {reason}", path.display())]
    Input { path: PathBuf, reason: String },
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}
