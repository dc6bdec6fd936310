//! Tokenizer: the GGUF vocabulary, text → token ids and back, token for token as
//! llama.cpp (b11434) does it.
//!
//! Metadata read, all under `tokenizer.ggml.` (llama.cpp's defaults where absent):
//!
//! ```text
//! model              "gpt2"  byte-level BPE (bpe.rs)      | "llama"  SentencePiece (spm.rs)
//!                    | "bert"  WordPiece (wpm.rs)
//! pre                BPE pre-tokenizer name (pretok.rs); missing = "default"; unused by SPM, WPM
//! tokens             [str; n_vocab]                        required; empty texts become "[EMPTY_i]"
//! token_type         [int; ≥ n_vocab]  1 normal 2 unknown 3 control 4 user-defined 5 unused 6 byte
//! scores             [f32; ≥ n_vocab]  SPM merge priority (0 when absent)
//! merges             [str] "left right", by rank           required for BPE
//! bos/eos/eot/eom/unknown_token_id, fim_{pre,suf,mid,pad,rep,sep}_token_id   u32
//! seperator_token_id (sic)                                                u32  WPM's [SEP]
//! add_bos_token, add_eos_token, add_space_prefix                         bool
//! normalizer.lowercase, normalizer.strip_accents                         bool WPM only
//! ```
//!
//! Encoding reads top to bottom in `encode`: special tokens are cut out first
//! (special.rs), each remaining fragment goes through the model tokenizer, then
//! BOS/EOS are added (WordPiece: always [CLS] first and [SEP] last, whatever the add_*
//! flags say, as llama.cpp's WPM branch does). Decoding maps each token back to bytes (`token_bytes`) and only
//! turns bytes into text at the very end, because one character may span tokens.
//!
//! What llama.cpp decides by *token text* rather than metadata is reproduced in
//! `fix_attributes`: end-of-generation tokens (`<|im_end|>`, `<end_of_turn>`, ...) are
//! forced to be control tokens, which changes both what `parse_special = false`
//! recognises and what `decode(.., special = false)` hides.

mod bpe;
mod pretok;
mod special;
mod spm;
#[rustfmt::skip]
mod unicode_data;
mod wpm;

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use crate::error::{Error, Result};
use crate::gguf::Gguf;

use bpe::Bpe;
use pretok::PreTokenizer;
use special::{Fragment, Specials};
use wpm::Wpm;

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_MERGES: &str = "tokenizer.ggml.merges";

/// Token attributes, numbered as llama.cpp's `llama_token_attr`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub(crate) struct Attr(pub(crate) u16);

impl Attr {
    pub(crate) const UNKNOWN: u16 = 1 << 0;
    pub(crate) const UNUSED: u16 = 1 << 1;
    pub(crate) const NORMAL: u16 = 1 << 2;
    pub(crate) const CONTROL: u16 = 1 << 3;
    pub(crate) const USER_DEFINED: u16 = 1 << 4;
    pub(crate) const BYTE: u16 = 1 << 5;
    pub(crate) const LSTRIP: u16 = 1 << 7;
    pub(crate) const RSTRIP: u16 = 1 << 8;

    /// From a `tokenizer.ggml.token_type` entry; unknown types are "undefined" (0).
    fn from_token_type(t: i64) -> Attr {
        Attr(match t {
            1 => Self::NORMAL,
            2 => Self::UNKNOWN,
            3 => Self::CONTROL,
            4 => Self::USER_DEFINED,
            5 => Self::UNUSED,
            6 => Self::BYTE,
            _ => 0,
        })
    }
    pub(crate) fn has(self, bits: u16) -> bool {
        self.0 & bits != 0
    }
}

// ---------------------------------------------------------------------------------------
// Vocabulary
// ---------------------------------------------------------------------------------------

struct Token {
    text: Box<str>,
    score: f32,
    attr: Attr,
}

/// Token texts, scores and attributes, and the text → id index every tokenizer uses.
pub(crate) struct Vocab {
    tokens: Vec<Token>,
    ids: HashMap<Box<str>, u32>,
}

