//! The contract between the serving scheduler (Python, `edgelm/engine/scheduler.py`)
//! and the executor: one `StepPlan` in, one `StepResult` out, per step. The scheduler
//! decides (what runs, which blocks, what ended); `Executor.step(plan)` computes
//! (`edgelm_core::batch::Executor::run`). Tests drive the scheduler with a fake
//! executor that takes and returns the same objects.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use edgelm_core::batch::{Executor as CoreExecutor, NewSeq, Plan, StepItem as CoreItem};
use edgelm_core::cuda::DeviceChoice;
use edgelm_core::engine::StopRule;
use edgelm_core::kv::KvCopy;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::errors::to_py;
use crate::sampling::PySampling;
use crate::Model;

/// A sequence the executor has not seen: registered before the step that first feeds
/// it. It ends at a stop token (`stop_ids`, and the model's end-of-generation tokens
/// unless `ignore_eos`) or after `max_tokens` generated tokens.
#[pyclass(module = "edgelm._native", frozen, get_all)]
pub struct NewSequence {
    id: u64,
    prompt: Vec<u32>,
    sampling: Py<PySampling>,
    max_tokens: usize,
    stop_ids: Vec<u32>,
    ignore_eos: bool,
}

#[pymethods]
impl NewSequence {
    #[new]
    #[pyo3(signature = (id, prompt, sampling, max_tokens, stop_ids=Vec::new(), ignore_eos=false))]
    fn new(
        id: u64,
        prompt: Vec<u32>,
        sampling: Py<PySampling>,
        max_tokens: usize,
        stop_ids: Vec<u32>,
        ignore_eos: bool,
    ) -> Self {
        NewSequence { id, prompt, sampling, max_tokens, stop_ids, ignore_eos }
    }
}

/// One sequence's share of a step: feed its tokens `start..end` through
/// `block_table`; when `sample`, draw its next token from the last position.
#[pyclass(module = "edgelm._native", name = "StepItem", frozen, get_all)]
pub struct PyStepItem {
    id: u64,
    start: usize,
    end: usize,
    block_table: Vec<u32>,
    sample: bool,
}

#[pymethods]
impl PyStepItem {
    #[new]
    fn new(id: u64, start: usize, end: usize, block_table: Vec<u32>, sample: bool) -> Self {
        PyStepItem { id, start, end, block_table, sample }
    }
    fn __repr__(&self) -> String {
        format!("StepItem(id={}, {}..{}, sample={})", self.id, self.start, self.end, self.sample)
    }
}

/// What one step does: forget `finished` (sequences the scheduler ended), register
/// `new`, run `items` (decode tokens of running sequences and prompt chunks, at most
/// one item a sequence). `masks`: for constrained samples, the tokens they may take
/// as a little-endian u32 bitmask (llguidance's `compute_bitmask()`).
#[pyclass(module = "edgelm._native", frozen, get_all)]
pub struct StepPlan {
    new: Vec<Py<NewSequence>>,
    items: Vec<Py<PyStepItem>>,
    finished: Vec<u64>,
    masks: HashMap<u64, Vec<u8>>,
    /// KV runs taken over before the forward pass: (source block table, source start,
    /// destination block table, destination start, positions).
    copies: Vec<KvCopyTuple>,
}

type KvCopyTuple = (Vec<u32>, usize, Vec<u32>, usize, usize);

#[pymethods]
impl StepPlan {
    #[new]
    #[pyo3(signature = (new=Vec::new(), items=Vec::new(), finished=Vec::new(), masks=HashMap::new(), copies=Vec::new()))]
    fn new(
        new: Vec<Py<NewSequence>>,
        items: Vec<Py<PyStepItem>>,
        finished: Vec<u64>,
        masks: HashMap<u64, Vec<u8>>,
        copies: Vec<KvCopyTuple>,
    ) -> Self {
        StepPlan { new, items, finished, masks, copies }
    }
    /// Tokens the step computes.
    #[getter]
    fn n_tokens(&self, py: Python<'_>) -> usize {
        self.items.iter().map(|it| it.bind(py).get().end - it.bind(py).get().start).sum()
    }
    /// Nothing to do: no tokens to compute, nothing to register or forget.
    fn is_empty(&self) -> bool {
        self.new.is_empty() && self.items.is_empty() && self.finished.is_empty() && self.copies.is_empty()
    }
}

/// A token a step drew. `finish_reason` ("stop", "length") when it ended its sequence
/// (the executor has forgotten it); `text` is then the end of the sequence's text (a
/// stop token's own text is not part of it).
#[pyclass(module = "edgelm._native", frozen, get_all)]
pub struct SampledToken {
    id: u64,
    token: u32,
    logprob: f32,
    top: Vec<(u32, f32)>,
    text: String,
    finish_reason: Option<String>,
}

#[pymethods]
impl SampledToken {
    #[new]
    #[pyo3(signature = (id, token, logprob, text, top=Vec::new(), finish_reason=None))]
    fn new(
        id: u64,
        token: u32,
        logprob: f32,
        text: String,
        top: Vec<(u32, f32)>,
        finish_reason: Option<String>,
    ) -> Self {
        SampledToken { id, token, logprob, top, text, finish_reason }
    }
    fn __repr__(&self) -> String {
        format!(
            "SampledToken(id={}, token={}, text={:?}, finish_reason={:?})",
            self.id, self.token, self.text, self.finish_reason
        )
    }
}

