//! SentencePiece-style BPE (`tokenizer.ggml.model = "llama"`): Llama 1/2, Gemma.
//!
//! There is no merge list and no pre-tokenizer: the whole fragment (spaces already
//! spelled `▁`) starts as one symbol per character, and the adjacent pair whose
//! concatenation is the vocabulary entry with the highest *score* merges first, ties
//! to the leftmost pair — llama.cpp's `llm_tokenizer_spm_session`. Any entry counts,
//! whatever its type (control and user-defined texts too), as in llama.cpp.
//!
//! A finished symbol that is not an entry (a character the vocabulary lacks) falls back
//! to one `<0xXX>` byte token per UTF-8 byte.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::Vocab;

/// Tokenize one escaped fragment onto `out`. `byte_tokens[b]` is the fallback for byte b.
pub(super) fn encode(vocab: &Vocab, text: &str, byte_tokens: &[Option<u32>; 256], out: &mut Vec<u32>) {
    let mut syms: Vec<Sym> = text
        .char_indices()
        .map(|(start, c)| Sym { start: start as u32, len: c.len_utf8() as u32, prev: -1, next: -1 })
        .collect();
    let n = syms.len();
    for (i, s) in syms.iter_mut().enumerate() {
        s.prev = i as i32 - 1;
        s.next = if i + 1 == n { -1 } else { i as i32 + 1 };
    }

    let mut queue = BinaryHeap::new();
    for i in 1..n {
        push_pair(vocab, text, &syms, i as i32 - 1, i as i32, &mut queue);
    }
    while let Some(p) = queue.pop() {
        let (l, r) = (p.left as usize, p.right as usize);
        if syms[l].len == 0 || syms[r].len == 0 || syms[l].len + syms[r].len != p.len {
            continue;
        }
        let right = syms[r];
        syms[l].len += right.len;
        syms[l].next = right.next;
        syms[r].len = 0;
        if right.next >= 0 {
            syms[right.next as usize].prev = l as i32;
        }
        push_pair(vocab, text, &syms, syms[l].prev, l as i32, &mut queue);
        push_pair(vocab, text, &syms, l as i32, syms[l].next, &mut queue);
    }

    let mut i = if n == 0 { -1 } else { 0 };
    while i >= 0 {
        let s = syms[i as usize];
        let piece = &text[s.start as usize..(s.start + s.len) as usize];
        match vocab.id(piece) {
            Some(id) => out.push(id),
            None => out.extend(piece.bytes().filter_map(|b| byte_tokens[b as usize])),
        }
        i = s.next;
    }
}

fn push_pair(vocab: &Vocab, text: &str, syms: &[Sym], left: i32, right: i32, queue: &mut BinaryHeap<Pair>) {
    if left < 0 || right < 0 {
        return;
    }
    let (l, r) = (syms[left as usize], syms[right as usize]);
    let joined = &text[l.start as usize..(l.start + l.len + r.len) as usize];
    if let Some(id) = vocab.id(joined) {
        queue.push(Pair { score: vocab.score(id), left: left as u32, right: right as u32, len: l.len + r.len });
    }
}

#[derive(Clone, Copy)]
struct Sym {
    start: u32,
    /// Bytes covered; 0 once merged into the left neighbour.
    len: u32,
    prev: i32,
    next: i32,
}

/// A queued merge; the heap pops the highest score, then the leftmost.
#[derive(Clone, Copy)]
struct Pair {
    score: f32,
    left: u32,
    right: u32,
    len: u32,
}

impl Ord for Pair {
    fn cmp(&self, other: &Self) -> Ordering {
        // `partial_cmp`, not `total_cmp`: llama.cpp compares with `<`, so -0.0 and 0.0
        // tie and fall through to the position.
        self.score.partial_cmp(&other.score).unwrap_or(Ordering::Equal).then(other.left.cmp(&self.left))
    }
}
impl PartialOrd for Pair {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Pair {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Pair {}
