//! Bad input against the real binary, one table: every case must exit with its status (2: the
//! input was refused; 1: the run failed; 0: accepted), print no panic, name the key, flag or file
//! in its message, and leave every file it was given unchanged (hashes before and after). The
//! table with the first line of each message is written to `$CARGO_TARGET_TMPDIR/bad_input.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

struct Case {
    /// What a user types, with `{w}` the scratch folder and `{repo}` the checkout.
    args: &'static [&'static str],
    /// What it did before this table existed (issue 25), for the table.
    before: &'static str,
    status: i32,
    /// Substrings the message must contain.
    says: &'static [&'static str],
    /// Send stdout to `/dev/full` (a disk with no space left).
    full_stdout: bool,
}

const fn case(
    args: &'static [&'static str],
    before: &'static str,
    status: i32,
    says: &'static [&'static str],
) -> Case {
    Case {
        args,
        before,
        status,
        says,
        full_stdout: false,
    }
}

const TINY_TRAIN: &[&str] = &[
    "--quiet",
    "--set",
    "train.steps=1",
    "--set",
    "rollout.prompts_per_step=4",
    "--set",
    "rollout.max_new_tokens=8",
    "--set",
    "ppo.train_batch=4",
    "--set",
    "train.eval_every=0",
];

#[rustfmt::skip]
const CASES: &[Case] = &[
    // 1. Commands never write into their own inputs.
    case(&["export", "--checkpoint", "{w}/model", "--out", "{w}/model"], "tokenizer.json truncated to 0 bytes, exit 0", 2, &["--out", "overlaps"]),
    case(&["export", "--checkpoint", "{w}/model", "--out", "{w}/model", "--dtype", "bf16"], "f32 weights overwritten by bf16, exit 0", 2, &["overlaps"]),
    case(&["export", "--checkpoint", "{w}/run", "--out", "{w}/run/checkpoints"], "(new)", 2, &["overlaps"]),
    case(&["score", "--input", "{w}/replies.jsonl", "--out", "{w}/replies.jsonl"], "(new) input truncated before it was read", 2, &["--out", "overlaps"]),
    case(&["eval", "--data", "{w}/gens/generations.jsonl", "--out", "{w}/gens", "--limit", "1"], "(new) the data file truncated", 2, &["overlaps"]),
    case(&["sft", "--model", "{w}/run/final", "--data", "{w}/data/train.jsonl", "--out", "{w}/run", "--epochs", "1"], "(new) the base model overwritten", 2, &["overlaps"]),
    // 2. A run's history is never overwritten or mixed.
    case(&["train", "--out", "{w}/oldrun"], "metrics, samples, config and final/ rewritten; old checkpoints kept and mixed on resume", 2, &["--out", "already exists", "--overwrite"]),
    case(&["train", "--out", "{w}/notes", "--overwrite"], "(new)", 2, &["not a run folder", "notes.txt"]),
    case(&["train", "--out", "{w}/oldrun", "--overwrite", "--resume", "latest"], "(new)", 2, &["--overwrite", "--resume"]),
    case(&["train", "--resume", "{w}/run", "--out", "{w}/oldrun"], "(new)", 2, &["another run"]),
    // 3. A typo never changes the reward.
    case(&["train", "--config", "{w}/typo.toml"], "`stric = true` ignored, training ran", 2, &["typo.toml", "stric"]),
    case(&["train", "--set", "verifier.stric=true"], "(new)", 2, &["--set verifier.stric=true", "stric"]),
    // 4. NaN is never a result.
    case(&["generate", "--model", "{w}/nanmodel", "--prompt", "Q: what?"], "printed `!!!!` with null log-probs, exit 0", 2, &["non-finite", "nanmodel"]),
    case(&["logprobs", "--model", "{w}/nanmodel", "--prompt", "Q", "--continuation", "A"], "(new) null log-probs", 2, &["non-finite"]),
    case(&["eval", "--model", "{w}/nanmodel", "--data", "{w}/data/test.jsonl", "--limit", "2", "--out", "{w}/ev-nan"], "accuracy 0.00 ± 0.00, exit 0", 2, &["non-finite", "question"]),
    case(&["sft", "--model", "{w}/nanmodel", "--data", "{w}/data/train.jsonl", "--epochs", "1", "--out", "{w}/sft-nan"], "all-NaN model written, \"final loss NaN\", exit 0", 2, &["loss is NaN", "nothing was saved"]),
    case(&["generate", "--prompt", "Q", "--temperature", "nan"], "sampled garbage", 2, &["--temperature", "not a finite number"]),
    case(&["sft", "--lr", "nan", "--out", "{w}/sft-lr"], "all-NaN model, exit 0", 2, &["--lr", "not a finite number"]),
    // 5. An empty set is never 0 %.
    case(&["eval", "--data", "{w}/data/test.jsonl", "--category", "nope", "--out", "{w}/ev"], "accuracy 0.00, exit 0", 2, &["no questions", "nope", "synthetic"]),
    case(&["eval", "--limit", "0", "--out", "{w}/ev"], "accuracy 0.00, exit 0", 2, &["--limit", "at least 1"]),
    case(&["eval", "--resamples", "0", "--out", "{w}/ev"], "± 0.00, exit 0", 2, &["--resamples", "at least 1"]),
    case(&["score", "--input", "{w}/empty.jsonl"], "scored 0: accuracy 0.0000, exit 0", 2, &["empty.jsonl", "no replies"]),
    case(&["train", "--data", "{w}/data/test.jsonl", "--set", "data.category=\"nope\""], "(new)", 2, &["test.jsonl", "nope"]),
    // 6. The memory plan cannot overflow.
    case(&["plan", "--set", "rollout.prompts_per_step=2305843009213693952", "--limit-gb", "80"], "0.000 GiB KV cache, passed --limit-gb 80; train panicked \"capacity overflow\"", 2, &["rollout.prompts_per_step", "1048576"]),
    case(&["plan", "--set", "rollout.prompts_per_step=1048576", "--set", "rollout.n=1024", "--set", "rollout.max_new_tokens=1000", "--set", "ppo.train_batch=1", "--limit-gb", "80"], "(new) products past 2^64 wrapped", 1, &["the plan needs", "80.00 GiB"]),
    case(&["plan", "--model", "{w}/huge.json"], "peak below its own persistent memory", 2, &["huge.json", "hidden_size"]),
    // 7. The advertised recovery works: β cannot become NaN.
    case(&["train", "--set", "ppo.kl_horizon=0", "--set", "ppo.kl_target=0.1"], "kl_coef NaN; state.json `null`; resume failed to parse", 2, &["ppo.kl_horizon = 0", "--set ppo.kl_horizon=0"]),
    // 8. Nonsense is refused, naming the key, the value and the range.
    case(&["train", "--set", "rollout.temperature=-1"], "ran greedy", 2, &["rollout.temperature = -1", ">= 0"]),
    case(&["train", "--set", "rollout.max_new_tokens=0"], "accepted", 2, &["rollout.max_new_tokens = 0"]),
    case(&["train", "--set", "optim.actor_lr=-0.001"], "accepted", 2, &["optim.actor_lr"]),
    case(&["train", "--set", "ppo.eps_low=5"], "accepted", 2, &["ppo.eps_low = 5", "[0, 1)"]),
    case(&["train", "--set", "ppo.gamma=2"], "accepted", 2, &["ppo.gamma = 2"]),
    case(&["train", "--set", "optim.beta1=1.5"], "accepted", 2, &["optim.beta1 = 1.5"]),
    case(&["train", "--set", "optim.eps=0"], "value loss NaN", 2, &["optim.eps = 0"]),
    case(&["train", "--set", "ppo.value_clip=-0.2"], "accepted", 2, &["ppo.value_clip"]),
    case(&["train", "--set", "ppo.value_clip=of"], "(new: off)", 2, &["--set ppo.value_clip=of", "expected a number or \"off\", found \"of\""]),
    case(&["train", "--set", "optim.grad_clip=-1"], "accepted", 2, &["optim.grad_clip"]),
    case(&["train", "--set", "optim.warmup_ratio=5"], "accepted", 2, &["optim.warmup_ratio = 5"]),
    case(&["train", "--set", "ppo.train_batch=1000"], "accepted", 2, &["ppo.train_batch = 1000", "rollout.prompts_per_step"]),
    case(&["train", "--set", "train.keep_checkpoints=0"], "accepted", 2, &["train.keep_checkpoints = 0"]),
    case(&["train", "--set", "model.logprob_chunk=0"], "accepted", 2, &["model.logprob_chunk = 0"]),
    case(&["train", "--set", "lora.rank=4096", "--out", "{w}/lora-run"], "accepted", 2, &["lora.rank = 4096", "hidden_size 128"]),
    case(&["train", "--set", "rollout.n=-1"], "error blamed the preset", 2, &["--set rollout.n=-1"]),
    case(&["train", "--set", "ppo.estimator=\"ppo\""], "(new: the estimator table)", 2, &["--set ppo.estimator", "unknown estimator \"ppo\"", "gae, grpo, dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline"]),
    case(&["generate", "--prompt", "Q", "--n", "0"], "gave 1 sample", 2, &["--n", "at least 1"]),
    case(&["generate", "--prompt", "Q", "--temperature", "-1"], "(new)", 2, &["--temperature", ">= 0"]),
    case(&["generate", "--prompt", "Q", "--stop-token", "99999"], "accepted", 2, &["--stop-token 99999", "vocab_size"]),
    case(&["sft", "--epochs", "0", "--out", "{w}/sft0"], "accepted", 2, &["--epochs", "at least 1"]),
    case(&["sft", "--lr", "1e-5", "--lr", "1e-5", "--out", "{w}/sft-dup"], "second run overwrote the first", 2, &["given twice"]),
    case(&["score", "--input", "{w}/gold-out-of-range.jsonl"], "accepted", 2, &["gold-out-of-range.jsonl:1", "not among the 4 options"]),
    case(&["eval", "--data", "{w}/dup-ids.jsonl", "--out", "{w}/ev-dup"], "accepted", 2, &["dup-ids.jsonl", "\"q1\"", "more than once"]),
    case(&["bench", "--config", "{w}/model/config.json", "--batch", "0"], "panicked", 2, &["--batch", "at least 1"]),
    case(&["bench", "--config", "{w}/model/config.json", "--prompt-len", "0"], "panicked", 2, &["--prompt-len", "at least 1"]),
    case(&["bench", "--config", "{w}/model/config.json", "--layers", "9"], "(new)", 2, &["--layers 9", "2 decoder layers"]),
    // 9. No panics: geometry, context length, stdout on a full disk.
    case(&["generate", "--model", "{w}/smallvocab", "--prompt", "Q"], "index out of bounds in the backend", 2, &["vocab_size 100", "tokenizer.json"]),
    case(&["generate", "--prompt", "Q", "--max-new-tokens", "5000"], "allocation of 100 TB, abort", 2, &["max_position_embeddings is 1024"]),
    case(&["logprobs", "--prompt", "Q", "--continuation", "{long}"], "processed silently", 2, &["max_position_embeddings is 1024"]),
    case(&["train", "--set", "rollout.max_new_tokens=2000"], "processed silently", 2, &["rollout.max_new_tokens 2000", "max_position_embeddings"]),
    Case { full_stdout: true, ..case(&["plan"], "panicked: failed printing to stdout", 2, &["cannot write to stdout"]) },
    Case { full_stdout: true, ..case(&["logprobs", "--prompt", "Q", "--continuation", "A"], "panicked: failed printing to stdout", 2, &["cannot write to stdout"]) },
    Case { full_stdout: true, ..case(&["bench", "--verifier", "10"], "panicked: failed printing to stdout", 2, &["cannot write to stdout"]) },
    case(&["score", "--input", "{w}/replies.jsonl", "--out", "/dev/full"], "(new)", 2, &["/dev/full", "cannot write"]),
    // 10. Clear messages.
    case(&["train", "--config", "{w}/empty.toml"], "\"tokenizer.json not found\"", 2, &["model.path is not set"]),
    case(&["train", "--data", "{w}/medqa.jsonl", "--out", "{w}/medqa-run", "--quiet", "--set", "train.steps=1", "--set", "rollout.prompts_per_step=4", "--set", "rollout.max_new_tokens=8", "--set", "ppo.train_batch=4", "--set", "train.eval_every=0"], "failed on `options`: the preset forces format generic", 0, &["data.format = \"auto\""]),
    case(&["train", "--data", "{w}/medqa.jsonl", "--set", "data.format=\"generic\""], "(new)", 2, &["medqa.jsonl:1", "format \"generic\"", "data.format"]),
    case(&["plan", "--config", "{repo}/assets/presets/demo.toml"], "paths resolved against assets/presets", 0, &["longest prompt in"]),
    case(&["train", "--resume", "{w}/run-truncated"], "Burn's text about record formats of version 0.14", 2, &["actor.mpk", "optimizer state unreadable"]),
    case(&["train", "--resume", "latest", "--out", "{w}/no-config-run"], "took a checkpoint without config.toml", 2, &["no complete checkpoint"]),
    case(&["plan", "--limit-gb", "-1"], "accepted", 2, &["--limit-gb", "> 0"]),
    case(&["plan", "--limit-gb", "nan"], "accepted", 2, &["--limit-gb", "not a finite number"]),
    case(&["plan", "--devices", "0"], "accepted", 2, &["--devices"]),
    case(&["train", "--devices", "0"], "(new)", 2, &["--devices"]),
];

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_med-rlvr")
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// `DIR/model.safetensors` with every weight byte set to 0xFF (each f32 a NaN).
fn poison_weights(dir: &Path) {
    let p = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    for b in &mut bytes[8 + header..] {
        *b = 0xFF;
    }
    std::fs::write(p, bytes).unwrap();
}

