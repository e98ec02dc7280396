//! Constrained decoding: a grammar that the output must follow, enforced
//! token by token with [llguidance](https://github.com/guidance-ai/llguidance).
//!
//! The decision to understand first: **the grammar masks the logits, it never
//! repairs text afterwards.** Before each sampling step the [`Constraint`]
//! computes which tokens keep the output a prefix of some sentence of the
//! grammar and every other logit becomes −∞; the sampled token is then
//! committed to the grammar. End of sequence is allowed only where the
//! grammar is complete, and once nothing can follow, generation ends there.
//! So a JSON schema answer always parses (unless the token limit cuts it).
//!
//! [`Grammars`] is built once per tokenizer (the token trie over the
//! vocabulary's bytes is the expensive part) and compiles one [`Constraint`]
//! per request. A grammar the compiler rejects is an error naming the problem,
//! reported before the request is queued.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use crate::tokenizer::Tokenizer;

/// A grammar, as a request states it.
#[derive(Clone, Debug, PartialEq)]
pub enum GrammarSpec {
    /// A JSON schema; the output is one JSON value that follows it, written
    /// compactly (`", "` and `": "` separators, no newlines).
    JsonSchema(Value),
    /// A grammar in llguidance's Lark dialect (`%json { schema }` embeds a
    /// JSON schema).
    Lark(String),
}

/// A grammar that cannot be used, or a failure while enforcing one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConstraintError {
    /// The grammar or schema was rejected by the compiler.
    #[error("invalid grammar: {0}")]
    Invalid(String),
    /// The grammar matcher failed during generation.
    #[error("constrained decoding failed: {0}")]
    Matcher(String),
}

/// The tokenizer as llguidance sees it: the bytes of every token, and
/// tokenization of text that grammars force.
struct EngineTokEnv {
    trie: TokTrie,
    tok: Arc<Tokenizer>,
}

impl TokenizerEnv for EngineTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // Forced text is short grammar literals: a lossy decode of a split
        // character only costs a less canonical tokenization, never a wrong mask.
        let text = String::from_utf8_lossy(s);
        self.tok.encode(&text, false, false).unwrap_or_default()
    }

    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

/// Compiles grammars against one tokenizer.
pub struct Grammars {
    factory: ParserFactory,
    vocab_size: usize,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars")
            .field("vocab_size", &self.vocab_size)
            .finish_non_exhaustive()
    }
}

impl Grammars {
    /// Builds the token trie of `tok` for logits rows of `vocab_size`
    /// (at least the tokenizer's; rows past it are padding and never allowed).
    /// Control tokens are marked special, so a grammar's text never spells them.
    pub fn new(tok: Arc<Tokenizer>, vocab_size: usize) -> Result<Self, ConstraintError> {
        let vocab_size = vocab_size.max(tok.vocab_size());
        let mut words: Vec<Vec<u8>> = Vec::with_capacity(vocab_size);
        for id in 0..vocab_size as u32 {
            let bytes = if (id as usize) >= tok.vocab_size() {
                Vec::new()
            } else if tok.is_control(id) {
                let mut b = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                b.extend_from_slice(tok.token_text(id).unwrap_or("").as_bytes());
                b
            } else {
                tok.piece(id).map(|p| p.into_owned()).unwrap_or_default()
            };
            words.push(bytes);
        }
        let eos = tok.eos_id().unwrap_or(0);
        let info = TokRxInfo {
            vocab_size: vocab_size as u32,
            tok_eos: eos,
            tok_bos: tok.bos_id(),
            tok_pad: None,
            tok_unk: None,
            tok_end_of_turn: None,
        };
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(EngineTokEnv { trie, tok });
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| ConstraintError::Invalid(format!("building the token trie: {e}")))?;
        factory.quiet();
        Ok(Self {
            factory,
            vocab_size,
        })
    }

    /// Compiles a grammar into a fresh constraint for one sequence.
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Constraint, ConstraintError> {
        let grammar = match spec {
            GrammarSpec::JsonSchema(schema) => TopLevelGrammar::from_json_schema(compact(schema)),
            GrammarSpec::Lark(source) => TopLevelGrammar::from_lark(source.clone()),
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| ConstraintError::Invalid(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(ConstraintError::Invalid(e));
        }
        // Some grammars compile and then admit nothing (a schema that is only
        // a reference to itself): the first mask finds them, here rather
        // than during generation.
        if matcher.deep_clone().compute_mask().is_err() {
            return Err(ConstraintError::Invalid(
                "the grammar admits no output: nothing can be generated that it accepts (a schema that only refers to itself, such as {\"$ref\": \"#\"}, has no finite value)".into(),
            ));
        }
        Ok(Constraint {
            matcher,
            vocab_size: self.vocab_size,
        })
    }
}

/// The JSON options every schema is compiled with: compact separators as
/// Python's `json.dumps` writes them, and no free whitespace (small models
/// otherwise fill the token budget with newlines).
pub fn json_compile_options() -> Value {
    serde_json::json!({
        "whitespace_flexible": false,
        "item_separator": ", ",
        "key_separator": ": "
    })
}

/// The schema with [`json_compile_options`] unless it sets its own.
fn compact(schema: &Value) -> Value {
    let mut s = match schema {
        Value::Bool(true) => serde_json::json!({}),
        other => other.clone(),
    };
    if let Value::Object(map) = &mut s {
        map.entry("x-guidance").or_insert_with(json_compile_options);
    }
    s
}

/// One sequence's grammar state.
pub struct Constraint {
    matcher: Matcher,
    vocab_size: usize,
}

impl Clone for Constraint {
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
            vocab_size: self.vocab_size,
        }
    }
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("finished", &self.matcher.is_stopped())
            .finish_non_exhaustive()
    }
}

impl Constraint {
    /// Sets the logit of every token the grammar forbids next to −∞. Where
    /// the grammar is complete, only end of sequence stays allowed.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), ConstraintError> {
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| ConstraintError::Matcher(e.to_string()))?;
        let n = logits.len().min(self.vocab_size);
        for (id, l) in logits[..n].iter_mut().enumerate() {
            if !allowed.is_allowed(id as TokenId) {
                *l = f32::NEG_INFINITY;
            }
        }
        for l in &mut logits[n..] {
            *l = f32::NEG_INFINITY;
        }
        Ok(())
    }

    /// Advances the grammar by the sampled token.
    pub fn commit(&mut self, token: u32) -> Result<(), ConstraintError> {
        self.matcher
            .consume_token(token)
            .map_err(|e| ConstraintError::Matcher(e.to_string()))
    }

    /// Whether the grammar is complete and nothing more may follow: the
    /// sequence ends here.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_adds_options_and_keeps_the_callers() {
        let s = compact(&serde_json::json!({"type": "integer"}));
        assert_eq!(s["x-guidance"]["whitespace_flexible"], false);
        let own = serde_json::json!({"x-guidance": {"whitespace_flexible": true}});
        assert_eq!(compact(&own), own);
        assert!(compact(&Value::Bool(true)).is_object());
    }
}
