//! `row_dot`: the dot product of two tensors' rows along the last axis,
//! `out[r] = Σᵢ x[r, i]·y[r, i]`, read in place through strided views (a
//! permuted or sliced operand, such as attention's output adjoint, is not
//! copied first) and accumulated in `f32` whatever the storage (`f32`,
//! `f16` or `bf16`: each element widened exactly as it is loaded), written
//! as dense `f32` rows (the IR's statistics dtype for every float the
//! device stores).
//!
//! Rows of at most `SHORT_ROW` elements (attention's head dims) are summed
//! by one thread each, as `reduce` does: a cube per row would leave most of
//! its threads idle; where both rows are contiguous and aligned, in vectors
//! of up to 16 bytes (element loads made the H100's `delta` of a 1B-shaped
//! step take 5.3 ms, for 134 MB read). Longer rows get a cube of `ROW_BLOCK` threads that
//! stride along the row and combine through shared memory. Either way the
//! leading axes are unravelled from the row index with each view's own
//! strides, so any layout is correct; a contiguous last axis is the one
//! whose reads neighbouring iterations share cache lines.

use crate::copy::{copy_layout, view_positions};
use crate::reduce::block_sum;
use crate::{grid_1d, linear_cube, linear_pos, with_float, FloatElem, View, ELEM_BLOCK, ROW_BLOCK};
use cubecl::prelude::*;
use cubecl::server::Handle;

/// Rows of at most this many elements are summed by one thread each.
const SHORT_ROW: usize = 128;

/// One thread per row.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn row_dot_short_kernel<F: Float + CubeElement>(
    x: &Array<F>,
    y: &Array<F>,
    out: &mut Array<f32>,
    layout: &Sequence<usize>,
    x_offset: usize,
    y_offset: usize,
    sa: usize,
    sb: usize,
    rows: usize,
    n: usize,
    #[comptime] lead: usize,
) {
    let row = linear_pos();
    if row >= rows {
        terminate!();
    }
    let (a, b) = view_positions(layout, row, x_offset, y_offset, lead, 1usize);
    let mut acc = f32::new(0.0);
    for i in 0..n {
        acc += f32::cast_from(x[a + i * sa]) * f32::cast_from(y[b + i * sb]);
    }
    out[row] = acc;
}

/// One thread per row, reading both rows in vectors of `nv` elements (up to
/// 16 bytes): both views' last axes contiguous, their offsets and leading
/// strides multiples of `nv`. Each thread reads whole cache lines of its
/// rows in a few loads instead of one element at a time.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn row_dot_vec_kernel<F: Float + CubeElement, N: Size>(
    x: &Array<Vector<F, N>>,
    y: &Array<Vector<F, N>>,
    out: &mut Array<f32>,
    layout: &Sequence<usize>,
    x_offset: usize,
    y_offset: usize,
    rows: usize,
    len: usize,
    #[comptime] lead: usize,
    #[comptime] nv: usize,
) {
    let row = linear_pos();
    if row >= rows {
        terminate!();
    }
    let (a, b) = view_positions(layout, row, x_offset, y_offset, lead, 1usize);
    let (va, vb) = (a / nv, b / nv);
    let mut acc = f32::new(0.0);
    for i in 0..len / nv {
        let (p, q) = (x[va + i], y[vb + i]);
        #[unroll]
        for l in 0..nv {
            acc += f32::cast_from(p[l]) * f32::cast_from(q[l]);
        }
    }
    out[row] = acc;
}

/// One cube per row: threads stride along it and combine through shared
/// memory.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn row_dot_long_kernel<F: Float + CubeElement>(
    x: &Array<F>,
    y: &Array<F>,
    out: &mut Array<f32>,
    layout: &Sequence<usize>,
    x_offset: usize,
    y_offset: usize,
    sa: usize,
    sb: usize,
    rows: usize,
    n: usize,
    #[comptime] lead: usize,
) {
    let row = linear_cube();
    if row >= rows {
        terminate!();
    }
    let (a, b) = view_positions(layout, row, x_offset, y_offset, lead, 1usize);
    let mut smem = SharedMemory::<f32>::new(ROW_BLOCK as usize);
    let mut acc = f32::new(0.0);
    let mut i = UNIT_POS as usize;
    while i < n {
        acc += f32::cast_from(x[a + i * sa]) * f32::cast_from(y[b + i * sb]);
        i += CUBE_DIM as usize;
    }
    let r = block_sum::<f32>(&mut smem, acc);
    if UNIT_POS == 0 {
        out[row] = r;
    }
}

/// `out[r] = Σᵢ x[r, i]·y[r, i]` for two views of one shape `[..., n]`
/// (rank ≥ 1), both stored as `elem`, into the dense `f32` buffer `out`
/// of `[..., 1]`.
pub fn launch_row_dot<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    x: &View,
    y: &View,
    out: &Handle,
) {
    assert_eq!(x.shape, y.shape, "row_dot operands of one shape");
    let lead = x
        .shape
        .len()
        .checked_sub(1)
        .expect("row_dot operands of rank ≥ 1");
    let n = x.shape[lead];
    let rows: usize = x.shape[..lead].iter().product();
    if rows == 0 {
        return;
    }
    let short = n <= SHORT_ROW;
    // The leading axes and both views' strides along them.
    let layout = || copy_layout::<R>(&x.shape[..lead], &x.strides[..lead], &y.strides[..lead]);
    // The widest vector both views allow (1: the scalar kernels).
    let nv = client
        .io_optimized_vector_sizes(elem.size())
        .find(|&nv| n.is_multiple_of(nv) && x.aligned_to(nv) && y.aligned_to(nv))
        .unwrap_or(1);
    if short && nv > 1 {
        with_float!(elem, F => unsafe {
            row_dot_vec_kernel::launch_unchecked::<F, R>(
                client,
                grid_1d(rows, ELEM_BLOCK),
                CubeDim::new_1d(ELEM_BLOCK),
                nv,
                x.array::<R>(),
                y.array::<R>(),
                ArrayArg::from_raw_parts(out.clone(), rows),
                layout(),
                x.offset,
                y.offset,
                rows,
                n,
                lead,
                nv,
            )
        });
        return;
    }
    let (grid, dim) = if short {
        (grid_1d(rows, ELEM_BLOCK), CubeDim::new_1d(ELEM_BLOCK))
    } else {
        (grid_1d(rows, 1), CubeDim::new_1d(ROW_BLOCK))
    };
    macro_rules! launch {
        ($kernel:ident, $F:ty) => {
            $kernel::launch_unchecked::<$F, R>(
                client,
                grid,
                dim,
                x.array::<R>(),
                y.array::<R>(),
                ArrayArg::from_raw_parts(out.clone(), rows),
                layout(),
                x.offset,
                y.offset,
                x.strides[lead],
                y.strides[lead],
                rows,
                n,
                lead,
            )
        };
    }
    with_float!(elem, F => unsafe {
        if short {
            launch!(row_dot_short_kernel, F);
        } else {
            launch!(row_dot_long_kernel, F);
        }
    });
}
