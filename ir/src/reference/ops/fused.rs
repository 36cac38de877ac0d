//! Fused ops, evaluated through their primitive decompositions (so they are
//! correct by construction against the primitives), and cross-entropy.
//!
//! Intermediates are labelled with the operands' dtype but never rounded
//! (half-precision values are stored as `f32`): a fused op computes in f32
//! and the evaluator rounds its result once if the node's dtype is f16 or
//! bf16. Attention's statistics for half-precision q (`attention_lse`,
//! `attention_with_lse`, and the `lse`/`delta` operands `attention_grad`
//! reads) are typed `f32`, so they are never rounded.

use super::attention::{causal_mask, rope};
use super::elementwise::{binary, constant, unary};
use super::layout::{broadcast_to, concat, slice};
use super::matmul::{matmul, MatOperand};
use super::reduce::{reduce, softmax};
use super::{each_float, Raw};
use crate::op::{
    AttnArg, BinaryOp, ElemInstr, ElemProgram, NormArg, ReduceOp, RopeSpec, Scalar, UnaryOp,
};
use crate::reference::tensor::{round_bf16, round_f16, Float, Storage, Tensor};

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

/// Attention's masked, scaled scores `mask(q·kᵀ·scale)`.
fn scores(q: &Tensor, k: &Tensor, causal: bool, scale: Scalar) -> Result<Tensor, String> {
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
    let s = tensor(dt, binary(BinaryOp::Mul, &s, &c)?);
    Ok(if causal {
        tensor(dt, causal_mask(&s)?)
    } else {
        s
    })
}

/// `m + log(Σ exp(s − m))` per row of attention's scores, `m` the row's max.
pub fn attention_lse(q: &Tensor, k: &Tensor, causal: bool, scale: Scalar) -> Result<Raw, String> {
    let dt = q.dtype();
    let s = scores(q, k, causal, scale)?;
    let axis = s.rank() - 1;
    let m = tensor(dt, reduce(ReduceOp::Max, axis, &s)?);
    let e = tensor(dt, binary(BinaryOp::Sub, &s, &m)?);
    let e = tensor(dt, unary(UnaryOp::Exp, &e)?);
    let sum = tensor(dt, reduce(ReduceOp::Sum, axis, &e)?);
    let log = tensor(dt, unary(UnaryOp::Log, &sum)?);
    binary(BinaryOp::Add, &m, &log)
}

/// `concat{last}(attention(q, k, v), attention_lse(q, k))`, the log-sum-exp
/// broadcast to the output's leading axes; both parts as computed, before
/// any rounding (the node is `f32` for half-precision q).
pub fn attention_with_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    scale: Scalar,
) -> Result<Raw, String> {
    let dt = q.dtype();
    let out = tensor(dt, attention(q, k, v, causal, scale)?);
    let lse = tensor(dt, attention_lse(q, k, causal, scale)?);
    let r = out.rank();
    let mut lse_shape = out.shape().to_vec();
    lse_shape[r - 1] = 1;
    let lse = if lse.shape() == lse_shape.as_slice() {
        lse
    } else {
        tensor(dt, broadcast_to(&lse, &lse_shape)?)
    };
    concat(&[&out, &lse], r - 1)
}

/// One gradient of attention (or, for `KV`, two side by side), by
/// `AttentionGrad`'s decomposition: the probabilities recomputed from `lse`,
/// `ds = p·(dout·vᵀ − delta)·scale`.
#[allow(clippy::too_many_arguments)]
pub fn attention_grad(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dout: &Tensor,
    lse: &Tensor,
    delta: &Tensor,
    causal: bool,
    scale: Scalar,
    wrt: AttnArg,
) -> Result<Raw, String> {
    let dt = q.dtype();
    let s = scores(q, k, causal, scale)?;
    let p = tensor(dt, binary(BinaryOp::Sub, &s, lse)?);
    let p = tensor(dt, unary(UnaryOp::Exp, &p)?);
    fn t(x: &Tensor) -> MatOperand<'_> {
        MatOperand {
            t: x,
            transposed: true,
        }
    }
    let grad_v = || matmul(t(&p), MatOperand::plain(dout));
    if wrt == AttnArg::V {
        return grad_v();
    }
    let dp = tensor(dt, matmul(MatOperand::plain(dout), t(v))?);
    let ds = tensor(dt, binary(BinaryOp::Sub, &dp, delta)?);
    let ds = tensor(dt, binary(BinaryOp::Mul, &p, &ds)?);
    let c = tensor(dt, constant(scale.0, dt)?);
    let ds = tensor(dt, binary(BinaryOp::Mul, &ds, &c)?);
    let grad_k = || matmul(t(&ds), MatOperand::plain(q));
    match wrt {
        AttnArg::Q => matmul(MatOperand::plain(&ds), MatOperand::plain(k)),
        AttnArg::K => grad_k(),
        AttnArg::KV => {
            let (dk, dv) = (tensor(dt, grad_k()?), tensor(dt, grad_v()?));
            concat(&[&dk, &dv], dk.rank() - 1)
        }
        AttnArg::V => unreachable!("answered before ds"),
    }
}

