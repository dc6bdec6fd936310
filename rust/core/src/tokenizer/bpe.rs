//! Byte-level BPE (`tokenizer.ggml.model = "gpt2"`): GPT-2, SmolLM, Llama 3, Qwen 2.
//!
//! A text fragment is cut into words (`pretok`), each word's UTF-8 bytes are spelled
//! with GPT-2's byte↔unicode alphabet (printable Latin-1 bytes stand for themselves,
//! the other 68 bytes become U+0100..U+0143, so every vocabulary entry is printable
//! text), and adjacent symbols of the word are merged, lowest merge rank first, ties to
//! the leftmost pair — llama.cpp's `llm_tokenizer_bpe_session`.
//!
//! Merges are looked up by *interned piece ids* instead of strings: every vocabulary
//! text is a piece (id = token id) and merge halves or results that are not in the
//! vocabulary get ids past `n_vocab`. A word starts as one piece per byte, because one
//! byte is one character of the byte-level alphabet. A finished symbol whose piece is
//! not a token is emitted byte by byte, and only bytes whose alphabet character is a
//! single-byte token (printable ASCII) survive — llama.cpp looks up each *UTF-8 byte of
//! the spelled symbol* and silently drops the misses; we keep that behaviour.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use super::pretok::PreTokenizer;
use super::Vocab;

/// A piece id that no merge mentions.
const NO_PIECE: u32 = u32::MAX;

/// GPT-2's alphabet: byte → the character that spells it in vocabulary texts.
const BYTE_TO_CHAR: [char; 256] = {
    let mut table = ['\0'; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = spelling_of(b as u8);
        b += 1;
    }
    table
};

/// The 68 unprintable bytes in ascending order; the n-th is spelled U+0100 + n.
const UNPRINTABLE: [u8; 68] = {
    let mut table = [0u8; 68];
    let (mut b, mut n) = (0usize, 0usize);
    while b < 256 {
        if !printable_byte(b as u8) {
            table[n] = b as u8;
            n += 1;
        }
        b += 1;
    }
    assert!(n == 68);
    table
};

const fn spelling_of(b: u8) -> char {
    if printable_byte(b) {
        return b as char;
    }
    let mut n = 0;
    while UNPRINTABLE[n] != b {
        n += 1;
    }
    match char::from_u32(0x100 + n as u32) {
        Some(c) => c,
        None => panic!("U+0100..U+0143 are characters"),
    }
}

const fn printable_byte(b: u8) -> bool {
    matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// The byte a character of GPT-2's alphabet spells, if it is one.
pub(super) fn char_to_byte(c: char) -> Option<u8> {
    let c = c as u32;
    match c {
        0..=0xFF if printable_byte(c as u8) => Some(c as u8),
        0x100..=0x143 => Some(UNPRINTABLE[(c - 0x100) as usize]),
        _ => None,
    }
}

/// Spell raw bytes in GPT-2's alphabet.
pub(super) fn spell(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| BYTE_TO_CHAR[b as usize]).collect()
}

/// Merge rank and the piece the merge produces.
#[derive(Clone, Copy)]
struct Merge {
    rank: u32,
    result: u32,
}

pub(super) struct Bpe {
    pub pre: PreTokenizer,
    /// (left piece, right piece) → merge.
    merges: HashMap<(u32, u32), Merge>,
    /// The piece each raw byte starts as (its alphabet character), or `NO_PIECE`.
    byte_piece: [u32; 256],
    /// The token a lone byte falls back to when its symbol is not a token.
    byte_fallback: [Option<u32>; 256],
}

impl Bpe {
    /// `merges` are `tokenizer.ggml.merges`: "left right" in rank order.
    pub(super) fn new(vocab: &Vocab, pre: PreTokenizer, merges: &[String]) -> Bpe {
        let n_vocab = vocab.len() as u32;
        let mut extra: HashMap<String, u32> = HashMap::new();
        let mut intern = |text: &str| -> u32 {
            if let Some(id) = vocab.id(text) {
                return id;
            }
            let next = n_vocab + extra.len() as u32;
            *extra.entry(text.to_owned()).or_insert(next)
        };

        let mut table = HashMap::with_capacity(merges.len());
        for (rank, line) in merges.iter().enumerate() {
            // llama.cpp splits at the first space after the first byte, so a merge may
            // start with a space character; lines without one can never match.
            let Some(sp) = line.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1) else {
                continue;
            };
            let (left, right) = (&line[..sp], &line[sp + 1..]);
            let key = (intern(left), intern(right));
            let result = intern(&format!("{left}{right}"));
            // The first occurrence of a pair keeps its rank (`emplace`).
            table.entry(key).or_insert(Merge { rank: rank as u32, result });
        }

