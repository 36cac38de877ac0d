//! Ops that move elements without arithmetic: reshape, permute, slice,
//! concat and gather. They work on every storage type.

use super::{each_storage, elems, fill_rows, row_offset, split_axis, strides, Raw};
use crate::reference::tensor::{Elem, Storage, Tensor};

/// The same elements under `shape`.
pub fn reshape(x: &Tensor, shape: &[usize]) -> Result<Raw, String> {
    if shape.iter().product::<usize>() != x.numel() {
        return Err(format!("cannot reshape {x} to {shape:?}"));
    }
    Ok((shape.to_vec(), x.storage().clone()))
}

fn permute_typed<E: Elem>(x: &[E], shape: &[usize], perm: &[usize]) -> Vec<E> {
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let n = x.len();
    if n == 0 || shape.is_empty() {
        return x.to_vec();
    }
    let own = strides(shape);
    // Output axis i walks input axis perm[i].
    let src: Vec<usize> = perm.iter().map(|&p| own[p]).collect();
    let r = perm.len();
    let (len, step) = (out_shape[r - 1], src[r - 1]);
    let mut out = vec![x[0]; n];
    fill_rows(&mut out, len, |row, dst| {
        let base = row_offset(row, &out_shape[..r - 1], &src[..r - 1]);
        for (j, d) in dst.iter_mut().enumerate() {
            *d = x[base + j * step];
        }
    });
    out
}

/// Output axis `i` is input axis `perm[i]`.
pub fn permute(x: &Tensor, perm: &[usize]) -> Result<Raw, String> {
    let mut seen = vec![false; x.rank()];
    if perm.len() != x.rank()
        || perm
            .iter()
            .any(|&p| p >= x.rank() || std::mem::replace(&mut seen[p], true))
    {
        return Err(format!("{perm:?} is not a permutation of the axes of {x}"));
    }
    let shape = perm.iter().map(|&p| x.shape()[p]).collect();
    Ok((
        shape,
        each_storage!(x.storage(), v => permute_typed(v, x.shape(), perm)),
    ))
}

/// Elements `start..end` along `axis`.
pub fn slice(x: &Tensor, axis: usize, start: usize, end: usize) -> Result<Raw, String> {
    if axis >= x.rank() || start > end || end > x.shape()[axis] {
        return Err(format!("cannot slice {start}..{end} of axis {axis} of {x}"));
    }
    let (outer, n, inner) = split_axis(x.shape(), axis);
    let data = each_storage!(x.storage(), v => (0..outer)
        .flat_map(|o| &v[(o * n + start) * inner..(o * n + end) * inner])
        .copied()
        .collect());
    let mut shape = x.shape().to_vec();
    shape[axis] = end - start;
    Ok((shape, data))
}

fn concat_typed<E: Elem>(xs: &[&Tensor], axis: usize) -> Result<Vec<E>, String> {
    let parts: Vec<(&[E], usize)> = xs
        .iter()
        .map(|t| Ok((elems::<E>(t, "a matching")?, t.shape()[axis])))
        .collect::<Result<_, String>>()?;
    let (outer, _, inner) = split_axis(xs[0].shape(), axis);
    let mut out = Vec::with_capacity(parts.iter().map(|(v, _)| v.len()).sum());
    for o in 0..outer {
        for (v, n) in &parts {
            out.extend_from_slice(&v[o * n * inner..(o + 1) * n * inner]);
        }
    }
    Ok(out)
}

/// Joins the operands along `axis`; the other axes must agree.
pub fn concat(xs: &[&Tensor], axis: usize) -> Result<Raw, String> {
    let first = xs.first().ok_or("concat needs at least one operand")?;
    if axis >= first.rank() {
        return Err(format!("axis {axis} out of range for {first}"));
    }
    let mut shape = first.shape().to_vec();
    shape[axis] = 0;
    for x in xs {
        let agrees = x.rank() == first.rank()
            && (0..x.rank()).all(|i| i == axis || x.shape()[i] == first.shape()[i]);
        if !agrees {
            return Err(format!(
                "cannot concatenate {first} and {x} along axis {axis}"
            ));
        }
        shape[axis] += x.shape()[axis];
    }
    let data = match first.storage() {
        Storage::F32(_) => Storage::F32(concat_typed(xs, axis)?),
        Storage::F64(_) => Storage::F64(concat_typed(xs, axis)?),
        Storage::I32(_) => Storage::I32(concat_typed(xs, axis)?),
    };
    Ok((shape, data))
}