/// How `rms_norm` rounds its normalized row before multiplying by `w`:
/// to x's grid for f16/bf16 (stored here as `f32`), not at all otherwise.
fn normalized_rounding(dtype: crate::DType) -> fn(f32) -> f32 {
    match dtype {
        crate::DType::BF16 => round_bf16,
        crate::DType::F16 => round_f16,
        _ => |v| v,
    }
}

/// `data` (an f16/bf16 value stored as `f32`) rounded to `dtype`'s grid,
/// as an op's stored result would be; other dtypes are left as they are.
fn round_to(dtype: crate::DType, data: &mut Storage) {
    if let (crate::DType::BF16 | crate::DType::F16, Storage::F32(v)) = (dtype, data) {
        let round = normalized_rounding(dtype);
        v.iter_mut().for_each(|e| *e = round(*e));
    }
}

/// `x · rsqrt(mean(x²) + eps) · w` over the last axis, the mean of squares
/// accumulated in f64; for f16/bf16 the normalized row is rounded to x's
/// grid before the product with `w` (see `Op::RmsNorm`).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: Scalar) -> Result<Raw, String> {
    let d = *x.shape().last().ok_or("rms_norm of a scalar")?;
    let round = normalized_rounding(x.dtype());
    fn go<T: Float>(x: &[T], w: &[T], d: usize, eps: f64, round: impl Fn(T) -> T) -> Vec<T> {
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks(d) {
            let ms = row.iter().map(|v| v.to_f64() * v.to_f64()).sum::<f64>() / d as f64;
            let inv = T::from_f64(1.0 / (ms + eps).sqrt());
            out.extend(row.iter().zip(w).map(|(&v, &g)| round(v * inv) * g));
        }
        out
    }
    let data = match (x.storage(), w.storage()) {
        (Storage::F32(x), Storage::F32(w)) => Storage::F32(go(x, w, d, eps.0, round)),
        (Storage::F64(x), Storage::F64(w)) => Storage::F64(go(x, w, d, eps.0, |v| v)),
        _ => {
            return Err(format!(
                "rms_norm needs float operands of one dtype, got {x} and {w}"
            ))
        }
    };
    Ok((x.shape().to_vec(), data))
}

/// `matmul(rms_norm{eps}(x, w), b)` (see `Op::RmsNormMatMul`): the
/// normalized rows rounded to x's dtype as the op's result would be, then
/// the product.
pub fn rms_norm_matmul(x: &Tensor, w: &Tensor, b: MatOperand, eps: Scalar) -> Result<Raw, String> {
    let (shape, mut data) = rms_norm(x, w, eps)?;
    round_to(x.dtype(), &mut data);
    let n = Tensor::new(x.dtype(), shape, data);
    matmul(
        MatOperand {
            t: &n,
            transposed: false,
        },
        b,
    )
}

