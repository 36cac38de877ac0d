//! Fused row kernels over the last axis: RMS normalization
//! (`x · rsqrt(mean(x²) + eps) · w`) and per-position cross-entropy
//! (`logsumexp(logits) − logits[target]`). One cube per row, shared-memory
//! reductions (see `reduce`); RMS norm has a vectorized fast path (row in
//! registers, plane reductions) for row lengths divisible by 4. A target
//! outside `0..V` yields NaN: the GPU cannot stop to report it; the
//! reference interpreter reports an error. Float tensors are stored as the
//! launch's `elem` and computed in `f32` (sums, shared memory, `eps`).

use crate::reduce::{block_max, block_sum, max_nan};
use crate::{grid_1d, linear_cube, with_float, FloatElem, ROW_BLOCK};
use cubecl::prelude::*;
use cubecl::server::Handle;

#[cube(launch_unchecked)]
fn rms_norm_kernel<F: Float + CubeElement>(
    x: &Array<F>,
    w: &Array<F>,
    out: &mut Array<F>,
    d: usize,
    rows: usize,
    eps: f32,
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
        out[base + j] = F::cast_from(f32::cast_from(x[base + j]) * inv * f32::cast_from(w[j]));
        j += step;
    }
}

/// Fast RMS norm for rows whose length is a multiple of the vector width:
/// one cube per row, `Vector` loads and stores, the row held in registers
/// (`per_thread` vectors per thread, unrolled) between the sum-of-squares
/// and the scaling pass, and a plane (warp) reduction followed by one
/// shared-memory step across planes when the device has plane operations.
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
    #[comptime] per_thread: usize,
    #[comptime] exact: bool,
    #[comptime] use_plane: bool,
    #[comptime] threads: usize,
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
    let mut part = f32::new(0.0);
    #[unroll]
    for l in 0..acc.vector_size() {
        part += acc[l];
    }
    let mut ss = f32::new(0.0);
    if use_plane {
        let mut smem = SharedMemory::<f32>::new(threads);
        let p = plane_sum(part);
        if UNIT_POS_PLANE == 0 {
            smem[(UNIT_POS / PLANE_DIM) as usize] = p;
        }
        sync_cube();
        let planes = (CUBE_DIM / PLANE_DIM) as usize;
        for k in 0..planes {
            ss += smem[k];
        }
    } else {
        let mut smem = SharedMemory::<f32>::new(threads);
        ss = block_sum::<f32>(&mut smem, part);
    }
    let inv = Vector::<f32, N>::new(f32::new(1.0) / (ss * inv_d + eps).sqrt());
    #[unroll]
    for i in 0..per_thread {
        let j = u + i * threads;
        if exact || j < dv {
            out[base + j] =
                Vector::<F, N>::cast_from(cache[i] * inv * Vector::<f32, N>::cast_from(w[j]));
        }
    }
}

/// Vector width of the fast RMS-norm path.
const RMS_VEC: usize = 4;
/// Most vectors a thread holds in registers on the fast path.
const RMS_MAX_PER_THREAD: usize = 16;
/// Threads per cube of the fast path for long rows.
const RMS_THREADS: usize = 256;

/// Whether `CARAMBA_RMS_NORM_SCALAR=1` forces the scalar kernel (for
/// benchmarking the fast path against it).
fn scalar_rms_forced() -> bool {
    static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| std::env::var("CARAMBA_RMS_NORM_SCALAR").is_ok_and(|v| v == "1"))
}

/// RMS norm of a dense `(rows, d)` tensor with weight `[d]` (both, and
/// `out`, stored as `elem`): the vectorized register-resident kernel when
/// `d` is a multiple of 4 and the row fits in registers, else the scalar
/// kernel.
#[allow(clippy::too_many_arguments)]
pub fn launch_rms_norm<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
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
    let props = client.properties();
    let plane_max = props.hardware.plane_size_max as usize;
    let use_plane = props
        .features
        .plane
        .contains(cubecl::ir::features::Plane::Ops)
        && props.hardware.plane_size_min as usize == plane_max
        && plane_max.is_power_of_two();
    if d.is_multiple_of(RMS_VEC) && !scalar_rms_forced() {
        let dv = d / RMS_VEC;
        let min_threads = if use_plane { plane_max.max(32) } else { 32 };
        let threads = dv.next_power_of_two().clamp(min_threads, RMS_THREADS);
        let per_thread = dv.div_ceil(threads);
        if per_thread <= RMS_MAX_PER_THREAD {
            with_float!(elem, F => unsafe {
                rms_norm_vec_kernel::launch_unchecked::<F, R>(
                    client,
                    grid_1d(rows, 1),
                    CubeDim::new_1d(threads as u32),
                    RMS_VEC,
                    ArrayArg::from_raw_parts(x.clone(), rows * dv),
                    ArrayArg::from_raw_parts(w.clone(), dv),
                    ArrayArg::from_raw_parts(out.clone(), rows * dv),
                    dv,
                    rows,
                    1.0 / d as f32,
                    eps,
                    per_thread,
                    per_thread * threads == dv,
                    use_plane,
                    threads,
                );
            });
            return;
        }
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
        );
    });
}

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
