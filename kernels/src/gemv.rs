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
//! product (`launch_gemv_norm`, `Op::RmsNormMatMul`), and a second kernel
//! over the same helpers rotates column pairs by RoPE in its epilogue
//! (`launch_gemv_rope`, `Op::MatMulRope`). `a`, `b` and `out` are stored
//! as the launch's `elem`; the products are accumulated in `f32`.

use crate::rms_norm::{on_grid, Grid};
use crate::rope::RopeTable;
use crate::{grid_1d, with_float, FloatElem, View};
use cubecl::prelude::*;
use cubecl::server::Handle;

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
    launch(client, elem, a, None, b, out, Epilogue::None);
}

/// [`launch_gemv`] plus a dense `r (M, N)` stored as `elem`, added in the
/// epilogue: `out = a @ b + r`, the product rounded to `elem` before the
/// sum as a stored product would be (a residual add folded into the
/// linear layer before it).
pub fn launch_gemv_add<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    a: &View,
    b: &View,
    r: &View,
    out: &View,
) {
    launch(client, elem, a, None, b, out, Epilogue::Add(r));
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
/// its round trip are gone. Without `norm`, `w`, `eps` and `grid` are not
/// read and the norm's code is not generated.
///
/// The unit's output slot `n` (the cube covers a block of `cols` slots,
/// `col` within it) and its lane (lane 0 adds the column up).
#[cube]
fn unit_slot(#[comptime] k_contiguous: bool) -> (usize, usize, usize) {
    let u = UNIT_POS as usize;
    let lanes = comptime!(if k_contiguous { 32 } else { 4 });
    let cols = comptime!(GEMV_THREADS / lanes);
    let mut col = u % cols;
    let mut lane = u / cols;
    if k_contiguous {
        col = u / lanes;
        lane = u % lanes;
    }
    let cube = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    (cube * cols + col, col, lane)
}

/// The cube's units each leave their share of the sums of output column
/// `column` (the unit's slot's; read only where the slot `n < n_len`) in
/// `partial` (row `m`'s at `m·GEMV_THREADS + unit`), synchronized.
#[cube]
#[allow(clippy::too_many_arguments)]
fn gemv_partials<F: Float + CubeElement>(
    a: &Tensor<F>,
    w: &Tensor<F>,
    b: &Tensor<F>,
    partial: &mut SharedMemory<f32>,
    n: usize,
    n_len: usize,
    column: usize,
    lane: usize,
    eps: f32,
    inf: f32,
    #[comptime] rows: usize,
    #[comptime] k_contiguous: bool,
    #[comptime] norm: bool,
    #[comptime] grid: Grid,
) {
    let k_len = a.shape(1);
    let (b_k, b_n) = (b.stride(0), b.stride(1));
    let u = UNIT_POS as usize;
    let mut inv = Array::<f32>::new(rows);
    if norm {
        row_inverse_rms(a, partial, &mut inv, eps, rows);
    }
    let lanes = comptime!(if k_contiguous { 32 } else { 4 });
    let mut acc = Array::<f32>::new(rows);
    #[unroll]
    for m in 0..rows {
        acc[m] = f32::new(0.0);
    }
    if n < n_len {
        let mut k = lane;
        while k < k_len {
            let wb = f32::cast_from(b[k * b_k + column * b_n]);
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
}

/// Row `m`'s sum for the cube's column `col`: its lanes' shares in
/// `partial` (see [`gemv_partials`]) added in lane order.
#[cube]
fn column_sum(
    partial: &SharedMemory<f32>,
    m: usize,
    col: usize,
    #[comptime] k_contiguous: bool,
) -> f32 {
    let lanes = comptime!(if k_contiguous { 32 } else { 4 });
    let cols = comptime!(GEMV_THREADS / lanes);
    let mut s = f32::new(0.0);
    for l in 0..lanes {
        let mut at = l * cols + col;
        if k_contiguous {
            at = col * lanes + l;
        }
        s += partial[m * GEMV_THREADS + at];
    }
    s
}

/// The product (see [`gemv_partials`]) stored as it is, or with
/// `residual` plus `r (M, N)`: the product rounded to `F` as it would be
/// stored, then `r` added in `f32` and the sum rounded once, which is
/// what the product and an `add` of it compute (the executor's folded
/// adds). Without `residual`, `r` is not read.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn gemv_kernel<F: Float + CubeElement>(
    a: &Tensor<F>,
    w: &Tensor<F>,
    b: &Tensor<F>,
    r: &Tensor<F>,
    out: &mut Tensor<F>,
    eps: f32,
    inf: f32,
    #[comptime] rows: usize,
    #[comptime] k_contiguous: bool,
    #[comptime] norm: bool,
    #[comptime] grid: Grid,
    #[comptime] residual: bool,
) {
    let n_len = out.shape(1);
    let mut partial = SharedMemory::<f32>::new(GEMV_THREADS * rows);
    let (n, col, lane) = unit_slot(k_contiguous);
    gemv_partials(
        a,
        w,
        b,
        &mut partial,
        n,
        n_len,
        n,
        lane,
        eps,
        inf,
        rows,
        k_contiguous,
        norm,
        grid,
    );
    if lane == 0 && n < n_len {
        #[unroll]
        for m in 0..rows {
            let mut v = F::cast_from(column_sum(&partial, m, col, k_contiguous));
            if residual {
                let at = m * n_len + n;
                v = F::cast_from(f32::cast_from(v) + f32::cast_from(r[at]));
            }
            out[m * n_len + n] = v;
        }
    }
}

/// The product (see [`gemv_partials`]) with RoPE in its epilogue
/// (`Op::MatMulRope`). The cube's slots are not the output's columns in
/// order: `slots` (`[2N]`, from [`rope_slots`]) gives each slot's column
/// and rotation, so that the two columns of every rotated pair, `j` and
/// `j + d/2` of a head, are summed by one cube, four slots apart. Each sum
/// is put on the model dtype's `grid` (the product's result, as the op
/// rounds it) and shared; then each slot's column is rotated with its
/// partner's by the angles of its row's position (`row mod t`, from the
/// run's table) and stored.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn gemv_rope_kernel<F: Float + CubeElement>(
    a: &Tensor<F>,
    w: &Tensor<F>,
    b: &Tensor<F>,
    cos: &Array<f32>,
    sin: &Array<f32>,
    slots: &Array<i32>,
    out: &mut Tensor<F>,
    eps: f32,
    inf: f32,
    t: u32,
    half: u32,
    #[comptime] rows: usize,
    #[comptime] k_contiguous: bool,
    #[comptime] norm: bool,
    #[comptime] grid: Grid,
) {
    let n_len = out.shape(1);
    let cols = comptime!(GEMV_THREADS / if k_contiguous { 32 } else { 4 });
    let mut partial = SharedMemory::<f32>::new(GEMV_THREADS * rows);
    let mut sums = SharedMemory::<f32>::new(rows * cols);
    let (n, col, lane) = unit_slot(k_contiguous);
    let mut column = n;
    let mut rot = 0i32;
    if n < n_len {
        column = usize::cast_from(slots[2 * n]);
        rot = slots[2 * n + 1];
    }
    gemv_partials(
        a,
        w,
        b,
        &mut partial,
        n,
        n_len,
        column,
        lane,
        eps,
        inf,
        rows,
        k_contiguous,
        norm,
        grid,
    );
    if lane == 0 && n < n_len {
        #[unroll]
        for m in 0..rows {
            let s = column_sum(&partial, m, col, k_contiguous);
            sums[m * cols + col] = on_grid::<Const<1>>(Vector::new(s), inf, grid)[0];
        }
    }
    sync_cube();
    if lane == 0 && n < n_len {
        #[unroll]
        for m in 0..rows {
            let y = sums[m * cols + col];
            let mut v = y;
            if rot != 0 {
                let ti = u32::cast_from(m) % t;
                let mut j = rot - 1;
                let mut partner = col + 4;
                if rot < 0 {
                    j = -rot - 1;
                    partner = col - 4;
                }
                let at = usize::cast_from(ti * half + u32::cast_from(j));
                let (c, sn) = (cos[at], sin[at]);
                let p = sums[m * cols + partner];
                if rot > 0 {
                    v = y * c - p * sn;
                } else {
                    v = y * c + p * sn;
                }
            }
            out[m * n_len + column] = F::cast_from(v);
        }
    }
}

/// Each output slot's column and rotation for [`gemv_rope_kernel`]:
/// `[2N]` pairs `(column, code)`, code `0` for a column left as it is,
/// `j + 1` for the first column of pair `j` of a head (`j < d/2`) and
/// `−(j + 1)` for its second (`j + d/2`). In each range `s..e` the slots
/// come in groups of eight: four first columns `4g..4g+4` of a head, then
/// their partners, so that a pair is four slots apart in one cube (cubes
/// cover 8 or 64 slots, from multiples of 8). `None` when that cannot be:
/// a range starting off a multiple of 8, or a head dim not a multiple of 8.
pub fn rope_slots(n: usize, head_dim: usize, ranges: &[(usize, usize)]) -> Option<Vec<i32>> {
    let fits = |&(s, e): &(usize, usize)| {
        s.is_multiple_of(8) && s <= e && e <= n && (e - s).is_multiple_of(head_dim)
    };
    if head_dim == 0
        || !head_dim.is_multiple_of(8)
        || n > i32::MAX as usize
        || !ranges.iter().all(fits)
    {
        return None;
    }
    let half = head_dim / 2;
    let mut slots: Vec<i32> = (0..n).flat_map(|c| [c as i32, 0]).collect();
    for &(s, e) in ranges {
        for slot in s..e {
            let q = slot - s;
            let (head, r) = (q / head_dim, q % head_dim);
            let (g, w) = (r / 8, r % 8);
            let (j, column, code) = if w < 4 {
                let j = g * 4 + w;
                (j, s + head * head_dim + j, j as i32 + 1)
            } else {
                let j = g * 4 + w - 4;
                (j, s + head * head_dim + half + j, -(j as i32 + 1))
            };
            debug_assert!(j < half);
            slots[2 * slot] = column as i32;
            slots[2 * slot + 1] = code;
        }
    }
    Some(slots)
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
    launch(
        client,
        elem,
        a,
        Some((w, grid, eps)),
        b,
        out,
        Epilogue::None,
    );
}

/// RoPE in a gemv's epilogue (`Op::MatMulRope`): the angles' table for the
/// rows' positions (row `m` at position `m mod t`) and head dim, the
/// slots from [`rope_slots`] uploaded, and the model dtype's grid (the
/// product's sums are put on it before they are rotated).
pub struct GemvRope<'a> {
    pub table: &'a RopeTable,
    pub slots: &'a Handle,
    pub grid: Grid,
}

