//! Elementwise conversion between any two of the `f32`, `f16`, `bf16` and
//! `i32` storages (through `f32`: a narrow store rounds to nearest even, a
//! float to `i32` truncates toward zero), and rounding of
//! `f32` values to the `f16` or `bf16` grid (round to nearest, ties to
//! even), which is what a cast to a narrow float means when narrow floats
//! are stored widened to `f32` (as in the reference interpreter). The
//! rounding works on the bits, so it needs no `f16` support on the device.
//! Infinity arrives as a runtime scalar (WGSL rejects non-finite literals).

use crate::copy::{copy_layout, view_positions};
use crate::{grid_1d, linear_pos, FloatElem, Storage, View, ELEM_BLOCK};
use cubecl::prelude::*;
use cubecl::server::Handle;

/// `via_f32`: the value goes through `f32` (every conversion but `i32` to
/// `i32`; a no-op where either side is `f32`). One unit converts a vector
/// of `N` elements; `units` counts vectors.
#[cube(launch_unchecked)]
fn convert_kernel<I: Numeric, O: Numeric, N: Size>(
    input: &Array<Vector<I, N>>,
    output: &mut Array<Vector<O, N>>,
    units: usize,
    #[comptime] via_f32: bool,
) {
    let pos = linear_pos();
    if pos < units {
        if via_f32 {
            output[pos] = Vector::<O, N>::cast_from(Vector::<f32, N>::cast_from(input[pos]));
        } else {
            output[pos] = Vector::<O, N>::cast_from(input[pos]);
        }
    }
}

/// What to round `f32` values to.
#[derive(CubeType, Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Narrow {
    Bf16,
    F16,
}

#[cube]
pub(crate) fn round_bf16(x: f32) -> f32 {
    let bits = u32::reinterpret(x);
    let mut out = x;
    // NaN and infinities keep their bits.
    if (bits & 0x7f80_0000u32) != 0x7f80_0000u32 {
        let rounded = (bits + 0x7fffu32 + ((bits >> 16u32) & 1u32)) & 0xffff_0000u32;
        out = f32::reinterpret(rounded);
    }
    out
}

// `a == a` is the NaN test (no `is_nan` on generic cube floats).
#[allow(clippy::eq_op)]
#[cube]
pub(crate) fn round_f16(x: f32, inf: f32) -> f32 {
    let a = x.abs();
    let mut out = x;
    if a == a && a != inf {
        if a >= 65520.0 {
            // Half-way between f16's max and 2^16 rounds to infinity.
            out = inf;
            if x < 0.0 {
                out = -out;
            }
        } else if a < 6.103_515_6e-5 {
            // Subnormal range: a fixed step of 2^-24.
            let scale = 16_777_216.0f32;
            let mut r = (a * scale).round() / scale;
            // `round` may tie away from zero; fix ties to even.
            let t = a * scale;
            if t - t.floor() == 0.5 {
                let f = t.floor();
                r = f;
                if f - 2.0 * (f / 2.0).floor() != 0.0 {
                    r = f + 1.0;
                }
                r /= scale;
            }
            out = r;
            if x < 0.0 {
                out = -r;
            }
        } else {
            let bits = u32::reinterpret(x);
            let rounded = (bits + 0x0fffu32 + ((bits >> 13u32) & 1u32)) & 0xffff_e000u32;
            out = f32::reinterpret(rounded);
        }
    }
    out
}

#[cube(launch_unchecked)]
fn round_kernel(input: &Array<f32>, output: &mut Array<f32>, inf: f32, #[comptime] to: Narrow) {
    let pos = linear_pos();
    if pos < output.len() {
        let x = input[pos];
        output[pos] = match to {
            Narrow::Bf16 => round_bf16(x),
            Narrow::F16 => round_f16(x, inf),
        };
    }
}

/// Runs `$body` with the type alias `$T` naming `$s`'s storage type.
macro_rules! with_storage {
    ($s:expr, $T:ident => $body:expr) => {
        match $s {
            Storage::Float(FloatElem::F32) => {
                type $T = f32;
                $body
            }
            Storage::Float(FloatElem::F16) => {
                type $T = half::f16;
                $body
            }
            Storage::Float(FloatElem::BF16) => {
                type $T = half::bf16;
                $body
            }
            Storage::I32 => {
                type $T = i32;
                $body
            }
        }
    };
}

/// `n` elements from `input` (stored as `from`) to `output` (stored as
/// `to`) converted through `f32`: a float to `i32` truncates toward zero,
/// `i32` to a float rounds to nearest, a float to a narrower one rounds to
/// nearest even; `i32` to `i32` copies.
pub fn launch_convert<R: Runtime>(
    client: &ComputeClient<R>,
    from: Storage,
    to: Storage,
    input: &Handle,
    output: &Handle,
    n: usize,
) {
    if n == 0 {
        return;
    }
    // The widest vector both sides load in one access (up to 16 bytes)
    // that divides `n`.
    let size = |s: Storage| match s {
        Storage::Float(FloatElem::F16 | FloatElem::BF16) => 2,
        _ => 4,
    };
    let nv = client
        .io_optimized_vector_sizes(size(from).max(size(to)))
        .find(|&nv| n.is_multiple_of(nv))
        .unwrap_or(1);
    let units = n / nv;
    let (grid, dim) = (grid_1d(units, ELEM_BLOCK), CubeDim::new_1d(ELEM_BLOCK));
    let via_f32 = !(from == Storage::I32 && to == Storage::I32);
    unsafe {
        let i = ArrayArg::from_raw_parts(input.clone(), n);
        let o = ArrayArg::from_raw_parts(output.clone(), n);
        with_storage!(from, I => with_storage!(to, O => {
            convert_kernel::launch_unchecked::<I, O, R>(client, grid, dim, nv, i, o, units, via_f32)
        }))
    }
}