fn set_json_key(path: &Path, key: &str, value: serde_json::Value) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v[key] = value;
    std::fs::write(path, v.to_string()).unwrap();
}

/// The scratch folder every case reads from.
fn workspace(w: &Path) {
    let demo = repo().join("assets/demo");
    copy_dir(&demo.join("model"), &w.join("model"));
    std::fs::create_dir_all(w.join("data")).unwrap();
    for f in ["train.jsonl", "test.jsonl"] {
        std::fs::copy(demo.join(f), w.join("data").join(f)).unwrap();
    }
    copy_dir(&demo.join("model"), &w.join("nanmodel"));
    poison_weights(&w.join("nanmodel"));
    copy_dir(&demo.join("model"), &w.join("smallvocab"));
    set_json_key(
        &w.join("smallvocab/config.json"),
        "vocab_size",
        serde_json::json!(100),
    );
    std::fs::copy(demo.join("model/config.json"), w.join("huge.json")).unwrap();
    set_json_key(
        &w.join("huge.json"),
        "hidden_size",
        serde_json::json!(1u64 << 40),
    );
    std::fs::create_dir_all(w.join("gens")).unwrap();
    std::fs::copy(demo.join("test.jsonl"), w.join("gens/generations.jsonl")).unwrap();
    std::fs::create_dir_all(w.join("oldrun")).unwrap();
    std::fs::write(w.join("oldrun/metrics.jsonl"), "{\"step\":0}\n").unwrap();
    std::fs::create_dir_all(w.join("notes")).unwrap();
    std::fs::write(w.join("notes/notes.txt"), "mine").unwrap();
    std::fs::write(w.join("empty.toml"), "").unwrap();
    std::fs::write(w.join("empty.jsonl"), "\n").unwrap();
    let preset = std::fs::read_to_string(repo().join("assets/presets/demo.toml")).unwrap();
    std::fs::write(
        w.join("typo.toml"),
        format!("{preset}\n[verifier]\nstric = true\n")
            .replace("../demo/", &format!("{}/", demo.display())),
    )
    .unwrap();
    std::fs::write(
        w.join("replies.jsonl"),
        "{\"response\": \"<think>x</think> <answer>B</answer>\", \"answer\": \"B\", \"num_options\": 4}\n",
    )
    .unwrap();
    std::fs::write(
        w.join("gold-out-of-range.jsonl"),
        "{\"response\": \"<think>x</think> <answer>B</answer>\", \"answer\": \"J\", \"num_options\": 4}\n",
    )
    .unwrap();
    let item = |id: &str| {
        format!("{{\"id\": \"{id}\", \"question\": \"Which?\", \"options\": [\"a\", \"b\"], \"answer\": \"A\"}}\n")
    };
    std::fs::write(
        w.join("dup-ids.jsonl"),
        item("q1") + &item("q2") + &item("q1"),
    )
    .unwrap();
    // The demo task in MedQA's layout (options as an object, answer_idx).
    let medqa: String = std::fs::read_to_string(demo.join("train.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let opts = v["options"].as_array().unwrap();
            let letters = ["A", "B", "C", "D"];
            let gold = v["answer"].as_str().unwrap();
            let idx = letters.iter().position(|l| *l == gold).unwrap();
            let options: serde_json::Map<String, serde_json::Value> = letters
                .iter()
                .zip(opts)
                .map(|(l, o)| (l.to_string(), o.clone()))
                .collect();
            serde_json::json!({"question": v["question"], "answer": opts[idx], "options": options,
                               "meta_info": "step1", "answer_idx": gold})
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(w.join("medqa.jsonl"), medqa).unwrap();
    // A finished one-step run with a checkpoint, and two broken copies of it.
    let o = Command::new(bin())
        .args(["train", "--out"])
        .arg(w.join("run"))
        .args(TINY_TRAIN)
        .args(["--set", "train.save_every=1"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    copy_dir(&w.join("run"), &w.join("run-truncated"));
    let opt = w.join("run-truncated/checkpoints/step-000001/optimizer/actor.mpk");
    let len = std::fs::metadata(&opt).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&opt)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    copy_dir(&w.join("run"), &w.join("no-config-run"));
    std::fs::remove_file(w.join("no-config-run/checkpoints/step-000001/config.toml")).unwrap();
}

/// Content hash of every file under `dir`.
fn hashes(dir: &Path) -> BTreeMap<PathBuf, u64> {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let mut h = DefaultHasher::new();
                std::fs::read(&p).unwrap().hash(&mut h);
                out.insert(p, h.finish());
            }
        }
    }
    out
}

