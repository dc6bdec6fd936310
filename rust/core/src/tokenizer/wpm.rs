//! WordPiece (`tokenizer.ggml.model = "bert"`): BERT, MiniLM, BGE, E5, nomic-embed,
//! as llama.cpp's `llm_tokenizer_wpm_session` runs it.
//!
//! The converter stores the vocabulary in "phantom space" form: a word-initial piece
//! `hello` becomes `▁hello`, a continuation `##ing` becomes `ing`, control tokens
//! (`[CLS]`, `[SEP]`, ...) stay as they are. Encoding a fragment:
//!
//! 1. normalize (BertNormalizer): with `strip_accents`, every codepoint goes through
//!    llama.cpp's one-to-one "NFD" map (é → e; not Unicode's decomposition); then
//!    whitespace ends a word, NUL, U+FFFD and control characters are dropped, accent
//!    marks are dropped (with `strip_accents`), codepoints are lowercased (with
//!    `lowercase`), and punctuation, ASCII symbols and CJK ideographs become words of
//!    their own;
//! 2. each word, prefixed with `▁`, is split greedily into the longest vocabulary
//!    entries from the left (byte offsets, at most `max_token_len + 1` bytes a try);
//!    a word that cannot be split entirely becomes one `[UNK]`.
//!
//! `tokenizer.ggml.normalizer.lowercase` (default true) and `.strip_accents` (default:
//! what lowercase is) switch the normalizer steps, as in llama.cpp.

use super::unicode_data::{CATEGORY_RANGES, LOWERCASE, NFD, WHITESPACE};
use super::Vocab;

/// The phantom space that marks a word-initial piece.
const PHANTOM: &str = "\u{2581}";

#[derive(Clone, Copy, Debug)]
pub(super) struct Wpm {
    pub(super) lowercase: bool,
    pub(super) strip_accents: bool,
    /// Longest token text in bytes (llama.cpp's `max_token_len`).
    pub(super) max_token_len: usize,
    pub(super) unk: Option<u32>,
}

impl Wpm {
    /// Tokenize one fragment (no special tokens in it) onto `out`.
    pub(super) fn encode(&self, vocab: &Vocab, text: &str, out: &mut Vec<u32>) {
        let mut word1 = String::new();
        for word in self.words(text) {
            word1.clear();
            word1.push_str(PHANTOM);
            word1.push_str(&word);
            let bytes = word1.as_bytes();
            let n = bytes.len();
            let start = out.len();
            let mut i = 0;
            while i < n {
                // The longest entry starting at byte i. Byte offsets may cut a character:
                // such a slice is no valid text and so never an entry (as in llama.cpp,
                // whose lookup of the broken string fails).
                let hit = (i + 1..=n.min(i + self.max_token_len + 1))
                    .rev()
                    .find_map(|j| std::str::from_utf8(&bytes[i..j]).ok().and_then(|s| vocab.id(s)).map(|id| (j, id)));
                match hit {
                    Some((j, id)) => {
                        out.push(id);
                        i = j;
                    }
                    None => {
                        out.truncate(start);
                        break;
                    }
                }
            }
            if out.len() == start {
                // llama.cpp pushes its unknown id whatever it is; a vocabulary without one
                // (refused at load) cannot get here.
                out.extend(self.unk);
            }
        }
    }

    /// BertNormalizer + BertPreTokenizer: the words of `text`.
    fn words(&self, text: &str) -> Vec<String> {
        let mut words = vec![String::new()];
        for c in text.chars() {
            let mut cpt = c as u32;
            if self.strip_accents {
                cpt = nfd(cpt);
            }
            let flags = flags(cpt);
            if flags & WHITESPACE_BIT != 0 {
                if !words.last().expect("never empty").is_empty() {
                    words.push(String::new());
                }
                continue;
            }
            if cpt == 0 || cpt == 0xFFFD || flags & CONTROL != 0 {
                continue;
            }
            if self.strip_accents && flags & ACCENT_MARK != 0 {
                continue;
            }
            let out = if self.lowercase { tolower(cpt) } else { cpt };
            // Every codepoint here came from a char (or from the maps, whose values are
            // assigned characters), so it is a valid scalar value.
            let ch = char::from_u32(out).unwrap_or(char::REPLACEMENT_CHARACTER);
            if flags & PUNCTUATION != 0 || (cpt < 0x7F && flags & SYMBOL != 0) || is_chinese_char(cpt) {
                let last = words.last_mut().expect("never empty");
                if last.is_empty() {
                    last.push(ch);
                } else {
                    words.push(ch.to_string());
                }
                words.push(String::new());
            } else {
                words.last_mut().expect("never empty").push(ch);
            }
        }
        if words.last().is_some_and(|w| w.is_empty()) {
            words.pop();
        }
        words
    }
}

