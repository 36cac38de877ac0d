//! RMS normalization over the last axis and its two gradients (the IR's
//! `rms_norm` and `rms_norm_grad`), for dense `(rows, d)` tensors and a
//! weight `[d]`, stored as the launch's `elem` and computed in `f32`.
//!
//! - forward, `y = n·w` with `n = x·r`, `r = rsqrt(mean(x²) + eps)`: one
//!   cube per row, the row held in registers between its sum of squares
//!   and the scaling;
//! - `dx = r·g − x·r³·mean(g·x)` with `g = dy·w`: one cube per row, both
//!   sums from one read of the row;
//! - `dw = Σ_rows dy·n`: each group of units (a plane where the device has
//!   plane operations, else a cube) walks its own rows, recomputing each
//!   row's `r`, and accumulates `dy·n` per column in registers; the groups'
//!   `f32` partial sums are then reduced over groups (`reduce`'s column
//!   reduction), so no atomics and a fixed order of summation.
//!
//! Vectors of up to 16 bytes (the widest `Vector` that divides `d`). For an
//! f16/bf16 model the normalized row `n` is rounded to the model's grid
//! before it multiplies `w` (and before it enters `dw`), as the IR defines
//! it ([`Grid`]); the rounding works on `f32` bits, so a device that keeps
//! half tensors widened to `f32` rounds the same way.

use crate::cast::{round_bf16, round_f16};
use crate::reduce::{block_sum, reduce_columns_into, ReduceKind};
use crate::{grid_1d, linear_cube, with_float, FloatElem, KernelError, ROW_BLOCK};
use cubecl::prelude::*;
use cubecl::server::Handle;

/// The grid `rms_norm` rounds its normalized row to before the product with
/// the weight: none for f32 models, the model's for f16/bf16 ones.
#[derive(CubeType, Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Grid {
    Exact,
    Bf16,
    F16,
}

#[cube]
fn on_grid<N: Size>(v: Vector<f32, N>, inf: f32, #[comptime] grid: Grid) -> Vector<f32, N> {
    let mut out = v;
    match grid {
        Grid::Exact => {}
        Grid::Bf16 =>
        {
            #[unroll]
            for l in 0..v.vector_size() {
                out[l] = round_bf16(v[l]);
            }
        }
        Grid::F16 =>
        {
            #[unroll]
            for l in 0..v.vector_size() {
                out[l] = round_f16(v[l], inf);
            }
        }
    }
    out
}

/// The sum of `v` over the cube, which every unit gets: a plane reduction
/// and one shared-memory step across planes when `use_plane`, else a
/// shared-memory tree. `smem` holds `2 · threads` values and `slot` (0 or
/// 1) picks the half the plane path writes, so two calls in a row with
/// different slots need one barrier each.
#[cube]
fn cube_sum(
    v: f32,
    smem: &mut SharedMemory<f32>,
    #[comptime] slot: usize,
    #[comptime] use_plane: bool,
    #[comptime] threads: usize,
) -> f32 {
    let mut s = f32::new(0.0);
    if use_plane {
        let p = plane_sum(v);
        if UNIT_POS_PLANE == 0 {
            smem[slot * threads + (UNIT_POS / PLANE_DIM) as usize] = p;
        }
        sync_cube();
        let planes = (CUBE_DIM / PLANE_DIM) as usize;
        for k in 0..planes {
            s += smem[slot * threads + k];
        }
    } else {
        s = block_sum::<f32>(smem, v);
    }
    s
}

/// The lanes of `v` added up.
#[cube]
fn lane_sum<N: Size>(v: Vector<f32, N>) -> f32 {
    let mut s = f32::new(0.0);
    #[unroll]
    for l in 0..v.vector_size() {
        s += v[l];
    }
    s
}

