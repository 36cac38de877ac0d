//! RMS normalization over the last axis and its two gradients (the IR's
//! `rms_norm` and `rms_norm_grad`), for dense `(rows, d)` tensors and a
//! weight `[d]`, stored as the launch's `elem` and computed in `f32`.
//!
//! - forward, `y = n·w` with `n = x·r`, `r = rsqrt(mean(x²) + eps)`: the
//!   row held in registers between its sum of squares and the scaling;
//! - `dx = r·g − x·r³·mean(g·x)` with `g = dy·w`: both sums from one read
//!   of the row;
//! - `dw = Σ_rows dy·n`: each group of units walks its own rows, a batch
//!   of rows' loads in flight at a time, recomputing each row's `r`, and
//!   accumulates `dy·n` per column in registers; the groups (as many as
//!   the device holds at once, where it tells its multiprocessors) write
//!   `f32` partial sums that are then reduced over groups (`reduce`'s
//!   column reduction), so no atomics and a fixed order of summation.
//!
//! A row is shared by one plane ([`Rows::Plane`], several rows per cube,
//! no barrier) where the device has plane operations and the row fits a
//! plane's registers (up to 8 vectors a unit: 2048 bf16 or 1024 f32
//! values), else by a cube. Short rows (a 576-wide model's) were what the
//! cube-per-row layout served worst: most of a 128-unit cube idle and a
//! barrier per row. Vectors of up to 16 bytes (the widest `Vector` that
//! divides `d`). For an f16/bf16 model the normalized row `n` is rounded
//! to the model's grid before it multiplies `w` (and before it enters
//! `dw`), as the IR defines it ([`Grid`]); the rounding works on `f32`
//! bits, so a device that keeps half tensors widened to `f32` rounds the
//! same way.

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
pub(crate) fn on_grid<N: Size>(
    v: Vector<f32, N>,
    inf: f32,
    #[comptime] grid: Grid,
) -> Vector<f32, N> {
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

/// Which units share a row, and so how its sums are reduced.
#[derive(CubeType, Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Rows {
    /// One plane per row, several rows per cube: plane reductions only, no
    /// barrier (short rows, on devices with plane operations).
    Plane,
    /// One cube per row, reduced within planes then across them through
    /// shared memory.
    CubeOfPlanes,
    /// One cube per row, reduced through a shared-memory tree (devices
    /// without plane operations).
    CubeTree,
}

/// The row this unit works on (`rows` rows per launch: past the end for
/// units of a last, partial cube) and its index among the row's units.
#[cube]
fn row_and_unit(#[comptime] mode: Rows) -> (usize, usize) {
    match mode {
        Rows::Plane => (
            linear_cube() * (CUBE_DIM / PLANE_DIM) as usize + (UNIT_POS / PLANE_DIM) as usize,
            UNIT_POS_PLANE as usize,
        ),
        _ => (linear_cube(), UNIT_POS as usize),
    }
}

