//! The two attention-specific primitives: the causal mask over scores and
//! rotary position embedding.

use super::{each_float, elems, fill_rows, Raw};
use crate::op::RopeSpec;
use crate::reference::tensor::{Float, Tensor};

fn causal_mask_typed<T: Float>(x: &[T], t: usize, s: usize) -> Vec<T> {
    let mut out = x.to_vec();
    if out.is_empty() {
        return out;
    }
    // Query row i sits at absolute position s - t + i and sees keys 0..=that.
    let offset = s as isize - t as isize;
    fill_rows(&mut out, s, |row, dst| {
        let i = (row % t) as isize;
        let visible = (i + offset + 1).clamp(0, s as isize) as usize;
        dst[visible..].fill(T::NEG_INFINITY);
    });
    out
}

/// Scores `[..., T, S]`: entry `(i, j)` becomes -inf where `j > i + (S - T)`.
pub fn causal_mask(x: &Tensor) -> Result<Raw, String> {
    let r = x.rank();
    if r < 2 {
        return Err(format!("causal_mask needs rank ≥ 2, got {x}"));
    }
    let (t, s) = (x.shape()[r - 2], x.shape()[r - 1]);
    Ok((
        x.shape().to_vec(),
        each_float!(x, v => causal_mask_typed(v, t, s)),
    ))
}

fn rope_typed<T: Float>(
    x: &[T],
    shape: &[usize],
    pos: &[i32],
    inv_freq: &[f64],
    inverse: bool,
) -> Vec<T> {
    let r = shape.len();
    let (t, h, d) = (shape[r - 3], shape[r - 2], shape[r - 1]);
    let half = d / 2;
    // Angles in T's precision, like Hugging Face: inv_freq and positions are
    // converted first and multiplied in T. (T, d/2) each.
    let (mut cos, mut sin) = (Vec::with_capacity(t * half), Vec::with_capacity(t * half));
    for &p in pos {
        for &f in inv_freq {
            let angle = T::from_f64(p as f64) * T::from_f64(f);
            cos.push(angle.cos());
            // sin(−a) = −sin(a): the inverse rotation is exact negation.
            sin.push(if inverse { -angle.sin() } else { angle.sin() });
        }
    }
    let mut out = vec![T::ZERO; x.len()];
    if out.is_empty() {
        return out;
    }
    // One output row is one (prefix, position) pair: H heads of d.
    fill_rows(&mut out, h * d, |row, dst| {
        let ti = row % t;
        let (c, s) = (
            &cos[ti * half..(ti + 1) * half],
            &sin[ti * half..(ti + 1) * half],
        );
        let src = &x[row * h * d..(row + 1) * h * d];
        for (o, i) in dst.chunks_mut(d).zip(src.chunks(d)) {
            for j in 0..half {
                let (a, b) = (i[j], i[j + half]);
                o[j] = a * c[j] - b * s[j];
                o[j + half] = b * c[j] + a * s[j];
            }
        }
    });
    out
}

/// Rotary embedding of `x [..., T, H, d]` at positions `pos (i32) [T]`,
/// rotate-half convention: for `i < d/2` and angle `a = pos · inv_freq[i]`,
/// `out[i] = x[i]·cos a − x[i + d/2]·sin a` and
/// `out[i + d/2] = x[i + d/2]·cos a + x[i]·sin a`; with `spec.inverse`, the
/// same with `−a` (the transpose, RoPE's gradient).
pub fn rope(spec: &RopeSpec, x: &Tensor, pos: &Tensor) -> Result<Raw, String> {
    let shape = x.shape();
    let r = shape.len();
    if r < 3 || shape[r - 1] & 1 != 0 {
        return Err(format!("rope needs [..., T, H, d] with d even, got {x}"));
    }
    let pos_v = elems::<i32>(pos, "i32 positions")?;
    if pos.shape() != [shape[r - 3]] {
        return Err(format!(
            "rope positions must be i32[{}], got {pos}",
            shape[r - 3]
        ));
    }
    let inv_freq = spec.inv_freq(shape[r - 1]);
    Ok((
        shape.to_vec(),
        each_float!(x, v => rope_typed(v, shape, pos_v, &inv_freq, spec.inverse)),
    ))
}