impl Vocab {
    fn load(g: &Gguf) -> Result<Vocab> {
        let texts = g.get_str_array(KEY_TOKENS)?.ok_or_else(|| {
            Error::Tokenizer(format!(
                "metadata key {KEY_TOKENS:?} is missing, so the file has no vocabulary; re-convert the model with llama.cpp's convert_hf_to_gguf.py"
            ))
        })?;
        let n = texts.len();
        if n == 0 || n > u32::MAX as usize / 2 {
            return Err(Error::Tokenizer(format!(
                "{KEY_TOKENS:?} has {n} entries; a vocabulary needs 1..2^31; the file is corrupt"
            )));
        }
        let scores = match g.get_f32_array(KEY_SCORES) {
            Ok(s) => s,
            // llama.cpp also accepts integer scores.
            Err(_) => g.get_int_array(KEY_SCORES)?.map(|v| v.into_iter().map(|x| x as f32).collect()),
        };
        let types = g.get_int_array(KEY_TOKEN_TYPE)?;
        for (key, len) in [(KEY_SCORES, scores.as_ref().map(Vec::len)), (KEY_TOKEN_TYPE, types.as_ref().map(Vec::len))]
        {
            if let Some(len) = len.filter(|&len| len < n) {
                return Err(Error::Tokenizer(format!(
                    "{key:?} has {len} entries but {KEY_TOKENS:?} has {n}; the file is corrupt, re-convert the model"
                )));
            }
        }

        let mut tokens = Vec::with_capacity(n);
        let mut ids = HashMap::with_capacity(n);
        for (i, text) in texts.iter().enumerate() {
            let text: Box<str> = if text.is_empty() { format!("[EMPTY_{i}]").into() } else { text.as_str().into() };
            if let Some(first) = ids.insert(text.clone(), i as u32) {
                return Err(Error::Tokenizer(format!(
                    "{KEY_TOKENS:?} lists {text:?} twice (ids {first} and {i}); the file is corrupt, re-convert the model"
                )));
            }
            tokens.push(Token {
                text,
                score: scores.as_ref().map_or(0.0, |s| s[i]),
                attr: types.as_ref().map_or(Attr(Attr::NORMAL), |t| Attr::from_token_type(t[i])),
            });
        }
        Ok(Vocab { tokens, ids })
    }

    pub(crate) fn len(&self) -> usize {
        self.tokens.len()
    }
    pub(crate) fn id(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied()
    }
    pub(crate) fn score(&self, id: u32) -> f32 {
        self.tokens[id as usize].score
    }
    fn text(&self, id: u32) -> &str {
        &self.tokens[id as usize].text
    }
    fn attr(&self, id: u32) -> Attr {
        self.tokens[id as usize].attr
    }
    fn attr_mut(&mut self, id: u32) -> &mut Attr {
        &mut self.tokens[id as usize].attr
    }
    /// Lowest id whose text is one of `texts`.
    fn first_of(&self, texts: &[&str]) -> Option<u32> {
        texts.iter().filter_map(|t| self.id(t)).min()
    }
}

// ---------------------------------------------------------------------------------------
// The tokenizer
// ---------------------------------------------------------------------------------------

enum Kind {
    Bpe(Box<Bpe>),
    /// SentencePiece; `byte_tokens[b]` is the `<0xXX>` fallback for byte b.
    Spm {
        byte_tokens: Box<[Option<u32>; 256]>,
    },
    /// WordPiece; `cls` and `sep` wrap every encoding with `add_special`.
    Wpm {
        wpm: Wpm,
        cls: u32,
        sep: u32,
    },
}

pub struct Tokenizer {
    kind: Kind,
    model_name: String,
    pre_name: String,
    vocab: Vocab,
    specials: Specials,
    bos: Option<u32>,
    eos: Option<u32>,
    /// WordPiece's [SEP] (`seperator_token_id`), which ends every encoding.
    sep: Option<u32>,
    /// Sorted.
    eog: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
    /// SPM: prefix a space to text at the start and after special tokens; when
    /// detokenizing, drop the first token's leading space.
    add_space_prefix: bool,
    /// Detokenize with llama.cpp's `clean_up_tokenization_spaces` passes.
    clean_spaces: bool,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("model", &self.model_name)
            .field("pre", &self.pre_name)
            .field("n_vocab", &self.n_vocab())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eog", &self.eog)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .finish_non_exhaustive()
    }
}

/// Texts llama.cpp treats as end of generation (and forces to be control tokens).
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const FIM_PRE_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
const FIM_SUF_TEXTS: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
const FIM_MID_TEXTS: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];

