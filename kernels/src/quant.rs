//! KV-cache storage: quantizing rows into the block formats of
//! `caramba_ir::quant` (scales first, then little-endian packed codes, in
//! `i32` words) and dequantizing them, plus [`load_value`] and
//! [`load4_regs`], the element reads that `kv_attention` shares.
//!
//! Formats are comptime codes ([`FLOAT`], [`Q8`], [`Q4`], [`NF4`]); a float
//! cache is read through the same `Array<i32>` binding, its words
//! reinterpreted as `f32`, so one kernel serves every part of a DBA cache.
//! The NF4 levels live in shared memory (filled by [`nf4_levels`]).

use crate::{grid_1d, linear_pos, ELEM_BLOCK};
use cubecl::prelude::*;
use cubecl::server::Handle;

/// A float (`f32`) cache.
pub const FLOAT: u32 = 0;
pub const Q8: u32 = 1;
pub const Q4: u32 = 2;
pub const NF4: u32 = 3;
/// Values per block (one scale each).
pub const BLOCK: usize = 32;

/// The NF4 levels, as `caramba_ir::quant::NF4_LEVELS`.
const LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Bits per code of a quantized format.
pub fn bits(format: u32) -> usize {
    if format == Q8 {
        8
    } else {
        4
    }
}

/// Words of a row of `n` values in `format` (`FLOAT`: `n`).
pub fn row_words(format: u32, n: usize) -> usize {
    if format == FLOAT {
        n
    } else {
        n / BLOCK + n * bits(format) / 32
    }
}

/// Fills a shared array with the NF4 levels (all units must call it; it
/// syncs the cube).
#[cube]
pub fn nf4_levels<F: Float + CubeElement>() -> SharedMemory<F> {
    let mut lv = SharedMemory::<F>::new(16usize);
    if UNIT_POS == 0 {
        lv[0usize] = F::new(comptime!(LEVELS[0]));
        lv[1usize] = F::new(comptime!(LEVELS[1]));
        lv[2usize] = F::new(comptime!(LEVELS[2]));
        lv[3usize] = F::new(comptime!(LEVELS[3]));
        lv[4usize] = F::new(comptime!(LEVELS[4]));
        lv[5usize] = F::new(comptime!(LEVELS[5]));
        lv[6usize] = F::new(comptime!(LEVELS[6]));
        lv[7usize] = F::new(comptime!(LEVELS[7]));
        lv[8usize] = F::new(comptime!(LEVELS[8]));
        lv[9usize] = F::new(comptime!(LEVELS[9]));
        lv[10usize] = F::new(comptime!(LEVELS[10]));
        lv[11usize] = F::new(comptime!(LEVELS[11]));
        lv[12usize] = F::new(comptime!(LEVELS[12]));
        lv[13usize] = F::new(comptime!(LEVELS[13]));
        lv[14usize] = F::new(comptime!(LEVELS[14]));
        lv[15usize] = F::new(comptime!(LEVELS[15]));
    }
    sync_cube();
    lv
}

/// The value of `code` in a block with scale `s`.
#[cube]
fn decode<F: Float + CubeElement>(
    code: u32,
    s: F,
    levels: &SharedMemory<F>,
    #[comptime] format: u32,
) -> F {
    if comptime!(format == Q8) {
        let mut v = F::cast_from(code);
        if code > 127u32 {
            v -= F::new(256.0);
        }
        v * s
    } else if comptime!(format == Q4) {
        (F::cast_from(code) - F::new(8.0)) * s
    } else {
        levels[usize::cast_from(code)] * s
    }
}

