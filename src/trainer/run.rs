//! The run around the steps: the run folder and its logs (metrics.jsonl, samples.jsonl,
//! config.toml), resume, periodic checkpoints, held-out evaluations, the progress bar, the NaN/Inf
//! guard, a clean stop on a signal, the final model, and one thread per data-parallel replica.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;

use qwen2_burn::save_lora;

use super::{Faults, RewardFailed, StepMetrics, Trainer};
use crate::checkpoint as ckpt;
use crate::config::TrainConfig;
use crate::parallel::{device_count, nth_device, World};

/// How [`run`] starts and stops.
#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    pub quiet: bool,
    /// Continue from this checkpoint folder (see `checkpoint::resolve`).
    pub resume: Option<PathBuf>,
    /// Set (e.g. by a SIGINT/SIGTERM handler) to finish the current step, write a checkpoint and
    /// return.
    pub stop: Option<Arc<AtomicBool>>,
    /// Faults planned by the tests (see [`Faults`]).
    pub faults: Faults,
    /// Data-parallel replicas, one per device (0 or 1: one device).
    pub devices: usize,
    /// This process is replica `world.rank` of a job of `world.size` processes (`train --mpi`,
    /// after `parallel::mpi::init`); `devices` must then be 0 or 1.
    pub world: Option<World>,
}

/// What a run did.
#[derive(Debug)]
pub struct RunOutcome {
    /// Metrics of the steps run in this process.
    pub metrics: Vec<StepMetrics>,
    /// The checkpoint written on an interrupt; `None` when the run finished.
    pub interrupted: Option<PathBuf>,
}

/// Keeps the lines of a jsonl file whose `step` is below `step` (a resumed run rewrites what a
/// crashed one wrote after its last checkpoint), by rewrite and rename.
fn truncate_jsonl(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| (s as usize) < step)
        })
        .collect();
    let tmp = path.with_extension("jsonl.tmp");
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    std::fs::write(&tmp, body).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot replace", path.display()))?;
    Ok(())
}

fn open_log(path: &Path, append: bool) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(append)
        .write(true)
        .truncate(!append)
        .open(path)
        .with_context(|| format!("{}: cannot open", path.display()))
}

/// Each of `devices` replicas takes an equal share of a step's prompts.
pub(super) fn check_shardable(cfg: &TrainConfig, devices: usize) -> Result<()> {
    let n = cfg.rollout.prompts_per_step;
    if !n.is_multiple_of(devices) {
        let what = match cfg!(feature = "mpi") {
            true => "data-parallel replicas (devices or MPI ranks)",
            false => "devices",
        };
        bail!(
            "rollout.prompts_per_step ({n}) must be a multiple of the number of {what} ({devices})"
        );
    }
    Ok(())
}

