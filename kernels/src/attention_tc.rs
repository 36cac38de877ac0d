//! Flash attention on tensor cores: the forward ([`try_launch_forward`]) and
//! the backward's two kernels ([`try_launch_dq`], [`try_launch_dkv`]) for
//! half-precision storage, with the same semantics as the scalar kernels
//! of `attention` and `attention_backward` (the CPU reference's `attention`,
//! `attention_with_lse` and `attention_grad`), computed with warp-level
//! matrix products whose registers the kernel manages (CubeCL's manual MMA,
//! CUDA's `mma.sync.m16n8k16`: half operands, f32 accumulators), in the
//! design of FlashAttention-2.
//!
//! A cube is 4 or 8 planes of 32 units; each plane owns 16 rows of the
//! cube's block of 64 or 128 rows (`cube_rows`: query rows for the forward and `dq`,
//! key rows for `dk`/`dv`) and visits the other side in tiles of
//! `TC_TILE` rows (the forward: 128 where a plane has one row tile,
//! `key_tile`) staged in shared memory by the whole cube. A plane's
//! rows enter the products as A fragments loaded once (`ldmatrix`); per
//! tile it forms its 16 × 64 (or 128) block of scores in accumulator registers
//! (each unit holds rows `g = lane / 4` and `g + 8`, columns `2t`, `2t + 1`
//! of every 8, `t = lane % 4`), applies the mask and the online softmax,
//! or the gradient's `p·(dp − delta)·scale`, in f32 in those registers (a
//! row's maximum and sum over the quad of units that share it), and feeds
//! the result to the next product without leaving the registers: the
//! accumulator layout of two adjacent 8-column blocks is the A fragment
//! layout of one 16-wide step. The results that feed a product (the
//! probabilities `p`, the score gradient `ds`) are rounded to the storage
//! type, as FlashAttention-2 does; everything else (scores, running
//! statistics, accumulators) stays f32, and every result is rounded once
//! as it is stored.
//!
//! - forward: `s = q·kᵀ`, then `o += p·v` with `o` in registers, rescaled
//!   by the online softmax's correction once per tile.
//! - `dq = ds·k`: the cube owns query rows and recomputes `s` and
//!   `dp = dout·vᵀ` per key tile (no rescaling in the backward).
//! - `dk = dsᵀ·q`, `dv = pᵀ·dout`: the cube owns key rows and computes the
//!   transposed blocks `sᵀ = k·qᵀ` and `dpᵀ = v·doutᵀ` directly, with the
//!   statistics of the tile's queries staged in shared memory.
//!
//! The right operands are read from shared memory with `ldmatrix`, plain
//! (`kᵀ`, `qᵀ`, `vᵀ`, `doutᵀ`, whose columns are rows in memory) or
//! transposed (`v`, `k`, `q`, `dout` as the right side of `p·v`, `ds·k`,
//! `dsᵀ·q`, `pᵀ·dout`); rows are padded by 8 elements so that the eight
//! rows of one 8 × 8 matrix fall in distinct banks.
//!
//! Head dims are padded to a multiple of 16 with zeros in shared memory
//! (zero columns add nothing to a score and produce columns nobody
//! stores), so DBA's 12-dim heads run here too. Where it stops: CUDA with
//! 32-unit planes and `mma` m16n8k16 for the storage type (sm_80 on; the
//! `try_launch_*` functions return `false` otherwise and the caller runs
//! the scalar kernel); head dims up to [`TC_MAX_DIM`]; loads from global
//! memory are synchronous (16-byte vectors where the rows allow, but no
//! `cp.async`, no double buffering); the tiles' masked part on the causal
//! diagonal is computed and discarded.

use crate::attention::{batches, Lse};
use crate::attention_backward::{batch_offset, GradOperands};
use crate::{grid_1d, linear_cube, FloatElem, View};
use cubecl::cmma::MmaDefinition;
use cubecl::ir::MatrixIdent;
use cubecl::prelude::barrier::{copy_async_checked, Barrier};
use cubecl::prelude::*;

/// Rows per tile of the other side, staged in shared memory per step.
pub const TC_TILE: usize = 64;
/// Units per plane the kernels are written for.
const PLANE: usize = 32;
/// The widest head (query/key or value dims) the kernels take: registers
/// hold a plane's A fragments (its rows of `q`, or of `k` and `v`), the
/// forward's output and the backward's accumulators (220 registers a unit
/// for `dk‖dv` at 64 dims, no spills, on sm_90).
pub const TC_MAX_DIM: usize = 128;

/// `x` rounded up to a multiple of 16 (the product's tile edge).
const fn pad16(x: usize) -> usize {
    x.div_ceil(16) * 16
}

/// Row stride (elements) of a half-precision tile `w` wide in shared
/// memory: padded to 16, plus 8 so that consecutive rows start in
/// different banks (a multiple of 8: `ldmatrix` reads 16-byte rows).
const fn half_stride(w: usize) -> usize {
    pad16(w) + 8
}

/// Buffers per staged tile: two where the rows go in vectors of more
/// than one element (`cp.async` copies 4, 8 or 16 bytes), so that the next
/// tile's copies overlap this one's products; one otherwise.
const fn stages(nv: usize) -> usize {
    if nv > 1 {
        2
    } else {
        1
    }
}

/// Keys visible to query row `i` of `t` (all `s_len`, or up to its
/// absolute position when `causal`); rows past `t` see none.
#[cube]
fn key_limit(i: usize, t: usize, s_len: usize, #[comptime] causal: bool) -> usize {
    let mut limit = 0;
    if i < t {
        limit = s_len;
        if causal {
            limit = 0;
            if i + s_len + 1 > t {
                limit = i + s_len + 1 - t;
            }
            if limit > s_len {
                limit = s_len;
            }
        }
    }
    limit
}

/// Copies rows `start..start + rows` of `src`'s matrix at `base` (its
/// last two axes, `w` columns) into `dst` (row stride `stride`), by the
/// whole cube; rows at `len` or past it and the columns `w..wp` of padding
/// become zeros. `src` is read in vectors of `nv` elements (`nv` > 1 only
/// where the launch found its rows contiguous, aligned and a multiple of
/// `nv` wide). Where the padded width in vectors divides the cube, each
/// unit keeps one vector column and steps through rows, its loads
/// unrolled so that they are all in flight at once. With `keep_pad` the
/// padding columns are left as they are (see [`ones_column`]).
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage<F: Float, N: Size>(
    dst: &mut SharedMemory<F>,
    src: &Tensor<Vector<F, N>>,
    base: usize,
    start: usize,
    len: usize,
    #[comptime] rows: usize,
    #[comptime] w: usize,
    #[comptime] stride: usize,
    #[comptime] nv: usize,
    #[comptime] threads: usize,
    #[comptime] keep_pad: bool,
) {
    let wp = comptime!(pad16(w));
    let wv = comptime!(pad16(w) / nv); // vectors per padded row
    let rank = src.rank();
    let (rs, cs) = (src.stride(rank - 2), src.stride(rank - 1));
    let u = UNIT_POS as usize;
    if comptime!(threads.is_multiple_of(wv)) {
        let step = comptime!(threads / wv); // rows per pass of the cube
        let (r0, x) = (u / wv, (u % wv) * nv);
        let mut at = base + (start + r0) * rs + x * cs;
        // A unit whose vector is padding has nothing to do with `keep_pad`.
        if !(comptime!(keep_pad) && x >= w) {
            #[unroll]
            for n in 0..comptime!(rows.div_ceil(threads / wv)) {
                let r = r0 + n * step;
                let valid = start + r < len && x < w;
                if comptime!(rows.is_multiple_of(step)) {
                    // No check that could split the unrolled loads.
                    stage_vector::<F, N>(dst, src, at, valid, r * stride + x, nv);
                } else if r < rows {
                    // The last pass of a block that the cube's passes do
                    // not divide.
                    stage_vector::<F, N>(dst, src, at, valid, r * stride + x, nv);
                }
                at += step * rs;
            }
        }
    } else {
        // Scalar (the launch gives nv = 1 here).
        let mut idx = u;
        while idx < comptime!(rows * wp) {
            let (r, x) = (idx / wp, idx % wp);
            let mut val = F::from_int(0);
            if start + r < len && x < w {
                val = src[base + (start + r) * rs + x * cs][0];
            }
            if x < w || comptime!(!keep_pad) {
                dst[r * stride + x] = val;
            }
            idx += threads;
        }
    }
}

/// One unit's vector of `stage`: `nv` elements from `src` at `at`
/// (counted in elements) into `dst` from `to` on, or zeros where not
/// `valid`.
#[cube]
fn stage_vector<F: Float, N: Size>(
    dst: &mut SharedMemory<F>,
    src: &Tensor<Vector<F, N>>,
    at: usize,
    valid: bool,
    to: usize,
    #[comptime] nv: usize,
) {
    if valid {
        let vec = src[at / nv];
        #[unroll]
        for i in 0..nv {
            dst[to + i] = vec[i];
        }
    } else {
        #[unroll]
        for i in 0..nv {
            dst[to + i] = F::from_int(0);
        }
    }
}

