//! Training kernels: the fused optimizer updates (AdamW, Lion, SGD), the
//! sum of squares behind the global gradient norm, and gradient
//! accumulation over micro-batches.
//!
//! Each update reads a parameter's weight, gradient and moments once and
//! writes them once: one launch per parameter does what PyTorch's
//! `foreach`/fused optimizers do. The per-step scalars (learning rate,
//! betas, bias corrections, the weight-decay factor) are computed on the
//! host in f64 and rounded once, exactly as `caramba_runtime::train`'s host
//! optimizer does, so the element loop here is the same f32 arithmetic in
//! the same order. Every update also takes a `grad_scale` applied as the
//! gradient is read: the mean over micro-batches and the clipping factor
//! cost no pass of their own.
//!
//! The global norm is atomic-free: each parameter's launch writes one
//! partial sum per cube into its own slice of a shared buffer, and the host
//! reads back only those partials (a few dozen floats per parameter).
//!
//! All buffers are dense `f32`; launches use 4-wide vectors when the length
//! allows it (the updates are bandwidth-bound). An update may also write
//! the new weights rounded to a narrower storage ([`HalfCopy`]): the copy a
//! mixed-precision graph reads in place of casting the f32 weights itself,
//! rounded as the cast would round them (nearest even).

use crate::reduce::block_sum;
use crate::{grid_1d, linear_pos, with_float, FloatElem, ELEM_BLOCK, ROW_BLOCK};
use cubecl::prelude::*;
use cubecl::server::Handle;

/// One AdamW step's scalars (see `Rule::Adamw` in `runtime/src/train/optim.rs`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamwStep {
    pub b1: f32,
    pub b2: f32,
    pub one_minus_b1: f32,
    pub one_minus_b2: f32,
    pub eps: f32,
    /// lr / (1 − β1^t)
    pub step_size: f32,
    /// √(1 − β2^t)
    pub bc2_sqrt: f32,
    /// 1 − lr·wd for decayed parameters, 1 for the others.
    pub keep: f32,
}

/// One Lion step's scalars.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LionStep {
    pub b1: f32,
    pub b2: f32,
    pub one_minus_b1: f32,
    pub one_minus_b2: f32,
    pub lr: f32,
    /// 1 − lr·wd for decayed parameters, 1 for the others.
    pub keep: f32,
}

/// One SGD step's scalars. As in PyTorch, weight decay is L2 (added to the
/// gradient); `wd` is 0 for parameters that are not decayed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdStep {
    pub momentum: f32,
    pub lr: f32,
    pub wd: f32,
}

/// Where an update also writes its new weights, rounded once: a dense
/// buffer of the parameter's length in `elem` storage.
#[derive(Clone, Copy, Debug)]
pub struct HalfCopy<'a> {
    pub elem: FloatElem,
    pub handle: &'a Handle,
}

/// `copy[i] = w` rounded to `S` (nearest even), when the launch has a copy.
#[cube]
fn write_copy<F: Float, S: Float, N: Size>(
    copy: &mut Array<Vector<S, N>>,
    i: usize,
    w: Vector<F, N>,
    #[comptime] has_copy: bool,
) {
    if has_copy {
        copy[i] = Vector::<S, N>::cast_from(w);
    }
}

/// Runs `$launch` with `$H` the copy's storage type and `$copy`/`$has` its
/// array and flag: `w`'s own array (never written) when there is none.
macro_rules! with_copy {
    ($copy:expr, $w:expr, $nv:expr, $H:ident, $arr:ident, $has:ident => $launch:expr) => {
        match $copy {
            Some(c) => with_float!(c.elem, $H => {
                let $arr = unsafe { ArrayArg::from_raw_parts(c.handle.clone(), $nv) };
                let $has = true;
                $launch
            }),
            None => {
                type $H = f32;
                let $arr = unsafe { ArrayArg::from_raw_parts($w.clone(), $nv) };
                let $has = false;
                $launch
            }
        }
    };
}

/// Vector width for a dense buffer of `n` elements.
fn width(n: usize) -> usize {
    if n.is_multiple_of(4) {
        4
    } else {
        1
    }
}