/// The whole run: metrics.jsonl, samples.jsonl, a progress bar, held-out evaluations, periodic
/// checkpoints (`train.save_every`), resume, the NaN/Inf guard (`train.max_bad_steps`), a clean
/// stop on `opts.stop`, and the final actor in `OUT/final`. With `opts.devices > 1`, one replica
/// per device (device `i` of `device`'s kind; on the CPU backends they share the CPU), each on
/// its own thread; replica 0 logs, evaluates and writes checkpoints (see `parallel.rs`). With
/// `opts.world`, this process is one replica of a multi-process job (MPI), on device
/// `world.local_rank()` of `device`'s kind; rank 0 logs, evaluates and writes checkpoints.
pub fn run<B: AutodiffBackend>(
    cfg: TrainConfig,
    out: &Path,
    device: B::Device,
    opts: &RunOptions,
) -> Result<RunOutcome> {
    let write_config = |cfg: &TrainConfig| -> Result<()> {
        std::fs::create_dir_all(out)
            .with_context(|| format!("{}: cannot create", out.display()))?;
        let path = out.join("config.toml");
        std::fs::write(&path, toml::to_string_pretty(cfg)?)
            .with_context(|| format!("{}: cannot write", path.display()))
    };
    if let Some(world) = opts.world {
        one_device_per_rank(opts.devices)?;
        check_shardable(&cfg, world.size)?;
        let local = world.local_rank();
        if let Some(found) = device_count::<B>(&device).filter(|&found| local >= found) {
            bail!(
                "--mpi: this node runs {} or more ranks but has {found} device(s) of this \
                 backend's kind; launch at most {found} ranks per node",
                local + 1
            );
        }
        let trainer = Trainer::<B>::replica(cfg, nth_device(&device, local), world)?;
        if world.is_main() {
            write_config(&trainer.cfg)?;
        }
        let quiet = opts.quiet || !world.is_main();
        let started = std::time::Instant::now();
        let outcome = drive(
            trainer,
            out,
            &RunOptions {
                quiet,
                ..opts.clone()
            },
        )?;
        #[cfg(feature = "mpi")]
        if let (true, Some(m)) = (world.is_main(), crate::parallel::mpi::active()) {
            eprintln!("{}", m.summary(outcome.metrics.len(), started.elapsed()));
        }
        #[cfg(not(feature = "mpi"))]
        let _ = started;
        return Ok(outcome);
    }
    let size = opts.devices.max(1);
    check_shardable(&cfg, size)?;
    if size == 1 {
        // Built (inputs checked, weights loaded) before anything is written into the run folder.
        let trainer = Trainer::<B>::new(cfg, device)?;
        write_config(&trainer.cfg)?;
        return drive(trainer, out, opts);
    }
    write_config(&cfg)?;
    // GPUs must exist; the CPU backends have one device, which the replicas share.
    if let Some(found) = device_count::<B>(&device).filter(|&found| size > found) {
        bail!("--devices {size}: only {found} device(s) of this backend's kind were found");
    }
    let mut workers = Vec::with_capacity(size - 1);
    for rank in 1..size {
        let (cfg, device) = (cfg.clone(), nth_device(&device, rank));
        let (out, opts) = (
            out.to_path_buf(),
            RunOptions {
                stop: None,
                quiet: true,
                ..opts.clone()
            },
        );
        let body = move || -> Result<()> {
            let world = World::join::<B::InnerBackend>(rank, size, &device)?;
            drive(Trainer::<B>::replica(cfg, device, world)?, &out, &opts)?;
            world.leave::<B::InnerBackend>()
        };
        // A replica that fails leaves the others waiting in a collective: end the process.
        workers.push(
            std::thread::Builder::new()
                .name(format!("replica-{rank}"))
                .spawn(move || {
                    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            eprintln!("error on data-parallel replica {rank}: {e:#}");
                            std::process::exit(1);
                        }
                        Err(_) => {
                            eprintln!("data-parallel replica {rank} panicked");
                            std::process::exit(101);
                        }
                    }
                })?,
        );
    }
    let device = nth_device(&device, 0);
    let world = World::join::<B::InnerBackend>(0, size, &device)?;
    let outcome = drive(Trainer::<B>::replica(cfg, device, world)?, out, opts)?;
    world.leave::<B::InnerBackend>()?;
    for w in workers {
        w.join()
            .map_err(|_| anyhow::anyhow!("a data-parallel replica thread panicked"))?;
    }
    Ok(outcome)
}

