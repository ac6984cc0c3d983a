//! The reward: one path from (prompt style, reply, question) to a verdict — `train`, `eval` and
//! `score` all call [`score`] — and, beside it, where a reply of each style ends.

use crate::prompt::PromptStyle;
use crate::task::McqaItem;
use crate::verifier::{self, Verdict, VerifierConfig};

/// What a reply is scored against.
#[derive(Debug, Clone, Copy)]
pub struct Gold<'a> {
    /// The gold letter, `A`….
    pub letter: char,
    pub num_options: usize,
    /// The gold option's text (only the answer-leak diagnostic reads it).
    pub text: Option<&'a str>,
}

impl<'a> Gold<'a> {
    pub fn of(item: &'a McqaItem) -> Self {
        Self {
            letter: item.answer,
            num_options: item.num_options(),
            text: Some(item.gold_text()),
        }
    }
}

/// The reward of `reply` under prompt `style`:
/// - `r1` (the paper's rule, [`verifier::verify`]): −1 without the `<think>…</think><answer>…</answer>`
///   format, 0 for a wrong letter, +1 for the gold one; `cfg.strict` anchors the format at the start
///   and wants one bare letter; the optional penalties are subtracted.
/// - `direct` ([`verifier::verify_direct`]): 1 when the first letter of the reply's first line is
///   the gold one, else 0 (no tags to check).
pub fn score(style: PromptStyle, reply: &str, gold: &Gold, cfg: &VerifierConfig) -> Verdict {
    match style {
        PromptStyle::R1 => verifier::verify(reply, gold.letter, gold.num_options, gold.text, cfg),
        PromptStyle::Direct => verifier::verify_direct(reply, gold.letter, gold.num_options),
    }
}

/// Where a reply of `style` ends (the stop string is kept in the reply; `<|endoftext|>` always
/// stops): after `</answer>` for `r1`, at the end of the first line for `direct`.
pub fn stop_strings(style: PromptStyle) -> Vec<String> {
    match style {
        PromptStyle::R1 => vec!["</answer>".into()],
        PromptStyle::Direct => vec!["\n".into()],
    }
}
