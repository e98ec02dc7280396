//! Text ↔ token ids, built from a GGUF file's vocabulary or a Hugging Face
//! `tokenizer.json`.
//!
//! The one decision to understand first: **for GGUF files, llama.cpp is the
//! reference.** A prompt must become exactly the ids llama.cpp would feed the
//! model, so the parts where llama.cpp and Hugging Face differ are done here the
//! llama.cpp way (`src/llama-vocab.cpp`), and only the per-fragment work is handed
//! to the `tokenizers` crate:
//!
//! 1. *Special-token partition* (`tokenizer_st_partition`): control, unknown and
//!    user-defined tokens are cut out of the text longest token first; control and
//!    unknown ones only when `parse_special` is on, user-defined ones always.
//! 2. Each remaining text fragment goes through a `tokenizers::Tokenizer`:
//!    * `gpt2` vocabularies: the regex splits llama.cpp uses for the file's
//!      `tokenizer.ggml.pre` name, GPT-2 byte-level mapping, BPE with the file's
//!      merges.
//!    * `llama` (SentencePiece) vocabularies: spaces become `▁`, a `▁` is prefixed
//!      when `add_space_prefix` says so, and a BPE model whose merges are derived
//!      from the scores (every split of a piece into two pieces, ranked by the
//!      piece's score) with byte fallback. That reproduces llama.cpp's greedy
//!      "merge the adjacent pair whose merged piece scores highest" loop.
//! 3. BOS/EOS as the file's `add_bos_token`/`add_eos_token` say, and decoding as
//!    llama.cpp's `token_to_piece` does (control tokens rendered only on request,
//!    user-defined tokens verbatim, `<0xXX>` byte tokens as raw bytes).
//!
//! Hugging Face folders are served by `tokenizers` itself, as their authors
//! defined them.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::OnceLock;

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::{Error, Result};

mod spm;
use spm::Spm;

/// The SentencePiece word-boundary mark that stands for a space.
const SPM_SPACE: char = '\u{2581}';

/// The tokenizer fields of a GGUF file, under llama.cpp's key names
/// (`tokenizer.ggml.*`). [`Tokenizer::from_vocab`] builds from this alone, so
/// tokenizers can be made and tested without a model file.
#[derive(Clone, Debug, Default)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `"gpt2"` (byte-level BPE) or `"llama"` (SentencePiece).
    pub model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer name, e.g. `"qwen2"`, `"smollm"`.
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`: token text by id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.scores`: SentencePiece piece scores by id.
    pub scores: Option<Vec<f32>>,
    /// `tokenizer.ggml.token_type`: 1 normal, 2 unknown, 3 control,
    /// 4 user-defined, 5 unused, 6 byte.
    pub token_types: Option<Vec<i32>>,
    /// `tokenizer.ggml.merges`: BPE merges as `"left right"`, highest priority first.
    pub merges: Option<Vec<String>>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_token_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_token_id: Option<u32>,
    /// `tokenizer.ggml.eot_token_id`.
    pub eot_token_id: Option<u32>,
    /// `tokenizer.ggml.eom_token_id`.
    pub eom_token_id: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unknown_token_id: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub padding_token_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos_token: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`.
    pub add_eos_token: Option<bool>,
    /// `tokenizer.ggml.add_space_prefix`.
    pub add_space_prefix: Option<bool>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

impl GgufVocab {
    /// Reads the `tokenizer.*` keys of an open GGUF file. Absent optional keys
    /// stay `None`; a key of the wrong type is an error that names it.
    pub fn from_gguf(g: &crate::gguf::Gguf) -> Result<Self> {
        let opt_u32 = |key: &str| g.get(key).map(|_| g.get_u32(key)).transpose();
        let opt_bool = |key: &str| g.get(key).map(|_| g.get_bool(key)).transpose();
        let opt_str = |key: &str| -> Result<Option<String>> {
            g.get(key)
                .map(|_| g.get_str(key).map(str::to_owned))
                .transpose()
        };
        let opt_str_array = |key: &str| -> Result<Option<Vec<String>>> {
            g.get(key)
                .map(|_| {
                    g.get_str_array(key)
                        .map(|v| v.into_iter().map(str::to_owned).collect())
                })
                .transpose()
        };
        Ok(Self {
            model: g.get_str("tokenizer.ggml.model")?.to_owned(),
            pre: opt_str("tokenizer.ggml.pre")?,
            tokens: g
                .get_str_array("tokenizer.ggml.tokens")?
                .into_iter()
                .map(str::to_owned)
                .collect(),
            scores: g
                .get("tokenizer.ggml.scores")
                .map(|_| g.get_f32_array("tokenizer.ggml.scores"))
                .transpose()?,
            token_types: g
                .get("tokenizer.ggml.token_type")
                .map(|_| g.get_i32_array("tokenizer.ggml.token_type"))
                .transpose()?,
            merges: opt_str_array("tokenizer.ggml.merges")?,
            bos_token_id: opt_u32("tokenizer.ggml.bos_token_id")?,
            eos_token_id: opt_u32("tokenizer.ggml.eos_token_id")?,
            eot_token_id: opt_u32("tokenizer.ggml.eot_token_id")?,
            eom_token_id: opt_u32("tokenizer.ggml.eom_token_id")?,
            unknown_token_id: opt_u32("tokenizer.ggml.unknown_token_id")?,
            padding_token_id: opt_u32("tokenizer.ggml.padding_token_id")?,
            add_bos_token: opt_bool("tokenizer.ggml.add_bos_token")?,
            add_eos_token: opt_bool("tokenizer.ggml.add_eos_token")?,
            add_space_prefix: opt_bool("tokenizer.ggml.add_space_prefix")?,
            chat_template: opt_str("tokenizer.chat_template")?,
        })
    }
}

/// What a token is, after llama.cpp's name-based corrections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attr {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
    Undefined,
}

impl Attr {
    fn from_gguf_type(t: i32) -> Self {
        match t {
            1 => Attr::Normal,
            2 => Attr::Unknown,
            3 => Attr::Control,
            4 => Attr::UserDefined,
            5 => Attr::Unused,
            6 => Attr::Byte,
            _ => Attr::Undefined,
        }
    }

    /// Tokens recognised in text only when special parsing is on.
    fn needs_parse_special(self) -> bool {
        matches!(self, Attr::Control | Attr::Unknown)
    }
}

/// The two ways text becomes ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// From a GGUF vocabulary; `spm` is true for `tokenizer.ggml.model = "llama"`.
    Gguf { spm: bool },
    /// From a `tokenizer.json`, run by the `tokenizers` crate as written.
    HfJson,
}

/// Per pre-tokenizer name: llama.cpp's regex splits (applied one after the
/// other, each match and each gap becoming its own piece) and flags.
struct PrePreset {
    regexes: &'static [&'static str],
    /// Look the whole pre-token up in the vocabulary before merging.
    ignore_merges: bool,
    /// llama.cpp's `add_bos` default for this type (the file's key overrides it).
    add_bos: bool,
    /// llama.cpp clears the BOS token for these (the file's key overrides it).
    no_bos: bool,
}

const GPT2_RE: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_RE: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_RE: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const SEED_CODER_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+";
const BAILINGMOE_RE: &str = r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";
const DEEPSEEK3_RE: &str = r"[!-/:-@\[-`{-~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Latin, Greek, Cyrillic and other cased letters, as deepseek-llm lists them.
const DEEPSEEK_LLM_LETTERS_RE: &str = r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+";
const BLOOM_RE: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";

const fn preset(regexes: &'static [&'static str]) -> PrePreset {
    PrePreset {
        regexes,
        ignore_merges: false,
        add_bos: false,
        no_bos: false,
    }
}

