//! Row reductions: sum, mean and max along one axis (kept with size 1), and
//! the numerically stable softmax along one axis. A tensor is viewed as
//! `(outer, axis, inner)`; one cube of `ROW_BLOCK` threads handles one row
//! (one `(outer, inner)` pair): threads stride along the axis and combine
//! through shared memory. The row helpers here are shared with `norm` and
//! `attention`. Input and output are stored as the launch's `elem` and
//! computed in `f32` (accumulators, shared memory, and the partial results
//! of a two-pass column reduction).
//!
//! Non-finite constants (`-inf` for an empty max, NaN) arrive as runtime
//! scalars: WGSL rejects non-finite literals, and a kernel that fails to
//! compile on wgpu would otherwise be skipped silently.

use crate::{grid_1d, linear_cube, linear_pos, with_float, FloatElem, ELEM_BLOCK, ROW_BLOCK};
use cubecl::prelude::*;
use cubecl::server::Handle;

/// The reduction of one row.
#[derive(CubeType, Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ReduceKind {
    Sum,
    Mean,
    Max,
}

/// Sum of `v` over the cube's threads (every thread gets the result).
#[cube]
pub(crate) fn block_sum<F: Float>(smem: &mut SharedMemory<F>, v: F) -> F {
    let u = UNIT_POS as usize;
    smem[u] = v;
    sync_cube();
    let mut stride = CUBE_DIM as usize / 2;
    while stride > 0 {
        if u < stride {
            smem[u] = smem[u] + smem[u + stride];
        }
        sync_cube();
        stride /= 2;
    }
    let r = smem[0];
    sync_cube();
    r
}

/// Maximum of `v` over the cube's threads (every thread gets the result).
#[cube]
pub(crate) fn block_max<F: Float>(smem: &mut SharedMemory<F>, v: F) -> F {
    let u = UNIT_POS as usize;
    smem[u] = v;
    sync_cube();
    let mut stride = CUBE_DIM as usize / 2;
    while stride > 0 {
        if u < stride {
            smem[u] = max_nan::<F>(smem[u], smem[u + stride]);
        }
        sync_cube();
        stride /= 2;
    }
    let r = smem[0];
    sync_cube();
    r
}

/// `max` that propagates NaN, like the reference (`a != a` is the NaN
/// test: generic cube floats have no `is_nan` usable in a condition).
#[allow(clippy::eq_op)]
#[cube]
pub(crate) fn max_nan<F: Float>(a: F, b: F) -> F {
    let mut r = a.max(b);
    if a != a {
        r = a;
    }
    if b != b {
        r = b;
    }
    r
}

/// The starting value of a reduction (`-inf` for max arrives at run time:
/// WGSL rejects non-finite literals).
#[cube]
fn reduce_init<F: Float>(neg_inf: F, #[comptime] kind: ReduceKind) -> F {
    match kind {
        ReduceKind::Max => neg_inf,
        _ => F::new(0.0),
    }
}

/// One element folded into a reduction (a mean sums; its caller divides).
#[cube]
fn reduce_step<F: Float>(acc: F, x: F, #[comptime] kind: ReduceKind) -> F {
    match kind {
        ReduceKind::Max => max_nan::<F>(acc, x),
        _ => acc + x,
    }
}

/// One cube per row of a dense `(rows, axis_len)` tensor: threads stride
/// along the row and combine through shared memory.
#[cube(launch_unchecked)]
fn reduce_kernel<F: Float + CubeElement>(
    input: &Array<F>,
    output: &mut Array<F>,
    axis_len: usize,
    rows: usize,
    neg_inf: f32,
    #[comptime] kind: ReduceKind,
) {
    let row = linear_cube();
    if row >= rows {
        terminate!();
    }
    let base = row * axis_len;
    let mut smem = SharedMemory::<f32>::new(ROW_BLOCK as usize);
    let mut acc = reduce_init::<f32>(neg_inf, kind);
    let mut a = UNIT_POS as usize;
    while a < axis_len {
        acc = reduce_step::<f32>(acc, f32::cast_from(input[base + a]), kind);
        a += CUBE_DIM as usize;
    }
    let r = match kind {
        ReduceKind::Max => block_max::<f32>(&mut smem, acc),
        ReduceKind::Sum => block_sum::<f32>(&mut smem, acc),
        ReduceKind::Mean => block_sum::<f32>(&mut smem, acc) / f32::cast_from(axis_len),
    };
    if UNIT_POS == 0 {
        output[row] = F::cast_from(r);
    }
}

