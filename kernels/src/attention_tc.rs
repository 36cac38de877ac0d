//! Flash attention on tensor cores: the forward ([`try_launch_forward`]) and
//! the backward's two kernels ([`try_launch_dq`], [`try_launch_dkv`]) for
//! half-precision storage, with the same semantics as the scalar kernels
//! of `attention` and `attention_backward` (the CPU reference's `attention`,
//! `attention_with_lse` and `attention_grad`), computed with CubeCL's
//! cooperative matrix products (`cmma`, CUDA's `wmma`: 16 × 16 × 16 tiles,
//! half operands, f32 accumulators).
//!
//! A cube is `TC_PLANES` planes of 32 units; each plane owns 16 rows of the
//! cube's block of `TC_BLOCK` rows (query rows for the forward and `dq`,
//! key rows for `dk`/`dv`) and visits the other side in tiles of
//! `TC_BLOCK` rows staged in shared memory by the whole cube. Per tile a
//! plane forms its 16 × 64 block of scores with tensor-core products, stores
//! it to its own f32 scratch in shared memory, and its units (two per row,
//! each taking every other column) apply the mask and the softmax, or the
//! gradient's `p·(dp − delta)·scale`, in f32. The results that feed the next
//! product (the probabilities `p`, the score gradient `ds`) are rounded to
//! the storage type, as FlashAttention-2 does; everything else (scores,
//! running statistics, accumulators) stays f32, and every result is
//! rounded once as it is stored.
//!
//! - forward: the output accumulator lives in the units' registers (row `r`,
//!   columns `2j + h`), rescaled by the online softmax's correction once
//!   per tile; each tile's `p·v` is a fresh tensor-core product that goes
//!   through the scratch.
//! - `dq = ds·k`: the cube owns query rows; `dq` stays in `cmma`
//!   accumulators across key tiles (no rescaling in the backward).
//! - `dk = dsᵀ·q`, `dv = pᵀ·dout`: the cube owns key rows and computes the
//!   transposed blocks `sᵀ = k·qᵀ` and `dpᵀ = v·doutᵀ` directly, so both
//!   products read their left operand row-major from shared memory.
//!
//! Head dims are padded to a multiple of 16 with zeros in shared memory
//! (zero columns add nothing to a score and produce columns nobody
//! stores), so DBA's 12-dim heads run here too. Where it stops: CUDA with
//! 32-unit planes and `wmma` for the storage type (the `try_launch_*`
//! functions return `false` otherwise and the caller runs the scalar
//! kernel); head dims up to [`TC_MAX_DIM`]; loads from global memory are
//! synchronous (16-byte vectors where the rows allow, but no `cp.async`,
//! no double buffering); the tiles' masked part on the causal diagonal is
//! computed and discarded.

use crate::attention_backward::{batch_offset, GradOperands};
use crate::{grid_1d, linear_cube, FloatElem, View};
use cubecl::cmma;
use cubecl::prelude::*;

/// Rows per cube, and rows per tile of the other side.
pub const TC_BLOCK: usize = 64;
/// Planes per cube, each owning 16 of the cube's rows.
pub const TC_PLANES: usize = TC_BLOCK / 16;
/// Units per plane the kernels are written for.
const PLANE: usize = 32;
/// The widest head (query/key or value dims) the kernels take: registers
/// hold the forward's output row halves and the backward's accumulators.
pub const TC_MAX_DIM: usize = 128;

/// `x` rounded up to a multiple of 16 (the product's tile edge).
const fn pad16(x: usize) -> usize {
    x.div_ceil(16) * 16
}

/// Row stride (elements) of a half-precision tile `w` wide in shared
/// memory: padded to 16, plus 8 so that consecutive rows start in
/// different banks (a multiple of 8, as `wmma` loads need).
const fn half_stride(w: usize) -> usize {
    pad16(w) + 8
}

/// Row stride of the `TC_BLOCK`-wide half-precision `p`/`ds` tiles.
const P_STRIDE: usize = TC_BLOCK + 8;

