//! File tools: `quantize_file`, `quantize_plan`, `file_types`, `write_gguf`.

use std::path::PathBuf;

use edgelm_core::error::Error;
use edgelm_core::gguf::{Array, GgufWriter, Value};
use edgelm_core::quant::GgmlType;
use edgelm_core::tools::{self, FileType, Options};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use crate::errors::to_py;

/// The file types `quantize_file` accepts, in llama-quantize's spelling.
#[pyfunction]
pub fn file_types() -> Vec<&'static str> {
    FileType::names()
}

fn options(ftype: &str, threads: Option<usize>, pure: bool) -> PyResult<Options> {
    let ftype = FileType::parse(ftype).map_err(to_py)?;
    let threads = threads.unwrap_or_else(edgelm_core::engine::physical_cores).max(1);
    Ok(Options { ftype, threads, pure })
}

/// (name, dims, current type, new type, new bytes).
type PlanRow = (String, Vec<u64>, &'static str, &'static str, u64);

/// Each tensor's plan row, in writing order.
#[pyfunction]
#[pyo3(signature = (input, ftype, pure=false))]
pub fn quantize_plan(input: PathBuf, ftype: &str, pure: bool) -> PyResult<Vec<PlanRow>> {
    let opts = options(ftype, Some(1), pure)?;
    let gguf = edgelm_core::gguf::Gguf::open(&input).map_err(to_py)?;
    let plan = tools::plan(&gguf, &opts).map_err(to_py)?;
    Ok(plan
        .tensors
        .into_iter()
        .map(|p| (p.info.name, p.info.dims, p.info.ty.name(), p.to.name(), p.out_bytes))
        .collect())
}

/// Quantize a GGUF file (see edgelm-core `tools::quantize`). `progress(tensor,
/// n_tensors, name, from, to, done_bytes, total_bytes)` is called after each slab of
/// rows; an exception from it (or Ctrl-C) stops the work and removes the partial file.
#[pyfunction]
#[pyo3(signature = (input, output, ftype, threads=None, pure=false, progress=None))]
pub fn quantize_file<'py>(
    py: Python<'py>,
    input: PathBuf,
    output: PathBuf,
    ftype: &str,
    threads: Option<usize>,
    pure: bool,
    progress: Option<Py<PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let opts = options(ftype, threads, pure)?;
    let mut raised: Option<PyErr> = None;
    let result = py.detach(|| {
        let mut cb = |p: &tools::Progress| -> edgelm_core::Result<()> {
            Python::attach(|py| {
                let r = py.check_signals().and_then(|()| match &progress {
                    Some(f) => f
                        .call1(
                            py,
                            (p.tensor, p.n_tensors, p.name, p.from.name(), p.to.name(), p.done_bytes, p.total_bytes),
                        )
                        .map(|_| ()),
                    None => Ok(()),
                });
                r.map_err(|e| {
                    let msg = e.to_string();
                    raised = Some(e);
                    Error::Cancelled(msg)
                })
            })
        };
        tools::quantize_file(&input, &output, &opts, &mut cb)
    });
    let s = match result {
        Ok(s) => s,
        Err(e) => return Err(raised.take().unwrap_or_else(|| to_py(e))),
    };
    let d = PyDict::new(py);
    d.set_item("ftype", s.ftype.name())?;
    d.set_item("n_tensors", s.n_tensors)?;
    d.set_item("n_converted", s.n_converted)?;
    d.set_item("n_requantized", s.n_requantized)?;
    d.set_item("n_fallback", s.n_fallback)?;
    d.set_item("in_tensor_bytes", s.in_tensor_bytes)?;
    d.set_item("out_tensor_bytes", s.out_tensor_bytes)?;
    d.set_item("out_file_bytes", s.out_file_bytes)?;
    d.set_item("seconds", s.seconds)?;
    let by_type = PyList::empty(py);
    for (t, n, b) in s.by_type {
        by_type.append((t.name(), n, b))?;
    }
    d.set_item("by_type", by_type)?;
    Ok(d)
}

fn type_by_name(name: &str) -> PyResult<GgmlType> {
    GgmlType::all()
        .iter()
        .copied()
        .find(|t| t.name().eq_ignore_ascii_case(name))
        .ok_or_else(|| PyValueError::new_err(format!("unknown tensor type {name:?}")))
}

