//! `med-rlvr selfcheck`: this build's backend against the CPU reference over a sweep of shapes.

use std::io::Write;

use anyhow::{Context, Result};
use burn::tensor::backend::AutodiffBackend;
use serde_json::json;

use crate::app::cli::SelfcheckArgs;

pub(crate) fn run<B: AutodiffBackend>(a: SelfcheckArgs, device: &B::Device) -> Result<()> {
    use med_rlvr::selfcheck::{cases, run_case, Summary};
    type Reference = burn::backend::Autodiff<burn::backend::NdArray<f32>>;
    let started = std::time::Instant::now();
    let (mut failed, mut checks) = (0usize, 0usize);
    let (mut worst_abs, mut worst_grad) = (0f64, 0f64);
    for (i, case) in cases(a.seed, a.cases).iter().enumerate() {
        let s = Summary::of(&run_case::<B, Reference>(case, device, &Default::default()));
        checks += s.checks;
        worst_abs = worst_abs.max(s.max_abs);
        worst_grad = worst_grad.max(s.max_abs_grad);
        failed += usize::from(!s.failures.is_empty());
        if a.json {
            outln!(
                "{}",
                json!({"case": i, "shape": case.to_string(), "checks": s.checks,
                       "max_abs_error": s.max_abs, "max_abs_grad_error": s.max_abs_grad,
                       "failures": s.failures})
            );
        } else {
            let verdict = if s.failures.is_empty() {
                "ok  "
            } else {
                "FAIL"
            };
            outln!(
                "{verdict} case {i:>3}: {case}  ({} checks, max |err| {:.1e}, gradients {:.1e})",
                s.checks,
                s.max_abs,
                s.max_abs_grad
            );
            for f in &s.failures {
                outln!("       {f}");
            }
        }
    }
    let summary = format!(
        "selfcheck: {} cases, {checks} checks, {failed} failing cases; max |err| {worst_abs:.1e} \
         (outputs), {worst_grad:.1e} (gradients); {:.0} s",
        a.cases,
        started.elapsed().as_secs_f64()
    );
    if failed > 0 {
        return Err(med_rlvr::exit::RunFailed(summary).into());
    }
    eprintln!("{summary}");
    Ok(())
}