#[test]
fn every_bad_input_is_refused_clearly_without_panic_or_damage() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path();
    workspace(w);
    let long = "word ".repeat(1100);
    let mut table =
        String::from("| input | before | after: exit status, first line |\n|---|---|---|\n");
    let mut failures = Vec::new();
    for c in CASES {
        let args: Vec<String> = c
            .args
            .iter()
            .map(|a| {
                a.replace("{w}", &w.display().to_string())
                    .replace("{repo}", &repo().display().to_string())
                    .replace("{long}", &long)
            })
            .collect();
        let before = hashes(w);
        let mut cmd = Command::new(bin());
        cmd.args(&args).current_dir(w).env("RUST_BACKTRACE", "1");
        if c.full_stdout {
            cmd.stdout(std::fs::File::create("/dev/full").unwrap());
        } else {
            cmd.stdout(Stdio::null());
        }
        let o = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr).to_string();
        let status = o.status.code().unwrap_or(-1);
        let shown = c.args.join(" ").replace("{long}", "\"word \"×1100");
        let first = stderr
            .lines()
            .find(|l| l.starts_with("error"))
            .or_else(|| stderr.lines().last())
            .unwrap_or("")
            .replace(&w.display().to_string(), "{w}");
        table.push_str(&format!(
            "| `{}` | {} | {status}: {} |\n",
            shown.replace('|', "\\|"),
            c.before,
            first.replace('|', "\\|")
        ));
        let mut wrong = Vec::new();
        if status != c.status {
            wrong.push(format!("exit status {status}, expected {}", c.status));
        }
        for bad in ["panicked", "RUST_BACKTRACE", "stack backtrace"] {
            if stderr.contains(bad) {
                wrong.push(format!("stderr contains {bad:?}"));
            }
        }
        for s in c.says {
            if !stderr.contains(s) {
                wrong.push(format!("message lacks {s:?}"));
            }
        }
        let after = hashes(w);
        for (p, h) in &before {
            match after.get(p) {
                None => wrong.push(format!("{} was deleted", p.display())),
                Some(h2) if h2 != h => wrong.push(format!("{} was changed", p.display())),
                _ => {}
            }
        }
        if !wrong.is_empty() {
            failures.push(format!(
                "{shown}\n    {}\n    stderr: {stderr}",
                wrong.join("; ")
            ));
        }
    }
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bad_input.md");
    std::fs::write(&path, &table).unwrap();
    eprintln!("{table}\n(written to {})", path.display());
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}

#[test]
fn default_run_folders_never_collide() {
    let dir = tempfile::tempdir().unwrap();
    let a = med_rlvr::trainer::default_out_dir(dir.path()).unwrap();
    let b = med_rlvr::trainer::default_out_dir(dir.path()).unwrap();
    assert_ne!(a, b);
    assert!(a.is_dir() && b.is_dir());
}

#[test]
fn the_kl_controller_keeps_beta_finite_and_state_always_parses() {
    use med_rlvr::checkpoint::{read_state, write_state, LoopState};
    let dir = tempfile::tempdir().unwrap();
    let mut st = LoopState {
        format_version: med_rlvr::checkpoint::FORMAT_VERSION,
        step: 1,
        epoch: 0,
        cursor: 0,
        opt_step: 1,
        kl_coef: f64::NAN,
        bad_streak: 0,
        seed: 0,
        rng: String::new(),
    };
    let err = write_state(dir.path(), &st).unwrap_err();
    assert!(format!("{err:#}").contains("kl_coef"), "{err:#}");
    st.kl_coef = 0.05;
    write_state(dir.path(), &st).unwrap();
    assert_eq!(read_state(dir.path()).unwrap().kl_coef, 0.05);
}