/// [`launch_gemv`] (`norm` `None`) or [`launch_gemv_norm`] (`norm` its
/// weight, grid and `eps`) with RoPE in the epilogue: `out`'s columns
/// rotated as `rope.slots` says.
#[allow(clippy::too_many_arguments)]
pub fn launch_gemv_rope<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    a: &View,
    norm: Option<(&View, Grid, f32)>,
    b: &View,
    out: &View,
    rope: &GemvRope,
) {
    launch(client, elem, a, norm, b, out, Epilogue::Rope(rope));
}

/// What a launch does after the sums.
enum Epilogue<'a> {
    None,
    /// A residual added.
    Add(&'a View),
    /// RoPE's rotation.
    Rope(&'a GemvRope<'a>),
}

/// Every launch: `norm` is the norm's weight, grid and `eps`, if any.
fn launch<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    a: &View,
    norm: Option<(&View, Grid, f32)>,
    b: &View,
    out: &View,
    epilogue: Epilogue,
) {
    let (m, n) = (out.shape[0], out.shape[1]);
    assert!(
        (1..=GEMV_MAX_ROWS).contains(&m)
            && a.offset == 0
            && norm.is_none_or(|(w, _, _)| w.offset == 0)
            && b.offset == 0
            && out.offset == 0
            && !matches!(epilogue, Epilogue::Add(r) if r.offset != 0 || r.shape != out.shape),
        "gemv takes 1 to {GEMV_MAX_ROWS} rows of views at element 0"
    );
    if n == 0 {
        return;
    }
    let k_contiguous = b.strides[0] == 1 && b.shape[0] > 1;
    let cols = if k_contiguous { 8 } else { 64 };
    // Without a norm, `a` stands in for the weight the kernel never reads.
    let (w, grid, eps) = norm.unwrap_or((a, Grid::Exact, 0.0));
    let (cubes, dim) = (
        grid_1d(n.div_ceil(cols), 1),
        CubeDim::new_1d(GEMV_THREADS as u32),
    );
    let rope = match epilogue {
        Epilogue::Rope(rope) => rope,
        Epilogue::None | Epilogue::Add(_) => {
            // Without a residual, `a` stands in for the `r` never read.
            let r = match epilogue {
                Epilogue::Add(r) => r,
                _ => a,
            };
            with_float!(elem, F => unsafe {
                gemv_kernel::launch_unchecked::<F, R>(
                    client,
                    cubes,
                    dim,
                    a.arg::<R>(),
                    w.arg::<R>(),
                    b.arg::<R>(),
                    r.arg::<R>(),
                    out.arg::<R>(),
                    eps,
                    f32::INFINITY,
                    m,
                    k_contiguous,
                    norm.is_some(),
                    grid,
                    matches!(epilogue, Epilogue::Add(_)),
                );
            });
            return;
        }
    };
    let table = rope.table;
    let entries = table.t * table.half;
    with_float!(elem, F => unsafe {
        gemv_rope_kernel::launch_unchecked::<F, R>(
            client,
            cubes,
            dim,
            a.arg::<R>(),
            w.arg::<R>(),
            b.arg::<R>(),
            ArrayArg::from_raw_parts(table.cos.clone(), entries.max(1)),
            ArrayArg::from_raw_parts(table.sin.clone(), entries.max(1)),
            ArrayArg::from_raw_parts(rope.slots.clone(), 2 * n),
            out.arg::<R>(),
            eps,
            f32::INFINITY,
            table.t.max(1) as u32,
            table.half as u32,
            m,
            k_contiguous,
            norm.is_some(),
            rope.grid,
        );
    });
}

