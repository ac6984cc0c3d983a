//! The prompts, in one place. `R1_TEMPLATE` is the paper's (§3.2) verbatim; the question block
//! (`{input}`) is our choice where the paper is silent:
//!
//! ```text
//! {question}
//! Answer with just one of the letters from the options below.
//! Options:
//! A. {option A}
//! B. {option B}
//! ...
//! ```
//!
//! One newline between the parts, `X. text` per option, no trailing newline. The prompt ends with
//! `Assistant:` (no space, nothing forced after it — the model may or may not open `<think>`).

use std::io::BufRead;
use std::path::Path;

use anyhow::{Context, Result};

use crate::task::McqaItem;

/// The paper's template; `{input}` is replaced by [`question_block`].
pub const R1_TEMPLATE: &str = "A conversation between User and Assistant. The user asks a question, and the assistant solves it. The assistant first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>.\nUser: {input}\nAssistant:";

/// The sentence between the question and its options (paper, Table 1).
pub const INSTRUCTION: &str = "Answer with just one of the letters from the options below.";

/// Which template.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum PromptStyle {
    /// The paper's reasoning template (think + answer tags).
    R1,
    /// Direct answer for the baselines and SFT: the question block, then `\nAnswer:`; the model
    /// replies ` X`.
    Direct,
}

/// The question, the instruction, and one `X. text` line per option.
pub fn question_block(item: &McqaItem) -> String {
    let mut s = String::with_capacity(item.question.len() + 64 * item.options.len());
    s.push_str(item.question.trim());
    s.push('\n');
    s.push_str(INSTRUCTION);
    s.push_str("\nOptions:");
    for (i, o) in item.options.iter().enumerate() {
        s.push('\n');
        s.push(McqaItem::letter(i));
        s.push_str(". ");
        s.push_str(o.trim());
    }
    s
}

/// The full prompt text for `item`.
pub fn render(item: &McqaItem, style: PromptStyle) -> String {
    match style {
        PromptStyle::R1 => R1_TEMPLATE.replace("{input}", &question_block(item)),
        PromptStyle::Direct => format!("{}\nAnswer:", question_block(item)),
    }
}

/// The direct template's target continuation: ` X` (then the end-of-text token).
pub fn direct_target(item: &McqaItem) -> String {
    format!(" {}", item.answer)
}

/// Reads a prompts file: each line a JSON string or an object with a string `prompt`.
pub fn read_file(path: &Path) -> Result<Vec<String>> {
    let f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("{}:{}: cannot read", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: invalid JSON", path.display(), i + 1))?;
        let p = match &v {
            serde_json::Value::String(s) => s.clone(),
            other => other
                .get("prompt")
                .and_then(|p| p.as_str())
                .map(str::to_string)
                .with_context(|| format!("{}:{}: no string key `prompt`", path.display(), i + 1))?,
        };
        out.push(p);
    }
    Ok(out)
}
