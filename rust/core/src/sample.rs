//! Sampling: logits → one token, in llama.cpp's default order
//! (penalties → top-k → top-p → min-p → temperature → draw).
//!
//! Log-probabilities reported to callers are those of the model's own distribution
//! (log-softmax of the raw logits), as the OpenAI API reports them — not of the
//! filtered, tempered distribution the token was drawn from.

use std::collections::HashMap;

use crate::error::{Error, Result};

/// How one sequence's tokens are drawn: the one definition of the sampling settings,
/// their defaults (llama.cpp's) and their limits. Python sees it as
/// `edgelm._native.SamplingParams`; the HTTP APIs build it from a request
/// (`from_openai`, `from_ollama`) and the serving scheduler hands it, unchanged, to
/// the executor's `Sampler`.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// ≤ 0 means greedy (argmax after penalties).
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0.0 disables.
    pub min_p: f32,
    /// 1.0 disables. Divides positive logits, multiplies negative ones.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties look at (0 = none, usize::MAX = all).
    pub repeat_last_n: usize,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// Fixed seed → reproducible draws. None → seeded from the OS.
    pub seed: Option<u64>,
    /// How many top alternatives to report per token (0 = none).
    pub n_logprobs: usize,
    /// Whether the penalties' window may reach into the prompt. A tool-use prompt
    /// spells out the call syntax the answer must repeat, and penalising it talks a
    /// small model out of calling.
    pub penalize_prompt: bool,
}

/// The defaults, as a constant (the Python constructor's keyword defaults read it).
pub const DEFAULT_SAMPLING: SamplingParams = SamplingParams {
    temperature: 0.8,
    top_k: 40,
    top_p: 0.95,
    min_p: 0.05,
    repeat_penalty: 1.0,
    repeat_last_n: 64,
    frequency_penalty: 0.0,
    presence_penalty: 0.0,
    seed: None,
    n_logprobs: 0,
    penalize_prompt: true,
};

impl Default for SamplingParams {
    fn default() -> Self {
        DEFAULT_SAMPLING
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, ..Default::default() }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, v: f32, range: &str| Err(Error::invalid(format!("{what} is {v}; it must be {range}")));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad("temperature", self.temperature, "a finite number ≥ 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", self.top_p, "in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", self.min_p, "in [0, 1]");
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return bad("repeat_penalty", self.repeat_penalty, "a finite number > 0");
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return bad("frequency_penalty", self.frequency_penalty, "in [-2, 2]");
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return bad("presence_penalty", self.presence_penalty, "in [-2, 2]");
        }
        // The HTTP APIs allow 20; tools (the reuse quality bench) ask for the whole
        // vocabulary.
        if self.n_logprobs > MAX_LOGPROBS {
            return Err(Error::invalid(format!(
                "top logprobs is {}; at most {MAX_LOGPROBS} are returned",
                self.n_logprobs
            )));
        }
        Ok(())
    }
}

/// The most top log-probabilities a sample returns.
pub const MAX_LOGPROBS: usize = 1 << 18;

#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// log p(token) under the model's distribution.
    pub logprob: f32,
    /// The `n_logprobs` most likely tokens with their log-probabilities, best first.
    pub top: Vec<(u32, f32)>,
}

pub struct Sampler {
    pub params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Sampler> {
        params.validate()?;
        let seed = params.seed.unwrap_or_else(os_seed);
        Ok(Sampler { params, rng: Rng::new(seed) })
    }

    /// `history`: every token of the sequence so far (prompt + generated).
    pub fn sample(&mut self, raw: &[f32], history: &[u32]) -> Sampled {
        self.sample_with_lse(raw, history, log_sum_exp(raw))
    }

    /// `sample` with `raw`'s log-sum-exp already known (the GPU computes it beside the
    /// logits: a pass over the vocabulary in f64 per sequence is the host's largest
    /// cost in a decode step).
    pub fn sample_with_lse(&mut self, raw: &[f32], history: &[u32], lse: f32) -> Sampled {
        let p = &self.params;
        let top = if p.n_logprobs > 0 {
            top_n(raw, p.n_logprobs).into_iter().map(|(t, l)| (t, l - lse)).collect()
        } else {
            Vec::new()
        };

        let penalised;
        let logits = if self.has_penalties() {
            penalised = self.apply_penalties(raw, history);
            &penalised[..]
        } else {
            raw
        };

        let token = if p.temperature <= 0.0 { argmax(logits) } else { self.draw(logits) };
        Sampled { token, logprob: raw[token as usize] - lse, top }
    }

    /// Greedy with nothing that needs the logits beyond their maximum: no penalties, no
    /// top log-probabilities. Its pick is `argmax` of the raw logits, and its
    /// log-probability that logit minus the log-sum-exp (what `pick_greedy` takes).
    pub fn plain_greedy(&self) -> bool {
        self.params.temperature <= 0.0 && !self.has_penalties() && self.params.n_logprobs == 0
    }

    /// `sample_with_lse` for a `plain_greedy` sampler, given the row's first maximum
    /// (token, logit) and log-sum-exp: the same result, without the row.
    pub fn pick_greedy(&self, token: u32, logit: f32, lse: f32) -> Sampled {
        debug_assert!(self.plain_greedy());
        Sampled { token, logprob: logit - lse, top: Vec::new() }
    }

