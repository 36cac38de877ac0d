//! Quantized KV-cache storage and attention over caches: `quantize`,
//! `dequantize` (the block formats of `crate::quant`) and `kv_attention`,
//! evaluated through its decomposition.

use super::elementwise::cast;
use super::fused::attention;
use super::layout::{concat, permute, reshape};
use super::Raw;
use crate::op::{KvPart, Scalar};
use crate::quant::QuantFormat;
use crate::reference::tensor::{round_bf16, round_f16, Storage, Tensor};
use crate::DType;
use rayon::prelude::*;

/// Rows along the last axis → their quantized words.
pub fn quantize(x: &Tensor, format: QuantFormat) -> Result<Raw, String> {
    let n = *x.shape().last().ok_or("quantize of a scalar")?;
    let words = format
        .words(n)
        .ok_or_else(|| format!("{format} needs rows of a multiple of 32 values, got {n}"))?;
    let data = x.to_f32_vec();
    let mut out = vec![0i32; data.len() / n.max(1) * words];
    if n > 0 {
        out.par_chunks_mut(words)
            .zip(data.par_chunks(n))
            .for_each(|(o, row)| format.quantize_row(row, o));
    }
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("rank ≥ 1") = words;
    Ok((shape, Storage::I32(out)))
}

/// Quantized words → rows of `dtype` values.
pub fn dequantize(x: &Tensor, format: QuantFormat, dtype: DType) -> Result<Raw, String> {
    let words = *x.shape().last().ok_or("dequantize of a scalar")?;
    let codes = x.as_i32().ok_or("dequantize reads i32 words")?;
    let n = format
        .values(words)
        .ok_or_else(|| format!("{words} words are not whole {format} blocks"))?;
    let mut out = vec![0f32; codes.len() / words.max(1) * n];
    if n > 0 {
        out.par_chunks_mut(n)
            .zip(codes.par_chunks(words))
            .for_each(|(o, w)| format.dequantize_row(w, o));
    }
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("rank ≥ 1") = n;
    let data = match dtype {
        DType::F64 => Storage::F64(out.into_iter().map(f64::from).collect()),
        DType::F16 => Storage::F32(out.into_iter().map(round_f16).collect()),
        DType::BF16 => Storage::F32(out.into_iter().map(round_bf16).collect()),
        _ => Storage::F32(out),
    };
    Ok((shape, data))
}

/// One cache part as `[B, kv, 1, S, dim]` values in `dtype`.
fn part_view(c: &Tensor, part: KvPart, heads: usize, dtype: DType) -> Result<Tensor, String> {
    let dense = match part.format {
        Some(f) => {
            let (shape, data) = dequantize(c, f, dtype)?;
            Tensor::new(dtype, shape, data)
        }
        None if c.dtype() == dtype => c.clone(),
        None => {
            let (shape, data) = cast(c, dtype)?;
            Tensor::new(dtype, shape, data)
        }
    };
    let (b, s) = (dense.shape()[0], dense.shape()[1]);
    let (shape, data) = reshape(&dense, &[b, s, heads, 1, part.dim])?;
    let (shape, data) = permute(&Tensor::new(dtype, shape, data), &[0, 2, 3, 1, 4])?;
    Ok(Tensor::new(dtype, shape, data))
}

/// `attention{causal, scale}(q, [keys…], values)` over token-major caches.
pub fn kv_attention(
    q: &Tensor,
    caches: &[&Tensor],
    parts: &[KvPart],
    heads: usize,
    causal: bool,
    scale: Scalar,
) -> Result<Raw, String> {
    let dt = q.dtype();
    let views = parts
        .iter()
        .zip(caches)
        .map(|(&p, c)| part_view(c, p, heads, dt))
        .collect::<Result<Vec<_>, _>>()?;
    let (v, keys) = views.split_last().ok_or("kv_attention without parts")?;
    let k = if keys.len() == 1 {
        keys[0].clone()
    } else {
        let refs: Vec<&Tensor> = keys.iter().collect();
        let (shape, data) = concat(&refs, 4)?;
        Tensor::new(dt, shape, data)
    };
    attention(q, &k, v, causal, scale)
}
