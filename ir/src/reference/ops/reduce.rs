//! Ops along one axis: reductions (sum, mean, max, with the axis kept as
//! size 1) and the numerically stable softmax.

use super::{each_float, fill_rows, split_axis, Raw};
use crate::op::ReduceOp;
use crate::reference::tensor::{Elem, Float, Storage, Tensor};

/// Reduces `x` (viewed as `[outer, n, inner]`) over its middle axis, in
/// `f64` whatever the element type, into `[outer, inner]`.
fn reduce_typed<E: Elem>(
    op: ReduceOp,
    x: &[E],
    (outer, n, inner): (usize, usize, usize),
    to: impl Fn(E) -> f64 + Sync,
    from: impl Fn(f64) -> E + Sync,
) -> Vec<E> {
    let mut out = vec![from(0.0); outer * inner];
    if out.is_empty() {
        return out;
    }
    fill_rows(&mut out, inner, |o, dst| {
        let base = o * n * inner;
        for (i, d) in dst.iter_mut().enumerate() {
            let column = (0..n).map(|j| to(x[base + j * inner + i]));
            *d = from(match op {
                ReduceOp::Sum => column.sum(),
                ReduceOp::Mean => column.sum::<f64>() / n as f64,
                ReduceOp::Max => column.fold(f64::NEG_INFINITY, |m, v| m.max_nan(v)),
            });
        }
    });
    out
}

/// `op` over `axis`, which is kept with size 1. Sums accumulate in `f64`;
/// an integer mean truncates toward zero; a max propagates NaN.
pub fn reduce(op: ReduceOp, axis: usize, x: &Tensor) -> Result<Raw, String> {
    let dims = split_axis(x.shape(), axis);
    let data = match x.storage() {
        Storage::F32(v) => Storage::F32(reduce_typed(op, v, dims, |e| e as f64, |e| e as f32)),
        Storage::F64(v) => Storage::F64(reduce_typed(op, v, dims, |e| e, |e| e)),
        Storage::I32(v) => Storage::I32(reduce_typed(op, v, dims, |e| e as f64, |e| e as i32)),
    };
    let mut shape = x.shape().to_vec();
    shape[axis] = 1;
    Ok((shape, data))
}

fn softmax_typed<T: Float>(x: &[T], (_, n, inner): (usize, usize, usize)) -> Vec<T> {
    let mut out = vec![T::ZERO; x.len()];
    if out.is_empty() {
        return out;
    }
    // Each output chunk is one `[n, inner]` slab; columns are softmaxed.
    fill_rows(&mut out, n * inner, |o, slab| {
        let base = o * n * inner;
        for i in 0..inner {
            let at = |j: usize| base + j * inner + i;
            let m = (0..n).fold(T::NEG_INFINITY, |m, j| m.max_nan(x[at(j)]));
            let mut sum = 0.0f64;
            for j in 0..n {
                let e = (x[at(j)] - m).exp();
                slab[j * inner + i] = e;
                sum += e.to_f64();
            }
            let sum = T::from_f64(sum);
            for j in 0..n {
                slab[j * inner + i] = slab[j * inner + i] / sum;
            }
        }
    });
    out
}

/// Softmax along `axis`, shifted by the maximum so no exponent overflows.
/// A slice that is all -inf (fully masked) gives NaN, as in PyTorch.
pub fn softmax(axis: usize, x: &Tensor) -> Result<Raw, String> {
    let dims = split_axis(x.shape(), axis);
    Ok((
        x.shape().to_vec(),
        each_float!(x, v => softmax_typed(v, dims)),
    ))
}
