//! KV-cache storage: quantizing rows into the block formats of
//! `caramba_ir::quant` (scales first, then little-endian packed codes, in
//! `i32` words) and dequantizing them, plus the reads `kv_attention`
//! shares: elements ([`load_value`], [`load4_regs`]) and whole words
//! ([`word_at`], [`fetch_scale`], [`unpack_word`]).
//!
//! Formats are comptime codes ([`FLOAT`], [`Q8`], [`Q4`], [`NF4`]); a float
//! cache is read through the same `Array<i32>` binding, so one kernel serves
//! every part of a DBA cache: an `f32` cache's words are reinterpreted as
//! `f32`, and an `f16` or `bf16` cache ([`float_code`]: [`FLOAT_F16`],
//! [`FLOAT_BF16`]) holds two values per word (little-endian: the value at
//! an even index in the low half), widened to `f32` from their bits. Block
//! scales are `f32` bits in their own words whatever the float storage.
//! The NF4 levels live in shared memory (filled by [`nf4_levels`]).
//!
//! Dequantized values are `f32` in registers; [`launch_quantize`] reads and
//! [`launch_dequantize`] writes float tensors stored as their `elem`.

use crate::{grid_1d, linear_pos, with_float, FloatElem, ELEM_BLOCK};
use cubecl::prelude::*;
use cubecl::server::Handle;

/// A float cache: as a kernel's code, one stored as `f32`; as a
/// `kv_attention::CachePart`'s format, one stored as its `elem`.
pub const FLOAT: u32 = 0;
pub const Q8: u32 = 1;
pub const Q4: u32 = 2;
pub const NF4: u32 = 3;
/// A float cache stored as `f16` (two values per word): the kernels' code
/// for [`FLOAT`] with [`FloatElem::F16`] storage ([`float_code`]).
pub const FLOAT_F16: u32 = 4;
/// A float cache stored as `bf16`, as [`FLOAT_F16`].
pub const FLOAT_BF16: u32 = 5;

/// The kernels' code of a float cache stored as `elem`.
pub fn float_code(elem: FloatElem) -> u32 {
    match elem {
        FloatElem::F32 => FLOAT,
        FloatElem::F16 => FLOAT_F16,
        FloatElem::BF16 => FLOAT_BF16,
    }
}

/// Whether `format` is a float cache (of any storage).
pub const fn is_float(format: u32) -> bool {
    format == FLOAT || format == FLOAT_F16 || format == FLOAT_BF16
}
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
pub const fn bits(format: u32) -> usize {
    if format == Q8 {
        8
    } else {
        4
    }
}

/// Words of a row of `n` values in `format` (`FLOAT`: `n`; a 2-byte float
/// cache: `n / 2`, rounded up).
pub fn row_words(format: u32, n: usize) -> usize {
    if format == FLOAT {
        n
    } else if is_float(format) {
        n.div_ceil(2)
    } else {
        n / BLOCK + n * bits(format) / 32
    }
}

/// Fills a shared array with the NF4 levels (all units must call it; it
/// syncs the cube).
#[cube]
pub fn nf4_levels() -> SharedMemory<f32> {
    let mut lv = SharedMemory::<f32>::new(16usize);
    if UNIT_POS == 0 {
        lv[0usize] = f32::new(comptime!(LEVELS[0]));
        lv[1usize] = f32::new(comptime!(LEVELS[1]));
        lv[2usize] = f32::new(comptime!(LEVELS[2]));
        lv[3usize] = f32::new(comptime!(LEVELS[3]));
        lv[4usize] = f32::new(comptime!(LEVELS[4]));
        lv[5usize] = f32::new(comptime!(LEVELS[5]));
        lv[6usize] = f32::new(comptime!(LEVELS[6]));
        lv[7usize] = f32::new(comptime!(LEVELS[7]));
        lv[8usize] = f32::new(comptime!(LEVELS[8]));
        lv[9usize] = f32::new(comptime!(LEVELS[9]));
        lv[10usize] = f32::new(comptime!(LEVELS[10]));
        lv[11usize] = f32::new(comptime!(LEVELS[11]));
        lv[12usize] = f32::new(comptime!(LEVELS[12]));
        lv[13usize] = f32::new(comptime!(LEVELS[13]));
        lv[14usize] = f32::new(comptime!(LEVELS[14]));
        lv[15usize] = f32::new(comptime!(LEVELS[15]));
    }
    sync_cube();
    lv
}