/// `stage` with CUDA's asynchronous copies (`cp.async`): each unit's
/// vectors of `nv` elements (`nv` > 1, the fast path's layout) go from
/// global to shared memory without passing through registers, into `dst`
/// from element `off` on; rows at `len` or past it and the padding columns
/// are zero-filled by the copy itself (a source of no bytes). The copies
/// complete on `bar` ([`commit_stage`]) and are visible after
/// [`wait_stage`]: the kernels issue the next tile's copies before
/// computing on the current one. With `keep_pad` the padding columns get
/// no copy and keep what they hold.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_async<F: Float, N: Size>(
    dst: &mut SharedMemory<F>,
    off: usize,
    src: &Tensor<Vector<F, N>>,
    base: usize,
    start: usize,
    len: usize,
    #[comptime] rows: usize,
    #[comptime] w: usize,
    #[comptime] stride: usize,
    #[comptime] nv: usize,
    #[comptime] threads: usize,
    #[comptime] keep_pad: bool,
) {
    let wv = comptime!(pad16(w) / nv);
    let step = comptime!(threads / wv);
    let rank = src.rank();
    let (rs, cs) = (src.stride(rank - 2), src.stride(rank - 1));
    let u = UNIT_POS as usize;
    let (r0, x) = (u / wv, (u % wv) * nv);
    let mut at = base + (start + r0) * rs + x * cs;
    if !(comptime!(keep_pad) && x >= w) {
        #[unroll]
        for n in 0..comptime!(rows.div_ceil(step)) {
            let r = r0 + n * step;
            if comptime!(rows.is_multiple_of(step)) || r < rows {
                let valid = start + r < len && x < w;
                // A copy of no bytes where invalid (from the tensor's
                // start, always a valid address): the destination is
                // zero-filled.
                let from = select(valid, at / nv, 0);
                let count = select(valid, 1usize, 0usize);
                let to = off + r * stride + x;
                unsafe {
                    copy_async_checked::<F>(
                        &src.slice(from, from + count).downcast_unchecked::<F>(),
                        &mut dst.slice_mut(to, to + nv),
                        comptime!(nv as u32),
                    );
                }
            }
            at += step * rs;
        }
    }
}

/// Rows `start..start + TC_TILE` of two operands (keys and values, or
/// queries and output gradients; `wa` and `wb` columns) into buffer `buf`
/// of `a_sh` and `b_sh`: asynchronous copies where `stages` is 2 (the
/// caller completes them with [`commit_stage`]), stores otherwise;
/// `b_pad`: `b_sh`'s padding columns are kept ([`ones_column`]).
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_tiles<F: Float, N: Size>(
    a_sh: &mut SharedMemory<F>,
    b_sh: &mut SharedMemory<F>,
    a: &Tensor<Vector<F, N>>,
    b: &Tensor<Vector<F, N>>,
    offsets: (usize, usize),
    start: usize,
    len: usize,
    buf: usize,
    #[comptime] wa: usize,
    #[comptime] wb: usize,
    #[comptime] nv: usize,
    #[comptime] threads: usize,
    #[comptime] stages: usize,
    #[comptime] b_pad: bool,
    #[comptime] kt: usize,
) {
    let (sa, sb) = (comptime!(half_stride(wa)), comptime!(half_stride(wb)));
    let (ao, bo) = offsets;
    if comptime!(stages == 2) {
        let (oa, ob) = (buf * comptime!(kt * sa), buf * comptime!(kt * sb));
        stage_async::<F, N>(a_sh, oa, a, ao, start, len, kt, wa, sa, nv, threads, false);
        stage_async::<F, N>(b_sh, ob, b, bo, start, len, kt, wb, sb, nv, threads, b_pad);
    } else {
        stage::<F, N>(a_sh, a, ao, start, len, kt, wa, sa, nv, threads, false);
        stage::<F, N>(b_sh, b, bo, start, len, kt, wb, sb, nv, threads, b_pad);
    }
}

/// `stage_stat` with asynchronous copies (4 bytes a unit), into `dst`
/// from `off` on; completes on the stage's barrier as `stage_async` does.
#[cube]
fn stage_stat_async(
    dst: &mut SharedMemory<f32>,
    off: usize,
    src: &Tensor<f32>,
    base: usize,
    start: usize,
    len: usize,
) {
    let u = UNIT_POS as usize;
    if u < TC_TILE {
        let valid = start + u < len;
        let from = select(valid, base + (start + u) * src.stride(src.rank() - 2), 0);
        let count = select(valid, 1usize, 0usize);
        copy_async_checked::<f32>(
            &src.slice(from, from + count),
            &mut dst.slice_mut(off + u, off + u + 1),
            1u32,
        );
    }
}

/// The `dk‖dv` kernel's tile of queries: rows `start..start + TC_TILE`
/// of `q` and `dout` and of their statistics (`lse`, `delta`; `offsets`
/// in that order) into buffer `buf`, as [`stage_tiles`] stages operands.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_query_tile<F: Float, N: Size>(
    q_sh: &mut SharedMemory<F>,
    g_sh: &mut SharedMemory<F>,
    lse_sh: &mut SharedMemory<f32>,
    delta_sh: &mut SharedMemory<f32>,
    q: &Tensor<Vector<F, N>>,
    dout: &Tensor<Vector<F, N>>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    offsets: (usize, usize, usize, usize),
    start: usize,
    len: usize,
    buf: usize,
    #[comptime] d: usize,
    #[comptime] dv: usize,
    #[comptime] nv: usize,
    #[comptime] threads: usize,
    #[comptime] stages: usize,
) {
    let (qo, go, lo, eo) = offsets;
    let qg = (qo, go);
    stage_tiles::<F, N>(
        q_sh, g_sh, q, dout, qg, start, len, buf, d, dv, nv, threads, stages, false, TC_TILE,
    );
    if comptime!(stages == 2) {
        stage_stat_async(lse_sh, buf * TC_TILE, lse, lo, start, len);
        stage_stat_async(delta_sh, buf * TC_TILE, delta, eo, start, len);
    } else {
        stage_stat(lse_sh, lse, lo, start, len);
        stage_stat(delta_sh, delta, eo, start, len);
    }
}

/// Makes key/value tile `tile` of `n_tiles` readable in buffer
/// `tile % stages` of `k_sh` and `v_sh` (the forward's and `dq`'s loop):
/// with two stages, issues tile `tile + 1`'s copies into the other buffer,
/// then waits for this tile's (issued one step earlier, or before the
/// loop); with one, stages this tile and waits for the cube.
#[cube]
#[allow(clippy::too_many_arguments)]
fn kv_tile_ready<F: Float, N: Size>(
    k_sh: &mut SharedMemory<F>,
    v_sh: &mut SharedMemory<F>,
    k: &Tensor<Vector<F, N>>,
    v: &Tensor<Vector<F, N>>,
    offsets: (usize, usize),
    bar0: &Shared<Barrier>,
    bar1: &Shared<Barrier>,
    tile: usize,
    n_tiles: usize,
    s_len: usize,
    #[comptime] d: usize,
    #[comptime] dv: usize,
    #[comptime] nv: usize,
    #[comptime] threads: usize,
    #[comptime] stages: usize,
    #[comptime] v_pad: bool,
    #[comptime] kt: usize,
) {
    // The tile staged now: the next one with two stages, this one with one.
    let staged = tile + comptime!(stages - 1);
    let into = staged % stages;
    if staged < n_tiles {
        let start = staged * kt;
        stage_tiles::<F, N>(
            k_sh, v_sh, k, v, offsets, start, s_len, into, d, dv, nv, threads, stages, v_pad, kt,
        );
        if comptime!(stages == 2) {
            commit_stage(bar0, bar1, into);
        }
    }
    end_stage(bar0, bar1, tile, stages);
}

/// Waits until tile `step` (counted from the loop's first) is readable:
/// its stage's barrier with two stages, the cube with one.
#[cube]
fn end_stage(
    bar0: &Shared<Barrier>,
    bar1: &Shared<Barrier>,
    step: usize,
    #[comptime] stages: usize,
) {
    if comptime!(stages == 2) {
        wait_stage(bar0, bar1, step);
    } else {
        sync_cube();
    }
}

/// Initializes the two stages' barriers (every unit arrives on each) and
/// waits for the cube, so that no copy completes on an uninitialized one.
#[cube]
fn init_stages(bar0: &Shared<Barrier>, bar1: &Shared<Barrier>) {
    if UNIT_POS == 0 {
        bar0.init_manual(CUBE_DIM);
        bar1.init_manual(CUBE_DIM);
    }
    sync_cube();
}

/// Ends a unit's share of one stage of asynchronous copies: `bar`
/// (`bars[0]` or `bars[1]` as `buf` says) completes its phase when every
/// unit has arrived and every unit's copies have landed.
#[cube]
fn commit_stage(bar0: &Shared<Barrier>, bar1: &Shared<Barrier>, buf: usize) {
    if buf == 0 {
        bar0.commit_copy_async();
        let _ = bar0.arrive();
    } else {
        bar1.commit_copy_async();
        let _ = bar1.arrive();
    }
}

/// Waits for tile `tile`'s stage (buffer `tile % 2`, that barrier's
/// `tile / 2`-th phase).
#[cube]
fn wait_stage(bar0: &Shared<Barrier>, bar1: &Shared<Barrier>, tile: usize) {
    let parity = u32::cast_from((tile / 2) % 2);
    let buf = tile % 2;
    if buf == 0 {
        bar0.wait_parity(parity);
    } else {
        bar1.wait_parity(parity);
    }
}

/// Copies `TC_TILE` entries of a `(…, rows, 1)` statistic (`lse` or
/// `delta`, f32) from row `start` on into `dst` (zeros past `len`).
#[cube]
fn stage_stat(
    dst: &mut SharedMemory<f32>,
    src: &Tensor<f32>,
    base: usize,
    start: usize,
    len: usize,
) {
    let u = UNIT_POS as usize;
    if u < TC_TILE {
        let mut val = f32::new(0.0);
        if start + u < len {
            val = src[base + (start + u) * src.stride(src.rank() - 2)];
        }
        dst[u] = val;
    }
}

