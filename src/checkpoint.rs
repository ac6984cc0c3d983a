//! Checkpoint files: atomic folders, the `latest` pointer, keep-last-N, optimizer state keyed by
//! parameter name, and the config check on resume. What goes *into* a checkpoint is the trainer's
//! business (`Trainer::save_checkpoint`); this file only knows how to write and find them.
//!
//! Layout of `RUN/checkpoints/step-000010/` (10 = steps completed):
//! `actor/` (Hugging Face folder, f32), `critic/` (backbone HF folder + `value_head.safetensors`,
//! PPO only), `optimizer/actor.mpk`, `optimizer/critic.mpk` (Burn records, f32, keyed by parameter
//! path), `config.toml` (the resolved config), `state.json` (step, epoch, data cursor, optimizer
//! step, KL coefficient, bad-step streak; written last). A folder is written as `.tmp-step-…`,
//! every file fsynced, then renamed; `checkpoints/latest` names the newest complete one and is
//! itself replaced by rename. A crash at any point leaves the previous checkpoint as `latest`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Record, Recorder};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;

/// Bumped when the layout changes; older checkpoints are refused with a message.
pub const FORMAT_VERSION: u32 = 1;

/// The trainer's loop state. All randomness is a pure function of `(seed, step, epoch)` — the
/// sampler's per-row streams, the epoch shuffle and the PPO mini-batch shuffle — so these
/// counters *are* the RNG state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    pub format_version: u32,
    /// Steps completed.
    pub step: usize,
    pub epoch: usize,
    /// Position in the epoch's shuffled order.
    pub cursor: usize,
    pub opt_step: usize,
    pub kl_coef: f64,
    pub bad_streak: usize,
    pub seed: u64,
    pub rng: String,
}

/// `step-000010`.
pub fn folder_name(step: usize) -> String {
    format!("step-{step:06}")
}

/// Dotted module path (`layers.0.self_attn.q_proj.weight`) of every float parameter.
pub fn param_names<B: Backend, M: Module<B>>(module: &M) -> HashMap<ParamId, String> {
    struct Names {
        path: Vec<String>,
        out: HashMap<ParamId, String>,
    }
    impl<B: Backend> ModuleVisitor<B> for Names {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.out.insert(param.id, self.path.join("."));
        }
    }
    let mut v = Names {
        path: vec![],
        out: HashMap::new(),
    };
    module.visit(&mut v);
    v.out
}

/// A parameter id that depends only on the name (FNV-1a), so a record saved from one process
/// can be matched to the parameters of a model loaded in another.
fn stable_id(name: &str) -> ParamId {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    ParamId::from(h)
}

/// Re-keys an optimizer record from `module`'s live parameter ids to name-derived ids.
pub fn to_stable_keys<T, M: FromIterator<(ParamId, T)>>(
    record: impl IntoIterator<Item = (ParamId, T)>,
    names: &HashMap<ParamId, String>,
) -> Result<M> {
    record
        .into_iter()
        .map(|(id, v)| {
            let name = names
                .get(&id)
                .ok_or_else(|| anyhow!("optimizer state for a parameter the model lacks ({id})"))?;
            Ok((stable_id(name), v))
        })
        .collect()
}

/// The inverse of [`to_stable_keys`] for a freshly loaded module.
pub fn from_stable_keys<T, M: FromIterator<(ParamId, T)>>(
    record: impl IntoIterator<Item = (ParamId, T)>,
    names: &HashMap<ParamId, String>,
    file: &Path,
) -> Result<M> {
    let back: HashMap<ParamId, ParamId> = names.iter().map(|(id, n)| (stable_id(n), *id)).collect();
    record
        .into_iter()
        .map(|(k, v)| {
            back.get(&k).map(|id| (*id, v)).ok_or_else(|| {
                anyhow!(
                    "{}: optimizer state for a parameter the model lacks",
                    file.display()
                )
            })
        })
        .collect()
}

fn recorder() -> NamedMpkFileRecorder<FullPrecisionSettings> {
    NamedMpkFileRecorder::new()
}

/// Writes a Burn record to `path` (`.mpk` is the extension).
pub fn save_record<B: Backend, R: Record<B>>(record: R, path: &Path) -> Result<()> {
    Recorder::<B>::record(&recorder(), record, path.with_extension(""))
        .map_err(|e| anyhow!("{}: cannot write: {e}", path.display()))
}