/// Row stride of the f32 scratch: wide enough for a block of scores and
/// for a product's result `w` columns wide (a multiple of 4, as `wmma`
/// stores need).
const fn scratch_stride(w: usize) -> usize {
    let w = pad16(w);
    (if w > TC_BLOCK { w } else { TC_BLOCK }) + 4
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

/// Copies rows `start..start + TC_BLOCK` of `src`'s matrix at `base` (its
/// last two axes, `w` columns) into `dst` (row stride `stride`), by the
/// whole cube; rows at `len` or past it and the columns `w..wp` of padding
/// become zeros. `src` is read in vectors of `nv` elements (`nv` > 1 only
/// where the launch found its rows contiguous, aligned and a multiple of
/// `nv` wide). Where the padded width in vectors divides the cube, each
/// unit keeps one vector column and steps through rows, its loads
/// unrolled so that they are all in flight at once.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage<F: Float, N: Size>(
    dst: &mut SharedMemory<F>,
    src: &Tensor<Vector<F, N>>,
    base: usize,
    start: usize,
    len: usize,
    #[comptime] w: usize,
    #[comptime] stride: usize,
    #[comptime] nv: usize,
) {
    let wp = comptime!(pad16(w));
    let wv = comptime!(pad16(w) / nv); // vectors per padded row
    let threads = comptime!(TC_PLANES * PLANE);
    let rank = src.rank();
    let (rs, cs) = (src.stride(rank - 2), src.stride(rank - 1));
    let u = UNIT_POS as usize;
    if comptime!(threads % wv == 0) {
        let step = comptime!(threads / wv); // rows per pass of the cube
        let (r0, x) = (u / wv, (u % wv) * nv);
        let mut at = base + (start + r0) * rs + x * cs;
        #[unroll]
        for n in 0..comptime!(TC_BLOCK / (threads / wv)) {
            let r = r0 + n * step;
            if start + r < len && x < w {
                let vec = src[at / nv];
                #[unroll]
                for i in 0..nv {
                    dst[r * stride + x + i] = vec[i];
                }
            } else {
                #[unroll]
                for i in 0..nv {
                    dst[r * stride + x + i] = F::from_int(0);
                }
            }
            at += step * rs;
        }
    } else {
        // Scalar (the launch gives nv = 1 here).
        let mut idx = u;
        while idx < comptime!(TC_BLOCK * wp) {
            let (r, x) = (idx / wp, idx % wp);
            let mut val = F::from_int(0);
            if start + r < len && x < w {
                val = src[base + (start + r) * rs + x * cs][0];
            }
            dst[r * stride + x] = val;
            idx += threads;
        }
    }
}

/// Copies `TC_BLOCK` entries of a `(…, rows, 1)` statistic (`lse` or
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
    if u < TC_BLOCK {
        let mut val = f32::new(0.0);
        if start + u < len {
            val = src[base + (start + u) * src.stride(src.rank() - 2)];
        }
        dst[u] = val;
    }
}

/// An uninitialized 16 × 16 × 16 fragment of `ident`'s role, `layout`.
#[cube]
fn fragment<C: CubePrimitive>(
    #[comptime] ident: cmma::MatrixIdent,
    #[comptime] layout: cmma::MatrixLayout,
) -> cmma::Matrix<C> {
    unsafe { cmma::Matrix::<C>::uninitialized(ident, 16usize, 16usize, 16usize, layout) }
}

/// The `kd / 16` row-major A fragments of the 16 × `kd` tile at `a_off`
/// of `a_sh` (row stride `as_`): a plane's rows, loaded once and kept in
/// registers for every tile of the other side.
#[cube]
fn a_fragments<F: Float>(
    a_sh: &SharedMemory<F>,
    a_off: usize,
    #[comptime] kd: usize,
    #[comptime] as_: usize,
) -> Sequence<cmma::Matrix<F>> {
    let mut frags = Sequence::<cmma::Matrix<F>>::new();
    #[unroll]
    for x in 0..kd / 16 {
        frags.push(cmma::Matrix::<F>::from_slice(
            cmma::MatrixIdent::A,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::RowMajor,
            &a_sh.slice(a_off + x * 16, a_off + 16 * as_),
            as_ as u32,
        ));
    }
    frags
}

