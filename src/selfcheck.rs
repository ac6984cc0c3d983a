//! The differential self-check: every numeric entry point of the model and the trainer run on
//! one backend and on the CPU reference (ndarray), over a sweep of shapes, and compared element
//! by element ([`crate::compare::check_close`]: NaN, infinity or a length mismatch fail).
//!
//! A case is a random tiny Qwen2 (tied or untied head, grouped or plain attention, odd or even
//! vocabulary; seeded, so both backends hold the same weights) and a batch of 1–6 rows of
//! (prompt, response) lengths — left-padded prompts, right-padded responses — with a log-prob
//! chunk that may or may not divide the response width. Each case checks:
//! `hidden` and `logits` at every position; `token_logprobs` at the chunk and in one piece;
//! `train_logprobs` with and without layer recomputation and the parameter gradients of a
//! weighted log-prob loss through each; the critic's values and value-loss gradients
//! (recomputed); all of it with LoRA adapters when the case says so; and the sampler (prefill
//! and decode, temperature 1, two samples per prompt, continuous batching with fewer rows than
//! samples): the same tokens and the same rollout log-probs.
//!
//! `med-rlvr selfcheck` runs it for the build's backend; `tests/selfcheck.rs` runs it on every
//! backend of the suite.

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use qwen2_burn::{LoraSpec, Qwen2, Qwen2Config};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::compare::{check_close, Diff, Tolerance};
use crate::critic::Critic;
use crate::experience::{grid_tensor, Batch};
use crate::sampler::{self, NoDetokenizer, SamplingParams};

/// One shape of the sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    /// Seeds the weights, the tokens and the sampler.
    pub seed: u64,
    pub tied: bool,
    /// Two query heads per key/value head (else one).
    pub gqa: bool,
    /// Hidden size (4 query heads: head dim hidden / 4, or hidden / 2 for Qwen3).
    pub hidden: usize,
    /// A Qwen3 geometry (per-head q/k RMSNorm, no bias, `head_dim` ≠ hidden / heads), else Qwen2.
    pub qwen3: bool,
    pub vocab: usize,
    pub lora: bool,
    /// `(prompt length, response length)` per row; both at least 1.
    pub rows: Vec<(usize, usize)>,
    /// The log-prob chunk (`model.logprob_chunk`).
    pub chunk: usize,
}

impl std::fmt::Display for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rows: Vec<String> = self.rows.iter().map(|(p, r)| format!("{p}+{r}")).collect();
        write!(
            f,
            "seed {} {} {} {} hidden {} vocab {}{} chunk {} rows [{}]",
            self.seed,
            if self.qwen3 { "qwen3" } else { "qwen2" },
            if self.tied { "tied" } else { "untied" },
            if self.gqa { "gqa" } else { "mha" },
            self.hidden,
            self.vocab,
            if self.lora { " lora" } else { "" },
            self.chunk,
            rows.join(" ")
        )
    }
}

/// Vocabulary sizes of the sweep: prime, a power of two, and the demo model's (odd, over 1,000).
pub const VOCABS: [usize; 4] = [61, 97, 128, 1457];
/// Hidden sizes of the sweep (head dims 8 and 16).
pub const HIDDENS: [usize; 2] = [32, 64];

/// `n` cases drawn from `seed`: batch 1–6, prompt 1–40 and response 1–40 tokens (totals up to
/// 80), chunks 1–17; Qwen2 and Qwen3 geometries alternate (by the case's seed).
pub fn cases(seed: u64, n: usize) -> Vec<Case> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let b = rng.random_range(1..=6);
            let seed = seed.wrapping_mul(1000).wrapping_add(i as u64);
            Case {
                seed,
                qwen3: seed % 2 == 1,
                tied: rng.random(),
                gqa: rng.random(),
                hidden: HIDDENS[rng.random_range(0..HIDDENS.len())],
                vocab: VOCABS[rng.random_range(0..VOCABS.len())],
                lora: rng.random(),
                rows: (0..b)
                    .map(|_| (rng.random_range(1..=40), rng.random_range(1..=40)))
                    .collect(),
                chunk: rng.random_range(1..=17),
            }
        })
        .collect()
}

/// The tolerance an output is compared at, by its name's prefix.
pub fn tolerance(name: &str, want: &[f64]) -> Tolerance {
    if name.starts_with("grad") {
        // Gradients: relative to the largest entry of the tensor.
        Tolerance::scaled(1e-3, want)
    } else if name.starts_with("sample ids") {
        Tolerance::abs(0.0)
    } else {
        Tolerance::abs(1e-4)
    }
}

/// One output of a case compared: its name and the comparison.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub result: Result<Diff, String>,
}

