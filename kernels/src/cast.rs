//! Elementwise conversion between `f32` and `i32` storage, and rounding of
//! `f32` values to the `f16` or `bf16` grid (round to nearest, ties to
//! even), which is what a cast to a narrow float means when narrow floats
//! are stored widened to `f32` (as in the reference interpreter). The
//! rounding works on the bits, so it needs no `f16` support on the device.
//! Infinity arrives as a runtime scalar (WGSL rejects non-finite literals).

use crate::{grid_1d, linear_pos, ELEM_BLOCK};
use cubecl::prelude::*;
use cubecl::server::Handle;

#[cube(launch_unchecked)]
fn convert_kernel<I: Numeric, O: Numeric>(input: &Array<I>, output: &mut Array<O>) {
    let pos = linear_pos();
    if pos < output.len() {
        output[pos] = O::cast_from(input[pos]);
    }
}

/// What to round `f32` values to.
#[derive(CubeType, Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Narrow {
    Bf16,
    F16,
}

#[cube]
fn round_bf16(x: f32) -> f32 {
    let bits = u32::reinterpret(x);
    let mut out = x;
    // NaN and infinities keep their bits.
    if (bits & 0x7f80_0000u32) != 0x7f80_0000u32 {
        let rounded = (bits + 0x7fffu32 + ((bits >> 16u32) & 1u32)) & 0xffff_0000u32;
        out = f32::reinterpret(rounded);
    }
    out
}

// `a == a` is the NaN test (no `is_nan` on generic cube floats).
#[allow(clippy::eq_op)]
#[cube]
fn round_f16(x: f32, inf: f32) -> f32 {
    let a = x.abs();
    let mut out = x;
    if a == a && a != inf {
        if a >= 65520.0 {
            // Half-way between f16's max and 2^16 rounds to infinity.
            out = inf;
            if x < 0.0 {
                out = -out;
            }
        } else if a < 6.103_515_6e-5 {
            // Subnormal range: a fixed step of 2^-24.
            let scale = 16_777_216.0f32;
            let mut r = (a * scale).round() / scale;
            // `round` may tie away from zero; fix ties to even.
            let t = a * scale;
            if t - t.floor() == 0.5 {
                let f = t.floor();
                r = f;
                if f - 2.0 * (f / 2.0).floor() != 0.0 {
                    r = f + 1.0;
                }
                r /= scale;
            }
            out = r;
            if x < 0.0 {
                out = -r;
            }
        } else {
            let bits = u32::reinterpret(x);
            let rounded = (bits + 0x0fffu32 + ((bits >> 13u32) & 1u32)) & 0xffff_e000u32;
            out = f32::reinterpret(rounded);
        }
    }
    out
}

#[cube(launch_unchecked)]
fn round_kernel(input: &Array<f32>, output: &mut Array<f32>, inf: f32, #[comptime] to: Narrow) {
    let pos = linear_pos();
    if pos < output.len() {
        let x = input[pos];
        output[pos] = match to {
            Narrow::Bf16 => round_bf16(x),
            Narrow::F16 => round_f16(x, inf),
        };
    }
}

/// `n` elements from `input` to `output` converted: `f32 → i32`
/// truncates toward zero, `i32 → f32` rounds to nearest.
pub fn launch_convert<R: Runtime>(
    client: &ComputeClient<R>,
    from_float: bool,
    to_float: bool,
    input: &Handle,
    output: &Handle,
    n: usize,
) {
    if n == 0 {
        return;
    }
    let (grid, dim) = (grid_1d(n, ELEM_BLOCK), CubeDim::new_1d(ELEM_BLOCK));
    unsafe {
        let i = ArrayArg::from_raw_parts(input.clone(), n);
        let o = ArrayArg::from_raw_parts(output.clone(), n);
        match (from_float, to_float) {
            (true, true) => {
                convert_kernel::launch_unchecked::<f32, f32, R>(client, grid, dim, i, o)
            }
            (true, false) => {
                convert_kernel::launch_unchecked::<f32, i32, R>(client, grid, dim, i, o)
            }
            (false, true) => {
                convert_kernel::launch_unchecked::<i32, f32, R>(client, grid, dim, i, o)
            }
            (false, false) => {
                convert_kernel::launch_unchecked::<i32, i32, R>(client, grid, dim, i, o)
            }
        }
    }
}

/// Rounds `n` `f32` elements of `input` to the `to` grid into `output`.
pub fn launch_round<R: Runtime>(
    client: &ComputeClient<R>,
    to: Narrow,
    input: &Handle,
    output: &Handle,
    n: usize,
) {
    if n == 0 {
        return;
    }
    unsafe {
        round_kernel::launch_unchecked::<R>(
            client,
            grid_1d(n, ELEM_BLOCK),
            CubeDim::new_1d(ELEM_BLOCK),
            ArrayArg::from_raw_parts(input.clone(), n),
            ArrayArg::from_raw_parts(output.clone(), n),
            f32::INFINITY,
            to,
        );
    }
}