/// This plane's 16 × `TC_BLOCK` block `a·bᵀ` into the f32 scratch `dst`
/// at `dst_off` (row stride `ds`): `a` is the plane's 16 rows as
/// fragments (`a_fragments`), `b` the `TC_BLOCK` rows of `b_sh` (row
/// stride `bs`), both `kd` wide (a multiple of 16).
#[cube]
#[allow(clippy::too_many_arguments)]
fn product_abt<F: Float>(
    a: &Sequence<cmma::Matrix<F>>,
    b_sh: &SharedMemory<F>,
    dst: &mut SharedMemory<f32>,
    dst_off: usize,
    #[comptime] kd: usize,
    #[comptime] bs: usize,
    #[comptime] ds: usize,
) {
    // bᵀ's (x, n) element is b's row n, column x: column-major with b's
    // row stride.
    let bt = fragment::<F>(cmma::MatrixIdent::B, cmma::MatrixLayout::ColMajor);
    let acc = fragment::<f32>(
        cmma::MatrixIdent::Accumulator,
        cmma::MatrixLayout::Undefined,
    );
    #[unroll]
    for j in 0..TC_BLOCK / 16 {
        cmma::fill(&acc, f32::new(0.0));
        #[unroll]
        for x in 0..kd / 16 {
            let b_off = j * 16 * bs + x * 16;
            cmma::load(&bt, &b_sh.slice(b_off, b_off + 16 * bs), bs as u32);
            cmma::execute::<F, F, f32, f32>(a.index(x), &bt, &acc, &acc);
        }
        let d_off = dst_off + j * 16;
        cmma::store(
            &mut dst.slice_mut(d_off, d_off + 16 * ds),
            &acc,
            ds as u32,
            cmma::MatrixLayout::RowMajor,
        );
    }
}

/// `accs[c] += a·b[:, 16c..16c + 16]` for every column tile `c` of `b`:
/// `a` is this plane's 16 × `TC_BLOCK` half tile at `a_off` of `a_sh` (row
/// stride `P_STRIDE`), `b` the `TC_BLOCK` rows of `b_sh` (row stride `bs`,
/// `16·n` columns).
#[cube]
fn product_ab_acc<F: Float>(
    accs: &Sequence<cmma::Matrix<f32>>,
    a_sh: &SharedMemory<F>,
    a_off: usize,
    b_sh: &SharedMemory<F>,
    #[comptime] n: usize,
    #[comptime] bs: usize,
) {
    let a = fragment::<F>(cmma::MatrixIdent::A, cmma::MatrixLayout::RowMajor);
    let b = fragment::<F>(cmma::MatrixIdent::B, cmma::MatrixLayout::RowMajor);
    #[unroll]
    for x in 0..TC_BLOCK / 16 {
        cmma::load(
            &a,
            &a_sh.slice(a_off + x * 16, a_off + 16 * P_STRIDE),
            P_STRIDE as u32,
        );
        #[unroll]
        for c in 0..n {
            let b_off = x * 16 * bs + c * 16;
            cmma::load(&b, &b_sh.slice(b_off, b_off + 16 * bs), bs as u32);
            cmma::execute::<F, F, f32, f32>(&a, &b, accs.index(c), accs.index(c));
        }
    }
}

/// `n` f32 accumulators of 16 × 16, zeroed.
#[cube]
fn zeroed_accumulators(#[comptime] n: usize) -> Sequence<cmma::Matrix<f32>> {
    let mut accs = Sequence::<cmma::Matrix<f32>>::new();
    #[unroll]
    for _ in 0..n {
        accs.push(cmma::Matrix::<f32>::from_value(
            cmma::MatrixIdent::Accumulator,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::Undefined,
            f32::new(0.0),
        ));
    }
    accs
}

