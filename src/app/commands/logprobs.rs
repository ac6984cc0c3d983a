//! `med-rlvr logprobs`: teacher-forced log-probabilities of a continuation.

use std::io::Write;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use serde_json::json;

use crate::app::cli::LogprobsArgs;

pub(crate) fn run<B: Backend>(mut a: LogprobsArgs, device: &B::Device) -> Result<()> {
    crate::app::demo::announce_default("model", &a.model);
    a.model = med_rlvr::hub::model_dir(&a.model)?;
    let (config, model, tok) = med_rlvr::model_folder::load::<B>(&a.model, device)?;
    let p = tok.encode(&a.prompt)?;
    let c = tok.encode(&a.continuation)?;
    if p.is_empty() {
        bail!("--prompt tokenizes to no tokens: the first continuation token needs a context");
    }
    med_rlvr::tokenizer::check_context(
        config.max_position_embeddings,
        p.len() + c.len(),
        &format!(
            "--prompt ({} tokens) and --continuation ({})",
            p.len(),
            c.len()
        ),
    )?;
    let lps = med_rlvr::model_folder::continuation_logprobs(&model, &p, &c, device);
    if let Some(j) = lps.iter().position(|x| !x.is_finite()) {
        bail!(
            "the model computed a non-finite log-prob ({}) for continuation token {j}: its \
             weights in {} hold NaN/Inf or overflow",
            lps[j],
            a.model.display()
        );
    }
    if a.json {
        outln!(
            "{}",
            json!({"prompt_ids": p, "continuation_ids": c, "continuation_logprobs": lps})
        );
    } else {
        for (id, lp) in c.iter().zip(&lps) {
            outln!("{id}\t{lp:.6}\t{:?}", tok.decode_raw(&[*id]));
        }
        outln!("sum\t{:.6}", lps.iter().map(|&x| x as f64).sum::<f64>());
    }
    Ok(())
}
