//! `reward.program` through the binary: the rewards the program returns are what `metrics.jsonl`
//! logs (with its components), and what `eval --reward-program` reports; a program that dies, hangs or answers garbage stops the run with
//! exit status 1, a one-line error naming the command and the request, and a checkpoint from
//! which the run resumes. Needs `python3` (installed by `.ci/run`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_med-rlvr")
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/reward.py")
}

/// `reward.program = [...]` as a `--set` override.
fn program(args: &[&str]) -> String {
    let items: Vec<String> = args
        .iter()
        .map(|a| serde_json::to_string(a).unwrap())
        .collect();
    format!("reward.program=[{}]", items.join(", "))
}

fn train(out: &Path, steps: usize, extra: &[String]) -> Output {
    let mut c = Command::new(bin());
    c.args(["train", "--quiet", "--out"]).arg(out);
    for s in [
        format!("train.steps={steps}"),
        "train.eval_every=0".into(),
        "train.save_every=1".into(),
        "rollout.prompts_per_step=6".into(),
        "rollout.max_new_tokens=16".into(),
        "ppo.train_batch=6".into(),
    ]
    .iter()
    .chain(extra)
    {
        c.args(["--set", s]);
    }
    c.output().unwrap()
}

fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn the_program_s_rewards_are_what_metrics_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("answers.jsonl");
    let run = dir.path().join("run");
    let o = train(
        &run,
        2,
        &[program(&[
            "python3",
            example().to_str().unwrap(),
            "--log",
            log.to_str().unwrap(),
        ])],
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    // The program's answers, grouped by step (ids are step-S/prompt-P/sample-K).
    let mut by_step: BTreeMap<u64, Vec<serde_json::Value>> = BTreeMap::new();
    for a in jsonl(&log) {
        let id = a["id"].as_str().unwrap().to_string();
        let step: u64 = id["step-".len()..id.find('/').unwrap()].parse().unwrap();
        by_step.entry(step).or_default().push(a);
    }
    let metrics = jsonl(&run.join("metrics.jsonl"));
    assert_eq!(metrics.len(), 2);
    assert_eq!(by_step.len(), 2);
    for m in &metrics {
        let step = m["step"].as_u64().unwrap();
        let answers = &by_step[&step];
        assert_eq!(answers.len(), 6, "step {step}: one answer per sample");
        let mean = |f: &dyn Fn(&serde_json::Value) -> f64| {
            answers.iter().map(f).sum::<f64>() / answers.len() as f64
        };
        let reward = mean(&|a| a["reward"].as_f64().unwrap());
        let logged = m["reward_mean"].as_f64().unwrap();
        assert!(
            (logged - reward).abs() < 1e-6,
            "step {step}: metrics {logged}, program {reward}"
        );
        for c in ["correct", "formatted", "length_penalty"] {
            let want = mean(&|a| a["components"][c].as_f64().unwrap());
            let got = m["reward_components"][c].as_f64().unwrap();
            assert!(
                (got - want).abs() < 1e-9,
                "step {step} {c}: {got} vs {want}"
            );
        }
    }
}

/// Runs `train` with the program in `script` (a Python file written here) and checks the
/// one-line error naming the command and `says`, exit status 1, and the checkpoint it left.
fn fails_with(script: &str, extra: &[String], says: &str, checkpoint_step: usize) -> PathBuf {
    let dir = tempfile::tempdir().unwrap().keep();
    let file = dir.join("program.py");
    std::fs::write(&file, script).unwrap();
    let run = dir.join("run");
    let mut set = vec![program(&["python3", file.to_str().unwrap()])];
    set.extend_from_slice(extra);
    let o = train(&run, 2, &set);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    let e = errors[0];
    assert!(e.contains(&format!("`python3 {}`", file.display())), "{e}");
    assert!(e.contains(says), "{e}");
    assert!(
        e.contains("stopped before step") && e.contains("--resume"),
        "{e}"
    );
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            run.join(format!("checkpoints/step-{checkpoint_step:06}/state.json")),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(state["step"].as_u64(), Some(checkpoint_step as u64));
    run
}

