//! Products of a few rows with a matrix, `out (M, N) = a (M, K) @ b (K, N)`
//! for `M ≤ GEMV_MAX_ROWS`: a decode step's linear layers (one token per
//! sequence). A GEMM tiles M, so at M = 1 it computes and stages a tile of
//! rows that are not there; this kernel instead streams `b` once, each of
//! its elements read by one unit and used for every row.
//!
//! One cube of `GEMV_THREADS` units covers a block of output columns, its
//! units split over `K` in lanes, and the lanes' partial sums are added in
//! shared memory (no planes needed, so it runs on lavapipe too). The split
//! follows `b`'s layout so that a cube's reads are coalesced:
//! - `K` contiguous (a linear layer's `[N, K]` weight read transposed): 8
//!   columns per cube, 32 lanes each reading consecutive `k`;
//! - `N` contiguous: 64 consecutive columns per cube, 4 lanes striding `k`.
//!
//! `a` (a few KiB) is read from global memory by every cube and served by
//! the caches. The same kernel folds an RMSNorm of `a`'s rows into the
//! product (`launch_gemv_norm`, `Op::RmsNormMatMul`). `a`, `b` and `out` are stored as the launch's `elem`; the
//! products are accumulated in `f32`.

use crate::rms_norm::{on_grid, Grid};
use crate::{grid_1d, with_float, FloatElem, View};
use cubecl::prelude::*;

/// The most rows the kernel takes; more go to the GEMM.
pub const GEMV_MAX_ROWS: usize = 8;
const GEMV_THREADS: usize = 256;

/// `out = a @ b` for a dense `a (M, K)` with `1 ≤ M ≤ GEMV_MAX_ROWS`, a
/// strided `b (K, N)` and a dense `out (M, N)`, all stored as `elem`, each
/// starting at element 0 of its buffer.
pub fn launch_gemv<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    a: &View,
    b: &View,
    out: &View,
) {
    launch(client, elem, a, None, b, out);
}

/// Each row's `1 / rms` (`rows` rows of `a`) into `inv`: every unit sums
/// its share of each row's squares, then a tree in `partial`.
#[cube]
fn row_inverse_rms<F: Float + CubeElement>(
    a: &Tensor<F>,
    partial: &mut SharedMemory<f32>,
    inv: &mut Array<f32>,
    eps: f32,
    #[comptime] rows: usize,
) {
    let k_len = a.shape(1);
    let u = UNIT_POS as usize;
    #[unroll]
    for m in 0..rows {
        let mut s = f32::new(0.0);
        let mut k = u;
        while k < k_len {
            let v = f32::cast_from(a[m * k_len + k]);
            s += v * v;
            k += GEMV_THREADS;
        }
        partial[m * GEMV_THREADS + u] = s;
    }
    sync_cube();
    // A runtime value (the cube is `GEMV_THREADS` units): a comptime one
    // cannot be halved in the loop.
    let mut half = CUBE_DIM as usize / 2;
    while half > 0 {
        if u < half {
            #[unroll]
            for m in 0..rows {
                let at = m * GEMV_THREADS + u;
                partial[at] += partial[at + half];
            }
        }
        sync_cube();
        half /= 2;
    }
    #[unroll]
    for m in 0..rows {
        inv[m] = f32::new(1.0) / (partial[m * GEMV_THREADS] / f32::cast_from(k_len) + eps).sqrt();
    }
    // `partial` is written again for the products' sums.
    sync_cube();
}