/// The value of `code` in a block with scale `s`.
#[cube]
fn decode(code: u32, s: f32, levels: &SharedMemory<f32>, #[comptime] format: u32) -> f32 {
    if comptime!(format == Q8) {
        let mut v = f32::cast_from(code);
        if code > 127u32 {
            v -= f32::new(256.0);
        }
        v * s
    } else if comptime!(format == Q4) {
        (f32::cast_from(code) - f32::new(8.0)) * s
    } else {
        levels[usize::cast_from(code)] * s
    }
}

/// An `f16` value from its bits (the low 16 of `h`), exactly: integer
/// arithmetic and one exact multiplication for subnormals, so it needs no
/// `f16` support on the device and no subnormal `f32`s.
#[cube]
fn f16_bits_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u32) << 16u32;
    let exp = (h >> 10u32) & 0x1fu32;
    let mant = h & 0x3ffu32;
    let mut bits = sign | ((exp + 112u32) << 23u32) | (mant << 13u32);
    if exp == 0x1fu32 {
        // Infinity and NaN.
        bits = sign | 0x7f80_0000u32 | (mant << 13u32);
    }
    let mut v = f32::reinterpret(bits);
    if exp == 0u32 {
        // Zero and subnormals: mant · 2^-24.
        v = f32::cast_from(mant) * f32::new(5.960_464_5e-8);
        if sign != 0u32 {
            v = -v;
        }
    }
    v
}

/// Value `i` (an element index) of a float cache in `format` (any float
/// storage), widened to `f32`.
#[cube]
fn load_float(c: &Array<i32>, i: usize, #[comptime] format: u32) -> f32 {
    if comptime!(format == FLOAT) {
        f32::reinterpret(c[i])
    } else {
        let w = u32::reinterpret(c[i / 2]);
        let shift = u32::cast_from(i % 2) * 16u32;
        widen_half(w >> shift, format)
    }
}

/// The 2-byte float in the low 16 bits of `h` (`format` [`FLOAT_F16`] or
/// [`FLOAT_BF16`]) as `f32`.
#[cube]
fn widen_half(h: u32, #[comptime] format: u32) -> f32 {
    if comptime!(format == FLOAT_BF16) {
        f32::reinterpret(h << 16u32)
    } else {
        f16_bits_to_f32(h & 0xffffu32)
    }
}

/// Value `e` of the row starting at word `row` of a cache in `format`; the
/// row has `nb` blocks (unused for a float cache). For a float cache, `row`
/// and `e` count elements (two per word for a 2-byte storage).
#[cube]
pub fn load_value(
    c: &Array<i32>,
    row: usize,
    e: usize,
    nb: usize,
    levels: &SharedMemory<f32>,
    #[comptime] format: u32,
) -> f32 {
    if comptime!(is_float(format)) {
        load_float(c, row + e, format)
    } else {
        let s = f32::reinterpret(c[row + e / BLOCK]);
        let per = comptime!(32 / bits(format));
        let b = comptime!(bits(format) as u32);
        let w = u32::reinterpret(c[row + nb + e / per]);
        let code = (w >> (u32::cast_from(e % per) * b)) & comptime!((1u32 << b) - 1);
        decode(code, s, levels, format)
    }
}

/// Values `e .. e + 4` (`e` a multiple of 4) of a row, as [`load_value`],
/// into registers `out[at .. at + 4]`: one word and one scale read for a
/// quantized format, since four aligned values share both (and two words
/// for a 2-byte float cache, whose `row + e` is then a multiple of 4).
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn load4_regs(
    c: &Array<i32>,
    row: usize,
    e: usize,
    nb: usize,
    levels: &SharedMemory<f32>,
    out: &mut Array<f32>,
    at: usize,
    #[comptime] format: u32,
) {
    if comptime!(format == FLOAT) {
        #[unroll]
        for k in 0..4 {
            out[at + k] = f32::reinterpret(c[row + e + k]);
        }
    } else if comptime!(is_float(format)) {
        let w = (row + e) / 2;
        #[unroll]
        for k in 0..2usize {
            let word = u32::reinterpret(c[w + k]);
            out[at + 2 * k] = widen_half(word, format);
            out[at + 2 * k + 1] = widen_half(word >> 16u32, format);
        }
    } else {
        let s = f32::reinterpret(c[row + e / BLOCK]);
        let per = comptime!(32 / bits(format));
        let b = comptime!(bits(format) as u32);
        let w = u32::reinterpret(c[row + nb + e / per]);
        let base = u32::cast_from(e % per) * b;
        #[unroll]
        for k in 0..4 {
            let code = (w >> (base + comptime!(k as u32) * b)) & comptime!((1u32 << b) - 1);
            out[at + k] = decode(code, s, levels, format);
        }
    }
}

