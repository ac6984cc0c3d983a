//! Turning (prompt, response) pairs into model inputs, and reading per-response-token log-probs and
//! values back out. Layout of a batch row: `[left-padded prompt (width P) | response, right-padded
//! (width R)]`; the hidden state at column `P − 1 + j` predicts response token `j`, and the critic's
//! value there is `V_j` (the state in which token `j` is chosen).

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Bool, Int, Tensor, TensorData};
use qwen2_burn::Qwen2;

use crate::advantages::Grid;
use crate::critic::Critic;

/// A scored sample with the numbers its update is measured against (what the trainer's
/// `reference_values` phase produces), ragged: every vector has the response's length.
#[derive(Debug, Clone)]
pub struct Evaluated {
    pub prompt: Vec<u32>,
    pub response: Vec<u32>,
    /// `log π_rollout`: the sampler's log-probs of the response.
    pub rollout_logp: Vec<f64>,
    /// `log π_old` of the PPO ratio: the sampler's, or with `ppo.rollout_is_cap` the trainer's
    /// own recomputation at the rollout weights.
    pub old_logp: Vec<f64>,
    /// Truncated importance weights `min(π_old / π_rollout, cap)` (empty when off).
    pub is_weights: Vec<f64>,
    /// `log π_ref`.
    pub ref_logp: Vec<f64>,
    /// The critic's values `V_t` (empty without a critic).
    pub old_values: Vec<f64>,
    /// The sequence reward.
    pub reward: f64,
    /// Cut at `rollout.max_new_tokens` (left out of the losses with `ppo.mask_truncated`).
    pub truncated: bool,
}

/// An evaluated sample with its advantages and returns (what the `advantages` phase produces):
/// everything PPO trains on.
#[derive(Debug, Clone)]
pub struct Experience {
    pub sample: Evaluated,
    pub advantages: Vec<f64>,
    pub returns: Vec<f64>,
}

/// A padded batch of (prompt, response) rows as host vectors.
pub struct Batch {
    pub b: usize,
    pub p: usize,
    pub r: usize,
    tokens: Vec<i64>,
    positions: Vec<i64>,
    valid: Vec<bool>,
    targets: Vec<i64>,
    /// `[b][r]`, 1 on response tokens.
    pub mask: Grid,
}

impl Batch {
    pub fn new(rows: &[(&[u32], &[u32])]) -> Self {
        let b = rows.len();
        let p = rows.iter().map(|r| r.0.len()).max().unwrap_or(1).max(1);
        let r = rows.iter().map(|r| r.1.len()).max().unwrap_or(1).max(1);
        let w = p + r;
        let (mut tokens, mut positions, mut valid) = (
            Vec::with_capacity(b * w),
            Vec::with_capacity(b * w),
            Vec::with_capacity(b * w),
        );
        let mut targets = Vec::with_capacity(b * r);
        let mut mask = Vec::with_capacity(b);
        for (prompt, resp) in rows {
            let pad = p - prompt.len();
            tokens.extend(std::iter::repeat_n(0, pad));
            positions.extend(std::iter::repeat_n(0, pad));
            valid.extend(std::iter::repeat_n(false, pad));
            let n = prompt.len() + resp.len();
            tokens.extend(prompt.iter().chain(resp.iter()).map(|&t| t as i64));
            positions.extend(0..n as i64);
            valid.extend(std::iter::repeat_n(true, n));
            let tail = r - resp.len();
            tokens.extend(std::iter::repeat_n(0, tail));
            positions.extend(std::iter::repeat_n(n as i64, tail));
            valid.extend(std::iter::repeat_n(false, tail));
            targets.extend(
                resp.iter()
                    .map(|&t| t as i64)
                    .chain(std::iter::repeat_n(0, tail)),
            );
            mask.push(
                (0..r)
                    .map(|j| if j < resp.len() { 1.0 } else { 0.0 })
                    .collect(),
            );
        }
        Self {
            b,
            p,
            r,
            tokens,
            positions,
            valid,
            targets,
            mask,
        }
    }

    /// The sequences' own tokens (`Σ prompt + response`) and the batch's padded layout
    /// (`rows × (max prompt + max response)`): what `ppo.micro_batch_tokens` brings together.
    pub fn token_counts(&self) -> (usize, usize) {
        (
            self.valid.iter().filter(|&&v| v).count(),
            self.b * (self.p + self.r),
        )
    }