/// Value `e` of the row starting at word `row` of a cache in `format`; the
/// row has `nb` blocks (unused for a float cache).
#[cube]
pub fn load_value<F: Float + CubeElement>(
    c: &Array<i32>,
    row: usize,
    e: usize,
    nb: usize,
    levels: &SharedMemory<F>,
    #[comptime] format: u32,
) -> F {
    if comptime!(format == FLOAT) {
        F::reinterpret(c[row + e])
    } else {
        let s = F::reinterpret(c[row + e / BLOCK]);
        let per = comptime!(32 / bits(format));
        let b = comptime!(bits(format) as u32);
        let w = u32::reinterpret(c[row + nb + e / per]);
        let code = (w >> (u32::cast_from(e % per) * b)) & comptime!((1u32 << b) - 1);
        decode::<F>(code, s, levels, format)
    }
}

/// Values `e .. e + 4` (`e` a multiple of 4) of a row, as [`load_value`],
/// into registers `out[at .. at + 4]`: one word and one scale read for a
/// quantized format, since four aligned values share both.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn load4_regs<F: Float + CubeElement>(
    c: &Array<i32>,
    row: usize,
    e: usize,
    nb: usize,
    levels: &SharedMemory<F>,
    out: &mut Array<F>,
    at: usize,
    #[comptime] format: u32,
) {
    if comptime!(format == FLOAT) {
        #[unroll]
        for k in 0..4 {
            out[at + k] = F::reinterpret(c[row + e + k]);
        }
    } else {
        let s = F::reinterpret(c[row + e / BLOCK]);
        let per = comptime!(32 / bits(format));
        let b = comptime!(bits(format) as u32);
        let w = u32::reinterpret(c[row + nb + e / per]);
        let base = u32::cast_from(e % per) * b;
        #[unroll]
        for k in 0..4 {
            let code = (w >> (base + comptime!(k as u32) * b)) & comptime!((1u32 << b) - 1);
            out[at + k] = decode::<F>(code, s, levels, format);
        }
    }
}

/// One unit per block of 32 values: its scale, then its codes.
#[cube(launch_unchecked)]
fn quantize_kernel<F: Float + CubeElement>(
    x: &Array<F>,
    out: &mut Array<i32>,
    blocks: usize,
    n: usize,
    #[comptime] format: u32,
) {
    let i = linear_pos();
    if i >= blocks {
        terminate!();
    }
    let nb = n / BLOCK;
    let (r, b) = (i / nb, i % nb);
    let src = r * n + b * BLOCK;
    let words = comptime!(row_words(format, BLOCK)) * nb;
    let dst = r * words;
    let mut amax = F::new(0.0);
    let mut ext = F::new(0.0);
    for k in 0..BLOCK {
        let v = x[src + k];
        if v.abs() > amax {
            amax = v.abs();
            ext = v;
        }
    }
    let mut s = amax;
    if comptime!(format == Q8) {
        s = amax / F::new(127.0);
    } else if comptime!(format == Q4) {
        s = ext / F::new(-8.0);
    }
    let mut inv = F::new(0.0);
    if s != F::new(0.0) {
        inv = F::new(1.0) / s;
    }
    out[dst + b] = i32::reinterpret(s);
    let per = comptime!(32 / bits(format));
    let bw = comptime!(bits(format) as u32);
    let code_words = comptime!(BLOCK / (32 / bits(format)));
    for wi in 0..code_words {
        let mut w = 0u32;
        #[unroll]
        for k in 0..per {
            let y = x[src + wi * per + k] * inv;
            let mut code = 0u32;
            if comptime!(format == Q8) {
                let q = y.round().clamp(F::new(-127.0), F::new(127.0));
                code = u32::reinterpret(i32::cast_from(q)) & 255u32;
            } else if comptime!(format == Q4) {
                code = u32::cast_from((y.round() + F::new(8.0)).clamp(F::new(0.0), F::new(15.0)));
            } else {
                // The nearest level: count the midpoints below y.
                if y > F::new(comptime!((LEVELS[0] + LEVELS[1]) * 0.5)) {
                    code += 1;
                }
                if y > F::new(comptime!((LEVELS[1] + LEVELS[2]) * 0.5)) {
                    code += 1;
                }
                if y > F::new(comptime!((LEVELS[2] + LEVELS[3]) * 0.5)) {
                    code += 1;
                }
                if y > F::new(comptime!((LEVELS[3] + LEVELS[4]) * 0.5)) {
                    code += 1;
                }
                if y > F::new(comptime!((LEVELS[4] + LEVELS[5]) * 0.5)) {
                    code += 1;
                }
                if y > F::new(comptime!((LEVELS[5] + LEVELS[6]) * 0.5)) {
                    code += 1;
                }
                if y > F::new(comptime!((LEVELS[6] + LEVELS[7]) * 0.5)) {
                    code += 1;
                }
                if y > F::new(comptime!((LEVELS[7] + LEVELS[8]) * 0.5)) {
                    code += 1;
                }
                if y > F::new(comptime!((LEVELS[8] + LEVELS[9]) * 0.5)) {
                    code += 1;
                }
                if y > F::new(comptime!((LEVELS[9] + LEVELS[10]) * 0.5)) {
                    code += 1;
                }
                if y > F::new(comptime!((LEVELS[10] + LEVELS[11]) * 0.5)) {
                    code += 1;
                }
                if y > F::new(comptime!((LEVELS[11] + LEVELS[12]) * 0.5)) {
                    code += 1;
                }
                if y > F::new(comptime!((LEVELS[12] + LEVELS[13]) * 0.5)) {
                    code += 1;
                }
                if y > F::new(comptime!((LEVELS[13] + LEVELS[14]) * 0.5)) {
                    code += 1;
                }
                if y > F::new(comptime!((LEVELS[14] + LEVELS[15]) * 0.5)) {
                    code += 1;
                }
            }
            w |= code << (comptime!(k as u32) * bw);
        }
        out[dst + nb + (b * BLOCK) / per + wi] = i32::reinterpret(w);
    }
}