/// What one case's checks add up to: how many, the failures, and the worst absolute error of
/// the outputs and of the gradients (`grad …` checks) among those that passed.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub checks: usize,
    pub failures: Vec<String>,
    pub max_abs: f64,
    pub max_abs_grad: f64,
}

impl Summary {
    pub fn of(checks: &[Check]) -> Self {
        let mut s = Summary {
            checks: checks.len(),
            ..Default::default()
        };
        for c in checks {
            match &c.result {
                Err(e) => s.failures.push(e.clone()),
                // A passing comparison's error is finite (`check_close` fails on NaN/Inf).
                Ok(d) if c.name.starts_with("grad") => {
                    s.max_abs_grad = s.max_abs_grad.max(d.max_abs)
                }
                Ok(d) => s.max_abs = s.max_abs.max(d.max_abs),
            }
        }
        s
    }
}

/// Runs `case` on `B` and on the reference `R` and compares every output.
pub fn run_case<B: AutodiffBackend, R: AutodiffBackend>(
    case: &Case,
    device: &B::Device,
    reference: &R::Device,
) -> Vec<Check> {
    let got = outputs::<B>(case, device);
    let want = outputs::<R>(case, reference);
    let mut checks = Vec::with_capacity(want.len());
    if got.len() != want.len() {
        checks.push(Check {
            name: "outputs".into(),
            result: Err(format!(
                "{} outputs where {} were expected",
                got.len(),
                want.len()
            )),
        });
    }
    for ((name, g), (wname, w)) in got.iter().zip(&want) {
        let result = if name != wname {
            Err(format!("output {name} where {wname} was expected"))
        } else {
            let w64: Vec<f64> = w.iter().map(|&x| x as f64).collect();
            check_close(name, g, w, tolerance(name, &w64))
        };
        checks.push(Check {
            name: name.clone(),
            result,
        });
    }
    checks
}

/// The case's model geometry.
pub fn config(case: &Case) -> Qwen2Config {
    let kv = if case.gqa { 2 } else { 4 };
    let family = match case.qwen3 {
        true => format!(
            r#""model_type": "qwen3", "head_dim": {}, "attention_bias": false,"#,
            case.hidden / 2
        ),
        false => r#""model_type": "qwen2","#.to_string(),
    };
    Qwen2Config::from_json_str(&format!(
        r#"{{{family} "vocab_size": {}, "hidden_size": {}, "intermediate_size": {},
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": {kv},
            "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": {}, "eos_token_id": 0}}"#,
        case.vocab,
        case.hidden,
        case.hidden * 3 / 2,
        case.tied
    ))
    .expect("the self-check geometry is valid")
}

/// The case's model on `B`: random weights from the seed, with perturbed LoRA adapters on every
/// projection when the case has them.
pub fn model<B: AutodiffBackend>(case: &Case, device: &B::Device) -> Qwen2<B> {
    let m = Qwen2::<B>::init_random(&config(case), case.seed, device);
    if !case.lora {
        return m;
    }
    let spec = LoraSpec {
        rank: 4,
        alpha: 8.0,
        targets: crate::model::PROJECTIONS
            .iter()
            .map(|s| s.to_string())
            .collect(),
    };
    // B starts at zero; move every trainable tensor so the adapters change the outputs.
    m.with_lora(&spec, case.seed, device)
        .map(&mut Perturb(case.seed))
}

/// Adds a deterministic host-drawn offset (`0.05·sin(0.37·i + k)`, `k` counting tensors from the
/// seed) to every trainable tensor — LoRA's B starts at zero, which would make A's gradient zero
/// and any comparison of adapter gradients weak.
pub struct Perturb(pub u64);

impl<B: AutodiffBackend> ModuleMapper<B> for Perturb {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        if !tensor.is_require_grad() {
            return Param::from_mapped_value(id, tensor, mapper);
        }
        self.0 += 1;
        let shape = tensor.shape();
        let noise: Vec<f32> = (0..shape.num_elements())
            .map(|i| 0.05 * ((i as f64 * 0.37 + self.0 as f64).sin() as f32))
            .collect();
        let inner = tensor.clone().inner()
            + Tensor::from_data(TensorData::new(noise, shape), &tensor.device());
        Param::from_mapped_value(id, Tensor::from_inner(inner).require_grad(), mapper)
    }
}

/// The case's token rows, drawn from its seed.
pub fn token_rows(case: &Case) -> Vec<(Vec<u32>, Vec<u32>)> {
    let mut rng = StdRng::seed_from_u64(case.seed ^ 0x70CE);
    let mut draw = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| rng.random_range(0..case.vocab as u32))
            .collect()
    };
    case.rows.iter().map(|&(p, r)| (draw(p), draw(r))).collect()
}

/// Token rows ([`token_rows`]) as one [`Batch`] (left-padded prompts, right-padded responses).
pub fn batch(rows: &[(Vec<u32>, Vec<u32>)]) -> Batch {
    let refs: Vec<(&[u32], &[u32])> = rows
        .iter()
        .map(|(p, r)| (p.as_slice(), r.as_slice()))
        .collect();
    Batch::new(&refs)
}

