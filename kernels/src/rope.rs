//! Rotary position embedding, rotate-half convention (Hugging Face Llama):
//! `x [..., T, H, d]`, positions `i32 [T]`, inverse frequencies `[d/2]`
//! (from `RopeSpec::inv_freq`, computed on the host). For `j < d/2` and
//! angle `a = pos · inv_freq[j]` (in f32, like the reference):
//! `out[j] = x[j]·cos a − x[j + d/2]·sin a`,
//! `out[j + d/2] = x[j + d/2]·cos a + x[j]·sin a`. A first kernel tabulates
//! `cos a` and `sin a` per (position, frequency), in `f32` (once per run
//! for all the layers' rotations over the same positions: `RopeTable`); the second
//! applies them, one thread per vector of pairs (up to 16-byte loads),
//! reading `x` through its strides (a slice of a merged projection or a
//! permute of attention's gradient, in place), or rotating `x` in its own
//! buffer (`launch_rope_in_place`: a projection's rotated columns,
//! `Op::MatMulRope`). The inverse rotation (by `−a`,
//! RoPE's gradient) only negates the table's sines. `x` and `out` are stored as the
//! launch's `elem` and computed in `f32`; the inverse frequencies are an
//! `f32` buffer.

use crate::{grid_1d, linear_pos, with_float, FloatElem, KernelError, View, ELEM_BLOCK};
use cubecl::prelude::*;
use cubecl::server::Handle;

/// The angles' cosines and sines, `[t, d/2]` each: computed once per
/// position and frequency rather than once per head and element (the
/// transcendental functions were most of RoPE's time).
#[cube(launch_unchecked)]
fn rope_table_kernel(
    pos: &Array<i32>,
    inv_freq: &Array<f32>,
    cos: &mut Array<f32>,
    sin: &mut Array<f32>,
    half: usize,
    n: usize,
    #[comptime] inverse: bool,
) {
    let p = linear_pos();
    if p >= n {
        terminate!();
    }
    let angle = f32::cast_from(pos[p / half]) * inv_freq[p % half];
    cos[p] = angle.cos();
    // The inverse rotation (RoPE's gradient): sin(−a) = −sin(a), exactly.
    if inverse {
        sin[p] = -angle.sin();
    } else {
        sin[p] = angle.sin();
    }
}

/// Where unit `u`'s pairs are: the dense element index of its first half's
/// vector (`j..j+nv` of one head of one row, `j < d/2`), that element's
/// index in `x` through `x`'s layout from element `x_offset`, and the
/// angles' entry in the table (`(row mod t)·d/2 + j`). Heads and head dims
/// are comptime, so the index arithmetic divides by constants; only the
/// position (`row mod t`) divides at run time.
#[cube]
#[allow(clippy::too_many_arguments)]
fn pair_at(
    u: usize,
    layout: &Sequence<usize>,
    t: u32,
    #[comptime] h: usize,
    #[comptime] d: usize,
    #[comptime] nv: usize,
    #[comptime] x_offset: usize,
    #[comptime] rank: usize,
) -> (usize, usize, usize) {
    let half = comptime!(d / 2);
    let per_head = comptime!(half / nv);
    let row = u / comptime!(h * per_head);
    let head = (u / per_head) % h;
    let j = (u % per_head) * nv;
    let p = row * comptime!(h * d) + head * d + j;
    let ti = usize::cast_from(u32::cast_from(row) % t);
    let xo = x_offset + crate::elementwise::layout_offset(layout, p, rank, rank);
    (p, xo, ti * half + j)
}

/// The pair of vectors `(lo, hi)` rotated by the angles at `at..at+nv`,
/// in `f32`, each result rounded once to `F`.
#[cube]
fn rotate<F: Float, N: Size>(
    lo: Vector<F, N>,
    hi: Vector<F, N>,
    cos: &Array<f32>,
    sin: &Array<f32>,
    at: usize,
    #[comptime] nv: usize,
) -> (Vector<F, N>, Vector<F, N>) {
    let mut a = Vector::<F, N>::empty();
    let mut b = Vector::<F, N>::empty();
    #[unroll]
    for l in 0..nv {
        let (c, s) = (cos[at + l], sin[at + l]);
        let (vl, vh) = (f32::cast_from(lo[l]), f32::cast_from(hi[l]));
        a[l] = F::cast_from(vl * c - vh * s);
        b[l] = F::cast_from(vh * c + vl * s);
    }
    (a, b)
}

