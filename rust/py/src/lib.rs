//! `edgelm._native`: thin #[pyclass] wrappers over edgelm-core. No logic lives here
//! beyond argument conversion; every compute call releases the GIL.

mod errors;
mod sampling;
mod step;
mod tools;

use std::sync::{Arc, Mutex};

use edgelm_core::engine::{Engine, GenParams, Generation, LoadOptions, StopRule};
use edgelm_core::gguf::{Array, Value};
use edgelm_core::quant::{GgmlType, Kernels, Level};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use errors::to_py;
use sampling::PySampling;

/// A GGUF model, memory-mapped and validated, ready to tokenize and generate.
#[pyclass(module = "edgelm._native", frozen)]
pub(crate) struct Model {
    pub(crate) engine: Arc<Engine>,
}

#[pymethods]
impl Model {
    #[new]
    #[pyo3(signature = (path, n_threads=None, kernel_level=None, n_ctx=None))]
    fn new(
        py: Python<'_>,
        path: std::path::PathBuf,
        n_threads: Option<usize>,
        kernel_level: Option<&str>,
        n_ctx: Option<usize>,
    ) -> PyResult<Self> {
        let kernel_level = match kernel_level {
            None => None,
            Some(s) => Some(Level::parse(s).ok_or_else(|| {
                errors::InvalidRequestError::new_err(format!(
                    "unknown kernel level {s:?}; expected one of scalar, avx2, avx512, neon, dotprod, i8mm"
                ))
            })?),
        };
        let opts = LoadOptions { n_threads, kernel_level, n_ctx };
        let engine = py.detach(|| Engine::load(&path, &opts)).map_err(to_py)?;
        Ok(Model { engine: Arc::new(engine) })
    }

