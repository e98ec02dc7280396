//! SentencePiece vocabularies from GGUF files (`tokenizer.ggml.model =
//! "llama"`), encoded as llama.cpp's `llm_tokenizer_spm` does: start from the
//! characters, repeatedly merge the adjacent pair whose concatenation is the
//! highest-scoring piece (leftmost on ties), and spell what is left over as
//! byte tokens.
//!
//! Only the vocabulary and its scores are kept: no table of merges, which
//! for a 262k-piece vocabulary would take over a hundred megabytes.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Lookup tables over a vocabulary held elsewhere (`tokens`, by id).
#[derive(Debug)]
pub(super) struct Spm {
    /// Token ids ordered by their text, each text once: the last id that has it.
    by_text: Vec<u32>,
    scores: Vec<f32>,
    /// The `<0xXX>` token of each byte.
    bytes: Vec<Option<u32>>,
    unk: Option<u32>,
}

/// A candidate merge of symbols `left` and `right` (`size` bytes together).
#[derive(Debug, PartialEq)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl Eq for Bigram {}

impl Ord for Bigram {
    /// The highest score first, then the leftmost.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then(other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// A run of the input; merged-away symbols have `len == 0`.
#[derive(Clone, Copy, Debug)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl Spm {
    /// Tables for `tokens` with their `scores` (missing scores count as 0).
    pub(super) fn new(tokens: &[String], scores: &[f32], unk: Option<u32>) -> Self {
        let mut by_text: Vec<u32> = (0..tokens.len() as u32).collect();
        // Equal texts: the highest id first, and only it kept.
        by_text
            .sort_unstable_by(|&a, &b| tokens[a as usize].cmp(&tokens[b as usize]).then(b.cmp(&a)));
        by_text.dedup_by(|b, a| tokens[*a as usize] == tokens[*b as usize]);
        let mut spm = Self {
            by_text,
            scores: (0..tokens.len())
                .map(|i| scores.get(i).copied().unwrap_or(0.0))
                .collect(),
            bytes: vec![None; 256],
            unk,
        };
        for b in 0..=255u8 {
            spm.bytes[b as usize] = spm.id(tokens, &format!("<0x{b:02X}>"));
        }
        spm
    }

    /// The id of the token whose text is `s`.
    pub(super) fn id(&self, tokens: &[String], s: &str) -> Option<u32> {
        self.by_text
            .binary_search_by(|&id| tokens[id as usize].as_str().cmp(s))
            .ok()
            .map(|i| self.by_text[i])
    }

    /// Appends the ids of `text` (spaces already written as `▁`).
    pub(super) fn encode(&self, tokens: &[String], text: &str, out: &mut Vec<u32>) {
        let mut syms: Vec<Symbol> = Vec::with_capacity(text.len());
        for (i, (start, c)) in text.char_indices().enumerate() {
            syms.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: Some(i + 1),
            });
        }
        let Some(last) = syms.last_mut() else {
            return;
        };
        last.next = None;
        let mut heap = BinaryHeap::new();
        for i in 1..syms.len() {
            self.push_bigram(tokens, text, &syms, i - 1, i, &mut heap);
        }
        while let Some(b) = heap.pop() {
            let (l, r) = (syms[b.left], syms[b.right]);
            // Stale: one side was merged into something else since.
            if l.len == 0 || r.len == 0 || l.len + r.len != b.size {
                continue;
            }
            syms[b.left].len += r.len;
            syms[b.left].next = r.next;
            syms[b.right].len = 0;
            if let Some(n) = r.next {
                syms[n].prev = Some(b.left);
            }
            if let Some(p) = l.prev {
                self.push_bigram(tokens, text, &syms, p, b.left, &mut heap);
            }
            if let Some(n) = r.next {
                self.push_bigram(tokens, text, &syms, b.left, n, &mut heap);
            }
        }
        let mut at = Some(0);
        let mut last_unk = false;
        while let Some(i) = at {
            let s = syms[i];
            at = s.next;
            let piece = &text[s.start..s.start + s.len];
            if let Some(id) = self.id(tokens, piece) {
                out.push(id);
                last_unk = false;
                continue;
            }
            for b in piece.bytes() {
                match self.bytes[b as usize] {
                    Some(id) => {
                        out.push(id);
                        last_unk = false;
                    }
                    // Without byte tokens: one unknown token per unknown run.
                    None => {
                        if let (Some(unk), false) = (self.unk, last_unk) {
                            out.push(unk);
                        }
                        last_unk = true;
                    }
                }
            }
        }
    }

    fn push_bigram(
        &self,
        tokens: &[String],
        text: &str,
        syms: &[Symbol],
        left: usize,
        right: usize,
        heap: &mut BinaryHeap<Bigram>,
    ) {
        let (l, r) = (syms[left], syms[right]);
        let size = l.len + r.len;
        if let Some(id) = self.id(tokens, &text[l.start..l.start + size]) {
            heap.push(Bigram {
                score: self.scores[id as usize],
                left,
                right,
                size,
            });
        }
    }
}
