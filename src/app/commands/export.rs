//! `med-rlvr export`: a checkpoint's or run's policy as a Hugging Face folder (adapters merged).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;

use crate::app::cli::ExportArgs;

/// The base model recorded in an adapter's `adapter_config.json`: a local folder or a hub id.
fn adapter_base(adapter: &Path) -> Result<PathBuf> {
    match qwen2_burn::lora::read_adapter_config(adapter)?
        .base_model_name_or_path
        .map(PathBuf::from)
    {
        Some(b) if b.join("config.json").is_file() => Ok(b),
        Some(b) if med_rlvr::hub::is_remote(&b) => med_rlvr::hub::model_dir(&b),
        _ => bail!(
            "{}: base_model_name_or_path is neither a local model folder nor a hub id; pass \
             --base DIR",
            adapter.join("adapter_config.json").display()
        ),
    }
}

pub(crate) fn run<B: Backend>(a: ExportArgs, device: &B::Device) -> Result<()> {
    use qwen2_burn::SaveDtype;
    let dtype = match a.dtype.as_str() {
        "f32" => SaveDtype::F32,
        "bf16" => SaveDtype::Bf16,
        "f16" => SaveDtype::F16,
        other => bail!("--dtype {other}: expected f32, bf16 or f16"),
    };
    let src = &a.checkpoint;
    let actor = if src.join("config.json").is_file() || src.join("adapter_config.json").is_file() {
        src.clone()
    } else if src.join("state.json").is_file() || src.join("checkpoints").is_dir() {
        med_rlvr::checkpoint::resolve(src, None)?.join("actor")
    } else if src.join("final").join("config.json").is_file() {
        src.join("final")
    } else {
        bail!(
            "{}: not a checkpoint (state.json), a run folder (checkpoints/ or final/), a model \
             folder (config.json) or an adapter folder (adapter_config.json)",
            src.display()
        );
    };
    let base = match actor.join("adapter_config.json").is_file() {
        true => Some(match &a.base {
            Some(b) => med_rlvr::hub::model_dir(b)?,
            None => adapter_base(&actor)?,
        }),
        false => None,
    };
    let mut inputs = vec![
        ("checkpoint", src.as_path()),
        ("model folder", actor.as_path()),
    ];
    if let Some(b) = &base {
        inputs.push(("base model", b.as_path()));
    }
    med_rlvr::paths::refuse_overlap("--out", &a.out, &inputs)?;
    let (config, model, tok) = if let Some(base) = &base {
        // LoRA: merge the adapters into their base (--base, else the path recorded at training).
        let (config, model, tok) = med_rlvr::model_folder::load::<B>(base, device)?;
        let (model, _) = qwen2_burn::load_lora(model, &actor, device)?;
        (config, model.merge_lora(), tok)
    } else {
        med_rlvr::model_folder::load::<B>(&actor, device)?
    };
    qwen2_burn::save_qwen2(&model, &config, &a.out, dtype, 5 << 30)?;
    let tok_dir = tok
        .path()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    med_rlvr::checkpoint::copy_tokenizer_files(&tok_dir, &a.out)?;
    outln!("{}", a.out.display());
    Ok(())
}
