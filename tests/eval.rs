//! Bootstrap error bars against the binomial standard error; an end-to-end `eval` of the demo
//! model whose table recomputes from generations.jsonl, `--category`, `--adapter`; `sft` (the
//! answer loss falls, LoRA writes adapter and merged model, length-grouped batches).

use std::process::Command;

use med_rlvr::eval::bootstrap;
use med_rlvr::sft::epoch_batches;
use rand::{rngs::StdRng, SeedableRng};

#[test]
fn bootstrap_std_matches_binomial_standard_error() {
    for (n, k) in [(1273usize, 626usize), (818, 328), (200, 30)] {
        let outcomes: Vec<f64> = (0..n).map(|i| if i < k { 1.0 } else { 0.0 }).collect();
        let (mean, std) = bootstrap(&outcomes, 1000, 7);
        let p = k as f64 / n as f64;
        let se = (p * (1.0 - p) / n as f64).sqrt();
        assert!((mean - p).abs() < 1e-12);
        assert!(
            (std - se).abs() / se < 0.05,
            "n={n}: bootstrap std {std} vs binomial {se}"
        );
    }
    // Seeded: the same seed gives the same std.
    let o: Vec<f64> = (0..100).map(|i| (i % 3 == 0) as u8 as f64).collect();
    assert_eq!(bootstrap(&o, 1000, 1), bootstrap(&o, 1000, 1));
}

/// Without `--model` and `--data`, `eval`, `generate` and `logprobs` run on the embedded demo and
/// say so on stderr.
#[test]
fn commands_default_to_the_embedded_demo_and_say_so() {
    let out = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_med-rlvr"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let dir = out.path().to_str().unwrap();
    let err = run(&[
        "eval",
        "--limit",
        "4",
        "--max-new-tokens",
        "8",
        "--out",
        dir,
    ]);
    assert!(
        err.contains("model: the embedded demo") && err.contains("test.jsonl"),
        "{err}"
    );
    assert!(out.path().join("summary.json").exists());
    let err = run(&[
        "generate",
        "--prompt",
        "A 45-year-old man",
        "--max-new-tokens",
        "4",
    ]);
    assert!(err.contains("model: the embedded demo"), "{err}");
    let err = run(&[
        "logprobs",
        "--prompt",
        "A man",
        "--continuation",
        " with pain",
    ]);
    assert!(err.contains("model: the embedded demo"), "{err}");
}