    /// Model inputs (tokens, positions, validity) for columns `0 .. P + R − 1` (the last column
    /// predicts nothing we need).
    pub fn inputs<B: Backend>(
        &self,
        device: &B::Device,
    ) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>, Tensor<B, 2, Bool>) {
        let (b, w) = (self.b, self.p + self.r);
        let cut =
            |v: &[i64]| -> Vec<i64> { v.chunks(w).flat_map(|row| row[..w - 1].to_vec()).collect() };
        let valid: Vec<bool> = self
            .valid
            .chunks(w)
            .flat_map(|row| row[..w - 1].to_vec())
            .collect();
        (
            Tensor::from_data(TensorData::new(cut(&self.tokens), [b, w - 1]), device),
            Tensor::from_data(TensorData::new(cut(&self.positions), [b, w - 1]), device),
            Tensor::from_data(TensorData::new(valid, [b, w - 1]), device),
        )
    }

    /// `log π(response token j)` for every row, `[b, r]` (padding positions hold junk; mask them).
    pub fn logprobs<B: Backend>(
        &self,
        model: &Qwen2<B>,
        chunk: usize,
        device: &B::Device,
    ) -> Tensor<B, 2> {
        let (tokens, positions, valid) = self.inputs::<B>(device);
        let h = model.hidden(tokens, positions, valid, None);
        let d = h.dims()[2];
        let h = h.slice([0..self.b, self.p - 1..self.p - 1 + self.r, 0..d]);
        let targets = Tensor::from_data(
            TensorData::new(self.targets.clone(), [self.b, self.r]),
            device,
        );
        model.token_logprobs(h, targets, chunk)
    }

    /// Critic values `V_j` for every response position, `[b, r]`.
    pub fn values<B: Backend>(&self, critic: &Critic<B>, device: &B::Device) -> Tensor<B, 2> {
        let (tokens, positions, valid) = self.inputs::<B>(device);
        critic
            .values(tokens, positions, valid)
            .slice([0..self.b, self.p - 1..self.p - 1 + self.r])
    }

    /// `[b, r]` log-probs for training, as [`Batch::logprobs`] computes them; with `recompute`
    /// by layer-by-layer recomputation (see `qwen2_burn::recompute`): the output is a leaf and
    /// [`Trainable::param_grads`] re-runs the LM head chunk by chunk, then the layers one by one.
    pub fn train_logprobs<'a, B: AutodiffBackend>(
        &self,
        model: &'a Qwen2<B>,
        chunk: usize,
        recompute: bool,
        device: &B::Device,
    ) -> Trainable<'a, B> {
        if !recompute {
            return Trainable::graph(self.logprobs(model, chunk, device), model);
        }
        let (tokens, positions, valid) = self.inputs::<B>(device);
        let (h, ckpt) = model.hidden_checkpointed(tokens, positions, valid);
        let [b, t, d] = h.dims();
        let cols = self.p - 1..self.p - 1 + self.r;
        let h = h.slice([0..b, cols.clone(), 0..d]);
        let targets = Tensor::<B, 2, Int>::from_data(
            TensorData::new(self.targets.clone(), [self.b, self.r]),
            device,
        );
        let logp = Qwen2::<B::InnerBackend>::token_logprobs(
            &model.valid(),
            h.clone(),
            targets.clone().inner(),
            chunk,
        );
        let leaf = Tensor::from_inner(logp).require_grad();
        let out = leaf.clone();
        Trainable {
            output: out,
            to_params: Box::new(move |mut grads| {
                let Some(dlogp) = leaf.grad_remove(&mut grads) else {
                    return GradientsParams::new();
                };
                let (head, dh_resp) = model.token_logprobs_backward(h, targets, dlogp, chunk);
                let dh = Tensor::zeros([b, t, d], &dh_resp.device())
                    .slice_assign([0..b, cols, 0..d], dh_resp);
                let mut acc = GradientsAccumulator::<Qwen2<B>>::new();
                acc.accumulate(model, head);
                acc.accumulate(model, model.backward_checkpointed(ckpt, dh));
                acc.grads()
            }),
        }
    }

    /// Critic values `[b, r]` for training, as [`Batch::values`] computes them; with `recompute`
    /// the backbone is recomputed layer by layer (the value head runs under autodiff on a leaf of
    /// the final hidden states).
    pub fn train_values<'a, B: AutodiffBackend>(
        &self,
        critic: &'a Critic<B>,
        recompute: bool,
        device: &B::Device,
    ) -> Trainable<'a, B> {
        if !recompute {
            return Trainable::graph(self.values(critic, device), critic);
        }
        let (tokens, positions, valid) = self.inputs::<B>(device);
        let (h, ckpt) = critic
            .backbone
            .hidden_checkpointed(tokens, positions, valid);
        let leaf = Tensor::<B, 3>::from_inner(h).require_grad();
        let values = critic
            .value_head
            .forward(leaf.clone())
            .squeeze_dim::<2>(2)
            .slice([0..self.b, self.p - 1..self.p - 1 + self.r]);
        Trainable {
            output: values,
            to_params: Box::new(move |mut grads| {
                let mut acc = GradientsAccumulator::<Critic<B>>::new();
                if let Some(dh) = leaf.grad_remove(&mut grads) {
                    acc.accumulate(critic, critic.backbone.backward_checkpointed(ckpt, dh));
                }
                acc.accumulate(critic, GradientsParams::from_grads(grads, critic));
                acc.grads()
            }),
        }
    }

    /// The response mask as a tensor.
    pub fn mask_tensor<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2> {
        grid_tensor(&self.mask, device)
    }
}

