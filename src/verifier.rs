//! The reward, in one file, and the reward-hacking diagnostics computed with it.
//!
//! Reward (paper §2): invalid format → −1; valid format and wrong letter → 0; valid and right → +1.
//!
//! **Permissive mode (default, the paper's semantics).** Valid format = a `<think>` … `</think>`
//! block followed (anywhere later) by an `<answer>` … `</answer>` block; the match is *not*
//! anchored at the start (text before `<think>` is allowed: the "step-by-step exploit" was rewarded),
//! there is no minimum think length, and text between the blocks or after `</answer>` is allowed
//! (both are reported as diagnostics). The first `<think>`, the first `</think>` after it, the first
//! `<answer>` after that and the first `</answer>` after that are used; later answer blocks are
//! ignored (and counted). A reply without a closing `</answer>` (truncated) is invalid.
//!
//! The letter is read from the answer block by the first rule that matches:
//! 1. the whole block is one letter, optionally in `()`/`[]` or followed by `.`/`:`/`)` —
//!    `C`, `(C)`, `c.`; lower case counts;
//! 2. the block starts with a letter and a separator, then option text — `C: Cholesterol embolization`,
//!    `C. text`, `(C) text`;
//! 3. a phrase — `the answer is C`, `answer: (C)`, `option C`, `choice C`;
//! 4. exactly one standalone upper-case in-range letter in the block (`I'd pick C` → C; `A or C` →
//!    none).
//!
//! A letter outside the question's options (e.g. `F` with five options) never counts: the reply is
//! valid but wrong (0).
//!
//! **Strict mode.** The reply (leading whitespace ignored) must start with `<think>`; exactly one
//! think block and one answer block; only whitespace between `</think>` and `<answer>` and after
//! `</answer>`; the answer block (trimmed) is exactly one upper-case in-range letter.
//!
//! Optional penalties (off by default; the later paper arXiv:2509.15557): subtract
//! `answer_leak_penalty` when the first sentence of think states an option letter or the gold
//! option's text, and `preamble_penalty` when more than `preamble_max_words` words precede `<think>`.
//! Penalties apply to valid replies only.

use std::sync::OnceLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

/// Verifier settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VerifierConfig {
    pub strict: bool,
    /// Subtracted when the answer is stated in the first sentence of think (0 = off).
    pub answer_leak_penalty: f32,
    /// Subtracted when more than `preamble_max_words` words precede `<think>` (0 = off).
    pub preamble_penalty: f32,
    pub preamble_max_words: usize,
}

impl Default for VerifierConfig {
    fn default() -> Self {
        Self {
            strict: false,
            answer_leak_penalty: 0.0,
            preamble_penalty: 0.0,
            preamble_max_words: PREAMBLE_WORDS,
        }
    }
}

/// Stage thresholds (see [`classify`]).
pub const PREAMBLE_WORDS: usize = 15;
/// Think blocks this long (words) or longer are "verbose".
pub const VERBOSE_THINK_WORDS: usize = 120;
/// Answer blocks with this many words or more restate the option text ("verbose formatter").
pub const VERBOSE_ANSWER_WORDS: usize = 4;
/// A think block shorter than this that states the answer first is a "direct-answer hacker".
pub const SHORT_THINK_WORDS: usize = 30;

/// The six training stages of the paper (§4.2.1), as a per-reply label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    FormatFailure,
    VerboseFormatter,
    ConciseStructurer,
    DirectAnswerHacker,
    StepByStepExploit,
    ReintegratedReasoning,
}

impl Stage {
    pub const ALL: [Stage; 6] = [
        Stage::FormatFailure,
        Stage::VerboseFormatter,
        Stage::ConciseStructurer,
        Stage::DirectAnswerHacker,
        Stage::StepByStepExploit,
        Stage::ReintegratedReasoning,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::FormatFailure => "format_failure",
            Stage::VerboseFormatter => "verbose_formatter",
            Stage::ConciseStructurer => "concise_structurer",
            Stage::DirectAnswerHacker => "direct_answer_hacker",
            Stage::StepByStepExploit => "step_by_step_exploit",
            Stage::ReintegratedReasoning => "reintegrated_reasoning",
        }
    }
}