#[test]
fn eval_end_to_end_writes_files_and_the_table_recomputes() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_med-rlvr"))
        .args([
            "eval",
            "--model",
            &format!("{root}/assets/demo/model"),
            "--data",
        ])
        .arg(format!("{root}/assets/demo/test.jsonl"))
        .arg(format!("{root}/assets/demo/train.jsonl"))
        .args(["--limit", "12", "--max-new-tokens", "32", "--out"])
        .arg(out.path())
        .status()
        .unwrap();
    assert!(status.success());
    let gens: Vec<serde_json::Value> =
        std::fs::read_to_string(out.path().join("generations.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(gens.len(), 24);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("summary.json")).unwrap())
            .unwrap();
    let table = std::fs::read_to_string(out.path().join("table.md")).unwrap();
    for (i, ds) in ["test", "train"].iter().enumerate() {
        let rows: Vec<&serde_json::Value> = gens.iter().filter(|g| g["dataset"] == *ds).collect();
        let acc = rows
            .iter()
            .filter(|g| g["verdict"]["correct"] == true)
            .count() as f64
            / rows.len() as f64;
        let fmt = rows
            .iter()
            .filter(|g| g["verdict"]["format_ok"] == true)
            .count() as f64
            / rows.len() as f64;
        let rep = &summary["datasets"][i];
        assert_eq!(rep["name"], *ds);
        assert!((rep["overall"]["accuracy"].as_f64().unwrap() - acc).abs() < 1e-12);
        assert!((rep["overall"]["format_rate"].as_f64().unwrap() - fmt).abs() < 1e-12);
        let cell = format!(
            "{:.2} ± {:.2}",
            100.0 * acc,
            100.0 * rep["overall"]["accuracy_std"].as_f64().unwrap()
        );
        assert!(table.contains(&cell), "{table} lacks {cell}");
    }
}

#[test]
fn sft_lowers_the_answer_loss_and_raises_direct_accuracy() {
    use burn::backend::{Autodiff, NdArray};
    use med_rlvr::eval::{generate_and_score, ScoreSettings, Scores};
    use med_rlvr::prompt::PromptStyle;
    use med_rlvr::sampler::SamplingParams;
    use med_rlvr::sft::pairs as sft_pairs;
    use med_rlvr::sft::{eval_loss, train, SftConfig};
    use med_rlvr::task::{load, DataFormat, LoadOptions};
    use med_rlvr::tokenizer::Tokenizer;
    type B = Autodiff<NdArray<f32>>;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo");
    let dev = Default::default();
    let tok = Tokenizer::from_dir(&root.join("model")).unwrap();
    let (config, model) = qwen2_burn::load_qwen2::<B>(&root.join("model"), &dev).unwrap();
    let items = load(
        &root.join("train.jsonl"),
        DataFormat::Generic,
        &LoadOptions::default(),
    )
    .unwrap()
    .items;
    let test = &load(
        &root.join("test.jsonl"),
        DataFormat::Generic,
        &LoadOptions::default(),
    )
    .unwrap()
    .items[..40];
    let pairs = sft_pairs(&items[..96], &tok).unwrap();
    let held = sft_pairs(test, &tok).unwrap();
    let settings = ScoreSettings {
        style: PromptStyle::Direct,
        sampling: SamplingParams {
            temperature: 0.0,
            max_new_tokens: 3,
            stop_token_ids: vec![tok.eos_id().unwrap()],
            ..Default::default()
        },
        verifier: Default::default(),
        batch: 40,
    };
    let acc = |m: &qwen2_burn::Qwen2<B>| {
        use burn::module::AutodiffModule;
        let g = generate_and_score(&m.valid(), &config, &tok, test, &settings, &dev).unwrap();
        Scores::of(g.iter(), 10, 0).accuracy
    };
    let (loss0, acc0) = (eval_loss(&model, &held, 64, &dev), acc(&model));
    let cfg = SftConfig {
        epochs: 2,
        batch: 16,
        lr: 2e-3,
        optim: Default::default(),
        seed: 0,
        logprob_chunk: 64,
        group_by_length: false,
    };
    let (model, _) = train(model, &pairs, &cfg, &dev, |_| {}).unwrap();
    let (loss1, acc1) = (eval_loss(&model, &held, 64, &dev), acc(&model));
    eprintln!(
        "held-out answer loss {loss0:.3} -> {loss1:.3}, direct accuracy {acc0:.3} -> {acc1:.3}"
    );
    assert!(loss1 < 0.5 * loss0, "answer loss {loss0} -> {loss1}");
    assert!(acc1 >= acc0 + 0.15, "direct accuracy {acc0} -> {acc1}");
}

/// The first `n` lines of a file of the embedded demo task (`assets/demo/FILE`).
fn demo_lines(file: &str, n: usize) -> Vec<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets/demo")
        .join(file);
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .take(n)
        .map(String::from)
        .collect()
}

