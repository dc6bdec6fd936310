//! The serving executor carries out a scheduler's plan (`Executor::run`): it forgets
//! the sequences the plan ends, registers the new ones (refusing bad parameters alone),
//! and ends a sequence by its `StopRule` — a stop token without its text, the last of
//! `max_tokens` with it — forgetting it at once. The library's `Generation` follows the
//! same rule.

mod common;

use std::sync::Arc;

use common::{tiny_llama, Tiny};
use edgelm_core::batch::{Executor, NewSeq, Plan, StepItem};
use edgelm_core::engine::{Engine, FinishReason, GenParams, Generation, LoadOptions, StopRule};
use edgelm_core::gguf::Gguf;
use edgelm_core::sample::SamplingParams;

fn engine() -> Arc<Engine> {
    let w = tiny_llama(&Tiny::default());
    let opts = LoadOptions { n_threads: Some(1), kernel_level: None, n_ctx: None };
    Arc::new(Engine::from_gguf(Gguf::from_bytes(w.to_bytes()).unwrap(), &opts).unwrap())
}

fn greedy() -> SamplingParams {
    SamplingParams { temperature: 0.0, ..Default::default() }
}

fn new_seq(id: u64, prompt: &[u32], max_tokens: usize, stop_tokens: Vec<u32>) -> NewSeq {
    NewSeq {
        id,
        prompt: prompt.to_vec(),
        sampling: greedy(),
        stop: StopRule { max_tokens, stop_tokens, stop_at_eog: false },
    }
}

/// Steps `id` (registered by `first`) until it ends; its tokens, last text and reason.
fn run_to_end(ex: &mut Executor, first: Plan, id: u64, prompt_len: usize) -> (Vec<u32>, String, FinishReason) {
    let table: Vec<u32> = (0..8).collect();
    let mut plan = first;
    let (mut start, mut end) = (0, prompt_len);
    let mut tokens = Vec::new();
    loop {
        plan.items = vec![StepItem { seq: id, start, end, block_table: table.clone(), sample: true, allowed: None }];
        let out = ex.run(plan).unwrap();
        assert!(out.refused.is_empty());
        let t = &out.tokens[0];
        tokens.push(t.sampled.token);
        if let Some(f) = t.finish {
            return (tokens, t.text.clone(), f);
        }
        (start, end) = (end, end + 1);
        plan = Plan::default();
    }
}

#[test]
fn the_stop_rule_ends_a_sequence_and_the_executor_forgets_it() {
    let engine = engine();
    let prompt = [1u32, 5, 9, 13];
    let mut ex = Executor::new(Arc::clone(&engine), 16).unwrap();
    let plan = Plan { new: vec![new_seq(1, &prompt, 4, vec![])], ..Plan::default() };
    let (free, _, why) = run_to_end(&mut ex, plan, 1, prompt.len());
    assert_eq!((free.len(), why), (4, FinishReason::Length));
    assert_eq!(ex.n_sequences(), 0, "a sequence ended by its rule is forgotten");

    // The third token as a stop token: it ends there, without its text.
    let plan = Plan { new: vec![new_seq(2, &prompt, 4, vec![free[2]])], ..Plan::default() };
    let (stopped, text, why) = run_to_end(&mut ex, plan, 2, prompt.len());
    assert_eq!((&stopped[..], why), (&free[..3], FinishReason::Stop));
    assert_eq!(text, "");
    assert_eq!(ex.n_sequences(), 0);

    // The library's generation: the same tokens and the same end.
    let params = GenParams {
        sampling: greedy(),
        stop: StopRule { max_tokens: 4, stop_tokens: vec![free[2]], stop_at_eog: false },
    };
    let mut g = Generation::new(Arc::clone(&engine), &prompt, params).unwrap();
    let mut lib = Vec::new();
    while let Some(t) = g.next_token().unwrap() {
        lib.push((t.sampled.token, t.finish));
    }
    assert_eq!(lib, vec![(free[0], None), (free[1], None), (free[2], Some(FinishReason::Stop))]);
}

