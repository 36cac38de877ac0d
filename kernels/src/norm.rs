//! Fused row kernels over the last axis: RMS normalization
//! (`x · rsqrt(mean(x²) + eps) · w`) and per-position cross-entropy
//! (`logsumexp(logits) − logits[target]`). One cube per row, shared-memory
//! reductions (see `reduce`). A target outside `0..V` yields NaN: the GPU
//! cannot stop to report it; the reference interpreter reports an error.

use crate::reduce::{block_max, block_sum, max_nan};
use crate::{grid_1d, linear_cube, ROW_BLOCK};
use cubecl::prelude::*;
use cubecl::server::Handle;

#[cube(launch_unchecked)]
fn rms_norm_kernel<F: Float + CubeElement>(
    x: &Array<F>,
    w: &Array<F>,
    out: &mut Array<F>,
    d: usize,
    rows: usize,
    eps: F,
) {
    let row = linear_cube();
    if row >= rows {
        terminate!();
    }
    let base = row * d; // row of (rows, d)
    let mut smem = SharedMemory::<F>::new(ROW_BLOCK as usize);
    let step = CUBE_DIM as usize;
    let mut ss = F::new(0.0);
    let mut j = UNIT_POS as usize;
    while j < d {
        let v = x[base + j];
        ss += v * v;
        j += step;
    }
    let ss = block_sum::<F>(&mut smem, ss);
    let inv = F::new(1.0) / (ss / F::cast_from(d) + eps).sqrt();
    j = UNIT_POS as usize;
    while j < d {
        out[base + j] = x[base + j] * inv * w[j];
        j += step;
    }
}

/// RMS norm of a dense `(rows, d)` `f32` tensor with weight `[d]`.
pub fn launch_rms_norm<R: Runtime>(
    client: &ComputeClient<R>,
    x: &Handle,
    w: &Handle,
    out: &Handle,
    rows: usize,
    d: usize,
    eps: f32,
) {
    if rows == 0 || d == 0 {
        return;
    }
    unsafe {
        rms_norm_kernel::launch_unchecked::<f32, R>(
            client,
            grid_1d(rows, 1),
            CubeDim::new_1d(ROW_BLOCK),
            ArrayArg::from_raw_parts(x.clone(), rows * d),
            ArrayArg::from_raw_parts(w.clone(), d),
            ArrayArg::from_raw_parts(out.clone(), rows * d),
            d,
            rows,
            eps,
        );
    }
}

#[cube(launch_unchecked)]
fn cross_entropy_kernel<F: Float + CubeElement>(
    logits: &Array<F>,
    targets: &Array<i32>,
    out: &mut Array<F>,
    v: usize,
    rows: usize,
    neg_inf: F,
    nan: F,
) {
    let row = linear_cube();
    if row >= rows {
        terminate!();
    }
    let base = row * v; // row of (rows, V)
    let mut smem = SharedMemory::<F>::new(ROW_BLOCK as usize);
    let step = CUBE_DIM as usize;
    let mut m = neg_inf;
    let mut j = UNIT_POS as usize;
    while j < v {
        m = max_nan::<F>(m, logits[base + j]);
        j += step;
    }
    let m = block_max::<F>(&mut smem, m);
    let mut s = F::new(0.0);
    j = UNIT_POS as usize;
    while j < v {
        s += (logits[base + j] - m).exp();
        j += step;
    }
    let s = block_sum::<F>(&mut smem, s);
    if UNIT_POS == 0 {
        let t = targets[row];
        let mut r = nan;
        if t >= 0 && (t as usize) < v {
            r = s.ln() + m - logits[base + t as usize];
        }
        out[row] = r;
    }
}

/// Cross-entropy of dense logits `(rows, v)` against `i32` targets `[rows]`.
pub fn launch_cross_entropy<R: Runtime>(
    client: &ComputeClient<R>,
    logits: &Handle,
    targets: &Handle,
    out: &Handle,
    rows: usize,
    v: usize,
) {
    if rows == 0 {
        return;
    }
    unsafe {
        cross_entropy_kernel::launch_unchecked::<f32, R>(
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
    }
}