/// A pair of half-precision values, or of f32 accumulators: one 32-bit
/// (or two) register of an `mma` fragment.
type Pair<E> = Vector<E, Const<2>>;

/// The `mma.sync` shape the kernels use: m16 n8 k16, half operands, f32
/// accumulators.
#[cube]
fn mma_shape<F: Float>() -> MmaDefinition<F, F, f32> {
    MmaDefinition::<F, F, f32>::new(16usize, 8usize, 16usize)
}

/// An accumulator block of this plane's 16 rows × `w` columns (`w` a
/// multiple of 16), zeroed: two pairs per 8 columns, `[2b]` row `g`
/// and `[2b + 1]` row `g + 8`, columns `8b + 2t` and `8b + 2t + 1`
/// (`g = lane / 4`, `t = lane % 4`: the m16n8 accumulator layout).
#[cube]
fn zeroed(#[comptime] w: usize) -> Array<Pair<f32>> {
    let mut acc = Array::<Pair<f32>>::new(comptime!(w / 4));
    #[unroll]
    for j in 0..w / 4 {
        acc[j] = Pair::<f32>::new(f32::new(0.0));
    }
    acc
}

/// The A fragments of the `16·mt` × `kd` block of `sh` from row `row0` on
/// (row stride `stride`, `kd` a multiple of 16): four registers per 16
/// columns of each 16-row tile (tile `m`'s from `m·kd/4` on), loaded with
/// `ldmatrix`, kept for every tile of the other side.
#[cube]
fn a_fragments<F: Float>(
    sh: &SharedMemory<F>,
    row0: usize,
    #[comptime] kd: usize,
    #[comptime] stride: usize,
    #[comptime] mt: usize,
) -> Array<Pair<F>> {
    let def = mma_shape::<F>();
    let lane = UNIT_POS_PLANE as usize;
    let mut frags = Array::<Pair<F>>::new(comptime!(mt * kd / 4));
    #[unroll]
    for m in 0..mt {
        #[unroll]
        for c in 0..kd / 16 {
            // Matrix `lane / 8`: rows 0-7 or 8-15 (`lane % 16`), columns
            // 0-7 or 8-15 (`lane / 16`).
            let at = (row0 + m * 16 + lane % 16) * stride + c * 16 + (lane / 16) * 8;
            let regs = def.load_matrix::<F, Const<2>>(
                &sh.slice(at, at + 8),
                MatrixIdent::A,
                4usize,
                false,
            );
            #[unroll]
            for r in 0..4usize {
                frags[m * (kd / 4) + c * 4 + r] = regs[r];
            }
        }
    }
    frags
}

/// The A fragments of the 16 × `TC_TILE` block `shᵀ[col0.., ..]`: `sh`'s
/// columns `col0..col0 + 16` as rows, its `TC_TILE` rows as the inner
/// dimension (row stride `stride`), loaded with `ldmatrix`'s transpose; the
/// registers in `scores`' order (four per 16 of the inner dimension), so
/// that [`accumulate`] takes them as it takes probabilities.
#[cube]
fn transposed_a_fragments<F: Float>(
    sh: &SharedMemory<F>,
    col0: usize,
    #[comptime] stride: usize,
) -> Array<Pair<F>> {
    let def = mma_shape::<F>();
    let lane = UNIT_POS_PLANE as usize;
    let mut frags = Array::<Pair<F>>::new(comptime!(TC_TILE / 4));
    #[unroll]
    for c in 0..TC_TILE / 16 {
        // Matrix `lane / 8`: A's rows 0-7 or 8-15 (`(lane / 8) % 2`, sh's
        // columns), its columns 0-7 or 8-15 of this step (`lane / 16`,
        // sh's rows).
        let at = (c * 16 + (lane / 16) * 8 + lane % 8) * stride + col0 + ((lane / 8) % 2) * 8;
        let regs =
            def.load_matrix::<F, Const<2>>(&sh.slice(at, at + 8), MatrixIdent::A, 4usize, true);
        #[unroll]
        for r in 0..4usize {
            frags[c * 4 + r] = regs[r];
        }
    }
    frags
}

/// `acc += a·bᵀ` for one 16 × 16 block of `acc` (column blocks `2n` and
/// `2n + 1` of the row tile whose pairs start at `base`): `a` one A
/// fragment (four registers), `regs` the B fragments of both column
/// blocks as `ldmatrix` gave them.
#[cube]
fn mma_pair<F: Float>(
    acc: &mut Array<Pair<f32>>,
    a: &Array<Pair<F>>,
    regs: &Array<Pair<F>>,
    #[comptime] n: usize,
    #[comptime] base: usize,
) {
    let def = mma_shape::<F>();
    #[unroll]
    for h in 0..2usize {
        let blk = base / 2 + 2 * n + h;
        let mut b = Array::<Pair<F>>::new(2usize);
        b[0] = regs[2 * h];
        b[1] = regs[2 * h + 1];
        let mut c = Array::<Pair<f32>>::new(2usize);
        c[0] = acc[2 * blk];
        c[1] = acc[2 * blk + 1];
        let out = def.execute(a, &b, &c);
        acc[2 * blk] = out[0];
        acc[2 * blk + 1] = out[1];
    }
}

/// This plane's `16·mt` × `TC_TILE` block `a·bᵀ` in accumulators (row
/// tile `m`'s pairs from `m·TC_TILE/4` on): `a` the plane's rows as A
/// fragments (`a_fragments`, `kd` wide), `b` the `TC_TILE` rows of `b_sh`
/// from element `off` on (row stride `stride`), read as B fragments
/// without transposing (bᵀ's column `n` is b's row `n`), each B fragment
/// loaded once for the `mt` row tiles.
#[cube]
fn scores<F: Float>(
    a: &Array<Pair<F>>,
    b_sh: &SharedMemory<F>,
    off: usize,
    #[comptime] kd: usize,
    #[comptime] stride: usize,
    #[comptime] mt: usize,
    #[comptime] kt: usize,
) -> Array<Pair<f32>> {
    let def = mma_shape::<F>();
    let lane = UNIT_POS_PLANE as usize;
    let mut acc = zeroed(comptime!(mt * kt));
    #[unroll]
    for c in 0..kd / 16 {
        #[unroll]
        for n in 0..kt / 16 {
            // Matrix `lane / 8`: b's rows 16n..16n + 7 or + 8..15
            // (`lane / 16`), columns 0-7 or 8-15 of this k step.
            let at = off
                + (n * 16 + (lane / 16) * 8 + lane % 8) * stride
                + c * 16
                + ((lane / 8) % 2) * 8;
            let regs = def.load_matrix::<F, Const<2>>(
                &b_sh.slice(at, at + 8),
                MatrixIdent::B,
                4usize,
                false,
            );
            #[unroll]
            for m in 0..mt {
                let mut af = Array::<Pair<F>>::new(4usize);
                #[unroll]
                for r in 0..4usize {
                    af[r] = a[m * (kd / 4) + c * 4 + r];
                }
                mma_pair::<F>(&mut acc, &af, &regs, n, comptime!(m * kt / 4));
            }
        }
    }
    acc
}

/// `acc += p·b`: `p` this plane's `16·mt` × `TC_TILE` block in
/// accumulator layout, rounded to the storage type (`scores`' layout is
/// the A fragments' of `p·b`, two column blocks a fragment, so `p` never
/// leaves the registers), `b` the `TC_TILE` rows of `b_sh` from element
/// `off` on (row stride `stride`, `w` columns, a multiple of 16), read as
/// B fragments with `ldmatrix`'s transpose, each once for the `mt` row
/// tiles (`acc`'s tile `m` from `m·w/4` on).
#[cube]
#[allow(clippy::too_many_arguments)]
fn accumulate<F: Float>(
    acc: &mut Array<Pair<f32>>,
    p: &Array<Pair<F>>,
    b_sh: &SharedMemory<F>,
    off: usize,
    #[comptime] w: usize,
    #[comptime] stride: usize,
    #[comptime] mt: usize,
    #[comptime] kt: usize,
) {
    let def = mma_shape::<F>();
    let lane = UNIT_POS_PLANE as usize;
    #[unroll]
    for c in 0..kt / 16 {
        #[unroll]
        for n in 0..w / 16 {
            // Matrix `lane / 8`: b's rows 16c..16c + 7 or + 8..15
            // (`(lane / 8) % 2`), columns 16n..16n + 7 or + 8..15.
            let at = off
                + (c * 16 + ((lane / 8) % 2) * 8 + lane % 8) * stride
                + n * 16
                + (lane / 16) * 8;
            let regs = def.load_matrix::<F, Const<2>>(
                &b_sh.slice(at, at + 8),
                MatrixIdent::B,
                4usize,
                true,
            );
            #[unroll]
            for m in 0..mt {
                let pb = comptime!(m * kt / 4 + 4 * c);
                let mut af = Array::<Pair<F>>::new(4usize);
                af[0] = p[pb];
                af[1] = p[pb + 1];
                af[2] = p[pb + 2];
                af[3] = p[pb + 3];
                mma_pair::<F>(acc, &af, &regs, n, comptime!(m * w / 4));
            }
        }
    }
}

/// `acc` rounded to the storage type, pair by pair.
#[cube]
fn rounded<F: Float>(
    acc: &Array<Pair<f32>>,
    #[comptime] mt: usize,
    #[comptime] kt: usize,
) -> Array<Pair<F>> {
    let mut out = Array::<Pair<F>>::new(comptime!(mt * kt / 4));
    #[unroll]
    for j in 0..mt * kt / 4 {
        out[j] = Pair::<F>::cast_from(acc[j]);
    }
    out
}