/// llama.cpp's `tokenizer.ggml.pre` names (`llama_vocab::impl::load`) and the
/// regexes of their `LLAMA_VOCAB_PRE_TYPE_*` (`llm_tokenizer_bpe`). Types that
/// need llama.cpp's hand-written splitters (kimi-k2, afmoe, superbpe, gemma4,
/// whitespace, ...) are absent and fall back to GPT-2 with a warning.
fn pre_preset(name: &str) -> Option<PrePreset> {
    const LLAMA3: PrePreset = PrePreset {
        regexes: &[LLAMA3_RE],
        ignore_merges: true,
        add_bos: true,
        no_bos: false,
    };
    let p = match name {
        "default" => preset(&[
            r"[\p{P}\$\+<=>\^~\|]+",
            GPT2_RE,
            r"\p{N}+",
            r"[0-9][0-9][0-9]",
        ]),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => LLAMA3,
        "dbrx" | "smaug-bpe" => preset(&[LLAMA3_RE]),
        "chatglm-bpe" => PrePreset {
            no_bos: true,
            ..preset(&[LLAMA3_RE])
        },
        "glm4" | "glm5" => PrePreset {
            ignore_merges: true,
            no_bos: true,
            ..preset(&[LLAMA3_RE])
        },
        "deepseek-llm" => preset(&[
            "[\r\n]",
            DEEPSEEK_LLM_LETTERS_RE,
            r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
            r"\s+$",
            "[一-龥ࠀ-一가-퟿]+",
            r"\p{N}+",
        ]),
        "deepseek-coder" => preset(&[
            "[\r\n]",
            r"\s?\p{L}+",
            r"\s?\p{P}+",
            "[一-龥ࠀ-一가-퟿]+",
            r"\p{N}",
        ]),
        "deepseek-v3" | "hunyuan-dense" | "joyai-llm" | "hy_v4" => {
            preset(&[r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+", DEEPSEEK3_RE])
        }
        "falcon" => preset(&[r"[\p{P}\$\+<=>\^~\|`]+", GPT2_RE, r"[0-9][0-9][0-9]"]),
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b"
        | "mellum2" => preset(&[r"\p{N}", GPT2_RE]),
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
        | "a.x-4.0" | "mellum" | "modern-bert" | "jina-v1-en" | "jina-v2-code" | "roberta-bpe"
        | "mpt" | "olmo" | "jais" | "trillion" | "granite-docling" | "exaone4" => {
            preset(&[GPT2_RE])
        }
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "stablelm2" | "hunyuan"
        | "solar-open" | "megrez" | "grok-2" => preset(&[QWEN2_RE]),
        "qwen35" => preset(&[QWEN35_RE]),
        "poro-chat" | "bloom" | "gpt3-finnish" => preset(&[BLOOM_RE]),
        "viking" => preset(&[BLOOM_RE, r"\p{N}"]),
        "tekken" => PrePreset {
            ignore_merges: true,
            add_bos: true,
            ..preset(&[TEKKEN_RE])
        },
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => preset(&[GPT4O_RE]),
        "seed-coder" => preset(&[SEED_CODER_RE]),
        "bailingmoe" | "bailingmoe2" | "llada-moe" => preset(&[BAILINGMOE_RE]),
        _ => return None,
    };
    Some(p)
}

/// Token texts llama.cpp treats as end of generation (`special_eog_ids`),
/// whatever the file's token type says.
const EOG_NAMES: &[&str] = &[
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
/// Fill-in-the-middle pad/repo/separator tokens; llama.cpp stops on these too.
const FIM_PAD_NAMES: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_NAMES: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
const FIM_SEP_NAMES: &[&str] = &["<|file_sep|>"];
/// Other names llama.cpp forces to control type (EOT, EOM, FIM markers).
const CONTROL_NAMES: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];

/// Special tokens indexed for finding them in text.
#[derive(Default)]
struct SpecialIndex {
    /// Text → id, for every control, unknown and user-defined token.
    by_text: HashMap<String, u32>,
    /// The distinct byte lengths of those texts, longest first.
    lengths: Vec<usize>,
    /// Whether some special token starts with this byte.
    first_byte: Vec<bool>,
}

impl SpecialIndex {
    /// The control, unknown and user-defined tokens of a vocabulary.
    fn of(attrs: &[Attr], tokens: &[String]) -> Self {
        Self::new(
            attrs
                .iter()
                .zip(tokens)
                .enumerate()
                .filter_map(|(id, (a, t))| {
                    (a.needs_parse_special() || *a == Attr::UserDefined)
                        .then_some((id as u32, t.as_str()))
                }),
        )
    }

    fn new<'a>(tokens: impl Iterator<Item = (u32, &'a str)>) -> Self {
        let mut by_text = HashMap::new();
        let mut first_byte = vec![false; 256];
        let mut lengths = HashSet::new();
        for (id, text) in tokens {
            if text.is_empty() {
                continue;
            }
            first_byte[usize::from(text.as_bytes()[0])] = true;
            lengths.insert(text.len());
            // Duplicate texts: the later id wins, as in llama.cpp's token_to_id.
            by_text.insert(text.to_owned(), id);
        }
        let mut lengths: Vec<usize> = lengths.into_iter().collect();
        lengths.sort_unstable_by(|a, b| b.cmp(a));
        Self {
            by_text,
            lengths,
            first_byte,
        }
    }

    /// Ids of the special tokens occurring anywhere in `text`.
    fn occurring(&self, text: &str) -> Vec<u32> {
        let bytes = text.as_bytes();
        let mut found = Vec::new();
        for i in 0..bytes.len() {
            if !self.first_byte[usize::from(bytes[i])] || !text.is_char_boundary(i) {
                continue;
            }
            for &len in &self.lengths {
                let end = i + len;
                if end <= bytes.len() && text.is_char_boundary(end) {
                    if let Some(&id) = self.by_text.get(&text[i..end]) {
                        found.push(id);
                    }
                }
            }
        }
        found.sort_unstable();
        found.dedup();
        found
    }
}

