//! Output paths checked against a command's inputs, so no command writes into what it reads.

use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Result};

/// `p` made absolute and free of `.`/`..` and symlinks as far as it exists (the part that does not
/// exist yet is appended lexically).
pub fn absolute(p: &Path) -> PathBuf {
    let p = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut existing = p.clone();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (
            existing.file_name().map(|n| n.to_os_string()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => break,
        }
    }
    let mut out = existing.canonicalize().unwrap_or(existing);
    for name in rest.into_iter().rev() {
        out.push(name);
    }
    lexical(&out)
}

/// `p` with `.` and `x/..` pairs removed (`assets/presets/../demo` is `assets/demo`), without
/// touching the file system; a leading `..` of a relative path stays.
pub fn lexical(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// Refuses `out` (a file or folder the command writes) when it is one of `inputs`, lies inside
/// one, or contains one: writing there would overwrite or mix with what the command reads.
/// `flag` names the output in the message (`--out`).
pub fn refuse_overlap(flag: &str, out: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let o = absolute(out);
    for (what, input) in inputs {
        let i = absolute(input);
        if o == i || o.starts_with(&i) || i.starts_with(&o) {
            bail!(
                "{flag} {}: overlaps the {what} {} that this command reads; write to another \
                 folder",
                out.display(),
                input.display()
            );
        }
    }
    Ok(())
}