/// Per-reply diagnostics, cheap enough for every rollout.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Diagnostics {
    pub words_before_think: usize,
    pub think_words: usize,
    /// Filled by callers that have a tokenizer.
    pub think_tokens: Option<usize>,
    pub answer_words: usize,
    /// The first sentence of think states an option letter or the gold option's text.
    pub answer_leak: bool,
    pub think_blocks: usize,
    pub answer_blocks: usize,
    /// Non-whitespace text after the scored `</answer>`.
    pub text_after_answer: bool,
    /// An `<answer>` was opened but never closed.
    pub truncated: bool,
}

/// The verdict on one reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub reward: f32,
    pub format_ok: bool,
    pub extracted: Option<char>,
    pub correct: bool,
    pub stage: Stage,
    pub diagnostics: Diagnostics,
}

/// The spans of the scored blocks (byte offsets into the reply).
struct Blocks {
    think_open: usize,
    think: (usize, usize),
    answer: (usize, usize),
    answer_close_end: usize,
}

const THINK_O: &str = "<think>";
const THINK_C: &str = "</think>";
const ANSWER_O: &str = "<answer>";
const ANSWER_C: &str = "</answer>";

fn find_blocks(reply: &str) -> Option<Blocks> {
    let think_open = reply.find(THINK_O)?;
    let ts = think_open + THINK_O.len();
    let te = ts + reply[ts..].find(THINK_C)?;
    let after_think = te + THINK_C.len();
    let as_ = after_think + reply[after_think..].find(ANSWER_O)? + ANSWER_O.len();
    let ae = as_ + reply[as_..].find(ANSWER_C)?;
    Some(Blocks {
        think_open,
        think: (ts, te),
        answer: (as_, ae),
        answer_close_end: ae + ANSWER_C.len(),
    })
}

fn words(s: &str) -> usize {
    s.split_whitespace().count()
}

fn re(cell: &'static OnceLock<Regex>, pattern: &str) -> &'static Regex {
    cell.get_or_init(|| Regex::new(pattern).expect("valid regex"))
}

fn in_range(c: char, n: usize) -> bool {
    c.is_ascii_alphabetic() && ((c.to_ascii_uppercase() as u8 - b'A') as usize) < n
}

/// The letter stated in an answer block (rules 1–4 of the module doc), upper-cased; `None` if no
/// rule matches or the letter is out of range.
pub fn extract_letter(answer: &str, num_options: usize) -> Option<char> {
    static BARE: OnceLock<Regex> = OnceLock::new();
    static LEADING: OnceLock<Regex> = OnceLock::new();
    static PHRASE: OnceLock<Regex> = OnceLock::new();
    static STANDALONE: OnceLock<Regex> = OnceLock::new();
    let a = answer.trim();
    let pick = |c: &str| c.chars().next().map(|c| c.to_ascii_uppercase());
    if let Some(m) = re(&BARE, r"^[\(\[]?([A-Za-z])[\)\]]?[.:)]?$").captures(a) {
        return pick(&m[1]).filter(|&c| in_range(c, num_options));
    }
    if let Some(m) = re(
        &LEADING,
        r"^[\(\[]?([A-Z])(?:[\)\]]|[.:)\-]|\s*[\)\]]?\s*[:.\-])\s*\S",
    )
    .captures(a)
    {
        return pick(&m[1]).filter(|&c| in_range(c, num_options));
    }
    if let Some(m) = re(
        &PHRASE,
        r"(?i)\b(?:answer|option|choice)\s*(?:is|:|would be|=)?\s*[\(\[]?([A-Z])\b",
    )
    .captures(a)
    {
        return pick(&m[1]).filter(|&c| in_range(c, num_options));
    }
    let mut found: Option<char> = None;
    for m in re(&STANDALONE, r"\b([A-Z])\b").captures_iter(a) {
        let c = pick(&m[1]).expect("one char");
        if !in_range(c, num_options) {
            continue;
        }
        match found {
            Some(f) if f != c => return None,
            _ => found = Some(c),
        }
    }
    found
}

/// Strict answer: exactly one upper-case in-range letter.
fn strict_letter(answer: &str, num_options: usize) -> Option<char> {
    let a = answer.trim();
    let mut cs = a.chars();
    match (cs.next(), cs.next()) {
        (Some(c), None) if c.is_ascii_uppercase() && in_range(c, num_options) => Some(c),
        _ => None,
    }
}

/// The first sentence of a think block: up to the first `.`, `!`, `?` followed by whitespace (or
/// the end), or the first newline.
fn first_sentence(think: &str) -> &str {
    let t = think.trim_start();
    let bytes = t.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\n' {
            return &t[..i];
        }
        if matches!(b, b'.' | b'!' | b'?')
            && bytes.get(i + 1).is_none_or(|n| n.is_ascii_whitespace())
        {
            return &t[..=i];
        }
    }
    t
}