/// `table[ids]`: one row of `table [V, ...]` per id, in the ids' shape.
/// An id outside `0..V` is an error.
pub fn gather(table: &Tensor, ids: &Tensor) -> Result<Raw, String> {
    let ids_v = elems::<i32>(ids, "an i32 index")?;
    let v = *table
        .shape()
        .first()
        .ok_or("gather table must have rank ≥ 1")?;
    let row: usize = table.shape()[1..].iter().product();
    let rows = ids_v
        .iter()
        .map(|&id| {
            usize::try_from(id)
                .ok()
                .filter(|&i| i < v)
                .ok_or_else(|| format!("index {id} out of range for a table of {v} rows"))
        })
        .collect::<Result<Vec<usize>, String>>()?;
    let data = each_storage!(table.storage(), t => rows
        .iter()
        .flat_map(|&i| &t[i * row..(i + 1) * row])
        .copied()
        .collect());
    let mut shape = ids.shape().to_vec();
    shape.extend_from_slice(&table.shape()[1..]);
    Ok((shape, data))
}

/// `x` broadcast to `shape` (NumPy rules).
pub fn broadcast_to(x: &Tensor, shape: &[usize]) -> Result<Raw, String> {
    let st = super::elementwise::broadcast_strides(x.shape(), shape);
    let n: usize = shape.iter().product();
    let out_strides = super::strides(shape);
    let index = |i: usize| -> usize {
        let mut rem = i;
        let mut off = 0;
        for (k, os) in out_strides.iter().enumerate() {
            let c = rem / os;
            rem %= os;
            off += c * st[k];
        }
        off
    };
    let data = each_storage!(x.storage(), t => (0..n).map(|i| t[index(i)]).collect());
    Ok((shape.to_vec(), data))
}

/// `out[ids[i]] += src[i]` into `[size, tail...]` zeros.
pub fn scatter_add(ids: &Tensor, src: &Tensor, size: usize) -> Result<Raw, String> {
    let ids_v = elems::<i32>(ids, "an i32 index")?;
    let row: usize = src.shape()[ids.rank()..].iter().product();
    let mut shape = vec![size];
    shape.extend_from_slice(&src.shape()[ids.rank()..]);
    fn go<T: crate::reference::tensor::Float>(
        ids: &[i32],
        s: &[T],
        row: usize,
        size: usize,
    ) -> Result<Vec<T>, String> {
        let mut out = vec![T::from_f64(0.0); size * row];
        for (i, &id) in ids.iter().enumerate() {
            let r = usize::try_from(id)
                .ok()
                .filter(|&r| r < size)
                .ok_or_else(|| format!("index {id} out of range for {size} rows"))?;
            for (o, &v) in out[r * row..(r + 1) * row]
                .iter_mut()
                .zip(&s[i * row..(i + 1) * row])
            {
                *o = *o + v;
            }
        }
        Ok(out)
    }
    let data = match src.storage() {
        Storage::F32(s) => Storage::F32(go(ids_v, s, row, size)?),
        Storage::F64(s) => Storage::F64(go(ids_v, s, row, size)?),
        Storage::I32(_) => return Err("scatter_add needs a float source".into()),
    };
    Ok((shape, data))
}

/// One-hot rows of `depth` for integer ids, as `dtype`.
pub fn one_hot(ids: &Tensor, depth: usize, dtype: crate::DType) -> Result<Raw, String> {
    let ids_v = elems::<i32>(ids, "an i32 index")?;
    let mut shape = ids.shape().to_vec();
    shape.push(depth);
    let hot = |i: usize, j: usize| {
        if ids_v[i] >= 0 && ids_v[i] as usize == j {
            1.0
        } else {
            0.0
        }
    };
    let n = ids_v.len();
    let data = match dtype {
        crate::DType::F64 => {
            Storage::F64((0..n * depth).map(|k| hot(k / depth, k % depth)).collect())
        }
        _ => Storage::F32(
            (0..n * depth)
                .map(|k| hot(k / depth, k % depth) as f32)
                .collect(),
        ),
    };
    Ok((shape, data))
}
