//! Faults injected on purpose, to test the recovery paths: the NaN/Inf guard of every phase, the
//! agreement of all replicas on a fault, and the checkpoint written when too many steps fail.
//! Only a build with the `fault-injection` feature (the test suite's, through its dev-dependency
//! on this crate) can plan one; in every other build [`Faults`] is empty and [`Faults::hits`] is
//! always false.

/// Where a planned fault makes a number non-finite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The first sample's first `log π_old` becomes NaN (caught with the advantages).
    Rollout,
    /// The policy loss of every micro-batch is multiplied by NaN.
    PolicyLoss,
    /// The value loss of every micro-batch is multiplied by NaN.
    ValueLoss,
    /// The actor's loss is finite but its backward is scaled by +∞, so the gradient is not
    /// (caught by the gradient-norm check after the all-reduce).
    Gradient,
}

/// The faults planned for a run: (step, replica or every replica, fault).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    #[cfg(feature = "fault-injection")]
    planned: Vec<(usize, Option<usize>, Fault)>,
}

impl Faults {
    /// Adds `fault` at `step` on replica `rank` (every replica when `None`).
    #[cfg(feature = "fault-injection")]
    pub fn inject(mut self, step: usize, rank: Option<usize>, fault: Fault) -> Self {
        self.planned.push((step, rank, fault));
        self
    }

    /// Whether `fault` is planned at `step` on replica `rank`.
    pub fn hits(&self, step: usize, rank: usize, fault: Fault) -> bool {
        #[cfg(feature = "fault-injection")]
        return self
            .planned
            .iter()
            .any(|&(s, r, f)| s == step && r.is_none_or(|r| r == rank) && f == fault);
        #[cfg(not(feature = "fault-injection"))]
        {
            let _ = (step, rank, fault);
            false
        }
    }
}
