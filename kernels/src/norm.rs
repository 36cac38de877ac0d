//! Per-position cross-entropy over the last axis (`logsumexp(logits) −
//! logits[target]`) and its gradient. One cube per row; each unit keeps an
//! online max and sum of exponentials over its vectors (the row is read
//! once for the loss, twice for the gradient), then the cube combines them
//! through shared memory (see `reduce`). A target outside `0..V` yields
//! NaN: the GPU cannot stop to report it; the reference interpreter reports
//! an error. Every value is computed in `f32`; each operand is read in its
//! own storage (half-precision logits are read as they are, never widened
//! into a copy) and each result is rounded once to its storage.
//! (RMS normalization, the other row kernel, is in `rms_norm`.)

use crate::reduce::{block_max, block_sum, max_nan};
use crate::{grid_1d, linear_cube, with_float, FloatElem, ROW_BLOCK};
use cubecl::prelude::*;
use cubecl::server::Handle;

/// The max of a logits row (vectors `base..base + nvec`) and the sum of
/// `exp(x − max)` over it, by the whole cube (every unit gets both). Each
/// unit keeps a running max and rescales its sum when the max grows, so
/// the row is read once.
#[cube]
fn row_max_sum<L: Float, N: Size>(
    logits: &Array<Vector<L, N>>,
    base: usize,
    nvec: usize,
    neg_inf: f32,
    #[comptime] nv: usize,
) -> (f32, f32) {
    let mut smem = SharedMemory::<f32>::new(ROW_BLOCK as usize);
    let step = CUBE_DIM as usize;
    let mut m = neg_inf;
    let mut s = f32::new(0.0);
    let mut j = UNIT_POS as usize;
    while j < nvec {
        let x = logits[base + j];
        let mut vm = neg_inf;
        #[unroll]
        for lane in 0..nv {
            vm = max_nan::<f32>(vm, f32::cast_from(x[lane]));
        }
        let nm = max_nan::<f32>(m, vm);
        // Until a finite value arrives there is nothing to rescale (and
        // `-inf − -inf` would be NaN).
        if nm != neg_inf {
            let mut acc = s * (m - nm).exp();
            #[unroll]
            for lane in 0..nv {
                acc += (f32::cast_from(x[lane]) - nm).exp();
            }
            s = acc;
        }
        m = nm;
        j += step;
    }
    let mx = block_max::<f32>(&mut smem, m);
    let mut part = f32::new(0.0);
    if m != neg_inf {
        part = s * (m - mx).exp();
    }
    let total = block_sum::<f32>(&mut smem, part);
    (mx, total)
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn cross_entropy_kernel<L: Float, O: Float, N: Size>(
    logits: &Array<Vector<L, N>>,
    targets: &Array<i32>,
    out: &mut Array<O>,
    v: usize,
    rows: usize,
    neg_inf: f32,
    nan: f32,
    #[comptime] nv: usize,
) {
    let row = linear_cube();
    if row >= rows {
        terminate!();
    }
    let nvec = v / nv;
    let base = row * nvec; // row of (rows, V), in vectors
    let (m, s) = row_max_sum::<L, N>(logits, base, nvec, neg_inf, nv);
    if UNIT_POS == 0 {
        let t = targets[row];
        let mut r = nan;
        if t >= 0 && (t as usize) < v {
            let tv = logits[base + t as usize / nv];
            let k = t as usize % nv;
            let mut xt = f32::new(0.0);
            #[unroll]
            for lane in 0..nv {
                if lane == k {
                    xt = f32::cast_from(tv[lane]);
                }
            }
            r = s.ln() + m - xt;
        }
        out[row] = O::cast_from(r);
    }
}

/// A gradient row's factors, by the whole cube: the row's max, `g / Σexp`
/// (NaN for a target outside `0..v`), the target's column (`v` then: no
/// column is hot) and `g`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn grad_row<L: Float, G: Float, N: Size>(
    logits: &Array<Vector<L, N>>,
    targets: &Array<i32>,
    g: &Array<G>,
    row: usize,
    v: usize,
    neg_inf: f32,
    nan: f32,
    #[comptime] nv: usize,
) -> (f32, f32, usize, f32) {
    let (m, sum) = row_max_sum::<L, N>(logits, row * (v / nv), v / nv, neg_inf, nv);
    let t = targets[row];
    let gt = f32::cast_from(g[row]);
    let mut scale = gt / sum;
    // `v` matches no column: the one-hot part of an invalid target.
    let mut hot = v;
    if t < 0 || (t as usize) >= v {
        scale = nan;
    } else {
        hot = t as usize;
    }
    (m, scale, hot, gt)
}

