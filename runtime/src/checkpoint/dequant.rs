//! ggml tensor types and their dequantization to f32.
//!
//! Supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1 (block layouts as in
//! llama.cpp's `ggml-common.h`). Every other ggml type (Q5_0, Q5_1, Q8_1, the
//! K-quants Q2_K..Q8_K, the IQ* types, TQ*, MXFP4, integer and F64 tensors) is
//! recognised by its id so errors can name it, but reading it is an error.

use half::{bf16, f16};
use rayon::prelude::*;

/// The element types a GGUF tensor can have (ggml's `ggml_type` ids).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    I8,
    I16,
    I32,
    I64,
    F64,
    BF16,
    /// An id this reader knows no block layout for (IQ*, TQ*, MXFP4, ...).
    Other(u32),
}

/// The GGUF types this reader dequantizes, as error messages list them.
pub const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1";

impl GgmlType {
    pub fn from_id(id: u32) -> Self {
        use GgmlType::*;
        match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            30 => BF16,
            other => Other(other),
        }
    }

    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2K => 10,
            Q3K => 11,
            Q4K => 12,
            Q5K => 13,
            Q6K => 14,
            Q8K => 15,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            BF16 => 30,
            Other(id) => id,
        }
    }

    /// (elements per block, bytes per block), or `None` for unknown layouts.
    pub fn block_layout(self) -> Option<(usize, usize)> {
        use GgmlType::*;
        Some(match self {
            F32 => (1, 4),
            F16 | BF16 => (1, 2),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36),
            Q2K => (256, 84),
            Q3K => (256, 110),
            Q4K => (256, 144),
            Q5K => (256, 176),
            Q6K => (256, 210),
            Q8K => (256, 292),
            I8 => (1, 1),
            I16 => (1, 2),
            I32 => (1, 4),
            I64 | F64 => (1, 8),
            Other(_) => return None,
        })
    }

    /// Bytes taken by `n_elements` elements, or `None` when the layout is
    /// unknown or `n_elements` is not a whole number of blocks.
    pub fn byte_size(self, n_elements: u64) -> Option<u64> {
        let (block, bytes) = self.block_layout()?;
        if n_elements % block as u64 != 0 {
            return None;
        }
        (n_elements / block as u64).checked_mul(bytes as u64)
    }

    pub fn is_supported(self) -> bool {
        matches!(
            self,
            GgmlType::F32
                | GgmlType::F16
                | GgmlType::BF16
                | GgmlType::Q8_0
                | GgmlType::Q4_0
                | GgmlType::Q4_1
        )
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use GgmlType::*;
        let name = match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2K => "Q2_K",
            Q3K => "Q3_K",
            Q4K => "Q4_K",
            Q5K => "Q5_K",
            Q6K => "Q6_K",
            Q8K => "Q8_K",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            BF16 => "BF16",
            Other(id) => return write!(f, "ggml type id {id}"),
        };
        f.write_str(name)
    }
}

/// Blocks handled per rayon task; large enough that scheduling is noise.
const BLOCKS_PER_TASK: usize = 4096;

/// Dequantizes `bytes` (exactly `ty.byte_size(n)` bytes) into `n` f32 values.
/// Returns `None` for an unsupported type; the caller has checked the size.
pub(crate) fn dequantize(ty: GgmlType, bytes: &[u8]) -> Option<Vec<f32>> {
    let (block, block_bytes) = ty.block_layout()?;
    debug_assert_eq!(bytes.len() % block_bytes, 0);
    let n = bytes.len() / block_bytes * block;
    let mut out = vec![0f32; n];
    let kernel: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => f32_block,
        GgmlType::F16 => f16_block,
        GgmlType::BF16 => bf16_block,
        GgmlType::Q8_0 => q8_0_block,
        GgmlType::Q4_0 => q4_0_block,
        GgmlType::Q4_1 => q4_1_block,
        _ => return None,
    };
    let elems_per_task = block * BLOCKS_PER_TASK;
    out.par_chunks_mut(elems_per_task)
        .zip(bytes.par_chunks(block_bytes * BLOCKS_PER_TASK))
        .for_each(|(dst, src)| {
            for (d, s) in dst
                .chunks_exact_mut(block)
                .zip(src.chunks_exact(block_bytes))
            {
                kernel(s, d);
            }
        });
    Some(out)
}

