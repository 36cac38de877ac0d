//! Strided copy: `out_view[i] = in_view[i]` for two views of one shape, each
//! with its own strides and element offset. This one kernel implements
//! permute (permuted input strides), slice (an input offset), concat (one
//! copy per operand into an output offset), broadcast materialization
//! (stride 0) and making any view dense, in vectors of up to 16 bytes where
//! the innermost axis allows. Reshape needs no kernel: buffers
//! are dense, so it relabels the shape. Elements move as stored (4 bytes
//! for `f32` and `i32`, 2 for `f16` and `bf16`); nothing is converted.

use crate::{grid_1d, linear_pos, View, ELEM_BLOCK};
use cubecl::prelude::*;

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn strided_copy_kernel<E: Numeric, N: Size>(
    input: &Array<Vector<E, N>>,
    output: &mut Array<Vector<E, N>>,
    layout: &Sequence<usize>,
    in_offset: usize,
    out_offset: usize,
    units: usize,
    #[comptime] rank: usize,
    #[comptime] nv: usize,
) {
    let pos = linear_pos();
    if pos >= units {
        terminate!();
    }
    let (src, dst) = view_positions(layout, pos, in_offset, out_offset, rank, nv);
    output[dst / nv] = input[src / nv];
}

/// Where unit `pos` of a strided copy (or conversion) reads and writes:
/// one unit per vector of `nv` elements along the last axis (contiguous in
/// both views when `nv` > 1), the element positions of its first element in
/// the input and the output from their offsets. `layout` holds the shape,
/// then the input's strides, then the output's (`rank` each, counting
/// elements; [`copy_layout`]).
#[cube]
pub(crate) fn view_positions(
    layout: &Sequence<usize>,
    pos: usize,
    in_offset: usize,
    out_offset: usize,
    #[comptime] rank: usize,
    #[comptime] nv: usize,
) -> (usize, usize) {
    let mut rem = pos * nv;
    let mut src = in_offset;
    let mut dst = out_offset;
    #[unroll]
    for i in 0..rank {
        let d = comptime!(rank - 1 - i);
        let n = *layout.index(d);
        let c = rem % n;
        rem /= n;
        src += c * *layout.index(comptime!(rank + d));
        dst += c * *layout.index(comptime!(2 * rank + d));
    }
    (src, dst)
}

/// The scalars [`view_positions`] reads: `shape`, then the input's
/// strides `si`, then the output's `so`.
pub(crate) fn copy_layout<R: Runtime>(
    shape: &[usize],
    si: &[usize],
    so: &[usize],
) -> SequenceArg<R, usize> {
    let all: Vec<usize> = [shape, si, so].concat();
    crate::scalars(&all)
}

/// The widest vector (of elements of `size` bytes, up to 16 bytes) that a
/// copy between the coalesced views (`shape`, strides `si` and `so`, the
/// views' offsets) can move per unit: the last axis contiguous on both
/// sides, its length, the offsets and the other strides divisible by it.
pub(crate) fn vector_width<R: Runtime>(
    client: &ComputeClient<R>,
    size: usize,
    (shape, si, so): (&[usize], &[usize], &[usize]),
    offsets: (usize, usize),
) -> usize {
    let rank = shape.len();
    client
        .io_optimized_vector_sizes(size)
        .find(|&nv| {
            nv == 1
                || (si[rank - 1] == 1
                    && so[rank - 1] == 1
                    && shape[rank - 1].is_multiple_of(nv)
                    && offsets.0.is_multiple_of(nv)
                    && offsets.1.is_multiple_of(nv)
                    && si[..rank - 1].iter().all(|s| s.is_multiple_of(nv))
                    && so[..rank - 1].iter().all(|s| s.is_multiple_of(nv)))
        })
        .unwrap_or(1)
}

/// The copy with its axes simplified: size-1 axes dropped and neighbours
/// that are contiguous in both views merged (a slice of the last axis of a
/// `[B, H, T, d + 1]` tensor becomes a 2-D copy). Returns the shape and
/// the two views' strides.
pub(crate) fn coalesce(input: &View, output: &View) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let mut shape: Vec<usize> = Vec::new();
    let (mut si, mut so): (Vec<usize>, Vec<usize>) = (Vec::new(), Vec::new());
    for d in 0..input.shape.len() {
        let (n, a, b) = (input.shape[d], input.strides[d], output.strides[d]);
        if n == 1 {
            continue;
        }
        match (shape.last_mut(), si.last_mut(), so.last_mut()) {
            (Some(pn), Some(pa), Some(pb)) if *pa == a * n && *pb == b * n => {
                *pn *= n;
                *pa = a;
                *pb = b;
            }
            _ => {
                shape.push(n);
                si.push(a);
                so.push(b);
            }
        }
    }
    if shape.is_empty() {
        (vec![1], vec![1], vec![1])
    } else {
        (shape, si, so)
    }
}

/// Element type of a copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyElem {
    F32,
    F16,
    BF16,
    I32,
}

impl From<crate::FloatElem> for CopyElem {
    fn from(e: crate::FloatElem) -> CopyElem {
        match e {
            crate::FloatElem::F32 => CopyElem::F32,
            crate::FloatElem::F16 => CopyElem::F16,
            crate::FloatElem::BF16 => CopyElem::BF16,
        }
    }
}

/// Copies the elements of `input` into `output`; both views have the same
/// shape. Axes are coalesced first, and where the last remaining axis is
/// contiguous in both views (and the offsets, the other strides and its
/// length divide by it) each unit moves a vector of up to 16 bytes.
pub fn launch_copy<R: Runtime>(
    client: &ComputeClient<R>,
    elem: CopyElem,
    input: &View,
    output: &View,
) {
    assert_eq!(
        input.shape, output.shape,
        "strided copy between views of different shapes"
    );
    let n = input.numel();
    if n == 0 {
        return;
    }
    let (shape, si, so) = coalesce(input, output);
    let rank = shape.len();
    let size = match elem {
        CopyElem::F32 | CopyElem::I32 => 4,
        CopyElem::F16 | CopyElem::BF16 => 2,
    };
    let nv = vector_width(
        client,
        size,
        (&shape, &si, &so),
        (input.offset, output.offset),
    );
    let units = n / nv;
    let (grid, dim) = (grid_1d(units, ELEM_BLOCK), CubeDim::new_1d(ELEM_BLOCK));
    macro_rules! copy {
        ($E:ty) => {
            strided_copy_kernel::launch_unchecked::<$E, R>(
                client,
                grid,
                dim,
                nv,
                input.array::<R>(),
                output.array::<R>(),
                copy_layout::<R>(&shape, &si, &so),
                input.offset,
                output.offset,
                units,
                rank,
                nv,
            )
        };
    }
    unsafe {
        match elem {
            CopyElem::F32 => copy!(f32),
            CopyElem::F16 => copy!(half::f16),
            CopyElem::BF16 => copy!(half::bf16),
            CopyElem::I32 => copy!(i32),
        }
    }
}