/// `launch_convert` between two views of one shape, each with its own
/// strides and offset (a permuted or sliced operand read in place): the
/// strided copy's indexing (`copy`), converting each vector through `f32`
/// (a transposed matrix goes through `transpose_convert_kernel`'s tiles).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn strided_convert_kernel<I: Numeric, O: Numeric, N: Size>(
    input: &Array<Vector<I, N>>,
    output: &mut Array<Vector<O, N>>,
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
    output[dst / nv] = Vector::<O, N>::cast_from(Vector::<f32, N>::cast_from(input[src / nv]));
}

/// Edge of the tiles `transpose_convert_kernel` moves through shared memory.
const TILE: usize = 32;
/// Rows of units per tile (each unit moves `TILE / TILE_ROWS` elements).
const TILE_ROWS: usize = 8;

/// `launch_convert_view` for a matrix read column-major and written
/// row-major (a transposed operand, such as a weight gradient read through
/// its transpose): each cube converts a `TILE × TILE` tile, reading it
/// along the input's contiguous axis into shared memory and writing it
/// along the output's, so both sides are coalesced (a plain strided read
/// would touch one 32-byte sector per 2-byte element).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn transpose_convert_kernel<I: Numeric, O: Numeric>(
    input: &Array<I>,
    output: &mut Array<O>,
    rows: usize,
    cols: usize,
    in_col_stride: usize,
    out_row_stride: usize,
    in_offset: usize,
    out_offset: usize,
) {
    let mut tile = SharedMemory::<f32>::new(TILE * (TILE + 1));
    let c0 = CUBE_POS_X as usize * TILE;
    let r0 = CUBE_POS_Y as usize * TILE;
    let (tx, ty) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    #[unroll]
    for k in 0..TILE / TILE_ROWS {
        // Consecutive units read consecutive rows: the input's contiguous axis.
        let j = ty + k * TILE_ROWS;
        let (r, c) = (r0 + tx, c0 + j);
        if r < rows && c < cols {
            tile[j * (TILE + 1) + tx] = f32::cast_from(input[in_offset + r + c * in_col_stride]);
        }
    }
    sync_cube();
    #[unroll]
    for k in 0..TILE / TILE_ROWS {
        // Consecutive units write consecutive columns: the output's.
        let i = ty + k * TILE_ROWS;
        let (r, c) = (r0 + i, c0 + tx);
        if r < rows && c < cols {
            output[out_offset + r * out_row_stride + c] = O::cast_from(tile[tx * (TILE + 1) + i]);
        }
    }
}

/// The elements of view `input` (stored as `from`) converted into view
/// `output` (stored as `to`, a different storage) of the same shape, as
/// [`launch_convert`] converts them. Axes are coalesced as the strided copy
/// does; vectors of up to 16 bytes where the last axis allows.
pub fn launch_convert_view<R: Runtime>(
    client: &ComputeClient<R>,
    from: Storage,
    to: Storage,
    input: &View,
    output: &View,
) {
    assert_eq!(
        input.shape, output.shape,
        "conversion between views of different shapes"
    );
    let n = input.numel();
    if n == 0 {
        return;
    }
    let (shape, si, so) = crate::copy::coalesce(input, output);
    let rank = shape.len();
    if rank == 2 && si[0] == 1 && so[1] == 1 && shape[0] > 1 && shape[1] > 1 {
        // A transposed matrix: tiles through shared memory.
        let (rows, cols) = (shape[0], shape[1]);
        let grid = CubeCount::Static(cols.div_ceil(TILE) as u32, rows.div_ceil(TILE) as u32, 1);
        let dim = CubeDim::new_2d(TILE as u32, TILE_ROWS as u32);
        let in_len = input.offset + (rows - 1) + (cols - 1) * si[1] + 1;
        let out_len = output.offset + (rows - 1) * so[0] + cols;
        unsafe {
            with_storage!(from, I => with_storage!(to, O => {
                transpose_convert_kernel::launch_unchecked::<I, O, R>(
                    client,
                    grid,
                    dim,
                    ArrayArg::from_raw_parts(input.handle.clone(), in_len),
                    ArrayArg::from_raw_parts(output.handle.clone(), out_len),
                    rows,
                    cols,
                    si[1],
                    so[0],
                    input.offset,
                    output.offset,
                )
            }))
        }
        return;
    }
    let size = |s: Storage| match s {
        Storage::Float(FloatElem::F16 | FloatElem::BF16) => 2,
        _ => 4,
    };
    let nv = crate::copy::vector_width(
        client,
        size(from).max(size(to)),
        (&shape, &si, &so),
        (input.offset, output.offset),
    );
    let units = n / nv;
    let (grid, dim) = (grid_1d(units, ELEM_BLOCK), CubeDim::new_1d(ELEM_BLOCK));
    unsafe {
        with_storage!(from, I => with_storage!(to, O => {
            strided_convert_kernel::launch_unchecked::<I, O, R>(
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
        }))
    }
}

/// Rounds `n` `f32` elements of `input` to the `to` grid into `output`.
pub fn launch_round<R: Runtime>(
    client: &ComputeClient<R>,
    to: Narrow,
    input: &Handle,
    output: &Handle,
    n: usize,
) {
    if n == 0 {
        return;
    }
    unsafe {
        round_kernel::launch_unchecked::<R>(
            client,
            grid_1d(n, ELEM_BLOCK),
            CubeDim::new_1d(ELEM_BLOCK),
            ArrayArg::from_raw_parts(input.clone(), n),
            ArrayArg::from_raw_parts(output.clone(), n),
            f32::INFINITY,
            to,
        );
    }
}
