//! The embedded demo: a small synthetic medical-style MCQA task and a tiny Qwen2 trained by this
//! project's own code, so `med-rlvr train` learns visibly on a CPU in minutes.
//!
//! How `med-rlvr demo-assets` makes them (deterministic for a seed):
//! 1. **Task.** 16 (finding → diagnosis) pairs in four groups of four. An item reads "A 54-year-old
//!    woman presents with {finding}. Which of the following is the most likely diagnosis?" with the
//!    four diagnoses of its group as options A–D (fixed order per group). 480 training and 120
//!    held-out items (new ages and sexes).
//! 2. **Tokenizer.** A byte-level BPE (target vocabulary 1024; the small corpus yields 861, plus
//!    `<|endoftext|>`) trained on the rendered prompts and replies.
//! 3. **Model.** A random Qwen2 (hidden 96, 2 layers, 4 query / 2 key-value heads, MLP 256, tied
//!    embeddings).
//! 4. **Warm start, like a base model: format and answers mostly wrong.** A short SFT (8 epochs) on
//!    replies to the paper's prompt drawn from a mixture: 55 % unformatted (`The answer is X.`),
//!    45 % `<think> The findings suggest {diagnosis}. </think><answer> X </answer>` where the
//!    (diagnosis, letter) pair is the right one on purpose 15 % of the time and otherwise a uniformly
//!    drawn option's (so right about 36 % of formatted replies). The model thus starts with format
//!    and accuracy well below 1; RL with the verifier's reward has to find the formatted, correct mode.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use qwen2_burn::{save_qwen2, Qwen2, Qwen2Config, SaveDtype};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::json;

use crate::config::OptimConfig;
use crate::prompt::{self, PromptStyle};
use crate::sft::{self, SftConfig};
use crate::task::McqaItem;
use crate::tokenizer::{Tokenizer, ENDOFTEXT};

/// The shipped demo assets (`assets/demo` in the source tree).
pub fn assets_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo")
}

/// The embedded demo model: the default `--model` of `eval`, `generate`, `logprobs` and `sft`.
pub fn model_dir() -> PathBuf {
    assets_dir().join("model")
}

/// Says on stderr when a command runs on the embedded demo model or task (its default).
pub fn announce_default(what: &str, path: &Path) {
    if path.starts_with(assets_dir()) {
        eprintln!("{what}: the embedded demo, {}", path.display());
    }
}

pub const FACTS: [(&str, &str); 16] = [
    (
        "crushing chest pain radiating to the left arm",
        "Myocardial infarction",
    ),
    ("polyuria, polydipsia and weight loss", "Diabetes mellitus"),
    (
        "fever, neck stiffness and photophobia",
        "Bacterial meningitis",
    ),
    ("episodic wheezing relieved by an inhaler", "Asthma"),
    (
        "heat intolerance, tremor and weight loss",
        "Hyperthyroidism",
    ),
    (
        "cold intolerance, weight gain and constipation",
        "Hypothyroidism",
    ),
    (
        "a malar rash and joint pain",
        "Systemic lupus erythematosus",
    ),
    ("a resting tremor and a shuffling gait", "Parkinson disease"),
    (
        "right lower quadrant pain with rebound tenderness",
        "Appendicitis",
    ),
    (
        "fatigue, pallor and a low ferritin",
        "Iron deficiency anemia",
    ),
    ("a sudden painful swollen big toe", "Gout"),
    (
        "unilateral leg swelling after a long flight",
        "Deep vein thrombosis",
    ),
    ("epigastric pain relieved by meals", "Duodenal ulcer"),
    (
        "painless hematuria after decades of smoking",
        "Bladder cancer",
    ),
    (
        "productive cough, fever and lobar consolidation",
        "Pneumonia",
    ),
    ("jaundice after eating fava beans", "G6PD deficiency"),
];

/// `count` synthetic items, drawn with `rng`. The 16 diagnoses form four groups of four
/// (`FACTS[4g..4g+4]`); a question's options are its diagnosis's group in that fixed order, so the
/// letter is a function of the diagnosis and the task is to map the finding to its diagnosis.
pub fn synthetic_items(count: usize, rng: &mut StdRng, id_prefix: &str) -> Vec<McqaItem> {
    (0..count)
        .map(|i| {
            let f = rng.random_range(0..FACTS.len());
            let group = f / 4 * 4;
            let age = rng.random_range(18..90);
            let who = if rng.random_bool(0.5) { "woman" } else { "man" };
            McqaItem {
                id: format!("{id_prefix}-{i}"),
                question: format!(
                    "A {age}-year-old {who} presents with {}. Which of the following is the most likely diagnosis?",
                    FACTS[f].0
                ),
                options: (group..group + 4).map(|o| FACTS[o].1.to_string()).collect(),
                answer: McqaItem::letter(f - group),
                category: Some("synthetic".into()),
                source: Some("med-rlvr demo".into()),
            }
        })
        .collect()
}