/// `out = a·b`, or with `norm` `out = rms_norm(a, w)·b` with the
/// normalized rows never stored (`Op::RmsNormMatMul`). With `norm`, each
/// cube first sums every row's squares (its units striding the row, then
/// a tree in shared memory), then streams its block of `b` as without,
/// normalizing each element of `a` where it reads it: `a·r` put on the
/// model dtype's `grid`, times `w[k]`, on the grid again (what `rms_norm`
/// stores for a half model), then the product in `f32`. At a decode step's
/// few rows the extra reads of `a` hit the caches; the norm's launch and
/// its round trip through memory are gone. Without `norm`, `w`, `eps` and
/// `grid` are not read and the norm's code is not generated.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn gemv_kernel<F: Float + CubeElement>(
    a: &Tensor<F>,
    w: &Tensor<F>,
    b: &Tensor<F>,
    out: &mut Tensor<F>,
    eps: f32,
    inf: f32,
    #[comptime] rows: usize,
    #[comptime] k_contiguous: bool,
    #[comptime] norm: bool,
    #[comptime] grid: Grid,
) {
    let k_len = a.shape(1);
    let n_len = out.shape(1);
    let (b_k, b_n) = (b.stride(0), b.stride(1));
    let u = UNIT_POS as usize;
    let mut partial = SharedMemory::<f32>::new(GEMV_THREADS * rows);
    let mut inv = Array::<f32>::new(rows);
    if norm {
        row_inverse_rms(a, &mut partial, &mut inv, eps, rows);
    }
    let lanes = comptime!(if k_contiguous { 32 } else { 4 });
    let cols = comptime!(GEMV_THREADS / lanes);
    let mut col = u % cols;
    let mut lane = u / cols;
    if k_contiguous {
        col = u / lanes;
        lane = u % lanes;
    }
    let cube = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    let n = cube * cols + col;
    let mut acc = Array::<f32>::new(rows);
    #[unroll]
    for m in 0..rows {
        acc[m] = f32::new(0.0);
    }
    if n < n_len {
        let mut k = lane;
        while k < k_len {
            let wb = f32::cast_from(b[k * b_k + n * b_n]);
            if norm {
                let g = f32::cast_from(w[k]);
                #[unroll]
                for m in 0..rows {
                    let x = f32::cast_from(a[m * k_len + k]);
                    let xn = on_grid::<Const<1>>(Vector::new(x * inv[m]), inf, grid);
                    let y = on_grid::<Const<1>>(Vector::new(xn[0] * g), inf, grid);
                    acc[m] += y[0] * wb;
                }
            } else {
                #[unroll]
                for m in 0..rows {
                    acc[m] += f32::cast_from(a[m * k_len + k]) * wb;
                }
            }
            k += lanes;
        }
    }
    #[unroll]
    for m in 0..rows {
        partial[m * GEMV_THREADS + u] = acc[m];
    }
    sync_cube();
    if lane == 0 && n < n_len {
        #[unroll]
        for m in 0..rows {
            let mut s = f32::new(0.0);
            for l in 0..lanes {
                let mut at = l * cols + col;
                if k_contiguous {
                    at = col * lanes + l;
                }
                s += partial[m * GEMV_THREADS + at];
            }
            out[m * n_len + n] = F::cast_from(s);
        }
    }
}

/// `out = rms_norm{eps}(a, w) @ b` for a dense `a (M, K)` with `1 ≤ M ≤
/// GEMV_MAX_ROWS`, a dense `w (K)`, a strided `b (K, N)` and a dense
/// `out (M, N)`, all stored as `elem`, each starting at element 0 of its
/// buffer; `grid` is the model dtype's (see [`Grid`]).
#[allow(clippy::too_many_arguments)]
pub fn launch_gemv_norm<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    grid: Grid,
    a: &View,
    w: &View,
    b: &View,
    out: &View,
    eps: f32,
) {
    launch(client, elem, a, Some((w, grid, eps)), b, out);
}

/// Both launches: `norm` is the norm's weight, grid and `eps`, if any.
fn launch<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    a: &View,
    norm: Option<(&View, Grid, f32)>,
    b: &View,
    out: &View,
) {
    let (m, n) = (out.shape[0], out.shape[1]);
    assert!(
        (1..=GEMV_MAX_ROWS).contains(&m)
            && a.offset == 0
            && norm.is_none_or(|(w, _, _)| w.offset == 0)
            && b.offset == 0
            && out.offset == 0,
        "gemv takes 1 to {GEMV_MAX_ROWS} rows of views at element 0"
    );
    if n == 0 {
        return;
    }
    let k_contiguous = b.strides[0] == 1 && b.shape[0] > 1;
    let cols = if k_contiguous { 8 } else { 64 };
    // Without a norm, `a` stands in for the weight the kernel never reads.
    let (w, grid, eps) = norm.unwrap_or((a, Grid::Exact, 0.0));
    with_float!(elem, F => unsafe {
        gemv_kernel::launch_unchecked::<F, R>(
            client,
            grid_1d(n.div_ceil(cols), 1),
            CubeDim::new_1d(GEMV_THREADS as u32),
            a.arg::<R>(),
            w.arg::<R>(),
            b.arg::<R>(),
            out.arg::<R>(),
            eps,
            f32::INFINITY,
            m,
            k_contiguous,
            norm.is_some(),
            grid,
        );
    });
}