/// A model output `[b, r]` under training and the way from a loss's gradients to the model's
/// parameter gradients: read from the graph, or produced by recomputation.
pub struct Trainable<'a, B: AutodiffBackend> {
    pub output: Tensor<B, 2>,
    to_params: Box<dyn FnOnce(B::Gradients) -> GradientsParams + 'a>,
}

impl<'a, B: AutodiffBackend> Trainable<'a, B> {
    /// An output whose whole graph was kept: the parameter gradients are read from it.
    fn graph<M: AutodiffModule<B>>(output: Tensor<B, 2>, module: &'a M) -> Self {
        Self {
            output,
            to_params: Box::new(move |grads| GradientsParams::from_grads(grads, module)),
        }
    }

    /// The parameter gradients of a loss on [`Trainable::output`], given `loss.backward()`.
    pub fn param_grads(self, grads: B::Gradients) -> GradientsParams {
        (self.to_params)(grads)
    }
}

/// A `[b][r]` grid as a float tensor.
pub fn grid_tensor<B: Backend>(g: &Grid, device: &B::Device) -> Tensor<B, 2> {
    let (b, r) = (g.len(), g.first().map_or(0, Vec::len));
    let flat: Vec<f32> = g.iter().flatten().map(|&x| x as f32).collect();
    Tensor::from_data(TensorData::new(flat, [b, r]), device)
}

/// Ragged per-row vectors padded with zeros to `r` columns.
pub fn pad_rows(rows: &[&[f64]], r: usize) -> Grid {
    rows.iter()
        .map(|v| {
            let mut x = v.to_vec();
            x.resize(r, 0.0);
            x
        })
        .collect()
}

/// A `[b, r]` tensor back to ragged rows of the given lengths.
pub fn ragged<B: Backend>(t: Tensor<B, 2>, lens: &[usize]) -> Vec<Vec<f64>> {
    let r = t.dims()[1];
    let flat: Vec<f64> = t.into_data().iter::<f64>().collect();
    lens.iter()
        .enumerate()
        .map(|(i, &n)| flat[i * r..i * r + n].to_vec())
        .collect()
}

/// The update's micro-batches of sequences with `(prompt, response)` lengths `lens`, in their
/// order: `micro_batch` at a time when `budget` is 0 (`ppo.micro_batch`), else
/// [`token_budget_groups`] under `budget` padded tokens (`ppo.micro_batch_tokens`). Returns
/// indices into `lens`; the split changes memory and speed, not the gradient.
pub fn micro_batch_groups(
    lens: &[(usize, usize)],
    micro_batch: usize,
    budget: usize,
) -> Vec<Vec<usize>> {
    match budget {
        0 => (0..lens.len())
            .collect::<Vec<_>>()
            .chunks(micro_batch)
            .map(<[usize]>::to_vec)
            .collect(),
        budget => token_budget_groups(lens, budget),
    }
}

/// Groups sequences with `(prompt, response)` lengths `lens` into no-grad forward batches of at
/// most `budget` padded tokens each, `rows × (max prompt + max response) ≤ budget` (a sequence
/// longer than the budget goes alone). Sequences are taken longest first, so each batch holds
/// similar lengths and little padding. Returns indices into `lens`; every index appears once.
pub fn token_budget_groups(lens: &[(usize, usize)], budget: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lens[i].0 + lens[i].1), i));
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let (mut p, mut r) = (0, 0);
    for i in order {
        let (pi, ri) = lens[i];
        let fits = groups
            .last()
            .is_some_and(|g| (g.len() + 1) * (p.max(pi) + r.max(ri)) <= budget);
        if fits {
            groups.last_mut().expect("a group").push(i);
            (p, r) = (p.max(pi), r.max(ri));
        } else {
            groups.push(vec![i]);
            (p, r) = (pi, ri);
        }
    }
    groups
}
