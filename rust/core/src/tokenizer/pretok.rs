//! Pre-tokenization for byte-level BPE: cut a text fragment into words before merging.
//!
//! HF tokenizers describe this step with regexes such as GPT-2's
//! `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)`. llama.cpp
//! does not run those regexes as written: the common ones are hand-written scanners
//! (`unicode_regex_split_custom_*` in unicode.cpp) and the rest go through `std::regex`
//! on a "collapsed" text where each non-ASCII codepoint becomes one byte naming its
//! category. Matching llama.cpp token for token means matching those scanners, quirks
//! included, so this file ports the scanners instead of using a regex engine:
//!
//! - `\p{L}`, `\p{N}`, `\p{P}` and `\s` come from llama.cpp's own Unicode table
//!   (`unicode_data.rs`, generated from its unicode-data.cpp), not from a crate;
//! - the scanners look at codepoints *within the current segment only*: a later regex
//!   of a chain never sees across a cut made by an earlier one;
//! - `(?i:'s|...)` lowercases with llama.cpp's table, which maps nothing non-ASCII onto
//!   the contraction letters, so ASCII lowercasing is exact;
//! - unassigned codepoints are "undefined", not "absent": they count as
//!   `[^\s\p{L}\p{N}]` (only positions past the segment end have no flags at all).
//!
//! A pre-tokenizer is a chain of `Split`s, applied in order; each refines the segments
//! the previous one produced. Segments and words are measured in codepoints.

use super::unicode_data::{CATEGORY_RANGES, WHITESPACE};

// ---------------------------------------------------------------------------------------
// Codepoint classes
// ---------------------------------------------------------------------------------------

/// Category bits as llama.cpp's `unicode_cpt_flags` lays them out, plus whitespace.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct Flags(u16);

impl Flags {
    const UNDEFINED: u16 = 0x0001;
    const NUMBER: u16 = 0x0002;
    const LETTER: u16 = 0x0004;
    const PUNCTUATION: u16 = 0x0020;
    const WHITESPACE: u16 = 0x0100;

    /// No flags at all: what llama.cpp's scanners see past the end of a segment.
    const NONE: Flags = Flags(0);

    fn of(cpt: u32) -> Flags {
        if cpt > 0x10FFFF {
            return Flags(Self::UNDEFINED);
        }
        let i = CATEGORY_RANGES.partition_point(|&(start, _)| start <= cpt) - 1;
        let mut bits = CATEGORY_RANGES[i].1 as u16;
        if WHITESPACE.binary_search(&cpt).is_ok() {
            bits |= Self::WHITESPACE;
        }
        Flags(bits)
    }
    fn is_number(self) -> bool {
        self.0 & Self::NUMBER != 0
    }
    fn is_letter(self) -> bool {
        self.0 & Self::LETTER != 0
    }
    fn is_punctuation(self) -> bool {
        self.0 & Self::PUNCTUATION != 0
    }
    fn is_whitespace(self) -> bool {
        self.0 & Self::WHITESPACE != 0
    }
    /// Any flag set, i.e. a codepoint inside the segment.
    fn is_some(self) -> bool {
        self.0 != 0
    }
    /// `[^\s\p{L}\p{N}]` for a position inside the segment.
    fn is_other(self) -> bool {
        !(self.is_whitespace() || self.is_letter() || self.is_number()) && self.is_some()
    }
}

// ---------------------------------------------------------------------------------------
// Pre-tokenizer chains, by `tokenizer.ggml.pre`
// ---------------------------------------------------------------------------------------

/// One regex of a chain.
#[derive(Clone, Copy, Debug)]
enum Split {
    /// GPT-2: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)`
    Gpt2,
    /// Llama 3: `(?i:'s|...)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
    Llama3,
    /// Qwen 2: as Llama 3 but `\p{N}` (one digit per word).
    Qwen2,
    /// `\p{N}`: every number codepoint becomes its own word.
    EachNumber,
    /// `\p{N}+`: runs of number codepoints.
    NumberRuns,
    /// `[\p{P}\$\+<=>\^~\|]+`: runs of punctuation and those ASCII symbols.
    PunctRuns,
    /// `[0-9][0-9][0-9]`: ASCII digit triples.
    DigitTriples,
}

/// How a BPE vocabulary wants text cut into words, and the flags llama.cpp ties to the
/// same `tokenizer.ggml.pre` name.
#[derive(Clone, Debug)]
pub(super) struct PreTokenizer {
    splits: &'static [Split],
    /// Words that are whole vocabulary entries skip merging (Llama 3's tokenizer.json).
    pub ignore_merges: bool,
    /// Default for `add_bos` when the file has no `tokenizer.ggml.add_bos_token`.
    pub add_bos: bool,
    /// Apply llama.cpp's `clean_up_tokenization_spaces` passes when detokenizing.
    pub clean_spaces: bool,
    /// The family has no BOS token unless the file names one (ChatGLM).
    pub no_default_bos: bool,
}

