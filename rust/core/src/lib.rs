//! edgelm-core: everything that computes, nothing that talks to Python.
//!
//! Reading order follows the data: `gguf` (the file) → `quant` (its blocks) →
//! `tokenizer` (its vocabulary) → `model` (the forward pass over a paged `kv` cache)
//! → `sample` (logits to tokens) → `engine` (a loaded model that steps batches) → `batch` (the executor the
//! serving scheduler drives).

pub mod batch;
pub mod bench;
pub mod cuda;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod kv;
pub mod mem;
pub mod model;
pub mod quant;
pub mod sample;
pub mod threads;
pub mod tokenizer;
pub mod tools;

pub use error::{Error, Result};
