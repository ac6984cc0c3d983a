//! `med-rlvr sft`: the SFT baseline, one run folder per learning rate.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use qwen2_burn::load_weights;

use med_rlvr::tokenizer::Tokenizer;

use crate::app::cli::SftArgs;

pub(crate) fn run<B: AutodiffBackend>(mut a: SftArgs, device: &B::Device) -> Result<()> {
    use burn::module::AutodiffModule;
    use med_rlvr::sft::{self as s, SftConfig};
    let opts = med_rlvr::task::LoadOptions {
        category: a.category.clone(),
        none_of_the_above: a.none_of_the_above,
        skip_invalid: a.skip_invalid,
    };
    crate::app::demo::announce_default("model", &a.model);
    crate::app::demo::announce_default("data", &a.data);
    for (i, lr) in a.lr.iter().enumerate() {
        if a.lr[..i].contains(lr) {
            bail!("--lr {lr:e} is given twice: each learning rate writes one run folder");
        }
    }
    // A hub id is recorded pinned (`OWNER/NAME@<commit>`) in the adapter's config.
    let base_spec = med_rlvr::hub::pin_model(&a.model)?;
    a.model = med_rlvr::hub::model_dir(&base_spec)?;
    a.data = med_rlvr::hub::data_file(&a.data)?;
    let ds = med_rlvr::task::load(&a.data, a.format, &opts)?;
    if ds.items.is_empty() {
        bail!(
            "{}: no examples{}",
            a.data.display(),
            a.category
                .as_ref()
                .map(|c| format!(" of --category {c:?}"))
                .unwrap_or_default()
        );
    }
    let (model_config, tok) = Tokenizer::for_model(&a.model)?;
    if a.lora_rank > model_config.hidden_size {
        bail!(
            "--lora-rank {}: above the model's hidden_size {}",
            a.lora_rank,
            model_config.hidden_size
        );
    }
    let pairs = med_rlvr::sft::pairs(&ds.items, &tok)?;
    if let Some((p, t)) = pairs.iter().max_by_key(|(p, t)| p.len() + t.len()) {
        med_rlvr::tokenizer::check_context(
            model_config.max_position_embeddings,
            p.len() + t.len(),
            &format!("the longest example of {}", a.data.display()),
        )?;
    }
    let outs: Vec<PathBuf> =
        a.lr.iter()
            .map(|lr| match a.lr.len() {
                1 => a.out.clone(),
                _ => a.out.join(format!("lr-{lr:e}")),
            })
            .collect();
    for out in &outs {
        for f in ["final", "final_adapter", "metrics.jsonl"] {
            med_rlvr::paths::refuse_overlap(
                "--out",
                &out.join(f),
                &[("--model", a.model.as_path()), ("--data", a.data.as_path())],
            )?;
        }
    }
    let steps_per_epoch = pairs.len().div_ceil(a.batch.max(1));
    for (&lr, out) in a.lr.iter().zip(outs) {
        let model = load_weights::<B>(&a.model, &model_config, device)?;
        let lora = (a.lora_rank > 0).then(|| qwen2_burn::LoraSpec {
            rank: a.lora_rank,
            alpha: a.lora_alpha,
            targets: qwen2_burn::PROJECTIONS.map(String::from).to_vec(),
        });
        let model = match &lora {
            Some(spec) => model.with_lora(spec, a.seed, device),
            None => model,
        };
        std::fs::create_dir_all(&out)
            .with_context(|| format!("{}: cannot create", out.display()))?;
        let metrics_path = out.join("metrics.jsonl");
        let mut metrics = std::io::BufWriter::new(
            std::fs::File::create(&metrics_path)
                .with_context(|| format!("{}: cannot create", metrics_path.display()))?,
        );
        let cfg = SftConfig {
            epochs: a.epochs,
            batch: a.batch,
            lr,
            optim: Default::default(),
            seed: a.seed,
            logprob_chunk: 64,
            group_by_length: a.group_by_length,
        };
        let mut io_err = None;
        let (trained, hist) = s::train(model, &pairs, &cfg, device, |st| {
            if let Err(e) = writeln!(metrics, "{}", serde_json::to_string(st).unwrap_or_default()) {
                io_err.get_or_insert(e);
            }
            if (st.step + 1) % steps_per_epoch == 0 {
                eprintln!("lr {lr:e} epoch {} loss {:.4}", st.epoch + 1, st.loss);
            }
        })?;
        if let Some(e) = io_err {
            return Err(e).with_context(|| format!("{}: cannot write", metrics_path.display()));
        }
        metrics
            .flush()
            .with_context(|| format!("{}: cannot write", metrics_path.display()))?;
        let dir = out.join("final");
        if let Some(spec) = &lora {
            qwen2_burn::save_lora(&trained, spec, Some(&base_spec), &out.join("final_adapter"))?;
        }
        qwen2_burn::save_qwen2(
            &trained.valid().merge_lora(),
            &model_config,
            &dir,
            qwen2_burn::SaveDtype::F32,
            5 << 30,
        )?;
        med_rlvr::checkpoint::copy_tokenizer_files(&a.model, &dir)?;
        eprintln!(
            "lr {lr:e}: {} steps, final loss {:.4}, model in {}",
            hist.len(),
            hist.last().map_or(f64::NAN, |h| h.loss),
            dir.display()
        );
    }
    Ok(())
}