/// Scalar RMS norm for rows no vector divides or too long for registers:
/// one cube per row, two passes over it.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn rms_norm_kernel<F: Float + CubeElement>(
    x: &Array<F>,
    w: &Array<F>,
    out: &mut Array<F>,
    d: usize,
    rows: usize,
    eps: f32,
    inf: f32,
    #[comptime] grid: Grid,
) {
    let row = linear_cube();
    if row >= rows {
        terminate!();
    }
    let base = row * d; // row of (rows, d)
    let mut smem = SharedMemory::<f32>::new(ROW_BLOCK as usize);
    let step = CUBE_DIM as usize;
    let mut ss = f32::new(0.0);
    let mut j = UNIT_POS as usize;
    while j < d {
        let v = f32::cast_from(x[base + j]);
        ss += v * v;
        j += step;
    }
    let ss = block_sum::<f32>(&mut smem, ss);
    let inv = f32::new(1.0) / (ss / f32::cast_from(d) + eps).sqrt();
    j = UNIT_POS as usize;
    while j < d {
        let n = on_grid::<Const<1>>(Vector::new(f32::cast_from(x[base + j]) * inv), inf, grid);
        out[base + j] = F::cast_from(n[0] * f32::cast_from(w[j]));
        j += step;
    }
}

/// Fast RMS norm: one cube per row, `Vector` loads and stores, the row held
/// in registers (`per_thread` vectors per unit, unrolled) between the sum of
/// squares and the scaling pass.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn rms_norm_vec_kernel<F: Float + CubeElement, N: Size>(
    x: &Array<Vector<F, N>>,
    w: &Array<Vector<F, N>>,
    out: &mut Array<Vector<F, N>>,
    dv: usize,
    rows: usize,
    inv_d: f32,
    eps: f32,
    inf: f32,
    #[comptime] per_thread: usize,
    #[comptime] exact: bool,
    #[comptime] use_plane: bool,
    #[comptime] threads: usize,
    #[comptime] grid: Grid,
) {
    let row = linear_cube();
    if row >= rows {
        terminate!();
    }
    let base = row * dv; // row of (rows, dv) vectors
    let u = UNIT_POS as usize;
    let mut cache = Array::<Vector<f32, N>>::new(per_thread);
    let mut acc = Vector::<f32, N>::new(f32::new(0.0));
    #[unroll]
    for i in 0..per_thread {
        let j = u + i * threads;
        let mut v = Vector::<f32, N>::new(f32::new(0.0));
        if exact || j < dv {
            v = Vector::<f32, N>::cast_from(x[base + j]);
        }
        cache[i] = v;
        acc += v * v;
    }
    let mut smem = SharedMemory::<f32>::new(2 * threads);
    let ss = cube_sum(lane_sum(acc), &mut smem, 0usize, use_plane, threads);
    let inv = Vector::<f32, N>::new(f32::new(1.0) / (ss * inv_d + eps).sqrt());
    #[unroll]
    for i in 0..per_thread {
        let j = u + i * threads;
        if exact || j < dv {
            let n = on_grid(cache[i] * inv, inf, grid);
            out[base + j] = Vector::<F, N>::cast_from(n * Vector::<f32, N>::cast_from(w[j]));
        }
    }
}

/// `dx` of RMS norm: one cube per row, the row of `x` and of `g = dy·w` in
/// registers while the cube sums `x²` and `g·x`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn rms_norm_grad_x_kernel<F: Float + CubeElement, N: Size>(
    x: &Array<Vector<F, N>>,
    w: &Array<Vector<F, N>>,
    dy: &Array<Vector<F, N>>,
    out: &mut Array<Vector<F, N>>,
    dv: usize,
    rows: usize,
    inv_d: f32,
    eps: f32,
    #[comptime] per_thread: usize,
    #[comptime] exact: bool,
    #[comptime] use_plane: bool,
    #[comptime] threads: usize,
) {
    let row = linear_cube();
    if row >= rows {
        terminate!();
    }
    let base = row * dv;
    let u = UNIT_POS as usize;
    let mut xs = Array::<Vector<f32, N>>::new(per_thread);
    let mut gs = Array::<Vector<f32, N>>::new(per_thread);
    let mut sq = Vector::<f32, N>::new(f32::new(0.0));
    let mut gx = Vector::<f32, N>::new(f32::new(0.0));
    #[unroll]
    for i in 0..per_thread {
        let j = u + i * threads;
        let mut v = Vector::<f32, N>::new(f32::new(0.0));
        let mut g = Vector::<f32, N>::new(f32::new(0.0));
        if exact || j < dv {
            v = Vector::<f32, N>::cast_from(x[base + j]);
            g = Vector::<f32, N>::cast_from(dy[base + j]) * Vector::<f32, N>::cast_from(w[j]);
        }
        xs[i] = v;
        gs[i] = g;
        sq += v * v;
        gx += g * v;
    }
    let mut smem = SharedMemory::<f32>::new(2 * threads);
    let ss = cube_sum(lane_sum(sq), &mut smem, 0usize, use_plane, threads);
    let t = cube_sum(lane_sum(gx), &mut smem, 1usize, use_plane, threads);
    let r = f32::new(1.0) / (ss * inv_d + eps).sqrt();
    let rv = Vector::<f32, N>::new(r);
    let c = Vector::<f32, N>::new(r * r * r * t * inv_d);
    #[unroll]
    for i in 0..per_thread {
        let j = u + i * threads;
        if exact || j < dv {
            out[base + j] = Vector::<F, N>::cast_from(gs[i] * rv - xs[i] * c);
        }
    }
}