/// One unit rotates `nv` pairs (see [`pair_at`]), read through `x`'s
/// strides (a slice of a merged projection or a permute of attention's
/// gradient, in place) and written to the dense `out`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn rope_kernel<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    cos: &Array<f32>,
    sin: &Array<f32>,
    out: &mut Array<Vector<F, N>>,
    layout: &Sequence<usize>,
    t: u32,
    units: usize,
    #[comptime] h: usize,
    #[comptime] d: usize,
    #[comptime] nv: usize,
    #[comptime] x_offset: usize,
    #[comptime] rank: usize,
) {
    let u = linear_pos();
    if u >= units {
        terminate!();
    }
    let half = comptime!(d / 2);
    let (p, xo, at) = pair_at(u, layout, t, h, d, nv, x_offset, rank);
    let (a, b) = rotate::<F, N>(x[xo / nv], x[(xo + half) / nv], cos, sin, at, nv);
    out[p / nv] = a;
    out[(p + half) / nv] = b;
}

/// [`rope_kernel`] writing each pair back where it read it: one binding,
/// so that a projection's columns are rotated in their own buffer (WebGPU
/// forbids a writable binding that aliases another). A unit reads both
/// of its vectors before writing them, and no other unit touches them.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn rope_in_place_kernel<F: Float, N: Size>(
    x: &mut Array<Vector<F, N>>,
    cos: &Array<f32>,
    sin: &Array<f32>,
    layout: &Sequence<usize>,
    t: u32,
    units: usize,
    #[comptime] h: usize,
    #[comptime] d: usize,
    #[comptime] nv: usize,
    #[comptime] x_offset: usize,
    #[comptime] rank: usize,
) {
    let u = linear_pos();
    if u >= units {
        terminate!();
    }
    let half = comptime!(d / 2);
    let (_, xo, at) = pair_at(u, layout, t, h, d, nv, x_offset, rank);
    let (a, b) = rotate::<F, N>(x[xo / nv], x[(xo + half) / nv], cos, sin, at, nv);
    x[xo / nv] = a;
    x[(xo + half) / nv] = b;
}

/// The cosines and sines of RoPE's angles for `t` positions and `half`
/// frequencies (`f32`, `[t, half]` each): one launch's worth, which every
/// rotation over the same positions, frequencies and direction can share
/// (the executor keeps one per run for all layers).
#[derive(Clone, Debug)]
pub struct RopeTable {
    pub(crate) cos: Handle,
    pub(crate) sin: Handle,
    pub(crate) t: usize,
    pub(crate) half: usize,
}

/// Tabulates RoPE's angles for positions `pos` (`i32 [t]`) and inverse
/// frequencies `inv_freq` (`f32 [half]`); `inverse` negates the sines
/// (the rotation by `−a`, RoPE's gradient).
pub fn launch_rope_table<R: Runtime>(
    client: &ComputeClient<R>,
    pos: &Handle,
    inv_freq: &Handle,
    t: usize,
    half: usize,
    inverse: bool,
) -> RopeTable {
    let entries = t * half;
    let cos = client.empty(entries.max(1) * 4);
    let sin = client.empty(entries.max(1) * 4);
    if entries > 0 {
        unsafe {
            rope_table_kernel::launch_unchecked::<R>(
                client,
                grid_1d(entries, ELEM_BLOCK),
                CubeDim::new_1d(ELEM_BLOCK),
                ArrayArg::from_raw_parts(pos.clone(), t),
                ArrayArg::from_raw_parts(inv_freq.clone(), half),
                ArrayArg::from_raw_parts(cos.clone(), entries),
                ArrayArg::from_raw_parts(sin.clone(), entries),
                half,
                entries,
                inverse,
            );
        }
    }
    RopeTable { cos, sin, t, half }
}

