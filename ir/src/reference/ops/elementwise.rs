//! Elementwise ops: constants, unary maps, binary ops with NumPy
//! broadcasting, casts and dropout.

use super::{each_float, fill_rows, row_offset, Raw, PAR_MIN};
use crate::op::{BinaryOp, UnaryOp};
use crate::reference::tensor::{
    round_bf16, round_f16, storage_dtype, Elem, Float, Storage, Tensor,
};
use crate::types::DType;
use rayon::prelude::*;

/// A scalar of `dtype` holding `value`.
pub fn constant(value: f64, dtype: DType) -> Result<Raw, String> {
    let data = match dtype {
        DType::F32 => Storage::F32(vec![value as f32]),
        DType::F16 => Storage::F32(vec![round_f16(value as f32)]),
        DType::BF16 => Storage::F32(vec![round_bf16(value as f32)]),
        DType::F64 => Storage::F64(vec![value]),
        DType::I32 => Storage::I32(vec![value as i32]),
        DType::U32 | DType::Bool => return Err(format!("no {dtype} constants in the interpreter")),
    };
    Ok((Vec::new(), data))
}

fn map<T: Float>(x: &[T], f: impl Fn(T) -> T + Sync + Send) -> Vec<T> {
    if x.len() >= PAR_MIN {
        x.par_iter().map(|&v| f(v)).collect()
    } else {
        x.iter().map(|&v| f(v)).collect()
    }
}

fn unary_typed<T: Float>(op: UnaryOp, x: &[T]) -> Vec<T> {
    let sigmoid = |v: T| T::ONE / (T::ONE + (-v).exp());
    match op {
        UnaryOp::Neg => map(x, |v| -v),
        UnaryOp::Exp => map(x, |v| v.exp()),
        UnaryOp::Log => map(x, |v| v.ln()),
        UnaryOp::Sqrt => map(x, |v| v.sqrt()),
        UnaryOp::Rsqrt => map(x, |v| T::ONE / v.sqrt()),
        UnaryOp::Recip => map(x, |v| T::ONE / v),
        UnaryOp::Abs => map(x, |v| v.abs()),
        UnaryOp::Sigmoid => map(x, sigmoid),
        UnaryOp::Silu => map(x, |v| v * sigmoid(v)),
        UnaryOp::Tanh => map(x, |v| v.tanh()),
    }
}

/// An elementwise function of a float tensor.
pub fn unary(op: UnaryOp, x: &Tensor) -> Result<Raw, String> {
    Ok((x.shape().to_vec(), each_float!(x, v => unary_typed(op, v))))
}

/// NumPy broadcasting of two concrete shapes.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let r = a.len().max(b.len());
    (0..r)
        .map(|i| {
            let da = (i + a.len()).checked_sub(r).map_or(1, |j| a[j]);
            let db = (i + b.len()).checked_sub(r).map_or(1, |j| b[j]);
            match (da, db) {
                (x, y) if x == y => Some(x),
                (1, y) => Some(y),
                (x, 1) => Some(x),
                _ => None,
            }
        })
        .collect()
}

/// Strides that read an operand of shape `shape` as if it had the broadcast
/// shape `out`: 0 along broadcast axes, right-aligned.
pub fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let own = super::strides(shape);
    let lead = out.len() - shape.len();
    (0..out.len())
        .map(|i| match i.checked_sub(lead) {
            Some(j) if shape[j] != 1 || out[i] == 1 => own[j],
            _ => 0,
        })
        .collect()
}

/// `f` applied pairwise over the broadcast of `a` and `b`.
pub fn zip_broadcast<E: Elem>(
    a: &[E],
    a_shape: &[usize],
    b: &[E],
    b_shape: &[usize],
    out_shape: &[usize],
    f: impl Fn(E, E) -> E + Sync + Send,
) -> Vec<E> {
    let n: usize = out_shape.iter().product();
    if a_shape == b_shape {
        return if n >= PAR_MIN {
            a.par_iter().zip(b).map(|(&x, &y)| f(x, y)).collect()
        } else {
            a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect()
        };
    }
    if n == 0 {
        return Vec::new();
    }
    if out_shape.is_empty() {
        return vec![f(a[0], b[0])];
    }
    let sa = broadcast_strides(a_shape, out_shape);
    let sb = broadcast_strides(b_shape, out_shape);
    let r = out_shape.len();
    let len = out_shape[r - 1];
    let (la, lb) = (sa[r - 1], sb[r - 1]);
    let mut out = vec![a[0]; n];
    fill_rows(&mut out, len, |row, dst| {
        let oa = row_offset(row, &out_shape[..r - 1], &sa[..r - 1]);
        let ob = row_offset(row, &out_shape[..r - 1], &sb[..r - 1]);
        for (j, d) in dst.iter_mut().enumerate() {
            *d = f(a[oa + j * la], b[ob + j * lb]);
        }
    });
    out
}

