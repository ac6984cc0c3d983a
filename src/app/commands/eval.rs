//! `med-rlvr eval`: generate and score MCQA files; the Figure-3 table.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use serde_json::json;

use med_rlvr::sampler::SamplingParams;

use crate::app::cli::EvalArgs;

pub(crate) fn run<B: Backend>(mut a: EvalArgs, device: &B::Device) -> Result<()> {
    use med_rlvr::eval::{self as ev, ScoreSettings};
    use med_rlvr::task::{self, LoadOptions};
    crate::app::demo::announce_default("model", &a.model);
    // Hub ids and hf:// paths become cached files; the id names the model in the table.
    let model_spec = a.model.clone();
    a.model = med_rlvr::hub::model_dir(&a.model)?;
    for d in a.data.iter_mut() {
        *d = med_rlvr::hub::data_file(d)?;
    }
    let (config, model, tok) = med_rlvr::model_folder::load::<B>(&a.model, device)?;
    let model = match &a.adapter {
        Some(dir) => qwen2_burn::load_lora(model, dir, device)?.0.merge_lora(),
        None => model,
    };
    let settings = ScoreSettings {
        style: a.prompt,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_p: a.top_p,
            max_new_tokens: a.max_new_tokens,
            stop_token_ids: vec![tok.eos_id()?],
            stop_strings: med_rlvr::reward::stop_strings(a.prompt),
            n: a.n,
            seed: a.seed,
            ..Default::default()
        },
        verifier: med_rlvr::verifier::VerifierConfig {
            strict: a.strict,
            ..Default::default()
        },
        batch: a.batch,
    };
    let opts = LoadOptions {
        category: a.category.clone(),
        none_of_the_above: a.none_of_the_above,
        skip_invalid: a.skip_invalid,
    };
    // Every dataset is read and checked before anything is written.
    let mut sets = Vec::new();
    for path in &a.data {
        crate::app::demo::announce_default("data", path);
        let mut ds = task::load(path, a.format, &opts)?;
        if !ds.skipped.is_empty() {
            eprintln!(
                "{}: skipped {} malformed rows",
                path.display(),
                ds.skipped.len()
            );
        }
        if let Some(k) = a.limit {
            ds.items.truncate(k);
        }
        if ds.items.is_empty() {
            let why = match &a.category {
                Some(c) => {
                    let all = task::load(
                        path,
                        a.format,
                        &LoadOptions {
                            category: None,
                            ..opts.clone()
                        },
                    )?;
                    let mut cats: Vec<String> =
                        all.items.into_iter().filter_map(|it| it.category).collect();
                    cats.sort();
                    cats.dedup();
                    format!(
                        " of --category {c:?} (the file's categories: {})",
                        if cats.is_empty() {
                            "none".into()
                        } else {
                            cats.join(", ")
                        }
                    )
                }
                None => String::new(),
            };
            bail!("{}: no questions{why}; nothing to evaluate", path.display());
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = ds.items.iter().find(|it| !seen.insert(it.id.as_str())) {
            bail!(
                "{}: question id {:?} appears more than once; ids must be unique to match \
                 generations to questions",
                path.display(),
                dup.id
            );
        }
        sets.push((path, ds));
    }
    let gen_path = a.out.join("generations.jsonl");
    let mut inputs: Vec<(&str, &Path)> = vec![("--model", a.model.as_path())];
    inputs.extend(a.data.iter().map(|d| ("--data", d.as_path())));
    for f in ["generations.jsonl", "summary.json", "table.md"] {
        med_rlvr::paths::refuse_overlap("--out", &a.out.join(f), &inputs)?;
    }
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("{}: cannot create", a.out.display()))?;
    let mut gen_file = std::io::BufWriter::new(
        std::fs::File::create(&gen_path)
            .with_context(|| format!("{}: cannot create", gen_path.display()))?,
    );
    let mut program = a.reward.start()?;
    let mut reports = Vec::new();
    for (path, ds) in sets {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        let t0 = std::time::Instant::now();
        let mut gens = ev::generate_and_score(&model, &config, &tok, &ds.items, &settings, device)?;
        if let Some(p) = program.as_mut() {
            ev::program_rewards(p, &name, &ds.items, a.prompt, &mut gens)?;
        }
        let secs = t0.elapsed().as_secs_f64();
        eprintln!(
            "{name}: {} questions in {secs:.1} s ({:.3} s per question)",
            ds.items.len(),
            secs / ds.items.len().max(1) as f64
        );
        for g in &gens {
            let mut v = serde_json::to_value(g)?;
            v["dataset"] = json!(name);
            writeln!(gen_file, "{v}")
                .with_context(|| format!("{}: cannot write", gen_path.display()))?;
        }
        reports.push(ev::report(
            &name,
            &path.display().to_string(),
            ds.items.len(),
            &gens,
            a.resamples,
            a.seed,
        ));
    }
    gen_file
        .flush()
        .with_context(|| format!("{}: cannot write", gen_path.display()))?;
    let model_name = a.name.clone().unwrap_or_else(|| {
        model_spec
            .file_name()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default()
    });
    let summary = json!({"model": model_name, "model_path": model_spec, "prompt": a.prompt, "n": a.n, "temperature": a.temperature,
        "bootstrap_resamples": a.resamples, "seed": a.seed,
        "reward_program": (!a.reward.reward_program.is_empty()).then(|| a.reward.reward_program.join(" ")),
        "datasets": reports});
    let summary_path = a.out.join("summary.json");
    std::fs::write(&summary_path, serde_json::to_string_pretty(&summary)?)
        .with_context(|| format!("{}: cannot write", summary_path.display()))?;
    let table = ev::markdown_table(&[(model_name, reports)]);
    let table_path = a.out.join("table.md");
    std::fs::write(&table_path, &table)
        .with_context(|| format!("{}: cannot write", table_path.display()))?;
    out!("{table}");
    eprintln!("wrote {}", a.out.display());
    Ok(())
}