/// The `(t, d)` of a rope over `x (..., t, h, d)`, or why the kernel
/// cannot read `x`.
pub fn rope_dims(x: &View) -> Result<(usize, usize), KernelError> {
    let r = x.shape.len();
    if r < 3 || x.strides[r - 1] != 1 || !x.shape[r - 1].is_multiple_of(2) {
        return Err(KernelError::Unsupported(format!(
            "rope of a [{:?}] view with strides {:?}: needs [..., t, h, d], d even, the last axis contiguous",
            x.shape, x.strides
        )));
    }
    Ok((x.shape[r - 3], x.shape[r - 1]))
}

/// RoPE of `x (..., t, h, d)`, a view whose last axis is contiguous (dense,
/// or a slice or permute of a larger buffer), into the dense `out`, both
/// stored as `elem`; `inv_freq` is `f32`. `inverse` rotates by `−a` (the
/// gradient).
#[allow(clippy::too_many_arguments)]
pub fn launch_rope<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    x: &View,
    pos: &Handle,
    inv_freq: &Handle,
    out: &Handle,
    inverse: bool,
) -> Result<(), KernelError> {
    let (t, d) = rope_dims(x)?;
    let table = launch_rope_table(client, pos, inv_freq, t, d / 2, inverse);
    launch_rope_with(client, elem, x, &table, out)
}

/// [`launch_rope`] with the angles' table already computed (for `x`'s
/// positions and head dim).
pub fn launch_rope_with<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    x: &View,
    table: &RopeTable,
    out: &Handle,
) -> Result<(), KernelError> {
    launch_with(client, elem, x, table, Some(out))
}

/// RoPE of `x (..., t, h, d)` written over `x` itself: a view whose last
/// axis is contiguous (the rotated columns of a projection, in its buffer),
/// stored as `elem`, with the angles' table for its positions and head dim.
pub fn launch_rope_in_place<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    x: &View,
    table: &RopeTable,
) -> Result<(), KernelError> {
    launch_with(client, elem, x, table, None)
}

/// Both launches: into the dense `out`, or over `x` when `out` is `None`.
fn launch_with<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    x: &View,
    table: &RopeTable,
    out: Option<&Handle>,
) -> Result<(), KernelError> {
    let (t, d) = rope_dims(x)?;
    let r = x.shape.len();
    let h = x.shape[r - 2];
    let half = d / 2;
    if (table.t, table.half) != (t, half) {
        return Err(KernelError::Unsupported(format!(
            "a rope table of {} positions and {} frequencies for x of shape {:?}",
            table.t, table.half, x.shape
        )));
    }
    let n = x.numel();
    if n == 0 {
        return Ok(());
    }
    let entries = t * half;
    // The widest vector (up to 16 bytes) that divides a half-head and
    // keeps every row of the view aligned.
    let nv = client
        .io_optimized_vector_sizes(elem.size())
        .find(|&nv| half.is_multiple_of(nv) && x.aligned_to(nv))
        .unwrap_or(1);
    let units = n / 2 / nv;
    let layout = crate::scalars(&[&x.shape[..], &x.strides[..]].concat());
    let (grid, dim) = (grid_1d(units, ELEM_BLOCK), CubeDim::new_1d(ELEM_BLOCK));
    // SAFETY: the table holds `entries` f32 of each, `x` and `out` `n`
    // elements (the view's bounds are the caller's).
    unsafe {
        let cos = ArrayArg::from_raw_parts(table.cos.clone(), entries);
        let sin = ArrayArg::from_raw_parts(table.sin.clone(), entries);
        match out {
            Some(out) => with_float!(elem, F => rope_kernel::launch_unchecked::<F, R>(
                client,
                grid,
                dim,
                nv,
                x.array::<R>(),
                cos,
                sin,
                ArrayArg::from_raw_parts(out.clone(), n),
                layout,
                t as u32,
                units,
                h,
                d,
                nv,
                x.offset,
                r,
            )),
            None => with_float!(elem, F => rope_in_place_kernel::launch_unchecked::<F, R>(
                client,
                grid,
                dim,
                nv,
                x.array::<R>(),
                cos,
                sin,
                layout,
                t as u32,
                units,
                h,
                d,
                nv,
                x.offset,
                r,
            )),
        }
    }
    Ok(())
}