/// Does `sentence` state an option letter (`answer is C`, `(C)`, `C.`/`C:` at the start, `option C`)
/// or the gold option's text?
fn states_answer(sentence: &str, num_options: usize, gold_text: Option<&str>) -> bool {
    static LETTERISH: OnceLock<Regex> = OnceLock::new();
    let r = re(
        &LETTERISH,
        r"(?i)(?:\b(?:answer|option|choice)\s*(?:is|:|would be|=)?\s*[\(\[]?([A-Z])\b)|(?:[\(\[]([A-Z])[\)\]])|(?:^\s*([A-Z])\s*[.:)])",
    );
    let letter = r.captures_iter(sentence).any(|m| {
        (1..=3).filter_map(|i| m.get(i)).any(|g| {
            g.as_str()
                .chars()
                .next()
                .is_some_and(|c| in_range(c, num_options))
        })
    });
    let text = gold_text.is_some_and(|g| {
        let g = g.trim().to_lowercase();
        g.chars().count() >= 3 && sentence.to_lowercase().contains(&g)
    });
    letter || text
}

/// Labels a reply with one of the six stages from its diagnostics, checked in this order:
/// invalid format → `format_failure`; more than `PREAMBLE_WORDS` (15) words before `<think>` →
/// `step_by_step_exploit`; think ≥ `VERBOSE_THINK_WORDS` (120) words or an answer block of
/// ≥ `VERBOSE_ANSWER_WORDS` (4) words → `verbose_formatter`; answer stated in the first sentence of
/// think and think < `SHORT_THINK_WORDS` (30) words → `direct_answer_hacker`; answer stated first
/// but think ≥ 30 words → `reintegrated_reasoning` (reasoning back inside think, some hacking
/// remains); otherwise → `concise_structurer`.
pub fn classify(format_ok: bool, d: &Diagnostics) -> Stage {
    if !format_ok {
        Stage::FormatFailure
    } else if d.words_before_think > PREAMBLE_WORDS {
        Stage::StepByStepExploit
    } else if d.think_words >= VERBOSE_THINK_WORDS || d.answer_words >= VERBOSE_ANSWER_WORDS {
        Stage::VerboseFormatter
    } else if d.answer_leak && d.think_words < SHORT_THINK_WORDS {
        Stage::DirectAnswerHacker
    } else if d.answer_leak {
        Stage::ReintegratedReasoning
    } else {
        Stage::ConciseStructurer
    }
}