    fn has_penalties(&self) -> bool {
        let p = &self.params;
        p.repeat_last_n > 0 && (p.repeat_penalty != 1.0 || p.frequency_penalty != 0.0 || p.presence_penalty != 0.0)
    }

    fn apply_penalties(&self, logits: &[f32], history: &[u32]) -> Vec<f32> {
        let p = &self.params;
        let window = &history[history.len().saturating_sub(p.repeat_last_n)..];
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &t in window {
            *counts.entry(t).or_default() += 1;
        }
        let mut out = logits.to_vec();
        for (&t, &c) in &counts {
            let Some(l) = out.get_mut(t as usize) else { continue };
            if *l > 0.0 {
                *l /= p.repeat_penalty;
            } else {
                *l *= p.repeat_penalty;
            }
            *l -= c as f32 * p.frequency_penalty + p.presence_penalty;
        }
        out
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        // Candidates sorted by logit, best first; top-k bounds the sort.
        let k = if p.top_k == 0 { logits.len() } else { p.top_k.min(logits.len()) };
        let mut cand = top_n(logits, k.min(logits.len()));
        // top-p and min-p on the untempered softmax, as llama.cpp orders them.
        let max = cand[0].1;
        let probs: Vec<f32> = cand.iter().map(|&(_, l)| (l - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        let mut keep = cand.len();
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, &pr) in probs.iter().enumerate() {
                cum += pr / total;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            // probs[0] is the max (=1 before normalisation).
            let n = probs[..keep].iter().take_while(|&&pr| pr >= p.min_p).count();
            keep = n.max(1);
        }
        cand.truncate(keep);
        let weights: Vec<f64> = cand.iter().map(|&(_, l)| (((l - max) / p.temperature) as f64).exp()).collect();
        let sum: f64 = weights.iter().sum();
        let mut r = self.rng.next_f64() * sum;
        for (i, w) in weights.iter().enumerate() {
            if r < *w {
                return cand[i].0;
            }
            r -= w;
        }
        cand[cand.len() - 1].0
    }
}

pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    let mut bv = f32::NEG_INFINITY;
    for (i, &v) in x.iter().enumerate() {
        if v > bv {
            bv = v;
            best = i;
        }
    }
    best as u32
}

pub fn log_sum_exp(x: &[f32]) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f64 = x.iter().map(|&v| ((v - max) as f64).exp()).sum();
    max + s.ln() as f32
}

/// log-softmax value of every entry (used by perplexity and `logprobs`).
pub fn log_softmax(x: &[f32]) -> Vec<f32> {
    let lse = log_sum_exp(x);
    x.iter().map(|&v| v - lse).collect()
}

/// The n largest entries, best first (ties: lower id first).
pub fn top_n(x: &[f32], n: usize) -> Vec<(u32, f32)> {
    let n = n.min(x.len());
    if n == 0 {
        return Vec::new();
    }
    let mut idx: Vec<u32> = (0..x.len() as u32).collect();
    let cmp = |a: &u32, b: &u32| x[*b as usize].total_cmp(&x[*a as usize]).then(a.cmp(b));
    if n < idx.len() {
        idx.select_nth_unstable_by(n - 1, cmp);
        idx.truncate(n);
    }
    idx.sort_unstable_by(cmp);
    idx.into_iter().map(|i| (i, x[i as usize])).collect()
}

fn os_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}

/// xoshiro256** seeded through splitmix64: small, fast, reproducible across platforms.
struct Rng {
    s: [u64; 4],
}

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            x ^ (x >> 31)
        };
        Rng { s: [next(), next(), next(), next()] }
    }
    fn next_u64(&mut self) -> u64 {
        let r = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        r
    }
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The GPU's greedy shortcut (`pick_greedy` from a row's first maximum and its
    /// log-sum-exp) gives what `sample_with_lse` gives from the whole row, ties and
    /// infinities included; and only plain greedy samplers take it.
    #[test]
    fn pick_greedy_equals_sampling_the_row() {
        let mut s = Sampler::new(SamplingParams { temperature: 0.0, seed: Some(1), ..Default::default() }).unwrap();
        assert!(s.plain_greedy());
        let rows: Vec<Vec<f32>> = vec![
            vec![0.5, 2.0, -1.0, 2.0, 1.5],
            vec![f32::NEG_INFINITY; 4],
            vec![-3.0, f32::NEG_INFINITY, -3.5, -2.9999],
            (0..1000).map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0).collect(),
        ];
        for row in &rows {
            let lse = log_sum_exp(row);
            let full = s.sample_with_lse(row, &[], lse);
            // The GPU's pick: the first index of the maximum, and that logit.
            let best = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let first = if best == f32::NEG_INFINITY { 0 } else { row.iter().position(|&v| v == best).unwrap() };
            let short = s.pick_greedy(first as u32, best, lse);
            assert_eq!(
                (full.token, full.logprob.to_bits(), full.top.len()),
                (short.token, short.logprob.to_bits(), 0),
                "{row:?}"
            );
        }
        for p in [
            SamplingParams { temperature: 0.7, ..Default::default() },
            SamplingParams { temperature: 0.0, n_logprobs: 2, ..Default::default() },
            SamplingParams { temperature: 0.0, repeat_penalty: 1.1, repeat_last_n: 64, ..Default::default() },
        ] {
            assert!(!Sampler::new(p).unwrap().plain_greedy());
        }
    }
}
