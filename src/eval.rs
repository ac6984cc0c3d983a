//! Greedy (or sampled) evaluation: render prompts, generate through the batched sampler, score with
//! the verifier (and, on request, take the rewards from a reward program). Used by `train` for
//! held-out curves and by `eval`.

use anyhow::Result;
use burn::tensor::backend::Backend;
use qwen2_burn::{Qwen2, Qwen2Config};
use serde::Serialize;

use crate::prompt::{self, PromptStyle};
use crate::reward::{Gold, Request, RewardProgram};
use crate::sampler::{self, SamplingParams};
use crate::task::McqaItem;
use crate::tokenizer::Tokenizer;
use crate::verifier::{self, Verdict, VerifierConfig};

/// One scored generation.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    /// The item's index in the evaluated items.
    #[serde(skip)]
    pub item_index: usize,
    pub id: String,
    pub category: Option<String>,
    pub gold: char,
    pub sample_index: usize,
    pub response: String,
    pub response_tokens: usize,
    pub verdict: Verdict,
}

/// How to generate and score.
#[derive(Debug, Clone)]
pub struct ScoreSettings {
    pub style: PromptStyle,
    pub sampling: SamplingParams,
    pub verifier: VerifierConfig,
    /// Prompts whose rows decode at once (continuous batching over all items).
    pub batch: usize,
}

/// Generates `sampling.n` replies per item in batches and scores them. With the direct template, a
/// reply is scored by its first letter (format is not asked for).
pub fn generate_and_score<B: Backend>(
    model: &Qwen2<B>,
    config: &Qwen2Config,
    tok: &Tokenizer,
    items: &[McqaItem],
    settings: &ScoreSettings,
    device: &B::Device,
) -> Result<Vec<Generation>> {
    let (style, params, vcfg, batch) = (
        settings.style,
        &settings.sampling,
        &settings.verifier,
        settings.batch,
    );
    let mut out = Vec::with_capacity(items.len() * params.n);
    let prompts = items
        .iter()
        .map(|it| tok.encode(&prompt::render(it, style)))
        .collect::<Result<Vec<_>>>()?;
    for (p, it) in prompts.iter().zip(items) {
        crate::tokenizer::check_context(
            config.max_position_embeddings,
            p.len() + params.max_new_tokens,
            &format!(
                "question {} ({} prompt tokens) and {} new tokens",
                it.id,
                p.len(),
                params.max_new_tokens
            ),
        )?;
    }
    // Continuous batching over all items: `batch` prompts' rows decode at once.
    let params = SamplingParams {
        max_rows: batch.max(1) * params.n.max(1),
        ..params.clone()
    };
    let samples = sampler::generate(model, config, &prompts, &params, tok, device);
    for s in samples {
        let item = &items[s.prompt_index];
        if let Some(j) = s.logprobs.iter().position(|x| !x.is_finite()) {
            anyhow::bail!(
                "question {}: the model computed a non-finite log-prob at new token {j} (weights \
                 holding NaN/Inf, or an overflow); no accuracy is reported from such a model",
                item.id
            );
        }
        let response = tok.decode(&s.output_ids);
        let verdict = crate::reward::score(style, &response, &Gold::of(item), vcfg);
        out.push(Generation {
            item_index: s.prompt_index,
            id: item.id.clone(),
            category: item.category.clone(),
            gold: item.answer,
            sample_index: s.sample_index,
            response_tokens: s.output_ids.len(),
            response,
            verdict,
        });
    }
    Ok(out)
}

/// Replaces each generation's reward with a reward program's answer (format and accuracy stay the
/// verifier's, as in training); request ids are `eval/DATASET/ITEM/sample-K`.
pub fn program_rewards(
    program: &mut RewardProgram,
    dataset: &str,
    items: &[McqaItem],
    style: PromptStyle,
    gens: &mut [Generation],
) -> Result<()> {
    let prompts: Vec<String> = gens
        .iter()
        .map(|g| prompt::render(&items[g.item_index], style))
        .collect();
    let requests: Vec<Request> = gens
        .iter()
        .zip(&prompts)
        .map(|(g, p)| {
            let id = format!("eval/{dataset}/{}/sample-{}", g.id, g.sample_index);
            Request::new(id, p, &g.response, &items[g.item_index])
        })
        .collect();
    let answers = program.score(&requests)?;
    drop(requests);
    crate::reward::apply_answers(&answers, gens.iter_mut().map(|g| &mut g.verdict));
    Ok(())
}

