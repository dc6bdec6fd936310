//! File tools: work on whole model files rather than on a loaded model.
//!
//! - `quantize`: a GGUF file to another file type (llama-quantize's mixes), streamed.
//! - `mix`: which type each tensor gets, per llama.cpp's rules.
//! - `write`: a GGUF file from tensors handed in by a caller (the ONNX importer),
//!   written to a temporary file and renamed, like the quantizer's output.

pub mod mix;
pub mod quantize;
pub mod write;

pub use mix::FileType;
pub use quantize::{plan, quantize_file, Options, Plan, Progress, Summary};
