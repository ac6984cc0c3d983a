//! A preallocated key/value cache for a whole batch: prefill writes the prompt, each decode step
//! appends one column. All rows share one write position (prompts are left-padded), and a per-row
//! validity mask says which columns hold real tokens.

use burn::tensor::{backend::Backend, Bool, Int, Tensor, TensorData};

use crate::config::Qwen2Config;

/// Keys and values of every layer, `[batch, kv_heads, capacity, head_dim]`, filled up to `len`.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    keys: Vec<Tensor<B, 4>>,
    values: Vec<Tensor<B, 4>>,
    /// `[batch, capacity]`: true where the column holds a real (non-padding) token.
    valid: Tensor<B, 2, Bool>,
    len: usize,
    capacity: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `batch` rows and at most `capacity` tokens per row.
    pub fn new(config: &Qwen2Config, batch: usize, capacity: usize, device: &B::Device) -> Self {
        let shape = [batch, config.num_key_value_heads, capacity, config.head_dim];
        let layers = config.num_hidden_layers;
        Self {
            keys: (0..layers).map(|_| Tensor::zeros(shape, device)).collect(),
            values: (0..layers).map(|_| Tensor::zeros(shape, device)).collect(),
            valid: Tensor::<B, 2, Int>::zeros([batch, capacity], device).bool(),
            len: 0,
            capacity,
        }
    }

    /// Tokens written so far (the same for every row).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Maximum number of tokens per row.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Elements allocated for keys and values (all layers).
    pub fn num_elements(&self) -> usize {
        self.keys
            .iter()
            .chain(&self.values)
            .map(|t| t.shape().num_elements())
            .sum()
    }

    /// Rows in the cache.
    pub fn batch(&self) -> usize {
        self.valid.dims()[0]
    }

    /// Records which of the `t` incoming columns are real tokens and returns the key-validity
    /// mask over everything cached after them, `[batch, len + t]`.
    pub(crate) fn push_valid(&mut self, new_valid: Tensor<B, 2, Bool>) -> Tensor<B, 2, Bool> {
        let [b, t] = new_valid.dims();
        assert!(
            self.len + t <= self.capacity,
            "KV cache overflow: {} cached + {t} new > capacity {}",
            self.len,
            self.capacity
        );
        let valid = std::mem::replace(&mut self.valid, new_valid.clone());
        self.valid = valid.slice_assign([0..b, self.len..self.len + t], new_valid);
        self.valid.clone().slice([0..b, 0..self.len + t])
    }

    /// Writes layer `layer`'s new keys and values (`[batch, kv_heads, t, head_dim]`) after the
    /// cached ones and returns all of them, `[batch, kv_heads, len + t, head_dim]`.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [b, h, t, d] = k.dims();
        let (start, end) = (self.len, self.len + t);
        let write = |cache: &mut Tensor<B, 4>, new: Tensor<B, 4>| {
            let old = std::mem::replace(cache, new.clone());
            *cache = old.slice_assign([0..b, 0..h, start..end, 0..d], new);
            cache.clone().slice([0..b, 0..h, 0..end, 0..d])
        };
        let keys = write(&mut self.keys[layer], k);
        let values = write(&mut self.values[layer], v);
        (keys, values)
    }

    /// Marks the `t` columns written by the last forward call as cached.
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// Keeps only the given rows, in that order (used to drop finished sequences so they stop
    /// costing compute); a row named more than once is copied (a prompt prefilled once for its
    /// samples).
    pub fn retain_rows(&mut self, rows: &[usize]) {
        let device = self.valid.device();
        let idx = Tensor::<B, 1, Int>::from_data(
            TensorData::new(
                rows.iter().map(|&r| r as i64).collect::<Vec<_>>(),
                [rows.len()],
            ),
            &device,
        );
        for t in self.keys.iter_mut().chain(self.values.iter_mut()) {
            *t = t.clone().select(0, idx.clone());
        }
        self.valid = self.valid.clone().select(0, idx);
    }

    /// Moves rows in from `src` (a cache prefilled for `rows.len()` new sequences): row `k` of
    /// `src` replaces row `rows[k]`, its `src.len()` columns right-aligned to end at this cache's
    /// write position, every older column of that row marked invalid. Used by continuous batching
    /// to put a new prompt into the slot of a finished one.
    pub fn write_rows(&mut self, rows: &[usize], src: &KvCache<B>) {
        let (w, end) = (src.len, self.len);
        assert!(
            w <= end,
            "a {w}-token prefill does not fit before column {end} of the cache"
        );
        assert_eq!(rows.len(), src.batch(), "one target row per source row");
        for (dst, from) in self
            .keys
            .iter_mut()
            .zip(&src.keys)
            .chain(self.values.iter_mut().zip(&src.values))
        {
            let [_, h, _, d] = from.dims();
            for (k, &r) in rows.iter().enumerate() {
                let part = from.clone().slice([k..k + 1, 0..h, 0..w, 0..d]);
                let old = std::mem::replace(dst, part.clone());
                *dst = old.slice_assign([r..r + 1, 0..h, end - w..end, 0..d], part);
            }
        }
        let device = self.valid.device();
        for (k, &r) in rows.iter().enumerate() {
            let row = Tensor::<B, 2, Int>::zeros([1, self.capacity], &device)
                .bool()
                .slice_assign(
                    [0..1, end - w..end],
                    src.valid.clone().slice([k..k + 1, 0..w]),
                );
            let old = std::mem::replace(&mut self.valid, row.clone());
            self.valid = old.slice_assign([r..r + 1, 0..self.capacity], row);
        }
    }

    /// Keeps only the last `keep` written columns (moved to the front), freeing the rest of the
    /// capacity. Every row's tokens must lie in those columns: rows are written up to the shared
    /// write position, so a row whose first valid column is at `len − keep` or later loses nothing.
    pub fn keep_last(&mut self, keep: usize) {
        assert!(
            keep <= self.len,
            "cannot keep {keep} of {} columns",
            self.len
        );
        let from = self.len - keep;
        let device = self.valid.device();
        for t in self.keys.iter_mut().chain(self.values.iter_mut()) {
            let [b, h, c, d] = t.dims();
            let kept = t.clone().slice([0..b, 0..h, from..from + keep, 0..d]);
            *t = Tensor::zeros([b, h, c, d], &device)
                .slice_assign([0..b, 0..h, 0..keep, 0..d], kept);
        }
        let b = self.batch();
        let kept = self.valid.clone().slice([0..b, from..from + keep]);
        self.valid = Tensor::<B, 2, Int>::zeros([b, self.capacity], &device)
            .bool()
            .slice_assign([0..b, 0..keep], kept);
        self.len = keep;
    }
}
