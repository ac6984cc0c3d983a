//! `med-rlvr train`: a training run (`med_rlvr::trainer::run`), new or resumed; with `--mpi`, one
//! rank of a job across processes (`med_rlvr::parallel::mpi`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use med_rlvr::parallel::World;

use crate::app::cli::TrainArgs;

/// With `--mpi`: joins the MPI job (this process's rank); `None` without.
fn join_mpi(a: &TrainArgs) -> Result<Option<World>> {
    if !a.mpi {
        return Ok(None);
    }
    // Refused before MPI starts, so that the message is not one per rank.
    med_rlvr::trainer::one_device_per_rank(a.devices)?;
    #[cfg(not(feature = "mpi"))]
    bail!(
        "--mpi: this binary was built without MPI; build it with `cargo build --release \
         --features mpi` (needs Open MPI or MPICH, and libclang)"
    );
    #[cfg(feature = "mpi")]
    {
        let timeout =
            (a.mpi_timeout > 0.0).then(|| std::time::Duration::from_secs_f64(a.mpi_timeout));
        let world = med_rlvr::parallel::mpi::init(timeout)?;
        if world.size == 1 {
            eprintln!(
                "--mpi: a job of one process (launch N with `mpirun -n N med-rlvr train --mpi ...`)"
            );
        }
        Ok(Some(world))
    }
}

/// `f` on rank 0, its path sent to every rank (so that all use rank 0's run folder and
/// checkpoint); `f` itself in one process.
fn from_main(
    world: Option<World>,
    f: impl FnOnce() -> Result<Option<PathBuf>>,
) -> Result<Option<PathBuf>> {
    match world {
        #[cfg(feature = "mpi")]
        Some(w) if w.size > 1 => {
            use std::os::unix::ffi::{OsStrExt, OsStringExt};
            let mpi = med_rlvr::parallel::mpi::active().context("MPI is not initialised")?;
            // [0]: none; [1, bytes...]: a path.
            let mine = match w.is_main() {
                true => match f()? {
                    Some(p) => [&[1u8][..], p.as_os_str().as_bytes()].concat(),
                    None => vec![0],
                },
                false => vec![],
            };
            let got = mpi.share(&mine);
            Ok((got.first() == Some(&1))
                .then(|| PathBuf::from(std::ffi::OsString::from_vec(got[1..].to_vec()))))
        }
        _ => f(),
    }
}

