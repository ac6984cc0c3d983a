//! The comparison of the application's tests (`src/compare.rs`), shared by source: the model
//! crate cannot depend on the application crate.

#[allow(dead_code)]
#[path = "../../../src/compare.rs"]
mod compare;

/// `max |a − b|`; fails the test on NaN/Inf in either and on a length mismatch.
#[allow(dead_code)]
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    match compare::check_close("values", a, b, compare::Tolerance::abs(f64::MAX)) {
        Ok(d) => d.max_abs as f32,
        Err(e) => panic!("{e}"),
    }
}
