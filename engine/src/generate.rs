//! Single-sequence generation: prefill the prompt in chunks, then sample one
//! token per step until an end-of-generation token, a stop string or the token
//! limit. Text is streamed as it becomes final: never half a UTF-8 character,
//! never the start of what may turn out to be a stop string.

use crate::kv_cache::{BlockTable, KvCache};
use crate::models::{Logits, Model, SeqBatch};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::{StreamDecoder, Tokenizer};
use crate::{Error, Result};

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// The token limit or the context length.
    Length,
    /// The caller asked to stop.
    Cancelled,
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// Prompt token ids (BOS included when wanted).
    pub prompt: Vec<u32>,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Strings that end generation; they are not part of the output.
    pub stop: Vec<String>,
}

/// The outcome of a generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// The text emitted.
    pub text: String,
    /// Generated token ids (an end-of-generation token is not included).
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub finish: FinishReason,
    /// Prompt tokens processed.
    pub prompt_tokens: usize,
}

/// Holds back text that could still become a stop string.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    /// A matcher for these stop strings (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Adds new text; returns the text that is now final and whether a stop
    /// string was found (everything from it on is dropped).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Keep the longest suffix that is a proper prefix of some stop string.
        let keep = self
            .stops
            .iter()
            .map(|s| {
                (1..s.len().min(self.pending.len() + 1))
                    .rev()
                    .find(|&k| {
                        let start = self.pending.len() - k;
                        self.pending.is_char_boundary(start) && s.starts_with(&self.pending[start..])
                    })
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - keep;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    /// Releases held-back text at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Tokenizes a rendered chat prompt: special-token text is parsed, and BOS is
/// added by the tokenizer only when the template did not already write it (as
/// llama.cpp does, so the prompt never starts with two BOS tokens).
pub fn encode_chat(tok: &Tokenizer, rendered: &str) -> Result<Vec<u32>> {
    let bos_text = tok.bos_id().and_then(|b| tok.token_text(b));
    let text = match bos_text {
        Some(b) if !b.is_empty() && rendered.starts_with(b) => {
            let ids = tok.encode(&rendered[b.len()..], true, true)?;
            if ids.first() == tok.bos_id().as_ref() {
                return Ok(ids);
            }
            rendered
        }
        _ => rendered,
    };
    tok.encode(text, true, true)
}

/// Runs one request to completion. `on_text` receives each final piece of text
/// and returns `false` to cancel.
pub fn generate(
    model: &mut dyn Model,
    kv: &mut KvCache,
    tok: &Tokenizer,
    req: &GenerateRequest,
    mut on_text: impl FnMut(&str) -> bool,
) -> Result<Generation> {
    req.sampling.validate()?;
    let info = model.info().clone();
    if req.prompt.is_empty() {
        return Err(Error::InvalidRequest("empty prompt".into()));
    }
    if req.prompt.len() >= info.context_length {
        return Err(Error::InvalidRequest(format!(
            "prompt of {} tokens does not fit the context of {}",
            req.prompt.len(),
            info.context_length
        )));
    }
    let limit = req.max_tokens.min(info.context_length - req.prompt.len());
    let vocab = info.vocab_size;
    let mut logits = vec![0f32; vocab];
    let mut sampler = Sampler::new(req.sampling.clone(), vocab);
    let mut history = Vec::with_capacity(req.prompt.len() + limit);
    history.extend_from_slice(&req.prompt);
    let mut table = BlockTable {
        blocks: Vec::with_capacity(info.kv.blocks_for_tokens(req.prompt.len() + limit)),
    };
    let result = run(model, kv, tok, req, &mut table, &mut logits, &mut sampler, &mut history, limit, &mut on_text);
    table.release(kv);
    result
}

#[allow(clippy::too_many_arguments)]
fn run(
    model: &mut dyn Model,
    kv: &mut KvCache,
    tok: &Tokenizer,
    req: &GenerateRequest,
    table: &mut BlockTable,
    logits: &mut [f32],
    sampler: &mut Sampler,
    history: &mut Vec<u32>,
    limit: usize,
    on_text: &mut impl FnMut(&str) -> bool,
) -> Result<Generation> {
    let step = model.info().max_batch_tokens;
    let n_prompt = req.prompt.len();
    table.reserve(kv, n_prompt)?;
    let mut start = 0;
    while start < n_prompt {
        let end = (start + step).min(n_prompt);
        let batch = [SeqBatch {
            tokens: &req.prompt[start..end],
            start_pos: start,
            table,
            logits: if end == n_prompt { Logits::Last } else { Logits::None },
        }];
        model.forward(&batch, kv, logits)?;
        start = end;
    }

    let mut decoder = StreamDecoder::new(true);
    let mut stops = StopMatcher::new(&req.stop);
    let mut text = String::new();
    let mut tokens = Vec::with_capacity(limit);
    let mut finish = FinishReason::Length;
    let mut emit = |piece: &str, text: &mut String| -> bool {
        text.push_str(piece);
        piece.is_empty() || on_text(piece)
    };
    while tokens.len() < limit {
        let next = sampler.sample(logits, history);
        if tok.is_eog(next) {
            finish = FinishReason::Stop;
            break;
        }
        tokens.push(next);
        history.push(next);
        let (piece, stopped) = stops.push(&decoder.push(tok, next)?);
        if !emit(&piece, &mut text) {
            finish = FinishReason::Cancelled;
            break;
        }
        if stopped {
            finish = FinishReason::Stop;
            break;
        }
        if tokens.len() == limit {
            break;
        }
        let pos = history.len() - 1;
        table.reserve(kv, pos + 1)?;
        let batch = [SeqBatch {
            tokens: std::slice::from_ref(&history[pos]),
            start_pos: pos,
            table,
            logits: Logits::Last,
        }];
        model.forward(&batch, kv, logits)?;
    }
    if finish != FinishReason::Cancelled {
        let (tail, _) = stops.push(&decoder.flush(tok)?);
        let rest = if finish == FinishReason::Stop && stops.pending.is_empty() {
            tail
        } else {
            tail + &stops.finish()
        };
        emit(&rest, &mut text);
    }
    Ok(Generation {
        text,
        tokens,
        finish,
        prompt_tokens: n_prompt,
    })
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for p in pieces {
            let (t, hit) = m.push(p);
            out += &t;
            if hit {
                return (out, true);
            }
        }
        out += &m.finish();
        (out, false)
    }

    #[test]
    fn stop_string_split_over_pieces_is_cut() {
        assert_eq!(run(&["</s>"], &["Hello <", "/", "s> more"]), ("Hello ".into(), true));
        assert_eq!(run(&["\n\n"], &["a\n", "\nb"]), ("a".into(), true));
    }

    #[test]
    fn partial_match_is_released_when_it_diverges() {
        let stops = vec!["STOP".to_string()];
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("abc ST"), ("abc ".into(), false));
        assert_eq!(m.push("ART"), ("START".into(), false));
        assert_eq!(run(&["STOP"], &["x ST"]), ("x ST".into(), false));
    }

    #[test]
    fn earliest_stop_wins_and_multibyte_is_safe() {
        assert_eq!(run(&["b", "a"], &["xxab"]), ("xx".into(), true));
        assert_eq!(run(&["é!"], &["café", "?"]), ("café?".into(), false));
        assert_eq!(run(&[], &["plain"]), ("plain".into(), false));
    }
}