/// A piece of the input after cutting out special tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

/// A tokenizer: encode, decode, special ids and the chat template of one model.
pub struct Tokenizer {
    /// Tokenizes text fragments (GGUF) or whole inputs (`tokenizer.json`).
    hf: tokenizers::Tokenizer,
    /// For `tokenizer.json`: a copy that reads special-token text as plain text,
    /// made on first use of `parse_special = false`.
    hf_plain: OnceLock<tokenizers::Tokenizer>,
    kind: Kind,
    /// SentencePiece encoding for GGUF `llama` vocabularies.
    spm: Option<Spm>,
    /// Token text by id, as the vocabulary stores it (byte-level or `▁` form).
    tokens: Vec<String>,
    attrs: Vec<Attr>,
    specials: SpecialIndex,
    /// Normal tokens are GPT-2 byte-level strings (else SentencePiece `▁` strings).
    byte_level: bool,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    eog: HashSet<u32>,
    chat_template: Option<String>,
    warnings: Vec<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind)
            .field("vocab_size", &self.tokens.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("add_space_prefix", &self.add_space_prefix)
            .finish_non_exhaustive()
    }
}

fn tok_err(context: &str, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{context}: {e}"))
}

impl Tokenizer {
    /// Builds the tokenizer embedded in a GGUF file (`tokenizer.ggml.*` keys).
    pub fn from_gguf(g: &crate::gguf::Gguf) -> Result<Self> {
        let vocab = GgufVocab::from_gguf(g)?;
        Self::from_vocab(vocab).map_err(|e| match e {
            Error::Tokenizer(message) => Error::Metadata {
                path: g.path().to_path_buf(),
                key: "tokenizer.ggml".into(),
                message,
            },
            other => other,
        })
    }

