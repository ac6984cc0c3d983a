use crate::layout::Layout;
use alloc::vec;
use alloc::vec::Vec;
use core::marker::PhantomData;

/// Iterator that yields linear indices for strided tensor access.
///
/// Handles non-contiguous tensors (including those with negative strides from flip)
/// by computing the correct storage index for each logical element position.
///
/// (med-rlvr patch, see `patches/burn-flex/UPSTREAM.md`.) The layout is collapsed once, at
/// construction (size-1 dims squeezed; with non-negative strides, adjacent dims that form one
/// run merged), and the innermost dim is stepped without touching the odometer: one compare and
/// one add per element instead of a walk over every dim through `Shape::num_dims`.
pub struct StridedIter<'a> {
    /// Current storage index (signed to handle negative strides)
    storage_index: isize,
    /// Position in, length and stride of the innermost (collapsed) dim.
    inner_pos: usize,
    inner_len: usize,
    inner_stride: isize,
    /// The outer (collapsed) dims, their strides and the odometer over them.
    outer_shape: Vec<usize>,
    outer_strides: Vec<isize>,
    multi_index: Vec<usize>,
    remaining: usize,
    _layout: PhantomData<&'a Layout>,
}

impl<'a> StridedIter<'a> {
    /// Create a new strided iterator for the given layout.
    pub fn new(layout: &'a Layout) -> Self {
        let shape = layout.shape();
        let strides = layout.strides();
        let ndims = layout.num_dims();
        let mergeable = strides.iter().all(|&s| s >= 0);
        let mut dims: Vec<(usize, isize)> = Vec::with_capacity(ndims);
        for d in 0..ndims {
            let (n, st) = (shape[d], strides[d]);
            if n == 1 {
                continue;
            }
            match dims.last_mut() {
                Some(last)
                    if mergeable
                        && (n as isize).checked_mul(st).is_some_and(|run| run == last.1) =>
                {
                    last.0 *= n;
                    last.1 = st;
                }
                _ => dims.push((n, st)),
            }
        }
        let (inner_len, inner_stride) = dims.pop().unwrap_or((1, 0));
        Self {
            storage_index: layout.start_offset() as isize,
            inner_pos: 0,
            inner_len,
            inner_stride,
            multi_index: vec![0; dims.len()],
            outer_shape: dims.iter().map(|d| d.0).collect(),
            outer_strides: dims.iter().map(|d| d.1).collect(),
            remaining: layout.num_elements(),
            _layout: PhantomData,
        }
    }
}

impl Iterator for StridedIter<'_> {
    type Item = usize;

    #[inline]
    fn next(&mut self) -> Option<usize> {
        if self.remaining == 0 {
            return None;
        }

        debug_assert!(
            self.storage_index >= 0,
            "StridedIter: negative storage index"
        );
        let idx = self.storage_index as usize;
        self.remaining -= 1;

        self.inner_pos += 1;
        if self.inner_pos < self.inner_len {
            self.storage_index += self.inner_stride;
            return Some(idx);
        }
        self.inner_pos = 0;
        self.storage_index -= (self.inner_len as isize - 1) * self.inner_stride;

        // Advance the outer multi-index (last dimension first, like an odometer)
        for d in (0..self.outer_shape.len()).rev() {
            self.multi_index[d] += 1;
            if self.multi_index[d] < self.outer_shape[d] {
                self.storage_index += self.outer_strides[d];
                break;
            }
            // Wrap around this dimension
            self.multi_index[d] = 0;
            self.storage_index -= (self.outer_shape[d] as isize - 1) * self.outer_strides[d];
        }

        Some(idx)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for StridedIter<'_> {}

#[cfg(test)]
mod tests {
    use super::*;
    use burn_std::Shape;

    #[test]
    fn test_contiguous_iteration() {
        let layout = Layout::contiguous(Shape::from(vec![2, 3]));
        let indices: Vec<_> = StridedIter::new(&layout).collect();
        assert_eq!(indices, vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn test_transposed_iteration() {
        // Original: [[0, 1, 2], [3, 4, 5]] (shape [2, 3], strides [3, 1])
        // Transposed: [[0, 3], [1, 4], [2, 5]] (shape [3, 2], strides [1, 3])
        let layout = Layout::contiguous(Shape::from(vec![2, 3])).transpose(0, 1);
        let indices: Vec<_> = StridedIter::new(&layout).collect();
        assert_eq!(indices, vec![0, 3, 1, 4, 2, 5]);
    }

    #[test]
    fn test_narrowed_iteration() {
        // Original: [[0, 1, 2, 3], [4, 5, 6, 7]] (shape [2, 4])
        // Narrowed dim=1, start=1, len=2: [[1, 2], [5, 6]]
        let layout = Layout::contiguous(Shape::from(vec![2, 4])).narrow(1, 1, 2);
        let indices: Vec<_> = StridedIter::new(&layout).collect();
        assert_eq!(indices, vec![1, 2, 5, 6]);
    }
}
