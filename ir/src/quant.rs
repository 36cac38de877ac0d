//! The block formats of quantized KV caches: one definition that the
//! reference interpreter executes and the GPU kernels mirror (their tests
//! compare against these functions).
//!
//! A quantized row of `n` values (`n` a multiple of [`BLOCK`]) is a run of
//! `i32` words: first one scale per block of 32 values (the bits of an
//! `f32`), then the codes, packed little-endian (value `k` of a word sits in
//! bits `k·b .. (k+1)·b`). Scales first keeps the codes of a row contiguous,
//! so a kernel reading a row's codes reads consecutive words.
//!
//! | format | code | value | bits per value (with the scale) |
//! |---|---|---|---|
//! | `q8` | `i8`, `round(x / s)` with `s = max|x| / 127` | `code · s` | 9 |
//! | `q4` | `u4`, `clamp(round(x / s) + 8, 0, 15)` with `s = m / −8`, `m` the value of largest magnitude (llama.cpp's `q4_0`) | `(code − 8) · s` | 5 |
//! | `nf4` | `u4`, the nearest of the 16 NormalFloat levels to `x / max|x|` (QLoRA) | `level[code] · max|x|` | 5 |
//!
//! The scales are `f32` where llama.cpp stores `f16`: half a bit more per
//! value, and no rounding of the scale to reason about. Blocks run along the
//! whole row, so a cache row of all heads of a token (`kv · d` values) needs
//! only `kv · d` to be a multiple of 32, not each head's `d`.

use std::fmt;

/// Values per block (one scale each).
pub const BLOCK: usize = 32;

/// A quantized storage format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QuantFormat {
    Q8,
    Q4,
    Nf4,
}

/// The 16 NormalFloat-4 levels (QLoRA, Dettmers et al. 2023): quantiles of
/// a standard normal, normalized to [−1, 1], with an exact zero.
pub const NF4_LEVELS: [f32; 16] = [
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

impl QuantFormat {
    /// Bits per code.
    pub fn bits(self) -> usize {
        match self {
            QuantFormat::Q8 => 8,
            QuantFormat::Q4 | QuantFormat::Nf4 => 4,
        }
    }

    /// Codes per `i32` word.
    pub fn per_word(self) -> usize {
        32 / self.bits()
    }

    /// Words of a quantized row of `n` values, or `None` when `n` is not a
    /// whole number of blocks.
    pub fn words(self, n: usize) -> Option<usize> {
        n.is_multiple_of(BLOCK)
            .then(|| n / BLOCK + n / self.per_word())
    }

    /// The row length `n` stored in `words` words, when there is one.
    pub fn values(self, words: usize) -> Option<usize> {
        // words = n/32 + n/per_word = n · (1 + 32/per_word) / 32
        let per_block = 1 + BLOCK / self.per_word();
        words
            .is_multiple_of(per_block)
            .then(|| words / per_block * BLOCK)
    }

    /// Bytes per value, scales included (for cache-size reports).
    pub fn bytes_per_value(self) -> f64 {
        (self.bits() as f64 + 32.0 / BLOCK as f64) / 8.0
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Q8 => "q8",
            QuantFormat::Q4 => "q4",
            QuantFormat::Nf4 => "nf4",
        }
    }

    /// Reads a format name (`q8`, `q4`, `nf4`; case-insensitive).
    pub fn parse(s: &str) -> Option<QuantFormat> {
        match s.to_ascii_lowercase().as_str() {
            "q8" | "q8_0" => Some(QuantFormat::Q8),
            "q4" | "q4_0" => Some(QuantFormat::Q4),
            "nf4" => Some(QuantFormat::Nf4),
            _ => None,
        }
    }

    /// The code of value `x` in a block with scale `s` (and, for `nf4`, the
    /// inverse scale `inv`). `round` is to nearest, ties to even, as the
    /// GPU kernels' `round` is (CUDA's `rint`, WGSL's `round`): half-
    /// precision inputs sit on a coarse grid, where exact ties happen.
    fn encode(self, x: f32, s: f32) -> u32 {
        let inv = if s == 0.0 { 0.0 } else { 1.0 / s };
        match self {
            QuantFormat::Q8 => {
                ((x * inv).round_ties_even().clamp(-127.0, 127.0) as i32 as u32) & 0xff
            }
            QuantFormat::Q4 => ((x * inv).round_ties_even() + 8.0).clamp(0.0, 15.0) as u32,
            QuantFormat::Nf4 => {
                // The nearest level, found as the number of midpoints
                // between levels below y (a tie goes to the lower level).
                let y = x * inv;
                NF4_LEVELS
                    .windows(2)
                    .filter(|w| y > (w[0] + w[1]) * 0.5)
                    .count() as u32
            }
        }
    }

    /// The value of `code` in a block with scale `s`.
    pub fn decode(self, code: u32, s: f32) -> f32 {
        match self {
            QuantFormat::Q8 => (code as u8 as i8) as f32 * s,
            QuantFormat::Q4 => (code as f32 - 8.0) * s,
            QuantFormat::Nf4 => NF4_LEVELS[code as usize & 15] * s,
        }
    }

    /// The scale of one block.
    fn scale(self, block: &[f32]) -> f32 {
        match self {
            QuantFormat::Q8 => block.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0,
            QuantFormat::Nf4 => block.iter().fold(0f32, |m, x| m.max(x.abs())),
            QuantFormat::Q4 => {
                // The value of largest magnitude maps to code 0 (−8 · s).
                let m = block
                    .iter()
                    .fold(0f32, |m, &x| if x.abs() > m.abs() { x } else { m });
                m / -8.0
            }
        }
    }

    /// Quantizes one row (`row.len()` a multiple of [`BLOCK`]) into `out`,
    /// which has [`QuantFormat::words`] words.
    pub fn quantize_row(self, row: &[f32], out: &mut [i32]) {
        let n = row.len();
        let nb = n / BLOCK;
        debug_assert_eq!(Some(out.len()), self.words(n));
        let (scales, codes) = out.split_at_mut(nb);
        codes.fill(0);
        let per = self.per_word();
        for (b, block) in row.chunks_exact(BLOCK).enumerate() {
            let s = self.scale(block);
            scales[b] = s.to_bits() as i32;
            for (i, &x) in block.iter().enumerate() {
                let e = b * BLOCK + i;
                let c = self.encode(x, s);
                codes[e / per] |= (c << ((e % per) * self.bits())) as i32;
            }
        }
    }

    /// Dequantizes one row of `n` values from its words.
    pub fn dequantize_row(self, words: &[i32], out: &mut [f32]) {
        let n = out.len();
        let nb = n / BLOCK;
        let (scales, codes) = words.split_at(nb);
        let (per, bits) = (self.per_word(), self.bits());
        let mask = (1u32 << bits) - 1;
        for (e, o) in out.iter_mut().enumerate() {
            let s = f32::from_bits(scales[e / BLOCK] as u32);
            let c = ((codes[e / per] as u32) >> ((e % per) * bits)) & mask;
            *o = self.decode(c, s);
        }
    }
}