/// Special token ids as llama.cpp resolves them (defaults, then file keys).
struct SpecialIds {
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    unk: Option<u32>,
    sep: Option<u32>,
    fim: [Option<u32>; 6],
}

/// The tokenizer families of `tokenizer.ggml.model`.
enum Family {
    Bpe(PreTokenizer),
    Spm,
    Wpm,
}

impl Tokenizer {
    pub fn from_gguf(g: &Gguf) -> Result<Tokenizer> {
        let model_name = g.get_str(KEY_MODEL)?.ok_or_else(|| {
            Error::Tokenizer(format!(
                "metadata key {KEY_MODEL:?} is missing; re-convert the model with llama.cpp's convert_hf_to_gguf.py"
            ))
        })?;
        let file_pre = g.get_str(KEY_PRE)?;
        let family = match model_name {
            "gpt2" => {
                let name = file_pre.filter(|p| !p.is_empty()).unwrap_or("default");
                Family::Bpe(PreTokenizer::by_name(name).ok_or_else(|| {
                    Error::Tokenizer(format!(
                        "{KEY_PRE} = {name:?} is not a supported BPE pre-tokenizer; supported: {}; use a model with one of these or add its splitter to tokenizer/pretok.rs",
                        pretok::supported_names().join(", ")
                    ))
                })?)
            }
            "llama" => Family::Spm,
            "bert" => Family::Wpm,
            other => {
                return Err(Error::Tokenizer(format!(
                    "{KEY_MODEL} = {other:?} is not supported; supported: \"gpt2\" (byte-level BPE), \"llama\" (SentencePiece) and \"bert\" (WordPiece); use a GGUF whose tokenizer is one of these"
                )))
            }
        };
        let pre = match &family {
            Family::Bpe(p) => Some(p),
            _ => None,
        };
        let pre_name = file_pre.filter(|p| !p.is_empty()).unwrap_or("default").to_owned();

        let mut vocab = Vocab::load(g)?;
        let ids = Self::special_ids(g, &vocab, &family)?;

        // SPM adds BOS unless told otherwise; BPE families decide (pretok.rs); WPM
        // always wraps in [CLS] … [SEP] (llama.cpp's WPM branch reads no add_* flag).
        let wpm = matches!(family, Family::Wpm);
        let default_add_bos = match pre {
            Some(p) => p.add_bos,
            None => true,
        };
        let add_bos = wpm || g.get_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(default_add_bos);
        let add_eos = !wpm && g.get_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        let add_space_prefix = !wpm && g.get_bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(pre.is_none());
        let clean_spaces = wpm || pre.is_some_and(|p| p.clean_spaces);
        let model_lc = g.get_str("general.name")?.unwrap_or("").to_ascii_lowercase();

        let eog = fix_attributes(&mut vocab, &ids, &model_lc);
        let specials = Specials::new(
            (0..vocab.len() as u32)
                .filter(|&id| vocab.attr(id).has(Attr::CONTROL | Attr::USER_DEFINED | Attr::UNKNOWN))
                .map(|id| (id, vocab.text(id), vocab.attr(id)))
                .collect(),
        )?;

        let kind = match family {
            Family::Bpe(pre) => {
                let merges = g.get_str_array(KEY_MERGES)?.ok_or_else(|| {
                    Error::Tokenizer(format!(
                        "metadata key {KEY_MERGES:?} is missing but a \"gpt2\" tokenizer needs its merges; re-convert the model"
                    ))
                })?;
                Kind::Bpe(Box::new(Bpe::new(&vocab, pre, merges)))
            }
            Family::Wpm => {
                let need = |id: Option<u32>, what: &str, key: &str| {
                    id.ok_or_else(|| {
                        Error::Tokenizer(format!(
                            "this WordPiece vocabulary has no {what} token (tokenizer.ggml.{key} is missing and the default id is out of range); re-convert the model"
                        ))
                    })
                };
                let cls = need(ids.bos, "[CLS]", "bos_token_id")?;
                let sep = need(ids.sep, "[SEP]", "seperator_token_id")?;
                let unk = need(ids.unk, "[UNK]", "unknown_token_id")?;
                // BertNormalizer's switches; strip_accents follows lowercase unless set.
                let lowercase = g.get_bool("tokenizer.ggml.normalizer.lowercase")?.unwrap_or(true);
                let strip_accents = g.get_bool("tokenizer.ggml.normalizer.strip_accents")?.unwrap_or(lowercase);
                let max_token_len = vocab.tokens.iter().map(|t| t.text.len()).max().unwrap_or(0);
                Kind::Wpm { wpm: Wpm { lowercase, strip_accents, max_token_len, unk: Some(unk) }, cls, sep }
            }
            Family::Spm => {
                let mut byte_tokens = Box::new([None; 256]);
                for b in 0..=255u8 {
                    // `<0xXX>`, else the byte itself as text, else <unk> (llama.cpp throws).
                    byte_tokens[b as usize] = vocab
                        .id(&format!("<0x{b:02X}>"))
                        .or_else(|| b.is_ascii().then(|| vocab.id(&(b as char).to_string())).flatten())
                        .or(ids.unk);
                }
                Kind::Spm { byte_tokens }
            }
        };

        Ok(Tokenizer {
            kind,
            model_name: model_name.to_owned(),
            pre_name,
            vocab,
            specials,
            bos: ids.bos,
            eos: ids.eos,
            sep: ids.sep,
            eog,
            add_bos,
            add_eos,
            add_space_prefix,
            clean_spaces,
        })
    }