/// One replica's loop; only the main replica writes files and evaluates.
fn drive<B: AutodiffBackend>(
    mut trainer: Trainer<B>,
    out: &Path,
    opts: &RunOptions,
) -> Result<RunOutcome> {
    let main = trainer.world.is_main();
    if main && !opts.quiet {
        eprint!("{}", trainer.plan.render());
    }
    trainer.faults = opts.faults.clone();
    let (metrics_path, samples_path) = (out.join("metrics.jsonl"), out.join("samples.jsonl"));
    if let Some(dir) = &opts.resume {
        trainer.load_checkpoint(dir)?;
        if main {
            truncate_jsonl(&metrics_path, trainer.step)?;
            truncate_jsonl(&samples_path, trainer.step)?;
            eprintln!("resumed from {} at step {}", dir.display(), trainer.step);
        }
    }
    let resumed = opts.resume.is_some();
    let mut logs = match main {
        true => Some((
            open_log(&metrics_path, resumed)?,
            open_log(&samples_path, resumed)?,
        )),
        false => None,
    };
    let bar = if opts.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(trainer.total_steps as u64)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .expect("template")
            .progress_chars("=> "),
    );
    bar.set_position(trainer.step as u64);
    let tc = trainer.cfg.train.clone();
    let has_eval = main && tc.eval_every > 0 && !trainer.eval_items.is_empty();
    let mut all = Vec::new();
    let mut last_eval = if has_eval && trainer.step == 0 {
        Some(trainer.evaluate()?)
    } else {
        None
    };
    if let Some((a, f)) = last_eval {
        bar.println(format!(
            "step 0 held-out: accuracy {a:.3}, format rate {f:.3}"
        ));
    }
    while trainer.step < trainer.total_steps {
        let s = trainer.step;
        let (mut m, shown) = match trainer.step() {
            Ok(x) => x,
            Err(e) if main && e.is::<RewardFailed>() => {
                bar.abandon();
                let ck = trainer.save_checkpoint(out)?;
                return Err(crate::exit::RunFailed(format!(
                    "{e:#}; stopped before step {s} with a checkpoint at {}: fix the reward \
                     program, then `train --resume {}`",
                    ck.display(),
                    ck.display()
                ))
                .into());
            }
            Err(e) => return Err(e),
        };
        if has_eval && ((s + 1).is_multiple_of(tc.eval_every) || s + 1 == trainer.total_steps) {
            let (a, f) = trainer.evaluate()?;
            m.eval_accuracy = Some(a);
            m.eval_format_rate = Some(f);
            last_eval = Some((a, f));
        }
        if s == 0 {
            if let Some((a, f)) = last_eval {
                // Record the starting point too (before any update).
                m.eval_accuracy.get_or_insert(a);
                m.eval_format_rate.get_or_insert(f);
            }
        }
        if let Some((metrics_file, samples_file)) = &mut logs {
            writeln!(metrics_file, "{}", serde_json::to_string(&m)?)
                .with_context(|| format!("{}: cannot write", metrics_path.display()))?;
            for line in shown {
                writeln!(samples_file, "{line}")
                    .with_context(|| format!("{}: cannot write", samples_path.display()))?;
            }
        }
        if let Some(why) = &m.skipped {
            bar.println(format!("step {s}: update skipped ({why})"));
        }
        bar.set_message(format!(
            "reward {:+.3} fmt {:.2} acc {:.2} kl {:.4} len {:.0}{}",
            m.reward_mean,
            m.format_rate,
            m.accuracy,
            m.kl,
            m.response_len_mean,
            last_eval
                .map(|(a, f)| format!(" | held-out acc {a:.2} fmt {f:.2}"))
                .unwrap_or_default()
        ));
        bar.inc(1);
        all.push(m);
        // The fault streak is the same on every replica (faults are agreed on in `step`).
        if trainer.bad_streak >= tc.max_bad_steps.max(1) {
            if !main {
                return Ok(RunOutcome {
                    metrics: all,
                    interrupted: None,
                });
            }
            bar.abandon();
            let ck = trainer.save_checkpoint(out)?;
            return Err(crate::exit::RunFailed(format!(
                "{} consecutive steps had NaN/Inf (see `skipped` in {}); stopped with a checkpoint \
                 at {}: lower optim.actor_lr / optim.grad_clip or check the data, then \
                 `train --resume {}`",
                trainer.bad_streak,
                metrics_path.display(),
                ck.display(),
                ck.display()
            ))
            .into());
        }
        let done = trainer.step == trainer.total_steps;
        if main && tc.save_every > 0 && (trainer.step.is_multiple_of(tc.save_every) || done) {
            trainer.save_checkpoint(out)?;
        }
        // The main replica's stop request, agreed on by all.
        let stop = trainer.agree(opts.stop.as_ref().is_some_and(|f| f.load(Ordering::SeqCst)))?;
        if !done && stop {
            bar.abandon();
            let ck = match main {
                true => Some(trainer.save_checkpoint(out)?),
                false => None,
            };
            return Ok(RunOutcome {
                metrics: all,
                interrupted: ck,
            });
        }
    }
    bar.finish();
    if main {
        trainer.save_actor(&out.join("final"))?;
        if let Some(spec) = trainer.cfg.lora.spec() {
            save_lora(
                &trainer.actor,
                &spec,
                Some(&trainer.cfg.model.path),
                &out.join("final_adapter"),
            )?;
        }
    }
    Ok(RunOutcome {
        metrics: all,
        interrupted: None,
    })
}

