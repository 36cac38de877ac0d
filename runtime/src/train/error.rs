//! The one error type of the training module: file problems while saving or
//! loading checkpoints and artifacts, and checkpoints that do not fit the
//! model being trained. Each names the path, so the CLI prints it as is.

use std::path::PathBuf;

use crate::checkpoint::CheckpointError;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Reading or writing a safetensors file failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),

    /// A training checkpoint is incomplete or inconsistent.
    #[error("{path}: not a usable training checkpoint: {message}")]
    BadCheckpoint { path: PathBuf, message: String },

    /// A training checkpoint was saved from another model.
    #[error(
        "{path}: this checkpoint was saved from a different model ({} mismatching parameter(s)):\n{}",
        mismatches.len(),
        mismatches.iter().map(|m| format!("  {m}")).collect::<Vec<_>>().join("\n")
    )]
    ModelMismatch {
        path: PathBuf,
        mismatches: Vec<String>,
    },
}

impl TrainError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn bad(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        TrainError::BadCheckpoint {
            path: path.into(),
            message: message.into(),
        }
    }
}
