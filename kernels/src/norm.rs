//! Per-position cross-entropy over the last axis (`logsumexp(logits) −
//! logits[target]`) and its gradient. One cube per row, shared-memory
//! reductions (see `reduce`). A target outside `0..V` yields NaN: the GPU
//! cannot stop to report it; the reference interpreter reports an error.
//! Float tensors are stored as the launch's `elem` and computed in `f32`.
//! (RMS normalization, the other row kernel, is in `rms_norm`.)

use crate::reduce::{block_max, block_sum, max_nan};
use crate::{grid_1d, linear_cube, with_float, FloatElem, ROW_BLOCK};
use cubecl::prelude::*;
use cubecl::server::Handle;

/// The max of a logits row `logits[base..base + v]` and the sum of
/// `exp(x − max)` over it, by the whole cube (every unit gets both).
#[cube]
fn row_max_sum<F: Float + CubeElement>(
    logits: &Array<F>,
    base: usize,
    v: usize,
    neg_inf: f32,
) -> (f32, f32) {
    let mut smem = SharedMemory::<f32>::new(ROW_BLOCK as usize);
    let step = CUBE_DIM as usize;
    let mut m = neg_inf;
    let mut j = UNIT_POS as usize;
    while j < v {
        m = max_nan::<f32>(m, f32::cast_from(logits[base + j]));
        j += step;
    }
    let m = block_max::<f32>(&mut smem, m);
    let mut s = f32::new(0.0);
    j = UNIT_POS as usize;
    while j < v {
        s += (f32::cast_from(logits[base + j]) - m).exp();
        j += step;
    }
    let s = block_sum::<f32>(&mut smem, s);
    (m, s)
}

#[cube(launch_unchecked)]
fn cross_entropy_kernel<F: Float + CubeElement>(
    logits: &Array<F>,
    targets: &Array<i32>,
    out: &mut Array<F>,
    v: usize,
    rows: usize,
    neg_inf: f32,
    nan: f32,
) {
    let row = linear_cube();
    if row >= rows {
        terminate!();
    }
    let base = row * v; // row of (rows, V)
    let (m, s) = row_max_sum::<F>(logits, base, v, neg_inf);
    if UNIT_POS == 0 {
        let t = targets[row];
        let mut r = nan;
        if t >= 0 && (t as usize) < v {
            r = s.ln() + m - f32::cast_from(logits[base + t as usize]);
        }
        out[row] = F::cast_from(r);
    }
}

/// `(softmax(row) − one_hot(target))·g` of each row: the row's max and
/// sum of exponentials as in `cross_entropy_kernel`, then every unit writes
/// its columns of the gradient. A target outside `0..v` gives a NaN row.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn cross_entropy_grad_kernel<F: Float + CubeElement>(
    logits: &Array<F>,
    targets: &Array<i32>,
    g: &Array<F>,
    out: &mut Array<F>,
    v: usize,
    rows: usize,
    neg_inf: f32,
    nan: f32,
) {
    let row = linear_cube();
    if row >= rows {
        terminate!();
    }
    let base = row * v;
    let (m, s) = row_max_sum::<F>(logits, base, v, neg_inf);
    let t = targets[row];
    let step = CUBE_DIM as usize;
    let mut scale = f32::cast_from(g[row]) / s;
    if t < 0 || (t as usize) >= v {
        scale = nan;
    }
    let gt = f32::cast_from(g[row]);
    let mut j = UNIT_POS as usize;
    while j < v {
        let mut d = (f32::cast_from(logits[base + j]) - m).exp() * scale;
        if j == t as usize {
            d -= gt;
        }
        out[base + j] = F::cast_from(d);
        j += step;
    }
}

/// Cross-entropy's gradient of dense logits `(rows, v)` for `i32` targets
/// and the loss adjoint `g` `[rows]` into `out` `(rows, v)`, all floats
/// stored as `elem`.
#[allow(clippy::too_many_arguments)]
pub fn launch_cross_entropy_grad<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    logits: &Handle,
    targets: &Handle,
    g: &Handle,
    out: &Handle,
    rows: usize,
    v: usize,
) {
    if rows == 0 {
        return;
    }
    with_float!(elem, F => unsafe {
        cross_entropy_grad_kernel::launch_unchecked::<F, R>(
            client,
            grid_1d(rows, 1),
            CubeDim::new_1d(ROW_BLOCK),
            ArrayArg::from_raw_parts(logits.clone(), rows * v),
            ArrayArg::from_raw_parts(targets.clone(), rows),
            ArrayArg::from_raw_parts(g.clone(), rows),
            ArrayArg::from_raw_parts(out.clone(), rows * v),
            v,
            rows,
            f32::NEG_INFINITY,
            f32::NAN,
        );
    });
}

/// Cross-entropy of dense logits `(rows, v)` against `i32` targets `[rows]`;
/// the logits and the loss `out` `[rows]` are stored as `elem`.
pub fn launch_cross_entropy<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    logits: &Handle,
    targets: &Handle,
    out: &Handle,
    rows: usize,
    v: usize,
) {
    if rows == 0 {
        return;
    }
    with_float!(elem, F => unsafe {
        cross_entropy_kernel::launch_unchecked::<F, R>(
            client,
            grid_1d(rows, 1),
            CubeDim::new_1d(ROW_BLOCK),
            ArrayArg::from_raw_parts(logits.clone(), rows * v),
            ArrayArg::from_raw_parts(targets.clone(), rows),
            ArrayArg::from_raw_parts(out.clone(), rows),
            v,
            rows,
            f32::NEG_INFINITY,
            f32::NAN,
        );
    });
}