#[test]
fn a_program_that_dies_stops_the_run_with_a_checkpoint_and_the_run_resumes() {
    // Answers the six requests of step 0, then exits with status 3.
    let dies = "import json, sys\nfor i, line in enumerate(sys.stdin):\n    if i == 6:\n        sys.exit(3)\n    print(json.dumps({'reward': 0.5}), flush=True)\n";
    let run = fails_with(
        dies,
        &[],
        "exited (exit status: 3) after 6 answers, without answering step-1/prompt-0/sample-0",
        1,
    );
    let steps = |run: &Path| -> Vec<u64> {
        jsonl(&run.join("metrics.jsonl"))
            .iter()
            .map(|m| m["step"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(steps(&run), [0]);
    // With a working program (a changed setting, so --force) the run finishes from there.
    let o = Command::new(bin())
        .args(["train", "--quiet", "--force", "--resume"])
        .arg(&run)
        .args(["--set", &program(&["python3", example().to_str().unwrap()])])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(steps(&run), [0, 1]);
}

#[test]
fn a_program_that_hangs_or_answers_garbage_is_named() {
    let hangs = "import sys, time\nfor line in sys.stdin:\n    time.sleep(60)\n";
    fails_with(
        hangs,
        &["reward.timeout_s=1.0".into()],
        "no answer to step-0/prompt-0/sample-0 within reward.timeout_s = 1 s",
        0,
    );
    let garbage = "import sys\nfor line in sys.stdin:\n    print('ok', flush=True)\n";
    fails_with(
        garbage,
        &[],
        "answer line 1 (to step-0/prompt-0/sample-0) is not {\"reward\": number",
        0,
    );
}

/// `eval --reward-program`: each generation's reward is the program's answer to it (request ids
/// `eval/DATASET/ITEM/sample-K`), and the summary's mean reward is theirs; accuracy stays the
/// verifier's.
#[test]
fn eval_takes_its_rewards_from_the_program() {
    let dir = tempfile::tempdir().unwrap();
    let (log, out) = (dir.path().join("answers.jsonl"), dir.path().join("eval"));
    let mut eval = Command::new(bin());
    eval.args(["eval", "--limit", "6", "--n", "2", "--temperature", "1.0"])
        .args(["--max-new-tokens", "24", "--out"])
        .arg(&out);
    with_example_program(eval, &log);
    let answers: BTreeMap<String, f64> = jsonl(&log)
        .iter()
        .map(|a| {
            (
                a["id"].as_str().unwrap().into(),
                a["reward"].as_f64().unwrap(),
            )
        })
        .collect();
    let gens = jsonl(&out.join("generations.jsonl"));
    assert_eq!((gens.len(), answers.len()), (12, 12));
    for g in &gens {
        let id = format!(
            "eval/{}/{}/sample-{}",
            g["dataset"].as_str().unwrap(),
            g["id"].as_str().unwrap(),
            g["sample_index"]
        );
        let want = answers[&id];
        let got = g["verdict"]["reward"].as_f64().unwrap();
        assert!(
            (got - want).abs() < 1e-6,
            "{id}: reward {got}, program {want}"
        );
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let mean = answers.values().sum::<f64>() / 12.0;
    let logged = summary["datasets"][0]["overall"]["reward_mean"]
        .as_f64()
        .unwrap();
    assert!(
        (logged - mean).abs() < 1e-6,
        "summary {logged}, program {mean}"
    );
}

/// Runs `command --reward-program python3 examples/reward.py --log LOG`, which must succeed.
fn with_example_program(mut command: Command, log: &Path) {
    let o = command
        .args(["--reward-program", "python3"])
        .arg(example())
        .arg("--log")
        .arg(log)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `score --reward-program`: each line's reward is the program's answer to it (ids, prompts,
/// questions and options from the line, `line-N` without an id); format and accuracy stay the
/// verifier's.
#[test]
fn score_takes_its_rewards_from_the_program() {
    let dir = tempfile::tempdir().unwrap();
    let (input, log, out) = (
        dir.path().join("replies.jsonl"),
        dir.path().join("answers.jsonl"),
        dir.path().join("scored.jsonl"),
    );
    let long = "word ".repeat(80);
    let lines = [
        serde_json::json!({"id": "q1", "response": "<think>x</think><answer>B</answer>", "answer": "B", "num_options": 4, "question": "Q?", "options": ["a", "b", "c", "d"], "prompt": "P"}),
        serde_json::json!({"response": format!("<think>{long}</think><answer>C</answer>"), "answer": "B", "num_options": 4}),
        serde_json::json!({"response": "B", "answer": "B"}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&input, text).unwrap();
    let mut score = Command::new(bin());
    score
        .args(["score", "--input"])
        .arg(&input)
        .arg("--out")
        .arg(&out);
    with_example_program(score, &log);
    let answers = jsonl(&log);
    let ids: Vec<&str> = answers.iter().map(|a| a["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["q1", "line-2", "line-3"]);
    let scored = jsonl(&out);
    assert_eq!(scored.len(), 3);
    // The example: +1 right, 0 wrong, −1 unformatted, minus 0.001 per word beyond 50.
    let want = [1.0, -0.001 * (81.0 - 50.0), -1.0];
    for ((s, a), w) in scored.iter().zip(&answers).zip(want) {
        let (got, program) = (s["reward"].as_f64().unwrap(), a["reward"].as_f64().unwrap());
        assert!(
            (got - program).abs() < 1e-6 && (got - w).abs() < 1e-6,
            "{s}: {got} vs {program}, {w}"
        );
    }
    // Format and accuracy are still the verifier's.
    let flags: Vec<(bool, bool)> = (scored.iter())
        .map(|s| {
            (
                s["format_ok"].as_bool().unwrap(),
                s["correct"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(flags, [(true, true), (true, false), (false, false)]);
}