    fn special_ids(g: &Gguf, vocab: &Vocab, family: &Family) -> Result<SpecialIds> {
        let n = vocab.len();
        // A default outside the vocabulary is disabled; a file id outside it is ignored
        // (llama.cpp warns and keeps the default).
        let read = |key: &str, default: Option<u32>| -> Result<Option<u32>> {
            let default = default.filter(|&id| (id as usize) < n);
            Ok(match g.get_u64(&format!("tokenizer.ggml.{key}"))? {
                Some(v) if v < n as u64 => Some(v as u32),
                _ => default,
            })
        };
        // (bos, eos, unk, sep) defaults by family, as llama.cpp's load sets them.
        let (bos, eos, unk, sep) = match family {
            Family::Bpe(p) if p.no_default_bos => (None, Some(11), None, None),
            Family::Bpe(_) => (Some(11), Some(11), None, None),
            Family::Spm => (Some(1), Some(2), Some(0), None),
            Family::Wpm => (Some(101), None, Some(100), Some(102)),
        };
        let fim_pre = read("prefix_token_id", read("fim_pre_token_id", None)?)?;
        let fim_suf = read("suffix_token_id", read("fim_suf_token_id", None)?)?;
        let fim_mid = read("middle_token_id", read("fim_mid_token_id", None)?)?;
        Ok(SpecialIds {
            bos: read("bos_token_id", bos)?,
            eos: read("eos_token_id", eos)?,
            eot: read("eot_token_id", None)?,
            eom: read("eom_token_id", None)?,
            unk: read("unknown_token_id", unk)?,
            sep: read("seperator_token_id", sep)?,
            fim: [
                fim_pre,
                fim_suf,
                fim_mid,
                read("fim_pad_token_id", None)?,
                read("fim_rep_token_id", None)?,
                read("fim_sep_token_id", None)?,
            ],
        })
    }