/// Vector `j` of a gradient row from the same vector of its logits.
#[cube]
#[allow(clippy::too_many_arguments)]
fn grad_vector<L: Float, N: Size>(
    x: Vector<L, N>,
    j: usize,
    max: f32,
    scale: f32,
    hot: usize,
    gt: f32,
    #[comptime] nv: usize,
) -> Vector<L, N> {
    let mut y = Vector::<L, N>::empty();
    #[unroll]
    for lane in 0..nv {
        let mut d = (f32::cast_from(x[lane]) - max).exp() * scale;
        if j * nv + lane == hot {
            d -= gt;
        }
        y[lane] = L::cast_from(d);
    }
    y
}

/// `(softmax(row) − one_hot(target))·g` of each row: the row's max and
/// sum of exponentials as in `cross_entropy_kernel`, then every unit writes
/// its vectors of the gradient. A target outside `0..v` gives a NaN row.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn cross_entropy_grad_kernel<L: Float, G: Float, N: Size>(
    logits: &Array<Vector<L, N>>,
    targets: &Array<i32>,
    g: &Array<G>,
    out: &mut Array<Vector<L, N>>,
    v: usize,
    rows: usize,
    neg_inf: f32,
    nan: f32,
    #[comptime] nv: usize,
) {
    let row = linear_cube();
    if row >= rows {
        terminate!();
    }
    let (m, scale, hot, gt) = grad_row::<L, G, N>(logits, targets, g, row, v, neg_inf, nan, nv);
    let (nvec, base) = (v / nv, row * (v / nv));
    let step = CUBE_DIM as usize;
    let mut j = UNIT_POS as usize;
    while j < nvec {
        out[base + j] = grad_vector::<L, N>(logits[base + j], j, m, scale, hot, gt, nv);
        j += step;
    }
}

/// `cross_entropy_grad_kernel` writing each row over its logits: every
/// unit reads a vector before it writes it, and the row's statistics are
/// complete (the cube synchronized) before any unit writes.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn cross_entropy_grad_in_place_kernel<L: Float, G: Float, N: Size>(
    logits: &mut Array<Vector<L, N>>,
    targets: &Array<i32>,
    g: &Array<G>,
    v: usize,
    rows: usize,
    neg_inf: f32,
    nan: f32,
    #[comptime] nv: usize,
) {
    let row = linear_cube();
    if row >= rows {
        terminate!();
    }
    let (m, scale, hot, gt) = grad_row::<L, G, N>(logits, targets, g, row, v, neg_inf, nan, nv);
    let (nvec, base) = (v / nv, row * (v / nv));
    let step = CUBE_DIM as usize;
    let mut j = UNIT_POS as usize;
    while j < nvec {
        let x = logits[base + j];
        logits[base + j] = grad_vector::<L, N>(x, j, m, scale, hot, gt, nv);
        j += step;
    }
}

/// The widest vector (up to 16 bytes) of `elem` that divides a row of `v`.
fn row_vector<R: Runtime>(client: &ComputeClient<R>, elem: FloatElem, v: usize) -> usize {
    client
        .io_optimized_vector_sizes(elem.size())
        .find(|&nv| v.is_multiple_of(nv))
        .unwrap_or(1)
}

