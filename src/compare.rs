//! Element-wise comparison of two numeric results, the one way every test and the `selfcheck`
//! command compare numbers. It fails on a length mismatch and on any NaN or infinity in either
//! operand: `f32::max` returns the other operand when one is NaN, so a running maximum of
//! differences silently drops exactly the faults that matter.

/// The outcome of a comparison that passed: the largest error and where it was.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Diff {
    /// `max_i |got_i − want_i|`.
    pub max_abs: f64,
    /// Index of the element with the largest absolute error.
    pub at: usize,
    pub len: usize,
}

/// An element passes when `|got − want| ≤ abs + rel·|want|`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    pub abs: f64,
    pub rel: f64,
}

impl Tolerance {
    /// Absolute only.
    pub const fn abs(abs: f64) -> Self {
        Self { abs, rel: 0.0 }
    }

    /// Relative to the largest `|want|` of the whole vector (for gradients, whose entries span
    /// many orders of magnitude): `|got − want| ≤ rel · max_j |want_j|`.
    pub fn scaled(rel: f64, want: &[f64]) -> Self {
        let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
        Self {
            abs: rel * scale.max(f64::MIN_POSITIVE),
            rel: 0.0,
        }
    }
}

/// Compares `got` with `want` element by element; `Err` (a one-line reason naming `what`, the
/// index and both values) on a length mismatch, a non-finite value in either, or an element
/// outside `tol`.
pub fn check_close<G, W>(what: &str, got: &[G], want: &[W], tol: Tolerance) -> Result<Diff, String>
where
    G: Copy + Into<f64>,
    W: Copy + Into<f64>,
{
    if got.len() != want.len() {
        return Err(format!(
            "{what}: length {} where {} was expected",
            got.len(),
            want.len()
        ));
    }
    let mut d = Diff {
        max_abs: 0.0,
        at: 0,
        len: got.len(),
    };
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g, w): (f64, f64) = (g.into(), w.into());
        if !g.is_finite() || !w.is_finite() {
            return Err(format!("{what}: element {i} is {g} where {w} was expected"));
        }
        let err = (g - w).abs();
        if err > tol.abs + tol.rel * w.abs() {
            return Err(format!(
                "{what}: element {i} is {g} where {w} was expected (|diff| {err:.3e} > {:.1e} + {:.1e}·|want|)",
                tol.abs, tol.rel
            ));
        }
        if err > d.max_abs {
            d.max_abs = err;
            d.at = i;
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_inf_and_length_mismatch_fail() {
        let tol = Tolerance::abs(1e-3);
        assert!(check_close("x", &[1.0f32, f32::NAN], &[1.0f32, 2.0], tol).is_err());
        assert!(check_close("x", &[1.0f32, 2.0], &[1.0f32, f32::NAN], tol).is_err());
        assert!(check_close("x", &[f32::INFINITY], &[f32::INFINITY], tol).is_err());
        assert!(check_close("x", &[1.0f32], &[1.0f32, 2.0], tol).is_err());
        assert!(check_close("x", &[1.0f32, 2.1], &[1.0f32, 2.0], tol).is_err());
        let d = check_close("x", &[1.0f32, 2.0005], &[1.0f64, 2.0], tol).unwrap();
        assert_eq!((d.at, d.len), (1, 2));
        assert!((d.max_abs - 5e-4).abs() < 1e-6);
    }

    #[test]
    fn relative_and_scaled_tolerances() {
        let rel = Tolerance {
            abs: 0.0,
            rel: 1e-2,
        };
        assert!(check_close("x", &[101.0f64], &[100.0f64], rel).is_ok());
        assert!(check_close("x", &[1.1f64], &[1.0f64], rel).is_err());
        let want = [100.0, 0.001];
        let scaled = Tolerance::scaled(1e-3, &want);
        assert!(check_close("x", &[100.05, 0.05], &want, scaled).is_ok());
        assert!(check_close("x", &[100.2, 0.001], &want, scaled).is_err());
    }
}