/// A tensor's elements on the host, as f32.
pub fn host<B: burn::tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32 data")
}

/// A deterministic weight per `[b][r]` position in `[-1, 1]`, zero off the response mask.
fn weights(batch: &Batch, k: f64) -> Vec<Vec<f64>> {
    batch
        .mask
        .iter()
        .enumerate()
        .map(|(i, row)| {
            row.iter()
                .enumerate()
                .map(|(j, m)| m * ((i * 31 + j * 7 + 1) as f64 * k).sin())
                .collect()
        })
        .collect()
}

/// Every parameter gradient in the module's visiting order, each as one named output.
fn gradients<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &GradientsParams,
    prefix: &str,
    out: &mut Vec<(String, Vec<f32>)>,
) {
    struct V<'a> {
        grads: &'a GradientsParams,
        prefix: &'a str,
        index: usize,
        out: &'a mut Vec<(String, Vec<f32>)>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for V<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(p.id) {
                self.out
                    .push((format!("{} #{}", self.prefix, self.index), host(g)));
            }
            self.index += 1;
        }
    }
    let mut v = V {
        grads,
        prefix,
        index: 0,
        out,
    };
    module.visit(&mut v);
}

/// Every output of `case` on backend `B`, named.
pub fn outputs<B: AutodiffBackend>(case: &Case, device: &B::Device) -> Vec<(String, Vec<f32>)> {
    let model = model::<B>(case, device);
    let rows = token_rows(case);
    let batch = batch(&rows);
    let mut out = Vec::new();
    let inner = model.valid();

    // Forward entry points (no autodiff).
    let (tokens, positions, valid) = batch.inputs::<B::InnerBackend>(device);
    let hidden = inner.hidden(tokens, positions, valid, None);
    out.push(("logits".into(), host(inner.logits(hidden.clone()))));
    out.push(("hidden".into(), host(hidden)));
    let chunk = case.chunk;
    out.push((
        format!("token_logprobs chunk {chunk}"),
        host(batch.logprobs(&inner, chunk, device)),
    ));
    out.push((
        "token_logprobs whole".into(),
        host(batch.logprobs(&inner, usize::MAX, device)),
    ));

    // Training entry points: output and parameter gradients, kept graph and recomputed.
    let w = weights(&batch, 0.7);
    for recompute in [false, true] {
        let tag = if recompute {
            "recomputed"
        } else {
            "kept graph"
        };
        let t = batch.train_logprobs(&model, chunk, recompute, device);
        out.push((format!("train_logprobs {tag}"), host(t.output.clone())));
        let loss = (t.output.clone() * grid_tensor::<B>(&w, device)).sum();
        let grads = t.param_grads(loss.backward());
        gradients(&model, &grads, &format!("grad logp {tag}"), &mut out);
    }
    let critic = Critic::new(model.clone(), case.seed, device);
    out.push(("values".into(), host(batch.values(&critic.valid(), device))));
    let t = batch.train_values(&critic, true, device);
    let target = grid_tensor::<B>(&weights(&batch, 0.3), device);
    let mask = batch.mask_tensor::<B>(device);
    let vloss = ((t.output.clone() - target).powi_scalar(2) * mask).sum();
    let grads = t.param_grads(vloss.backward());
    gradients(&critic, &grads, "grad values recomputed", &mut out);

    // The sampler: prefill + decode, two samples per prompt, continuous batching.
    let prompts: Vec<Vec<u32>> = rows.iter().map(|(p, _)| p.clone()).collect();
    let params = SamplingParams {
        temperature: 1.0,
        max_new_tokens: case.rows.iter().map(|r| r.1).max().unwrap_or(1).min(12),
        n: 2,
        seed: case.seed,
        // Half the 2·prompts rows at a time: finished rows' slots are refilled.
        max_rows: prompts.len(),
        ..Default::default()
    };
    let samples = sampler::generate(
        &inner,
        &config(case),
        &prompts,
        &params,
        &NoDetokenizer,
        device,
    );
    let ids: Vec<f32> = samples
        .iter()
        .flat_map(|s| s.output_ids.iter().map(|&t| t as f32))
        .collect();
    let lens: Vec<f32> = samples.iter().map(|s| s.output_ids.len() as f32).collect();
    out.push(("sample ids lengths".into(), lens));
    out.push(("sample ids".into(), ids));
    out.push((
        "sample logprobs".into(),
        samples.iter().flat_map(|s| s.logprobs.clone()).collect(),
    ));
    out.push((
        "sample entropies".into(),
        samples.iter().flat_map(|s| s.entropies.clone()).collect(),
    ));
    out
}