/// Sets this unit's scores of tile `start` (`mt` row tiles of [`TC_TILE`]
/// keys, in `s`) that its rows do not see (`limits`: row `2m + h`'s visible
/// keys) to `neg_inf`.
#[cube]
fn mask_tile(
    s: &mut Array<Pair<f32>>,
    limits: &Array<usize>,
    start: usize,
    tq: usize,
    neg_inf: f32,
    #[comptime] mt: usize,
    #[comptime] kt: usize,
) {
    let sp = comptime!(kt / 4);
    #[unroll]
    for m in 0..mt {
        let (lim0, lim1) = (limits[2 * m], limits[2 * m + 1]);
        #[unroll]
        for b in 0..kt / 8 {
            let at = comptime!(m * sp + 2 * b);
            let (mut r0, mut r1) = (s[at], s[at + 1]);
            #[unroll]
            for e in 0..2usize {
                let c = start + b * 8 + 2 * tq + e;
                r0[e] = select(c < lim0, r0[e], neg_inf);
                r1[e] = select(c < lim1, r1[e], neg_inf);
            }
            s[at] = r0;
            s[at + 1] = r1;
        }
    }
}

/// `2ˣ` in the hardware's base-2 exponential alone: CUDA's `__powf(2, x)`,
/// whose `log₂ 2` NVVM folds away, leaving one `ex2.approx.f32` (CubeCL
/// 0.10 has no `exp2`). The softmax folds `log₂ e` into its scale, which
/// saves `__expf`'s multiply on every score. `2^−∞` is 0.
#[cube(fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf)]
pub(crate) fn fast_exp2(x: f32) -> f32 {
    f32::new(2.0).powf(x)
}

/// Writes this plane's rows `g` and `g + 8` of `acc` (`w` columns, the
/// first `limit` kept) to `out` from `at0`/`at1` on, columns `cs` apart
/// (`at` = `(at0, at1, cs)`); rows not `ok` are skipped.
#[cube]
#[allow(clippy::too_many_arguments)]
fn store_rows<O: Float>(
    out: &mut Tensor<O>,
    acc: &Array<Pair<f32>>,
    at: (usize, usize, usize),
    ok0: bool,
    ok1: bool,
    mul0: f32,
    mul1: f32,
    #[comptime] w: usize,
    #[comptime] limit: usize,
    #[comptime] base: usize,
) {
    let tq = UNIT_POS_PLANE as usize % 4;
    let (at0, at1, cs) = at;
    #[unroll]
    for b in 0..w / 8 {
        let (x0, x1) = (acc[base + 2 * b], acc[base + 2 * b + 1]);
        #[unroll]
        for e in 0..2 {
            let c = b * 8 + 2 * tq + e;
            if c < limit {
                if ok0 {
                    out[at0 + c * cs] = O::cast_from(x0[e] * mul0);
                }
                if ok1 {
                    out[at1 + c * cs] = O::cast_from(x1[e] * mul1);
                }
            }
        }
    }
}

