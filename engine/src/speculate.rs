//! Prompt-lookup drafting for speculative decoding.
//!
//! Answers that repeat their input (a JSON object rewritten with one field
//! changed, tool arguments quoting the request, code edits) continue the way
//! an earlier stretch of the sequence did. The draft is what followed the
//! latest earlier occurrence of the sequence's last few tokens; the model
//! checks every drafted token in one batched forward pass, and the scheduler
//! keeps the tokens it would have sampled anyway. No second model is needed.

use std::ops::Range;

/// Settings of prompt-lookup drafting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lookup {
    /// Most tokens drafted per step, over all sequences (0: off).
    pub max_draft: usize,
    /// Longest suffix looked up; longer matches are tried first.
    pub max_ngram: usize,
    /// Shortest suffix looked up.
    pub min_ngram: usize,
}

impl Lookup {
    /// Drafting off.
    pub const OFF: Lookup = Lookup {
        max_draft: 0,
        max_ngram: 4,
        min_ngram: 2,
    };

    /// Drafting of up to `max_draft` tokens per step with the default n-gram
    /// lengths (4 down to 2: single tokens match too often by chance).
    pub fn tokens(max_draft: usize) -> Lookup {
        Lookup {
            max_draft,
            ..Lookup::OFF
        }
    }
}

/// The tokens that followed the latest earlier occurrence of the longest
/// suffix of `tokens` (from `max_ngram` down to `min_ngram` tokens long), at
/// most `max` of them, as a range of `tokens`; empty when no suffix occurred
/// before.
pub fn draft(tokens: &[u32], lookup: &Lookup, max: usize) -> Range<usize> {
    if max == 0 {
        return 0..0;
    }
    let top = lookup.max_ngram.min(tokens.len().saturating_sub(1));
    for n in (lookup.min_ngram.max(1)..=top).rev() {
        let suffix = &tokens[tokens.len() - n..];
        // Starts of earlier occurrences, latest first; each must be followed
        // by at least one token before the suffix itself begins.
        let last_start = tokens.len() - n - 1;
        for start in (0..=last_start).rev() {
            if &tokens[start..start + n] == suffix {
                let from = start + n;
                return from..(from + max).min(tokens.len());
            }
        }
    }
    0..0
}

/// How many tokens one sequence drafts next: it starts at the most allowed,
/// halves after a draft the model rejects early and grows back as drafts are
/// taken; after drafts rejected outright it pauses for 2, 4, ... up to 32
/// steps. Text that does not repeat costs little.
#[derive(Clone, Copy, Debug)]
pub struct DraftLength {
    len: usize,
    max: usize,
    /// Steps left to pause, and drafts rejected outright in a row.
    pause: u32,
    misses: u32,
}

/// The longest pause after drafts rejected outright, in steps.
const MAX_PAUSE: u32 = 32;

impl DraftLength {
    /// Starts at `max`, the most it will ever be.
    pub fn new(max: usize) -> Self {
        Self {
            len: max,
            max,
            pause: 0,
            misses: 0,
        }
    }

    /// Tokens to draft this step, at most `max`; 0 while paused. Call it
    /// once per decoding step.
    pub fn next(&mut self, max: usize) -> usize {
        if self.pause > 0 {
            self.pause -= 1;
            return 0;
        }
        self.len.min(max)
    }

    /// Records that `accepted` of `drafted` tokens were taken.
    pub fn update(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        if accepted == 0 {
            self.misses += 1;
            self.pause = (1u32 << self.misses.min(5)).min(MAX_PAUSE);
        } else {
            self.misses = 0;
        }
        self.len = if accepted == drafted {
            (self.len + 2).min(self.max)
        } else {
            (accepted + 1).max(self.len / 2).clamp(1, self.max.max(1))
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_occurrence_of_the_longest_suffix_is_drafted() {
        let l = Lookup::tokens(8);
        // "1 2 3" occurs at 0 and 5; the latest (5) is followed by 9.
        let t = [1, 2, 3, 4, 5, 1, 2, 3, 9, 7, 1, 2, 3];
        assert_eq!(&t[draft(&t, &l, 8)], &[9, 7, 1, 2, 3]);
        assert_eq!(&t[draft(&t, &l, 2)], &[9, 7]);
        // A 2-gram is used when no 3- or 4-gram repeats.
        let t = [5, 6, 7, 8, 0, 7, 8];
        assert_eq!(&t[draft(&t, &l, 8)], &[0, 7, 8]);
        // The longer match wins over a later shorter one.
        let t = [1, 2, 3, 10, 9, 2, 3, 11, 1, 2, 3];
        assert_eq!(&t[draft(&t, &l, 1)], &[10]);
    }

    #[test]
    fn nothing_is_drafted_without_a_repeat() {
        let l = Lookup::tokens(8);
        assert!(draft(&[1, 2, 3, 4, 5], &l, 8).is_empty());
        assert!(draft(&[], &l, 8).is_empty());
        assert!(draft(&[7], &l, 8).is_empty());
        // A suffix that only overlaps itself (7 7 7) is followed by itself.
        assert_eq!(draft(&[7, 7, 7], &l, 8), 2..3);
        assert!(draft(&[1, 2, 1, 2], &l, 0).is_empty());
        // Single tokens are below the default shortest n-gram.
        assert!(draft(&[1, 5, 2, 5], &l, 8).is_empty());
    }

    /// Steps until `d` drafts again, and how many it drafts then.
    fn resume(d: &mut DraftLength) -> (usize, usize) {
        let mut steps = 0;
        loop {
            let n = d.next(8);
            if n > 0 {
                return (steps, n);
            }
            steps += 1;
        }
    }

    #[test]
    fn the_draft_length_follows_what_is_accepted() {
        let mut d = DraftLength::new(8);
        assert_eq!(d.next(3), 3);
        assert_eq!(d.next(8), 8);
        d.update(8, 1);
        assert_eq!(d.next(8), 4);
        d.update(4, 1);
        assert_eq!(d.next(8), 2);
        d.update(2, 1);
        d.update(1, 0);
        // Rejected outright: a pause of 2 steps, then one token.
        assert_eq!(resume(&mut d), (2, 1));
        d.update(1, 1);
        d.update(3, 3);
        assert_eq!(d.next(8), 5);
        d.update(5, 4);
        assert_eq!(d.next(8), 5);
        d.update(0, 0);
        assert_eq!(d.next(8), 5);
    }

    #[test]
    fn drafts_rejected_outright_pause_drafting_longer_each_time() {
        let mut d = DraftLength::new(4);
        let mut pauses = Vec::new();
        for _ in 0..7 {
            let (steps, n) = resume(&mut d);
            pauses.push(steps);
            d.update(n, 0);
        }
        assert_eq!(pauses, [0, 2, 4, 8, 16, 32, 32]);
        // One token taken ends the streak (and the whole draft grows by 2).
        let (_, n) = resume(&mut d);
        assert_eq!(n, 1);
        d.update(1, 1);
        assert_eq!(d.next(4), 3);
        d.update(3, 0);
        assert_eq!(resume(&mut d).0, 2);
    }
}
