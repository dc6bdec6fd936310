//! One error type for the core. Each variant says what failed and where; the PyO3
//! crate maps variants onto the Python hierarchy in one place (`rust/py/src/errors.rs`).

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be opened or mapped.
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    /// The bytes are not a valid GGUF file. `at` is the byte offset of the defect.
    #[error("invalid GGUF file at byte {at}: {msg}")]
    Format { at: u64, msg: String },

    /// A valid GGUF file whose contents this engine cannot build a model from
    /// (unsupported architecture, missing tensor or key, shapes that disagree).
    #[error("cannot load model: {0}")]
    Model(String),

    /// A tokenizer defined by the file is inconsistent or unsupported.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// The caller asked for something impossible (bad token id, context overflow).
    #[error("{0}")]
    InvalidInput(String),

    /// KV cache blocks are exhausted; the caller can free sequences and retry.
    #[error("out of KV cache blocks: {0}")]
    OutOfBlocks(String),

    /// An output file could not be written (disk full, permissions, file size limit).
    /// Nothing is left under the output's name.
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },

    /// The caller's progress callback asked to stop (Ctrl-C).
    #[error("cancelled: {0}")]
    Cancelled(String),

    /// CUDA is missing, failed, or cannot run this model; the caller can use the CPU.
    #[error("CUDA: {0}")]
    Cuda(String),
}

impl Error {
    pub fn format(at: u64, msg: impl Into<String>) -> Self {
        Error::Format { at, msg: msg.into() }
    }
    pub fn model(msg: impl Into<String>) -> Self {
        Error::Model(msg.into())
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidInput(msg.into())
    }
}
