//! How a command ends. Exit status 0: done. 1: the run itself failed — training stopped after
//! `train.max_bad_steps` non-finite steps, `selfcheck` found a mismatch, the memory plan exceeds
//! `--limit-gb`. 2: the input was refused before anything was written — a flag, a config key, a
//! file, a model folder, a missing GPU runtime (clap's usage errors exit 2 as well). Never a
//! panic.

/// An error of the run itself (exit status 1), as opposed to refused input (exit status 2).
#[derive(Debug)]
pub struct RunFailed(pub String);

impl std::fmt::Display for RunFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RunFailed {}

/// The exit status of a command that returned `e`.
pub fn status(e: &anyhow::Error) -> i32 {
    match e.chain().any(|c| c.is::<RunFailed>()) {
        true => 1,
        false => 2,
    }
}
