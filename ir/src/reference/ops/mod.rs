//! The semantics of each primitive op on concrete tensors, grouped by family.
//! Every function takes its operands' elements and shapes and returns the
//! result's shape and elements; the evaluator labels the result with the
//! node's dtype and checks its shape against the node's type.

pub mod attention;
pub mod elementwise;
pub mod fused;
pub mod layout;
pub mod matmul;
pub mod quant;
pub mod reduce;

use super::tensor::{Elem, Storage, Tensor};
use rayon::prelude::*;

/// An op's result before the evaluator labels it: shape and elements.
pub type Raw = (Vec<usize>, Storage);

/// Outputs with at least this many elements are filled in parallel.
const PAR_MIN: usize = 1 << 15;

/// Row-major strides of a shape, in elements.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Splits a shape around `axis` into (elements before, size of axis,
/// elements after).
pub fn split_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    let outer = shape[..axis].iter().product();
    let inner = shape[axis + 1..].iter().product();
    (outer, shape[axis], inner)
}

/// The elements of `t` as `E`, or an error naming what was expected.
pub fn elems<'a, E: Elem>(t: &'a Tensor, what: &str) -> Result<&'a [E], String> {
    E::slice(t.storage()).ok_or_else(|| format!("expected {what} operand, got {t}"))
}

/// Fills `out` row by row with `f(row_index, row)`, in parallel when the
/// output is large. `row_len` must divide `out.len()` and be non-zero.
pub fn fill_rows<E: Send>(out: &mut [E], row_len: usize, f: impl Fn(usize, &mut [E]) + Sync) {
    if out.len() >= PAR_MIN {
        let min_rows = (4096 / row_len).max(1);
        out.par_chunks_mut(row_len)
            .with_min_len(min_rows)
            .enumerate()
            .for_each(|(r, row)| f(r, row));
    } else {
        out.chunks_mut(row_len)
            .enumerate()
            .for_each(|(r, row)| f(r, row));
    }
}

/// The offset of row `row` of a tensor whose rows (all axes but the last)
/// have shape `dims`, in an operand addressed with `strides` per axis.
pub fn row_offset(mut row: usize, dims: &[usize], strides: &[usize]) -> usize {
    let mut off = 0;
    for d in (0..dims.len()).rev() {
        off += (row % dims[d]) * strides[d];
        row /= dims[d];
    }
    off
}

/// Applies a generic body to a tensor's elements of any storage, wrapping
/// the resulting vector back into storage of the same type.
macro_rules! each_storage {
    ($s:expr, $v:ident => $body:expr) => {
        match $s {
            $crate::reference::tensor::Storage::F32($v) => {
                $crate::reference::tensor::Storage::F32($body)
            }
            $crate::reference::tensor::Storage::F64($v) => {
                $crate::reference::tensor::Storage::F64($body)
            }
            $crate::reference::tensor::Storage::I32($v) => {
                $crate::reference::tensor::Storage::I32($body)
            }
        }
    };
}
pub(crate) use each_storage;

/// Applies a generic body to a float tensor's elements, wrapping the result
/// back into storage of the same type; an integer tensor is an error.
macro_rules! each_float {
    ($t:expr, $v:ident => $body:expr) => {
        match $t.storage() {
            $crate::reference::tensor::Storage::F32($v) => {
                $crate::reference::tensor::Storage::F32($body)
            }
            $crate::reference::tensor::Storage::F64($v) => {
                $crate::reference::tensor::Storage::F64($body)
            }
            $crate::reference::tensor::Storage::I32(_) => {
                return Err(format!("expected a float operand, got {}", $t))
            }
        }
    };
}
pub(crate) use each_float;