    #[getter]
    fn architecture(&self) -> &'static str {
        self.engine.model.cfg.arch.name()
    }
    #[getter]
    fn n_vocab(&self) -> usize {
        self.engine.model.cfg.n_vocab
    }
    #[getter]
    fn n_ctx_train(&self) -> usize {
        self.engine.model.cfg.n_ctx_train
    }
    #[getter]
    fn n_embd(&self) -> usize {
        self.engine.model.cfg.n_embd
    }
    #[getter]
    fn n_layer(&self) -> usize {
        self.engine.model.cfg.n_layer
    }
    #[getter]
    fn n_head(&self) -> usize {
        self.engine.model.cfg.n_head
    }
    #[getter]
    fn n_head_kv(&self) -> usize {
        self.engine.model.cfg.n_head_kv
    }
    /// KV cache bytes one token occupies (all layers, K and V, f16).
    #[getter]
    fn kv_bytes_per_token(&self) -> usize {
        self.engine.kv_shape(1).bytes_per_token()
    }
    #[getter]
    fn n_threads(&self) -> usize {
        self.engine.n_threads
    }
    /// The CPU kernel level this model runs (scalar, avx2, avx512, neon, dotprod, i8mm).
    #[getter]
    fn kernel_level(&self) -> &'static str {
        self.engine.kernels.level.name()
    }
    #[getter]
    fn file_size(&self) -> usize {
        self.engine.model.file.file_size()
    }
    #[getter]
    fn gguf_version(&self) -> u32 {
        self.engine.model.file.version
    }
    #[getter]
    fn bos(&self) -> Option<u32> {
        self.engine.tokenizer.bos()
    }
    #[getter]
    fn eos(&self) -> Option<u32> {
        self.engine.tokenizer.eos()
    }
    #[getter]
    fn tokenizer_model(&self) -> &str {
        self.engine.tokenizer.model_name()
    }
    #[getter]
    fn tokenizer_pre(&self) -> &str {
        self.engine.tokenizer.pre_name()
    }
    #[getter]
    fn weight_bytes_per_token(&self) -> usize {
        self.engine.model.weight_bytes_per_token()
    }
    /// The tensor the RoPE frequency factors come from ("rope_freqs",
    /// "rope_factors_long", "rope_factors_short"), or None.
    #[getter]
    fn rope_factors(&self) -> Option<&'static str> {
        self.engine.model.rope_freqs_name
    }

    /// Each MoE layer's routing for `ids` run as one prompt: (layer, the router's input
    /// as float32 bytes `[len(ids)][n_embd]`, experts `[len(ids)][n_expert_used]` best
    /// first, their weights).
    #[allow(clippy::type_complexity)]
    fn moe_trace<'py>(
        &self,
        py: Python<'py>,
        ids: Vec<u32>,
    ) -> PyResult<Vec<(usize, Bound<'py, PyBytes>, Vec<u32>, Vec<f32>)>> {
        self.check_ids(&ids)?;
        let trace = py.detach(|| self.engine.moe_trace(&ids)).map_err(to_py)?;
        Ok(trace
            .into_iter()
            .map(|t| {
                let bytes: Vec<u8> = t.input.iter().flat_map(|v| v.to_le_bytes()).collect();
                (t.layer, PyBytes::new(py, &bytes), t.experts, t.weights)
            })
            .collect())
    }

    /// Seconds spent per kind of operation since the last call (needs EDGELM_PROFILE=1
    /// at load; empty otherwise). Resets the counters.
    fn profile(&self) -> Vec<(&'static str, f64)> {
        let p = &self.engine.model.profile;
        if p.enabled() {
            p.take()
        } else {
            Vec::new()
        }
    }

    /// The pooling an embedding model uses ("mean", "cls", "last"; "none" or "rank"
    /// for files that cannot embed), or None when the file sets none.
    #[getter]
    fn pooling(&self) -> Option<&'static str> {
        self.engine.model.cfg.pooling.map(|p| p.name())
    }
    /// An encoder (bert, nomic-bert), or a decoder whose file sets a pooling type.
    #[getter]
    fn is_embedding(&self) -> bool {
        self.engine.model.is_embedding()
    }
    /// The ids `tokenize(text, add_special=True)` puts before and after the text's
    /// own tokens ([CLS] … [SEP], BOS … EOS).
    fn special_affixes(&self) -> (Vec<u32>, Vec<u32>) {
        self.engine.tokenizer.special_affixes()
    }

    /// One pooled, unnormalized float32 vector per sequence, `len(seqs) * n_embd`
    /// values row-major, the sequences run as one batch (GIL released).
    fn embed_bytes<'py>(&self, py: Python<'py>, seqs: Vec<Vec<u32>>) -> PyResult<Bound<'py, PyBytes>> {
        let out = py.detach(|| self.engine.embed(&seqs)).map_err(to_py)?;
        let bytes: Vec<u8> = out.iter().flat_map(|v| v.to_le_bytes()).collect();
        Ok(PyBytes::new(py, &bytes))
    }

    fn is_eog(&self, token: u32) -> bool {
        self.engine.tokenizer.is_eog(token)
    }

    /// All metadata as a dict of Python values (arrays become lists).
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in self.engine.model.file.metadata() {
            d.set_item(k, value_to_py(py, v)?)?;
        }
        Ok(d)
    }

    /// (name, dims, type name, bytes) for every tensor, in file order.
    fn tensors(&self) -> Vec<(String, Vec<u64>, &'static str, u64)> {
        self.engine
            .model
            .file
            .tensors()
            .iter()
            .map(|t| (t.name.clone(), t.dims.clone(), t.ty.name(), t.n_bytes))
            .collect()
    }

    #[pyo3(signature = (text, add_special=true, parse_special=false))]
    fn tokenize(&self, py: Python<'_>, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let text = text.to_owned();
        py.detach(|| self.engine.tokenizer.encode(&text, add_special, parse_special))
    }

    #[pyo3(signature = (ids, special=false))]
    fn detokenize(&self, ids: Vec<u32>, special: bool) -> PyResult<String> {
        self.check_ids(&ids)?;
        Ok(self.engine.tokenizer.decode(&ids, special))
    }

    #[pyo3(signature = (id, special=true))]
    fn token_bytes<'py>(&self, py: Python<'py>, id: u32, special: bool) -> PyResult<Bound<'py, PyBytes>> {
        self.check_ids(&[id])?;
        Ok(PyBytes::new(py, &self.engine.tokenizer.token_bytes(id, special)))
    }

    /// Raw float32 logits, `len(ids) * n_vocab` values, row-major.
    fn logits_bytes<'py>(&self, py: Python<'py>, ids: Vec<u32>) -> PyResult<Bound<'py, PyBytes>> {
        let out = py.detach(|| self.engine.logits(&ids)).map_err(to_py)?;
        let bytes: Vec<u8> = out.iter().flat_map(|v| v.to_le_bytes()).collect();
        Ok(PyBytes::new(py, &bytes))
    }

    /// (perplexity, per-chunk NLL sums, tokens scored), llama-perplexity's method.
    fn perplexity(&self, py: Python<'_>, ids: Vec<u32>, n_ctx: usize) -> PyResult<(f64, Vec<f64>, usize)> {
        py.detach(|| self.engine.perplexity(&ids, n_ctx)).map_err(to_py)
    }

    /// Seconds for a prompt step of `n_prompt` tokens and for `n_gen` single-token
    /// steps (llama-bench's pp and tg measures).
    fn bench(&self, py: Python<'_>, n_prompt: usize, n_gen: usize) -> PyResult<(f64, f64)> {
        let t = py.detach(|| self.engine.bench(n_prompt, n_gen)).map_err(to_py)?;
        Ok((t.pp_s, t.tg_s))
    }

    /// Generate from `ids` on a cache of its own (the library path: llama.cpp's decode
    /// arithmetic). `sampling`: None = the defaults.
    #[pyo3(signature = (ids, sampling=None, max_tokens=256, stop_tokens=Vec::new(), stop_at_eog=true))]
    fn generate(
        &self,
        ids: Vec<u32>,
        sampling: Option<PyRef<'_, PySampling>>,
        max_tokens: usize,
        stop_tokens: Vec<u32>,
        stop_at_eog: bool,
    ) -> PyResult<Generator> {
        let sampling = sampling.map(|s| s.inner.clone()).unwrap_or_default();
        let params = GenParams { sampling, stop: StopRule { max_tokens, stop_tokens, stop_at_eog } };
        let gen = Generation::new(Arc::clone(&self.engine), &ids, params).map_err(to_py)?;
        Ok(Generator { inner: Mutex::new(gen) })
    }
}