    /// Builds a tokenizer from GGUF tokenizer fields, reproducing llama.cpp's
    /// defaults and corrections for them.
    pub fn from_vocab(mut spec: GgufVocab) -> Result<Self> {
        let spm = match spec.model.as_str() {
            "gpt2" => false,
            "llama" => true,
            other => {
                return Err(Error::Tokenizer(format!(
                    "tokenizer model '{other}' is not supported (supported: gpt2, llama)"
                )))
            }
        };
        let n = spec.tokens.len();
        if n == 0 {
            return Err(Error::Tokenizer("the vocabulary is empty".into()));
        }
        let n_u32 =
            u32::try_from(n).map_err(|_| Error::Tokenizer("vocabulary too large".into()))?;
        for (key, len) in [
            ("tokenizer.ggml.scores", spec.scores.as_ref().map(Vec::len)),
            (
                "tokenizer.ggml.token_type",
                spec.token_types.as_ref().map(Vec::len),
            ),
        ] {
            if let Some(len) = len.filter(|&len| len < n) {
                return Err(Error::Tokenizer(format!(
                    "{key} has {len} entries for {n} tokens"
                )));
            }
        }
        let mut warnings = Vec::new();

        // llama.cpp renames empty tokens so that every text is unique and non-empty.
        let tokens: Vec<String> = spec
            .tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                if t.is_empty() {
                    format!("[EMPTY_{i}]")
                } else {
                    t
                }
            })
            .collect();
        let mut attrs: Vec<Attr> = match &spec.token_types {
            Some(types) => types[..n]
                .iter()
                .map(|&t| Attr::from_gguf_type(t))
                .collect(),
            None => vec![Attr::Normal; n],
        };

        // Defaults before the file's keys, as in llama_vocab::impl::load.
        let (mut bos, mut eos, mut unk) = if spm {
            (Some(1), Some(2), Some(0))
        } else {
            (Some(11), Some(11), None)
        };
        let mut add_bos = spm;
        let mut add_eos = false;
        let mut add_space_prefix = spm;
        let mut ignore_merges = false;
        let mut regexes: &[&str] = &[];
        if !spm {
            let pre_name = spec.pre.as_deref().unwrap_or("default");
            if spec.pre.is_none() {
                warnings.push(
                    "tokenizer.ggml.pre is missing; using the 'default' pre-tokenizer".into(),
                );
            }
            let preset = pre_preset(pre_name).unwrap_or_else(|| {
                warnings.push(format!(
                    "pre-tokenizer '{pre_name}' is not supported; splitting with the GPT-2 regex"
                ));
                preset(&[GPT2_RE])
            });
            regexes = preset.regexes;
            ignore_merges = preset.ignore_merges;
            add_bos = preset.add_bos;
            if preset.no_bos {
                bos = None;
            }
            add_space_prefix = false;
        }
        let in_range = |id: Option<u32>| id.filter(|&id| id < n_u32);
        bos = in_range(spec.bos_token_id).or(in_range(bos));
        eos = in_range(spec.eos_token_id).or(in_range(eos));
        unk = in_range(spec.unknown_token_id).or(in_range(unk));
        add_bos = spec.add_bos_token.unwrap_or(add_bos);
        add_eos = spec.add_eos_token.unwrap_or(add_eos);
        add_space_prefix = spec.add_space_prefix.unwrap_or(add_space_prefix);
        if add_bos && bos.is_none() {
            return Err(Error::Tokenizer(
                "add_bos_token is set but there is no BOS token".into(),
            ));
        }
        if add_eos && eos.is_none() {
            return Err(Error::Tokenizer(
                "add_eos_token is set but there is no EOS token".into(),
            ));
        }

        // Later duplicates win, as in llama.cpp's token_to_id.
        let index: FxMap<&str, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i as u32))
            .collect();
        let lowest_named = |names: &[&str]| {
            names
                .iter()
                .filter_map(|name| index.get(name).copied())
                .min()
        };
        let mut eog = HashSet::new();
        for names in [FIM_PAD_NAMES, FIM_REP_NAMES, FIM_SEP_NAMES] {
            if let Some(id) = lowest_named(names) {
                eog.insert(id);
            }
        }
        eog.extend(EOG_NAMES.iter().filter_map(|name| index.get(name).copied()));
        // Tokens that look like control tokens are control tokens to llama.cpp,
        // which matters when special parsing is off.
        let forced = CONTROL_NAMES
            .iter()
            .filter_map(|name| index.get(name).copied());
        for id in eog.iter().copied().chain(forced) {
            attrs[id as usize] = Attr::Control;
        }
        for name in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
            if let Some(&id) = index.get(name) {
                attrs[id as usize] = Attr::UserDefined;
            }
        }
        eog.extend(
            [
                eos,
                in_range(spec.eot_token_id),
                in_range(spec.eom_token_id),
            ]
            .into_iter()
            .flatten(),
        );
        let has =
            |eog: &HashSet<u32>, name: &str| index.get(name).is_some_and(|id| eog.contains(id));
        // gpt-oss and solar-open: "<|end|>" ends a message, not the generation.
        if has(&eog, "<|end|>")
            && ((has(&eog, "<|return|>") && has(&eog, "<|call|>"))
                || (has(&eog, "<|calls|>") && has(&eog, "<|flush|>")))
        {
            let end = index["<|end|>"];
            eog.remove(&end);
            attrs[end as usize] = Attr::UserDefined;
        }
        // Gemma 4 and PLaMo: "</s>" is an ordinary token there.
        if (has(&eog, "<|tool_response>") || has(&eog, "<|plamo:eos|>")) && has(&eog, "</s>") {
            let s = index["</s>"];
            eog.remove(&s);
            attrs[s as usize] = Attr::Normal;
        }

        let model = if spm {
            // Encoded by `Spm`; the Hugging Face side only holds the added tokens.
            Ok(BPE::default())
        } else {
            // The file's merge strings go before the tokenizer is built: the
            // load's peak memory is what a robot's budget has to hold.
            let file_merges = spec.merges.take().unwrap_or_default();
            let merges = bpe_merges(&file_merges, &index);
            drop(file_merges);
            let mut vocab: Vocab = Vocab::default();
            vocab.extend(tokens.iter().cloned().zip(0u32..));
            BPE::builder()
                .vocab_and_merges(vocab, merges)
                .ignore_merges(ignore_merges)
                .build()
        }
        .map_err(|e| tok_err("building the BPE model", e))?;

        let mut hf = tokenizers::Tokenizer::new(model);
        let spm = spm.then(|| {
            let scores = spec.scores.as_deref().unwrap_or(&[]);
            Spm::new(&tokens, scores, unk)
        });
        if spm.is_none() {
            let mut steps: Vec<PreTokenizerWrapper> = Vec::with_capacity(regexes.len() + 1);
            for re in regexes {
                let split = Split::new(
                    SplitPattern::Regex((*re).to_owned()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| tok_err(&format!("pre-tokenizer regex {re}"), e))?;
                steps.push(split.into());
            }
            steps.push(ByteLevel::new(false, false, false).into());
            hf.with_pre_tokenizer(Some(PreTokenizerSequence::new(steps)));
            hf.with_decoder(Some(ByteLevel::new(false, false, false)));
        }
        // Register control and user-defined tokens so the HF tokenizer is complete
        // on its own, but never let it split control tokens: `partition` decides
        // that, the llama.cpp way, before fragments reach it.
        let added = |want: fn(Attr) -> bool, special: bool| -> Vec<AddedToken> {
            attrs
                .iter()
                .zip(&tokens)
                .filter(|(a, _)| want(**a))
                .map(|(_, t)| AddedToken::from(t.clone(), special).normalized(false))
                .collect()
        };
        hf.add_special_tokens(&added(Attr::needs_parse_special, true));
        hf.add_tokens(&added(|a| a == Attr::UserDefined, false));
        hf.set_encode_special_tokens(true);

        let specials = SpecialIndex::of(&attrs, &tokens);

        Ok(Self {
            hf,
            hf_plain: OnceLock::new(),
            kind: Kind::Gguf { spm: spm.is_some() },
            byte_level: spm.is_none(),
            spm,
            tokens,
            attrs,
            specials,
            bos,
            eos,
            add_bos,
            add_eos,
            add_space_prefix,
            eog,
            chat_template: spec.chat_template,
            warnings,
        })
    }

    /// Builds a tokenizer from a Hugging Face model folder: `tokenizer.json`, plus
    /// `tokenizer_config.json` (BOS/EOS, chat template), `chat_template.jinja` and
    /// `generation_config.json` (extra end-of-generation ids) where present.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let hf = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| tok_err(&path.display().to_string(), e))?;
        let config = read_json_opt(&dir.join("tokenizer_config.json"))?;
        let generation = read_json_opt(&dir.join("generation_config.json"))?;

        let vocab = hf.get_vocab(true);
        let n = vocab.values().max().map_or(0, |&m| m as usize + 1);
        // Ids index a table; a file with ids far beyond its token count is broken.
        if n > 2 * vocab.len() + 1024 {
            return Err(tok_err(
                &path.display().to_string(),
                format!("token ids reach {n} for {} tokens", vocab.len()),
            ));
        }
        let mut tokens = vec![String::new(); n];
        let mut attrs = vec![Attr::Unused; n];
        for (text, &id) in &vocab {
            tokens[id as usize] = text.clone();
            attrs[id as usize] = Attr::Normal;
        }
        for (id, token) in hf.get_added_tokens_decoder() {
            if let Some(a) = attrs.get_mut(id as usize) {
                *a = if token.special {
                    Attr::Control
                } else {
                    Attr::UserDefined
                };
            }
        }
        let model = serde_json::to_value(hf.get_model()).unwrap_or_default();
        if model["byte_fallback"].as_bool() == Some(true) {
            for (id, t) in tokens.iter().enumerate() {
                if attrs[id] == Attr::Normal && parse_byte_token(t).is_some() {
                    attrs[id] = Attr::Byte;
                }
            }
        }
        let decoder = serde_json::to_value(hf.get_decoder()).unwrap_or_default();
        let byte_level = decoder.to_string().contains("\"ByteLevel\"");

        let token_id = |field: &str| -> Option<u32> {
            let v = &config[field];
            let text = v.as_str().or_else(|| v["content"].as_str())?;
            hf.token_to_id(text)
        };
        let bos = token_id("bos_token");
        let eos = token_id("eos_token");
        let mut eog: HashSet<u32> = EOG_NAMES
            .iter()
            .filter_map(|name| hf.token_to_id(name))
            .collect();
        eog.extend(eos);
        match &generation["eos_token_id"] {
            serde_json::Value::Number(id) => eog.extend(id.as_u64().map(|i| i as u32)),
            serde_json::Value::Array(ids) => {
                eog.extend(ids.iter().filter_map(|i| i.as_u64()).map(|i| i as u32))
            }
            _ => {}
        }
        let chat_template = match &config["chat_template"] {
            serde_json::Value::String(s) => Some(s.clone()),
            // Several named templates: take "default", else the first.
            serde_json::Value::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .or_else(|| list.first())
                .and_then(|t| t["template"].as_str())
                .map(str::to_owned),
            _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };

        // What the post-processor adds is what add_special means here.
        let probe = hf.encode_fast("", true).map_err(|e| tok_err("encode", e))?;
        let add_bos = bos.is_some() && probe.get_ids().first() == bos.as_ref();
        let add_eos = eos.is_some() && probe.get_ids().last() == eos.as_ref();

        Ok(Self {
            hf,
            hf_plain: OnceLock::new(),
            kind: Kind::HfJson,
            spm: None,
            // Only for finding control-token text (`control_texts_in`): the
            // HF tokenizer splits its added tokens itself.
            specials: SpecialIndex::of(&attrs, &tokens),
            byte_level,
            bos,
            eos,
            add_bos,
            add_eos,
            add_space_prefix: false,
            eog,
            chat_template,
            warnings: Vec::new(),
            tokens,
            attrs,
        })
    }

    /// Text to ids. `add_special`: add BOS/EOS as the model says.
    /// `parse_special`: recognise control-token text such as `<|im_start|>`; when
    /// off, such text is tokenized as ordinary characters (user-defined tokens are
    /// recognised either way, as in llama.cpp).
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>> {
        if self.kind == Kind::HfJson {
            let hf = if parse_special {
                &self.hf
            } else {
                self.hf_plain.get_or_init(|| {
                    let mut plain = self.hf.clone();
                    plain.set_encode_special_tokens(true);
                    plain
                })
            };
            let enc = hf
                .encode_fast(text, add_special)
                .map_err(|e| tok_err("encode", e))?;
            return Ok(enc.get_ids().to_vec());
        }

        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            ids.extend(self.bos);
        }
        for fragment in self.partition(text, parse_special) {
            match fragment {
                Fragment::Token(id) => ids.push(id),
                Fragment::Text(s) => {
                    if let Some(spm) = &self.spm {
                        // Each fragment gets the space prefix, as the
                        // SentencePiece normalizer would give it.
                        let mut text = String::with_capacity(s.len() + 8);
                        if self.add_space_prefix {
                            text.push(SPM_SPACE);
                        }
                        text.extend(s.chars().map(|c| if c == ' ' { SPM_SPACE } else { c }));
                        spm.encode(&self.tokens, &text, &mut ids);
                        continue;
                    }
                    let enc = self
                        .hf
                        .encode_fast(s, false)
                        .map_err(|e| tok_err("encode", e))?;
                    ids.extend_from_slice(enc.get_ids());
                }
            }
        }
        if add_special && self.add_eos {
            ids.extend(self.eos);
        }
        Ok(ids)
    }

    /// Text in parts, tokenized as one: BOS/EOS (with `add_special`) at the two
    /// ends only, and each part with special parsing unless it is marked
    /// literal. One unmarked part is exactly `encode(text, add_special, true)`.
    pub fn encode_parts(&self, parts: &[(&str, bool)], add_special: bool) -> Result<Vec<u32>> {
        if let [(text, literal)] = parts {
            return self.encode(text, add_special, !literal);
        }
        let mut ids = Vec::new();
        if add_special && self.add_bos {
            ids.extend(self.bos);
        }
        for &(text, literal) in parts {
            ids.extend(self.encode(text, false, !literal)?);
        }
        if add_special && self.add_eos {
            ids.extend(self.eos);
        }
        Ok(ids)
    }

    /// The texts of the control tokens (those only special parsing reads as
    /// tokens) that occur in `text`, longest first.
    pub fn control_texts_in(&self, text: &str) -> Vec<&str> {
        let mut found: Vec<&str> = self
            .specials
            .occurring(text)
            .into_iter()
            .filter(|&id| self.attrs[id as usize].needs_parse_special())
            .map(|id| self.tokens[id as usize].as_str())
            .collect();
        found.sort_by_key(|t| std::cmp::Reverse(t.len()));
        found
    }

    /// llama.cpp's `tokenizer_st_partition`: cut special tokens out of the text,
    /// longest token first, each one at all its occurrences.
    fn partition<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut found = self.specials.occurring(text);
        found.retain(|&id| parse_special || !self.attrs[id as usize].needs_parse_special());
        found.sort_by_key(|&id| (std::cmp::Reverse(self.tokens[id as usize].len()), id));

        let mut fragments = vec![Fragment::Text(text)];
        for id in found {
            let pattern = self.tokens[id as usize].as_str();
            let mut next = Vec::with_capacity(fragments.len() + 2);
            for fragment in fragments {
                let Fragment::Text(s) = fragment else {
                    next.push(fragment);
                    continue;
                };
                let mut last = 0;
                for (at, _) in s.match_indices(pattern) {
                    if at > last {
                        next.push(Fragment::Text(&s[last..at]));
                    }
                    next.push(Fragment::Token(id));
                    last = at + pattern.len();
                }
                if last < s.len() {
                    next.push(Fragment::Text(&s[last..]));
                }
            }
            fragments = next;
        }
        fragments
    }

    /// Ids to text. `skip_special`: leave out control tokens (BOS, `<|im_end|>`, ...).
    /// For SentencePiece vocabularies with a space prefix, the prefix added to the
    /// first word is removed again, so `decode(encode(s))` gives back `s`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        if self.kind == Kind::HfJson {
            return self
                .hf
                .decode(ids, skip_special)
                .map_err(|e| tok_err("decode", e));
        }
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        let mut strip_prefix = self.add_space_prefix;
        for (i, &id) in ids.iter().enumerate() {
            let piece = self.token_bytes(id, skip_special)?;
            if i == 0 && Some(id) == self.bos {
                bytes.extend_from_slice(&piece);
                continue;
            }
            let piece = if strip_prefix {
                piece.strip_prefix(b" ").unwrap_or(&piece)
            } else {
                &piece
            };
            strip_prefix = false;
            bytes.extend_from_slice(piece);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The bytes one token stands for, as llama.cpp's `token_to_piece`: control
    /// and unknown tokens are their text unless skipped, user-defined tokens are
    /// verbatim, byte tokens are one raw byte (possibly part of a UTF-8 character).
    fn token_bytes(&self, id: u32, skip_special: bool) -> Result<std::borrow::Cow<'_, [u8]>> {
        use std::borrow::Cow;
        let (Some(text), Some(&attr)) = (self.tokens.get(id as usize), self.attrs.get(id as usize))
        else {
            return Err(Error::Tokenizer(format!(
                "token id {id} is out of range (vocabulary size {})",
                self.tokens.len()
            )));
        };
        Ok(match attr {
            Attr::Control | Attr::Unknown if skip_special => Cow::Borrowed(&[]),
            Attr::Control | Attr::Unknown | Attr::UserDefined => Cow::Borrowed(text.as_bytes()),
            Attr::Byte => match parse_byte_token(text) {
                Some(b) => Cow::Owned(vec![b]),
                None => Cow::Borrowed(text.as_bytes()),
            },
            Attr::Normal if self.byte_level => Cow::Owned(byte_level_decode(text)),
            Attr::Normal if text.contains(SPM_SPACE) => {
                Cow::Owned(text.replace(SPM_SPACE, " ").into_bytes())
            }
            Attr::Normal => Cow::Borrowed(text.as_bytes()),
            // llama.cpp prints nothing for unused and undefined tokens.
            Attr::Unused | Attr::Undefined => Cow::Borrowed(&[]),
        })
    }

    /// The bytes a token stands for when printed, control tokens included
    /// as their text (what grammars and log-probabilities see).
    pub fn piece(&self, id: u32) -> Result<std::borrow::Cow<'_, [u8]>> {
        self.token_bytes(id, false)
    }

    /// The most bytes of text one token stands for, and at least 4 (a
    /// character that falls back to one unknown token): a text longer than
    /// `n` times this cannot take fewer than `n` tokens, which bounds a
    /// prompt before it is tokenized. Walks the vocabulary (call once).
    pub fn longest_piece(&self) -> usize {
        (0..self.vocab_size() as u32)
            .filter_map(|id| self.piece(id).ok().map(|p| p.len()))
            .max()
            .unwrap_or(0)
            .max(4)
    }

    /// Whether a token is a control token (`<|im_end|>`, `<bos>`): never
    /// text the model writes, so grammars may not spell it.
    pub fn is_control(&self, id: u32) -> bool {
        matches!(
            self.attrs.get(id as usize),
            Some(Attr::Control | Attr::Unknown)
        )
    }

    /// Number of token ids (the embedding table's row count).
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The beginning-of-sequence token.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence token.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Whether `encode(.., add_special = true, ..)` puts BOS first.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether generation stops at this token: EOS, EOT, EOM and the tokens
    /// llama.cpp adds to `special_eog_ids` by name (`<|im_end|>`, `<|endoftext|>`,
    /// `<end_of_turn>`, FIM pad/repo/separator, ...).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    /// A token's text as the vocabulary stores it (e.g. `"<bos>"` for templates).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The model's Jinja chat template, if the file carries one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Things that were not as expected while building (e.g. an unknown
    /// pre-tokenizer name and the fallback used instead).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }
}