/// The sum of `v` over the units of a row, which every one of them gets.
/// `smem` holds `2 · threads` values; `slot` (0 or 1) picks the half the
/// cube-of-planes path writes, so two calls in a row with different slots
/// need one barrier each.
#[cube]
fn row_sum(
    v: f32,
    smem: &mut SharedMemory<f32>,
    #[comptime] slot: usize,
    #[comptime] mode: Rows,
    #[comptime] threads: usize,
) -> f32 {
    let mut s = f32::new(0.0);
    match mode {
        Rows::Plane => {
            s = plane_sum(v);
        }
        Rows::CubeOfPlanes => {
            let p = plane_sum(v);
            if UNIT_POS_PLANE == 0 {
                smem[slot * threads + (UNIT_POS / PLANE_DIM) as usize] = p;
            }
            sync_cube();
            let planes = (CUBE_DIM / PLANE_DIM) as usize;
            for k in 0..planes {
                s += smem[slot * threads + k];
            }
        }
        Rows::CubeTree => {
            s = block_sum::<f32>(smem, v);
        }
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

/// Fast RMS norm: `Vector` loads and stores, the row held in registers
/// (`per_thread` vectors per unit, unrolled) between the sum of squares and
/// the scaling pass; a plane or a cube per row (`mode`, `threads` units).
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
    #[comptime] mode: Rows,
    #[comptime] threads: usize,
    #[comptime] grid: Grid,
) {
    let (row, u) = row_and_unit(mode);
    if row >= rows {
        terminate!();
    }
    let base = row * dv; // row of (rows, dv) vectors
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
    let ss = row_sum(lane_sum(acc), &mut smem, 0usize, mode, threads);
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

/// `dx` of RMS norm: the row of `x` and of `g = dy·w` in registers while
/// its units sum `x²` and `g·x`; a plane or a cube per row.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn rms_norm_grad_x_kernel<F: Float + CubeElement, N: Size>(
    x: &Array<Vector<F, N>>,
    w: &Array<Vector<F, N>>,
    dy: &Array<Vector<F, N>>,
    residual: &Array<Vector<F, N>>,
    out: &mut Array<Vector<F, N>>,
    dv: usize,
    rows: usize,
    inv_d: f32,
    eps: f32,
    #[comptime] per_thread: usize,
    #[comptime] exact: bool,
    #[comptime] mode: Rows,
    #[comptime] threads: usize,
    #[comptime] with_residual: bool,
) {
    let (row, u) = row_and_unit(mode);
    if row >= rows {
        terminate!();
    }
    let base = row * dv;
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
    let ss = row_sum(lane_sum(sq), &mut smem, 0usize, mode, threads);
    let t = row_sum(lane_sum(gx), &mut smem, 1usize, mode, threads);
    let r = f32::new(1.0) / (ss * inv_d + eps).sqrt();
    let rv = Vector::<f32, N>::new(r);
    let c = Vector::<f32, N>::new(r * r * r * t * inv_d);
    #[unroll]
    for i in 0..per_thread {
        let j = u + i * threads;
        if exact || j < dv {
            let dx = Vector::<F, N>::cast_from(gs[i] * rv - xs[i] * c);
            if comptime!(with_residual) {
                // Rounded as the gradient's own node is stored, then
                // added and rounded as the add's: the graph's two roundings.
                let y = Vector::<f32, N>::cast_from(dx)
                    + Vector::<f32, N>::cast_from(residual[base + j]);
                out[base + j] = Vector::<F, N>::cast_from(y);
            } else {
                out[base + j] = dx;
            }
        }
    }
}

/// `dw` of RMS norm, first pass: group `g` of `groups` (a plane for
/// `Rows::Plane`, else the cube; `threads` units) takes rows `g, g +
/// groups, …`, `batch` of them at a time: it loads those rows of `x` and
/// `dy` together (so `batch` rows' loads are in flight before any sum, and
/// a cube of planes meets one barrier per batch), recomputes each row's
/// `r`, adds `dy·n` to its columns' running sums in registers, and at the
/// end writes them as row `g` of `partial` `(groups, dv)`. A batch's rows
/// past the end load the last row again and count for nothing (`r` = 0).
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
    #[comptime] mode: Rows,
    #[comptime] threads: usize,
    #[comptime] grid: Grid,
    #[comptime] batch: usize,
) {
    let (g, u) = row_and_unit(mode);
    let mut acc = Array::<Vector<f32, N>>::new(per_thread);
    let mut xs = Array::<Vector<F, N>>::new(comptime!(batch * per_thread));
    let mut dys = Array::<Vector<F, N>>::new(comptime!(batch * per_thread));
    let mut sums = Array::<f32>::new(batch);
    #[unroll]
    for i in 0..per_thread {
        acc[i] = Vector::<f32, N>::new(f32::new(0.0));
    }
    let mut smem = SharedMemory::<f32>::new(2 * threads);
    let mut first = g;
    let mut half = 0usize;
    while first < rows {
        load_batch(
            x, dy, &mut xs, &mut dys, first, groups, rows, dv, u, per_thread, exact, threads, batch,
        );
        #[unroll]
        for k in 0..batch {
            let mut sq = Vector::<f32, N>::new(f32::new(0.0));
            #[unroll]
            for i in 0..per_thread {
                let vf = Vector::<f32, N>::cast_from(xs[k * per_thread + i]);
                sq += vf * vf;
            }
            sums[k] = lane_sum(sq);
        }
        batch_sums(&mut sums, &mut smem, half, mode, threads, batch);
        #[unroll]
        for k in 0..batch {
            let r = f32::new(1.0) / (sums[k] * inv_d + eps).sqrt();
            let r = Vector::<f32, N>::new(select(first + k * groups < rows, r, f32::new(0.0)));
            #[unroll]
            for i in 0..per_thread {
                let at = k * per_thread + i;
                let n = on_grid(Vector::<f32, N>::cast_from(xs[at]) * r, inf, grid);
                acc[i] += Vector::<f32, N>::cast_from(dys[at]) * n;
            }
        }
        first += batch * groups;
        half = 1 - half;
    }
    #[unroll]
    for i in 0..per_thread {
        let j = u + i * threads;
        if exact || j < dv {
            partial[g * dv + j] = acc[i];
        }
    }
}