/// Column `dv` of every row of `v_sh` (`rows` rows, `stride` apart) set
/// to one and the rest of the padding to zero, by the whole cube: where
/// the values are narrower than their padding (DBA's 12 dims in 16), the
/// product `p·v` then also yields each row's sum of `p` (rounded as the
/// product sees it) in output column `dv`, and the softmax adds no sum of
/// its own. The staging leaves these columns alone (`keep_pad`).
#[cube]
fn ones_column<F: Float>(
    v_sh: &mut SharedMemory<F>,
    #[comptime] rows: usize,
    #[comptime] dv: usize,
    #[comptime] stride: usize,
    #[comptime] threads: usize,
) {
    let w = comptime!(pad16(dv) - dv);
    let mut idx = UNIT_POS as usize;
    while idx < comptime!(rows * w) {
        let (r, c) = (idx / w, idx % w);
        v_sh[r * stride + dv + c] = select(c == 0, F::from_int(1), F::from_int(0));
        idx += threads;
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn attention_tc_kernel<F: Float + CubeElement, O: Float + CubeElement, N: Size>(
    q: &Tensor<Vector<F, N>>,
    k: &Tensor<Vector<F, N>>,
    v: &Tensor<Vector<F, N>>,
    out: &mut Tensor<O>,
    stats: &mut Tensor<f32>,
    scale: f32,
    neg_inf: f32,
    #[comptime] causal: bool,
    #[comptime] d: usize,
    #[comptime] dv: usize,
    #[comptime] lse: Lse,
    #[comptime] nv: usize,
    #[comptime] rows: usize,
    #[comptime] mt: usize,
    #[comptime] kt: usize,
) {
    let threads = comptime!(rows / (16 * mt) * PLANE);
    let dp = comptime!(pad16(d));
    let dvp = comptime!(pad16(dv));
    let hs = comptime!(half_stride(d));
    let vs = comptime!(half_stride(dv));
    // Pairs per row tile: of the scores, and of the output.
    let (sp, op) = (comptime!(kt / 4), comptime!(dvp / 4));
    let rank = out.rank();
    let t = out.shape(rank - 2);
    let s_len = k.shape(rank - 2);
    let blocks = t.div_ceil(rows);
    let cube = linear_cube(); // (batch, query block) flattened
    let batch = cube / blocks;
    if batch >= batches(out) {
        terminate!();
    }
    let first = (cube % blocks) * rows;
    let qo = batch_offset::<Vector<F, N>, O>(q, out, batch);
    let ko = batch_offset::<Vector<F, N>, O>(k, out, batch);
    let vo = batch_offset::<Vector<F, N>, O>(v, out, batch);
    let oo = batch_offset::<O, O>(out, out, batch);

    let lane = UNIT_POS_PLANE as usize;
    let prow = (UNIT_POS as usize / PLANE) * 16 * mt; // the plane's first row
    let (g, tq) = (lane / 4, lane % 4); // rows g and g + 8 of each row tile
                                        // Row `2m + h` of this unit: tile m's row g (h = 0) or g + 8 (h = 1).
    let row0 = first + prow + g;
    let mut limits = Array::<usize>::new(comptime!(2 * mt));
    #[unroll]
    for r in 0..2 * mt {
        limits[r] = key_limit(row0 + r * 8, t, s_len, causal);
    }
    let mut last = first + rows;
    if last > t {
        last = t;
    }
    let max_limit = key_limit(last - 1, t, s_len, causal);
    // Keys every row of the cube sees (none where it has rows past `t`):
    // tiles below it need no mask.
    let mut min_limit = 0;
    if first + rows <= t {
        min_limit = key_limit(first, t, s_len, causal);
    }

    // Two buffers of keys and values where the copies are asynchronous
    // (the next tile's copies fly while this one is computed), one where
    // they are not.
    let stages = comptime!(stages(nv));
    let (kb, vb) = (comptime!(kt * hs), comptime!(kt * vs));
    let mut q_sh = SharedMemory::<F>::new_aligned(comptime!(rows * hs), 32usize);
    let mut k_sh = SharedMemory::<F>::new_aligned(comptime!(stages * kb), 32usize);
    let mut v_sh = SharedMemory::<F>::new_aligned(comptime!(stages * vb), 32usize);
    let bar0 = Barrier::shared_uninit();
    let bar1 = Barrier::shared_uninit();
    let n_tiles = max_limit.div_ceil(kt);
    let kv = (ko, vo);
    // Values narrower than their padding carry the rows' sums (module doc
    // of `ones_column`); the barrier after `q`'s staging publishes it.
    let ones = comptime!(dv < dvp);
    if comptime!(ones) {
        ones_column::<F>(&mut v_sh, comptime!(stages * kt), dv, vs, threads);
    }
    if comptime!(stages == 2) {
        init_stages(&bar0, &bar1);
        if n_tiles > 0 {
            stage_tiles::<F, N>(
                &mut k_sh, &mut v_sh, k, v, kv, 0, s_len, 0, d, dv, nv, threads, stages, ones, kt,
            );
            commit_stage(&bar0, &bar1, 0);
        }
    }
    stage::<F, N>(&mut q_sh, q, qo, first, t, rows, d, hs, nv, threads, false);
    sync_cube();
    let qa = a_fragments::<F>(&q_sh, prow, dp, hs, mt);

    let mut o = zeroed(comptime!(mt * dvp));
    // Each row's running maximum, and each unit's share of its sum (the
    // quad adds them at the end).
    let mut mx = Array::<f32>::new(comptime!(2 * mt));
    let mut sum = Array::<f32>::new(comptime!(2 * mt));
    #[unroll]
    for r in 0..2 * mt {
        mx[r] = neg_inf;
        sum[r] = f32::new(0.0);
    }
    // exp(x·scale) = 2^(x·scale·log₂ e).
    let scale2 = scale * f32::new(core::f32::consts::LOG2_E);
    for tile in 0..n_tiles {
        let start = tile * kt;
        let buf = tile % stages;
        kv_tile_ready::<F, N>(
            &mut k_sh, &mut v_sh, k, v, kv, &bar0, &bar1, tile, n_tiles, s_len, d, dv, nv, threads,
            stages, ones, kt,
        );
        let mut s = scores::<F>(&qa, &k_sh, buf * kb, dp, hs, mt, kt);
        // Only tiles that reach past some row's last visible key are
        // masked (a branch the whole cube takes alike): the causal
        // diagonal, the keys' end, a last partial block of rows.
        if start + kt > min_limit {
            mask_tile(&mut s, &limits, start, tq, neg_inf, mt, kt);
        }
        #[unroll]
        for m in 0..mt {
            // The online softmax over this tile, on the raw scores (`scale`
            // > 0, so their maximum is the scaled scores' over `scale`):
            // the rows' maxima over the quad, then `exp(s·scale − max·scale)`
            // as `2^(s·scale₂ − max·scale₂)`: one fused multiply-add before
            // the base-2 exponential.
            let (mut x0, mut x1) = (neg_inf, neg_inf);
            #[unroll]
            for b in 0..kt / 8 {
                let at = comptime!(m * sp + 2 * b);
                let (r0, r1) = (s[at], s[at + 1]);
                x0 = x0.max(r0[0]).max(r0[1]);
                x1 = x1.max(r1[0]).max(r1[1]);
            }
            x0 = x0.max(plane_shuffle_xor(x0, 1u32));
            x0 = x0.max(plane_shuffle_xor(x0, 2u32));
            x1 = x1.max(plane_shuffle_xor(x1, 1u32));
            x1 = x1.max(plane_shuffle_xor(x1, 2u32));
            let (n0, n1) = (mx[2 * m].max(x0), mx[2 * m + 1].max(x1));
            // A row with no visible key yet keeps its maximum at −∞:
            // subtract zero instead, so that its masked scores give
            // exp(−∞) = 0, not NaN.
            let z0 = select(n0 > neg_inf, n0 * scale2, f32::new(0.0));
            let z1 = select(n1 > neg_inf, n1 * scale2, f32::new(0.0));
            let c0 = fast_exp2(mx[2 * m] * scale2 - z0);
            let c1 = fast_exp2(mx[2 * m + 1] * scale2 - z1);
            let (mut p0, mut p1) = (f32::new(0.0), f32::new(0.0));
            #[unroll]
            for b in 0..kt / 8 {
                let at = comptime!(m * sp + 2 * b);
                let (mut r0, mut r1) = (s[at], s[at + 1]);
                #[unroll]
                for e in 0..2usize {
                    r0[e] = fast_exp2(r0[e] * scale2 - z0);
                    r1[e] = fast_exp2(r1[e] * scale2 - z1);
                    if comptime!(!ones) {
                        p0 += r0[e];
                        p1 += r1[e];
                    }
                }
                s[at] = r0;
                s[at + 1] = r1;
            }
            if comptime!(!ones) {
                sum[2 * m] = sum[2 * m] * c0 + p0;
                sum[2 * m + 1] = sum[2 * m + 1] * c1 + p1;
            }
            mx[2 * m] = n0;
            mx[2 * m + 1] = n1;
            #[unroll]
            for b in 0..dvp / 8 {
                let at = comptime!(m * op + 2 * b);
                o[at] = o[at] * Pair::<f32>::new(c0);
                o[at + 1] = o[at + 1] * Pair::<f32>::new(c1);
            }
        }
        accumulate::<F>(
            &mut o,
            &rounded::<F>(&s, mt, kt),
            &v_sh,
            buf * vb,
            dvp,
            vs,
            mt,
            kt,
        );
        // Every plane is done with this tile's keys and values before the
        // next tile's staging overwrites them.
        sync_cube();
    }
    #[unroll]
    for m in 0..mt {
        let (mut l0, mut l1) = (sum[2 * m], sum[2 * m + 1]);
        if comptime!(ones) {
            // Column dv of the output: unit `tq` holds columns `2tq, 2tq
            // + 1` of each 8-column block.
            let at = comptime!(m * op + 2 * (dv / 8));
            let mine = tq == comptime!((dv % 8) / 2);
            l0 = select(mine, o[at][comptime!(dv % 2)], f32::new(0.0));
            l1 = select(mine, o[at + 1][comptime!(dv % 2)], f32::new(0.0));
        }
        l0 += plane_shuffle_xor(l0, 1u32);
        l0 += plane_shuffle_xor(l0, 2u32);
        l1 += plane_shuffle_xor(l1, 1u32);
        l1 += plane_shuffle_xor(l1, 2u32);
        let i0 = row0 + m * 16;
        let i1 = i0 + 8;
        let (ot, oc) = (out.stride(rank - 2), out.stride(rank - 1));
        let (at0, at1) = (oo + i0 * ot, oo + i1 * ot);
        let (ok0, ok1) = (i0 < t, i1 < t);
        if tq == 0 {
            // The maxima are of the raw scores.
            let (x0, x1) = (mx[2 * m] * scale + l0.ln(), mx[2 * m + 1] * scale + l1.ln());
            match lse {
                Lse::Apart => {
                    let so = batch_offset::<f32, O>(stats, out, batch);
                    let st = stats.stride(rank - 2);
                    if ok0 {
                        stats[so + i0 * st] = x0;
                    }
                    if ok1 {
                        stats[so + i1 * st] = x1;
                    }
                }
                // After the row's dv values.
                Lse::Appended => {
                    if ok0 {
                        out[at0 + dv * oc] = O::cast_from(x0);
                    }
                    if ok1 {
                        out[at1 + dv * oc] = O::cast_from(x1);
                    }
                }
                _ => {}
            }
        }
        store_rows::<O>(
            out,
            &o,
            (at0, at1, oc),
            ok0,
            ok1,
            f32::new(1.0) / l0,
            f32::new(1.0) / l1,
            dvp,
            dv,
            comptime!(m * op),
        );
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn attention_dq_tc_kernel<F: Float + CubeElement, O: Float + CubeElement, N: Size>(
    q: &Tensor<Vector<F, N>>,
    k: &Tensor<Vector<F, N>>,
    v: &Tensor<Vector<F, N>>,
    dout: &Tensor<Vector<F, N>>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    out: &mut Tensor<O>,
    scale: f32,
    #[comptime] causal: bool,
    #[comptime] d: usize,
    #[comptime] dv: usize,
    #[comptime] nv: usize,
    #[comptime] rows: usize,
) {
    let threads = comptime!(rows / 16 * PLANE);
    let dp = comptime!(pad16(d));
    let dvp = comptime!(pad16(dv));
    let hs = comptime!(half_stride(d));
    let vs = comptime!(half_stride(dv));
    let rank = out.rank();
    let t = out.shape(rank - 2);
    let s_len = k.shape(rank - 2);
    let blocks = t.div_ceil(rows);
    let cube = linear_cube(); // (batch, query block) flattened
    let batch = cube / blocks;
    if batch * t * d >= out.len() {
        terminate!();
    }
    let first = (cube % blocks) * rows;
    let qo = batch_offset::<Vector<F, N>, O>(q, out, batch);
    let ko = batch_offset::<Vector<F, N>, O>(k, out, batch);
    let vo = batch_offset::<Vector<F, N>, O>(v, out, batch);
    let go = batch_offset::<Vector<F, N>, O>(dout, out, batch);
    let lo = batch_offset::<f32, O>(lse, out, batch);
    let eo = batch_offset::<f32, O>(delta, out, batch);

    let lane = UNIT_POS_PLANE as usize;
    let prow = (UNIT_POS as usize / PLANE) * 16;
    let (g, tq) = (lane / 4, lane % 4);
    let i0 = first + prow + g;
    let i1 = i0 + 8;
    let limit0 = key_limit(i0, t, s_len, causal);
    let limit1 = key_limit(i1, t, s_len, causal);
    let mut last = first + rows;
    if last > t {
        last = t;
    }
    let max_limit = key_limit(last - 1, t, s_len, causal);
    let (ok0, ok1) = (i0 < t, i1 < t);
    let (mut lse0, mut lse1) = (f32::new(0.0), f32::new(0.0));
    let (mut delta0, mut delta1) = (f32::new(0.0), f32::new(0.0));
    if ok0 {
        lse0 = lse[lo + i0 * lse.stride(rank - 2)];
        delta0 = delta[eo + i0 * delta.stride(rank - 2)];
    }
    if ok1 {
        lse1 = lse[lo + i1 * lse.stride(rank - 2)];
        delta1 = delta[eo + i1 * delta.stride(rank - 2)];
    }
    // p = exp(s·scale − lse) = 2^(s·scale₂ − lse·log₂ e).
    let log2e = f32::new(core::f32::consts::LOG2_E);
    let scale2 = scale * log2e;
    let (lse0, lse1) = (lse0 * log2e, lse1 * log2e);

    let stages = comptime!(stages(nv));
    let (kb, vb) = (comptime!(TC_TILE * hs), comptime!(TC_TILE * vs));
    let mut q_sh = SharedMemory::<F>::new_aligned(comptime!(rows * hs), 32usize);
    let mut g_sh = SharedMemory::<F>::new_aligned(comptime!(rows * vs), 32usize);
    let mut k_sh = SharedMemory::<F>::new_aligned(comptime!(stages * kb), 32usize);
    let mut v_sh = SharedMemory::<F>::new_aligned(comptime!(stages * vb), 32usize);
    let bar0 = Barrier::shared_uninit();
    let bar1 = Barrier::shared_uninit();
    let n_tiles = max_limit.div_ceil(TC_TILE);
    let kv = (ko, vo);
    if comptime!(stages == 2) {
        init_stages(&bar0, &bar1);
        if n_tiles > 0 {
            stage_tiles::<F, N>(
                &mut k_sh, &mut v_sh, k, v, kv, 0, s_len, 0, d, dv, nv, threads, stages, false,
                TC_TILE,
            );
            commit_stage(&bar0, &bar1, 0);
        }
    }
    stage::<F, N>(&mut q_sh, q, qo, first, t, rows, d, hs, nv, threads, false);
    stage::<F, N>(
        &mut g_sh, dout, go, first, t, rows, dv, vs, nv, threads, false,
    );
    sync_cube();
    let qa = a_fragments::<F>(&q_sh, prow, dp, hs, 1usize);
    let ga = a_fragments::<F>(&g_sh, prow, dvp, vs, 1usize);

    let mut dq = zeroed(dp);
    for tile in 0..n_tiles {
        let start = tile * TC_TILE;
        let buf = tile % stages;
        kv_tile_ready::<F, N>(
            &mut k_sh, &mut v_sh, k, v, kv, &bar0, &bar1, tile, n_tiles, s_len, d, dv, nv, threads,
            stages, false, TC_TILE,
        );
        // s = q·kᵀ and dp = dout·vᵀ, then ds = p·(dp − delta)·scale in
        // place of s.
        let mut s = scores::<F>(&qa, &k_sh, buf * kb, dp, hs, 1usize, TC_TILE);
        let dpm = scores::<F>(&ga, &v_sh, buf * vb, dvp, vs, 1usize, TC_TILE);
        #[unroll]
        for b in 0..TC_TILE / 8 {
            let (mut r0, mut r1) = (s[2 * b], s[2 * b + 1]);
            let (d0, d1) = (dpm[2 * b], dpm[2 * b + 1]);
            #[unroll]
            for e in 0..2usize {
                let c = start + b * 8 + 2 * tq + e;
                let p0 = fast_exp2(r0[e] * scale2 - lse0);
                let p1 = fast_exp2(r1[e] * scale2 - lse1);
                r0[e] = select(c < limit0, p0 * (d0[e] - delta0) * scale, f32::new(0.0));
                r1[e] = select(c < limit1, p1 * (d1[e] - delta1) * scale, f32::new(0.0));
            }
            s[2 * b] = r0;
            s[2 * b + 1] = r1;
        }
        accumulate::<F>(
            &mut dq,
            &rounded::<F>(&s, 1usize, TC_TILE),
            &k_sh,
            buf * kb,
            dp,
            hs,
            1usize,
            TC_TILE,
        );
        sync_cube();
    }
    let (at0, at1) = ((batch * t + i0) * d, (batch * t + i1) * d);
    let one = f32::new(1.0);
    store_rows::<O>(
        out,
        &dq,
        (at0, at1, 1usize),
        ok0,
        ok1,
        one,
        one,
        dp,
        d,
        0usize,
    );
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn attention_dkv_tc_kernel<F: Float + CubeElement, O: Float + CubeElement, N: Size>(
    q: &Tensor<Vector<F, N>>,
    k: &Tensor<Vector<F, N>>,
    v: &Tensor<Vector<F, N>>,
    dout: &Tensor<Vector<F, N>>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    out: &mut Tensor<O>,
    dq: &mut Tensor<Atomic<f32>>,
    scale: f32,
    #[comptime] causal: bool,
    #[comptime] d: usize,
    #[comptime] dv: usize,
    #[comptime] nv: usize,
    #[comptime] rows: usize,
    #[comptime] with_dq: bool,
) {
    let threads = comptime!(rows / 16 * PLANE);
    let dp = comptime!(pad16(d));
    let dvp = comptime!(pad16(dv));
    let hs = comptime!(half_stride(d));
    let vs = comptime!(half_stride(dv));
    // dsᵀ of the block's keys × the tile's queries, for `dq` (rounded as
    // it enters the product, as `dq`'s own kernel rounds ds).
    let dss = comptime!(half_stride(TC_TILE));
    let rank = out.rank();
    let t = q.shape(rank - 2);
    let s_len = out.shape(rank - 2);
    let blocks = s_len.div_ceil(rows);
    let cube = linear_cube(); // (batch, key block) flattened
    let batch = cube / blocks;
    if batch * s_len * (d + dv) >= out.len() {
        terminate!();
    }
    let first = (cube % blocks) * rows; // first key of the block
    let qo = batch_offset::<Vector<F, N>, O>(q, out, batch);
    let ko = batch_offset::<Vector<F, N>, O>(k, out, batch);
    let vo = batch_offset::<Vector<F, N>, O>(v, out, batch);
    let go = batch_offset::<Vector<F, N>, O>(dout, out, batch);
    let lo = batch_offset::<f32, O>(lse, out, batch);
    let eo = batch_offset::<f32, O>(delta, out, batch);

    let lane = UNIT_POS_PLANE as usize;
    let prow = (UNIT_POS as usize / PLANE) * 16;
    let (g, tq) = (lane / 4, lane % 4);
    let j0 = first + prow + g; // this unit's keys: j0 and j0 + 8
    let j1 = j0 + 8;
    let (ok0, ok1) = (j0 < s_len, j1 < s_len);

    let stages = comptime!(stages(nv));
    let (qb, gb) = (comptime!(TC_TILE * hs), comptime!(TC_TILE * vs));
    let mut k_sh = SharedMemory::<F>::new_aligned(comptime!(rows * hs), 32usize);
    let mut v_sh = SharedMemory::<F>::new_aligned(comptime!(rows * vs), 32usize);
    let mut q_sh = SharedMemory::<F>::new_aligned(comptime!(stages * qb), 32usize);
    let mut g_sh = SharedMemory::<F>::new_aligned(comptime!(stages * gb), 32usize);
    let mut lse_sh = SharedMemory::<f32>::new_aligned(comptime!(stages * TC_TILE), 16usize);
    let mut delta_sh = SharedMemory::<f32>::new_aligned(comptime!(stages * TC_TILE), 16usize);
    let mut ds_sh =
        SharedMemory::<F>::new_aligned(comptime!(if with_dq { rows * dss } else { 8 }), 32usize);
    let dqo = batch_offset::<Atomic<f32>, O>(dq, out, batch);
    let bar0 = Barrier::shared_uninit();
    let bar1 = Barrier::shared_uninit();
    // The first query that sees the block's first key.
    let mut q_first = 0;
    if causal && first + t > s_len {
        q_first = first + t - s_len;
    }
    let tile_first = q_first / TC_TILE;
    let n_tiles = t.div_ceil(TC_TILE);
    let offsets = (qo, go, lo, eo);
    // p = exp(s·scale − lse) = 2^(s·scale₂ − lse·log₂ e).
    let log2e = f32::new(core::f32::consts::LOG2_E);
    let scale2 = scale * log2e;
    if comptime!(stages == 2) {
        init_stages(&bar0, &bar1);
        if tile_first < n_tiles {
            // Stages are counted from `tile_first`: its tiles go to buffer
            // `(tile − tile_first) % 2`.
            let start = tile_first * TC_TILE;
            stage_query_tile::<F, N>(
                &mut q_sh,
                &mut g_sh,
                &mut lse_sh,
                &mut delta_sh,
                q,
                dout,
                lse,
                delta,
                offsets,
                start,
                t,
                0,
                d,
                dv,
                nv,
                threads,
                stages,
            );
            commit_stage(&bar0, &bar1, 0);
        }
    }
    stage::<F, N>(
        &mut k_sh, k, ko, first, s_len, rows, d, hs, nv, threads, false,
    );
    stage::<F, N>(
        &mut v_sh, v, vo, first, s_len, rows, dv, vs, nv, threads, false,
    );
    sync_cube();
    let ka = a_fragments::<F>(&k_sh, prow, dp, hs, 1usize);
    let va = a_fragments::<F>(&v_sh, prow, dvp, vs, 1usize);

    let mut dk = zeroed(dp);
    let mut dvacc = zeroed(dvp);
    for tile in tile_first..n_tiles {
        let start = tile * TC_TILE;
        let step = tile - tile_first;
        let buf = step % stages;
        // The tile staged now: the next one with two stages, this one with
        // one (see `kv_tile_ready`).
        let staged = tile + comptime!(stages - 1);
        if staged < n_tiles {
            let into = (step + comptime!(stages - 1)) % stages;
            stage_query_tile::<F, N>(
                &mut q_sh,
                &mut g_sh,
                &mut lse_sh,
                &mut delta_sh,
                q,
                dout,
                lse,
                delta,
                offsets,
                staged * TC_TILE,
                t,
                into,
                d,
                dv,
                nv,
                threads,
                stages,
            );
            if comptime!(stages == 2) {
                commit_stage(&bar0, &bar1, into);
            }
        }
        end_stage(&bar0, &bar1, step, stages);
        // The statistics' buffer. Then sᵀ = k·qᵀ and dpᵀ = v·doutᵀ: this
        // plane's 16 keys × the tile's queries; then pᵀ in place of dpᵀ's
        // copy and dsᵀ in place of sᵀ.
        let so = buf * TC_TILE;
        let mut st = scores::<F>(&ka, &q_sh, buf * qb, dp, hs, 1usize, TC_TILE);
        let dpt = scores::<F>(&va, &g_sh, buf * gb, dvp, vs, 1usize, TC_TILE);
        let mut pt = zeroed(TC_TILE);
        #[unroll]
        for b in 0..TC_TILE / 8 {
            let (mut s0, mut s1) = (st[2 * b], st[2 * b + 1]);
            let (d0, d1) = (dpt[2 * b], dpt[2 * b + 1]);
            let (mut p0, mut p1) = (pt[2 * b], pt[2 * b + 1]);
            #[unroll]
            for e in 0..2usize {
                let c = b * 8 + 2 * tq + e;
                let (ls, dl) = (lse_sh[so + c] * log2e, delta_sh[so + c]);
                let qi = start + c;
                let mut vis0 = qi < t && ok0;
                let mut vis1 = qi < t && ok1;
                if causal {
                    vis0 = vis0 && j0 + t <= qi + s_len;
                    vis1 = vis1 && j1 + t <= qi + s_len;
                }
                p0[e] = select(vis0, fast_exp2(s0[e] * scale2 - ls), f32::new(0.0));
                p1[e] = select(vis1, fast_exp2(s1[e] * scale2 - ls), f32::new(0.0));
                s0[e] = p0[e] * (d0[e] - dl) * scale;
                s1[e] = p1[e] * (d1[e] - dl) * scale;
            }
            st[2 * b] = s0;
            st[2 * b + 1] = s1;
            pt[2 * b] = p0;
            pt[2 * b + 1] = p1;
        }
        accumulate::<F>(
            &mut dvacc,
            &rounded::<F>(&pt, 1usize, TC_TILE),
            &g_sh,
            buf * gb,
            dvp,
            vs,
            1usize,
            TC_TILE,
        );
        let ds = rounded::<F>(&st, 1usize, TC_TILE);
        accumulate::<F>(&mut dk, &ds, &q_sh, buf * qb, dp, hs, 1usize, TC_TILE);
        if comptime!(with_dq) {
            // dq += ds·k for the tile's queries, each plane 16 of them over
            // the block's keys: dsᵀ through shared memory (this plane's
            // rows), then read transposed as the A fragments.
            #[unroll]
            for b in 0..TC_TILE / 8 {
                let (x0, x1) = (ds[2 * b], ds[2 * b + 1]);
                let at = (prow + g) * dss + b * 8 + 2 * tq;
                ds_sh[at] = x0[0];
                ds_sh[at + 1] = x0[1];
                ds_sh[at + 8 * dss] = x1[0];
                ds_sh[at + 8 * dss + 1] = x1[1];
            }
            sync_cube();
            let dsa = transposed_a_fragments::<F>(&ds_sh, prow, dss);
            let mut dqp = zeroed(dp);
            accumulate::<F>(&mut dqp, &dsa, &k_sh, 0usize, dp, hs, 1usize, TC_TILE);
            let dq_t = dq.stride(rank - 2);
            let (i0, i1) = (start + prow + g, start + prow + g + 8);
            #[unroll]
            for b in 0..dp / 8 {
                let (y0, y1) = (dqp[2 * b], dqp[2 * b + 1]);
                #[unroll]
                for e in 0..2usize {
                    let c = b * 8 + 2 * tq + e;
                    if c < d {
                        if i0 < t {
                            dq[dqo + i0 * dq_t + c].fetch_add(y0[e]);
                        }
                        if i1 < t {
                            dq[dqo + i1 * dq_t + c].fetch_add(y1[e]);
                        }
                    }
                }
            }
        }
        sync_cube();
    }
    let (at0, at1) = (
        (batch * s_len + j0) * (d + dv),
        (batch * s_len + j1) * (d + dv),
    );
    let one = f32::new(1.0);
    store_rows::<O>(
        out,
        &dk,
        (at0, at1, 1usize),
        ok0,
        ok1,
        one,
        one,
        dp,
        d,
        0usize,
    );
    store_rows::<O>(
        out,
        &dvacc,
        (at0 + d, at1 + d, 1usize),
        ok0,
        ok1,
        one,
        one,
        dvp,
        dv,
        0usize,
    );
}

/// Runs `$body` with `$F` the half-precision storage type of `$elem`
/// (`f16` or `bf16`); `f32` storage returns `false` from the enclosing
/// function (the tensor-core kernels take half operands only).
macro_rules! with_half {
    ($elem:expr, $F:ident => $body:expr) => {
        match $elem {
            FloatElem::F16 => {
                type $F = half::f16;
                $body
            }
            FloatElem::BF16 => {
                type $F = half::bf16;
                $body
            }
            FloatElem::F32 => return false,
        }
    };
}

/// Bytes of shared memory a kernel needs for heads of `d` (queries and
/// keys) and `dv` (values) dims with half storage: the staged tiles (and
/// the backward's two f32 statistics per row of a tile); `kt` keys a
/// staged tile in the forward.
fn shared_bytes(d: usize, dv: usize, backward: bool, kt: usize) -> usize {
    let (hs, vs) = (half_stride(d), half_stride(dv));
    let rows = cube_rows(d, dv, backward);
    let st = stages(2); // the most: two buffers per tile
    if !backward {
        2 * rows * hs + 2 * st * kt * (hs + vs)
    } else {
        2 * (rows + st * TC_TILE) * (hs + vs) + st * 2 * 4 * TC_TILE
    }
}

/// Rows per cube (query rows for the forward and `dq`, key rows for
/// `dk`/`dv`): 128 for the forward (eight planes of one 16-row tile each
/// over 128-dim heads, where sharing each staged tile among eight planes
/// pays: on an H100, B4 H32 T4096 causal, 165 TFLOP/s against 140 with 64
/// rows; four planes of two row tiles each ([`forward_tiles`]) over heads
/// of up to 64 dims), 64 otherwise (the backward's kernels hold more
/// registers per unit, and measured the same either way in SmolLM2's
/// training step). `CARAMBA_TC_ROWS` (64 or 128) overrides the choice,
/// for such measurements.
fn cube_rows(d: usize, dv: usize, backward: bool) -> usize {
    // Read once per process: every launch asks (twice, with `usable`).
    static OVERRIDE: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let forced = OVERRIDE.get_or_init(|| env_choice("CARAMBA_TC_ROWS", &[64, 128]));
    if let Some(rows) = *forced {
        return rows;
    }
    if !backward && (pad16(d).max(pad16(dv)) >= 128 || forward_tiles(d, dv) == 2) {
        128
    } else {
        64
    }
}

/// Row tiles of 16 per plane in the forward: two where the wider head is
/// 33 to 64 dims (each `ldmatrix` of keys and values then feeds two row
/// tiles' products, halving the shared-memory reads per product, which
/// bound the one-tile kernel: 82% of L1 throughput on an H100 at head dim
/// 64; B4 H32 T4096 causal bf16: 198.8 TFLOP/s against 182.3), one
/// otherwise: over 128-dim heads two tiles' accumulators crowd the
/// registers (179.7 against 216.1), and DBA's 12-dim heads measured
/// slower with two (0.895 ms against 0.858). `CARAMBA_TC_MT` (1 or 2)
/// overrides the choice.
fn forward_tiles(d: usize, dv: usize) -> usize {
    static OVERRIDE: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let forced = OVERRIDE.get_or_init(|| env_choice("CARAMBA_TC_MT", &[1, 2]));
    let wide = pad16(d).max(pad16(dv));
    forced.unwrap_or(if (33..=64).contains(&wide) { 2 } else { 1 })
}

/// The value of environment variable `var` where it is one of `allowed`
/// (the benchmark overrides of the launch's choices).
pub(crate) fn env_choice(var: &str, allowed: &[usize]) -> Option<usize> {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|x| allowed.contains(x))
}

/// Keys per staged tile in the forward, where the device has `smem`
/// bytes of shared memory a cube: 128 where a plane takes one row tile
/// and the tiles fit, which halves the per-tile work (barriers, maxima,
/// rescaling) per score (on an H200, B4 H32 T4096 causal bf16: head dim
/// 128 238 TFLOP/s against 223; DBA's 12-dim heads 608 µs against 643 by
/// kernel time), [`TC_TILE`] otherwise (two row tiles' scores of 128 keys
/// crowd the registers: head dim 64, 209 against 219–224 TFLOP/s).
/// `CARAMBA_TC_KT` (32, 64 or 128) overrides it, for sweeps (a plane's
/// scores for a tile take `mt·kt/2` registers a unit).
fn key_tile(d: usize, dv: usize, smem: usize) -> usize {
    static OVERRIDE: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let forced = OVERRIDE.get_or_init(|| env_choice("CARAMBA_TC_KT", &[32, 64, 128]));
    if let Some(kt) = *forced {
        return kt;
    }
    let wide = 2 * TC_TILE;
    if row_tiles(d, dv, cube_rows(d, dv, false)) == 1 && shared_bytes(d, dv, false, wide) <= smem {
        wide
    } else {
        TC_TILE
    }
}

/// The forward's row tiles per plane for a cube of `rows` rows: at most
/// one plane's worth of rows per 16·tiles.
fn row_tiles(d: usize, dv: usize, rows: usize) -> usize {
    let mt = forward_tiles(d, dv);
    if rows.is_multiple_of(16 * mt) {
        mt
    } else {
        1
    }
}

/// The widest vector (8, 4, 2 or 1 elements) the operands' rows can be
/// staged in: every view's rows contiguous (last stride 1) and every other
/// stride and the offset a multiple of it, the head dims `d` and `dv`
/// multiples of it, and each padded width, counted in vectors, a divisor
/// of the cube's units (the staging's fast path).
fn vector_width(views: &[&View], d: usize, dv: usize, threads: usize) -> usize {
    [8, 4, 2]
        .into_iter()
        .find(|&nv| {
            let fits = |w: usize| w.is_multiple_of(nv) && threads.is_multiple_of(pad16(w) / nv);
            fits(d)
                && fits(dv)
                && views.iter().all(|v| {
                    let r = v.shape.len();
                    v.strides[r - 1] == 1
                        && v.offset.is_multiple_of(nv)
                        && v.strides[..r - 1].iter().all(|s| s.is_multiple_of(nv))
                })
        })
        .unwrap_or(1)
}

/// Whether `client`'s device runs `mma.sync.m16n8k16` with `half`
/// operands and f32 accumulators, on planes of exactly 32 units: what
/// the manual-MMA kernels (these and `kv_decode_mma`) are written for.
pub(crate) fn has_half_mma<R: Runtime>(
    client: &ComputeClient<R>,
    half: cubecl::ir::FloatKind,
) -> bool {
    use cubecl::ir::{ElemType, FloatKind, StorageType};
    let props = client.properties();
    let half_ty = StorageType::Scalar(ElemType::Float(half));
    let f32_ty = StorageType::Scalar(ElemType::Float(FloatKind::F32));
    let mma = cubecl::ir::features::MmaConfig {
        a_type: half_ty,
        b_type: half_ty,
        cd_type: f32_ty,
        m: 16,
        n: 8,
        k: 16,
    };
    props.features.matmul.mma.contains(&mma)
        && props.hardware.plane_size_min == PLANE as u32
        && props.hardware.plane_size_max == PLANE as u32
}

/// Whether the tensor-core kernels serve heads of `d` and `dv` dims stored
/// as `elem` on `client`'s device.
fn usable<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    d: usize,
    dv: usize,
    backward: bool,
) -> bool {
    use cubecl::ir::FloatKind;
    let kind = match elem {
        FloatElem::F16 => FloatKind::F16,
        FloatElem::BF16 => FloatKind::BF16,
        FloatElem::F32 => return false,
    };
    has_half_mma(client, kind)
        && (1..=TC_MAX_DIM).contains(&d)
        && (1..=TC_MAX_DIM).contains(&dv)
        && shared_bytes(d, dv, backward, forward_key_tile(client, d, dv))
            <= client.properties().hardware.max_shared_memory_size
}

/// [`key_tile`] for `client`'s device.
fn forward_key_tile<R: Runtime>(client: &ComputeClient<R>, d: usize, dv: usize) -> usize {
    key_tile(d, dv, client.properties().hardware.max_shared_memory_size)
}

/// Whether the tensor-core kernels run attention over heads of `d`
/// (queries and keys) and `dv` (values) dims stored as `elem` on
/// `client`'s device: the forward, or (`backward`) the gradients.
pub fn serves<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    d: usize,
    dv: usize,
    backward: bool,
) -> bool {
    usable(client, elem, d, dv, backward)
}

/// Attention on tensor cores, with the layouts of
/// `attention::launch_attention` and `launch_attention_with_lse` (q, k, v
/// views broadcast to the output's batch axes, stored as `elem`; `out`
/// strided, stored as `elem`, or as f32 with the log-sum-exp appended;
/// `lse` the log-sum-exp's own tensor in mode `Apart`; `mode` never
/// `Alone`). Returns `false`, launching nothing, where the kernel does not
/// serve the device, storage or head dims, or `scale` is not positive.
#[allow(clippy::too_many_arguments)]
pub fn try_launch_forward<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    q: &View,
    k: &View,
    v: &View,
    out: &View,
    lse: Option<&View>,
    mode: Lse,
    causal: bool,
    scale: f32,
) -> bool {
    let r = out.shape.len();
    let (d, dv, t) = (q.shape[r - 1], v.shape[r - 1], out.shape[r - 2]);
    // The kernel takes each row's maximum over the raw scores, which is
    // the scaled scores' only for a positive scale.
    if !(usable(client, elem, d, dv, false) && scale > 0.0 && scale.is_finite()) {
        return false;
    }
    let batch: usize = out.shape[..r - 2].iter().product();
    if batch * t == 0 {
        return true;
    }
    let rows = cube_rows(d, dv, false);
    let mt = row_tiles(d, dv, rows);
    let kt = forward_key_tile(client, d, dv);
    let threads = rows / (16 * mt) * PLANE;
    let cubes = batch * t.div_ceil(rows);
    let nv = vector_width(&[q, k, v], d, dv, threads);
    // Without a tensor of its own, the statistics' binding is the output's
    // (never read or written then).
    macro_rules! forward {
        ($O:ty) => {
            unsafe {
                attention_tc_kernel::launch_unchecked::<F, $O, R>(
                    client,
                    grid_1d(cubes, 1),
                    CubeDim::new_1d(threads as u32),
                    nv,
                    q.arg::<R>(),
                    k.arg::<R>(),
                    v.arg::<R>(),
                    out.arg::<R>(),
                    lse.unwrap_or(out).arg::<R>(),
                    scale,
                    f32::NEG_INFINITY,
                    causal,
                    d,
                    dv,
                    mode,
                    nv,
                    rows,
                    mt,
                    kt,
                );
            }
        };
    }
    // An appended log-sum-exp makes the whole row f32 (the statistics'
    // dtype), output included.
    with_half!(elem, F => match mode {
        Lse::Appended => forward!(f32),
        _ => forward!(F),
    });
    true
}

/// `dq` on tensor cores, with the layout of
/// `attention_backward::launch_attention_dq`: the operands and `out`
/// stored as `elem`, `lse` and `delta` as f32. Returns `false`, launching
/// nothing, where the kernel does not serve the device, storage or head
/// dims.
pub fn try_launch_dq<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    x: &GradOperands,
    out: &View,
    causal: bool,
    scale: f32,
) -> bool {
    launch_backward(client, elem, x, out, None, causal, scale, false)
}