/// Streaming detokenization: push ids one at a time and get the text they
/// complete. Never emits part of a UTF-8 character: bytes of an incomplete
/// character (an emoji split over byte tokens) wait for the next push.
///
/// Pieces are llama.cpp's `token_to_piece`, so a leading space of the first
/// token is kept, as llama.cpp's server streams it.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    skip_special: bool,
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// A decoder that leaves out control tokens when `skip_special` is true.
    pub fn new(skip_special: bool) -> Self {
        Self {
            skip_special,
            pending: Vec::new(),
        }
    }

    /// Adds one token; returns the text that is now complete (maybe empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        let piece = tok.token_bytes(id, self.skip_special)?;
        self.pending.extend_from_slice(&piece);
        Ok(self.take_complete())
    }

    /// Returns whatever is held back, with incomplete characters as U+FFFD.
    pub fn flush(&mut self, _tok: &Tokenizer) -> Result<String> {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        Ok(out)
    }

    /// Removes and returns the longest prefix of `pending` that is finished text.
    /// Invalid bytes (not merely unfinished ones) become U+FFFD right away.
    fn take_complete(&mut self) -> String {
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // SAFETY-free: from_utf8 just validated this prefix.
                    out.push_str(
                        std::str::from_utf8(&self.pending[start..start + valid])
                            .unwrap_or_default(),
                    );
                    start += valid;
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            start += bad;
                        }
                        None => break, // an unfinished character: wait for more
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }
}