/// Rows `first, first + groups, …` (`batch` of them; past `rows`, the
/// last row again) of `x` and `dy`, this unit's vectors of each, into `xs`
/// and `dys`, all loads issued before any is used.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_batch<F: Float + CubeElement, N: Size>(
    x: &Array<Vector<F, N>>,
    dy: &Array<Vector<F, N>>,
    xs: &mut Array<Vector<F, N>>,
    dys: &mut Array<Vector<F, N>>,
    first: usize,
    groups: usize,
    rows: usize,
    dv: usize,
    u: usize,
    #[comptime] per_thread: usize,
    #[comptime] exact: bool,
    #[comptime] threads: usize,
    #[comptime] batch: usize,
) {
    #[unroll]
    for k in 0..batch {
        let base = (first + k * groups).min(rows - 1) * dv;
        #[unroll]
        for i in 0..per_thread {
            let j = u + i * threads;
            let mut v = Vector::<F, N>::new(F::new(0.0));
            let mut e = Vector::<F, N>::new(F::new(0.0));
            if exact || j < dv {
                v = x[base + j];
                e = dy[base + j];
            }
            xs[k * per_thread + i] = v;
            dys[k * per_thread + i] = e;
        }
    }
}

/// [`row_sum`] of each of `batch` rows' values in `sums`, in place. A cube
/// of planes writes its planes' sums to half `half` of `smem` (`2 ·
/// threads` values, `batch` planes' worth a row fitting in one half) and
/// meets one barrier for the batch; alternating halves between batches
/// keeps the next batch's writes off values still being read.
#[cube]
fn batch_sums(
    sums: &mut Array<f32>,
    smem: &mut SharedMemory<f32>,
    half: usize,
    #[comptime] mode: Rows,
    #[comptime] threads: usize,
    #[comptime] batch: usize,
) {
    match mode {
        Rows::CubeOfPlanes => {
            let planes = (CUBE_DIM / PLANE_DIM) as usize;
            let plane = (UNIT_POS / PLANE_DIM) as usize;
            let at = half * threads;
            #[unroll]
            for k in 0..batch {
                let p = plane_sum(sums[k]);
                if UNIT_POS_PLANE == 0 {
                    smem[at + k * planes + plane] = p;
                }
            }
            sync_cube();
            #[unroll]
            for k in 0..batch {
                let mut s = f32::new(0.0);
                for q in 0..planes {
                    s += smem[at + k * planes + q];
                }
                sums[k] = s;
            }
        }
        _ =>
        {
            #[unroll]
            for k in 0..batch {
                sums[k] = row_sum(sums[k], smem, 0usize, mode, threads);
            }
        }
    }
}

/// Most vectors a unit holds in registers per row, when a cube shares the
/// row and when a plane does.
const MAX_PER_THREAD: usize = 16;
const PLANE_PER_THREAD: usize = 8;
/// Units per cube for a row, and the most the gradients use for long rows.
const ROW_THREADS: usize = 256;
const MAX_THREADS: usize = 1024;
/// Bytes of a row a unit holds at least when a cube shares the row.
const UNIT_BYTES: usize = 64;
/// Rows (planes) per cube when a plane takes a row.
const PLANE_ROWS: usize = 4;
/// Rows per group the weight gradient aims for where the device does not
/// tell its multiprocessors, and the most groups.
const W_ROWS_PER_GROUP: usize = 64;
const W_MAX_GROUPS: usize = 4096;
/// Units per multiprocessor of the weight gradient where the device tells
/// their number: as many cubes as stay resident together (four 128-unit
/// cubes of about 110 registers a unit for 4096-wide bf16 rows on an
/// H200), each with a batch of rows in flight.
const W_UNITS_PER_SM: usize = 512;
/// Vectors of `x` a unit of the weight gradient holds per batch of rows
/// (and as many of `dy`): a batch is this many over the unit's vectors a
/// row, at most [`W_MAX_BATCH`] rows. At 4, a 4096-wide bf16 or f32 row
/// (4 vectors a unit) goes one row a batch: on an H200 that beat 2 a batch
/// (BENCHMARKS, twenty-first session).
const W_BATCH_VECTORS: usize = 4;
const W_MAX_BATCH: usize = 4;

