//! Data parallelism with Burn's own collective (`burn-collective`, burn's `collective` feature):
//! one replica of the trainer per device, one thread each. Every replica draws the same prompts
//! for a step and samples, scores and trains on its contiguous shard of them; gradients are
//! summed across replicas with `GradientsParams::all_reduce` before the (identical) optimizer
//! steps, and the few statistics that span the batch — the advantage whitening moments, the KL
//! mean, the token counts behind the loss weights, the logged metrics — are summed the same way.
//! With these, `size` replicas take the update one device takes on the combined batch (see
//! `tests/parallel.rs`).
//!
//! A replica is built independently on its device (same files, same seeds, so the same values);
//! [`stable_param_ids`] numbers the parameters by position so that the all-reduce, which walks
//! gradients in parameter-id order, pairs the same parameter on every replica.
//!
//! Across processes and nodes (`--features mpi`, `train --mpi`): one replica per process, and,
//! once [`mpi::init`] has run, the same `World` calls go through MPI instead (see `mpi.rs`).

use std::ops::Range;

use anyhow::{anyhow, bail, Result};
use burn::collective::{self, CollectiveConfig, PeerId, ReduceOperation};
use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData, TensorPrimitive};

use crate::advantages::{self as adv, Grid};

#[cfg(feature = "mpi")]
pub mod mpi;

/// The MPI world of this process, when `--features mpi` and [`mpi::init`] made one.
#[cfg(feature = "mpi")]
fn over_mpi(size: usize) -> Option<&'static mpi::Mpi> {
    mpi::active().filter(|_| size > 1)
}

/// This replica's place among the data-parallel replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub size: usize,
}

impl Default for World {
    fn default() -> Self {
        Self::single()
    }
}

impl World {
    /// One device, no collective.
    pub fn single() -> Self {
        Self { rank: 0, size: 1 }
    }

    /// The replica that logs, evaluates and writes checkpoints.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Registers replica `rank` of `size` on `device` with the collective of backend `B`
    /// (the inner backend, which holds the gradients); blocks until all `size` have registered.
    pub fn join<B: Backend>(rank: usize, size: usize, device: &B::Device) -> Result<Self> {
        if rank >= size {
            bail!("replica {rank} of {size}: rank out of range");
        }
        #[cfg(feature = "mpi")]
        if size > 1 && mpi::active().is_some() {
            bail!("replicas on threads (--devices) and across MPI processes (--mpi) do not mix");
        }
        if size > 1 {
            let config = CollectiveConfig::default().with_num_devices(size);
            collective::register::<B>(PeerId::from(rank), device.clone(), config)
                .map_err(|e| anyhow!("replica {rank}: collective registration failed: {e:?}"))?;
        }
        Ok(Self { rank, size })
    }

    /// Unregisters from the collective (after the last collective operation).
    pub fn leave<B: Backend>(&self) -> Result<()> {
        if self.size > 1 {
            collective::finish_collective::<B>(self.peer())
                .map_err(|e| anyhow!("replica {}: leaving the collective: {e:?}", self.rank))?;
        }
        Ok(())
    }

    fn peer(&self) -> PeerId {
        PeerId::from(self.rank)
    }

    /// The index of this replica's device among its node's (threads: the rank; MPI: the rank
    /// among the processes on this node).
    pub fn local_rank(&self) -> usize {
        #[cfg(feature = "mpi")]
        if let Some(m) = mpi::active() {
            return m.local_rank;
        }
        self.rank
    }

    /// This replica's contiguous share of `n` items (`n` must divide evenly).
    pub fn shard(&self, n: usize) -> Range<usize> {
        let per = n / self.size;
        self.rank * per..(self.rank + 1) * per
    }

