//! `SamplingParams`: edgelm-core's sampling settings as one frozen Python object. The
//! fields, their defaults (`DEFAULT_SAMPLING`) and their limits (`validate`) live in
//! `edgelm_core::sample`; this is the conversion, and an invalid object cannot exist.

use edgelm_core::sample::{SamplingParams as Core, DEFAULT_SAMPLING as D};
use pyo3::prelude::*;

use crate::errors::to_py;

/// How a sequence's tokens are drawn (see the Rust `SamplingParams`): temperature
/// ≤ 0 is greedy; top_k 0, top_p 1 and min_p 0 switch those filters off;
/// repeat_last_n -1 (any negative) = the whole history; seed None = seeded from the OS; n_logprobs
/// = top alternatives reported per token; penalize_prompt False keeps the prompt out
/// of the penalties' window.
#[pyclass(module = "edgelm._native", name = "SamplingParams", frozen, eq)]
#[derive(Clone, PartialEq)]
pub struct PySampling {
    pub inner: Core,
}

/// Python's count: negative = the whole history.
fn last_n(n: i64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

fn checked(inner: Core) -> PyResult<PySampling> {
    inner.validate().map_err(to_py)?;
    Ok(PySampling { inner })
}

#[pymethods]
impl PySampling {
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (*, temperature=D.temperature, top_k=D.top_k, top_p=D.top_p, min_p=D.min_p,
                        repeat_penalty=D.repeat_penalty, repeat_last_n=D.repeat_last_n as i64,
                        frequency_penalty=D.frequency_penalty, presence_penalty=D.presence_penalty, seed=None,
                        n_logprobs=D.n_logprobs, penalize_prompt=D.penalize_prompt))]
    fn new(
        temperature: f32,
        top_k: usize,
        top_p: f32,
        min_p: f32,
        repeat_penalty: f32,
        repeat_last_n: i64,
        frequency_penalty: f32,
        presence_penalty: f32,
        seed: Option<u64>,
        n_logprobs: usize,
        penalize_prompt: bool,
    ) -> PyResult<Self> {
        checked(Core {
            temperature,
            top_k,
            top_p,
            min_p,
            repeat_penalty,
            repeat_last_n: last_n(repeat_last_n),
            frequency_penalty,
            presence_penalty,
            seed,
            n_logprobs,
            penalize_prompt,
        })
    }

    /// A copy with the given settings changed (None keeps a setting, the seed too).
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (*, temperature=None, top_k=None, top_p=None, min_p=None, repeat_penalty=None,
                        repeat_last_n=None, frequency_penalty=None, presence_penalty=None, seed=None,
                        n_logprobs=None, penalize_prompt=None))]
    fn replace(
        &self,
        temperature: Option<f32>,
        top_k: Option<usize>,
        top_p: Option<f32>,
        min_p: Option<f32>,
        repeat_penalty: Option<f32>,
        repeat_last_n: Option<i64>,
        frequency_penalty: Option<f32>,
        presence_penalty: Option<f32>,
        seed: Option<u64>,
        n_logprobs: Option<usize>,
        penalize_prompt: Option<bool>,
    ) -> PyResult<Self> {
        let p = &self.inner;
        checked(Core {
            temperature: temperature.unwrap_or(p.temperature),
            top_k: top_k.unwrap_or(p.top_k),
            top_p: top_p.unwrap_or(p.top_p),
            min_p: min_p.unwrap_or(p.min_p),
            repeat_penalty: repeat_penalty.unwrap_or(p.repeat_penalty),
            repeat_last_n: repeat_last_n.map(last_n).unwrap_or(p.repeat_last_n),
            frequency_penalty: frequency_penalty.unwrap_or(p.frequency_penalty),
            presence_penalty: presence_penalty.unwrap_or(p.presence_penalty),
            seed: seed.or(p.seed),
            n_logprobs: n_logprobs.unwrap_or(p.n_logprobs),
            penalize_prompt: penalize_prompt.unwrap_or(p.penalize_prompt),
        })
    }

    #[getter]
    fn temperature(&self) -> f32 {
        self.inner.temperature
    }
    #[getter]
    fn top_k(&self) -> usize {
        self.inner.top_k
    }
    #[getter]
    fn top_p(&self) -> f32 {
        self.inner.top_p
    }
    #[getter]
    fn min_p(&self) -> f32 {
        self.inner.min_p
    }
    #[getter]
    fn repeat_penalty(&self) -> f32 {
        self.inner.repeat_penalty
    }
    /// -1: the whole history.
    #[getter]
    fn repeat_last_n(&self) -> i64 {
        i64::try_from(self.inner.repeat_last_n).unwrap_or(-1)
    }
    #[getter]
    fn frequency_penalty(&self) -> f32 {
        self.inner.frequency_penalty
    }
    #[getter]
    fn presence_penalty(&self) -> f32 {
        self.inner.presence_penalty
    }
    #[getter]
    fn seed(&self) -> Option<u64> {
        self.inner.seed
    }
    #[getter]
    fn n_logprobs(&self) -> usize {
        self.inner.n_logprobs
    }
    #[getter]
    fn penalize_prompt(&self) -> bool {
        self.inner.penalize_prompt
    }

    fn __repr__(&self) -> String {
        let p = &self.inner;
        let seed = p.seed.map_or("None".to_owned(), |s| s.to_string());
        let penalize = if p.penalize_prompt { "True" } else { "False" };
        format!(
            "SamplingParams(temperature={:?}, top_k={}, top_p={:?}, min_p={:?}, repeat_penalty={:?}, repeat_last_n={}, \
             frequency_penalty={:?}, presence_penalty={:?}, seed={seed}, n_logprobs={}, penalize_prompt={penalize})",
            p.temperature,
            p.top_k,
            p.top_p,
            p.min_p,
            p.repeat_penalty,
            self.repeat_last_n(),
            p.frequency_penalty,
            p.presence_penalty,
            p.n_logprobs
        )
    }
}