/// One thread per output element `(o, chunk, i)` of a reduction along a
/// middle axis: it combines `chunk_len` elements of its column, so that
/// consecutive threads (consecutive `i`) read consecutive addresses. `I`
/// and `O` are the input's and the output's storage (a first pass of two
/// writes `f32` partials).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn reduce_columns_kernel<I: Float + CubeElement, O: Float + CubeElement>(
    input: &Array<I>,
    output: &mut Array<O>,
    axis_len: usize,
    inner: usize,
    chunks: usize,
    chunk_len: usize,
    n: usize,
    divisor: f32,
    neg_inf: f32,
    #[comptime] kind: ReduceKind,
) {
    let pos = linear_pos();
    if pos >= n {
        terminate!();
    }
    let i = pos % inner;
    let chunk = (pos / inner) % chunks;
    let o = pos / (inner * chunks);
    let start = chunk * chunk_len;
    let mut end = start + chunk_len;
    if end > axis_len {
        end = axis_len;
    }
    let mut acc = reduce_init::<f32>(neg_inf, kind);
    let base = o * axis_len * inner + i;
    for a in start..end {
        acc = reduce_step::<f32>(acc, f32::cast_from(input[base + a * inner]), kind);
    }
    let r = match kind {
        ReduceKind::Mean => acc / divisor,
        _ => acc,
    };
    output[pos] = O::cast_from(r);
}

/// Threads a column reduction aims for before it splits the axis in chunks
/// (two passes) to keep the device busy.
const COLUMN_THREADS: usize = 1 << 16;

/// Rows of at most this many elements are reduced by one thread each: a
/// cube of `ROW_BLOCK` threads per row would leave most of them idle and
/// spend its time in the shared-memory tree (attention's backward sums
/// 64-element rows, one per query row and head, every layer).
const SHORT_ROW: usize = 128;

/// Reduces a dense `(outer, axis_len, inner)` tensor along its middle axis
/// into `output` `(outer, 1, inner)`, both stored as `elem`.
///
/// Along the last axis (`inner == 1`) one cube reduces each row longer
/// than `SHORT_ROW`. Along any other axis, and for short rows, one thread
/// reduces each column (a short row is a column with `inner == 1`;
/// otherwise consecutive threads read consecutive addresses); when there
/// are too few columns to fill the device, the axis is first cut in chunks
/// reduced into partial results, then those are reduced (a mean sums first
/// and divides at the end; the partials are `f32`).
#[allow(clippy::too_many_arguments)]
pub fn launch_reduce<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    kind: ReduceKind,
    input: &Handle,
    output: &Handle,
    outer: usize,
    axis_len: usize,
    inner: usize,
) {
    let rows = outer * inner;
    if rows == 0 {
        return;
    }
    if inner == 1 && axis_len > SHORT_ROW {
        with_float!(elem, F => unsafe {
            reduce_kernel::launch_unchecked::<F, R>(
                client,
                grid_1d(rows, 1),
                CubeDim::new_1d(ROW_BLOCK),
                ArrayArg::from_raw_parts(input.clone(), (rows * axis_len).max(1)),
                ArrayArg::from_raw_parts(output.clone(), rows),
                axis_len,
                rows,
                f32::NEG_INFINITY,
                kind,
            );
        });
        return;
    }
    reduce_columns_into(
        client,
        kind,
        (elem, elem),
        input,
        output,
        outer,
        axis_len,
        inner,
    );
}

