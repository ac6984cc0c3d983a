//! `med-rlvr score`: replies scored by the reward path (the verifier, or a reward program).

use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::json;

use med_rlvr::tokenizer::Tokenizer;

use crate::app::cli::ScoreArgs;

pub(crate) fn run(a: ScoreArgs) -> Result<()> {
    use med_rlvr::verifier::{self, Summary, VerifierConfig};
    let cfg = VerifierConfig {
        strict: a.strict,
        answer_leak_penalty: a.answer_leak_penalty,
        preamble_penalty: a.preamble_penalty,
        ..Default::default()
    };
    let tok = a
        .tokenizer
        .as_deref()
        .map(Tokenizer::from_dir)
        .transpose()?;
    let path = &a.input;
    let f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    if let Some(o) = &a.out {
        med_rlvr::paths::refuse_overlap("--out", o, &[("--input", path)])?;
    }
    let out_name = a
        .out
        .as_ref()
        .map_or("stdout".to_string(), |p| p.display().to_string());
    let mut out: Box<dyn Write> = match &a.out {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("{}: cannot create", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout())),
    };
    let mut program = a.reward.start()?;
    // Every line is read and scored before any is written, so a reward program answers them
    // in one batch.
    let mut lines: Vec<(usize, serde_json::Value)> = Vec::new();
    let mut verdicts = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let at = || format!("{}:{}", path.display(), i + 1);
        let line = line.with_context(|| format!("{}: cannot read", at()))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("{}: invalid JSON", at()))?;
        let response = v
            .get("response")
            .and_then(|x| x.as_str())
            .with_context(|| format!("{}: no string key `response`", at()))?;
        let gold = v
            .get("answer")
            .and_then(|x| x.as_str())
            .with_context(|| format!("{}: no string key `answer`", at()))?;
        let gold = match gold.trim().chars().collect::<Vec<_>>()[..] {
            [c] if c.is_ascii_alphabetic() => c.to_ascii_uppercase(),
            _ => bail!("{}: `answer` must be one letter, got {gold:?}", at()),
        };
        let n = match v.get("num_options") {
            None | Some(serde_json::Value::Null) => 10,
            Some(x) => x
                .as_u64()
                .filter(|&n| (1..=26).contains(&n))
                .with_context(|| format!("{}: `num_options` must be 1..=26", at()))?
                as usize,
        };
        if (gold as u8 - b'A') as usize >= n {
            bail!(
                "{}: `answer` {gold} is not among the {n} options (A–{})",
                at(),
                (b'A' + n as u8 - 1) as char
            );
        }
        let gold = med_rlvr::reward::Gold {
            letter: gold,
            num_options: n,
            text: v.get("gold_text").and_then(|x| x.as_str()),
        };
        let mut verdict = med_rlvr::reward::score(a.prompt, response, &gold, &cfg);
        if let (Some(t), Some(think)) = (&tok, verifier::think_text(response)) {
            verdict.diagnostics.think_tokens = Some(t.encode(think)?.len());
        }
        verdicts.push(verdict);
        lines.push((i + 1, v));
    }
    if verdicts.is_empty() {
        bail!(
            "{}: no replies to score (the file has no non-empty line)",
            path.display()
        );
    }
    if let Some(program) = program.as_mut() {
        let requests = score_requests(&lines, path)?;
        let answers = program.score(&requests)?;
        med_rlvr::reward::apply_answers(&answers, verdicts.iter_mut());
    }
    for ((_, v), verdict) in lines.iter_mut().zip(&verdicts) {
        let obj = v.as_object_mut().expect("checked object");
        obj.insert("reward".into(), json!(verdict.reward));
        obj.insert("format_ok".into(), json!(verdict.format_ok));
        obj.insert(
            "extracted".into(),
            json!(verdict.extracted.map(String::from)),
        );
        obj.insert("correct".into(), json!(verdict.correct));
        obj.insert("stage".into(), json!(verdict.stage));
        if let serde_json::Value::Object(d) = serde_json::to_value(&verdict.diagnostics)? {
            obj.extend(d);
        }
        writeln!(out, "{v}").with_context(|| format!("{out_name}: cannot write"))?;
    }
    out.flush()
        .with_context(|| format!("{out_name}: cannot write"))?;
    let s = Summary::from_verdicts(&verdicts);
    eprintln!(
        "scored {}: mean reward {:.4}, format rate {:.4}, accuracy {:.4}",
        s.count, s.reward_mean, s.format_rate, s.accuracy
    );
    eprintln!("stages: {}", serde_json::to_string(&s.stages)?);
    Ok(())
}

/// A reward program's requests for `score`'s lines (line number, JSON): `id`, `prompt`,
/// `question`, `options` and `category` from the line's keys when present.
fn score_requests<'a>(
    lines: &'a [(usize, serde_json::Value)],
    path: &Path,
) -> Result<Vec<med_rlvr::reward::Request<'a>>> {
    let mut options: Vec<Vec<String>> = Vec::with_capacity(lines.len());
    for (n, v) in lines {
        options.push(match v.get("options") {
            None | Some(serde_json::Value::Null) => vec![],
            Some(o) => serde_json::from_value(o.clone()).with_context(|| {
                format!(
                    "{}:{n}: `options` must be a list of strings",
                    path.display()
                )
            })?,
        });
    }
    let text = |v: &'a serde_json::Value, key: &str| v.get(key).and_then(|x| x.as_str());
    Ok(lines
        .iter()
        .zip(options)
        .map(|((n, v), options)| med_rlvr::reward::Request {
            id: text(v, "id").map_or_else(|| format!("line-{n}"), String::from),
            prompt: text(v, "prompt").unwrap_or(""),
            reply: text(v, "response").unwrap_or(""),
            item_id: text(v, "id").unwrap_or(""),
            question: text(v, "question").unwrap_or(""),
            options: std::borrow::Cow::Owned(options),
            answer: text(v, "answer").unwrap_or("").trim().to_uppercase(),
            category: text(v, "category"),
        })
        .collect())
}