/// Scores one reply against the gold letter of a question with `num_options` options.
/// `gold_text` (the gold option's text) is only used for the answer-leak diagnostic.
pub fn verify(
    reply: &str,
    gold: char,
    num_options: usize,
    gold_text: Option<&str>,
    cfg: &VerifierConfig,
) -> Verdict {
    let blocks = find_blocks(reply);
    let mut d = Diagnostics {
        words_before_think: words(&reply[..reply.find(THINK_O).unwrap_or(reply.len())]),
        think_blocks: reply.matches(THINK_O).count(),
        answer_blocks: count_answer_blocks(reply),
        truncated: reply.contains(ANSWER_O) && !reply.contains(ANSWER_C),
        ..Default::default()
    };
    let Some(b) = blocks else {
        if let Some(ts) = reply.find(THINK_O) {
            // Unclosed or answerless think: report its length anyway.
            let rest = &reply[ts + THINK_O.len()..];
            d.think_words = words(&rest[..rest.find(THINK_C).unwrap_or(rest.len())]);
        }
        let stage = classify(false, &d);
        return Verdict {
            reward: -1.0,
            format_ok: false,
            extracted: None,
            correct: false,
            stage,
            diagnostics: d,
        };
    };
    let think = &reply[b.think.0..b.think.1];
    let answer = &reply[b.answer.0..b.answer.1];
    d.think_words = words(think);
    d.answer_words = words(answer);
    d.text_after_answer = !reply[b.answer_close_end..].trim().is_empty();
    d.answer_leak = states_answer(first_sentence(think), num_options, gold_text);
    let format_ok = if cfg.strict {
        reply[..b.think_open].trim().is_empty()
            && d.think_blocks == 1
            && d.answer_blocks == 1
            && reply[b.think.1 + THINK_C.len()..b.answer.0 - ANSWER_O.len()]
                .trim()
                .is_empty()
            && !d.text_after_answer
            && strict_letter(answer, num_options).is_some()
    } else {
        true
    };
    let extracted = if !format_ok {
        None
    } else if cfg.strict {
        strict_letter(answer, num_options)
    } else {
        extract_letter(answer, num_options)
    };
    let correct = format_ok && extracted == Some(gold.to_ascii_uppercase());
    let mut reward = match (format_ok, correct) {
        (false, _) => -1.0,
        (true, false) => 0.0,
        (true, true) => 1.0,
    };
    if format_ok {
        if d.answer_leak {
            reward -= cfg.answer_leak_penalty;
        }
        if d.words_before_think > cfg.preamble_max_words {
            reward -= cfg.preamble_penalty;
        }
    }
    let stage = classify(format_ok, &d);
    Verdict {
        reward,
        format_ok,
        extracted,
        correct,
        stage,
        diagnostics: d,
    }
}

fn count_answer_blocks(reply: &str) -> usize {
    let mut n = 0;
    let mut rest = reply;
    while let Some(o) = rest.find(ANSWER_O) {
        let after = &rest[o + ANSWER_O.len()..];
        match after.find(ANSWER_C) {
            Some(c) => {
                n += 1;
                rest = &after[c + ANSWER_C.len()..];
            }
            None => break,
        }
    }
    n
}

/// The text of the scored think block, if the reply has a complete think block.
pub fn think_text(reply: &str) -> Option<&str> {
    let ts = reply.find(THINK_O)? + THINK_O.len();
    let te = ts + reply[ts..].find(THINK_C)?;
    Some(&reply[ts..te])
}

/// Running totals over many verdicts: mean reward, format rate, accuracy, stage histogram.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub count: usize,
    pub reward_mean: f64,
    pub format_rate: f64,
    pub accuracy: f64,
    pub stages: std::collections::BTreeMap<String, usize>,
}

impl Summary {
    pub fn from_verdicts<'a>(verdicts: impl IntoIterator<Item = &'a Verdict>) -> Self {
        let mut s = Summary::default();
        for st in Stage::ALL {
            s.stages.insert(st.name().to_string(), 0);
        }
        let (mut r, mut f, mut a) = (0.0, 0usize, 0usize);
        for v in verdicts {
            s.count += 1;
            r += v.reward as f64;
            f += v.format_ok as usize;
            a += v.correct as usize;
            *s.stages.entry(v.stage.name().to_string()).or_default() += 1;
        }
        let n = s.count.max(1) as f64;
        s.reward_mean = r / n;
        s.format_rate = f as f64 / n;
        s.accuracy = a as f64 / n;
        s
    }
}

/// Scores a direct-answer reply (baselines, SFT): the first letter found by the answer-block rules
/// in the reply's first line; no tags required (`format_ok` is true when a letter was found).
pub fn verify_direct(reply: &str, gold: char, num_options: usize) -> Verdict {
    let first_line = reply.trim_start().lines().next().unwrap_or("");
    let extracted = extract_letter(first_line, num_options);
    let correct = extracted == Some(gold.to_ascii_uppercase());
    Verdict {
        reward: if correct { 1.0 } else { 0.0 },
        format_ok: extracted.is_some(),
        extracted,
        correct,
        stage: if extracted.is_some() {
            Stage::ConciseStructurer
        } else {
            Stage::FormatFailure
        },
        diagnostics: Diagnostics::default(),
    }
}
