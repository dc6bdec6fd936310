//! Write a GGUF file built by a caller (the ONNX importer, through Python) the way the
//! quantizer writes its output: a hidden temporary file beside the target, synced,
//! re-opened as a check, then renamed. A failure leaves nothing under the target name.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use super::quantize::temp_path;
use crate::error::{Error, Result};
use crate::gguf::{Gguf, GgufWriter};

/// `w` declares every tensor by size (`GgufWriter::tensor_sized`); `data(i)` gives the
/// bytes of the i-th, which are streamed after the header without another copy.
/// Returns the size of the written file.
pub fn write_file<'a>(
    output: &Path,
    w: &GgufWriter,
    sizes: &[u64],
    data: &mut dyn FnMut(usize) -> Result<&'a [u8]>,
) -> Result<u64> {
    let tmp = temp_path(output)?;
    let werr = |source| Error::Write { path: output.to_owned(), source };
    let result = (|| {
        let mut out = BufWriter::with_capacity(4 << 20, File::create(&tmp).map_err(werr)?);
        out.write_all(&w.header()).map_err(werr)?;
        for (i, &n) in sizes.iter().enumerate() {
            let bytes = data(i)?;
            if bytes.len() as u64 != n {
                return Err(Error::invalid(format!("tensor #{i} has {} bytes, {n} were declared", bytes.len())));
            }
            out.write_all(bytes).map_err(werr)?;
            out.write_all(&vec![0u8; w.padding(n)]).map_err(werr)?;
        }
        let file = out.into_inner().map_err(|e| werr(e.into_error()))?;
        file.sync_all().map_err(werr)?;
        let size = file.metadata().map_err(werr)?.len();
        Gguf::open(&tmp).map_err(|e| Error::invalid(format!("the written file failed validation: {e}")))?;
        std::fs::rename(&tmp, output).map_err(werr)?;
        Ok(size)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