const GPT2: &[&str] = &["gpt-2", "phi-2", "gigachat", "a.x-4.0", "mellum", "mpt", "olmo", "jais", "exaone4"];
const GPT2_NO_CLEAN: &[&str] = &["trillion", "granite-docling"];
const DIGITS_GPT2: &[&str] = &["starcoder", "refact", "codeshell", "exaone", "minerva-7b", "mellum2"];
const DIGITS_GPT2_NO_CLEAN: &[&str] = &["smollm", "command-r"];
const LLAMA3: &[&str] =
    &["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"];
const LLAMA3_REGEX_ONLY: &[&str] = &["dbrx", "smaug-bpe"];
const CHATGLM: &[&str] = &["chatglm-bpe"];
const CHATGLM_IGNORE_MERGES: &[&str] = &["glm4", "glm5"];
const QWEN2_NO_CLEAN: &[&str] = &["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "hunyuan", "solar-open", "grok-2"];
const QWEN2: &[&str] = &["stablelm2", "megrez"];
const DEFAULT: &[&str] = &["default"];

/// Every supported name, for error messages.
pub(super) fn supported_names() -> Vec<&'static str> {
    [
        GPT2,
        GPT2_NO_CLEAN,
        DIGITS_GPT2,
        DIGITS_GPT2_NO_CLEAN,
        LLAMA3,
        LLAMA3_REGEX_ONLY,
        CHATGLM,
        CHATGLM_IGNORE_MERGES,
        QWEN2_NO_CLEAN,
        QWEN2,
        DEFAULT,
    ]
    .concat()
}

