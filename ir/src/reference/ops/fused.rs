//! Fused ops, evaluated through their primitive decompositions (so they are
//! correct by construction against the primitives), and cross-entropy.

use super::attention::causal_mask;
use super::elementwise::{binary, constant, unary};
use super::matmul::{matmul, MatOperand};
use super::reduce::softmax;
use super::{each_float, Raw};
use crate::op::{BinaryOp, ElemInstr, ElemProgram, Scalar};
use crate::reference::tensor::{Float, Storage, Tensor};

fn tensor(dtype: crate::DType, raw: Raw) -> Tensor {
    Tensor::new(dtype, raw.0, raw.1)
}

/// `softmax(mask(q·kᵀ·scale))·v`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    scale: Scalar,
) -> Result<Raw, String> {
    let dt = q.dtype();
    let s = tensor(
        dt,
        matmul(
            MatOperand::plain(q),
            MatOperand {
                t: k,
                transposed: true,
            },
        )?,
    );
    let c = tensor(dt, constant(scale.0, dt)?);
    let mut s = tensor(dt, binary(BinaryOp::Mul, &s, &c)?);
    if causal {
        s = tensor(dt, causal_mask(&s)?);
    }
    let axis = s.rank() - 1;
    let p = tensor(dt, softmax(axis, &s)?);
    matmul(MatOperand::plain(&p), MatOperand::plain(v))
}

/// `x · rsqrt(mean(x²) + eps) · w` over the last axis, accumulated in f64.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: Scalar) -> Result<Raw, String> {
    let d = *x.shape().last().ok_or("rms_norm of a scalar")?;
    fn go<T: Float>(x: &[T], w: &[T], d: usize, eps: f64) -> Vec<T> {
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks(d) {
            let ms = row.iter().map(|v| v.to_f64() * v.to_f64()).sum::<f64>() / d as f64;
            let inv = T::from_f64(1.0 / (ms + eps).sqrt());
            out.extend(row.iter().zip(w).map(|(&v, &g)| v * inv * g));
        }
        out
    }
    let data = match (x.storage(), w.storage()) {
        (Storage::F32(x), Storage::F32(w)) => Storage::F32(go(x, w, d, eps.0)),
        (Storage::F64(x), Storage::F64(w)) => Storage::F64(go(x, w, d, eps.0)),
        _ => {
            return Err(format!(
                "rms_norm needs float operands of one dtype, got {x} and {w}"
            ))
        }
    };
    Ok((x.shape().to_vec(), data))
}

/// Runs the program one instruction at a time with the primitive ops, then
/// broadcasts the result to `out_shape`.
pub fn elementwise(p: &ElemProgram, xs: &[&Tensor], out_shape: &[usize]) -> Result<Raw, String> {
    let dt = xs
        .first()
        .map(|x| x.dtype())
        .ok_or("elementwise without operands")?;
    let mut vals: Vec<Tensor> = Vec::with_capacity(p.0.len());
    for ins in &p.0 {
        let raw = match *ins {
            ElemInstr::Input(k) => {
                let x = xs
                    .get(k as usize)
                    .ok_or_else(|| format!("program reads operand {k}, which is missing"))?;
                (x.shape().to_vec(), x.storage().clone())
            }
            ElemInstr::Const(c) => constant(c.0, dt)?,
            ElemInstr::Unary(u, a) => unary(u, &vals[a as usize])?,
            ElemInstr::Binary(b, x, y) => binary(b, &vals[x as usize], &vals[y as usize])?,
        };
        vals.push(tensor(dt, raw));
    }
    let last = vals.pop().ok_or("empty elementwise program")?;
    if last.shape() == out_shape {
        return Ok((last.shape().to_vec(), last.into_storage()));
    }
    let zeros = Tensor::full(dt, out_shape.to_vec(), 0.0);
    binary(BinaryOp::Add, &last, &zeros)
}

/// `logsumexp(logits) − logits[target]` per position, accumulated in f64.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Raw, String> {
    let v = *logits.shape().last().ok_or("cross_entropy of a scalar")?;
    let t = targets
        .as_i32()
        .ok_or_else(|| format!("cross_entropy targets must be i32, got {targets}"))?;
    fn go<T: Float>(l: &[T], t: &[i32], v: usize) -> Result<Vec<T>, String> {
        l.chunks(v)
            .zip(t)
            .map(|(row, &tgt)| {
                if tgt < 0 || tgt as usize >= v {
                    return Err(format!("target {tgt} is outside 0..{v}"));
                }
                let max = row
                    .iter()
                    .map(|x| x.to_f64())
                    .fold(f64::NEG_INFINITY, f64::max);
                let lse = row
                    .iter()
                    .map(|x| (x.to_f64() - max).exp())
                    .sum::<f64>()
                    .ln()
                    + max;
                Ok(T::from_f64(lse - row[tgt as usize].to_f64()))
            })
            .collect()
    }
    let data = each_float!(logits, l => go(l, t, v)?);
    Ok((targets.shape().to_vec(), data))
}
