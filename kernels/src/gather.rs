//! Index-driven kernels: `gather` (embedding lookup, `table[ids]`), its
//! adjoint `scatter_add`, `one_hot`, and the causal mask over attention
//! scores. One thread per output element. An id outside the table yields
//! NaN (the reference reports an error); `scatter_add` ignores it.
//!
//! `scatter_add` is deterministic and atomic-free (wgpu has no float
//! atomics): the ids are read back to the host, which groups them by output
//! row (a CSR plan, `O(n_ids + size)`), and each output element sums its
//! own source rows, in `f32` (rounded once to the output's storage). The
//! read-back waits for the device once per call.
//!
//! Float tensors are stored as the launch's `elem`; gather and the causal
//! mask move stored elements as they are.

use crate::{grid_1d, linear_pos, with_float, FloatElem, ELEM_BLOCK};
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
    nan: f32,
) {
    let pos = linear_pos();
    if pos >= n {
        terminate!();
    }
    // out (n_ids, row_len), table (rows, row_len)
    let id = ids[pos / row_len];
    let mut v = F::cast_from(nan);
    if id >= 0 && (id as usize) < rows {
        v = table[id as usize * row_len + pos % row_len];
    }
    out[pos] = v;
}

/// `out[i, :] = table[ids[i], :]` for a dense `(rows, row_len)` table;
/// `table` and `out` are stored as `elem`.
#[allow(clippy::too_many_arguments)]
pub fn launch_gather<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
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
    with_float!(elem, F => unsafe {
        gather_kernel::launch_unchecked::<F, R>(
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
    });
}

#[cube(launch_unchecked)]
fn causal_mask_kernel<F: Float + CubeElement>(
    x: &Array<F>,
    out: &mut Array<F>,
    t: usize,
    s: usize,
    n: usize,
    neg_inf: f32,
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
        v = F::cast_from(neg_inf);
    }
    out[pos] = v;
}

/// Causal mask of dense scores `(..., t, s)` with `n` elements, stored as
/// `elem`.
pub fn launch_causal_mask<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    x: &Handle,
    out: &Handle,
    t: usize,
    s: usize,
    n: usize,
) {
    if n == 0 {
        return;
    }
    with_float!(elem, F => unsafe {
        causal_mask_kernel::launch_unchecked::<F, R>(
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
    });
}

#[cube(launch_unchecked)]
fn scatter_add_kernel<F: Float>(
    offsets: &Array<i32>,
    order: &Array<i32>,
    src: &Array<F>,
    out: &mut Array<F>,
    row_len: usize,
    n: usize,
) {
    let pos = linear_pos();
    if pos >= n {
        terminate!();
    }
    // out (size, row_len), src (n_ids, row_len); output row r sums the src
    // rows order[offsets[r]..offsets[r + 1]], in increasing index order.
    let (r, j) = (pos / row_len, pos % row_len);
    let (start, end) = (offsets[r] as usize, offsets[r + 1] as usize);
    let mut acc = f32::new(0.0);
    for k in start..end {
        acc += f32::cast_from(src[order[k] as usize * row_len + j]);
    }
    out[pos] = F::cast_from(acc);
}

/// Which source rows each output row of a scatter-add sums, as CSR:
/// `offsets` (`size + 1` entries) and `order`, the indices `i` with
/// `ids[i] == r` for each `r` in turn, increasing (the reference's order,
/// so the sums are bitwise deterministic). Ids outside `0..size` are left
/// out.
pub fn scatter_plan(ids: &[i32], size: usize) -> (Vec<i32>, Vec<i32>) {
    let mut counts = vec![0i32; size + 1];
    for &id in ids {
        if id >= 0 && (id as usize) < size {
            counts[id as usize + 1] += 1;
        }
    }
    for r in 0..size {
        counts[r + 1] += counts[r];
    }
    let mut next = counts.clone();
    let mut order = vec![0i32; counts[size] as usize];
    for (i, &id) in ids.iter().enumerate() {
        if id >= 0 && (id as usize) < size {
            let at = &mut next[id as usize];
            order[*at as usize] = i as i32;
            *at += 1;
        }
    }
    (counts, order)
}

/// `out[ids[i], :] += src[i, :]` into a dense `(size, row_len)` (rows no id
/// points at become zeros). The ids come from the host: the kernel reads
/// them through a CSR plan ([`scatter_plan`]) built here, so each output
/// element sums only its own rows; no float atomics (wgpu has none), and
/// the same sums in the same order as the reference. `src` and `out` are
/// stored as `elem`; each output element is summed in `f32`.
pub fn launch_scatter_add<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    ids: &[i32],
    src: &Handle,
    out: &Handle,
    row_len: usize,
    size: usize,
) {
    let n = size * row_len;
    if n == 0 {
        return;
    }
    let (offsets, mut order) = scatter_plan(ids, size);
    let used = order.len();
    if order.is_empty() {
        order.push(0);
    }
    let offsets_h = client.create_from_slice(i32::as_bytes(&offsets));
    let order_h = client.create_from_slice(i32::as_bytes(&order));
    with_float!(elem, F => unsafe {
        scatter_add_kernel::launch_unchecked::<F, R>(
            client,
            grid_1d(n, ELEM_BLOCK),
            CubeDim::new_1d(ELEM_BLOCK),
            ArrayArg::from_raw_parts(offsets_h, size + 1),
            ArrayArg::from_raw_parts(order_h, used.max(1)),
            ArrayArg::from_raw_parts(src.clone(), (ids.len() * row_len).max(1)),
            ArrayArg::from_raw_parts(out.clone(), n),
            row_len,
            n,
        );
    });
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

/// `out[i, j] = (ids[i] == j)` as a float stored as `elem`, dense
/// `(n_ids, depth)`.
pub fn launch_one_hot<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    ids: &Handle,
    out: &Handle,
    n_ids: usize,
    depth: usize,
) {
    let n = n_ids * depth;
    if n == 0 {
        return;
    }
    with_float!(elem, F => unsafe {
        one_hot_kernel::launch_unchecked::<F, R>(
            client,
            grid_1d(n, ELEM_BLOCK),
            CubeDim::new_1d(ELEM_BLOCK),
            ArrayArg::from_raw_parts(ids.clone(), n_ids),
            ArrayArg::from_raw_parts(out.clone(), n),
            depth,
            n,
        );
    });
}

#[cfg(test)]
mod tests {
    use super::scatter_plan;

    #[test]
    fn scatter_plan_groups_ids_by_row_in_index_order() {
        let (offsets, order) = scatter_plan(&[2, 0, 2, 5, -1, 2, 0], 4);
        // Row 0: indices 1, 6; row 1: none; row 2: 0, 2, 5; row 3: none.
        // 5 and -1 are outside 0..4 and left out.
        assert_eq!(offsets, vec![0, 2, 2, 5, 5]);
        assert_eq!(order, vec![1, 6, 0, 2, 5]);
        assert_eq!(scatter_plan(&[], 2), (vec![0, 0, 0], vec![]));
    }
}
