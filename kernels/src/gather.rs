//! Index-driven kernels: `gather` (embedding lookup, `table[ids]`), its
//! adjoint `scatter_add`, `one_hot`, and the causal mask over attention
//! scores. One thread per output element. An id outside the table yields
//! NaN (the reference reports an error); `scatter_add` ignores it.
//!
//! `scatter_add` is deterministic and atomic-free (wgpu has no float
//! atomics): each output element scans every id, so it costs
//! `size × n_ids × row_len`; fine for tests, slow for a large vocabulary.

use crate::{grid_1d, linear_pos, ELEM_BLOCK};
use cubecl::prelude::*;
use cubecl::server::Handle;

#[cube(launch_unchecked)]
fn gather_kernel<F: Float + CubeElement>(
    table: &Array<F>,
    ids: &Array<i32>,
    out: &mut Array<F>,
    rows: usize,
    row_len: usize,
    n: usize,
    nan: F,
) {
    let pos = linear_pos();
    if pos >= n {
        terminate!();
    }
    // out (n_ids, row_len), table (rows, row_len)
    let id = ids[pos / row_len];
    let mut v = nan;
    if id >= 0 && (id as usize) < rows {
        v = table[id as usize * row_len + pos % row_len];
    }
    out[pos] = v;
}

/// `out[i, :] = table[ids[i], :]` for a dense `(rows, row_len)` table.
pub fn launch_gather<R: Runtime>(
    client: &ComputeClient<R>,
    table: &Handle,
    ids: &Handle,
    out: &Handle,
    rows: usize,
    row_len: usize,
    n_ids: usize,
) {
    let n = n_ids * row_len;
    if n == 0 {
        return;
    }
    unsafe {
        gather_kernel::launch_unchecked::<f32, R>(
            client,
            grid_1d(n, ELEM_BLOCK),
            CubeDim::new_1d(ELEM_BLOCK),
            ArrayArg::from_raw_parts(table.clone(), (rows * row_len).max(1)),
            ArrayArg::from_raw_parts(ids.clone(), n_ids),
            ArrayArg::from_raw_parts(out.clone(), n),
            rows,
            row_len,
            n,
            f32::NAN,
        );
    }
}

#[cube(launch_unchecked)]
fn causal_mask_kernel<F: Float + CubeElement>(
    x: &Array<F>,
    out: &mut Array<F>,
    t: usize,
    s: usize,
    n: usize,
    neg_inf: F,
) {
    let pos = linear_pos();
    if pos >= n {
        terminate!();
    }
    // x (..., T, S): query i sits at absolute position S - T + i.
    let j = pos % s;
    let i = (pos / s) % t;
    let mut v = x[pos];
    if j + t > i + s {
        v = neg_inf;
    }
    out[pos] = v;
}

/// Causal mask of dense scores `(..., t, s)` with `n` elements.
pub fn launch_causal_mask<R: Runtime>(
    client: &ComputeClient<R>,
    x: &Handle,
    out: &Handle,
    t: usize,
    s: usize,
    n: usize,
) {
    if n == 0 {
        return;
    }
    unsafe {
        causal_mask_kernel::launch_unchecked::<f32, R>(
            client,
            grid_1d(n, ELEM_BLOCK),
            CubeDim::new_1d(ELEM_BLOCK),
            ArrayArg::from_raw_parts(x.clone(), n),
            ArrayArg::from_raw_parts(out.clone(), n),
            t,
            s,
            n,
            f32::NEG_INFINITY,
        );
    }
}

#[cube(launch_unchecked)]
fn scatter_add_kernel<F: Float>(
    ids: &Array<i32>,
    src: &Array<F>,
    out: &mut Array<F>,
    n_ids: usize,
    row_len: usize,
    n: usize,
) {
    let pos = linear_pos();
    if pos >= n {
        terminate!();
    }
    // out (size, row_len), src (n_ids, row_len)
    let (r, j) = (pos / row_len, pos % row_len);
    let mut acc = F::new(0.0);
    for i in 0..n_ids {
        let id = ids[i];
        if id >= 0 && id as usize == r {
            acc += src[i * row_len + j];
        }
    }
    out[pos] = acc;
}

/// `out[ids[i], :] += src[i, :]` into a zeroed dense `(size, row_len)`.
pub fn launch_scatter_add<R: Runtime>(
    client: &ComputeClient<R>,
    ids: &Handle,
    src: &Handle,
    out: &Handle,
    n_ids: usize,
    row_len: usize,
    size: usize,
) {
    let n = size * row_len;
    if n == 0 {
        return;
    }
    unsafe {
        scatter_add_kernel::launch_unchecked::<f32, R>(
            client,
            grid_1d(n, ELEM_BLOCK),
            CubeDim::new_1d(ELEM_BLOCK),
            ArrayArg::from_raw_parts(ids.clone(), n_ids.max(1)),
            ArrayArg::from_raw_parts(src.clone(), (n_ids * row_len).max(1)),
            ArrayArg::from_raw_parts(out.clone(), n),
            n_ids,
            row_len,
            n,
        );
    }
}

#[cube(launch_unchecked)]
fn one_hot_kernel<F: Float>(ids: &Array<i32>, out: &mut Array<F>, depth: usize, n: usize) {
    let pos = linear_pos();
    if pos >= n {
        terminate!();
    }
    // out (n_ids, depth)
    let id = ids[pos / depth];
    let mut v = F::new(0.0);
    if id >= 0 && id as usize == pos % depth {
        v = F::new(1.0);
    }
    out[pos] = v;
}

/// `out[i, j] = (ids[i] == j)` as `f32`, dense `(n_ids, depth)`.
pub fn launch_one_hot<R: Runtime>(
    client: &ComputeClient<R>,
    ids: &Handle,
    out: &Handle,
    n_ids: usize,
    depth: usize,
) {
    let n = n_ids * depth;
    if n == 0 {
        return;
    }
    unsafe {
        one_hot_kernel::launch_unchecked::<f32, R>(
            client,
            grid_1d(n, ELEM_BLOCK),
            CubeDim::new_1d(ELEM_BLOCK),
            ArrayArg::from_raw_parts(ids.clone(), n_ids),
            ArrayArg::from_raw_parts(out.clone(), n),
            depth,
            n,
        );
    }
}