#[cfg(test)]
mod tests {
    use super::rope_slots;

    /// Every column in one slot; each rotated pair four slots apart in one
    /// group of eight, the first column first; other columns in place.
    #[test]
    fn rope_slots_pair_columns_within_a_cube() {
        let (n, d) = (40 + 3 * 16 + 8, 16);
        let ranges = [(8, 40), (40, 88)];
        let slots = rope_slots(n, d, &ranges).unwrap();
        let mut seen = vec![false; n];
        for slot in 0..n {
            let (column, code) = (slots[2 * slot] as usize, slots[2 * slot + 1]);
            assert!(
                !std::mem::replace(&mut seen[column], true),
                "column {column} twice"
            );
            let rotated = ranges.iter().find(|&&(s, e)| (s..e).contains(&slot));
            let Some(&(s, _)) = rotated else {
                assert_eq!((column, code), (slot, 0));
                continue;
            };
            let j = code.unsigned_abs() as usize - 1;
            let head = (column - s) / d;
            if code > 0 {
                assert_eq!(column, s + head * d + j);
                let partner = slot + 4;
                assert_eq!(slot / 8, partner / 8);
                assert_eq!(slots[2 * partner] as usize, column + d / 2);
                assert_eq!(slots[2 * partner + 1], -code);
            } else {
                assert_eq!(column, s + head * d + d / 2 + j);
            }
        }
        assert!(seen.into_iter().all(|s| s));
        // Off the groups of eight: no slots.
        assert_eq!(rope_slots(n, 4, &[(8, 16)]), None);
        assert_eq!(rope_slots(n, 16, &[(4, 20)]), None);
    }
}
