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

use std::ops::Range;

use anyhow::{anyhow, bail, Result};
use burn::collective::{self, CollectiveConfig, PeerId, ReduceOperation};
use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData, TensorPrimitive};

use crate::advantages::{self as adv, Grid};

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

    /// This replica's contiguous share of `n` items (`n` must divide evenly).
    pub fn shard(&self, n: usize) -> Range<usize> {
        let per = n / self.size;
        self.rank * per..(self.rank + 1) * per
    }

    /// Element-wise sum of `xs` over the replicas (every replica passes the same length). The
    /// values travel as f32: exact for counts below 2²⁴, ~6e-8 relative otherwise.
    pub fn sum<B: Backend>(&self, xs: &[f64], device: &B::Device) -> Result<Vec<f64>> {
        if self.size == 1 || xs.is_empty() {
            return Ok(xs.to_vec());
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
        grads
            .all_reduce::<B::InnerBackend>(self.peer(), ReduceOperation::Sum)
            .map_err(|e| anyhow!("replica {}: gradient all-reduce failed: {e:?}", self.rank))
    }
}

/// Renumbers a module's float parameters `base, base + 1, …` in visiting order, so that two
/// replicas built separately give the same parameter the same id.
pub fn stable_param_ids<B: Backend, M: Module<B>>(module: M, base: u64) -> M {
    struct Renumber(u64);
    impl<B: Backend> ModuleMapper<B> for Renumber {
        fn map_float<const D: usize>(&mut self, mut p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            p.id = ParamId::from(self.0);
            self.0 += 1;
            p
        }
    }
    module.map(&mut Renumber(base))
}

/// Device `index` of the backend kind of `device` (CUDA/wgpu: the GPU with that index; the CPU
/// backends have one device, which every replica then shares).
pub fn nth_device<D: burn::tensor::backend::DeviceOps>(device: &D, index: usize) -> D {
    let mut id = device.id();
    id.index_id = index as u16;
    D::from_id(id)
}