/// `CARAMBA_RMS_DW=rows:batch` (rows per group, or 0 for the default;
/// rows per batch), for benchmark sweeps of the weight gradient; read once
/// per process.
fn grad_w_override() -> Option<(usize, usize)> {
    static FORCED: std::sync::OnceLock<Option<(usize, usize)>> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| {
        let v = std::env::var("CARAMBA_RMS_DW").ok()?;
        let (r, b) = v.split_once(':')?;
        let (r, b) = (r.parse::<usize>().ok()?, b.parse::<usize>().ok()?);
        (b > 0).then_some((r, b))
    })
}

/// Bytes of a row each unit holds at least, where a cube shares the row
/// (`CARAMBA_RMS_UNIT_BYTES` overrides, for benchmark sweeps; read once
/// per process). At 64, a 4096-wide row takes 256 units in f32 and 128 in
/// bf16, 16 bytes a vector.
fn unit_bytes() -> usize {
    static BYTES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BYTES.get_or_init(|| {
        std::env::var("CARAMBA_RMS_UNIT_BYTES")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&b| b > 0)
            .unwrap_or(UNIT_BYTES)
    })
}

/// Whether `CARAMBA_RMS_NORM_SCALAR=1` forces the scalar forward kernel
/// (for benchmarking the vectorized one against it).
fn scalar_rms_forced() -> bool {
    static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| std::env::var("CARAMBA_RMS_NORM_SCALAR").is_ok_and(|v| v == "1"))
}

/// How a launch lays rows out: the vector width, who shares a row, and
/// how many units and vectors per unit that takes.
struct RowLayout {
    nv: usize,
    /// Vectors per row.
    dv: usize,
    mode: Rows,
    /// Units per row.
    threads: usize,
    per_thread: usize,
    /// Rows per cube (groups of rows, for the weight gradient).
    rows_per_cube: usize,
}

impl RowLayout {
    /// The layout for rows of `d` elements stored as `elem`, a cube per row
    /// having at most `max_threads` units; `None` when the row does not fit
    /// in registers that way.
    fn of<R: Runtime>(
        client: &ComputeClient<R>,
        elem: FloatElem,
        d: usize,
        max_threads: usize,
    ) -> Option<RowLayout> {
        let props = client.properties();
        let plane_max = props.hardware.plane_size_max as usize;
        let planes = props
            .features
            .plane
            .contains(cubecl::ir::features::Plane::Ops)
            && props.hardware.plane_size_min as usize == plane_max
            && plane_max.is_power_of_two();
        let nv = client
            .io_optimized_vector_sizes(elem.size())
            .find(|&nv| d.is_multiple_of(nv))
            .unwrap_or(1);
        let dv = d / nv;
        if planes && dv.div_ceil(plane_max) <= PLANE_PER_THREAD {
            return Some(RowLayout {
                nv,
                dv,
                mode: Rows::Plane,
                threads: plane_max,
                per_thread: dv.div_ceil(plane_max),
                rows_per_cube: PLANE_ROWS,
            });
        }
        let min_threads = if planes { plane_max.max(32) } else { 32 };
        // Fewer units a row where that keeps `unit_bytes()` of the row in
        // each unit's registers: more rows' loads in flight per
        // multiprocessor for the same units.
        let per_unit = (unit_bytes() / (nv * elem.size())).max(1);
        let mut threads = dv
            .div_ceil(per_unit)
            .next_power_of_two()
            .clamp(min_threads, ROW_THREADS);
        if dv.div_ceil(threads) > MAX_PER_THREAD {
            threads = max_threads.max(threads);
        }
        let per_thread = dv.div_ceil(threads);
        (per_thread <= MAX_PER_THREAD).then_some(RowLayout {
            nv,
            dv,
            mode: if planes {
                Rows::CubeOfPlanes
            } else {
                Rows::CubeTree
            },
            threads,
            per_thread,
            rows_per_cube: 1,
        })
    }

    /// [`RowLayout::of`] for the gradients, which have no scalar fallback:
    /// up to 1024 units per cube, so rows of up to 16384 vectors.
    fn for_grad<R: Runtime>(
        client: &ComputeClient<R>,
        elem: FloatElem,
        d: usize,
    ) -> Result<RowLayout, KernelError> {
        Self::of(client, elem, d, MAX_THREADS).ok_or_else(|| {
            KernelError::Unsupported(format!(
                "rms_norm_grad over rows of {d}: longer than {} vectors",
                MAX_THREADS * MAX_PER_THREAD,
            ))
        })
    }

    fn cube_dim(&self) -> CubeDim {
        CubeDim::new_1d((self.threads * self.rows_per_cube) as u32)
    }