/// Reads a Burn record written by [`save_record`].
pub fn load_record<B: Backend, R: Record<B>>(path: &Path, device: &B::Device) -> Result<R> {
    if !path.is_file() {
        bail!("{}: missing", path.display());
    }
    // Burn's own message speaks of record formats and versions; the cause is the file.
    Recorder::<B>::load(&recorder(), path.with_extension(""), device).map_err(|_| {
        anyhow!(
            "{}: optimizer state unreadable (truncated or corrupt); resume from an earlier \
             checkpoint of the run",
            path.display()
        )
    })
}

fn fsync_tree(dir: &Path) -> Result<()> {
    for entry in
        std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))?
    {
        let p = entry?.path();
        if p.is_dir() {
            fsync_tree(&p)?;
        } else {
            std::fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("{}: cannot fsync", p.display()))?;
        }
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("{}: cannot fsync", dir.display()))
}

/// Writes a checkpoint for `step` under `run/checkpoints/` atomically: `fill` writes into a fresh
/// temporary folder, which is fsynced and renamed; then `latest` is updated and all but the
/// newest `keep` checkpoints are removed. Returns the final folder.
///
/// In a build with the `fault-injection` feature (the tests'), `MEDRLVR_CHECKPOINT_PAUSE_MS`
/// sleeps after `fill`, before the rename, so a test can kill the process mid-write.
pub fn write_atomic(
    run: &Path,
    step: usize,
    keep: usize,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let root = run.join("checkpoints");
    std::fs::create_dir_all(&root).with_context(|| format!("{}: cannot create", root.display()))?;
    let name = folder_name(step);
    let tmp = root.join(format!(".tmp-{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("{}: cannot remove stale folder", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    fill(&tmp)?;
    #[cfg(feature = "fault-injection")]
    if let Some(ms) = std::env::var("MEDRLVR_CHECKPOINT_PAUSE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    if !tmp.join("state.json").is_file() {
        bail!("{}: checkpoint incomplete (no state.json)", tmp.display());
    }
    fsync_tree(&tmp)?;
    let dst = root.join(&name);
    if dst.exists() {
        std::fs::remove_dir_all(&dst)
            .with_context(|| format!("{}: cannot replace", dst.display()))?;
    }
    std::fs::rename(&tmp, &dst).with_context(|| format!("{}: cannot rename", tmp.display()))?;
    let latest_tmp = root.join(".latest.tmp");
    std::fs::write(&latest_tmp, format!("{name}\n"))
        .and_then(|_| std::fs::File::open(&latest_tmp)?.sync_all())
        .with_context(|| format!("{}: cannot write", latest_tmp.display()))?;
    std::fs::rename(&latest_tmp, root.join("latest"))
        .with_context(|| format!("{}: cannot update", root.join("latest").display()))?;
    sync_dir(&root)?;
    let mut all = complete_checkpoints(&root);
    all.retain(|(_, p)| p != &dst);
    let excess = all.len().saturating_sub(keep.saturating_sub(1));
    for (_, p) in all.into_iter().take(excess) {
        let _ = std::fs::remove_dir_all(p);
    }
    Ok(dst)
}

/// Complete checkpoints (`step-*` folders with a `state.json`) under `root`, oldest first.
/// A checkpoint holding what a resume reads first: its loop state, config and actor.
fn is_complete(dir: &Path) -> bool {
    dir.join("state.json").is_file()
        && dir.join("config.toml").is_file()
        && dir.join("actor").is_dir()
}

fn complete_checkpoints(root: &Path) -> Vec<(usize, PathBuf)> {
    let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            let p = e.path();
            is_complete(&p).then_some((step, p))
        })
        .collect();
    v.sort();
    v
}