impl PreTokenizer {
    /// The chain for a `tokenizer.ggml.pre` value; `None` if we do not implement it.
    /// A missing key means "default", as in llama.cpp (which warns that quality suffers).
    pub(super) fn by_name(name: &str) -> Option<PreTokenizer> {
        use Split::*;
        let is = |list: &[&str]| list.contains(&name);
        let base = |splits: &'static [Split]| PreTokenizer {
            splits,
            ignore_merges: false,
            add_bos: false,
            clean_spaces: true,
            no_default_bos: false,
        };
        Some(if is(GPT2) {
            base(&[Gpt2])
        } else if is(GPT2_NO_CLEAN) {
            PreTokenizer { clean_spaces: false, ..base(&[Gpt2]) }
        } else if is(DIGITS_GPT2) {
            base(&[EachNumber, Gpt2])
        } else if is(DIGITS_GPT2_NO_CLEAN) {
            PreTokenizer { clean_spaces: false, ..base(&[EachNumber, Gpt2]) }
        } else if is(LLAMA3) {
            PreTokenizer { ignore_merges: true, add_bos: true, ..base(&[Llama3]) }
        } else if is(LLAMA3_REGEX_ONLY) {
            base(&[Llama3])
        } else if is(CHATGLM) {
            PreTokenizer { no_default_bos: true, ..base(&[Llama3]) }
        } else if is(CHATGLM_IGNORE_MERGES) {
            PreTokenizer { no_default_bos: true, ignore_merges: true, ..base(&[Llama3]) }
        } else if is(QWEN2_NO_CLEAN) {
            PreTokenizer { clean_spaces: false, ..base(&[Qwen2]) }
        } else if is(QWEN2) {
            base(&[Qwen2])
        } else if is(DEFAULT) {
            base(&[PunctRuns, Gpt2, NumberRuns, DigitTriples])
        } else {
            return None;
        })
    }

    /// Cut `text` into words; returns their byte ranges in order, covering `text`.
    pub(super) fn split(&self, text: &str) -> Vec<std::ops::Range<usize>> {
        let mut cpts = Vec::with_capacity(text.len());
        let mut starts = Vec::with_capacity(text.len() + 1);
        for (at, c) in text.char_indices() {
            cpts.push(c as u32);
            starts.push(at);
        }
        starts.push(text.len());

        let mut lens = vec![cpts.len()];
        for &split in self.splits {
            let mut next = Vec::with_capacity(lens.len() * 2);
            let mut at = 0;
            for &len in &lens {
                split.apply(&cpts[at..at + len], &mut next);
                at += len;
            }
            lens = next;
        }

        let mut at = 0;
        lens.iter()
            .map(|&len| {
                let r = starts[at]..starts[at + len];
                at += len;
                r
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// The scanners
// ---------------------------------------------------------------------------------------

impl Split {
    /// Append the word lengths (in codepoints) of one segment to `out`; they sum to
    /// `seg.len()`, and text no pattern matches becomes a word of its own.
    fn apply(self, seg: &[u32], out: &mut Vec<usize>) {
        match self {
            Split::Gpt2 => scan_gpt2(seg, out),
            Split::Llama3 => scan_llama3(seg, out, Some(3)),
            Split::Qwen2 => scan_llama3(seg, out, Some(1)),
            Split::EachNumber => runs(seg, out, |c| Flags::of(c).is_number(), Some(1)),
            Split::NumberRuns => runs(seg, out, |c| Flags::of(c).is_number(), None),
            Split::PunctRuns => runs(seg, out, is_default_punct, None),
            Split::DigitTriples => digit_triples(seg, out),
        }
    }
}

/// `[\p{P}\$\+<=>\^~\|]`, as llama.cpp's collapsed regex sees it: for ASCII its
/// hard-coded punctuation list (which is exactly the ASCII P category), above ASCII the
/// category table.
fn is_default_punct(c: u32) -> bool {
    matches!(char::from_u32(c), Some('$' | '+' | '<' | '=' | '>' | '^' | '~' | '|')) || Flags::of(c).is_punctuation()
}

/// Words for `class+` (`max == None`) or `class` (`max == Some(1)`) under leftmost
/// matching: matched runs and the gaps between them.
fn runs(seg: &[u32], out: &mut Vec<usize>, class: impl Fn(u32) -> bool, max: Option<usize>) {
    let mut pos = 0;
    let mut gap_start = 0;
    while pos < seg.len() {
        if !class(seg[pos]) {
            pos += 1;
            continue;
        }
        if pos > gap_start {
            out.push(pos - gap_start);
        }
        let start = pos;
        while pos < seg.len() && class(seg[pos]) && pos - start < max.unwrap_or(usize::MAX) {
            pos += 1;
        }
        out.push(pos - start);
        gap_start = pos;
    }
    if seg.len() > gap_start {
        out.push(seg.len() - gap_start);
    }
}

fn digit_triples(seg: &[u32], out: &mut Vec<usize>) {
    let digit = |i: usize| seg.get(i).is_some_and(|&c| (b'0' as u32..=b'9' as u32).contains(&c));
    let mut pos = 0;
    let mut gap_start = 0;
    while pos < seg.len() {
        if digit(pos) && digit(pos + 1) && digit(pos + 2) {
            if pos > gap_start {
                out.push(pos - gap_start);
            }
            out.push(3);
            pos += 3;
            gap_start = pos;
        } else {
            pos += 1;
        }
    }
    if seg.len() > gap_start {
        out.push(seg.len() - gap_start);
    }
}

/// Bounds-checked view of one segment, as llama.cpp's `_get_cpt` / `_get_flags`.
struct Seg<'a>(&'a [u32]);

impl Seg<'_> {
    fn cpt(&self, i: usize) -> Option<u32> {
        self.0.get(i).copied()
    }
    fn flags(&self, i: usize) -> Flags {
        self.0.get(i).map_or(Flags::NONE, |&c| Flags::of(c))
    }
    fn is(&self, i: usize, ch: char) -> bool {
        self.cpt(i) == Some(ch as u32)
    }
    fn is_cr_or_lf(&self, i: usize) -> bool {
        self.is(i, '\r') || self.is(i, '\n')
    }
    /// Length of `'s|'t|'re|'ve|'m|'ll|'d` at `pos` (lowercased first if `fold`), or 0.
    fn contraction(&self, pos: usize, fold: bool) -> usize {
        if !self.is(pos, '\'') {
            return 0;
        }
        let letter =
            |i: usize| self.cpt(i).and_then(char::from_u32).map(|c| if fold { c.to_ascii_lowercase() } else { c });
        match (letter(pos + 1), letter(pos + 2)) {
            (Some('s' | 't' | 'm' | 'd'), _) => 2,
            (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l')) => 3,
            _ => 0,
        }
    }
    fn whitespace_run(&self, pos: usize) -> usize {
        let mut n = 0;
        while self.flags(pos + n).is_whitespace() {
            n += 1;
        }
        n
    }
}

fn scan_gpt2(seg: &[u32], out: &mut Vec<usize>) {
    let s = Seg(seg);
    let mut pos = 0;
    while pos < seg.len() {
        let start = pos;
        let space = s.is(pos, ' ');
        // ` ?X+`: an optional leading space only counts when X follows it.
        let f2 = if space { s.flags(pos + 1) } else { s.flags(pos) };
        let n = s.contraction(pos, false);
        if n > 0 {
            pos += n;
        } else if f2.is_letter() || f2.is_number() || f2.is_other() {
            let same = |f: Flags| {
                if f2.is_letter() {
                    f.is_letter()
                } else if f2.is_number() {
                    f.is_number()
                } else {
                    f.is_other()
                }
            };
            pos += space as usize;
            while same(s.flags(pos)) {
                pos += 1;
            }
        } else {
            let ws = s.whitespace_run(pos);
            if ws > 1 && pos + ws < seg.len() {
                // `\s+(?!\S)`: leave the last space to prefix the next word.
                pos += ws - 1;
            } else if ws > 0 {
                pos += ws;
            } else {
                pos += 1;
            }
        }
        out.push(pos - start);
    }
}

/// Llama 3 (`max_digits == Some(3)`) and Qwen 2 (`Some(1)`).
fn scan_llama3(seg: &[u32], out: &mut Vec<usize>, max_digits: Option<usize>) {
    let s = Seg(seg);
    let mut pos = 0;
    while pos < seg.len() {
        let start = pos;
        let f = s.flags(pos);

        let n = s.contraction(pos, true);
        if n > 0 {
            out.push(n);
            pos += n;
            continue;
        }

        // `[^\r\n\p{L}\p{N}]?\p{L}+`
        if !(s.is_cr_or_lf(pos) || f.is_number()) && (f.is_letter() || s.flags(pos + 1).is_letter()) {
            pos += 1;
            while s.flags(pos).is_letter() {
                pos += 1;
            }
            out.push(pos - start);
            continue;
        }

        // `\p{N}{1,3}` / `\p{N}`: a run of digits is cut into chunks, left to right.
        if f.is_number() {
            let max = max_digits.unwrap_or(usize::MAX);
            while s.flags(pos).is_number() {
                let chunk = pos;
                let mut end = chunk;
                while end - chunk < max && s.flags(end).is_number() {
                    end += 1;
                }
                out.push(end - chunk);
                pos = end;
            }
            continue;
        }

        // ` ?[^\s\p{L}\p{N}]+[\r\n]*` — llama.cpp tests the unshifted flags for
        // "inside the segment", so a lone trailing space lands here as its own word.
        let space = s.is(pos, ' ');
        let mut f2 = if space { s.flags(pos + 1) } else { f };
        if !(f2.is_whitespace() || f2.is_letter() || f2.is_number()) && f.is_some() {
            pos += space as usize;
            while f2.is_other() {
                pos += 1;
                f2 = s.flags(pos);
            }
            while s.is_cr_or_lf(pos) {
                pos += 1;
            }
            out.push(pos - start);
            continue;
        }

        let ws = s.whitespace_run(pos);
        let last_newline_end = (pos..pos + ws).rev().find(|&i| s.is_cr_or_lf(i)).map(|i| i + 1);
        if let Some(end) = last_newline_end {
            // `\s*[\r\n]+`
            pos = end;
        } else if ws > 1 && pos + ws < seg.len() {
            // `\s+(?!\S)`
            pos += ws - 1;
        } else if ws > 0 {
            pos += ws;
        } else {
            pos += 1;
        }
        out.push(pos - start);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(pre: &str, text: &str) -> Vec<String> {
        let p = PreTokenizer::by_name(pre).unwrap();
        p.split(text).into_iter().map(|r| text[r].to_string()).collect()
    }

    #[test]
    fn tokenizer_pretok_gpt2_words() {
        assert_eq!(words("gpt-2", "Hello world's  end\n\n x"), ["Hello", " world", "'s", " ", " end", "\n\n", " x"]);
        assert_eq!(words("gpt-2", "a  "), ["a", "  "]);
    }

    #[test]
    fn tokenizer_pretok_smollm_isolates_digits() {
        assert_eq!(words("smollm", "abc 1234x"), ["abc", " ", "1", "2", "3", "4", "x"]);
    }

    #[test]
    fn tokenizer_pretok_llama3_digit_triples_and_newlines() {
        assert_eq!(words("llama-bpe", "1234567 ok\n\n  x"), ["123", "456", "7", " ok", "\n\n", " ", " x"]);
        assert_eq!(words("llama-bpe", "I'M don'T"), ["I", "'M", " don", "'T"]);
    }

    #[test]
    fn tokenizer_pretok_qwen2_single_digits() {
        assert_eq!(words("qwen2", "x=12;"), ["x", "=", "1", "2", ";"]);
    }

    #[test]
    fn tokenizer_pretok_flags_from_llama_table() {
        assert!(Flags::of('a' as u32).is_letter());
        assert!(Flags::of('٣' as u32).is_number());
        assert!(Flags::of(0x3000).is_whitespace());
        assert!(Flags::of('!' as u32).is_other());
        assert!(!Flags::NONE.is_some());
    }
}