    /// Element-wise sum of `xs` over the replicas (every replica passes the same length). The
    /// values travel as f32 between threads: exact for counts below 2²⁴, ~6e-8 relative
    /// otherwise; as f64 over MPI.
    pub fn sum<B: Backend>(&self, xs: &[f64], device: &B::Device) -> Result<Vec<f64>> {
        if self.size == 1 || xs.is_empty() {
            return Ok(xs.to_vec());
        }
        #[cfg(feature = "mpi")]
        if let Some(m) = over_mpi(self.size) {
            return Ok(m.sum(xs, "a sum of batch statistics"));
        }
        let data: Vec<f32> = xs.iter().map(|&x| x as f32).collect();
        let t = Tensor::<B, 1>::from_data(TensorData::new(data, [xs.len()]), device);
        let summed = collective::all_reduce::<B>(
            self.peer(),
            t.into_primitive().tensor(),
            ReduceOperation::Sum,
        )
        .map_err(|e| anyhow!("replica {}: all-reduce failed: {e:?}", self.rank))?;
        let t = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(summed));
        Ok(t.into_data()
            .convert::<f32>()
            .iter::<f32>()
            .map(f64::from)
            .collect())
    }

    /// The largest of the replicas' `x` (each writes its own slot of a sum).
    pub fn max<B: Backend>(&self, x: f64, device: &B::Device) -> Result<f64> {
        let mut slots = vec![0.0; self.size];
        slots[self.rank] = x;
        let all = self.sum::<B>(&slots, device)?;
        Ok(all.into_iter().fold(f64::NEG_INFINITY, f64::max))
    }

    /// Whether `flag` is set on any replica.
    pub fn any<B: Backend>(&self, flag: bool, device: &B::Device) -> Result<bool> {
        Ok(self.sum::<B>(&[flag as u8 as f64], device)?[0] > 0.0)
    }

    /// [`adv::masked_moments`] over the rows of every replica: global mean first, then the
    /// global mean squared deviation from it (two reductions, no cancellation).
    pub fn masked_moments<B: Backend>(
        &self,
        x: &Grid,
        mask: &Grid,
        device: &B::Device,
    ) -> Result<(f64, f64)> {
        if self.size == 1 {
            return Ok(adv::masked_moments(x, mask));
        }
        let (s, n) = adv::masked_sum(x, mask);
        let sn = self.sum::<B>(&[s, n], device)?;
        let (n, mean) = (sn[1].max(1.0), sn[0] / sn[1].max(1.0));
        let v = adv::masked_squared_deviation(x, mask, mean);
        Ok((mean, self.sum::<B>(&[v], device)?[0] / n))
    }

    /// Sums the gradients of a module over the replicas (Burn's collective all-reduce; the
    /// per-replica losses are already weighted by their share of the global batch).
    pub fn sum_grads<B: AutodiffBackend>(&self, grads: GradientsParams) -> Result<GradientsParams> {
        if self.size == 1 {
            return Ok(grads);
        }
        #[cfg(feature = "mpi")]
        if let Some(m) = over_mpi(self.size) {
            return m.sum_grads::<B::InnerBackend>(grads);
        }
        grads
            .all_reduce::<B::InnerBackend>(self.peer(), ReduceOperation::Sum)
            .map_err(|e| anyhow!("replica {}: gradient all-reduce failed: {e:?}", self.rank))
    }
}

/// Renumbers a module's float parameters `base, base + 1, …` in visiting order, so that two
/// replicas built separately give the same parameter the same id.
/// Over MPI, the shapes are recorded too: the gradient all-reduce walks them in this order.
pub fn stable_param_ids<B: Backend, M: Module<B>>(module: M, base: u64) -> M {
    struct Renumber(u64, Vec<Vec<usize>>);
    impl<B: Backend> ModuleMapper<B> for Renumber {
        fn map_float<const D: usize>(&mut self, mut p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            p.id = ParamId::from(self.0);
            self.0 += 1;
            self.1.push(p.lazy_shape().to_vec());
            p
        }
    }
    let mut renumber = Renumber(base, vec![]);
    let module = module.map(&mut renumber);
    #[cfg(feature = "mpi")]
    mpi::record_layout(base, renumber.1);
    #[cfg(not(feature = "mpi"))]
    drop(renumber);
    module
}

/// How many devices of `device`'s kind there are, for the kinds that have several (CUDA, wgpu);
/// `None` for the CPU backends, whose one device the replicas share.
pub fn device_count<B: Backend>(device: &B::Device) -> Option<usize> {
    use burn::tensor::backend::DeviceOps;
    (nth_device(device, 1) != *device).then(|| B::device_count(device.id().type_id))
}

/// Device `index` of the backend kind of `device` (CUDA/wgpu: the GPU with that index; the CPU
/// backends have one device, which every replica then shares).
pub fn nth_device<D: burn::tensor::backend::DeviceOps>(device: &D, index: usize) -> D {
    let mut id = device.id();
    id.index_id = index as u16;
    D::from_id(id)
}
