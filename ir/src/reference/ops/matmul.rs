//! Batched matrix multiplication over the last two axes, with NumPy
//! broadcasting of the leading axes, on the `gemm` crate. An operand may be
//! read transposed through its strides, so `x @ permute(W, [1, 0])` never
//! copies `W`.

use super::elementwise::{broadcast_shape, broadcast_strides};
use super::{row_offset, Raw};
use crate::reference::tensor::{Float, Storage, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

/// Products with at least this many multiply-adds use several threads.
const PAR_WORK: usize = 1 << 18;

/// A matmul operand: a tensor, read with its last two axes swapped when
/// `transposed` (a `permute` the evaluator left unmaterialized).
#[derive(Clone, Copy, Debug)]
pub struct MatOperand<'a> {
    pub t: &'a Tensor,
    pub transposed: bool,
}

impl<'a> MatOperand<'a> {
    pub fn plain(t: &'a Tensor) -> MatOperand<'a> {
        MatOperand {
            t,
            transposed: false,
        }
    }

    /// The shape the operand has as a matrix operand.
    pub fn logical_shape(&self) -> Vec<usize> {
        let mut s = self.t.shape().to_vec();
        let r = s.len();
        if self.transposed && r >= 2 {
            s.swap(r - 2, r - 1);
        }
        s
    }
}

/// How one operand's matrices are addressed.
struct Layout {
    /// Row and column strides inside one matrix, in elements.
    rs: isize,
    cs: isize,
    /// Start of each matrix per output batch axis, in elements (0 along
    /// broadcast axes).
    batch: Vec<usize>,
}

fn layout(op: &MatOperand, shape: &[usize], out_batch: &[usize]) -> Layout {
    let r = shape.len();
    let (rows, cols) = (shape[r - 2], shape[r - 1]);
    let (rs, cs) = if op.transposed {
        (1, rows as isize)
    } else {
        (cols as isize, 1)
    };
    let batch = broadcast_strides(&shape[..r - 2], out_batch)
        .into_iter()
        .map(|s| s * rows * cols)
        .collect();
    Layout { rs, cs, batch }
}

/// `a @ b` for operands of one float dtype, each of rank at least 2.
pub fn matmul(a: MatOperand, b: MatOperand) -> Result<Raw, String> {
    let (sa, sb) = (a.logical_shape(), b.logical_shape());
    let (ra, rb) = (sa.len(), sb.len());
    if ra < 2 || rb < 2 {
        return Err(format!(
            "matmul needs rank ≥ 2 operands, got {} and {}",
            a.t, b.t
        ));
    }
    let (m, k, k2, n) = (sa[ra - 2], sa[ra - 1], sb[rb - 2], sb[rb - 1]);
    if k != k2 {
        return Err(format!("inner dimensions differ: {sa:?} @ {sb:?}"));
    }
    let out_batch = broadcast_shape(&sa[..ra - 2], &sb[..rb - 2])
        .ok_or_else(|| format!("batch dimensions do not broadcast: {sa:?} @ {sb:?}"))?;
    let (la, lb) = (layout(&a, &sa, &out_batch), layout(&b, &sb, &out_batch));
    // The whole batch of `a` is one tall matrix when `b` is shared by every
    // batch entry and `a` is stored densely in batch order.
    let fold = !a.transposed
        && lb.batch.iter().all(|&s| s == 0)
        && sa[..ra - 2].iter().product::<usize>() == out_batch.iter().product::<usize>();
    let dims = Dims {
        m,
        k,
        n,
        out_batch: &out_batch,
        fold,
    };
    let data = match (a.t.storage(), b.t.storage()) {
        (Storage::F32(x), Storage::F32(y)) => Storage::F32(matmul_typed(x, &la, y, &lb, &dims)),
        (Storage::F64(x), Storage::F64(y)) => Storage::F64(matmul_typed(x, &la, y, &lb, &dims)),
        _ => {
            return Err(format!(
                "matmul needs two float operands of one dtype, got {} and {}",
                a.t, b.t
            ))
        }
    };
    let mut shape = out_batch;
    shape.extend([m, n]);
    Ok((shape, data))
}

struct Dims<'a> {
    m: usize,
    k: usize,
    n: usize,
    out_batch: &'a [usize],
    fold: bool,
}

fn matmul_typed<T: Float>(a: &[T], la: &Layout, b: &[T], lb: &Layout, d: &Dims) -> Vec<T> {
    let (m, k, n) = (d.m, d.k, d.n);
    let count: usize = d.out_batch.iter().product();
    let mut out = vec![T::ZERO; count * m * n];
    if out.is_empty() || k == 0 {
        return out;
    }
    let par = |work: usize| {
        if work >= PAR_WORK {
            Parallelism::Rayon(0)
        } else {
            Parallelism::None
        }
    };
    if d.fold {
        let rows = count * m;
        gemm_one(
            &mut out,
            (a, la.rs, la.cs),
            (b, lb.rs, lb.cs),
            (rows, k, n),
            par(rows * k * n),
        );
        return out;
    }
    let one = |i: usize, dst: &mut [T], p: Parallelism| {
        let oa = row_offset(i, d.out_batch, &la.batch);
        let ob = row_offset(i, d.out_batch, &lb.batch);
        gemm_one(
            dst,
            (&a[oa..], la.rs, la.cs),
            (&b[ob..], lb.rs, lb.cs),
            (m, k, n),
            p,
        );
    };
    if count > 1 && m * k * n < PAR_WORK * 8 {
        // Many small products (attention heads): one thread each.
        out.par_chunks_mut(m * n)
            .enumerate()
            .for_each(|(i, dst)| one(i, dst, Parallelism::None));
    } else {
        for (i, dst) in out.chunks_mut(m * n).enumerate() {
            one(i, dst, par(m * k * n));
        }
    }
    out
}

/// `dst (m, n) = a (m, k) @ b (k, n)`, with `a` and `b` addressed from the
/// start of their slices by (row, column) strides.
fn gemm_one<T: Float>(
    dst: &mut [T],
    (a, a_rs, a_cs): (&[T], isize, isize),
    (b, b_rs, b_cs): (&[T], isize, isize),
    (m, k, n): (usize, usize, usize),
    par: Parallelism,
) {
    // The last element each operand reads must lie inside its slice.
    let last = |rows: usize, cols: usize, rs: isize, cs: isize| {
        (rows - 1) * rs as usize + (cols - 1) * cs as usize
    };
    assert!(dst.len() >= m * n, "matmul output too short");
    assert!(last(m, k, a_rs, a_cs) < a.len(), "matmul lhs out of bounds");
    assert!(last(k, n, b_rs, b_cs) < b.len(), "matmul rhs out of bounds");
    // SAFETY: every index gemm reads or writes, (i, j) with i < rows and
    // j < cols at the given non-negative strides, was checked above to lie
    // inside its slice; `dst` does not alias `a` or `b`; and `T` is f32 or
    // f64, both of which gemm supports.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            T::ZERO,
            T::ONE,
            false,
            false,
            false,
            par,
        );
    }
}
