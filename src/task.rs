//! Medical multiple-choice items and their loaders: MedQA-USMLE jsonl, MMLU-Pro jsonl or parquet,
//! and a plain generic jsonl. A malformed line is an error naming the file and line, unless
//! `skip_invalid` is set, in which case it is skipped and counted.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Option letters, in order; MMLU-Pro uses up to ten.
pub const LETTERS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// The text of the option appended by `--none-of-the-above` (the paper's MedQA variant has one).
pub const NONE_OF_THE_ABOVE: &str = "None of the above";

/// One multiple-choice question.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McqaItem {
    pub id: String,
    pub question: String,
    /// Option texts; option `i` has letter `LETTERS[i]`.
    pub options: Vec<String>,
    /// The gold letter, `A`…
    pub answer: char,
    /// MMLU-Pro category or MedQA `meta_info` (e.g. `step1`).
    pub category: Option<String>,
    pub source: Option<String>,
}

impl McqaItem {
    pub fn num_options(&self) -> usize {
        self.options.len()
    }

    pub fn gold_index(&self) -> usize {
        (self.answer as u8 - b'A') as usize
    }

    pub fn gold_text(&self) -> &str {
        &self.options[self.gold_index()]
    }

    /// Letter of option `i`.
    pub fn letter(i: usize) -> char {
        LETTERS[i] as char
    }
}

/// Input layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataFormat {
    /// Decide from the file: `.parquet` is MMLU-Pro; jsonl by its first line's keys.
    Auto,
    /// `question, answer, options{A..}, meta_info, answer_idx`.
    Medqa,
    /// `question_id, question, options[], answer, answer_index, category, src`.
    MmluPro,
    /// `question, options[], answer` (a letter or a 0-based index), optional `id`, `category`.
    Generic,
}

impl DataFormat {
    /// The name used in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            DataFormat::Auto => "auto",
            DataFormat::Medqa => "medqa",
            DataFormat::MmluPro => "mmlu-pro",
            DataFormat::Generic => "generic",
        }
    }
}

/// How to load.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Keep only rows whose category equals this (MMLU-Pro `category`, MedQA `meta_info`).
    pub category: Option<String>,
    /// Append a "None of the above" option to every item.
    pub none_of_the_above: bool,
    /// Skip malformed rows (counted) instead of failing.
    pub skip_invalid: bool,
}

/// What a load produced.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub path: PathBuf,
    pub items: Vec<McqaItem>,
    /// `(line, reason)` of every skipped malformed row.
    pub skipped: Vec<(usize, String)>,
}

/// Loads a dataset file in `format`.
pub fn load(path: &Path, format: DataFormat, opts: &LoadOptions) -> Result<Dataset> {
    let is_parquet = path.extension().is_some_and(|e| e == "parquet");
    let how = match format {
        DataFormat::Auto => "detected from the file",
        _ => "as configured: data.format / --format",
    };
    let format = match format {
        DataFormat::Auto if is_parquet => DataFormat::MmluPro,
        DataFormat::Auto => detect_jsonl(path)?,
        f => f,
    };
    let rows: Vec<(usize, Result<Value, String>)> = if is_parquet {
        if format != DataFormat::MmluPro {
            bail!(
                "{}: parquet input is only supported for --format mmlu-pro",
                path.display()
            );
        }
        crate::parquet_rows::read(path)?
            .into_iter()
            .enumerate()
            .map(|(i, v)| (i + 1, Ok(v)))
            .collect()
    } else {
        read_jsonl(path)?
    };
    let mut items = Vec::new();
    let mut skipped = Vec::new();
    for (line, row) in rows {
        let parsed = row.and_then(|v| parse_row(&v, format, line));
        match parsed {
            Ok(mut item) => {
                if let Some(c) = &opts.category {
                    if item.category.as_deref() != Some(c.as_str()) {
                        continue;
                    }
                }
                if opts.none_of_the_above {
                    if item.options.len() >= LETTERS.len() {
                        return Err(anyhow!(
                            "{}:{line}: too many options to add one",
                            path.display()
                        ));
                    }
                    item.options.push(NONE_OF_THE_ABOVE.to_string());
                }
                items.push(item);
            }
            Err(reason) if opts.skip_invalid => skipped.push((line, reason)),
            Err(reason) => bail!(
                "{}:{line}: {reason} (read as format \"{}\", {how})",
                path.display(),
                format.name()
            ),
        }
    }
    Ok(Dataset {
        path: path.to_path_buf(),
        items,
        skipped,
    })
}

fn read_jsonl(path: &Path) -> Result<Vec<(usize, Result<Value, String>)>> {
    let f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("{}:{}: cannot read", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        rows.push((
            i + 1,
            serde_json::from_str(&line).map_err(|e| format!("invalid JSON: {e}")),
        ));
    }
    Ok(rows)
}