/// `Op::MatMulRope` by its decomposition: the product (`rms_norm_matmul`
/// with a norm weight `w`, `matmul` without) rounded to x's dtype as its
/// result would be, then RoPE over each column range's heads, the other
/// columns as they are.
#[allow(clippy::too_many_arguments)]
pub fn matmul_rope(
    x: &Tensor,
    w: Option<&Tensor>,
    b: MatOperand,
    pos: &Tensor,
    eps: Option<Scalar>,
    spec: &RopeSpec,
    head_dim: usize,
    ranges: &[(usize, usize)],
) -> Result<Raw, String> {
    let (shape, mut data) = match (w, eps) {
        (Some(w), Some(eps)) => rms_norm_matmul(x, w, b, eps)?,
        (None, None) => matmul(
            MatOperand {
                t: x,
                transposed: false,
            },
            b,
        )?,
        _ => return Err("matmul_rope takes a norm weight exactly when it has eps".into()),
    };
    round_to(x.dtype(), &mut data);
    let y = Tensor::new(x.dtype(), shape.clone(), data);
    let r = shape.len();
    let n = shape[r - 1];
    let mut pieces: Vec<Tensor> = Vec::new();
    let mut at = 0;
    for &(s, e) in ranges {
        if s > at {
            pieces.push(tensor(x.dtype(), slice(&y, r - 1, at, s)?));
        }
        let cols = tensor(x.dtype(), slice(&y, r - 1, s, e)?);
        let mut heads = shape[..r - 1].to_vec();
        heads.extend([(e - s) / head_dim, head_dim]);
        let rotated = tensor(x.dtype(), rope(spec, &cols.reshaped(heads), pos)?);
        let mut back = shape[..r - 1].to_vec();
        back.push(e - s);
        pieces.push(rotated.reshaped(back));
        at = e;
    }
    if at < n {
        pieces.push(tensor(x.dtype(), slice(&y, r - 1, at, n)?));
    }
    let refs: Vec<&Tensor> = pieces.iter().collect();
    concat(&refs, r - 1)
}

/// `rms_norm`'s gradient for x or w (see `Op::RmsNormGrad`), each row's
/// sums and the weight gradient's sum over rows accumulated in f64.
pub fn rms_norm_grad(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    eps: Scalar,
    wrt: NormArg,
) -> Result<Raw, String> {
    let d = *x.shape().last().ok_or("rms_norm_grad of a scalar")?;
    let (xs, ws, gs) = (x.to_f64_vec(), w.to_f64_vec(), dy.to_f64_vec());
    if ws.len() != d || gs.len() != xs.len() {
        return Err(format!(
            "rms_norm_grad needs w [{d}] and dy of x's shape, got {w} and {dy} for {x}"
        ));
    }
    let round = normalized_rounding(x.dtype());
    let half = matches!(x.dtype(), crate::DType::F16 | crate::DType::BF16);
    let rows = || xs.chunks(d).zip(gs.chunks(d));
    let inv =
        |row: &[f64]| 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / d as f64 + eps.0).sqrt();
    let (shape, out) = match wrt {
        NormArg::X => {
            let mut out = Vec::with_capacity(xs.len());
            for (row, g) in rows() {
                let r = inv(row);
                let t = row
                    .iter()
                    .zip(g)
                    .zip(&ws)
                    .map(|((x, g), w)| x * g * w)
                    .sum::<f64>();
                let c = r * r * r * t / d as f64;
                out.extend(
                    row.iter()
                        .zip(g)
                        .zip(&ws)
                        .map(|((x, g), w)| r * g * w - x * c),
                );
            }
            (x.shape().to_vec(), out)
        }
        NormArg::W => {
            let mut acc = vec![0.0f64; d];
            for (row, g) in rows() {
                let r = inv(row);
                for ((a, &x), &g) in acc.iter_mut().zip(row).zip(g) {
                    let n = if half {
                        round((x as f32) * (r as f32)) as f64
                    } else {
                        x * r
                    };
                    *a += g * n;
                }
            }
            (vec![d], acc)
        }
    };
    let data = match x.storage() {
        Storage::F32(_) => Storage::F32(out.into_iter().map(|v| v as f32).collect()),
        Storage::F64(_) => Storage::F64(out),
        Storage::I32(_) => return Err(format!("rms_norm_grad needs float operands, got {x}")),
    };
    Ok((shape, data))
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

/// A logits row's log-sum-exp in f64, once its target is checked.
fn row_lse<T: Float>(row: &[T], target: i32) -> Result<f64, String> {
    let v = row.len();
    if target < 0 || target as usize >= v {
        return Err(format!("target {target} is outside 0..{v}"));
    }
    let max = row
        .iter()
        .map(|x| x.to_f64())
        .fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = row.iter().map(|x| (x.to_f64() - max).exp()).sum();
    Ok(sum.ln() + max)
}

