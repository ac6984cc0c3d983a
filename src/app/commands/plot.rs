//! `med-rlvr plot`: a run's training figure, or a bar chart of eval summaries.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::app::cli::PlotArgs;

pub(crate) fn run(a: PlotArgs) -> Result<()> {
    let files = if let Some(run) = &a.run {
        let out = a.out.clone().unwrap_or_else(|| {
            if run.is_dir() {
                run.clone()
            } else {
                run.parent().map(Path::to_path_buf).unwrap_or_default()
            }
        });
        med_rlvr::plot::training_figures(run, &out)?
    } else {
        med_rlvr::plot::eval_figures(&a.eval, &a.out.unwrap_or_else(|| PathBuf::from(".")))?
    };
    for f in files {
        outln!("{}", f.display());
    }
    Ok(())
}