/// Cross-entropy's gradient of dense logits `(rows, v)` (stored as
/// `logits.0`) for `i32` targets and the loss adjoint `g` `[rows]` (stored
/// as `g.0`) into `out` `(rows, v)`, stored as the logits are.
pub fn launch_cross_entropy_grad<R: Runtime>(
    client: &ComputeClient<R>,
    logits: (FloatElem, &Handle),
    targets: &Handle,
    g: (FloatElem, &Handle),
    out: &Handle,
    rows: usize,
    v: usize,
) {
    launch_grad(client, logits, targets, g, Some(out), rows, v);
}

/// [`launch_cross_entropy_grad`] writing the gradient over `logits`
/// (which must be the caller's alone: nothing reads the logits after).
/// Bit for bit the same values.
pub fn launch_cross_entropy_grad_in_place<R: Runtime>(
    client: &ComputeClient<R>,
    logits: (FloatElem, &Handle),
    targets: &Handle,
    g: (FloatElem, &Handle),
    rows: usize,
    v: usize,
) {
    launch_grad(client, logits, targets, g, None, rows, v);
}

/// Both gradient launches: into `out`, or over the logits where `None`.
fn launch_grad<R: Runtime>(
    client: &ComputeClient<R>,
    logits: (FloatElem, &Handle),
    targets: &Handle,
    g: (FloatElem, &Handle),
    out: Option<&Handle>,
    rows: usize,
    v: usize,
) {
    if rows == 0 || v == 0 {
        return;
    }
    let nv = row_vector(client, logits.0, v);
    let n = rows * v / nv;
    with_float!(logits.0, L => with_float!(g.0, G => unsafe {
        let (x, t, gy) = (
            ArrayArg::from_raw_parts(logits.1.clone(), n),
            ArrayArg::from_raw_parts(targets.clone(), rows),
            ArrayArg::from_raw_parts(g.1.clone(), rows),
        );
        let (cubes, dim) = (grid_1d(rows, 1), CubeDim::new_1d(ROW_BLOCK));
        let (neg_inf, nan) = (f32::NEG_INFINITY, f32::NAN);
        match out {
            Some(out) => cross_entropy_grad_kernel::launch_unchecked::<L, G, R>(
                client,
                cubes,
                dim,
                nv,
                x,
                t,
                gy,
                ArrayArg::from_raw_parts(out.clone(), n),
                v,
                rows,
                neg_inf,
                nan,
                nv,
            ),
            None => cross_entropy_grad_in_place_kernel::launch_unchecked::<L, G, R>(
                client, cubes, dim, nv, x, t, gy, v, rows, neg_inf, nan, nv,
            ),
        }
    }));
}

/// Cross-entropy of dense logits `(rows, v)` (stored as `logits.0`)
/// against `i32` targets `[rows]`, into the loss `out` `[rows]` stored as
/// `out_elem`.
pub fn launch_cross_entropy<R: Runtime>(
    client: &ComputeClient<R>,
    logits: (FloatElem, &Handle),
    targets: &Handle,
    out: (FloatElem, &Handle),
    rows: usize,
    v: usize,
) {
    if rows == 0 {
        return;
    }
    let nv = row_vector(client, logits.0, v.max(1));
    with_float!(logits.0, L => with_float!(out.0, O => unsafe {
        cross_entropy_kernel::launch_unchecked::<L, O, R>(
            client,
            grid_1d(rows, 1),
            CubeDim::new_1d(ROW_BLOCK),
            nv,
            ArrayArg::from_raw_parts(logits.1.clone(), (rows * v / nv).max(1)),
            ArrayArg::from_raw_parts(targets.clone(), rows),
            ArrayArg::from_raw_parts(out.1.clone(), rows),
            v,
            rows,
            f32::NEG_INFINITY,
            f32::NAN,
            nv,
        );
    }));
}
