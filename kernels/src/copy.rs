//! Strided copy: `out_view[i] = in_view[i]` for two views of one shape, each
//! with its own strides and element offset. This one kernel implements
//! permute (permuted input strides), slice (an input offset), concat (one
//! copy per operand into an output offset), broadcast materialization
//! (stride 0) and making any view dense. Reshape needs no kernel: buffers
//! are dense, so it relabels the shape. Elements move as stored (4 bytes
//! for `f32` and `i32`, 2 for `f16` and `bf16`); nothing is converted.

use crate::{grid_1d, linear_pos, View, ELEM_BLOCK};
use cubecl::prelude::*;

#[cube(launch_unchecked)]
fn strided_copy_kernel<E: Numeric>(
    input: &Tensor<E>,
    output: &mut Tensor<E>,
    in_offset: usize,
    out_offset: usize,
    n: usize,
) {
    let pos = linear_pos();
    if pos >= n {
        terminate!();
    }
    let rank = input.rank();
    let mut rem = pos;
    let mut src = in_offset;
    let mut dst = out_offset;
    for i in 0..rank {
        let d = rank - 1 - i;
        let c = rem % input.shape(d);
        rem /= input.shape(d);
        src += c * input.stride(d);
        dst += c * output.stride(d);
    }
    output[dst] = input[src];
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
/// shape.
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
    let (grid, dim) = (grid_1d(n, ELEM_BLOCK), CubeDim::new_1d(ELEM_BLOCK));
    macro_rules! copy {
        ($E:ty) => {
            strided_copy_kernel::launch_unchecked::<$E, R>(
                client,
                grid,
                dim,
                input.arg::<R>(),
                output.arg::<R>(),
                input.offset,
                output.offset,
                n,
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