    pub fn n_vocab(&self) -> usize {
        self.vocab.len()
    }
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }
    /// WordPiece's [SEP], which `encode` puts last with `add_special` (None elsewhere).
    pub fn sep(&self) -> Option<u32> {
        self.sep.filter(|_| matches!(self.kind, Kind::Wpm { .. }))
    }
    /// The ids `encode(text, add_special = true, ..)` puts before and after the text's
    /// own tokens (BOS, EOS; [CLS], [SEP]): what a truncation must keep.
    pub fn special_affixes(&self) -> (Vec<u32>, Vec<u32>) {
        match self.kind {
            Kind::Wpm { cls, sep, .. } => (vec![cls], vec![sep]),
            _ => (
                self.bos.filter(|_| self.add_bos).into_iter().collect(),
                self.eos.filter(|_| self.add_eos).into_iter().collect(),
            ),
        }
    }
    /// End of generation: EOS, EOT, EOM, and every token llama.cpp recognises by text.
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }
    /// All end-of-generation ids, sorted.
    pub fn eog_ids(&self) -> &[u32] {
        &self.eog
    }
    /// The raw vocabulary string (byte-level spelled for BPE, `▁` for SPM spaces).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.vocab.tokens.get(id as usize).map(|t| &*t.text)
    }
    /// Whether the token is a control token (rendered only with `special`).
    pub fn is_control(&self, id: u32) -> bool {
        (id as usize) < self.n_vocab() && self.vocab.attr(id).has(Attr::CONTROL)
    }
    pub fn model_name(&self) -> &str {
        &self.model_name
    }
    pub fn pre_name(&self) -> &str {
        &self.pre_name
    }
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }
    /// SPM: a space is prefixed to the text, and `decode` drops it again.
    pub fn add_space_prefix(&self) -> bool {
        self.add_space_prefix
    }

    // -----------------------------------------------------------------------------------
    // Encoding
    // -----------------------------------------------------------------------------------

    /// `add_special`: add BOS/EOS as the file's flags say. `parse_special`: recognise
    /// control-token texts (like "<|im_start|>") in `text` as single tokens;
    /// user-defined tokens are recognised either way.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let fragments = if text.is_empty() { Vec::new() } else { self.specials.partition(text, parse_special) };
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        let (prefix, suffix) = if add_special { self.special_affixes() } else { (Vec::new(), Vec::new()) };
        out.extend(prefix);
        match &self.kind {
            Kind::Bpe(bpe) => {
                for fragment in fragments {
                    match fragment {
                        Fragment::Text(t) => bpe.encode(&self.vocab, t, &mut out),
                        Fragment::Token(id) => out.push(id),
                    }
                }
            }
            Kind::Spm { byte_tokens } => {
                // The space prefix goes on the first text and on text after a special
                // token, BOS or not (llama.cpp's `is_prev_special` starts true).
                let mut after_special = true;
                for fragment in fragments {
                    match fragment {
                        Fragment::Text(t) => {
                            let prefix = if self.add_space_prefix && after_special { " " } else { "" };
                            let escaped = format!("{prefix}{t}").replace(' ', "\u{2581}");
                            spm::encode(&self.vocab, &escaped, byte_tokens, &mut out);
                            after_special = false;
                        }
                        Fragment::Token(id) => {
                            out.push(id);
                            after_special = true;
                        }
                    }
                }
            }
            Kind::Wpm { wpm, .. } => {
                for fragment in fragments {
                    match fragment {
                        Fragment::Text(t) => wpm.encode(&self.vocab, t, &mut out),
                        Fragment::Token(id) => out.push(id),
                    }
                }
            }
        }
        out.extend(suffix);
        out
    }

    // -----------------------------------------------------------------------------------
    // Decoding
    // -----------------------------------------------------------------------------------

    /// The bytes one token stands for. `special`: render control and unknown tokens'
    /// text (otherwise they are empty). Out-of-range ids are empty.
    pub fn token_bytes(&self, id: u32, special: bool) -> Vec<u8> {
        let Some(token) = self.vocab.tokens.get(id as usize) else {
            return Vec::new();
        };
        let attr = token.attr;
        if attr.has(Attr::UNKNOWN | Attr::CONTROL | Attr::USER_DEFINED) {
            return if special || attr.has(Attr::USER_DEFINED) && !attr.has(Attr::UNKNOWN | Attr::CONTROL) {
                token.text.as_bytes().to_vec()
            } else {
                Vec::new()
            };
        }
        if attr.has(Attr::NORMAL) {
            return match self.kind {
                Kind::Spm { .. } | Kind::Wpm { .. } => token.text.replace('\u{2581}', " ").into_bytes(),
                Kind::Bpe(_) => unspell(&token.text),
            };
        }
        if attr.has(Attr::BYTE) {
            // "<0xXX>"
            return token
                .text
                .get(3..5)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .map(|b| vec![b])
                .unwrap_or_default();
        }
        // Unused and undefined tokens render as nothing, like control tokens.
        Vec::new()
    }

    /// Token ids back to text, as `llama_detokenize(remove_special = false,
    /// unparse_special = special)`: for SPM with `add_space_prefix` the first token's
    /// leading space is dropped (a leading BOS uses up that rule, so the space after
    /// BOS stays), and BPE vocabularies that ask for it get llama.cpp's
    /// `clean_up_tokenization_spaces` passes. Invalid UTF-8 becomes U+FFFD, once, here.
    pub fn decode(&self, ids: &[u32], special: bool) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        let mut strip_space = self.add_space_prefix;
        for &id in ids {
            let piece = self.token_bytes(id, special);
            let piece = match piece.first() {
                Some(b' ') if strip_space => &piece[1..],
                _ => &piece[..],
            };
            bytes.extend_from_slice(piece);
            strip_space = false;
        }
        if self.clean_spaces {
            clean_up_spaces(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Resolve what llama.cpp infers from token texts: EOT/EOM/FIM tokens, unused control
/// tokens, model-specific fixes. Returns the sorted end-of-generation ids.
fn fix_attributes(vocab: &mut Vocab, ids: &SpecialIds, model_name_lc: &str) -> Vec<u32> {
    let force_control = |vocab: &mut Vocab, id: u32| vocab.attr_mut(id).0 |= Attr::CONTROL;

    // Where the file does not name them, find EOT/EOM/FIM tokens by text. llama.cpp
    // walks a hash map, so with two candidates its pick is arbitrary; we take the
    // lowest id. Either way every candidate ends up an EOG token below.
    let mut eot = ids.eot;
    let mut eom = ids.eom;
    let mut fim = ids.fim;
    for (slot, texts) in
        [(&mut eot, EOT_TEXTS), (&mut eom, &["<|eom_id|>"][..])].into_iter().chain(fim.iter_mut().zip([
            FIM_PRE_TEXTS,
            FIM_SUF_TEXTS,
            FIM_MID_TEXTS,
            FIM_PAD_TEXTS,
            FIM_REP_TEXTS,
            FIM_SEP_TEXTS,
        ]))
    {
        if slot.is_none() {
            *slot = vocab.first_of(texts);
            if let Some(id) = *slot {
                force_control(vocab, id);
            }
        }
    }

    // Control tokens named "unused" are unused (Gemma's <unused0..6241>).
    for t in &mut vocab.tokens {
        if t.attr.has(Attr::CONTROL) && t.text.contains("unused") {
            t.attr.0 |= Attr::UNUSED;
        }
    }

    let mut eog: BTreeSet<u32> = fim[3..].iter().flatten().copied().collect();
    for text in EOG_TEXTS {
        if let Some(id) = vocab.id(text) {
            eog.insert(id);
            force_control(vocab, id);
        }
    }
    // gpt-oss: these structure its output and must always render.
    for text in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
        if let Some(id) = vocab.id(text) {
            *vocab.attr_mut(id) = Attr(Attr::USER_DEFINED);
        }
    }
    eog.extend([ids.eos, eot, eom].into_iter().flatten());

    // o200k_harmony and solar-open: "<|end|>" ends a message, not the generation.
    if let Some(end) = in_eog(vocab, &eog, "<|end|>") {
        let call = in_eog(vocab, &eog, "<|call|>").or(in_eog(vocab, &eog, "<|calls|>")).is_some();
        let ret = in_eog(vocab, &eog, "<|return|>").or(in_eog(vocab, &eog, "<|flush|>")).is_some();
        if call && ret {
            eog.remove(&end);
            *vocab.attr_mut(end) = Attr(Attr::USER_DEFINED);
        }
    }
    // Gemma 4 and PLaMo have an ordinary "</s>".
    if let Some(s) = in_eog(vocab, &eog, "</s>") {
        if in_eog(vocab, &eog, "<|tool_response>").or(in_eog(vocab, &eog, "<|plamo:eos|>")).is_some() {
            eog.remove(&s);
            *vocab.attr_mut(s) = Attr(Attr::NORMAL);
        }
    }

    // Phi-3 special tokens eat the whitespace after them (llama.cpp keys this on the
    // model name).
    if model_name_lc.contains("phi-3") || model_name_lc.contains("phi3") {
        for t in &mut vocab.tokens {
            if t.attr.has(Attr::CONTROL | Attr::USER_DEFINED | Attr::UNKNOWN) || &*t.text == "</s>" {
                t.attr.0 |= Attr::RSTRIP;
            }
        }
        for text in ["<unk>", "<s>", "<|endoftext|>"] {
            if let Some(id) = vocab.id(text) {
                vocab.attr_mut(id).0 &= !Attr::RSTRIP;
            }
        }
    }

    eog.into_iter().collect()
}

fn in_eog(vocab: &Vocab, eog: &BTreeSet<u32>, text: &str) -> Option<u32> {
    vocab.id(text).filter(|id| eog.contains(id))
}

/// Byte-level BPE text back to bytes. A character outside GPT-2's alphabet cannot come
/// from a real vocabulary; llama.cpp renders it as a visible marker, and so do we.
fn unspell(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match bpe::char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                out.extend_from_slice(b"[UNK_BYTE_0x");
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.extend_from_slice(format!("{b:02x}").as_bytes());
                }
                out.extend_from_slice(text.as_bytes());
                out.push(b']');
            }
        }
    }
    out
}