        let mut byte_piece = [NO_PIECE; 256];
        let mut byte_fallback = [None; 256];
        for b in 0..=255u8 {
            let spelled = BYTE_TO_CHAR[b as usize].to_string();
            byte_piece[b as usize] = vocab.id(&spelled).or_else(|| extra.get(&spelled).copied()).unwrap_or(NO_PIECE);
            // Only printable ASCII spells itself with one UTF-8 byte; the lone bytes of
            // a two-byte spelling are never vocabulary texts.
            if b.is_ascii() && printable_byte(b) {
                byte_fallback[b as usize] = vocab.id(&(b as char).to_string());
            }
        }

        Bpe { pre, merges: table, byte_piece, byte_fallback }
    }

    /// Tokenize one fragment of raw text (no special tokens inside) onto `out`.
    pub(super) fn encode(&self, vocab: &Vocab, text: &str, out: &mut Vec<u32>) {
        let mut scratch = Scratch::default();
        for word in self.pre.split(text) {
            let bytes = &text.as_bytes()[word];
            if self.pre.ignore_merges {
                if let Some(id) = vocab.id(&spell(bytes)) {
                    out.push(id);
                    continue;
                }
            }
            self.encode_word(vocab.len() as u32, bytes, &mut scratch, out);
        }
    }

    fn encode_word(&self, n_vocab: u32, bytes: &[u8], s: &mut Scratch, out: &mut Vec<u32>) {
        // Symbol i starts at byte i; merging folds a symbol into its left neighbour.
        s.syms.clear();
        s.syms.extend(bytes.iter().enumerate().map(|(i, &b)| Sym {
            piece: self.byte_piece[b as usize],
            len: 1,
            prev: i as i32 - 1,
            next: if i + 1 == bytes.len() { -1 } else { i as i32 + 1 },
        }));
        s.queue.clear();
        for i in 1..s.syms.len() {
            self.push_pair(&s.syms, i as i32 - 1, i as i32, &mut s.queue);
        }

        while let Some(Reverse(p)) = s.queue.pop() {
            let (l, r) = (p.left as usize, p.right as usize);
            // Stale if either side was merged away or grew since the pair was queued.
            if s.syms[l].len == 0 || s.syms[r].len == 0 || s.syms[l].len + s.syms[r].len != p.len {
                continue;
            }
            let right = s.syms[r];
            s.syms[l].len += right.len;
            s.syms[l].piece = p.result;
            s.syms[l].next = right.next;
            s.syms[r].len = 0;
            if right.next >= 0 {
                s.syms[right.next as usize].prev = l as i32;
            }
            self.push_pair(&s.syms, s.syms[l].prev, l as i32, &mut s.queue);
            self.push_pair(&s.syms, l as i32, s.syms[l].next, &mut s.queue);
        }

        let mut i = 0i32;
        while i >= 0 && (i as usize) < s.syms.len() {
            let sym = s.syms[i as usize];
            if sym.piece < n_vocab {
                out.push(sym.piece);
            } else {
                let start = i as usize;
                out.extend(
                    bytes[start..start + sym.len as usize].iter().filter_map(|&b| self.byte_fallback[b as usize]),
                );
            }
            i = sym.next;
        }
    }

    fn push_pair(&self, syms: &[Sym], left: i32, right: i32, queue: &mut BinaryHeap<Reverse<Pair>>) {
        if left < 0 || right < 0 {
            return;
        }
        let (l, r) = (syms[left as usize], syms[right as usize]);
        if let Some(m) = self.merges.get(&(l.piece, r.piece)) {
            queue.push(Reverse(Pair {
                rank: m.rank,
                left: left as u32,
                right: right as u32,
                len: l.len + r.len,
                result: m.result,
            }));
        }
    }
}

#[derive(Clone, Copy)]
struct Sym {
    piece: u32,
    /// Bytes covered; 0 once merged into the left neighbour.
    len: u32,
    prev: i32,
    next: i32,
}

/// A queued merge. Field order is the priority: lowest rank, then leftmost.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Pair {
    rank: u32,
    left: u32,
    right: u32,
    len: u32,
    result: u32,
}

/// Buffers reused across the words of one fragment.
#[derive(Default)]
struct Scratch {
    syms: Vec<Sym>,
    queue: BinaryHeap<Reverse<Pair>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_bpe_byte_alphabet_round_trips() {
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(BYTE_TO_CHAR[b as usize]), Some(b));
        }
        assert_eq!(BYTE_TO_CHAR[b' ' as usize], 'Ġ');
        assert_eq!(BYTE_TO_CHAR[b'\n' as usize], 'Ċ');
        assert_eq!(char_to_byte('€'), None);
    }
}