/// `dw` of RMS norm, first pass: group `g` of `groups` (a plane when
/// `use_plane`, else the cube; `group` units) takes rows `g, g + groups,
/// …`, recomputes each row's `r` and adds `dy·n` to its columns' running
/// sums (registers), then writes them as row `g` of `partial` `(groups,
/// dv)`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn rms_norm_grad_w_kernel<F: Float + CubeElement, N: Size>(
    x: &Array<Vector<F, N>>,
    dy: &Array<Vector<F, N>>,
    partial: &mut Array<Vector<f32, N>>,
    dv: usize,
    rows: usize,
    groups: usize,
    inv_d: f32,
    eps: f32,
    inf: f32,
    #[comptime] per_thread: usize,
    #[comptime] exact: bool,
    #[comptime] use_plane: bool,
    #[comptime] group: usize,
    #[comptime] grid: Grid,
) {
    let mut g = linear_cube();
    let mut u = UNIT_POS as usize;
    if use_plane {
        g = g * (CUBE_DIM as usize / group) + UNIT_POS as usize / group;
        u = UNIT_POS_PLANE as usize;
    }
    let mut acc = Array::<Vector<f32, N>>::new(per_thread);
    let mut cache = Array::<Vector<f32, N>>::new(per_thread);
    #[unroll]
    for i in 0..per_thread {
        acc[i] = Vector::<f32, N>::new(f32::new(0.0));
    }
    let mut smem = SharedMemory::<f32>::new(group);
    let mut row = g;
    while row < rows {
        let base = row * dv;
        let mut sq = Vector::<f32, N>::new(f32::new(0.0));
        #[unroll]
        for i in 0..per_thread {
            let j = u + i * group;
            let mut v = Vector::<f32, N>::new(f32::new(0.0));
            if exact || j < dv {
                v = Vector::<f32, N>::cast_from(x[base + j]);
            }
            cache[i] = v;
            sq += v * v;
        }
        let part = lane_sum(sq);
        let ss = if use_plane {
            plane_sum(part)
        } else {
            block_sum::<f32>(&mut smem, part)
        };
        let r = Vector::<f32, N>::new(f32::new(1.0) / (ss * inv_d + eps).sqrt());
        #[unroll]
        for i in 0..per_thread {
            let j = u + i * group;
            if exact || j < dv {
                let n = on_grid(cache[i] * r, inf, grid);
                acc[i] += Vector::<f32, N>::cast_from(dy[base + j]) * n;
            }
        }
        row += groups;
    }
    #[unroll]
    for i in 0..per_thread {
        let j = u + i * group;
        if exact || j < dv {
            partial[g * dv + j] = acc[i];
        }
    }
}

/// Most vectors a unit holds in registers per row.
const MAX_PER_THREAD: usize = 16;
/// Units per cube for a row, and the most the gradients use for long rows.
const ROW_THREADS: usize = 256;
const MAX_THREADS: usize = 1024;
/// Most vectors a plane's unit holds in the weight gradient's plane path
/// (each is two registers' worth: the row and the running sum).
const W_PLANE_PER_THREAD: usize = 8;
/// Planes per cube in the weight gradient's plane path.
const W_PLANES: usize = 4;
/// Rows per group the weight gradient aims for, and the most groups.
const W_ROWS_PER_GROUP: usize = 16;
const W_MAX_GROUPS: usize = 4096;

