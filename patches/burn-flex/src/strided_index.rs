use crate::layout::Layout;
use alloc::vec;
use alloc::vec::Vec;
use core::marker::PhantomData;

/// Iterator that yields linear indices for strided tensor access.
///
/// Handles non-contiguous tensors (including those with negative strides from flip)
/// by computing the correct storage index for each logical element position.
///
/// (med-rlvr patch, see `patches/burn-flex/UPSTREAM.md`.) With non-negative strides the layout
/// is collapsed once, at construction, by `collapse_for_copy` (size-1 dims squeezed, adjacent
/// dims that form one run merged), and the innermost dim is stepped without touching the
/// odometer: one compare and one add per element instead of a walk over every dim through
/// `Shape::num_dims`.
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
        let (shape, strides) = (layout.shape(), layout.strides());
        // `collapse_for_copy` assumes non-negative strides (and at most its rank); a flipped or
        // higher-rank layout is walked as it is.
        let collapsed = (strides.iter().all(|&s| s >= 0)
            && layout.num_dims() <= crate::tensor::COLLAPSE_MAX_RANK)
            .then(|| crate::tensor::collapse_for_copy(shape, strides));
        let (shape, strides): (&[usize], &[isize]) = match &collapsed {
            Some(c) => c.as_slices(),
            None => (shape, strides),
        };
        let mut dims: Vec<(usize, isize)> =
            shape.iter().copied().zip(strides.iter().copied()).collect();
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
