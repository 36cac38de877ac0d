//! Rotary position embedding, rotate-half convention (Hugging Face Llama):
//! `x [..., T, H, d]`, positions `i32 [T]`, inverse frequencies `[d/2]`
//! (from `RopeSpec::inv_freq`, computed on the host). For `j < d/2` and
//! angle `a = pos · inv_freq[j]` (in f32, like the reference):
//! `out[j] = x[j]·cos a − x[j + d/2]·sin a`,
//! `out[j + d/2] = x[j + d/2]·cos a + x[j]·sin a`. A first kernel tabulates
//! `cos a` and `sin a` per (position, frequency), in `f32`; the second
//! applies them, one thread per element. The inverse rotation (by `−a`,
//! RoPE's gradient) only negates the table's sines. `x` and `out` are stored as the
//! launch's `elem` and computed in `f32`; the inverse frequencies are an
//! `f32` buffer.

use crate::{grid_1d, linear_pos, with_float, FloatElem, ELEM_BLOCK};
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

/// Heads and head dims are comptime, so the index arithmetic divides by
/// constants; only the position (`row mod t`) divides at run time.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn rope_kernel<F: Float>(
    x: &Array<F>,
    cos: &Array<f32>,
    sin: &Array<f32>,
    out: &mut Array<F>,
    t: u32,
    n: usize,
    #[comptime] h: usize,
    #[comptime] d: usize,
) {
    let p = linear_pos();
    if p >= n {
        terminate!();
    }
    let half = comptime!(d / 2);
    let j = p % d;
    let row = u32::cast_from(p / comptime!(h * d));
    let ti = usize::cast_from(row % t);
    let at = ti * half + j % half;
    let (c, s) = (cos[at], sin[at]);
    let v = f32::cast_from(x[p]);
    let r = if j < half {
        v * c - f32::cast_from(x[p + half]) * s
    } else {
        v * c + f32::cast_from(x[p - half]) * s
    };
    out[p] = F::cast_from(r);
}

/// RoPE of dense `x (..., t, h, d)` (`n` elements) into `out`, both stored
/// as `elem`; `inv_freq` is `f32`. `inverse` rotates by `−a` (the gradient).
#[allow(clippy::too_many_arguments)]
pub fn launch_rope<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    x: &Handle,
    pos: &Handle,
    inv_freq: &Handle,
    out: &Handle,
    t: usize,
    h: usize,
    d: usize,
    n: usize,
    inverse: bool,
) {
    if n == 0 {
        return;
    }
    let half = d / 2;
    let entries = t * half;
    let cos = client.empty(entries.max(1) * 4);
    let sin = client.empty(entries.max(1) * 4);
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
        with_float!(elem, F => rope_kernel::launch_unchecked::<F, R>(
            client,
            grid_1d(n, ELEM_BLOCK),
            CubeDim::new_1d(ELEM_BLOCK),
            ArrayArg::from_raw_parts(x.clone(), n),
            ArrayArg::from_raw_parts(cos, entries),
            ArrayArg::from_raw_parts(sin, entries),
            ArrayArg::from_raw_parts(out.clone(), n),
            t as u32,
            n,
            h,
            d,
        ));
    }
}