/// One unit per value.
#[cube(launch_unchecked)]
fn dequantize_kernel<F: Float + CubeElement>(
    c: &Array<i32>,
    out: &mut Array<F>,
    total: usize,
    n: usize,
    #[comptime] format: u32,
) {
    let levels = nf4_levels::<F>();
    let i = linear_pos();
    if i >= total {
        terminate!();
    }
    let nb = n / BLOCK;
    let words = comptime!(row_words(format, BLOCK)) * nb;
    let (r, e) = (i / n, i % n);
    out[i] = load_value(c, r * words, e, nb, &levels, format);
}

/// Quantizes `rows` rows of `n` values (`n` a multiple of 32).
pub fn launch_quantize<R: Runtime>(
    client: &ComputeClient<R>,
    format: u32,
    x: &Handle,
    out: &Handle,
    rows: usize,
    n: usize,
) {
    let blocks = rows * (n / BLOCK);
    if blocks == 0 {
        return;
    }
    unsafe {
        quantize_kernel::launch_unchecked::<f32, R>(
            client,
            grid_1d(blocks, ELEM_BLOCK),
            CubeDim::new_1d(ELEM_BLOCK),
            ArrayArg::from_raw_parts(x.clone(), rows * n),
            ArrayArg::from_raw_parts(out.clone(), rows * row_words(format, n)),
            blocks,
            n,
            format,
        );
    }
}

/// Dequantizes `rows` rows of `n` values.
pub fn launch_dequantize<R: Runtime>(
    client: &ComputeClient<R>,
    format: u32,
    c: &Handle,
    out: &Handle,
    rows: usize,
    n: usize,
) {
    let total = rows * n;
    if total == 0 {
        return;
    }
    unsafe {
        dequantize_kernel::launch_unchecked::<f32, R>(
            client,
            grid_1d(total, ELEM_BLOCK),
            CubeDim::new_1d(ELEM_BLOCK),
            ArrayArg::from_raw_parts(c.clone(), rows * row_words(format, n)),
            ArrayArg::from_raw_parts(out.clone(), total),
            total,
            n,
            format,
        );
    }
}