/// Bootstrap: the mean of `outcomes` and the standard deviation of the mean over `resamples`
/// resamples with replacement (seeded). For 0/1 outcomes this approaches the binomial standard
/// error `√(p(1−p)/n)`; the paper reports accuracy ± this std over 1,000 resamples.
pub fn bootstrap(outcomes: &[f64], resamples: usize, seed: u64) -> (f64, f64) {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let n = outcomes.len();
    if n == 0 {
        return (0.0, 0.0);
    }
    let mean = outcomes.iter().sum::<f64>() / n as f64;
    let mut rng = StdRng::seed_from_u64(seed);
    let means: Vec<f64> = (0..resamples)
        .map(|_| {
            (0..n)
                .map(|_| outcomes[rng.random_range(0..n)])
                .sum::<f64>()
                / n as f64
        })
        .collect();
    let m = means.iter().sum::<f64>() / resamples.max(1) as f64;
    let var = means.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (resamples.max(2) - 1) as f64;
    (mean, var.sqrt())
}

/// Accuracy, format rate and reward with bootstrap std, and the stage histogram, of a set of
/// generations.
#[derive(Debug, Clone, Serialize)]
pub struct Scores {
    pub generations: usize,
    pub accuracy: f64,
    pub accuracy_std: f64,
    pub format_rate: f64,
    pub format_rate_std: f64,
    pub reward_mean: f64,
    pub stages: std::collections::BTreeMap<String, usize>,
}

impl Scores {
    pub fn of<'a>(
        gens: impl IntoIterator<Item = &'a Generation> + Clone,
        resamples: usize,
        seed: u64,
    ) -> Self {
        let acc: Vec<f64> = gens
            .clone()
            .into_iter()
            .map(|g| g.verdict.correct as u8 as f64)
            .collect();
        let fmt: Vec<f64> = gens
            .clone()
            .into_iter()
            .map(|g| g.verdict.format_ok as u8 as f64)
            .collect();
        let summary = verifier::Summary::from_verdicts(gens.into_iter().map(|g| &g.verdict));
        let (accuracy, accuracy_std) = bootstrap(&acc, resamples, seed);
        let (format_rate, format_rate_std) = bootstrap(&fmt, resamples, seed.wrapping_add(1));
        Self {
            generations: acc.len(),
            accuracy,
            accuracy_std,
            format_rate,
            format_rate_std,
            reward_mean: summary.reward_mean,
            stages: summary.stages,
        }
    }
}

/// One dataset's evaluation: overall and per category (MedQA `meta_info`, MMLU-Pro `category`).
#[derive(Debug, Clone, Serialize)]
pub struct DatasetReport {
    pub name: String,
    pub path: String,
    pub items: usize,
    pub overall: Scores,
    pub per_category: std::collections::BTreeMap<String, Scores>,
}

pub fn report(
    name: &str,
    path: &str,
    items: usize,
    gens: &[Generation],
    resamples: usize,
    seed: u64,
) -> DatasetReport {
    let mut cats: std::collections::BTreeMap<String, Vec<&Generation>> = Default::default();
    for g in gens {
        cats.entry(g.category.clone().unwrap_or_else(|| "-".into()))
            .or_default()
            .push(g);
    }
    DatasetReport {
        name: name.to_string(),
        path: path.to_string(),
        items,
        overall: Scores::of(gens.iter(), resamples, seed),
        per_category: cats
            .into_iter()
            .map(|(c, v)| (c, Scores::of(v.iter().copied(), resamples, seed)))
            .collect(),
    }
}

/// A Figure-3-style markdown table: one row per model, one column per dataset, `acc ± std` in %.
pub fn markdown_table(rows: &[(String, Vec<DatasetReport>)]) -> String {
    let Some((_, first)) = rows.first() else {
        return String::new();
    };
    let mut s = String::from("| model |");
    for d in first {
        s.push_str(&format!(" {} (n={}) |", d.name, d.items));
    }
    s.push_str("\n|---|");
    s.push_str(&"---|".repeat(first.len()));
    for (model, ds) in rows {
        s.push_str(&format!("\n| {model} |"));
        for d in ds {
            s.push_str(&format!(
                " {:.2} ± {:.2} |",
                100.0 * d.overall.accuracy,
                100.0 * d.overall.accuracy_std
            ));
        }
    }
    s.push('\n');
    s
}