fn read_f16(b: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

fn f32_block(src: &[u8], dst: &mut [f32]) {
    dst[0] = f32::from_le_bytes([src[0], src[1], src[2], src[3]]);
}

fn f16_block(src: &[u8], dst: &mut [f32]) {
    dst[0] = read_f16(src);
}

fn bf16_block(src: &[u8], dst: &mut [f32]) {
    dst[0] = bf16::from_bits(u16::from_le_bytes([src[0], src[1]])).to_f32();
}

/// `block_q8_0`: f16 scale `d`, then 32 signed bytes; x = q * d.
fn q8_0_block(src: &[u8], dst: &mut [f32]) {
    let d = read_f16(&src[0..2]);
    for (x, &q) in dst.iter_mut().zip(&src[2..34]) {
        *x = (q as i8) as f32 * d;
    }
}

/// `block_q4_0`: f16 scale `d`, then 16 bytes of nibbles; the low nibbles are
/// elements 0..16, the high nibbles 16..32; x = (q - 8) * d.
fn q4_0_block(src: &[u8], dst: &mut [f32]) {
    let d = read_f16(&src[0..2]);
    let (lo, hi) = dst.split_at_mut(16);
    for (j, &q) in src[2..18].iter().enumerate() {
        lo[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
        hi[j] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// `block_q4_1`: f16 scale `d`, f16 minimum `m`, then 16 bytes of nibbles in
/// the same order as Q4_0; x = q * d + m.
fn q4_1_block(src: &[u8], dst: &mut [f32]) {
    let d = read_f16(&src[0..2]);
    let m = read_f16(&src[2..4]);
    let (lo, hi) = dst.split_at_mut(16);
    for (j, &q) in src[4..20].iter().enumerate() {
        lo[j] = (q & 0x0f) as f32 * d + m;
        hi[j] = (q >> 4) as f32 * d + m;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_bits().to_le_bytes()
    }

    #[test]
    fn plain_float_types() {
        let mut b = Vec::new();
        for x in [1.5f32, -2.25] {
            b.extend(x.to_le_bytes());
        }
        assert_eq!(dequantize(GgmlType::F32, &b).unwrap(), vec![1.5, -2.25]);
        let b: Vec<u8> = [0.5f32, -3.0].iter().flat_map(|&x| h(x)).collect();
        assert_eq!(dequantize(GgmlType::F16, &b).unwrap(), vec![0.5, -3.0]);
        let b: Vec<u8> = [0.75f32, 96.0]
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_bits().to_le_bytes())
            .collect();
        assert_eq!(dequantize(GgmlType::BF16, &b).unwrap(), vec![0.75, 96.0]);
    }

    #[test]
    fn q8_0_by_hand() {
        // d = 0.5; q = -16..16.
        let mut b = h(0.5).to_vec();
        b.extend((-16i8..16).map(|q| q as u8));
        let got = dequantize(GgmlType::Q8_0, &b).unwrap();
        let want: Vec<f32> = (-16..16).map(|q| q as f32 * 0.5).collect();
        assert_eq!(got, want);
        assert_eq!(got[0], -8.0);
        assert_eq!(got[31], 7.5);
    }

    #[test]
    fn q4_0_by_hand() {
        // d = 2; byte j has low nibble j and high nibble 15 - j.
        let mut b = h(2.0).to_vec();
        b.extend((0u8..16).map(|j| j | ((15 - j) << 4)));
        let got = dequantize(GgmlType::Q4_0, &b).unwrap();
        assert_eq!(got.len(), 32);
        for j in 0..16 {
            assert_eq!(got[j], (j as f32 - 8.0) * 2.0, "element {j}");
            assert_eq!(
                got[j + 16],
                ((15 - j) as f32 - 8.0) * 2.0,
                "element {}",
                j + 16
            );
        }
        assert_eq!(got[0], -16.0);
        assert_eq!(got[16], 14.0);
    }

    #[test]
    fn q4_1_by_hand() {
        // d = 0.25, m = -1; low nibble j, high nibble 15 - j.
        let mut b = h(0.25).to_vec();
        b.extend(h(-1.0));
        b.extend((0u8..16).map(|j| j | ((15 - j) << 4)));
        let got = dequantize(GgmlType::Q4_1, &b).unwrap();
        for j in 0..16 {
            assert_eq!(got[j], j as f32 * 0.25 - 1.0, "element {j}");
            assert_eq!(got[j + 16], (15 - j) as f32 * 0.25 - 1.0);
        }
        assert_eq!(got[1], -0.75);
        assert_eq!(got[16], 2.75);
    }

    #[test]
    fn many_blocks_keep_their_order() {
        // More blocks than one rayon task holds, each with its own scale.
        let n_blocks = BLOCKS_PER_TASK * 2 + 3;
        let mut b = Vec::new();
        for i in 0..n_blocks {
            b.extend(h((i % 7) as f32));
            b.extend([1u8; 32]);
        }
        let got = dequantize(GgmlType::Q8_0, &b).unwrap();
        assert_eq!(got.len(), n_blocks * 32);
        for i in 0..n_blocks {
            assert_eq!(got[i * 32 + 5], (i % 7) as f32);
        }
    }

    #[test]
    fn unsupported_types_give_none() {
        assert!(dequantize(GgmlType::Q6K, &[0u8; 210]).is_none());
        assert!(dequantize(GgmlType::Other(20), &[0u8; 18]).is_none());
        assert_eq!(GgmlType::from_id(14).to_string(), "Q6_K");
        assert_eq!(GgmlType::from_id(99).to_string(), "ggml type id 99");
    }
}