    /// Whether every unit's last vector is inside the row.
    fn exact(&self) -> bool {
        self.per_thread * self.threads == self.dv
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
    let layout = RowLayout::of(client, elem, d, ROW_THREADS).filter(|_| !scalar_rms_forced());
    if let Some(l) = layout {
        let dv = l.dv;
        with_float!(elem, F => unsafe {
            rms_norm_vec_kernel::launch_unchecked::<F, R>(
                client,
                grid_1d(rows.div_ceil(l.rows_per_cube), 1),
                l.cube_dim(),
                l.nv,
                ArrayArg::from_raw_parts(x.clone(), rows * dv),
                ArrayArg::from_raw_parts(w.clone(), dv),
                ArrayArg::from_raw_parts(out.clone(), rows * dv),
                dv,
                rows,
                1.0 / d as f32,
                eps,
                f32::INFINITY,
                l.per_thread,
                l.exact(),
                l.mode,
                l.threads,
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

/// `dx` of RMS norm into `out` `(rows, d)`; with `residual` (dense
/// `(rows, d)`, stored as `elem`), `residual + dx` instead (a residual
/// stream's gradient, where the norm's input gradient joins the one that
/// skips it), `dx` rounded to `elem` before the sum and the sum after it,
/// as the two nodes would be.
pub fn launch_rms_norm_grad_x<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    ops: &NormGradOperands,
    residual: Option<&Handle>,
    out: &Handle,
) -> Result<(), KernelError> {
    let (rows, d) = (ops.rows, ops.d);
    if rows == 0 || d == 0 {
        return Ok(());
    }
    let l = RowLayout::for_grad(client, elem, d)?;
    let dv = l.dv;
    with_float!(elem, F => unsafe {
        rms_norm_grad_x_kernel::launch_unchecked::<F, R>(
            client,
            grid_1d(rows.div_ceil(l.rows_per_cube), 1),
            l.cube_dim(),
            l.nv,
            ArrayArg::from_raw_parts(ops.x.clone(), rows * dv),
            ArrayArg::from_raw_parts(ops.w.clone(), dv),
            ArrayArg::from_raw_parts(ops.dy.clone(), rows * dv),
            // Without one, the binding is dy's (never read then).
            ArrayArg::from_raw_parts(residual.unwrap_or(ops.dy).clone(), rows * dv),
            ArrayArg::from_raw_parts(out.clone(), rows * dv),
            dv,
            rows,
            1.0 / d as f32,
            ops.eps,
            l.per_thread,
            l.exact(),
            l.mode,
            l.threads,
            residual.is_some(),
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
    let l = RowLayout::for_grad(client, elem, d)?;
    let dv = l.dv;
    let batch = (W_BATCH_VECTORS / l.per_thread).clamp(1, W_MAX_BATCH);
    let sms = client.properties().hardware.num_streaming_multiprocessors;
    // As many groups as fit the device at once, each walking its rows in
    // batches: the fewest partial sums for every unit busy.
    let per_group = match sms {
        Some(sms) => {
            let per_sm = (W_UNITS_PER_SM / (l.threads * l.rows_per_cube)).max(1);
            rows.div_ceil(per_sm * sms as usize * l.rows_per_cube)
                .max(1)
        }
        None => W_ROWS_PER_GROUP,
    };
    let (per_group, batch) = match grad_w_override() {
        Some((r, b)) => (if r > 0 { r } else { per_group }, b),
        None => (per_group, batch),
    };
    // A cube of planes keeps a batch's plane sums in half of its `2 ·
    // threads` shared values: `batch` may not exceed the plane size. A
    // shared-memory tree has a barrier per row anyway.
    let plane = client.properties().hardware.plane_size_min.max(1) as usize;
    let batch = match l.mode {
        Rows::CubeTree => 1,
        Rows::CubeOfPlanes => batch.min(plane),
        Rows::Plane => batch,
    };
    let wanted = rows.div_ceil(per_group).clamp(1, W_MAX_GROUPS);
    let cubes = wanted.div_ceil(l.rows_per_cube);
    let groups = cubes * l.rows_per_cube;
    let partial = client.empty(groups * d * 4);
    with_float!(elem, F => unsafe {
        rms_norm_grad_w_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(cubes as u32, 1, 1),
            l.cube_dim(),
            l.nv,
            ArrayArg::from_raw_parts(ops.x.clone(), (rows * dv).max(1)),
            ArrayArg::from_raw_parts(ops.dy.clone(), (rows * dv).max(1)),
            ArrayArg::from_raw_parts(partial.clone(), groups * dv),
            dv,
            rows,
            groups,
            1.0 / d as f32,
            ops.eps,
            f32::INFINITY,
            l.per_thread,
            l.exact(),
            l.mode,
            l.threads,
            grid,
            batch,
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