#[test]
fn sft_command_with_lora_writes_adapter_and_merged_model() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.jsonl");
    std::fs::write(&data, demo_lines("train.jsonl", 64).join("\n")).unwrap();
    let out = dir.path().join("sft");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_med-rlvr"))
        .args(["sft", "--model"])
        .arg(root.join("model"))
        .arg("--data")
        .arg(&data)
        .args([
            "--epochs",
            "3",
            "--lr",
            "5e-3",
            "--batch",
            "16",
            "--lora-rank",
            "4",
            "--group-by-length",
        ])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in [
        "final/model.safetensors",
        "final/tokenizer.json",
        "final_adapter/adapter_model.safetensors",
        "final_adapter/adapter_config.json",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    let losses: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(losses.len(), 12);
    let (first, last) = (
        losses[..2].iter().sum::<f64>(),
        losses[10..].iter().sum::<f64>(),
    );
    assert!(last < 0.7 * first, "LoRA SFT loss {first} -> {last}");

    // `eval --adapter` on the base gives what `eval` of the merged model gives (greedy), and not
    // what the base alone gives.
    let eval = |model: &std::path::Path, adapter: Option<&std::path::Path>, name: &str| {
        let dst = dir.path().join(name);
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_med-rlvr"));
        c.arg("eval").arg("--model").arg(model);
        if let Some(a) = adapter {
            c.arg("--adapter").arg(a);
        }
        c.args([
            "--prompt",
            "direct",
            "--limit",
            "8",
            "--max-new-tokens",
            "4",
            "--out",
        ])
        .arg(&dst);
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read_to_string(dst.join("generations.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["response"].clone())
            .collect::<Vec<_>>()
    };
    let with_adapter = eval(&root.join("model"), Some(&out.join("final_adapter")), "a");
    let merged = eval(&out.join("final"), None, "m");
    let base = eval(&root.join("model"), None, "b");
    assert_eq!(with_adapter.len(), 8);
    assert_eq!(
        with_adapter, merged,
        "--adapter differs from the merged model"
    );
    assert_ne!(with_adapter, base, "the adapter changed no reply");
}

/// `eval --category` keeps the questions of that category only, and reports it.
#[test]
fn eval_category_keeps_that_category() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("two.jsonl");
    let lines: Vec<String> = demo_lines("test.jsonl", 10)
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["category"] = serde_json::json!(if i % 3 == 0 { "thirds" } else { "rest" });
            v.to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let out = dir.path().join("ev");
    let o = Command::new(env!("CARGO_BIN_EXE_med-rlvr"))
        .arg("eval")
        .arg("--data")
        .arg(&data)
        .args(["--category", "thirds", "--max-new-tokens", "4", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let gens: Vec<serde_json::Value> = std::fs::read_to_string(out.join("generations.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<&str> = gens.iter().map(|g| g["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["test-0", "test-3", "test-6", "test-9"]);
    assert!(gens.iter().all(|g| g["category"] == "thirds"));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let ds = &summary["datasets"][0];
    assert_eq!(ds["items"], 4);
    let cats: Vec<&String> = ds["per_category"].as_object().unwrap().keys().collect();
    assert_eq!(cats, ["thirds"]);
}

/// Padded tokens of one epoch (`sft --group-by-length`): each batch pads to its longest row.
fn padded(lens: &[usize], batches: &[Vec<usize>]) -> usize {
    batches
        .iter()
        .map(|b| b.iter().map(|&i| lens[i]).max().unwrap_or(0) * b.len())
        .sum()
}

#[test]
fn length_grouped_batches_cover_every_row_once_and_pad_less() {
    // Mixed lengths like the demo's pretraining corpus: many short documents, some long chats.
    let mut rng = StdRng::seed_from_u64(7);
    let lens: Vec<usize> = (0..1000)
        .map(|i| if i % 4 == 0 { 170 } else { 20 + i % 40 })
        .collect();
    for by_length in [false, true] {
        let batches = epoch_batches(&lens, 32, by_length, &mut rng);
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..1000).collect::<Vec<_>>(), "by_length={by_length}");
        assert_eq!(batches.len(), 1000usize.div_ceil(32));
    }
    let plain = padded(&lens, &epoch_batches(&lens, 32, false, &mut rng));
    let grouped = padded(&lens, &epoch_batches(&lens, 32, true, &mut rng));
    let real: usize = lens.iter().sum();
    eprintln!("padded tokens: plain {plain}, grouped {grouped}, real {real}");
    assert!(
        grouped * 2 < plain,
        "grouping should at least halve the padded tokens: {grouped} vs {plain}"
    );
    // Same seed, same batches; another seed, another grouping and order.
    let a = epoch_batches(&lens, 32, true, &mut StdRng::seed_from_u64(1));
    let b = epoch_batches(&lens, 32, true, &mut StdRng::seed_from_u64(1));
    let c = epoch_batches(&lens, 32, true, &mut StdRng::seed_from_u64(2));
    assert_eq!(a, b);
    assert_ne!(a, c);
}