/// A metadata value from (type, python value); types are GGUF's: u8 i8 u16 i16 u32 i32
/// u64 i64 f32 f64 bool str, and `arr[T]` for arrays of those.
fn value(key: &str, ty: &str, v: &Bound<'_, PyAny>) -> PyResult<Value> {
    let bad = |e: PyErr| PyValueError::new_err(format!("metadata {key:?} ({ty}): {e}"));
    if let Some(inner) = ty.strip_prefix("arr[").and_then(|r| r.strip_suffix(']')) {
        let a = match inner {
            "u8" => Array::U8(v.extract().map_err(bad)?),
            "i8" => Array::I8(v.extract().map_err(bad)?),
            "u16" => Array::U16(v.extract().map_err(bad)?),
            "i16" => Array::I16(v.extract().map_err(bad)?),
            "u32" => Array::U32(v.extract().map_err(bad)?),
            "i32" => Array::I32(v.extract().map_err(bad)?),
            "u64" => Array::U64(v.extract().map_err(bad)?),
            "i64" => Array::I64(v.extract().map_err(bad)?),
            "f32" => Array::F32(v.extract().map_err(bad)?),
            "f64" => Array::F64(v.extract().map_err(bad)?),
            "bool" => Array::Bool(v.extract().map_err(bad)?),
            "str" => Array::Str(v.extract().map_err(bad)?),
            _ => return Err(PyValueError::new_err(format!("metadata {key:?}: unknown array type {ty:?}"))),
        };
        return Ok(Value::Array(a));
    }
    Ok(match ty {
        "u8" => Value::U8(v.extract().map_err(bad)?),
        "i8" => Value::I8(v.extract().map_err(bad)?),
        "u16" => Value::U16(v.extract().map_err(bad)?),
        "i16" => Value::I16(v.extract().map_err(bad)?),
        "u32" => Value::U32(v.extract().map_err(bad)?),
        "i32" => Value::I32(v.extract().map_err(bad)?),
        "u64" => Value::U64(v.extract().map_err(bad)?),
        "i64" => Value::I64(v.extract().map_err(bad)?),
        "f32" => Value::F32(v.extract().map_err(bad)?),
        "f64" => Value::F64(v.extract().map_err(bad)?),
        "bool" => Value::Bool(v.extract().map_err(bad)?),
        "str" => Value::Str(v.extract().map_err(bad)?),
        _ => return Err(PyValueError::new_err(format!("metadata {key:?}: unknown type {ty:?}"))),
    })
}

/// Write a GGUF file: `kv` is [(key, type, value)], `tensors` is [(name, dims in ggml
/// order, type name, bytes)]. Temporary file + rename; returns the file size.
#[pyfunction]
pub fn write_gguf(
    output: PathBuf,
    kv: Vec<(String, String, Bound<'_, PyAny>)>,
    tensors: Vec<(String, Vec<u64>, String, Bound<'_, PyBytes>)>,
) -> PyResult<u64> {
    let mut w = GgufWriter::new();
    for (k, ty, v) in &kv {
        w.kv(k, value(k, ty, v)?);
    }
    let mut sizes = Vec::with_capacity(tensors.len());
    for (name, dims, ty, data) in &tensors {
        let t = type_by_name(ty)?;
        let data = data.as_bytes();
        let n_rows: u64 = dims.iter().skip(1).product();
        let want = dims.first().and_then(|&d0| t.row_bytes(d0 as usize)).map(|r| r as u64 * n_rows);
        if dims.is_empty() || want != Some(data.len() as u64) {
            return Err(PyValueError::new_err(format!(
                "tensor {name}: {dims:?} {ty} needs {want:?} bytes, got {}",
                data.len()
            )));
        }
        w.tensor_sized(name, dims, t, data.len() as u64);
        sizes.push(data.len() as u64);
    }
    tools::write::write_file(&output, &w, &sizes, &mut |i| Ok(tensors[i].3.as_bytes())).map_err(to_py)
}

/// Any valid GGUF, without building a model: (version, file size, metadata, tensors as
/// (name, dims, type, bytes)). `edgelm info` uses it so files edgelm cannot run still
/// show what they hold.
#[pyfunction]
#[allow(clippy::type_complexity)]
pub fn inspect_gguf<'py>(
    py: Python<'py>,
    path: PathBuf,
) -> PyResult<(u32, usize, Bound<'py, PyDict>, Vec<(String, Vec<u64>, &'static str, u64)>)> {
    let g = edgelm_core::gguf::Gguf::open(&path).map_err(to_py)?;
    let md = PyDict::new(py);
    for (k, v) in g.metadata() {
        md.set_item(k, crate::value_to_py(py, v)?)?;
    }
    let tensors = g.tensors().iter().map(|t| (t.name.clone(), t.dims.clone(), t.ty.name(), t.n_bytes)).collect();
    Ok((g.version, g.file_size(), md, tensors))
}