/// `dk` and `dv` together on tensor cores (`KeyGrads::KV`, what autodiff
/// emits), with the layout of `attention_backward::launch_attention_dkv`:
/// `out` dense `(batch…, S, d + dv)`, each row dk's then dv's columns.
/// Storage as for [`try_launch_dq`]. Returns `false`, launching nothing,
/// where the kernel does not serve the device, storage or head dims.
pub fn try_launch_dkv<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    x: &GradOperands,
    out: &View,
    causal: bool,
    scale: f32,
) -> bool {
    launch_backward(client, elem, x, out, None, causal, scale, true)
}

/// `dk‖dv` as [`try_launch_dkv`] and, from the same pass, `dq` added into
/// `dq_sum` (f32, `(batch…, T, d)`, zeroed by the caller) with atomic
/// adds: each key block adds its `ds·k` for every query tile it sees, so
/// the `dq` kernel's recomputation of `s` and `dp` (two of the backward's
/// seven products per tile pair) is not needed. The order of the adds
/// depends on scheduling: the sum is not bit-reproducible from run to run.
/// Returns `false`, launching nothing, where the kernel does not serve the
/// device, storage or head dims, or its cubes hold more keys than a query
/// tile has rows.
pub fn try_launch_grads<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    x: &GradOperands,
    dq_sum: &View,
    out: &View,
    causal: bool,
    scale: f32,
) -> bool {
    let r = out.shape.len();
    let (d, dv) = (x.q.shape[r - 1], x.v.shape[r - 1]);
    serves_grads(client, elem, d, dv)
        && launch_backward(client, elem, x, out, Some(dq_sum), causal, scale, true)
}