/// llama.cpp's `clean_spaces` passes, on bytes, in place: drop the space before
/// `?!.,`, turn " ' " into "'", and drop the space before `'s`, `'m`, `'re`, `'ve`.
/// Written index for index after llama-vocab.cpp so the quirks (a pass reads bytes the
/// previous step zeroed) are the same.
fn clean_up_spaces(text: &mut Vec<u8>) {
    let n = text.len();
    let mut total = usize::from(n > 0);
    for i in 1..n {
        let x = text[i];
        if text[i - 1] == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            total -= 1;
        }
        text[total] = x;
        total += 1;
    }

    let n = total;
    total = usize::from(n > 0);
    let mut i = 1;
    while i < n {
        let x = text[i];
        if x == b'\'' && i + 1 < n && text[i - 1] == b' ' && text[i + 1] == b' ' {
            total -= 1;
            i += 1;
            text[i] = 0;
        }
        text[total] = x;
        total += 1;
        i += 1;
    }

    let n = total;
    total = usize::from(n > 0);
    for i in 1..n {
        let x = text[i];
        if text[i - 1] == b' ' && x == b'\'' && i + 1 < n {
            let x1 = text[i + 1];
            let drop = match x1 {
                b's' | b'm' => true,
                b'r' | b'v' => i + 2 < n && text[i + 2] == b'e',
                _ => false,
            };
            if drop {
                total -= 1;
            }
        }
        text[total] = x;
        total += 1;
    }
    text.truncate(total);
}