/// `--devices` with `--mpi` is refused: each MPI rank drives one device, the one its rank on the
/// node picks.
pub fn one_device_per_rank(devices: usize) -> Result<()> {
    if devices > 1 {
        bail!(
            "--mpi with --devices {devices}: each MPI rank drives one device (its rank on the \
             node picks it); launch {devices} ranks per node instead"
        );
    }
    Ok(())
}

/// A fresh run folder in `runs` (`train` uses `runs/` of the working folder) named by time
/// (`train-<unix seconds>`, then `-2`, `-3`, … when a run started in the same second has it),
/// created here so no other run can take it.
pub fn default_out_dir(runs: &Path) -> Result<PathBuf> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    std::fs::create_dir_all(runs).with_context(|| format!("{}: cannot create", runs.display()))?;
    for k in 1.. {
        let name = match k {
            1 => format!("train-{secs}"),
            k => format!("train-{secs}-{k}"),
        };
        let dir = runs.join(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("{}: cannot create", dir.display())),
        }
    }
    unreachable!("an unbounded range ends only by returning")
}

/// What a run writes into its folder; `--overwrite` removes exactly these.
const RUN_ENTRIES: &[&str] = &[
    "config.toml",
    "metrics.jsonl",
    "metrics.jsonl.tmp",
    "samples.jsonl",
    "samples.jsonl.tmp",
    "checkpoints",
    "final",
    "final_adapter",
    "training.png",
    "training.svg",
];

/// The folder a run writes to. Fresh runs: `out` when it is missing or empty (never inside
/// the run's `inputs`), else refused — unless `overwrite`, which removes a previous run's files
/// (and refuses a folder holding anything else, or the run's own inputs). Resumed runs: the
/// checkpoint's own run folder, or an empty one. No `out`: the checkpoint's run, or a new
/// [`default_out_dir`].
pub fn run_folder(
    out: Option<&Path>,
    resume: Option<&Path>,
    overwrite: bool,
    inputs: &[(&str, &Path)],
) -> Result<PathBuf> {
    let entries = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect()
    };
    let Some(out) = out else {
        return match resume.and_then(ckpt::run_of) {
            Some(run) => Ok(run),
            None => default_out_dir(Path::new("runs")),
        };
    };
    if out.exists() && !out.is_dir() {
        bail!("--out {}: is a file, not a folder", out.display());
    }
    let fresh = entries(out).is_empty();
    if let Some(ck) = resume {
        let own = ckpt::run_of(ck).map(|r| crate::paths::absolute(&r))
            == Some(crate::paths::absolute(out));
        if own || fresh {
            return Ok(out.to_path_buf());
        }
        bail!(
            "--out {}: holds another run's files, and checkpoint {} belongs to {}: resume into \
             that run (leave out --out) or into an empty folder",
            out.display(),
            ck.display(),
            ckpt::run_of(ck).unwrap_or_default().display()
        );
    }
    crate::paths::refuse_overlap("--out", out, inputs)?;
    if fresh {
        return Ok(out.to_path_buf());
    }
    if !overwrite {
        bail!(
            "--out {}: already exists and is not empty; a new run there would overwrite or mix \
             with what it holds. Continue that run with `--resume latest --out {}`, choose \
             another folder, or pass --overwrite to replace it",
            out.display(),
            out.display()
        );
    }
    let foreign: Vec<String> = entries(out)
        .into_iter()
        .filter(|e| !RUN_ENTRIES.contains(&e.as_str()))
        .collect();
    if !foreign.is_empty() {
        bail!(
            "--out {} --overwrite: the folder holds {} that a run does not write; not a run \
             folder, so nothing was removed: choose another folder",
            out.display(),
            foreign.join(", ")
        );
    }
    for name in RUN_ENTRIES {
        let p = out.join(name);
        let removed = match p.is_dir() {
            true => std::fs::remove_dir_all(&p),
            false if p.exists() => std::fs::remove_file(&p),
            false => Ok(()),
        };
        removed.with_context(|| format!("{}: cannot remove (--overwrite)", p.display()))?;
    }
    eprintln!("--overwrite: removed the previous run in {}", out.display());
    Ok(out.to_path_buf())
}