/// Whether `CARAMBA_RMS_NORM_SCALAR=1` forces the scalar forward kernel
/// (for benchmarking the vectorized one against it).
fn scalar_rms_forced() -> bool {
    static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| std::env::var("CARAMBA_RMS_NORM_SCALAR").is_ok_and(|v| v == "1"))
}

/// How a launch lays a row out: the vector width, and the plane size when
/// the device reduces within planes.
struct RowLayout {
    nv: usize,
    plane: Option<usize>,
}

impl RowLayout {
    fn of<R: Runtime>(client: &ComputeClient<R>, elem: FloatElem, d: usize) -> RowLayout {
        let props = client.properties();
        let plane_max = props.hardware.plane_size_max as usize;
        let use_plane = props
            .features
            .plane
            .contains(cubecl::ir::features::Plane::Ops)
            && props.hardware.plane_size_min as usize == plane_max
            && plane_max.is_power_of_two();
        let nv = client
            .io_optimized_vector_sizes(elem.size())
            .find(|&nv| d.is_multiple_of(nv))
            .unwrap_or(1);
        RowLayout {
            nv,
            plane: use_plane.then_some(plane_max),
        }
    }

    /// Units per cube (at most `max_threads`) and vectors per unit for one
    /// cube per row of `dv` vectors, if the row fits in registers.
    fn row_cube(&self, dv: usize, max_threads: usize) -> Option<(usize, usize)> {
        let min_threads = self.plane.map_or(32, |p| p.max(32));
        let mut threads = dv.next_power_of_two().clamp(min_threads, ROW_THREADS);
        if dv.div_ceil(threads) > MAX_PER_THREAD {
            threads = max_threads.max(threads);
        }
        let per_thread = dv.div_ceil(threads);
        (per_thread <= MAX_PER_THREAD).then_some((threads, per_thread))
    }

    /// [`RowLayout::row_cube`] for the gradients, which have no scalar
    /// fallback: up to 1024 units per cube, so rows of up to 16384 vectors.
    fn grad_cube(&self, dv: usize, d: usize) -> Result<(usize, usize), KernelError> {
        self.row_cube(dv, MAX_THREADS).ok_or_else(|| {
            KernelError::Unsupported(format!(
                "rms_norm_grad over rows of {d}: longer than {} vectors of {}",
                MAX_THREADS * MAX_PER_THREAD,
                self.nv
            ))
        })
    }
}

/// RMS norm of a dense `(rows, d)` tensor with weight `[d]` (both, and
/// `out`, stored as `elem`), the normalized row rounded to `grid`: the
/// vectorized register-resident kernel when the row fits in registers,
/// else the scalar kernel.
#[allow(clippy::too_many_arguments)]
pub fn launch_rms_norm<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    grid: Grid,
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
    let layout = RowLayout::of(client, elem, d);
    let dv = d / layout.nv;
    if let Some((threads, per_thread)) = layout
        .row_cube(dv, ROW_THREADS)
        .filter(|_| !scalar_rms_forced())
    {
        with_float!(elem, F => unsafe {
            rms_norm_vec_kernel::launch_unchecked::<F, R>(
                client,
                grid_1d(rows, 1),
                CubeDim::new_1d(threads as u32),
                layout.nv,
                ArrayArg::from_raw_parts(x.clone(), rows * dv),
                ArrayArg::from_raw_parts(w.clone(), dv),
                ArrayArg::from_raw_parts(out.clone(), rows * dv),
                dv,
                rows,
                1.0 / d as f32,
                eps,
                f32::INFINITY,
                per_thread,
                per_thread * threads == dv,
                layout.plane.is_some(),
                threads,
                grid,
            );
        });
        return;
    }
    with_float!(elem, F => unsafe {
        rms_norm_kernel::launch_unchecked::<F, R>(
            client,
            grid_1d(rows, 1),
            CubeDim::new_1d(ROW_BLOCK),
            ArrayArg::from_raw_parts(x.clone(), rows * d),
            ArrayArg::from_raw_parts(w.clone(), d),
            ArrayArg::from_raw_parts(out.clone(), rows * d),
            d,
            rows,
            eps,
            f32::INFINITY,
            grid,
        );
    });
}

