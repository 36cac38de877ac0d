//! Rotary position embedding, rotate-half convention (Hugging Face Llama):
//! `x [..., T, H, d]`, positions `i32 [T]`, inverse frequencies `[d/2]`
//! (from `RopeSpec::inv_freq`, computed on the host). For `j < d/2` and
//! angle `a = pos · inv_freq[j]` (in f32, like the reference):
//! `out[j] = x[j]·cos a − x[j + d/2]·sin a`,
//! `out[j + d/2] = x[j + d/2]·cos a + x[j]·sin a`. One thread per element.

use crate::{grid_1d, linear_pos, ELEM_BLOCK};
use cubecl::prelude::*;
use cubecl::server::Handle;

#[cube(launch_unchecked)]
fn rope_kernel<F: Float>(
    x: &Array<F>,
    pos: &Array<i32>,
    inv_freq: &Array<F>,
    out: &mut Array<F>,
    t: usize,
    h: usize,
    d: usize,
    n: usize,
) {
    let p = linear_pos();
    if p >= n {
        terminate!();
    }
    let half = d / 2;
    let j = p % d;
    let ti = (p / (h * d)) % t;
    let jj = j % half;
    let angle = F::cast_from(pos[ti]) * inv_freq[jj];
    let (c, s) = (angle.cos(), angle.sin());
    let v = x[p];
    out[p] = if j < half {
        v * c - x[p + half] * s
    } else {
        v * c + x[p - half] * s
    };
}

/// RoPE of dense `x (..., t, h, d)` (`n` elements).
#[allow(clippy::too_many_arguments)]
pub fn launch_rope<R: Runtime>(
    client: &ComputeClient<R>,
    x: &Handle,
    pos: &Handle,
    inv_freq: &Handle,
    out: &Handle,
    t: usize,
    h: usize,
    d: usize,
    n: usize,
) {
    if n == 0 {
        return;
    }
    unsafe {
        rope_kernel::launch_unchecked::<f32, R>(
            client,
            grid_1d(n, ELEM_BLOCK),
            CubeDim::new_1d(ELEM_BLOCK),
            ArrayArg::from_raw_parts(x.clone(), n),
            ArrayArg::from_raw_parts(pos.clone(), t),
            ArrayArg::from_raw_parts(inv_freq.clone(), d / 2),
            ArrayArg::from_raw_parts(out.clone(), n),
            t,
            h,
            d,
            n,
        );
    }
}
