//! The one place Rust errors become Python exceptions.
//!
//! Hierarchy (re-exported by `edgelm/__init__.py`):
//! ```text
//! EdgelmError
//! ├── ModelLoadError            the file can't become a model (I/O, unsupported, missing)
//! │   ├── GGUFFormatError       the bytes are not valid GGUF
//! │   └── TokenizerError        the vocabulary in the file is unusable
//! ├── OutputError               an output file could not be written (disk full, …)
//! ├── InvalidRequestError       the caller asked for something impossible
//! └── CacheFullError            KV memory exhausted; free sequences or shorten the request
//! ```

use edgelm_core::Error;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

pyo3::create_exception!(_native, EdgelmError, PyException, "Base class of every edgelm error.");
pyo3::create_exception!(_native, ModelLoadError, EdgelmError, "A model file could not be loaded.");
pyo3::create_exception!(
    _native,
    GGUFFormatError,
    ModelLoadError,
    "The file is not valid GGUF; the message names the defect and its byte offset."
);
pyo3::create_exception!(_native, TokenizerError, ModelLoadError, "The tokenizer described by the file is unusable.");
pyo3::create_exception!(
    _native,
    OutputError,
    EdgelmError,
    "An output file could not be written; nothing was left under its name."
);
pyo3::create_exception!(
    _native,
    InvalidRequestError,
    EdgelmError,
    "The request is impossible for this model (bad ids, too long, bad sampling values)."
);
pyo3::create_exception!(_native, CacheFullError, EdgelmError, "The KV cache has no free blocks left.");

pub fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::Io { .. } | Error::Model(_) => ModelLoadError::new_err(msg),
        Error::Format { .. } => GGUFFormatError::new_err(msg),
        Error::Tokenizer(_) => TokenizerError::new_err(msg),
        Error::InvalidInput(_) => InvalidRequestError::new_err(msg),
        Error::OutOfBlocks(_) => CacheFullError::new_err(msg),
        Error::Write { .. } => OutputError::new_err(msg),
        Error::Cuda(_) | Error::Cancelled(_) => EdgelmError::new_err(msg),
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("EdgelmError", py.get_type::<EdgelmError>())?;
    m.add("ModelLoadError", py.get_type::<ModelLoadError>())?;
    m.add("GGUFFormatError", py.get_type::<GGUFFormatError>())?;
    m.add("TokenizerError", py.get_type::<TokenizerError>())?;
    m.add("OutputError", py.get_type::<OutputError>())?;
    m.add("InvalidRequestError", py.get_type::<InvalidRequestError>())?;
    m.add("CacheFullError", py.get_type::<CacheFullError>())?;
    Ok(())
}