/// Values per 32-bit word of a cache in `format` (a kernel code): 1 for
/// `f32`, 2 for a 2-byte float, 4 for q8, 8 for q4 and NF4.
pub const fn per_word(format: u32) -> usize {
    if format == FLOAT {
        1
    } else if is_float(format) {
        2
    } else {
        32 / bits(format)
    }
}

/// The index of word `w` of a head's slice of a row, in `c`'s words:
/// the row starts at word `row` and has `nb` blocks, the head's first
/// value is element `e0` (`row` and `e0` as [`load_value`] takes them;
/// `e0` a multiple of [`per_word`]). Kernels that read several words at
/// once fetch them by index and unpack them with [`unpack_word`].
#[cube]
pub fn word_at(row: usize, nb: usize, e0: usize, w: usize, #[comptime] format: u32) -> usize {
    let mut at = row + nb + e0 / comptime!(per_word(format)) + w;
    if comptime!(format == FLOAT) {
        at = row + e0 + w;
    } else if comptime!(is_float(format)) {
        at = (row + e0) / 2 + w;
    }
    at
}

/// The block scale of word `w` of a head's slice of a row (arguments as
/// [`word_at`]); 1 for a float cache, which reads nothing.
#[cube]
pub fn fetch_scale(
    c: &Array<i32>,
    row: usize,
    e0: usize,
    w: usize,
    #[comptime] format: u32,
) -> f32 {
    let mut s = f32::new(1.0);
    if comptime!(!is_float(format)) {
        s = f32::reinterpret(c[row + (e0 + w * comptime!(per_word(format))) / BLOCK]);
    }
    s
}

