//! Pieces of generation shared by every caller of the scheduler: why a
//! sequence ends, stop-string matching on streamed text (never emitting the
//! start of what may turn out to be a stop string), and tokenizing a rendered
//! chat prompt.

use crate::tokenizer::Tokenizer;
use crate::Result;

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
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
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
                        self.pending.is_char_boundary(start)
                            && s.starts_with(&self.pending[start..])
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
    encode_chat_parts(tok, &[(rendered, false)])
}

/// [`encode_chat`] for a prompt in parts, those marked literal tokenized
/// without special parsing ([`Tokenizer::encode_parts`]).
pub fn encode_chat_parts(tok: &Tokenizer, parts: &[(&str, bool)]) -> Result<Vec<u32>> {
    let bos_text = tok.bos_id().and_then(|b| tok.token_text(b));
    if let (Some(b), Some(&(first, false))) = (bos_text, parts.first()) {
        if !b.is_empty() && first.starts_with(b) {
            let mut rest = parts.to_vec();
            rest[0].0 = &first[b.len()..];
            let ids = tok.encode_parts(&rest, true)?;
            if ids.first() == tok.bos_id().as_ref() {
                return Ok(ids);
            }
        }
    }
    tok.encode_parts(parts, true)
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
        assert_eq!(
            run(&["</s>"], &["Hello <", "/", "s> more"]),
            ("Hello ".into(), true)
        );
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