/// rustc's FxHash: loading a vocabulary does millions of lookups of short
/// strings, where SipHash's DoS resistance buys nothing.
#[derive(Default, Clone, Copy)]
struct FxHasher(u64);

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl std::hash::Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().unwrap_or_default()));
        }
        for &b in chunks.remainder() {
            self.add(u64::from(b));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type FxMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<FxHasher>>;

/// `<0xAB>` → 0xAB.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2)
        .then(|| u8::from_str_radix(hex, 16).ok())
        .flatten()
}

/// GPT-2's byte ↔ printable-character table: printable Latin-1 bytes stand for
/// themselves, the other 68 bytes for U+0100.. in order.
fn byte_level_chars() -> &'static ([char; 256], HashMap<char, u8>) {
    static TABLE: OnceLock<([char; 256], HashMap<char, u8>)> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut chars = ['\0'; 256];
        let mut next = 256u32;
        for b in 0..=255u8 {
            let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
            chars[usize::from(b)] = if printable {
                char::from(b)
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap_or('\0')
            };
        }
        let rev = chars
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        (chars, rev)
    })
}

/// A byte-level token string back to its bytes (chars outside the table pass through).
fn byte_level_decode(text: &str) -> Vec<u8> {
    let (_, rev) = byte_level_chars();
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match rev.get(&c) {
            Some(&b) => out.push(b),
            None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    out
}

/// The file's BPE merges as pairs, keeping llama.cpp's reading: split at the
/// first space after the first byte, the first occurrence of a pair wins, and
/// pairs that are not in the vocabulary are dropped (llama.cpp never matches them).
fn bpe_merges(merges: &[String], index: &FxMap<&str, u32>) -> Vec<(String, String)> {
    let mut seen = HashSet::new();
    merges
        .iter()
        .filter_map(|m| {
            // A byte search from byte 1, as llama.cpp's `word.find(' ', 1)`.
            let pos = m.bytes().skip(1).position(|b| b == b' ')? + 1;
            let (a, b) = (&m[..pos], &m[pos + 1..]);
            let ok = index.contains_key(a)
                && index.contains_key(b)
                && index.contains_key(format!("{a}{b}").as_str());
            (ok && seen.insert((a, b))).then(|| (a.to_owned(), b.to_owned()))
        })
        .collect()
}

fn read_json_opt(path: &Path) -> Result<serde_json::Value> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map_err(|e| tok_err(&path.display().to_string(), e))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(serde_json::Value::Null),
        Err(source) => Err(Error::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A byte-level BPE vocabulary for tests and the fuzz targets: the 256 byte
/// characters, a few merges, the control tokens `<|im_start|>` and
/// `<|im_end|>`, and the user-defined token `<tool>`.
pub(crate) fn tiny_bpe() -> Tokenizer {
    let (chars, _) = byte_level_chars();
    let mut tokens: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
    let merges = [
        "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "l d", "Ġw or", "Ġwor ld",
    ];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    tokens.extend(["<|im_start|>", "<|im_end|>", "<tool>"].map(String::from));
    let mut types = vec![1; tokens.len()];
    let n = types.len();
    types[n - 3] = 3;
    types[n - 2] = 3;
    types[n - 1] = 4;
    Tokenizer::from_vocab(GgufVocab {
        model: "gpt2".into(),
        pre: Some("gpt-2".into()),
        tokens,
        token_types: Some(types),
        merges: Some(merges.map(String::from).to_vec()),
        bos_token_id: Some(n as u32 - 3),
        eos_token_id: Some(n as u32 - 2),
        ..Default::default()
    })
    .expect("a well-formed vocabulary")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(tok: &Tokenizer, text: &str) -> u32 {
        tok.tokens.iter().position(|t| t == text).unwrap() as u32
    }

    #[test]
    fn bpe_merges_words_and_round_trips() {
        let tok = tiny_bpe();
        let ids = tok.encode("hello world", true, true).unwrap();
        assert_eq!(ids, vec![id(&tok, "hello"), id(&tok, "Ġworld")]);
        assert!(
            !tok.add_bos(),
            "gpt2 vocabularies add no BOS unless the file says so"
        );
        for text in ["hello world", "  two  spaces\t\n", "héllo wörld 🤖", ""] {
            let ids = tok.encode(text, true, true).unwrap();
            assert_eq!(tok.decode(&ids, false).unwrap(), text);
        }
    }

    #[test]
    fn special_tokens_follow_parse_special() {
        let tok = tiny_bpe();
        let start = id(&tok, "<|im_start|>");
        let text = "<|im_start|>hello<tool>";
        let parsed = tok.encode(text, false, true).unwrap();
        assert_eq!(parsed, vec![start, id(&tok, "hello"), id(&tok, "<tool>")]);
        // Control tokens become plain text; user-defined ones are still recognised.
        let plain = tok.encode(text, false, false).unwrap();
        assert!(!plain.contains(&start));
        assert_eq!(plain.last(), Some(&id(&tok, "<tool>")));
        assert_eq!(tok.decode(&plain, true).unwrap(), text);
        assert_eq!(tok.decode(&parsed, true).unwrap(), "hello<tool>");
        assert_eq!(tok.decode(&parsed, false).unwrap(), text);
        assert!(tok.is_eog(id(&tok, "<|im_end|>")));
        assert!(!tok.is_eog(start));
    }

    #[test]
    fn unknown_pre_tokenizer_falls_back_with_a_warning() {
        let mut spec = GgufVocab {
            model: "gpt2".into(),
            pre: Some("no-such-pre".into()),
            tokens: byte_level_chars().0.iter().map(|c| c.to_string()).collect(),
            ..Default::default()
        };
        let tok = Tokenizer::from_vocab(spec.clone()).unwrap();
        assert_eq!(tok.warnings().len(), 1);
        assert!(tok.warnings()[0].contains("no-such-pre"));
        spec.model = "wordpiece".into();
        assert!(Tokenizer::from_vocab(spec).is_err());
    }

    #[test]
    fn every_pre_tokenizer_regex_compiles() {
        for name in [
            "default",
            "llama-bpe",
            "dbrx",
            "deepseek-llm",
            "chatglm-bpe",
            "deepseek-coder",
            "deepseek-v3",
            "falcon",
            "smollm",
            "gpt-2",
            "qwen2",
            "qwen35",
            "bloom",
            "viking",
            "tekken",
            "gpt-4o",
            "seed-coder",
            "bailingmoe",
        ] {
            let preset = pre_preset(name).unwrap();
            for re in preset.regexes {
                Split::new(
                    SplitPattern::Regex((*re).to_owned()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .unwrap_or_else(|e| panic!("{name}: {re}: {e}"));
            }
        }
    }

    /// A SentencePiece vocabulary: specials, the 256 byte tokens, scored pieces.
    fn tiny_spm_vocab() -> GgufVocab {
        let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
        let mut types = vec![2, 3, 3];
        let mut scores = vec![0.0, 0.0, 0.0];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
            scores.push(0.0);
        }
        let pieces = [
            "he", "ll", "llo", "hello", "▁hello", "▁h", "▁w", "or", "ld", "▁wor", "▁world", "ab",
            "ba", "aba", "bab", "▁▁", "▁", "h", "e", "l", "o", "w", "r", "d", "a", "b", "é",
        ];
        for (i, p) in pieces.iter().enumerate() {
            tokens.push((*p).into());
            types.push(1);
            scores.push(-(i as f32));
        }
        tokens.push("<start_of_turn>".into());
        types.push(3);
        scores.push(0.0);
        GgufVocab {
            model: "llama".into(),
            tokens,
            scores: Some(scores),
            token_types: Some(types),
            ..Default::default()
        }
    }

    /// llama.cpp's `llm_tokenizer_spm` as written: repeatedly merge the adjacent
    /// pair whose concatenation is the highest-scoring piece (leftmost on ties),
    /// then spell leftover symbols as byte tokens. The oracle for the BPE form.
    fn spm_reference(spec: &GgufVocab, text: &str) -> Vec<u32> {
        let scores = spec.scores.as_ref().unwrap();
        let lookup = |s: &str| spec.tokens.iter().rposition(|t| t == s).map(|i| i as u32);
        let mut syms: Vec<String> = text.chars().map(String::from).collect();
        loop {
            let best = (0..syms.len().saturating_sub(1))
                .filter_map(|i| {
                    lookup(&format!("{}{}", syms[i], syms[i + 1])).map(|t| (scores[t as usize], i))
                })
                .fold(None, |best: Option<(f32, usize)>, (s, i)| match best {
                    Some((bs, _)) if bs >= s => best,
                    _ => Some((s, i)),
                });
            let Some((_, i)) = best else { break };
            let right = syms.remove(i + 1);
            syms[i].push_str(&right);
        }
        syms.iter()
            .flat_map(|s| match lookup(s) {
                Some(t) => vec![t],
                None => s
                    .bytes()
                    .map(|b| lookup(&format!("<0x{b:02X}>")).unwrap())
                    .collect(),
            })
            .collect()
    }

    #[test]
    fn spm_matches_the_llama_cpp_algorithm() {
        let spec = tiny_spm_vocab();
        let tok = Tokenizer::from_vocab(spec.clone()).unwrap();
        assert_eq!(tok.bos_id(), Some(1));
        assert!(tok.add_bos());
        let hello = id(&tok, "▁hello");
        assert_eq!(tok.encode("hello", true, true).unwrap(), vec![1, hello]);
        // A small deterministic fuzz over the vocabulary's alphabet.
        let alphabet: Vec<char> = "helowrdab é😀\t".chars().collect();
        let mut state = 0x2545_f491_u32;
        for _ in 0..500 {
            let len = (state % 12) as usize;
            let text: String = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    alphabet[state as usize % alphabet.len()]
                })
                .collect();
            let escaped = format!("▁{}", text.replace(' ', "▁"));
            let got = tok.encode(&text, false, false).unwrap();
            let want = if text.is_empty() {
                vec![]
            } else {
                spm_reference(&spec, &escaped)
            };
            assert_eq!(got, want, "text {text:?}");
            assert_eq!(tok.decode(&got, true).unwrap(), text);
        }
    }

    #[test]
    fn spm_space_prefix_follows_the_key_and_special_tokens() {
        let mut spec = tiny_spm_vocab();
        let tok = Tokenizer::from_vocab(spec.clone()).unwrap();
        let sot = id(&tok, "<start_of_turn>");
        let ids = tok.encode("<start_of_turn>hello", false, true).unwrap();
        // llama.cpp prefixes a space to text that follows a special token.
        assert_eq!(ids, vec![sot, id(&tok, "▁hello")]);
        spec.add_space_prefix = Some(false);
        let tok = Tokenizer::from_vocab(spec).unwrap();
        let ids = tok.encode("hello world", false, true).unwrap();
        assert_eq!(ids, vec![id(&tok, "hello"), id(&tok, "▁world")]);
        assert_eq!(tok.decode(&ids, false).unwrap(), "hello world");
    }

    #[test]
    fn stream_decoder_holds_back_split_characters() {
        let tok = Tokenizer::from_vocab(tiny_spm_vocab()).unwrap();
        let text = "hello 🤖é";
        let ids = tok.encode(text, false, true).unwrap();
        // The robot is not in the vocabulary: four byte tokens.
        assert!(ids.len() >= 6);
        let mut stream = StreamDecoder::new(true);
        let mut out = String::new();
        for &t in &ids {
            let piece = stream.push(&tok, t).unwrap();
            assert!(!piece.contains(char::REPLACEMENT_CHARACTER));
            out.push_str(&piece);
        }
        out.push_str(&stream.flush(&tok).unwrap());
        // Pieces keep the prefix space, as llama.cpp streams them.
        assert_eq!(out, format!(" {text}"));

        let robot: Vec<u32> = "🤖"
            .bytes()
            .map(|b| id(&tok, &format!("<0x{b:02X}>")))
            .collect();
        let mut stream = StreamDecoder::new(true);
        for &t in &robot[..3] {
            assert_eq!(stream.push(&tok, t).unwrap(), "");
        }
        assert_eq!(stream.push(&tok, robot[3]).unwrap(), "🤖");
        // A stray continuation byte is invalid, not unfinished: replaced at once.
        assert_eq!(stream.push(&tok, robot[3]).unwrap(), "\u{FFFD}");
        assert_eq!(stream.push(&tok, robot[0]).unwrap(), "");
        assert_eq!(stream.flush(&tok).unwrap(), "\u{FFFD}");
        assert!(stream.push(&tok, 1_000_000).is_err());
    }

    #[test]
    fn hugging_face_folder() {
        // Write the tiny BPE out as a tokenizer.json and read it back as a
        // Hugging Face folder would be read.
        let gguf = tiny_bpe();
        let dir = std::env::temp_dir().join(format!("embody-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("tokenizer.json"),
            gguf.hf.to_string(false).unwrap(),
        )
        .unwrap();
        let config = serde_json::json!({
            "bos_token": "<|im_start|>",
            "eos_token": {"content": "<|im_end|>"},
            "chat_template": "{{ messages }}",
        });
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
        let tok = Tokenizer::from_hf_dir(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        let tok = tok.unwrap();

        let start = id(&tok, "<|im_start|>");
        let end = id(&tok, "<|im_end|>");
        assert_eq!((tok.bos_id(), tok.eos_id()), (Some(start), Some(end)));
        assert!(tok.is_eog(end));
        assert_eq!(tok.chat_template(), Some("{{ messages }}"));
        let text = "<|im_start|>hello world";
        let parsed = tok.encode(text, false, true).unwrap();
        assert_eq!(parsed, gguf.encode(text, false, true).unwrap());
        let plain = tok.encode(text, false, false).unwrap();
        assert!(!plain.contains(&start));
        assert_eq!(tok.decode(&plain, true).unwrap(), text);
        assert_eq!(tok.decode(&parsed, true).unwrap(), "hello world");

        let mut stream = StreamDecoder::new(false);
        let streamed: String = parsed
            .iter()
            .map(|&t| stream.push(&tok, t).unwrap())
            .collect();
        assert_eq!(streamed, text);
        assert!(Tokenizer::from_hf_dir(Path::new("/nonexistent")).is_err());
    }

    #[test]
    fn stream_decoder_on_byte_level_vocab() {
        let tok = tiny_bpe();
        let text = "héllo 👩‍💻 world";
        let ids = tok.encode(text, false, true).unwrap();
        let mut stream = StreamDecoder::new(false);
        let mut out = String::new();
        for &t in &ids {
            let piece = stream.push(&tok, t).unwrap();
            assert!(!piece.contains(char::REPLACEMENT_CHARACTER));
            out.push_str(&piece);
        }
        assert_eq!(stream.flush(&tok).unwrap(), "");
        assert_eq!(out, text);
    }
}