#[test]
fn a_plan_forgets_ended_sequences_and_refuses_bad_ones_alone() {
    let mut ex = Executor::new(engine(), 16).unwrap();
    let mut bad = new_seq(2, &[1, 2, 3], 8, vec![]);
    bad.sampling.temperature = -1.0;
    let table = |k: u32| -> Vec<u32> { (4 * k..4 * k + 4).collect() };
    let plan = Plan {
        new: vec![new_seq(1, &[1, 2, 3], 8, vec![]), bad],
        items: vec![
            StepItem { seq: 1, start: 0, end: 3, block_table: table(0), sample: true, allowed: None },
            StepItem { seq: 2, start: 0, end: 3, block_table: table(1), sample: true, allowed: None },
        ],
        ..Plan::default()
    };
    let out = ex.run(plan).unwrap();
    assert_eq!(out.refused.len(), 1);
    assert_eq!(out.refused[0].0, 2);
    assert!(out.refused[0].1.contains("temperature"), "{}", out.refused[0].1);
    assert_eq!(out.tokens.iter().map(|t| t.seq).collect::<Vec<_>>(), vec![1]);
    assert_eq!(ex.n_sequences(), 1);
    let out = ex.run(Plan { finished: vec![1, 7], ..Plan::default() }).unwrap();
    assert!(out.tokens.is_empty() && out.refused.is_empty());
    assert_eq!(ex.n_sequences(), 0, "an ended sequence is forgotten (an unknown id is no error)");
}

/// A plan's KV copies (prompt reuse) put the source's entries where the items read
/// them: a sequence that takes over another's identical positions (no move) samples
/// exactly what that one did; copies that read and write one block, or name blocks
/// outside the cache, are refused before anything is written.
#[test]
fn kv_copies_take_entries_over_and_bad_ones_are_refused() {
    use edgelm_core::kv::KvCopy;
    let engine = engine();
    let mut ex = Executor::new(Arc::clone(&engine), 16).unwrap();
    let p: Vec<u32> = (0..40u32).map(|j| (j * 7 + 3) % 60).collect();
    let sampling = SamplingParams { temperature: 0.0, n_logprobs: 5, ..Default::default() };
    let seq = |id| NewSeq { id, prompt: p.clone(), sampling: sampling.clone(), stop: StopRule::never() };
    let (ta, tb): (Vec<u32>, Vec<u32>) = ((0..4).collect(), (4..8).collect());
    let item = |id, start, end, t: &Vec<u32>, sample| StepItem {
        seq: id,
        start,
        end,
        block_table: t.clone(),
        sample,
        allowed: None,
    };
    let a = ex.run(Plan { new: vec![seq(1)], items: vec![item(1, 0, 40, &ta, true)], ..Plan::default() }).unwrap();
    let copy = KvCopy { src_table: ta.clone(), src_start: 4, dst_table: tb.clone(), dst_start: 4, n: 30 };
    ex.run(Plan { new: vec![seq(2)], copies: vec![copy], items: vec![item(2, 0, 4, &tb, false)], ..Plan::default() })
        .unwrap();
    let b = ex.run(Plan { items: vec![item(2, 34, 40, &tb, true)], ..Plan::default() }).unwrap();
    assert_eq!(a.tokens[0].sampled, b.tokens[0].sampled);
    let bad = [
        KvCopy { src_table: ta.clone(), src_start: 0, dst_table: ta.clone(), dst_start: 4, n: 4 },
        KvCopy { src_table: vec![99], src_start: 0, dst_table: tb.clone(), dst_start: 0, n: 4 },
        KvCopy { src_table: ta.clone(), src_start: 0, dst_table: tb.clone(), dst_start: 0, n: 0 },
    ];
    for c in bad {
        let e = ex.run(Plan { copies: vec![c.clone()], ..Plan::default() }).unwrap_err().to_string();
        assert!(e.contains("block") || e.contains("0 positions"), "{c:?}: {e}");
    }
}