pub(crate) fn run<B: AutodiffBackend>(a: TrainArgs, device: B::Device) -> Result<()> {
    use med_rlvr::checkpoint;
    use med_rlvr::config::TrainConfig;
    use std::sync::atomic::{AtomicBool, Ordering};
    let world = join_mpi(&a)?;
    // Rank 0 speaks for the job; the others only report their own errors.
    let main = world.is_none_or(|w| w.is_main());
    let resume = from_main(world, || {
        a.resume
            .as_ref()
            .map(|r| checkpoint::resolve(r, a.out.as_deref()))
            .transpose()
    })?;
    let mut cfg = match (&a.config, &resume) {
        (None, Some(ck)) => checkpoint::read_config(ck, &a.set)?,
        _ => TrainConfig::load(a.config.as_deref(), &a.set)?,
    };
    if let Some(m) = a.model {
        cfg.model.path = m;
    }
    if let Some(d) = a.data {
        cfg.data.train = d;
        // The embedded preset's format and held-out set describe the demo task, not this file.
        if a.config.is_none() && resume.is_none() {
            let set = |key: &str| a.set.iter().any(|o| o.trim_start().starts_with(key));
            if !set("data.format") {
                cfg.data.format = med_rlvr::task::DataFormat::Auto;
            }
            if !set("data.eval") && cfg.data.eval.take().is_some() && main {
                eprintln!(
                    "--data with the embedded demo preset: data.format = \"auto\", no held-out \
                     set (set data.eval to evaluate on one)"
                );
            }
        }
    }
    cfg.require_paths()?;
    // Hub ids and hf:// paths: fetched into the Hugging Face cache and pinned to their commit
    // (`Qwen/Qwen2.5-3B@<commit>`), which the run's config.toml and adapters then record.
    use med_rlvr::hub;
    cfg.model.path = hub::pin_model(&cfg.model.path)?;
    cfg.data.train = hub::pin_data(&cfg.data.train)?;
    if let Some(e) = cfg.data.eval.take() {
        cfg.data.eval = Some(hub::pin_data(&e)?);
    }
    if let Some(k) = a.save_every {
        cfg.train.save_every = k;
    }
    if let Some(ck) = &resume {
        let diff = checkpoint::math_diff(&checkpoint::read_config(ck, &[])?, &cfg)?;
        if !diff.is_empty() && !a.force {
            bail!(
                "the configuration differs from the checkpoint's ({}) in ways that change the \
                 math:\n  {}\npass --force to resume anyway",
                ck.join("config.toml").display(),
                diff.join("\n  ")
            );
        }
        for d in diff.iter().filter(|_| main) {
            eprintln!("warning: resuming with a changed setting: {d}");
        }
    }
    let (model_dir, train_file) = (
        hub::model_dir(&cfg.model.path)?,
        hub::data_file(&cfg.data.train)?,
    );
    let eval_file = cfg.data.eval.as_deref().map(hub::data_file).transpose()?;
    let mut inputs = vec![
        ("model.path", model_dir.as_path()),
        ("data.train", train_file.as_path()),
    ];
    if let Some(e) = &eval_file {
        inputs.push(("data.eval", e.as_path()));
    }
    let out = from_main(world, || {
        med_rlvr::trainer::run_folder(a.out.as_deref(), resume.as_deref(), a.overwrite, &inputs)
            .map(Some)
    })?
    .context("rank 0 sent no run folder")?;
    if main {
        eprintln!("run folder: {}", out.display());
    }
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: exiting without a checkpoint");
            std::process::exit(130);
        }
        if main {
            eprintln!(
                "\ninterrupt: finishing the current step, then writing a checkpoint (again to \
                 abort)"
            );
        }
    })
    .context("cannot install the SIGINT/SIGTERM handler")?;
    #[cfg(feature = "mpi")]
    if world.is_some() {
        med_rlvr::parallel::mpi::stop_on_sigusr1(stop.clone())?;
    }
    let opts = med_rlvr::trainer::RunOptions {
        quiet: a.quiet,
        resume,
        stop: Some(stop),
        devices: a.devices,
        world,
        ..Default::default()
    };
    let outcome = med_rlvr::trainer::run::<B>(cfg, &out, device, &opts).inspect_err(|_| {
        // A run refused before writing anything leaves no empty folder behind.
        if main {
            let _ = std::fs::remove_dir(&out);
        }
    })?;
    if !main {
        return Ok(());
    }
    let metrics = &outcome.metrics;
    let first = metrics
        .first()
        .and_then(|m| m.eval_accuracy.zip(m.eval_format_rate));
    let last = metrics
        .last()
        .and_then(|m| m.eval_accuracy.zip(m.eval_format_rate));
    if let (Some((a0, f0)), Some((a1, f1))) = (first, last) {
        eprintln!("held-out accuracy {a0:.3} -> {a1:.3}, format rate {f0:.3} -> {f1:.3}");
    }
    match med_rlvr::plot::training_figures(&out, &out) {
        Ok(files) => eprintln!("figures: {}", files[0].display()),
        Err(e) => eprintln!("warning: no figures ({e:#})"),
    }
    if let Some(ck) = outcome.interrupted {
        eprintln!(
            "stopped cleanly; checkpoint {}; continue with: med-rlvr train --resume {}",
            ck.display(),
            ck.display()
        );
        return Ok(());
    }
    eprintln!(
        "metrics: {}, final model: {}",
        out.join("metrics.jsonl").display(),
        out.join("final").display()
    );
    Ok(())
}
