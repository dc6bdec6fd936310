//! edgelm-core: everything that computes, nothing that talks to Python.
//!
//! Reading order follows the data: `gguf` (the file) → `quant` (its blocks) →
//! `tokenizer` (its vocabulary) → `model` (the forward pass over a paged `kv` cache)
//! → `sample` (logits to tokens) → `engine` (a loaded model that steps batches) → `batch` (the executor the
//! serving scheduler drives).

pub mod error;
pub mod gguf;
pub mod quant;
pub mod tokenizer;
pub mod kv;
pub mod model;
pub mod sample;
pub mod engine;
pub mod batch;
pub mod threads;
pub mod mem;
pub mod bench;
pub mod cuda;
pub mod tools;

pub use error::{Error, Result};
