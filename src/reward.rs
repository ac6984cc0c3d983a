//! The reward: one path from (prompt style, reply, question) to a verdict — `train`, `eval` and
//! `score` all call [`score`] — and, beside it, where a reply of each style ends. A run may take
//! its rewards from an external program instead ([`RewardProgram`], `reward.program`): the
//! verifier's verdict still gives the format and accuracy metrics, the program gives the reward.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

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

/// DAPO's soft overlong punishment (Yu et al. 2025, eq. 13; verl's `DAPORewardManager`), added
/// to the reward of a reply of `len` tokens under a limit of `max_len`, a buffer `L_c` and a
/// factor `k`: `min(−(len − (max_len − L_c)) / L_c · k, 0)` — 0 up to `max_len − L_c` tokens, then
/// falling linearly to `−k` at the limit. 0 when `L_c` is 0 (off).
pub fn overlong_penalty(len: usize, max_len: usize, buffer: usize, factor: f64) -> f64 {
    if buffer == 0 {
        return 0.0;
    }
    let exceed = len as f64 - (max_len as f64 - buffer as f64);
    (-exceed / buffer as f64 * factor).min(0.0)
}

/// Where a reply of `style` ends (the stop string is kept in the reply; `<|endoftext|>` always
/// stops): after `</answer>` for `r1`, at the end of the first line for `direct`.
pub fn stop_strings(style: PromptStyle) -> Vec<String> {
    match style {
        PromptStyle::R1 => vec!["</answer>".into()],
        PromptStyle::Direct => vec!["\n".into()],
    }
}

/// One request to a reward program: a reply and what it answers (one JSON line on its stdin).
#[derive(Debug, Clone, Serialize)]
pub struct Request<'a> {
    /// Unique within the run: `step-S/prompt-P/sample-K`.
    pub id: String,
    pub prompt: &'a str,
    pub reply: &'a str,
    pub item_id: &'a str,
    pub question: &'a str,
    pub options: std::borrow::Cow<'a, [String]>,
    /// The gold letter.
    pub answer: String,
    pub category: Option<&'a str>,
}

impl<'a> Request<'a> {
    /// The request for `reply` to `item`, asked with the rendered `prompt`.
    pub fn new(id: String, prompt: &'a str, reply: &'a str, item: &'a McqaItem) -> Self {
        Request {
            id,
            prompt,
            reply,
            item_id: &item.id,
            question: &item.question,
            options: std::borrow::Cow::Borrowed(&item.options),
            answer: item.answer.to_string(),
            category: item.category.as_deref(),
        }
    }
}

/// A reward program's answer to one request (one JSON line on its stdout, in request order):
/// `{"reward": 0.5, "components": {"format": 1.0}}`; the components are optional and are logged
/// (their means per step) in `metrics.jsonl` as `reward_components`.
#[derive(Debug, Clone, Deserialize)]
pub struct Answer {
    pub reward: f64,
    #[serde(default)]
    pub components: BTreeMap<String, f64>,
}

/// Puts a reward program's answers into the verifiers' verdicts, in order: the answer's reward
/// replaces the verdict's (format, accuracy and stage stay the verifier's). Returns each named
/// component's mean over the answers. `train` and `eval --reward-program` both apply answers so.
pub fn apply_answers<'v>(
    answers: &[Answer],
    verdicts: impl IntoIterator<Item = &'v mut Verdict>,
) -> BTreeMap<String, f64> {
    let mut components = BTreeMap::new();
    for (v, a) in verdicts.into_iter().zip(answers) {
        v.reward = a.reward as f32;
        for (k, c) in &a.components {
            *components.entry(k.clone()).or_insert(0.0) += c / answers.len() as f64;
        }
    }
    components
}