/// `sum{last}(mul(x, y))`: its decomposition, for f16/bf16 operands on
/// their values as stored (already widened to f32, exactly), so each
/// product is an f32 product and the sum is accumulated in f64 and rounded
/// once to the statistics dtype, as `sum` does.
pub fn row_dot(x: &Tensor, y: &Tensor) -> Result<Raw, String> {
    if x.shape() != y.shape() || x.rank() == 0 {
        return Err(format!(
            "row_dot needs two operands of one shape, got {x} and {y}"
        ));
    }
    let p = tensor(x.dtype().stats(), binary(BinaryOp::Mul, x, y)?);
    reduce(ReduceOp::Sum, p.rank() - 1, &p)
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
                let lse = row_lse(row, tgt)?;
                Ok(T::from_f64(lse - row[tgt as usize].to_f64()))
            })
            .collect()
    }
    let data = each_float!(logits, l => go(l, t, v)?);
    Ok((targets.shape().to_vec(), data))
}

/// `(softmax(logits) − one_hot(targets)) · g` along the last axis, each
/// row's probabilities from its log-sum-exp in f64.
pub fn cross_entropy_grad(logits: &Tensor, targets: &Tensor, g: &Tensor) -> Result<Raw, String> {
    let v = *logits
        .shape()
        .last()
        .ok_or("cross_entropy_grad of a scalar")?;
    let t = targets
        .as_i32()
        .ok_or_else(|| format!("cross_entropy_grad targets must be i32, got {targets}"))?;
    let g = g.to_f64_vec();
    fn go<T: Float>(l: &[T], t: &[i32], g: &[f64], v: usize) -> Result<Vec<T>, String> {
        let mut out = Vec::with_capacity(l.len());
        for ((row, &tgt), &gi) in l.chunks(v).zip(t).zip(g) {
            let lse = row_lse(row, tgt)?;
            out.extend(row.iter().enumerate().map(|(j, x)| {
                let hot = if j == tgt as usize { 1.0 } else { 0.0 };
                T::from_f64(((x.to_f64() - lse).exp() - hot) * gi)
            }));
        }
        Ok(out)
    }
    let data = each_float!(logits, l => go(l, t, &g, v)?);
    Ok((logits.shape().to_vec(), data))
}

/// `matmul(x, w)` rounded to x's dtype, as the product's result is: the
/// logits of `linear_cross_entropy` and its gradients.
fn head_logits(x: &Tensor, w: &Tensor) -> Result<Tensor, String> {
    let (shape, mut data) = matmul(MatOperand::plain(x), MatOperand::plain(w))?;
    round_to(x.dtype(), &mut data);
    Ok(Tensor::new(x.dtype(), shape, data))
}

/// `cross_entropy(matmul(x, w), targets)` (see `Op::LinearCrossEntropy`).
pub fn linear_cross_entropy(x: &Tensor, w: &Tensor, targets: &Tensor) -> Result<Raw, String> {
    cross_entropy(&head_logits(x, w)?, targets)
}

/// A gradient of `linear_cross_entropy` (see `Op::LinearCrossEntropyGrad`):
/// the logits' gradient rounded to x's dtype, then `dl·wᵀ` for x, or one
/// product `xᵀ·dl` over every row for w.
pub fn linear_cross_entropy_grad(
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    g: &Tensor,
    wrt: NormArg,
) -> Result<Raw, String> {
    let (shape, mut data) = cross_entropy_grad(&head_logits(x, w)?, targets, g)?;
    round_to(x.dtype(), &mut data);
    let dl = Tensor::new(x.dtype(), shape, data);
    match wrt {
        NormArg::X => matmul(
            MatOperand::plain(&dl),
            MatOperand {
                t: w,
                transposed: true,
            },
        ),
        NormArg::W => {
            let (k, v) = (w.shape()[0], w.shape()[1]);
            let rows = x.numel() / k.max(1);
            let x = x.clone().reshaped(vec![rows, k]);
            let dl = dl.reshaped(vec![rows, v]);
            matmul(
                MatOperand {
                    t: &x,
                    transposed: true,
                },
                MatOperand::plain(&dl),
            )
        }
    }
}