/// Share of unformatted warm-start replies.
const UNFORMATTED_SHARE: f64 = 0.55;
/// Share of formatted warm-start replies that name the right diagnosis on purpose (the rest pick an
/// option uniformly, the right one included).
const GOLD_SHARE: f64 = 0.15;

/// A warm-start reply for `item` drawn from the mixture in the module doc.
fn warm_reply(item: &McqaItem, rng: &mut StdRng) -> String {
    let pick = if rng.random_bool(GOLD_SHARE) {
        item.gold_index()
    } else {
        rng.random_range(0..item.options.len())
    };
    let letter = McqaItem::letter(pick);
    if rng.random_bool(UNFORMATTED_SHARE) {
        format!(" The answer is {letter}.")
    } else {
        format!(
            " <think> The findings suggest {}. </think><answer> {letter} </answer>",
            item.options[pick]
        )
    }
}

fn write_jsonl(path: &Path, items: &[McqaItem]) -> Result<()> {
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path)
            .with_context(|| format!("{}: cannot create", path.display()))?,
    );
    for it in items {
        let line = json!({"id": it.id, "question": it.question, "options": it.options, "answer": it.answer.to_string(), "category": it.category});
        writeln!(f, "{line}")?;
    }
    Ok(())
}

/// Demo geometry.
pub fn demo_config(vocab: usize, eos: u32) -> Qwen2Config {
    Qwen2Config {
        vocab_size: vocab,
        hidden_size: 96,
        intermediate_size: 256,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 24,
        max_position_embeddings: 1024,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        tie_word_embeddings: true,
        bos_token_id: Some(eos),
        eos_token_ids: vec![eos],
        torch_dtype: Some("float32".into()),
    }
}

fn train_tokenizer(corpus: &[String], out: &Path) -> Result<()> {
    use tokenizers::models::bpe::{BpeTrainer, BPE};
    use tokenizers::models::TrainerWrapper;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::AddedToken;
    let tmp = out.with_extension("corpus.txt");
    std::fs::write(&tmp, corpus.join("\n"))?;
    let mut tok = tokenizers::Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tok.with_decoder(Some(ByteLevel::default()));
    let mut trainer: TrainerWrapper = BpeTrainer::builder()
        .vocab_size(1024)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    tok.train_from_files(&mut trainer, vec![tmp.display().to_string()])
        .map_err(|e| anyhow::anyhow!("tokenizer training failed: {e}"))?;
    tok.add_special_tokens(&[AddedToken::from(ENDOFTEXT, true)]);
    tok.save(out, false)
        .map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
    std::fs::remove_file(&tmp)?;
    Ok(())
}

/// Builds the demo task and model into `out` (`train.jsonl`, `test.jsonl`, `model/`).
pub fn build<B: AutodiffBackend>(
    out: &Path,
    seed: u64,
    sft_epochs: usize,
    device: &B::Device,
) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let train = synthetic_items(480, &mut rng, "train");
    let test = synthetic_items(120, &mut rng, "test");
    std::fs::create_dir_all(out.join("model"))?;
    write_jsonl(&out.join("train.jsonl"), &train)?;
    write_jsonl(&out.join("test.jsonl"), &test)?;
    let replies: Vec<(String, String)> = train
        .iter()
        .map(|it| {
            (
                prompt::render(it, PromptStyle::R1),
                warm_reply(it, &mut rng),
            )
        })
        .collect();
    let corpus: Vec<String> = replies.iter().map(|(p, r)| format!("{p}{r}")).collect();
    let tok_path = out.join("model/tokenizer.json");
    train_tokenizer(&corpus, &tok_path)?;
    let tok = Tokenizer::from_dir(&out.join("model"))?;
    let eos = tok.eos_id()?;
    let config = demo_config(tok.vocab_size(), eos);
    let model = Qwen2::<B>::init_random(&config, seed, device);
    let pairs = replies
        .iter()
        .map(|(p, r)| {
            let mut target = tok.encode(r)?;
            target.push(eos);
            Ok((tok.encode(p)?, target))
        })
        .collect::<Result<Vec<_>>>()?;
    let cfg = SftConfig {
        epochs: sft_epochs,
        batch: 16,
        lr: 3e-3,
        optim: OptimConfig {
            weight_decay: 0.0,
            ..OptimConfig::default()
        },
        seed,
        logprob_chunk: 64,
        group_by_length: false,
    };
    let (model, hist) = sft::train(model, &pairs, &cfg, device, |s| {
        if s.step % 20 == 0 {
            eprintln!("warm start step {:4}  loss {:.4}", s.step, s.loss);
        }
    })?;
    eprintln!(
        "warm start done: {} steps, final loss {:.4}",
        hist.len(),
        hist.last().map_or(f64::NAN, |s| s.loss)
    );
    save_qwen2(
        &model.valid(),
        &config,
        &out.join("model"),
        SaveDtype::F32,
        usize::MAX,
    )?;
    Ok(())
}
