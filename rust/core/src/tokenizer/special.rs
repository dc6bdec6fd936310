//! Special-token partitioning: cut the input into raw-text fragments and whole special
//! tokens (`<|im_start|>`, `<start_of_turn>`, user-defined pieces) before the model
//! tokenizer sees the text — llama.cpp's `tokenizer_st_partition`.
//!
//! llama.cpp takes the special tokens one at a time, longest text first, and splits
//! every remaining raw fragment at each non-overlapping leftmost occurrence of that
//! token. That is *not* a leftmost-longest scan: in "abcd" with specials "ab" and "bcd",
//! "bcd" wins because it is longer, though "ab" starts first. We reproduce the same
//! result without its O(specials × text) loop: one Aho-Corasick pass finds every
//! (overlapping) occurrence, and occurrences are accepted in llama.cpp's order —
//! by token priority, then position — when they do not touch text already taken.
//!
//! Control and unknown tokens are only recognised with `parse_special`; user-defined
//! tokens always are (HF tokenizers split them out before the pre-tokenizer too).
//! Tokens marked LSTRIP/RSTRIP also swallow the ASCII whitespace beside them.

use std::collections::BTreeMap;

use aho_corasick::{AhoCorasick, MatchKind};

use super::Attr;
use crate::error::{Error, Result};

/// A piece of the input: text for the model tokenizer, or one special token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

struct Pattern {
    id: u32,
    len: usize,
    /// Control or unknown: only matched when the caller asks to parse specials.
    needs_parse_special: bool,
    lstrip: bool,
    rstrip: bool,
}

pub(super) struct Specials {
    /// Patterns in priority order (longest text first, then lowest id); `None` when the
    /// vocabulary has no special tokens.
    matcher: Option<AhoCorasick>,
    patterns: Vec<Pattern>,
}

/// A span of the input taken by an accepted token, including stripped whitespace.
#[derive(Clone, Copy)]
struct Taken {
    end: usize,
    id: u32,
}

impl Specials {
    /// `specials` are (id, text, attributes) of every control, user-defined and unknown
    /// token.
    pub(super) fn new(mut specials: Vec<(u32, &str, Attr)>) -> Result<Specials> {
        // llama.cpp sorts by length only (unstable); ties between different texts of
        // equal length only matter when they overlap, and lowest id first is as good a
        // rule as any.
        specials.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
        let patterns = specials
            .iter()
            .map(|&(id, text, attr)| Pattern {
                id,
                len: text.len(),
                needs_parse_special: attr.has(Attr::CONTROL) || attr.has(Attr::UNKNOWN),
                lstrip: attr.has(Attr::LSTRIP),
                rstrip: attr.has(Attr::RSTRIP),
            })
            .collect();
        let matcher = if specials.is_empty() {
            None
        } else {
            let texts = specials.iter().map(|s| s.1);
            Some(AhoCorasick::builder().match_kind(MatchKind::Standard).build(texts).map_err(|e| {
                Error::Tokenizer(format!(
                    "cannot index the {} special tokens of tokenizer.ggml.tokens: {e}",
                    specials.len()
                ))
            })?)
        };
        Ok(Specials { matcher, patterns })
    }

    pub(super) fn partition<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
        let Some(matcher) = &self.matcher else {
            return vec![Fragment::Text(text)];
        };

        // Every occurrence, in the order llama.cpp would consider it.
        let mut found: Vec<(usize, usize)> = matcher
            .find_overlapping_iter(text)
            .map(|m| (m.pattern().as_usize(), m.start()))
            .filter(|&(p, _)| parse_special || !self.patterns[p].needs_parse_special)
            .collect();
        if found.is_empty() {
            return vec![Fragment::Text(text)];
        }
        found.sort_unstable();

        // Taken spans keyed by start; they never overlap.
        let mut taken: BTreeMap<usize, Taken> = BTreeMap::new();
        for (p, start) in found {
            let pat = &self.patterns[p];
            let end = start + pat.len;
            let before = taken.range(..end).next_back().map(|(_, t)| t.end);
            if before.is_some_and(|e| e > start) {
                continue;
            }
            // Whitespace stripping stays inside the raw fragment the token was found in.
            let left_bound = taken.range(..start).next_back().map_or(0, |(_, t)| t.end);
            let right_bound = taken.range(end..).next().map_or(text.len(), |(&s, _)| s);
            let bytes = text.as_bytes();
            let mut span_start = start;
            if pat.lstrip {
                while span_start > left_bound && is_c_space(bytes[span_start - 1]) {
                    span_start -= 1;
                }
            }
            let mut span_end = end;
            if pat.rstrip {
                while span_end < right_bound && is_c_space(bytes[span_end]) {
                    span_end += 1;
                }
            }
            taken.insert(span_start, Taken { end: span_end, id: pat.id });
        }

        let mut out = Vec::with_capacity(taken.len() * 2 + 1);
        let mut at = 0;
        for (&start, t) in &taken {
            // Stripped whitespace belongs to the span, so it is dropped here.
            if start > at {
                out.push(Fragment::Text(&text[at..start]));
            }
            out.push(Fragment::Token(t.id));
            at = t.end;
        }
        if at < text.len() {
            out.push(Fragment::Text(&text[at..]));
        }
        out
    }
}

/// C's `isspace` in the "C" locale, which llama.cpp strips with.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specials(list: &[(u32, &'static str, u16)]) -> Specials {
        Specials::new(list.iter().map(|&(id, t, a)| (id, t, Attr(a))).collect()).unwrap()
    }

    #[test]
    fn tokenizer_special_longer_token_wins_even_when_later() {
        let s = specials(&[(1, "ab", Attr::CONTROL), (2, "bcd", Attr::CONTROL)]);
        assert_eq!(s.partition("abcd", true), [Fragment::Text("a"), Fragment::Token(2)]);
    }

    #[test]
    fn tokenizer_special_control_needs_parse_special() {
        let s = specials(&[(1, "<c>", Attr::CONTROL), (2, "<u>", Attr::USER_DEFINED)]);
        assert_eq!(s.partition("x<c>y<u>", false), [Fragment::Text("x<c>y"), Fragment::Token(2)]);
        assert_eq!(
            s.partition("x<c>y<u>", true),
            [Fragment::Text("x"), Fragment::Token(1), Fragment::Text("y"), Fragment::Token(2)]
        );
    }

    #[test]
    fn tokenizer_special_rstrip_eats_following_spaces() {
        let s = specials(&[(1, "<c>", Attr::CONTROL | Attr::RSTRIP)]);
        assert_eq!(
            s.partition("a<c>  b<c>", true),
            [Fragment::Text("a"), Fragment::Token(1), Fragment::Text("b"), Fragment::Token(1)]
        );
    }
}