/// The operands of an RMS norm gradient: `x` and `dy` dense `(rows, d)`,
/// `w` `[d]`, all stored as the launch's `elem`.
pub struct NormGradOperands<'a> {
    pub x: &'a Handle,
    pub w: &'a Handle,
    pub dy: &'a Handle,
    pub rows: usize,
    pub d: usize,
    pub eps: f32,
}

/// `dx` of RMS norm into `out` `(rows, d)`.
pub fn launch_rms_norm_grad_x<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    ops: &NormGradOperands,
    out: &Handle,
) -> Result<(), KernelError> {
    let (rows, d) = (ops.rows, ops.d);
    if rows == 0 || d == 0 {
        return Ok(());
    }
    let layout = RowLayout::of(client, elem, d);
    let dv = d / layout.nv;
    let (threads, per_thread) = layout.grad_cube(dv, d)?;
    with_float!(elem, F => unsafe {
        rms_norm_grad_x_kernel::launch_unchecked::<F, R>(
            client,
            grid_1d(rows, 1),
            CubeDim::new_1d(threads as u32),
            layout.nv,
            ArrayArg::from_raw_parts(ops.x.clone(), rows * dv),
            ArrayArg::from_raw_parts(ops.w.clone(), dv),
            ArrayArg::from_raw_parts(ops.dy.clone(), rows * dv),
            ArrayArg::from_raw_parts(out.clone(), rows * dv),
            dv,
            rows,
            1.0 / d as f32,
            ops.eps,
            per_thread,
            per_thread * threads == dv,
            layout.plane.is_some(),
            threads,
        );
    });
    Ok(())
}

/// `dw` of RMS norm into `out` `[d]` (stored as `elem`), the normalized
/// rows rounded to `grid`: per-group partial sums in `f32`, then their sum
/// over groups.
pub fn launch_rms_norm_grad_w<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    grid: Grid,
    ops: &NormGradOperands,
    out: &Handle,
) -> Result<(), KernelError> {
    let (rows, d) = (ops.rows, ops.d);
    if d == 0 {
        return Ok(());
    }
    let layout = RowLayout::of(client, elem, d);
    let dv = d / layout.nv;
    let wanted = rows.div_ceil(W_ROWS_PER_GROUP).clamp(1, W_MAX_GROUPS);
    // A plane per group where the device has plane operations and the row
    // fits a plane's registers; else a cube per group.
    let plane = layout
        .plane
        .filter(|&p| dv.div_ceil(p) <= W_PLANE_PER_THREAD);
    let (group, per_thread, cubes, cube_dim) = match plane {
        Some(p) => {
            let cubes = wanted.div_ceil(W_PLANES);
            (p, dv.div_ceil(p), cubes, p * W_PLANES)
        }
        None => {
            let (threads, per_thread) = layout.grad_cube(dv, d)?;
            (threads, per_thread, wanted, threads)
        }
    };
    let groups = cubes * (cube_dim / group);
    let partial = client.empty(groups * d * 4);
    with_float!(elem, F => unsafe {
        rms_norm_grad_w_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(cubes as u32, 1, 1),
            CubeDim::new_1d(cube_dim as u32),
            layout.nv,
            ArrayArg::from_raw_parts(ops.x.clone(), (rows * dv).max(1)),
            ArrayArg::from_raw_parts(ops.dy.clone(), (rows * dv).max(1)),
            ArrayArg::from_raw_parts(partial.clone(), groups * dv),
            dv,
            rows,
            groups,
            1.0 / d as f32,
            ops.eps,
            f32::INFINITY,
            per_thread,
            per_thread * group == dv,
            plane.is_some(),
            group,
            grid,
        );
    });
    reduce_columns_into(
        client,
        ReduceKind::Sum,
        (FloatElem::F32, elem),
        &partial,
        out,
        1,
        groups,
        d,
    );
    Ok(())
}