/// The checkpoint folder meant by `spec`: `latest` (in `run`), a run folder (its latest), or a
/// checkpoint folder.
pub fn resolve(spec: &Path, run: Option<&Path>) -> Result<PathBuf> {
    let run_dir = if spec == Path::new("latest") {
        run.ok_or_else(|| anyhow!("--resume latest needs --out RUN_FOLDER"))?
            .to_path_buf()
    } else if spec.join("state.json").is_file() {
        return Ok(spec.to_path_buf());
    } else if spec.join("checkpoints").is_dir() {
        spec.to_path_buf()
    } else if spec.is_dir() {
        bail!(
            "{}: not a checkpoint (no state.json) and not a run folder (no checkpoints/)",
            spec.display()
        );
    } else {
        bail!("{}: no such checkpoint", spec.display());
    };
    let root = run_dir.join("checkpoints");
    if let Ok(name) = std::fs::read_to_string(root.join("latest")) {
        let p = root.join(name.trim());
        if is_complete(&p) {
            return Ok(p);
        }
    }
    complete_checkpoints(&root)
        .pop()
        .map(|(_, p)| p)
        .ok_or_else(|| anyhow!("{}: no complete checkpoint", root.display()))
}

/// The run folder a checkpoint belongs to (`RUN/checkpoints/step-…` → `RUN`).
pub fn run_of(checkpoint: &Path) -> Option<PathBuf> {
    Some(checkpoint.parent()?.parent()?.to_path_buf())
}

pub fn read_state(dir: &Path) -> Result<LoopState> {
    let p = dir.join("state.json");
    let text = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "{}: missing or unreadable (not a complete checkpoint)",
            p.display()
        )
    })?;
    let s: LoopState =
        serde_json::from_str(&text).with_context(|| format!("{}: malformed", p.display()))?;
    if s.format_version != FORMAT_VERSION {
        bail!(
            "{}: checkpoint format {} (this build reads {FORMAT_VERSION})",
            p.display(),
            s.format_version
        );
    }
    Ok(s)
}

pub fn write_state(dir: &Path, s: &LoopState) -> Result<()> {
    let p = dir.join("state.json");
    // JSON has no NaN: a non-finite β would be written as null and the resume could not read it.
    if !s.kl_coef.is_finite() {
        bail!(
            "{}: kl_coef is {}; refusing to write a state no resume can read",
            p.display(),
            s.kl_coef
        );
    }
    std::fs::write(&p, serde_json::to_string_pretty(s)?)
        .with_context(|| format!("{}: cannot write", p.display()))
}

/// The resolved config a checkpoint was written with, plus `key=value` overrides. Its paths are
/// already resolved, so they are read against an empty base.
pub fn read_config(dir: &Path, overrides: &[String]) -> Result<TrainConfig> {
    let p = dir.join("config.toml");
    let text = std::fs::read_to_string(&p)
        .with_context(|| format!("{}: missing (not a complete checkpoint)", p.display()))?;
    TrainConfig::from_toml(&text, &p.display().to_string(), overrides, Path::new(""))
}

/// Config keys that may change on resume without changing the math.
const NON_MATH_KEYS: &[&str] = &[
    "train.eval_every",
    "train.samples_per_step",
    "train.save_every",
    "train.keep_checkpoints",
    "train.max_bad_steps",
    "data.eval",
    "data.eval_limit",
];

fn flatten(prefix: &str, v: &toml::Value, out: &mut Vec<(String, String)>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

/// The keys (with both values) where `now` differs from `saved` in a way that changes the math.
pub fn math_diff(saved: &TrainConfig, now: &TrainConfig) -> Result<Vec<String>> {
    let flat = |c: &TrainConfig| -> Result<HashMap<String, String>> {
        let mut v = vec![];
        flatten("", &toml::Value::try_from(c)?, &mut v);
        Ok(v.into_iter().collect())
    };
    let (a, b) = (flat(saved)?, flat(now)?);
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    Ok(keys
        .into_iter()
        .filter(|k| !NON_MATH_KEYS.contains(&k.as_str()))
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            format!(
                "{k}: checkpoint {} vs now {}",
                a.get(k).map(String::as_str).unwrap_or("(unset)"),
                b.get(k).map(String::as_str).unwrap_or("(unset)")
            )
        })
        .collect())
}

/// Copies the tokenizer files of a model folder (tokenizer.json and its companions).
pub fn copy_tokenizer_files(src: &Path, dst: &Path) -> Result<()> {
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "generation_config.json",
    ] {
        let p = src.join(name);
        if p.is_file() {
            std::fs::copy(&p, dst.join(name))
                .with_context(|| format!("{}: cannot copy to {}", p.display(), dst.display()))?;
        }
    }
    Ok(())
}