/// `(grid, vectors, width)` for an elementwise launch over `n` elements.
fn elementwise_grid(n: usize) -> (CubeCount, usize, usize) {
    let w = width(n);
    let nv = n / w;
    (grid_1d(nv, ELEM_BLOCK), nv, w)
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn adamw_kernel<F: Float + CubeElement, S: Float, N: Size>(
    w: &mut Array<Vector<F, N>>,
    g: &Array<Vector<F, N>>,
    m: &mut Array<Vector<F, N>>,
    v: &mut Array<Vector<F, N>>,
    copy: &mut Array<Vector<S, N>>,
    len: usize,
    b1: F,
    b2: F,
    one_minus_b1: F,
    one_minus_b2: F,
    eps: F,
    step_size: F,
    bc2_sqrt: F,
    keep: F,
    grad_scale: F,
    #[comptime] has_copy: bool,
) {
    let i = linear_pos();
    if i >= len {
        terminate!();
    }
    let gi = g[i] * Vector::new(grad_scale);
    let mi = Vector::new(b1) * m[i] + Vector::new(one_minus_b1) * gi;
    let vi = Vector::new(b2) * v[i] + Vector::new(one_minus_b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    let wi = w[i] * Vector::new(keep)
        - Vector::new(step_size) * mi / (vi.sqrt() / Vector::new(bc2_sqrt) + Vector::new(eps));
    w[i] = wi;
    write_copy::<F, S, N>(copy, i, wi, has_copy);
}

/// AdamW on `n` elements: updates `w`, `m` and `v` in place from `g`
/// (read as `g · grad_scale`), and writes `copy` when given.
#[allow(clippy::too_many_arguments)]
pub fn launch_adamw<R: Runtime>(
    client: &ComputeClient<R>,
    s: &AdamwStep,
    w: &Handle,
    g: &Handle,
    m: &Handle,
    v: &Handle,
    copy: Option<HalfCopy>,
    n: usize,
    grad_scale: f32,
) {
    if n == 0 {
        return;
    }
    let (grid, nv, vw) = elementwise_grid(n);
    let arr = |h: &Handle| unsafe { ArrayArg::from_raw_parts(h.clone(), nv) };
    with_copy!(copy, w, nv, H, copy_arr, has_copy => unsafe {
        adamw_kernel::launch_unchecked::<f32, H, R>(
            client,
            grid,
            CubeDim::new_1d(ELEM_BLOCK),
            vw,
            arr(w),
            arr(g),
            arr(m),
            arr(v),
            copy_arr,
            nv,
            s.b1,
            s.b2,
            s.one_minus_b1,
            s.one_minus_b2,
            s.eps,
            s.step_size,
            s.bc2_sqrt,
            s.keep,
            grad_scale,
            has_copy,
        );
    });
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn lion_kernel<F: Float + CubeElement, S: Float, N: Size>(
    w: &mut Array<Vector<F, N>>,
    g: &Array<Vector<F, N>>,
    m: &mut Array<Vector<F, N>>,
    copy: &mut Array<Vector<S, N>>,
    len: usize,
    b1: F,
    b2: F,
    one_minus_b1: F,
    one_minus_b2: F,
    lr: F,
    keep: F,
    grad_scale: F,
    #[comptime] has_copy: bool,
) {
    let i = linear_pos();
    if i >= len {
        terminate!();
    }
    let gi = g[i] * Vector::new(grad_scale);
    let mi = m[i];
    let c = Vector::new(b1) * mi + Vector::new(one_minus_b1) * gi;
    // sign with sign(0) = 0, as torch.sign.
    let zero = Vector::<F, N>::new(F::new(0.0));
    let one = Vector::<F, N>::new(F::new(1.0));
    let sign =
        select_many(c.greater_than(zero), one, zero) - select_many(c.less_than(zero), one, zero);
    let wi = w[i] * Vector::new(keep) - Vector::new(lr) * sign;
    w[i] = wi;
    m[i] = Vector::new(b2) * mi + Vector::new(one_minus_b2) * gi;
    write_copy::<F, S, N>(copy, i, wi, has_copy);
}

/// Lion on `n` elements: updates `w` and `m` in place from `g` (read as
/// `g · grad_scale`), and writes `copy` when given.
#[allow(clippy::too_many_arguments)]
pub fn launch_lion<R: Runtime>(
    client: &ComputeClient<R>,
    s: &LionStep,
    w: &Handle,
    g: &Handle,
    m: &Handle,
    copy: Option<HalfCopy>,
    n: usize,
    grad_scale: f32,
) {
    if n == 0 {
        return;
    }
    let (grid, nv, vw) = elementwise_grid(n);
    let arr = |h: &Handle| unsafe { ArrayArg::from_raw_parts(h.clone(), nv) };
    with_copy!(copy, w, nv, H, copy_arr, has_copy => unsafe {
        lion_kernel::launch_unchecked::<f32, H, R>(
            client,
            grid,
            CubeDim::new_1d(ELEM_BLOCK),
            vw,
            arr(w),
            arr(g),
            arr(m),
            copy_arr,
            nv,
            s.b1,
            s.b2,
            s.one_minus_b1,
            s.one_minus_b2,
            s.lr,
            s.keep,
            grad_scale,
            has_copy,
        );
    });
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn sgd_momentum_kernel<F: Float + CubeElement, S: Float, N: Size>(
    w: &mut Array<Vector<F, N>>,
    g: &Array<Vector<F, N>>,
    b: &mut Array<Vector<F, N>>,
    copy: &mut Array<Vector<S, N>>,
    len: usize,
    momentum: F,
    lr: F,
    wd: F,
    grad_scale: F,
    #[comptime] has_copy: bool,
) {
    let i = linear_pos();
    if i >= len {
        terminate!();
    }
    let wi = w[i];
    let d = g[i] * Vector::new(grad_scale) + Vector::new(wd) * wi;
    let bi = Vector::new(momentum) * b[i] + d;
    b[i] = bi;
    let wn = wi - Vector::new(lr) * bi;
    w[i] = wn;
    write_copy::<F, S, N>(copy, i, wn, has_copy);
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn sgd_kernel<F: Float + CubeElement, S: Float, N: Size>(
    w: &mut Array<Vector<F, N>>,
    g: &Array<Vector<F, N>>,
    copy: &mut Array<Vector<S, N>>,
    len: usize,
    lr: F,
    wd: F,
    grad_scale: F,
    #[comptime] has_copy: bool,
) {
    let i = linear_pos();
    if i >= len {
        terminate!();
    }
    let wi = w[i];
    let wn = wi - Vector::new(lr) * (g[i] * Vector::new(grad_scale) + Vector::new(wd) * wi);
    w[i] = wn;
    write_copy::<F, S, N>(copy, i, wn, has_copy);
}

/// SGD on `n` elements: updates `w` (and the momentum buffer `b`, when
/// given) in place from `g` (read as `g · grad_scale`), and writes `copy`
/// when given. Without a buffer it is plain SGD, as the host optimizer
/// does when `momentum` is 0.
#[allow(clippy::too_many_arguments)]
pub fn launch_sgd<R: Runtime>(
    client: &ComputeClient<R>,
    s: &SgdStep,
    w: &Handle,
    g: &Handle,
    b: Option<&Handle>,
    copy: Option<HalfCopy>,
    n: usize,
    grad_scale: f32,
) {
    if n == 0 {
        return;
    }
    let (grid, nv, vw) = elementwise_grid(n);
    let arr = |h: &Handle| unsafe { ArrayArg::from_raw_parts(h.clone(), nv) };
    let dim = CubeDim::new_1d(ELEM_BLOCK);
    with_copy!(copy, w, nv, H, copy_arr, has_copy => unsafe {
        match b {
            Some(b) => sgd_momentum_kernel::launch_unchecked::<f32, H, R>(
                client,
                grid,
                dim,
                vw,
                arr(w),
                arr(g),
                arr(b),
                copy_arr,
                nv,
                s.momentum,
                s.lr,
                s.wd,
                grad_scale,
                has_copy,
            ),
            None => sgd_kernel::launch_unchecked::<f32, H, R>(
                client,
                grid,
                dim,
                vw,
                arr(w),
                arr(g),
                copy_arr,
                nv,
                s.lr,
                s.wd,
                grad_scale,
                has_copy,
            ),
        }
    });
}

/// Most cubes (hence partial sums) one tensor's sum of squares uses.
const SUM_SQUARES_CUBES: usize = 64;

/// How many partial sums [`launch_sum_squares`] writes for `n` elements.
pub fn sum_squares_partials(n: usize) -> usize {
    let nv = n / width(n);
    nv.div_ceil(ROW_BLOCK as usize).clamp(1, SUM_SQUARES_CUBES)
}

#[cube(launch_unchecked)]
fn sum_squares_kernel<F: Float + CubeElement, N: Size>(
    x: &Array<Vector<F, N>>,
    partials: &mut Array<F>,
    len: usize,
    offset: usize,
) {
    let cube = CUBE_POS_X as usize;
    let step = CUBE_COUNT_X as usize * CUBE_DIM_X as usize;
    let mut acc = Vector::<F, N>::new(F::new(0.0));
    let mut i = cube * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    while i < len {
        let v = x[i];
        acc += v * v;
        i += step;
    }
    let mut part = F::new(0.0);
    #[unroll]
    for l in 0..acc.vector_size() {
        part += acc[l];
    }
    let mut smem = SharedMemory::<F>::new(ROW_BLOCK as usize);
    let total = block_sum::<F>(&mut smem, part);
    if UNIT_POS == 0 {
        partials[offset + cube] = total;
    }
}

/// Writes the sum of squares of `x` (`n` elements) as
/// [`sum_squares_partials`]`(n)` partial sums into `partials[offset..]`;
/// the caller adds them up (on the host, in f64).
pub fn launch_sum_squares<R: Runtime>(
    client: &ComputeClient<R>,
    x: &Handle,
    n: usize,
    partials: &Handle,
    offset: usize,
) {
    let cubes = sum_squares_partials(n);
    let vw = width(n);
    unsafe {
        sum_squares_kernel::launch_unchecked::<f32, R>(
            client,
            CubeCount::Static(cubes as u32, 1, 1),
            CubeDim::new_1d(ROW_BLOCK),
            vw,
            ArrayArg::from_raw_parts(x.clone(), (n / vw).max(1)),
            ArrayArg::from_raw_parts(partials.clone(), offset + cubes),
            n / vw,
            offset,
        );
    }
}

#[cube(launch_unchecked)]
fn accumulate_kernel<F: Float + CubeElement, N: Size>(
    acc: &mut Array<Vector<F, N>>,
    g: &Array<Vector<F, N>>,
    len: usize,
) {
    let i = linear_pos();
    if i >= len {
        terminate!();
    }
    acc[i] += g[i];
}

/// `acc += g` over `n` elements (gradient accumulation).
pub fn launch_accumulate<R: Runtime>(
    client: &ComputeClient<R>,
    acc: &Handle,
    g: &Handle,
    n: usize,
) {
    if n == 0 {
        return;
    }
    let (grid, nv, vw) = elementwise_grid(n);
    unsafe {
        accumulate_kernel::launch_unchecked::<f32, R>(
            client,
            grid,
            CubeDim::new_1d(ELEM_BLOCK),
            vw,
            ArrayArg::from_raw_parts(acc.clone(), nv),
            ArrayArg::from_raw_parts(g.clone(), nv),
            nv,
        );
    }
}

#[cube(launch_unchecked)]
fn add_kernel<F: Float + CubeElement, N: Size>(
    a: &Array<Vector<F, N>>,
    b: &Array<Vector<F, N>>,
    out: &mut Array<Vector<F, N>>,
    len: usize,
) {
    let i = linear_pos();
    if i >= len {
        terminate!();
    }
    out[i] = a[i] + b[i];
}

/// `out = a + b` over `n` elements: starts an accumulation from two
/// micro-batches without first copying one of them.
pub fn launch_add<R: Runtime>(
    client: &ComputeClient<R>,
    a: &Handle,
    b: &Handle,
    out: &Handle,
    n: usize,
) {
    if n == 0 {
        return;
    }
    let (grid, nv, vw) = elementwise_grid(n);
    unsafe {
        add_kernel::launch_unchecked::<f32, R>(
            client,
            grid,
            CubeDim::new_1d(ELEM_BLOCK),
            vw,
            ArrayArg::from_raw_parts(a.clone(), nv),
            ArrayArg::from_raw_parts(b.clone(), nv),
            ArrayArg::from_raw_parts(out.clone(), nv),
            nv,
        );
    }
}