/// A word's [`per_word`] values into `out[at ..]`, unscaled (a quantized
/// value is its code's level; multiply by the block's scale). q8 and q4
/// codes become floats by placing them in the mantissa of 2²³ and
/// subtracting, integer and add instructions instead of conversions (an
/// H100 SM converts 16 values a clock and adds 128).
#[cube]
pub fn unpack_word(
    word: u32,
    levels: &SharedMemory<f32>,
    out: &mut Array<f32>,
    at: usize,
    #[comptime] format: u32,
) {
    if comptime!(format == FLOAT) {
        out[at] = f32::reinterpret(word);
    } else if comptime!(is_float(format)) {
        out[at] = widen_half(word, format);
        out[at + 1] = widen_half(word >> 16u32, format);
    } else if comptime!(format == Q8) {
        // Flipping the sign bit maps code c (two's complement) to c + 128.
        let x = word ^ 0x8080_8080u32;
        #[unroll]
        for k in 0..4usize {
            let m = ((x >> comptime!((k * 8) as u32)) & 0xffu32) | 0x4b00_0000u32;
            out[at + k] = f32::reinterpret(m) - f32::new(8_388_736.0);
        }
    } else if comptime!(format == Q4) {
        #[unroll]
        for k in 0..8usize {
            let m = ((word >> comptime!((k * 4) as u32)) & 0xfu32) | 0x4b00_0000u32;
            out[at + k] = f32::reinterpret(m) - f32::new(8_388_616.0);
        }
    } else {
        #[unroll]
        for k in 0..8usize {
            let code = (word >> comptime!((k * 4) as u32)) & 0xfu32;
            out[at + k] = levels[usize::cast_from(code)];
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
    let mut amax = f32::new(0.0);
    let mut ext = f32::new(0.0);
    for k in 0..BLOCK {
        let v = f32::cast_from(x[src + k]);
        if v.abs() > amax {
            amax = v.abs();
            ext = v;
        }
    }
    let mut s = amax;
    if comptime!(format == Q8) {
        s = amax / f32::new(127.0);
    } else if comptime!(format == Q4) {
        s = ext / f32::new(-8.0);
    }
    let mut inv = f32::new(0.0);
    if s != f32::new(0.0) {
        inv = f32::new(1.0) / s;
    }
    out[dst + b] = i32::reinterpret(s);
    let per = comptime!(32 / bits(format));
    let bw = comptime!(bits(format) as u32);
    let code_words = comptime!(BLOCK / (32 / bits(format)));
    for wi in 0..code_words {
        let mut w = 0u32;
        #[unroll]
        for k in 0..per {
            let y = f32::cast_from(x[src + wi * per + k]) * inv;
            let mut code = 0u32;
            if comptime!(format == Q8) {
                let q = y.round().clamp(f32::new(-127.0), f32::new(127.0));
                code = u32::reinterpret(i32::cast_from(q)) & 255u32;
            } else if comptime!(format == Q4) {
                code = u32::cast_from(
                    (y.round() + f32::new(8.0)).clamp(f32::new(0.0), f32::new(15.0)),
                );
            } else {
                // The nearest level: count the midpoints below y.
                if y > f32::new(comptime!((LEVELS[0] + LEVELS[1]) * 0.5)) {
                    code += 1;
                }
                if y > f32::new(comptime!((LEVELS[1] + LEVELS[2]) * 0.5)) {
                    code += 1;
                }
                if y > f32::new(comptime!((LEVELS[2] + LEVELS[3]) * 0.5)) {
                    code += 1;
                }
                if y > f32::new(comptime!((LEVELS[3] + LEVELS[4]) * 0.5)) {
                    code += 1;
                }
                if y > f32::new(comptime!((LEVELS[4] + LEVELS[5]) * 0.5)) {
                    code += 1;
                }
                if y > f32::new(comptime!((LEVELS[5] + LEVELS[6]) * 0.5)) {
                    code += 1;
                }
                if y > f32::new(comptime!((LEVELS[6] + LEVELS[7]) * 0.5)) {
                    code += 1;
                }
                if y > f32::new(comptime!((LEVELS[7] + LEVELS[8]) * 0.5)) {
                    code += 1;
                }
                if y > f32::new(comptime!((LEVELS[8] + LEVELS[9]) * 0.5)) {
                    code += 1;
                }
                if y > f32::new(comptime!((LEVELS[9] + LEVELS[10]) * 0.5)) {
                    code += 1;
                }
                if y > f32::new(comptime!((LEVELS[10] + LEVELS[11]) * 0.5)) {
                    code += 1;
                }
                if y > f32::new(comptime!((LEVELS[11] + LEVELS[12]) * 0.5)) {
                    code += 1;
                }
                if y > f32::new(comptime!((LEVELS[12] + LEVELS[13]) * 0.5)) {
                    code += 1;
                }
                if y > f32::new(comptime!((LEVELS[13] + LEVELS[14]) * 0.5)) {
                    code += 1;
                }
                if y > f32::new(comptime!((LEVELS[14] + LEVELS[15]) * 0.5)) {
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
    let levels = nf4_levels();
    let i = linear_pos();
    if i >= total {
        terminate!();
    }
    let nb = n / BLOCK;
    let words = comptime!(row_words(format, BLOCK)) * nb;
    let (r, e) = (i / n, i % n);
    out[i] = F::cast_from(load_value(c, r * words, e, nb, &levels, format));
}

/// Quantizes `rows` rows of `n` values (`n` a multiple of 32) stored as
/// `elem`.
pub fn launch_quantize<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
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
    with_float!(elem, F => unsafe {
        quantize_kernel::launch_unchecked::<F, R>(
            client,
            grid_1d(blocks, ELEM_BLOCK),
            CubeDim::new_1d(ELEM_BLOCK),
            ArrayArg::from_raw_parts(x.clone(), rows * n),
            ArrayArg::from_raw_parts(out.clone(), rows * row_words(format, n)),
            blocks,
            n,
            format,
        );
    });
}

/// Dequantizes `rows` rows of `n` values into `out`, stored as `elem`.
pub fn launch_dequantize<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
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
    with_float!(elem, F => unsafe {
        dequantize_kernel::launch_unchecked::<F, R>(
            client,
            grid_1d(total, ELEM_BLOCK),
            CubeDim::new_1d(ELEM_BLOCK),
            ArrayArg::from_raw_parts(c.clone(), rows * row_words(format, n)),
            ArrayArg::from_raw_parts(out.clone(), total),
            total,
            n,
            format,
        );
    });
}