// ---------------------------------------------------------------------------------------
// Streaming detokenization
// ---------------------------------------------------------------------------------------

/// Turns generated tokens into text as they arrive. Bytes are held back while they
/// could still be the start of a character, so a multi-byte character split across
/// tokens is never emitted half-way; bytes that can never become valid are emitted as
/// U+FFFD at once. Pieces are rendered as `token_bytes(id, special)` — no first-token
/// space stripping or space clean-up, which need the whole text.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    pending: Vec<u8>,
    special: bool,
}

impl StreamDecoder {
    /// Control tokens render as nothing.
    pub fn new() -> Self {
        Self::default()
    }
    /// `special`: render control tokens' text too.
    pub fn with_special(special: bool) -> Self {
        StreamDecoder { pending: Vec::new(), special }
    }
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.pending.extend(tok.token_bytes(id, self.special));
        self.drain(false)
    }
    /// Flush what is held back; an incomplete character becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        self.drain(true)
    }

    fn drain(&mut self, flush: bool) -> String {
        let mut out = String::new();
        let mut rest = &self.pending[..];
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    out.push_str(std::str::from_utf8(valid).expect("valid_up_to is valid"));
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[bad..];
                        }
                        None if flush => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &[];
                            break;
                        }
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        self.pending = rest.to_vec();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cleaned(s: &str) -> String {
        let mut b = s.as_bytes().to_vec();
        clean_up_spaces(&mut b);
        String::from_utf8(b).unwrap()
    }

    #[test]
    fn tokenizer_clean_spaces_matches_llama_passes() {
        assert_eq!(cleaned("Hello , world !"), "Hello, world!");
        assert_eq!(cleaned("it ' s"), "it's");
        assert_eq!(cleaned("he 's we 're they 'll I 'd"), "he's we're they 'll I 'd");
        assert_eq!(cleaned(""), "");
    }

    #[test]
    fn tokenizer_stream_holds_back_partial_characters() {
        let mut d = StreamDecoder::new();
        d.pending.extend_from_slice(&"€".as_bytes()[..2]);
        assert_eq!(d.drain(false), "");
        d.pending.extend_from_slice(&"€".as_bytes()[2..]);
        assert_eq!(d.drain(false), "€");
        d.pending.extend_from_slice(&[0xE2, b'a', 0xE2]);
        assert_eq!(d.drain(false), "\u{FFFD}a");
        assert_eq!(d.finish(), "\u{FFFD}");
    }

    #[test]
    fn tokenizer_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Tokenizer>();
    }
}