/// Stores this plane's accumulators (16 rows, `16·n` columns) to
/// the scratch at `dst_off` (row stride `ds`).
#[cube]
fn store_accumulators(
    accs: &Sequence<cmma::Matrix<f32>>,
    dst: &mut SharedMemory<f32>,
    dst_off: usize,
    #[comptime] n: usize,
    #[comptime] ds: usize,
) {
    #[unroll]
    for c in 0..n {
        let off = dst_off + c * 16;
        cmma::store(
            &mut dst.slice_mut(off, off + 16 * ds),
            accs.index(c),
            ds as u32,
            cmma::MatrixLayout::RowMajor,
        );
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn attention_tc_kernel<F: Float + CubeElement, O: Float + CubeElement, N: Size>(
    q: &Tensor<Vector<F, N>>,
    k: &Tensor<Vector<F, N>>,
    v: &Tensor<Vector<F, N>>,
    out: &mut Tensor<O>,
    scale: f32,
    neg_inf: f32,
    #[comptime] causal: bool,
    #[comptime] d: usize,
    #[comptime] dv: usize,
    #[comptime] with_lse: bool,
    #[comptime] nv: usize,
) {
    let dp = comptime!(pad16(d));
    let dvp = comptime!(pad16(dv));
    let hs = comptime!(half_stride(d));
    let vs = comptime!(half_stride(dv));
    let ss = comptime!(scratch_stride(dv));
    let width = comptime!(if with_lse { dv + 1 } else { dv });
    let rank = out.rank();
    let t = out.shape(rank - 2);
    let s_len = k.shape(rank - 2);
    let blocks = t.div_ceil(TC_BLOCK);
    let cube = linear_cube(); // (batch, query block) flattened
    let batch = cube / blocks;
    if batch * t * width >= out.len() {
        terminate!();
    }
    let first = (cube % blocks) * TC_BLOCK;
    let qo = batch_offset::<Vector<F, N>, O>(q, out, batch);
    let ko = batch_offset::<Vector<F, N>, O>(k, out, batch);
    let vo = batch_offset::<Vector<F, N>, O>(v, out, batch);

    let lane = UNIT_POS_PLANE as usize;
    let prow = (UNIT_POS as usize / PLANE) * 16; // the plane's first row
    let (row, par) = (lane / 2, lane % 2); // this unit's row, column parity
    let i = first + prow + row;
    let limit = key_limit(i, t, s_len, causal);
    let mut last = first + TC_BLOCK;
    if last > t {
        last = t;
    }
    let max_limit = key_limit(last - 1, t, s_len, causal);

    let mut q_sh = SharedMemory::<F>::new_aligned(comptime!(TC_BLOCK * hs), 32usize);
    let mut k_sh = SharedMemory::<F>::new_aligned(comptime!(TC_BLOCK * hs), 32usize);
    let mut v_sh = SharedMemory::<F>::new_aligned(comptime!(TC_BLOCK * vs), 32usize);
    let mut p_sh = SharedMemory::<F>::new_aligned(comptime!(TC_BLOCK * P_STRIDE), 32usize);
    let mut s_sh = SharedMemory::<f32>::new_aligned(comptime!(TC_BLOCK * ss), 32usize);
    stage::<F, N>(&mut q_sh, q, qo, first, t, d, hs, nv);
    sync_cube();
    let qa = a_fragments::<F>(&q_sh, prow * hs, dp, hs);

    let pv_acc = zeroed_accumulators(comptime!(dvp / 16));
    let mut o = Array::<f32>::new(comptime!(dvp / 2)); // columns 2j + half
    #[unroll]
    for j in 0..dvp / 2 {
        o[j] = f32::new(0.0);
    }
    let mut sv = Array::<f32>::new(comptime!(TC_BLOCK / 2));
    let mut m = neg_inf;
    let mut l = f32::new(0.0);
    let srow = (prow + row) * ss;
    let n_tiles = max_limit.div_ceil(TC_BLOCK);
    for tile in 0..n_tiles {
        let start = tile * TC_BLOCK;
        stage::<F, N>(&mut k_sh, k, ko, start, s_len, d, hs, nv);
        stage::<F, N>(&mut v_sh, v, vo, start, s_len, dv, vs, nv);
        sync_cube();
        product_abt::<F>(&qa, &k_sh, &mut s_sh, prow * ss, dp, hs, ss);
        sync_plane();
        // The online softmax over this tile, two units per row.
        let mut tile_max = neg_inf;
        #[unroll]
        for j in 0..TC_BLOCK / 2 {
            let c = 2 * j + par;
            let mut s = neg_inf;
            if start + c < limit {
                s = s_sh[srow + c] * scale;
            }
            sv[j] = s;
            tile_max = tile_max.max(s);
        }
        tile_max = tile_max.max(plane_shuffle_xor(tile_max, 1u32));
        let m_new = m.max(tile_max);
        let mut corr = f32::new(1.0);
        if m_new > neg_inf {
            corr = (m - m_new).exp();
        }
        let mut psum = f32::new(0.0);
        #[unroll]
        for j in 0..TC_BLOCK / 2 {
            let c = 2 * j + par;
            let mut p = f32::new(0.0);
            if start + c < limit {
                p = (sv[j] - m_new).exp();
            }
            psum += p;
            p_sh[(prow + row) * P_STRIDE + c] = F::cast_from(p);
        }
        psum += plane_shuffle_xor(psum, 1u32);
        l = l * corr + psum;
        m = m_new;
        sync_plane();
        // This tile's p·v (each p fragment serves every column tile),
        // through the scratch.
        #[unroll]
        for c in 0..dvp / 16 {
            cmma::fill(pv_acc.index(c), f32::new(0.0));
        }
        product_ab_acc::<F>(
            &pv_acc,
            &p_sh,
            prow * P_STRIDE,
            &v_sh,
            comptime!(dvp / 16),
            vs,
        );
        store_accumulators(&pv_acc, &mut s_sh, prow * ss, comptime!(dvp / 16), ss);
        sync_plane();
        #[unroll]
        for j in 0..dvp / 2 {
            o[j] = o[j] * corr + s_sh[srow + 2 * j + par];
        }
        // Every plane is done with this tile's values before the next
        // tile's staging overwrites them.
        sync_cube();
    }
    if i < t {
        let orow = (batch * t + i) * width;
        if with_lse && par == 0 {
            out[orow + width - 1] = O::cast_from(m + l.ln());
        }
        #[unroll]
        for j in 0..dvp / 2 {
            let c = 2 * j + par;
            if c < dv {
                out[orow + c] = O::cast_from(o[j] / l);
            }
        }
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
) {
    let dp = comptime!(pad16(d));
    let dvp = comptime!(pad16(dv));
    let hs = comptime!(half_stride(d));
    let vs = comptime!(half_stride(dv));
    let ss = comptime!(scratch_stride(d));
    let rank = out.rank();
    let t = out.shape(rank - 2);
    let s_len = k.shape(rank - 2);
    let blocks = t.div_ceil(TC_BLOCK);
    let cube = linear_cube(); // (batch, query block) flattened
    let batch = cube / blocks;
    if batch * t * d >= out.len() {
        terminate!();
    }
    let first = (cube % blocks) * TC_BLOCK;
    let qo = batch_offset::<Vector<F, N>, O>(q, out, batch);
    let ko = batch_offset::<Vector<F, N>, O>(k, out, batch);
    let vo = batch_offset::<Vector<F, N>, O>(v, out, batch);
    let go = batch_offset::<Vector<F, N>, O>(dout, out, batch);
    let lo = batch_offset::<f32, O>(lse, out, batch);
    let eo = batch_offset::<f32, O>(delta, out, batch);

    let lane = UNIT_POS_PLANE as usize;
    let prow = (UNIT_POS as usize / PLANE) * 16;
    let (row, par) = (lane / 2, lane % 2);
    let i = first + prow + row;
    let limit = key_limit(i, t, s_len, causal);
    let mut last = first + TC_BLOCK;
    if last > t {
        last = t;
    }
    let max_limit = key_limit(last - 1, t, s_len, causal);
    let mut row_lse = f32::new(0.0);
    let mut row_delta = f32::new(0.0);
    if i < t {
        row_lse = lse[lo + i * lse.stride(rank - 2)];
        row_delta = delta[eo + i * delta.stride(rank - 2)];
    }

    let mut q_sh = SharedMemory::<F>::new_aligned(comptime!(TC_BLOCK * hs), 32usize);
    let mut g_sh = SharedMemory::<F>::new_aligned(comptime!(TC_BLOCK * vs), 32usize);
    let mut k_sh = SharedMemory::<F>::new_aligned(comptime!(TC_BLOCK * hs), 32usize);
    let mut v_sh = SharedMemory::<F>::new_aligned(comptime!(TC_BLOCK * vs), 32usize);
    let mut ds_sh = SharedMemory::<F>::new_aligned(comptime!(TC_BLOCK * P_STRIDE), 32usize);
    let mut s_sh = SharedMemory::<f32>::new_aligned(comptime!(TC_BLOCK * ss), 32usize);
    let mut dp_sh = SharedMemory::<f32>::new_aligned(comptime!(TC_BLOCK * ss), 32usize);
    stage::<F, N>(&mut q_sh, q, qo, first, t, d, hs, nv);
    stage::<F, N>(&mut g_sh, dout, go, first, t, dv, vs, nv);
    sync_cube();
    let qa = a_fragments::<F>(&q_sh, prow * hs, dp, hs);
    let ga = a_fragments::<F>(&g_sh, prow * vs, dvp, vs);

    let accs = zeroed_accumulators(comptime!(dp / 16));
    let srow = (prow + row) * ss;
    let n_tiles = max_limit.div_ceil(TC_BLOCK);
    for tile in 0..n_tiles {
        let start = tile * TC_BLOCK;
        stage::<F, N>(&mut k_sh, k, ko, start, s_len, d, hs, nv);
        stage::<F, N>(&mut v_sh, v, vo, start, s_len, dv, vs, nv);
        sync_cube();
        product_abt::<F>(&qa, &k_sh, &mut s_sh, prow * ss, dp, hs, ss);
        product_abt::<F>(&ga, &v_sh, &mut dp_sh, prow * ss, dvp, vs, ss);
        sync_plane();
        #[unroll]
        for j in 0..TC_BLOCK / 2 {
            let c = 2 * j + par;
            let mut ds = f32::new(0.0);
            if start + c < limit {
                let p = (s_sh[srow + c] * scale - row_lse).exp();
                ds = p * (dp_sh[srow + c] - row_delta) * scale;
            }
            ds_sh[(prow + row) * P_STRIDE + c] = F::cast_from(ds);
        }
        sync_plane();
        product_ab_acc::<F>(
            &accs,
            &ds_sh,
            prow * P_STRIDE,
            &k_sh,
            comptime!(dp / 16),
            hs,
        );
        sync_cube();
    }
    store_accumulators(&accs, &mut s_sh, prow * ss, comptime!(dp / 16), ss);
    sync_cube();
    if i < t {
        let orow = (batch * t + i) * d;
        #[unroll]
        for j in 0..dp / 2 {
            let c = 2 * j + par;
            if c < d {
                out[orow + c] = O::cast_from(s_sh[srow + c]);
            }
        }
    }
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
    scale: f32,
    #[comptime] causal: bool,
    #[comptime] d: usize,
    #[comptime] dv: usize,
    #[comptime] nv: usize,
) {
    let dp = comptime!(pad16(d));
    let dvp = comptime!(pad16(dv));
    let hs = comptime!(half_stride(d));
    let vs = comptime!(half_stride(dv));
    let ss = comptime!(scratch_stride(if d > dv { d } else { dv }));
    let rank = out.rank();
    let t = q.shape(rank - 2);
    let s_len = out.shape(rank - 2);
    let blocks = s_len.div_ceil(TC_BLOCK);
    let cube = linear_cube(); // (batch, key block) flattened
    let batch = cube / blocks;
    if batch * s_len * (d + dv) >= out.len() {
        terminate!();
    }
    let first = (cube % blocks) * TC_BLOCK; // first key of the block
    let qo = batch_offset::<Vector<F, N>, O>(q, out, batch);
    let ko = batch_offset::<Vector<F, N>, O>(k, out, batch);
    let vo = batch_offset::<Vector<F, N>, O>(v, out, batch);
    let go = batch_offset::<Vector<F, N>, O>(dout, out, batch);
    let lo = batch_offset::<f32, O>(lse, out, batch);
    let eo = batch_offset::<f32, O>(delta, out, batch);

    let lane = UNIT_POS_PLANE as usize;
    let prow = (UNIT_POS as usize / PLANE) * 16;
    let (row, par) = (lane / 2, lane % 2);
    let key = first + prow + row; // this unit's key

    let mut k_sh = SharedMemory::<F>::new_aligned(comptime!(TC_BLOCK * hs), 32usize);
    let mut v_sh = SharedMemory::<F>::new_aligned(comptime!(TC_BLOCK * vs), 32usize);
    let mut q_sh = SharedMemory::<F>::new_aligned(comptime!(TC_BLOCK * hs), 32usize);
    let mut g_sh = SharedMemory::<F>::new_aligned(comptime!(TC_BLOCK * vs), 32usize);
    let mut p_sh = SharedMemory::<F>::new_aligned(comptime!(TC_BLOCK * P_STRIDE), 32usize);
    let mut ds_sh = SharedMemory::<F>::new_aligned(comptime!(TC_BLOCK * P_STRIDE), 32usize);
    let mut s_sh = SharedMemory::<f32>::new_aligned(comptime!(TC_BLOCK * ss), 32usize);
    let mut dp_sh = SharedMemory::<f32>::new_aligned(comptime!(TC_BLOCK * ss), 32usize);
    let mut lse_sh = SharedMemory::<f32>::new(TC_BLOCK);
    let mut delta_sh = SharedMemory::<f32>::new(TC_BLOCK);
    stage::<F, N>(&mut k_sh, k, ko, first, s_len, d, hs, nv);
    stage::<F, N>(&mut v_sh, v, vo, first, s_len, dv, vs, nv);
    sync_cube();
    let ka = a_fragments::<F>(&k_sh, prow * hs, dp, hs);
    let va = a_fragments::<F>(&v_sh, prow * vs, dvp, vs);

    let dk = zeroed_accumulators(comptime!(dp / 16));
    let dvs = zeroed_accumulators(comptime!(dvp / 16));
    // The first query that sees the block's first key.
    let mut q_first = 0;
    if causal && first + t > s_len {
        q_first = first + t - s_len;
    }
    let srow = (prow + row) * ss;
    let tile_first = q_first / TC_BLOCK;
    let n_tiles = t.div_ceil(TC_BLOCK);
    for tile in tile_first..n_tiles {
        let start = tile * TC_BLOCK;
        stage::<F, N>(&mut q_sh, q, qo, start, t, d, hs, nv);
        stage::<F, N>(&mut g_sh, dout, go, start, t, dv, vs, nv);
        stage_stat(&mut lse_sh, lse, lo, start, t);
        stage_stat(&mut delta_sh, delta, eo, start, t);
        sync_cube();
        // sᵀ = k·qᵀ and dpᵀ = v·doutᵀ: this plane's 16 keys × the tile's queries.
        product_abt::<F>(&ka, &q_sh, &mut s_sh, prow * ss, dp, hs, ss);
        product_abt::<F>(&va, &g_sh, &mut dp_sh, prow * ss, dvp, vs, ss);
        sync_plane();
        #[unroll]
        for j in 0..TC_BLOCK / 2 {
            let c = 2 * j + par;
            let qi = start + c;
            let mut visible = qi < t && key < s_len;
            if causal {
                visible = visible && key + t <= qi + s_len;
            }
            let mut p = f32::new(0.0);
            let mut ds = f32::new(0.0);
            if visible {
                p = (s_sh[srow + c] * scale - lse_sh[c]).exp();
                ds = p * (dp_sh[srow + c] - delta_sh[c]) * scale;
            }
            p_sh[(prow + row) * P_STRIDE + c] = F::cast_from(p);
            ds_sh[(prow + row) * P_STRIDE + c] = F::cast_from(ds);
        }
        sync_plane();
        product_ab_acc::<F>(&dvs, &p_sh, prow * P_STRIDE, &g_sh, comptime!(dvp / 16), vs);
        product_ab_acc::<F>(&dk, &ds_sh, prow * P_STRIDE, &q_sh, comptime!(dp / 16), hs);
        sync_cube();
    }
    // dk's columns, then dv's, through the scratch.
    let orow = (batch * s_len + key) * (d + dv);
    store_accumulators(&dk, &mut s_sh, prow * ss, comptime!(dp / 16), ss);
    store_accumulators(&dvs, &mut dp_sh, prow * ss, comptime!(dvp / 16), ss);
    sync_cube();
    if key < s_len {
        #[unroll]
        for j in 0..dp / 2 {
            let c = 2 * j + par;
            if c < d {
                out[orow + c] = O::cast_from(s_sh[srow + c]);
            }
        }
        #[unroll]
        for j in 0..dvp / 2 {
            let c = 2 * j + par;
            if c < dv {
                out[orow + d + c] = O::cast_from(dp_sh[srow + c]);
            }
        }
    }
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
/// keys) and `dv` (values) dims with half storage.
fn shared_bytes(d: usize, dv: usize, backward: bool) -> usize {
    let (hs, vs) = (half_stride(d), half_stride(dv));
    let tiles = 2 * TC_BLOCK * (hs + vs); // q and k tiles, v and dout (or v only)
    if !backward {
        let ss = scratch_stride(dv);
        2 * TC_BLOCK * (2 * hs + vs + P_STRIDE) + 4 * TC_BLOCK * ss
    } else {
        let ss = scratch_stride(d.max(dv));
        2 * tiles + 2 * 2 * TC_BLOCK * P_STRIDE + 2 * 4 * TC_BLOCK * ss + 2 * 4 * TC_BLOCK
    }
}

/// The widest vector (8, 4, 2 or 1 elements) the operands' rows can be
/// staged in: every view's rows contiguous (last stride 1) and every other
/// stride and the offset a multiple of it, the head dims `d` and `dv`
/// multiples of it, and each padded width, counted in vectors, a divisor
/// of the cube's units (the staging's fast path).
fn vector_width(views: &[&View], d: usize, dv: usize) -> usize {
    let threads = TC_PLANES * PLANE;
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

/// Whether the tensor-core kernels serve heads of `d` and `dv` dims stored
/// as `elem` on `client`'s device.
fn usable<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    d: usize,
    dv: usize,
    backward: bool,
) -> bool {
    use cubecl::ir::{ElemType, FloatKind, StorageType};
    let kind = match elem {
        FloatElem::F16 => FloatKind::F16,
        FloatElem::BF16 => FloatKind::BF16,
        FloatElem::F32 => return false,
    };
    let props = client.properties();
    let half_ty = StorageType::Scalar(ElemType::Float(kind));
    let f32_ty = StorageType::Scalar(ElemType::Float(FloatKind::F32));
    let mma = cubecl::ir::features::MmaConfig {
        a_type: half_ty,
        b_type: half_ty,
        cd_type: f32_ty,
        m: 16,
        n: 16,
        k: 16,
    };
    props.features.matmul.cmma.contains(&mma)
        && props.hardware.plane_size_min == PLANE as u32
        && props.hardware.plane_size_max == PLANE as u32
        && (1..=TC_MAX_DIM).contains(&d)
        && (1..=TC_MAX_DIM).contains(&dv)
        && shared_bytes(d, dv, backward) <= props.hardware.max_shared_memory_size
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

/// Attention (`with_lse`: and each row's log-sum-exp appended) on tensor
/// cores, with the layout of `attention::launch_attention` (q, k, v views
/// broadcast to the output's batch axes, stored as `elem`; `out` dense,
/// stored as `elem`, or as f32 with the log-sum-exp, as the statistics
/// are). Returns `false`, launching nothing, where the kernel does not
/// serve the device, storage or head dims.
#[allow(clippy::too_many_arguments)]
pub fn try_launch_forward<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    q: &View,
    k: &View,
    v: &View,
    out: &View,
    causal: bool,
    scale: f32,
    with_lse: bool,
) -> bool {
    let r = out.shape.len();
    let (d, dv, t) = (q.shape[r - 1], v.shape[r - 1], out.shape[r - 2]);
    if !usable(client, elem, d, dv, false) {
        return false;
    }
    let batch: usize = out.shape[..r - 2].iter().product();
    if batch * t == 0 {
        return true;
    }
    let cubes = batch * t.div_ceil(TC_BLOCK);
    let nv = vector_width(&[q, k, v], d, dv);
    // The log-sum-exp's row is f32 (the statistics' dtype), output included.
    macro_rules! forward {
        ($O:ty) => {
            unsafe {
                attention_tc_kernel::launch_unchecked::<F, $O, R>(
                    client,
                    grid_1d(cubes, 1),
                    CubeDim::new_1d((TC_PLANES * PLANE) as u32),
                    nv,
                    q.arg::<R>(),
                    k.arg::<R>(),
                    v.arg::<R>(),
                    out.arg::<R>(),
                    scale,
                    f32::NEG_INFINITY,
                    causal,
                    d,
                    dv,
                    with_lse,
                    nv,
                );
            }
        };
    }
    with_half!(elem, F => if with_lse { forward!(f32) } else { forward!(F) });
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
    launch_backward(client, elem, x, out, causal, scale, false)
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
    launch_backward(client, elem, x, out, causal, scale, true)
}

/// The `dq` kernel, or (`keys`) the `dk‖dv` one: one cube per block of
/// `TC_BLOCK` rows of `out` (query rows, or key rows).
fn launch_backward<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    x: &GradOperands,
    out: &View,
    causal: bool,
    scale: f32,
    keys: bool,
) -> bool {
    let r = out.shape.len();
    let (d, dv, rows) = (x.q.shape[r - 1], x.v.shape[r - 1], out.shape[r - 2]);
    if !usable(client, elem, d, dv, true) {
        return false;
    }
    let batch: usize = out.shape[..r - 2].iter().product();
    if batch * rows == 0 {
        return true;
    }
    let nv = vector_width(&[x.q, x.k, x.v, x.dout], d, dv);
    let (grid, block) = (
        grid_1d(batch * rows.div_ceil(TC_BLOCK), 1),
        CubeDim::new_1d((TC_PLANES * PLANE) as u32),
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
                )
            }
        };
    }
    with_half!(elem, F => if keys {
        backward!(attention_dkv_tc_kernel, F)
    } else {
        backward!(attention_dq_tc_kernel, F)
    });
    true
}