fn binary_float<T: Float>(op: BinaryOp, a: &Tensor, b: &Tensor, out: &[usize]) -> Vec<T> {
    let (x, y) = (
        T::slice(a.storage()).unwrap(),
        T::slice(b.storage()).unwrap(),
    );
    let (sa, sb) = (a.shape(), b.shape());
    match op {
        BinaryOp::Add => zip_broadcast(x, sa, y, sb, out, |p, q| p + q),
        BinaryOp::Sub => zip_broadcast(x, sa, y, sb, out, |p, q| p - q),
        BinaryOp::Mul => zip_broadcast(x, sa, y, sb, out, |p, q| p * q),
        BinaryOp::Div => zip_broadcast(x, sa, y, sb, out, |p, q| p / q),
        BinaryOp::Max => zip_broadcast(x, sa, y, sb, out, |p, q| p.max_nan(q)),
    }
}

/// An elementwise binary op with NumPy broadcasting. Integer arithmetic
/// wraps and divides truncating toward zero; division by zero is an error.
pub fn binary(op: BinaryOp, a: &Tensor, b: &Tensor) -> Result<Raw, String> {
    let out = broadcast_shape(a.shape(), b.shape())
        .ok_or_else(|| format!("shapes {a} and {b} do not broadcast"))?;
    let data = match (a.storage(), b.storage()) {
        (Storage::F32(_), Storage::F32(_)) => Storage::F32(binary_float(op, a, b, &out)),
        (Storage::F64(_), Storage::F64(_)) => Storage::F64(binary_float(op, a, b, &out)),
        (Storage::I32(x), Storage::I32(y)) => {
            let (sa, sb) = (a.shape(), b.shape());
            Storage::I32(match op {
                BinaryOp::Add => zip_broadcast(x, sa, y, sb, &out, i32::wrapping_add),
                BinaryOp::Sub => zip_broadcast(x, sa, y, sb, &out, i32::wrapping_sub),
                BinaryOp::Mul => zip_broadcast(x, sa, y, sb, &out, i32::wrapping_mul),
                BinaryOp::Div => {
                    if y.contains(&0) {
                        return Err("integer division by zero".into());
                    }
                    zip_broadcast(x, sa, y, sb, &out, i32::wrapping_div)
                }
                BinaryOp::Max => zip_broadcast(x, sa, y, sb, &out, i32::max),
            })
        }
        _ => return Err(format!("operand dtypes differ: {a} and {b}")),
    };
    Ok((out, data))
}

/// Converts each element to `to`. Floats become integers by truncation
/// toward zero (saturating, NaN to 0); `f16` and `bf16` targets round to
/// nearest even and stay stored as `f32`.
pub fn cast(x: &Tensor, to: DType) -> Result<Raw, String> {
    let data = match storage_dtype(to) {
        Some(DType::F32) => {
            let v = x.to_f32_vec();
            Storage::F32(match to {
                DType::BF16 => v.into_iter().map(round_bf16).collect(),
                DType::F16 => v.into_iter().map(round_f16).collect(),
                _ => v,
            })
        }
        Some(DType::F64) => Storage::F64(x.to_f64_vec()),
        Some(DType::I32) => Storage::I32(match x.storage() {
            Storage::F32(v) => v.iter().map(|&e| e as i32).collect(),
            Storage::F64(v) => v.iter().map(|&e| e as i32).collect(),
            Storage::I32(v) => v.clone(),
        }),
        _ => return Err(format!("no {to} tensors in the interpreter")),
    };
    Ok((x.shape().to_vec(), data))
}

/// Dropout in evaluation mode: the identity. Training mode (zeroing with
/// probability `p` from a seeded generator) is not implemented yet.
pub fn dropout(x: &Tensor) -> Result<Raw, String> {
    Ok((x.shape().to_vec(), x.storage().clone()))
}
