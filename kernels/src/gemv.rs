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
//! the caches. `a`, `b` and `out` are stored as the launch's `elem`; the
//! products are accumulated in `f32`.

use crate::{grid_1d, with_float, FloatElem, View};
use cubecl::prelude::*;

/// The most rows the kernel takes; more go to the GEMM.
pub const GEMV_MAX_ROWS: usize = 8;
const GEMV_THREADS: usize = 256;

#[cube(launch_unchecked)]
fn gemv_kernel<F: Float + CubeElement>(
    a: &Tensor<F>,
    b: &Tensor<F>,
    out: &mut Tensor<F>,
    #[comptime] rows: usize,
    #[comptime] k_contiguous: bool,
) {
    let k_len = a.shape(1);
    let n_len = out.shape(1);
    let (b_k, b_n) = (b.stride(0), b.stride(1));
    let lanes = comptime!(if k_contiguous { 32 } else { 4 });
    let cols = comptime!(GEMV_THREADS / lanes);
    let u = UNIT_POS as usize;
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
            let w = f32::cast_from(b[k * b_k + n * b_n]);
            #[unroll]
            for m in 0..rows {
                acc[m] += f32::cast_from(a[m * k_len + k]) * w;
            }
            k += lanes;
        }
    }
    let mut partial = SharedMemory::<f32>::new(GEMV_THREADS * rows);
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
    let (m, n) = (out.shape[0], out.shape[1]);
    assert!(
        (1..=GEMV_MAX_ROWS).contains(&m) && a.offset == 0 && b.offset == 0 && out.offset == 0,
        "gemv takes 1 to {GEMV_MAX_ROWS} rows of views at element 0"
    );
    if n == 0 {
        return;
    }
    let k_contiguous = b.strides[0] == 1 && b.shape[0] > 1;
    let cols = if k_contiguous { 8 } else { 64 };
    with_float!(elem, F => unsafe {
        gemv_kernel::launch_unchecked::<F, R>(
            client,
            grid_1d(n.div_ceil(cols), 1),
            CubeDim::new_1d(GEMV_THREADS as u32),
            a.arg::<R>(),
            b.arg::<R>(),
            out.arg::<R>(),
            m,
            k_contiguous,
        );
    });
}