// Category bits of llama.cpp's `unicode_cpt_flags` (the range table's values).
const ACCENT_MARK: u16 = 0x0010;
const PUNCTUATION: u16 = 0x0020;
const SYMBOL: u16 = 0x0040;
const CONTROL: u16 = 0x0080;
const WHITESPACE_BIT: u16 = 0x0100;

fn flags(cpt: u32) -> u16 {
    if cpt > 0x10FFFF {
        return 0x0001; // undefined
    }
    let i = CATEGORY_RANGES.partition_point(|&(start, _)| start <= cpt) - 1;
    let mut bits = CATEGORY_RANGES[i].1 as u16;
    if WHITESPACE.binary_search(&cpt).is_ok() {
        bits |= WHITESPACE_BIT;
    }
    bits
}

/// llama.cpp's `unicode_tolower`: the lowercase map, else the codepoint itself.
fn tolower(cpt: u32) -> u32 {
    match LOWERCASE.binary_search_by_key(&cpt, |&(c, _)| c) {
        Ok(i) => LOWERCASE[i].1,
        Err(_) => cpt,
    }
}

/// llama.cpp's `unicode_cpts_normalize_nfd` for one codepoint: the base character of
/// the range it falls in, else itself.
fn nfd(cpt: u32) -> u32 {
    let i = NFD.partition_point(|&(first, _, _)| first <= cpt);
    match NFD.get(i.wrapping_sub(1)) {
        Some(&(first, last, base)) if first <= cpt && cpt <= last => base,
        _ => cpt,
    }
}

/// CJK ideographs, which BERT splits into single-character words (the ranges of
/// HF's `_is_chinese_char`, including its 0x2B920 typo, as llama.cpp copies them).
fn is_chinese_char(cpt: u32) -> bool {
    matches!(cpt,
        0x04E00..=0x09FFF | 0x03400..=0x04DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F | 0x2B920..=0x2CEAF | 0x0F900..=0x0FAFF | 0x2F800..=0x2FA1F)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str) -> Vec<String> {
        Wpm { lowercase: true, strip_accents: true, max_token_len: 8, unk: None }.words(text)
    }

    #[test]
    fn tokenizer_wpm_normalizes_like_bert() {
        assert_eq!(words("Hello, World!"), ["hello", ",", "world", "!"]);
        assert_eq!(words("Café  naïve\tRÉSUMÉ"), ["cafe", "naive", "resume"]);
        assert_eq!(words("我爱ab"), ["我", "爱", "ab"]);
        // Symbols split only in ASCII; control characters vanish.
        assert_eq!(words("a+b ±c\u{7}d"), ["a", "+", "b", "±cd"]);
        assert_eq!(words("  "), Vec::<String>::new());
        let keep = Wpm { lowercase: false, strip_accents: false, max_token_len: 8, unk: None };
        assert_eq!(keep.words("Café"), ["Café"]);
    }

    #[test]
    fn tokenizer_wpm_maps_from_llama_tables() {
        assert_eq!(tolower('A' as u32), 'a' as u32);
        assert_eq!(tolower('Ω' as u32), 'ω' as u32);
        assert_eq!(tolower('1' as u32), '1' as u32);
        assert_eq!(nfd('é' as u32), 'e' as u32);
        assert_eq!(nfd('Å' as u32), 'A' as u32);
        assert_eq!(nfd('x' as u32), 'x' as u32);
    }
}