impl fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    fn roundtrip(f: QuantFormat, x: &[f32]) -> Vec<f32> {
        let mut w = vec![0; f.words(x.len()).unwrap()];
        f.quantize_row(x, &mut w);
        let mut y = vec![0.0; x.len()];
        f.dequantize_row(&w, &mut y);
        y
    }

    #[test]
    fn word_counts() {
        assert_eq!(QuantFormat::Q8.words(64), Some(2 + 16));
        assert_eq!(QuantFormat::Q4.words(64), Some(2 + 8));
        assert_eq!(QuantFormat::Nf4.words(192), Some(6 + 24));
        assert_eq!(QuantFormat::Q8.words(48), None);
        for f in [QuantFormat::Q8, QuantFormat::Q4, QuantFormat::Nf4] {
            for n in [32, 64, 192, 2048] {
                assert_eq!(f.values(f.words(n).unwrap()), Some(n));
            }
        }
        assert_eq!(QuantFormat::Q8.values(10), None);
    }

    /// The error of each value is at most half a quantization step, except
    /// q4's: its codes span −8..7 steps, so a value of the sign opposite to
    /// the block's extreme near `max|x|` can be a whole step off.
    #[test]
    fn error_bounds() {
        let x = row(7, 256);
        for (f, steps, slack) in [(QuantFormat::Q8, 127.0, 0.5), (QuantFormat::Q4, 8.0, 1.0)] {
            let y = roundtrip(f, &x);
            for (b, (xb, yb)) in x.chunks(BLOCK).zip(y.chunks(BLOCK)).enumerate() {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                let step = amax / steps;
                for (a, c) in xb.iter().zip(yb) {
                    assert!(
                        (a - c).abs() <= step * slack + 1e-6,
                        "{f} block {b}: {a} → {c}, step {step}"
                    );
                }
            }
        }
        // nf4: the nearest level, so at most half the widest gap (0.304 at −1).
        let y = roundtrip(QuantFormat::Nf4, &x);
        for (xb, yb) in x.chunks(BLOCK).zip(y.chunks(BLOCK)) {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, c) in xb.iter().zip(yb) {
                assert!((a - c).abs() <= amax * 0.153, "{a} → {c}");
            }
        }
    }

    #[test]
    fn exact_cases() {
        // The value of largest magnitude is exact in every format.
        let mut x = vec![0.0f32; 32];
        x[3] = -3.0;
        x[9] = 1.5;
        for f in [QuantFormat::Q8, QuantFormat::Q4, QuantFormat::Nf4] {
            let y = roundtrip(f, &x);
            assert_eq!(y[3], -3.0, "{f}");
            assert_eq!(y[0], 0.0, "{f}");
        }
        // An all-zero block has scale 0 and decodes to zeros.
        for f in [QuantFormat::Q8, QuantFormat::Q4, QuantFormat::Nf4] {
            assert_eq!(roundtrip(f, &[0.0; 32]), vec![0.0; 32]);
        }
        assert_eq!(QuantFormat::parse("Q8_0"), Some(QuantFormat::Q8));
        assert_eq!(QuantFormat::parse("int8"), None);
    }
}