impl Model {
    fn check_ids(&self, ids: &[u32]) -> PyResult<()> {
        let n = self.engine.model.cfg.n_vocab;
        match ids.iter().find(|&&t| t as usize >= n) {
            Some(bad) => Err(errors::InvalidRequestError::new_err(format!(
                "token id {bad} is out of range (vocabulary has {n} tokens)"
            ))),
            None => Ok(()),
        }
    }
}

/// Iterator of generated tokens: each item is
/// `(token, text, logprob, top_logprobs, finish_reason)`.
#[pyclass(module = "edgelm._native")]
struct Generator {
    inner: Mutex<Generation>,
}

type GenItem = (u32, String, f32, Vec<(u32, f32)>, Option<&'static str>);

#[pymethods]
impl Generator {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<GenItem>> {
        let step = py.detach(|| {
            let mut g = self
                .inner
                .lock()
                .map_err(|_| edgelm_core::Error::invalid("generator was poisoned by an earlier panic"))?;
            g.next_token()
        });
        match step.map_err(to_py)? {
            None => Ok(None),
            Some(t) => {
                Ok(Some((t.sampled.token, t.text, t.sampled.logprob, t.sampled.top, t.finish.map(|f| f.as_str()))))
            }
        }
    }

    /// Every token so far (prompt + generated).
    fn tokens(&self) -> PyResult<Vec<u32>> {
        let g = self.inner.lock().map_err(|_| PyValueError::new_err("generator poisoned"))?;
        Ok(g.tokens().to_vec())
    }
}

pub(crate) fn value_to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::U8(x) => x.into_pyobject(py)?.into_any(),
        Value::I8(x) => x.into_pyobject(py)?.into_any(),
        Value::U16(x) => x.into_pyobject(py)?.into_any(),
        Value::I16(x) => x.into_pyobject(py)?.into_any(),
        Value::U32(x) => x.into_pyobject(py)?.into_any(),
        Value::I32(x) => x.into_pyobject(py)?.into_any(),
        Value::U64(x) => x.into_pyobject(py)?.into_any(),
        Value::I64(x) => x.into_pyobject(py)?.into_any(),
        Value::F32(x) => x.into_pyobject(py)?.into_any(),
        Value::F64(x) => x.into_pyobject(py)?.into_any(),
        Value::Bool(x) => x.into_pyobject(py)?.to_owned().into_any(),
        Value::Str(s) => s.into_pyobject(py)?.into_any(),
        Value::Array(a) => array_to_py(py, a)?.into_any(),
    })
}

fn array_to_py<'py>(py: Python<'py>, a: &Array) -> PyResult<Bound<'py, PyList>> {
    match a {
        Array::U8(v) => PyList::new(py, v),
        Array::I8(v) => PyList::new(py, v),
        Array::U16(v) => PyList::new(py, v),
        Array::I16(v) => PyList::new(py, v),
        Array::U32(v) => PyList::new(py, v),
        Array::I32(v) => PyList::new(py, v),
        Array::U64(v) => PyList::new(py, v),
        Array::I64(v) => PyList::new(py, v),
        Array::F32(v) => PyList::new(py, v),
        Array::F64(v) => PyList::new(py, v),
        Array::Bool(v) => PyList::new(py, v),
        Array::Str(v) => PyList::new(py, v),
        Array::Array(v) => {
            let items = v.iter().map(|x| array_to_py(py, x)).collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)
        }
    }
}