fn detect_jsonl(path: &Path) -> Result<DataFormat> {
    let rows = read_jsonl(path)?;
    let first = rows
        .iter()
        .find_map(|(_, r)| r.as_ref().ok())
        .ok_or_else(|| {
            anyhow!(
                "{}: no valid JSON line to detect the format from",
                path.display()
            )
        })?;
    Ok(if first.get("answer_idx").is_some() {
        DataFormat::Medqa
    } else if first.get("question_id").is_some() || first.get("answer_index").is_some() {
        DataFormat::MmluPro
    } else {
        DataFormat::Generic
    })
}

fn str_field<'a>(v: &'a Value, key: &str) -> Result<&'a str, String> {
    v.get(key)
        .ok_or_else(|| format!("missing key `{key}`"))?
        .as_str()
        .ok_or_else(|| format!("key `{key}` is not a string"))
}

fn option_list(v: &Value) -> Result<Vec<String>, String> {
    let arr = v
        .get("options")
        .ok_or("missing key `options`")?
        .as_array()
        .ok_or("key `options` is not a list")?;
    if arr.is_empty() {
        return Err("no options".into());
    }
    arr.iter()
        .map(|o| {
            o.as_str()
                .map(str::to_string)
                .ok_or_else(|| "an option is not a string".to_string())
        })
        .collect()
}

/// An optional string field.
fn opt_str(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_string)
}

/// An id given as a string or a number, or `fallback()` when absent.
fn id_field(v: &Value, key: &str, fallback: impl FnOnce() -> String) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => fallback(),
        Some(other) => other.to_string(),
    }
}

fn letter_of(s: &str, n: usize) -> Result<char, String> {
    let t = s.trim();
    let mut chars = t.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) if c.is_ascii_uppercase() && ((c as u8 - b'A') as usize) < n => Ok(c),
        _ => Err(format!(
            "gold answer `{s}` is not one of the option letters A..{}",
            McqaItem::letter(n.saturating_sub(1))
        )),
    }
}

fn parse_row(v: &Value, format: DataFormat, line: usize) -> Result<McqaItem, String> {
    if !v.is_object() {
        return Err("line is not a JSON object".into());
    }
    let question = str_field(v, "question")?.to_string();
    let (id, options, answer, category, source) = match format {
        DataFormat::Medqa => {
            let map = v
                .get("options")
                .ok_or("missing key `options`")?
                .as_object()
                .ok_or("key `options` is not an object of letter → text")?;
            if map.is_empty() {
                return Err("no options".into());
            }
            let mut options = Vec::with_capacity(map.len());
            for &l in LETTERS.iter().take(map.len()) {
                let key = (l as char).to_string();
                let text = map
                    .get(&key)
                    .ok_or_else(|| format!("options are not the consecutive letters A.. (no `{key}` among {} options)", map.len()))?
                    .as_str()
                    .ok_or_else(|| format!("option `{key}` is not a string"))?;
                options.push(text.to_string());
            }
            let gold = str_field(v, "answer_idx")?;
            let answer = letter_of(gold, options.len())?;
            if let Some(text) = v.get("answer").and_then(Value::as_str) {
                if options[(answer as u8 - b'A') as usize].trim() != text.trim() {
                    return Err(format!("`answer` text disagrees with options[{answer}]"));
                }
            }
            (
                format!("medqa-{line}"),
                options,
                answer,
                opt_str(v, "meta_info"),
                None,
            )
        }
        DataFormat::MmluPro => {
            let options = option_list(v)?;
            let answer = letter_of(str_field(v, "answer")?, options.len())?;
            if let Some(idx) = v.get("answer_index").and_then(Value::as_u64) {
                if idx as usize != (answer as u8 - b'A') as usize {
                    return Err(format!("answer_index {idx} disagrees with answer {answer}"));
                }
            }
            let id = id_field(v, "question_id", || format!("mmlu-pro-{line}"));
            (
                id,
                options,
                answer,
                opt_str(v, "category"),
                opt_str(v, "src"),
            )
        }
        DataFormat::Generic | DataFormat::Auto => {
            let options = option_list(v)?;
            let answer = match v.get("answer") {
                Some(Value::String(s)) => letter_of(s, options.len())?,
                Some(Value::Number(n)) => {
                    let i = n
                        .as_u64()
                        .ok_or("answer index is not a non-negative integer")?
                        as usize;
                    if i >= options.len() {
                        return Err(format!(
                            "answer index {i} is out of range for {} options",
                            options.len()
                        ));
                    }
                    McqaItem::letter(i)
                }
                _ => return Err("missing key `answer` (a letter or a 0-based index)".into()),
            };
            let id = id_field(v, "id", || format!("item-{line}"));
            (id, options, answer, opt_str(v, "category"), None)
        }
    };
    if options.len() > LETTERS.len() {
        return Err(format!(
            "{} options (at most {})",
            options.len(),
            LETTERS.len()
        ));
    }
    Ok(McqaItem {
        id,
        question,
        options,
        answer,
        category,
        source,
    })
}