/// Whether [`try_launch_grads`] runs on `client`'s device for heads of `d`
/// and `dv` dims stored as `elem` (so that its caller zeroes a sum only
/// where one is used).
pub fn serves_grads<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    d: usize,
    dv: usize,
) -> bool {
    usable(client, elem, d, dv, true) && cube_rows(d, dv, true) == TC_TILE
}

/// The `dq` kernel, or (`keys`) the `dk‖dv` one: one cube per block of
/// [`cube_rows`] rows of `out` (query rows, or key rows).
#[allow(clippy::too_many_arguments)]
fn launch_backward<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    x: &GradOperands,
    out: &View,
    dq_sum: Option<&View>,
    causal: bool,
    scale: f32,
    keys: bool,
) -> bool {
    let r = out.shape.len();
    let (d, dv, len) = (x.q.shape[r - 1], x.v.shape[r - 1], out.shape[r - 2]);
    if !usable(client, elem, d, dv, true) {
        return false;
    }
    let batch: usize = out.shape[..r - 2].iter().product();
    if batch * len == 0 {
        return true;
    }
    let rows = cube_rows(d, dv, true);
    let threads = rows / 16 * PLANE;
    let nv = vector_width(&[x.q, x.k, x.v, x.dout], d, dv, threads);
    let (grid, block) = (
        grid_1d(batch * len.div_ceil(rows), 1),
        CubeDim::new_1d(threads as u32),
    );
    macro_rules! backward {
        ($kernel:ident, $F:ty) => {
            unsafe {
                $kernel::launch_unchecked::<$F, $F, R>(
                    client,
                    grid,
                    block,
                    nv,
                    x.q.arg::<R>(),
                    x.k.arg::<R>(),
                    x.v.arg::<R>(),
                    x.dout.arg::<R>(),
                    x.lse.arg::<R>(),
                    x.delta.arg::<R>(),
                    out.arg::<R>(),
                    scale,
                    causal,
                    d,
                    dv,
                    nv,
                    rows,
                )
            }
        };
    }
    // Without a sum of its own, `dq`'s binding is the output's (never
    // written then).
    let with_dq = dq_sum.is_some();
    let dq = dq_sum.unwrap_or(out);
    with_half!(elem, F => if keys {
        unsafe {
            attention_dkv_tc_kernel::launch_unchecked::<F, F, R>(
                client,
                grid,
                block,
                nv,
                x.q.arg::<R>(),
                x.k.arg::<R>(),
                x.v.arg::<R>(),
                x.dout.arg::<R>(),
                x.lse.arg::<R>(),
                x.delta.arg::<R>(),
                out.arg::<R>(),
                dq.arg::<R>(),
                scale,
                causal,
                d,
                dv,
                nv,
                rows,
                with_dq,
            )
        }
    } else {
        backward!(attention_dq_tc_kernel, F)
    });
    true
}
