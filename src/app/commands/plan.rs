//! `med-rlvr plan`: the memory plan of a training config, without loading weights.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use qwen2_burn::Qwen2Config;

use med_rlvr::tokenizer::Tokenizer;

use crate::app::cli::PlanArgs;

pub(crate) fn run(a: PlanArgs) -> Result<()> {
    use med_rlvr::memory::{MemoryPlan, PlanInputs};
    let mut cfg = med_rlvr::config::TrainConfig::load(a.config.as_deref(), &a.set)?;
    if let Some(m) = &a.model {
        cfg.model.path = m.clone();
    }
    if cfg.model.path.as_os_str().is_empty() {
        bail!("model.path is not set: give --model DIR (or a config.json) or set model.path");
    }
    // A hub id: its config.json alone (no weights).
    let m = &med_rlvr::hub::model_config_dir(&cfg.model.path)?;
    cfg.data.train = med_rlvr::hub::data_file(&cfg.data.train)?;
    let (geometry, dir) = if m.is_file() {
        (
            Qwen2Config::from_file(m)?,
            m.parent().map(Path::to_path_buf),
        )
    } else {
        (Qwen2Config::from_dir(m)?, Some(m.clone()))
    };
    let prompt_len = match a.prompt_len {
        Some(p) => p,
        None => {
            let measured = dir
                .filter(|d| d.join("tokenizer.json").is_file() && cfg.data.train.is_file())
                .map(|d| -> Result<usize> {
                    let tok = Tokenizer::from_dir(&d)?;
                    let opts = med_rlvr::task::LoadOptions {
                        category: cfg.data.category.clone(),
                        none_of_the_above: cfg.data.none_of_the_above,
                        skip_invalid: cfg.data.skip_invalid,
                    };
                    let ds = med_rlvr::task::load(&cfg.data.train, cfg.data.format, &opts)?;
                    let mut longest = 0;
                    for it in &ds.items {
                        let p = med_rlvr::prompt::render(it, cfg.data.prompt);
                        longest = longest.max(tok.encode(&p)?.len());
                    }
                    Ok(longest)
                })
                .transpose()?;
            match measured {
                Some(p) => {
                    eprintln!("longest prompt in {}: {p} tokens", cfg.data.train.display());
                    p
                }
                None => {
                    eprintln!("no tokenizer or data.train to measure prompts: assuming 512 tokens");
                    512
                }
            }
        }
    };
    let plan = MemoryPlan::new(&PlanInputs::from_config(
        &cfg,
        &geometry,
        prompt_len,
        a.devices.max(1),
    ));
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        out!("{}", plan.render());
    }
    if let Some(gb) = a.limit_gb.or(cfg.model.memory_limit_gb) {
        let limit = (gb * (1u64 << 30) as f64) as u64;
        // The batch sizes that fit, each with the rest of the config as it is.
        let peak = |c: &med_rlvr::config::TrainConfig| {
            MemoryPlan::new(&PlanInputs::from_config(
                c,
                &geometry,
                prompt_len,
                a.devices.max(1),
            ))
            .peak
        };
        let with = |f: &dyn Fn(&mut med_rlvr::config::TrainConfig)| {
            let mut c = cfg.clone();
            f(&mut c);
            peak(&c) <= limit
        };
        let show =
            |x: Option<usize>| x.map_or("none (even 1 does not fit)".into(), |x| x.to_string());
        let mb = med_rlvr::memory::largest_fitting(4096, |m| with(&|c| c.ppo.micro_batch = m));
        let prompts = cfg.rollout.prompts_per_step / a.devices.max(1);
        let gb_rows =
            med_rlvr::memory::largest_fitting(prompts, |g| with(&|c| c.rollout.generate_batch = g));
        eprintln!(
            "within {gb} GiB: largest ppo.micro_batch {}, largest rollout.generate_batch {} (of {prompts} prompts)",
            show(mb),
            show(gb_rows)
        );
        plan.check(limit).map_err(med_rlvr::exit::RunFailed)?;
        eprintln!("fits in {gb} GiB");
    }
    Ok(())
}