/// What one step gave: the sampled tokens, in the plan's order; `refused`: new
/// sequences that could not be registered, with why (their items did not run).
#[pyclass(module = "edgelm._native", frozen, get_all)]
pub struct StepResult {
    tokens: Vec<Py<SampledToken>>,
    refused: HashMap<u64, String>,
}

#[pymethods]
impl StepResult {
    #[new]
    #[pyo3(signature = (tokens=Vec::new(), refused=HashMap::new()))]
    fn new(tokens: Vec<Py<SampledToken>>, refused: HashMap<u64, String>) -> Self {
        StepResult { tokens, refused }
    }
}

/// The batched executor: a shared paged KV cache of `n_blocks` blocks and the state
/// of every live sequence. `step` carries out a plan with the GIL released.
#[pyclass(module = "edgelm._native", frozen)]
pub struct Executor {
    inner: Mutex<CoreExecutor>,
    n_blocks: usize,
    block_size: usize,
}

impl Executor {
    fn lock(&self) -> PyResult<std::sync::MutexGuard<'_, CoreExecutor>> {
        self.inner.lock().map_err(|_| PyValueError::new_err("executor was poisoned by an earlier panic"))
    }
}

#[pymethods]
impl Executor {
    /// `device`: "cpu", or "cuda" / "cuda:N" (the weights are uploaded now; an
    /// EdgelmError says why when the GPU cannot take this model).
    #[new]
    #[pyo3(signature = (model, n_blocks, device="cpu"))]
    fn new(py: Python<'_>, model: &Model, n_blocks: usize, device: &str) -> PyResult<Self> {
        let choice: DeviceChoice = device.parse().map_err(to_py)?;
        let engine = Arc::clone(&model.engine);
        let ex = py
            .detach(|| match choice {
                DeviceChoice::Cpu => CoreExecutor::new(engine, n_blocks),
                DeviceChoice::Cuda(n) => CoreExecutor::new_cuda(engine, n_blocks, &edgelm_core::cuda::Gpu::open(n)?),
            })
            .map_err(to_py)?;
        let block_size = ex.block_size();
        Ok(Executor { inner: Mutex::new(ex), n_blocks, block_size })
    }
    /// "cpu", or "cuda:N (name, sm_XY)".
    #[getter]
    fn device(&self) -> PyResult<String> {
        Ok(self.lock()?.device())
    }
    #[getter]
    fn n_blocks(&self) -> usize {
        self.n_blocks
    }
    #[getter]
    fn block_size(&self) -> usize {
        self.block_size
    }
    /// Whether steps may carry KV copies (prompt reuse): the CPU backend only.
    #[getter]
    fn supports_kv_copies(&self) -> PyResult<bool> {
        Ok(self.lock()?.supports_kv_copies())
    }
    /// Sequences it holds state for.
    fn n_sequences(&self) -> PyResult<usize> {
        Ok(self.lock()?.n_sequences())
    }

    fn step(&self, py: Python<'_>, plan: &StepPlan) -> PyResult<StepResult> {
        if let Some((seq, m)) = plan.masks.iter().find(|(_, m)| m.len() % 4 != 0) {
            return Err(PyValueError::new_err(format!(
                "sequence {seq}: a token mask is whole u32 words; got {} bytes",
                m.len()
            )));
        }
        let new = plan
            .new
            .iter()
            .map(|n| {
                let n = n.get();
                NewSeq {
                    id: n.id,
                    prompt: n.prompt.clone(),
                    sampling: n.sampling.get().inner.clone(),
                    stop: StopRule {
                        max_tokens: n.max_tokens,
                        stop_tokens: n.stop_ids.clone(),
                        stop_at_eog: !n.ignore_eos,
                    },
                }
            })
            .collect();
        let items = plan
            .items
            .iter()
            .map(|it| {
                let it = it.get();
                let allowed = plan
                    .masks
                    .get(&it.id)
                    .map(|b| b.chunks_exact(4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])).collect());
                CoreItem {
                    seq: it.id,
                    start: it.start,
                    end: it.end,
                    block_table: it.block_table.clone(),
                    sample: it.sample,
                    allowed,
                }
            })
            .collect();
        let copies = plan
            .copies
            .iter()
            .map(|(st, ss, dt, ds, n)| KvCopy {
                src_table: st.clone(),
                src_start: *ss,
                dst_table: dt.clone(),
                dst_start: *ds,
                n: *n,
            })
            .collect();
        let plan = Plan { finished: plan.finished.clone(), new, copies, items };
        let out = py
            .detach(|| {
                let mut ex = self
                    .inner
                    .lock()
                    .map_err(|_| edgelm_core::Error::invalid("executor was poisoned by an earlier panic"))?;
                ex.run(plan)
            })
            .map_err(to_py)?;
        let tokens = out
            .tokens
            .into_iter()
            .map(|o| {
                Py::new(
                    py,
                    SampledToken {
                        id: o.seq,
                        token: o.sampled.token,
                        logprob: o.sampled.logprob,
                        top: o.sampled.top,
                        text: o.text,
                        finish_reason: o.finish.map(|f| f.as_str().to_owned()),
                    },
                )
            })
            .collect::<PyResult<_>>()?;
        Ok(StepResult { tokens, refused: out.refused.into_iter().collect() })
    }
}