/// Reduces a dense `(outer, axis_len, inner)` tensor along its middle axis
/// into `output` `(outer, 1, inner)`, one thread per column;
/// `io`: the input's and the output's storage. When there are too few
/// columns to fill the device, the axis is first cut in chunks reduced into
/// `f32` partial results, then those are reduced.
#[allow(clippy::too_many_arguments)]
pub(crate) fn reduce_columns_into<R: Runtime>(
    client: &ComputeClient<R>,
    kind: ReduceKind,
    io: (FloatElem, FloatElem),
    input: &Handle,
    output: &Handle,
    outer: usize,
    axis_len: usize,
    inner: usize,
) {
    let rows = outer * inner;
    if rows == 0 {
        return;
    }
    let column =
        |kind, io, input: &Handle, output: &Handle, axis_len, chunks, chunk_len, divisor| {
            launch_columns(
                client, kind, io, input, output, outer, axis_len, inner, chunks, chunk_len, divisor,
            )
        };
    let chunks = COLUMN_THREADS
        .div_ceil(rows)
        .min(axis_len.div_ceil(32))
        .max(1);
    if chunks == 1 {
        column(
            kind,
            io,
            input,
            output,
            axis_len,
            1,
            axis_len,
            axis_len as f32,
        );
        return;
    }
    let chunk_len = axis_len.div_ceil(chunks);
    let chunks = axis_len.div_ceil(chunk_len);
    let partial = client.empty(4 * outer * chunks * inner);
    let first = if kind == ReduceKind::Max {
        ReduceKind::Max
    } else {
        ReduceKind::Sum
    };
    let f32_ = FloatElem::F32;
    column(
        first,
        (io.0, f32_),
        input,
        &partial,
        axis_len,
        chunks,
        chunk_len,
        1.0,
    );
    column(
        kind,
        (f32_, io.1),
        &partial,
        output,
        chunks,
        1,
        chunks,
        axis_len as f32,
    );
}

/// `reduce_columns_kernel` over `(outer, axis_len, inner)` into `(outer,
/// chunks, inner)`; a mean divides by `divisor`. `io`: the input's and the
/// output's storage.
#[allow(clippy::too_many_arguments)]
fn launch_columns<R: Runtime>(
    client: &ComputeClient<R>,
    kind: ReduceKind,
    io: (FloatElem, FloatElem),
    input: &Handle,
    output: &Handle,
    outer: usize,
    axis_len: usize,
    inner: usize,
    chunks: usize,
    chunk_len: usize,
    divisor: f32,
) {
    let n = outer * chunks * inner;
    with_float!(io.0, I => with_float!(io.1, O => unsafe {
        reduce_columns_kernel::launch_unchecked::<I, O, R>(
            client,
            grid_1d(n, ELEM_BLOCK),
            CubeDim::new_1d(ELEM_BLOCK),
            ArrayArg::from_raw_parts(input.clone(), (outer * axis_len * inner).max(1)),
            ArrayArg::from_raw_parts(output.clone(), n),
            axis_len,
            inner,
            chunks,
            chunk_len,
            n,
            divisor,
            f32::NEG_INFINITY,
            kind,
        );
    }));
}

#[cube(launch_unchecked)]
fn softmax_kernel<F: Float + CubeElement>(
    input: &Array<F>,
    output: &mut Array<F>,
    axis_len: usize,
    inner: usize,
    rows: usize,
    neg_inf: f32,
) {
    let row = linear_cube();
    if row >= rows {
        terminate!();
    }
    let (o, i) = (row / inner, row % inner);
    let base = o * axis_len * inner + i;
    let mut smem = SharedMemory::<f32>::new(ROW_BLOCK as usize);
    let step = CUBE_DIM as usize;
    let mut m = neg_inf;
    let mut a = UNIT_POS as usize;
    while a < axis_len {
        m = max_nan::<f32>(m, f32::cast_from(input[base + a * inner]));
        a += step;
    }
    let m = block_max::<f32>(&mut smem, m);
    let mut s = f32::new(0.0);
    a = UNIT_POS as usize;
    while a < axis_len {
        s += (f32::cast_from(input[base + a * inner]) - m).exp();
        a += step;
    }
    let s = block_sum::<f32>(&mut smem, s);
    a = UNIT_POS as usize;
    while a < axis_len {
        let idx = base + a * inner;
        output[idx] = F::cast_from((f32::cast_from(input[idx]) - m).exp() / s);
        a += step;
    }
}

/// Softmax of a dense `(outer, axis_len, inner)` tensor along its middle
/// axis; input and output are stored as `elem`.
pub fn launch_softmax<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    input: &Handle,
    output: &Handle,
    outer: usize,
    axis_len: usize,
    inner: usize,
) {
    let rows = outer * inner;
    if rows == 0 || axis_len == 0 {
        return;
    }
    let n = outer * axis_len * inner;
    with_float!(elem, F => unsafe {
        softmax_kernel::launch_unchecked::<F, R>(
            client,
            grid_1d(rows, 1),
            CubeDim::new_1d(ROW_BLOCK),
            ArrayArg::from_raw_parts(input.clone(), n),
            ArrayArg::from_raw_parts(output.clone(), n),
            axis_len,
            inner,
            rows,
            f32::NEG_INFINITY,
        );
    });
}