/// An external reward program (`reward.program`): started once, fed one JSON [`Request`] per
/// line on stdin, answering one JSON [`Answer`] per line on stdout in the same order; its stderr
/// goes to ours. A program that dies, hangs past the timeout, or answers something that is not
/// such a line is an error naming the command and the answer.
pub struct RewardProgram {
    command: Vec<String>,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<std::io::Result<String>>,
    timeout: Duration,
    /// Answers read so far (the line number of the next one is this + 1).
    answered: usize,
}

impl RewardProgram {
    /// The program `command` started, or `None` when no command is given (the rewards are the
    /// verifier's): `reward.program` in training, `--reward-program` for `eval` and `score`.
    pub fn start_if_given(command: &[String], timeout: Duration) -> Result<Option<Self>> {
        match command.is_empty() {
            true => Ok(None),
            false => Self::start(command, timeout).map(Some),
        }
    }

    pub fn start(command: &[String], timeout: Duration) -> Result<Self> {
        let (program, args) = command.split_first().context("reward.program is empty")?;
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("reward.program `{}`: cannot start", command.join(" ")))?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let stdin = child.stdin.take();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            command: command.to_vec(),
            child,
            stdin,
            lines,
            timeout,
            answered: 0,
        })
    }

    /// The answers to `requests`, in order. The requests are written from a second thread, so a
    /// program that answers while it reads never blocks on a full pipe.
    pub fn score(&mut self, requests: &[Request]) -> Result<Vec<Answer>> {
        let name = self.command.join(" ");
        let mut payload = String::new();
        for r in requests {
            payload.push_str(&serde_json::to_string(r)?);
            payload.push('\n');
        }
        let mut stdin = self
            .stdin
            .take()
            .with_context(|| format!("reward program `{name}`: its input is closed"))?;
        let writer = std::thread::spawn(move || {
            let written = stdin
                .write_all(payload.as_bytes())
                .and_then(|_| stdin.flush());
            (stdin, written)
        });
        let mut answers = Vec::with_capacity(requests.len());
        let mut failure = None;
        for r in requests {
            let line = match self.lines.recv_timeout(self.timeout) {
                Ok(Ok(line)) => line,
                Ok(Err(e)) => {
                    failure = Some(format!("cannot read its answer to {}: {e}", r.id));
                    break;
                }
                Err(RecvTimeoutError::Timeout) => {
                    failure = Some(format!(
                        "no answer to {} within reward.timeout_s = {} s",
                        r.id,
                        self.timeout.as_secs_f64()
                    ));
                    break;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    failure = Some(format!(
                        "exited ({}) after {} answers, without answering {}",
                        self.exit_status(),
                        self.answered,
                        r.id
                    ));
                    break;
                }
            };
            self.answered += 1;
            match serde_json::from_str::<Answer>(&line) {
                Ok(a) if a.reward.is_finite() && a.components.values().all(|c| c.is_finite()) => {
                    answers.push(a)
                }
                Ok(_) => {
                    failure = Some(format!(
                        "answer line {} (to {}) holds a non-finite number: {line:?}",
                        self.answered, r.id
                    ));
                    break;
                }
                Err(e) => {
                    failure = Some(format!(
                        "answer line {} (to {}) is not {{\"reward\": number, \"components\": \
                         {{…}}}}: {e}: {line:?}",
                        self.answered, r.id
                    ));
                    break;
                }
            }
        }
        if let Some(f) = failure {
            let _ = self.child.kill();
            bail!("reward program `{name}`: {f}");
        }
        let (stdin, written) = writer
            .join()
            .map_err(|_| anyhow!("reward program `{name}`: the writer thread panicked"))?;
        written.with_context(|| format!("reward program `{name}`: cannot send requests"))?;
        self.stdin = Some(stdin);
        Ok(answers)
    }

    /// The program's exit status once it has ended (waits up to a second for it).
    fn exit_status(&mut self) -> String {
        for _ in 0..100 {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s.to_string();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        "output closed".into()
    }
}

impl Drop for RewardProgram {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