/// Decode raw blocks of a GGML type to float32 bytes (used to check every format
/// against the `gguf` package bit for bit).
#[pyfunction]
fn dequantize<'py>(py: Python<'py>, ggml_type: u32, data: &[u8], n: usize) -> PyResult<Bound<'py, PyBytes>> {
    let ty = GgmlType::from_u32(ggml_type)
        .ok_or_else(|| PyValueError::new_err(format!("unknown ggml type id {ggml_type}")))?;
    match ty.row_bytes(n) {
        Some(rb) if rb == data.len() => {}
        _ => {
            return Err(PyValueError::new_err(format!(
                "{n} {} values need {:?} bytes, got {}",
                ty.name(),
                ty.row_bytes(n),
                data.len()
            )))
        }
    }
    let out = edgelm_core::quant::dequantize(ty, data, n);
    let bytes: Vec<u8> = out.iter().flat_map(|v| v.to_le_bytes()).collect();
    Ok(PyBytes::new(py, &bytes))
}

/// Memory read bandwidth in bytes/s (best of `reps` passes over `n_bytes`).
#[pyfunction]
#[pyo3(signature = (n_bytes=1073741824, n_threads=1, reps=5))]
fn read_bandwidth(py: Python<'_>, n_bytes: usize, n_threads: usize, reps: usize) -> f64 {
    py.detach(|| edgelm_core::bench::read_bandwidth(n_bytes, n_threads, reps))
}

/// The kernel level `Model` picks by default on this CPU (after EDGELM_KERNEL_LEVEL).
/// The CUDA device `ordinal` as a dict (name, arch, memory, integrated, driver),
/// opening it (and compiling the kernels) if needed; EdgelmError says why not.
#[pyfunction]
#[pyo3(signature = (ordinal=0))]
fn cuda_device<'py>(py: Python<'py>, ordinal: usize) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
    let gpu = py
        .detach(|| {
            if ordinal == 0 {
                edgelm_core::cuda::probe().map_err(edgelm_core::error::Error::Cuda)
            } else {
                edgelm_core::cuda::Gpu::open(ordinal)
            }
        })
        .map_err(to_py)?;
    let (free, total) = gpu.mem_info().map_err(to_py)?;
    let d = pyo3::types::PyDict::new(py);
    d.set_item("name", gpu.name.clone())?;
    d.set_item("arch", gpu.arch)?;
    d.set_item("free_bytes", free)?;
    d.set_item("total_bytes", total)?;
    d.set_item("integrated", gpu.integrated)?;
    d.set_item("driver_version", gpu.driver_version)?;
    d.set_item("kernels_from", gpu.kernels_from)?;
    Ok(d)
}

#[pyfunction]
fn kernel_level() -> &'static str {
    Kernels::detect().level.name()
}

/// Every kernel level this CPU can run, lowest first.
#[pyfunction]
fn available_kernel_levels() -> Vec<&'static str> {
    Kernels::available().iter().map(|l| l.name()).collect()
}

/// Physical cores, the default thread count.
#[pyfunction]
fn physical_cores() -> usize {
    edgelm_core::engine::physical_cores()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    m.add_class::<Model>()?;
    m.add_class::<Generator>()?;
    m.add_class::<PySampling>()?;
    m.add_class::<step::Executor>()?;
    m.add_class::<step::NewSequence>()?;
    m.add_class::<step::PyStepItem>()?;
    m.add_class::<step::StepPlan>()?;
    m.add_class::<step::SampledToken>()?;
    m.add_class::<step::StepResult>()?;
    m.add_function(wrap_pyfunction!(dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(physical_cores, m)?)?;
    m.add_function(wrap_pyfunction!(read_bandwidth, m)?)?;
    m.add_function(wrap_pyfunction!(kernel_level, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_device, m)?)?;
    m.add_function(wrap_pyfunction!(available_kernel_levels, m)?)?;
    m.add_function(wrap_pyfunction!(tools::file_types, m)?)?;
    m.add_function(wrap_pyfunction!(tools::quantize_plan, m)?)?;
    m.add_function(wrap_pyfunction!(tools::quantize_file, m)?)?;
    m.add_function(wrap_pyfunction!(tools::write_gguf, m)?)?;
    m.add_function(wrap_pyfunction!(tools::inspect_gguf, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
