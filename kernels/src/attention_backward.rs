//! The backward of fused attention, flash-style: the probabilities are
//! recomputed tile by tile from each query row's log-sum-exp
//! (`attention_lse`), `p = exp(q·kᵀ·scale − lse)`, so no `T × S` matrix is
//! ever written to global memory. With `delta = Σ dout·out` per query row
//! and `ds = p·(dout·vᵀ − delta)·scale`:
//!
//! - `dq = ds·k`: [`launch_attention_dq`], one cube per block of
//!   `GRAD_ROWS` query rows (their q and dout rows in shared memory); thread
//!   `u` recomputes the scores of key `tile·B + u` against the block's rows,
//!   the block's `ds` goes through shared memory, and each thread
//!   accumulates columns `u, u + B, …` of `ds·k`.
//! - `dk = dsᵀ·q` and `dv = pᵀ·dout`: [`launch_attention_dkv`], the
//!   transpose: one cube per block of `GRAD_ROWS` keys (their k and v rows in
//!   shared memory), thread `u` owning query `tile·B + u`; a causal block
//!   starts at the first query that sees its first key. It writes both from
//!   one pass (`attention_grad{kv}`, what autodiff emits: each tile's `p` and
//!   dout rows serve `dv` and then `ds`, as in FlashAttention-2's backward)
//!   or either alone (`wrt = k` or `v`, still valid IR, though the two
//!   together recompute the scores twice).
//!
//! Tiles of k and v (or of q and dout) are staged in shared memory by the
//! whole cube when they fit, as in the forward kernel. `dq` stays its own
//! kernel (its cubes own query rows, the others' own keys), so the backward
//! computes the scores twice (three times with `attention_lse`), where
//! FlashAttention-2 computes them once and accumulates `dq` with atomics.
//!
//! Layout: every operand a strided view broadcast to the result's batch
//! axes (GQA's shared key/value heads have stride 0 there; summing their
//! gradients over the query groups is the caller's reduction); the result
//! is dense. q, k, v, dout and the result are stored as the launch's
//! `elem`, lse and delta as `f32` whatever `elem` is (the IR's statistics
//! dtype, `f32` for f16/bf16 q: the subtraction `dout·vᵀ − delta` would
//! amplify their rounding); everything is computed in `f32` (shared
//! memory, scores, accumulators), the result rounded once as it is stored.

use crate::{grid_1d, linear_cube, with_float, FloatElem, View};
use cubecl::prelude::*;

/// Threads per cube: keys per tile for `dq`, queries per tile for `dk`/`dv`.
pub const GRAD_BLOCK: usize = 64;
/// Rows per cube: query rows for `dq`, key rows for `dk`/`dv`.
pub const GRAD_ROWS: usize = 8;

/// The element offset in `t` of batch index `batch`, flattened over the
/// leading axes of `out` (to whose batch axes `t` is broadcast).
#[cube]
pub(crate) fn batch_offset<T: CubePrimitive, F: CubePrimitive>(
    t: &Tensor<T>,
    out: &Tensor<F>,
    batch: usize,
) -> usize {
    let rank = out.rank();
    let mut rem = batch;
    let mut offset = 0;
    for x in 0..rank - 2 {
        let a = rank - 3 - x;
        let c = rem % out.shape(a);
        rem /= out.shape(a);
        offset += c * t.stride(a);
    }
    offset
}

/// Copies rows `start..start + rows` of `src`'s matrix at `base` (its last
/// two axes, `w` columns) into `dst` at row stride `stride`, by the whole
/// cube of `GRAD_BLOCK` units; rows at `len` or past it become zeros.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_rows<F: Float>(
    dst: &mut SharedMemory<f32>,
    src: &Tensor<F>,
    base: usize,
    start: usize,
    len: usize,
    #[comptime] rows: usize,
    #[comptime] w: usize,
    #[comptime] stride: usize,
) {
    let rank = src.rank();
    let (rs, cs) = (src.stride(rank - 2), src.stride(rank - 1));
    let mut idx = UNIT_POS as usize;
    while idx < rows * w {
        let (r, x) = (idx / w, idx % w);
        let mut val = f32::new(0.0);
        if start + r < len {
            val = f32::cast_from(src[base + (start + r) * rs + x * cs]);
        }
        dst[r * stride + x] = val;
        idx += GRAD_BLOCK;
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn attention_dq_kernel<F: Float + CubeElement>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    dout: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    out: &mut Tensor<F>,
    scale: f32,
    #[comptime] causal: bool,
    #[comptime] d: usize,
    #[comptime] dv: usize,
    #[comptime] staged: bool,
) {
    let rank = out.rank();
    let t = out.shape(rank - 2);
    let s_len = k.shape(rank - 2);
    let blocks = t.div_ceil(GRAD_ROWS);
    let cube = linear_cube(); // (batch, query block) flattened
    let batch = cube / blocks;
    if batch * t * d >= out.len() {
        terminate!();
    }
    let first = (cube % blocks) * GRAD_ROWS;
    let qo = batch_offset::<F, F>(q, out, batch);
    let ko = batch_offset::<F, F>(k, out, batch);
    let vo = batch_offset::<F, F>(v, out, batch);
    let go = batch_offset::<F, F>(dout, out, batch);
    let lo = batch_offset::<f32, F>(lse, out, batch);
    let eo = batch_offset::<f32, F>(delta, out, batch);
    let (k_s, k_d) = (k.stride(rank - 2), k.stride(rank - 1));
    let (v_s, v_d) = (v.stride(rank - 2), v.stride(rank - 1));
    let (l_t, e_t) = (lse.stride(rank - 2), delta.stride(rank - 2));

    let u = UNIT_POS as usize;
    let mut q_sh = SharedMemory::<f32>::new(GRAD_ROWS * d);
    let mut g_sh = SharedMemory::<f32>::new(GRAD_ROWS * dv);
    let mut ds_sh = SharedMemory::<f32>::new(GRAD_ROWS * GRAD_BLOCK);
    let stride = comptime!(if d > dv { d + 1 } else { dv + 1 });
    let mut kv_sh = SharedMemory::<f32>::new(comptime!(if staged {
        GRAD_BLOCK * if d > dv { d + 1 } else { dv + 1 }
    } else {
        1
    }));
    stage_rows::<F>(&mut q_sh, q, qo, first, t, GRAD_ROWS, d, d);
    stage_rows::<F>(&mut g_sh, dout, go, first, t, GRAD_ROWS, dv, dv);

    let mut limits = Array::<usize>::new(GRAD_ROWS);
    let mut row_lse = Array::<f32>::new(GRAD_ROWS);
    let mut row_delta = Array::<f32>::new(GRAD_ROWS);
    let mut max_limit = 0;
    #[unroll]
    for qi in 0..GRAD_ROWS {
        let i = first + qi;
        let mut limit = 0;
        row_lse[qi] = f32::new(0.0);
        row_delta[qi] = f32::new(0.0);
        if i < t {
            row_lse[qi] = lse[lo + i * l_t];
            row_delta[qi] = delta[eo + i * e_t];
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
        limits[qi] = limit;
        if limit > max_limit {
            max_limit = limit;
        }
    }
    sync_cube();

    let cols = comptime!(d.div_ceil(GRAD_BLOCK));
    let mut acc = Array::<f32>::new(GRAD_ROWS * cols);
    #[unroll]
    for c in 0..GRAD_ROWS * cols {
        acc[c] = f32::new(0.0);
    }
    let mut sc = Array::<f32>::new(GRAD_ROWS);
    let mut dp = Array::<f32>::new(GRAD_ROWS);
    let n_tiles = max_limit.div_ceil(GRAD_BLOCK);
    for tile in 0..n_tiles {
        let start = tile * GRAD_BLOCK;
        let key = start + u;
        // Scores of this thread's key against the block's rows.
        if staged {
            stage_rows::<F>(&mut kv_sh, k, ko, start, s_len, GRAD_BLOCK, d, stride);
            sync_cube();
        }
        #[unroll]
        for qi in 0..GRAD_ROWS {
            sc[qi] = f32::new(0.0);
            dp[qi] = f32::new(0.0);
        }
        if key < s_len {
            for x in 0..d {
                let kv = if staged {
                    kv_sh[u * stride + x]
                } else {
                    f32::cast_from(k[ko + key * k_s + x * k_d])
                };
                #[unroll]
                for qi in 0..GRAD_ROWS {
                    sc[qi] += q_sh[qi * d + x] * kv;
                }
            }
        }
        // dp = dout·vᵀ for the same key.
        if staged {
            sync_cube();
            stage_rows::<F>(&mut kv_sh, v, vo, start, s_len, GRAD_BLOCK, dv, stride);
            sync_cube();
        }
        if key < s_len {
            for x in 0..dv {
                let vv = if staged {
                    kv_sh[u * stride + x]
                } else {
                    f32::cast_from(v[vo + key * v_s + x * v_d])
                };
                #[unroll]
                for qi in 0..GRAD_ROWS {
                    dp[qi] += g_sh[qi * dv + x] * vv;
                }
            }
        }
        #[unroll]
        for qi in 0..GRAD_ROWS {
            let mut ds = f32::new(0.0);
            if key < limits[qi] {
                let p = (sc[qi] * scale - row_lse[qi]).exp();
                ds = p * (dp[qi] - row_delta[qi]) * scale;
            }
            ds_sh[qi * GRAD_BLOCK + u] = ds;
        }
        // The keys again, for ds·k.
        if staged {
            sync_cube();
            stage_rows::<F>(&mut kv_sh, k, ko, start, s_len, GRAD_BLOCK, d, stride);
        }
        sync_cube();
        let mut n_keys = max_limit - start;
        if n_keys > GRAD_BLOCK {
            n_keys = GRAD_BLOCK;
        }
        #[unroll]
        for c in 0..cols {
            let col = c * GRAD_BLOCK + u;
            if col < d {
                for x in 0..n_keys {
                    let kk = if staged {
                        kv_sh[x * stride + col]
                    } else {
                        f32::cast_from(k[ko + (start + x) * k_s + col * k_d])
                    };
                    #[unroll]
                    for qi in 0..GRAD_ROWS {
                        acc[qi * cols + c] += ds_sh[qi * GRAD_BLOCK + x] * kk;
                    }
                }
            }
        }
        sync_cube();
    }
    #[unroll]
    for qi in 0..GRAD_ROWS {
        let i = first + qi;
        if i < t {
            #[unroll]
            for c in 0..cols {
                let col = c * GRAD_BLOCK + u;
                if col < d {
                    out[(batch * t + i) * d + col] = F::cast_from(acc[qi * cols + c]);
                }
            }
        }
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn attention_dkv_kernel<F: Float + CubeElement>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    dout: &Tensor<F>,
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    out: &mut Tensor<F>,
    scale: f32,
    #[comptime] causal: bool,
    #[comptime] d: usize,
    #[comptime] dv: usize,
    #[comptime] staged: bool,
    #[comptime] with_k: bool,
    #[comptime] with_v: bool,
) {
    let rank = out.rank();
    let t = q.shape(rank - 2);
    let s_len = out.shape(rank - 2);
    // A result row is dk's columns (with_k), then dv's (with_v).
    let k_width = comptime!(if with_k { d } else { 0 });
    let width = comptime!(k_width + if with_v { dv } else { 0 });
    let blocks = s_len.div_ceil(GRAD_ROWS);
    let cube = linear_cube(); // (batch, key block) flattened
    let batch = cube / blocks;
    if batch * s_len * width >= out.len() {
        terminate!();
    }
    let first = (cube % blocks) * GRAD_ROWS;
    let qo = batch_offset::<F, F>(q, out, batch);
    let ko = batch_offset::<F, F>(k, out, batch);
    let vo = batch_offset::<F, F>(v, out, batch);
    let go = batch_offset::<F, F>(dout, out, batch);
    let lo = batch_offset::<f32, F>(lse, out, batch);
    let eo = batch_offset::<f32, F>(delta, out, batch);
    let (q_t, q_d) = (q.stride(rank - 2), q.stride(rank - 1));
    let (g_t, g_d) = (dout.stride(rank - 2), dout.stride(rank - 1));
    let (l_t, e_t) = (lse.stride(rank - 2), delta.stride(rank - 2));

    let u = UNIT_POS as usize;
    let mut k_sh = SharedMemory::<f32>::new(GRAD_ROWS * d);
    let mut v_sh = SharedMemory::<f32>::new(GRAD_ROWS * dv);
    let mut p_sh = SharedMemory::<f32>::new(GRAD_ROWS * GRAD_BLOCK);
    let stride = comptime!(if d > dv { d + 1 } else { dv + 1 });
    let mut tile_sh = SharedMemory::<f32>::new(comptime!(if staged {
        GRAD_BLOCK * if d > dv { d + 1 } else { dv + 1 }
    } else {
        1
    }));
    stage_rows::<F>(&mut k_sh, k, ko, first, s_len, GRAD_ROWS, d, d);
    stage_rows::<F>(&mut v_sh, v, vo, first, s_len, GRAD_ROWS, dv, dv);
    sync_cube();

    // Query i (at absolute position S − T + i) sees key j when j ≤ S − T + i:
    // the block's first key is first seen by query first − (S − T).
    let mut q_start = 0;
    if causal && first + t > s_len {
        q_start = first + t - s_len;
    }
    let cols_k = comptime!(d.div_ceil(GRAD_BLOCK));
    let cols_v = comptime!(dv.div_ceil(GRAD_BLOCK));
    let mut acc_k = Array::<f32>::new(GRAD_ROWS * cols_k);
    let mut acc_v = Array::<f32>::new(GRAD_ROWS * cols_v);
    if with_k {
        #[unroll]
        for c in 0..GRAD_ROWS * cols_k {
            acc_k[c] = f32::new(0.0);
        }
    }
    if with_v {
        #[unroll]
        for c in 0..GRAD_ROWS * cols_v {
            acc_v[c] = f32::new(0.0);
        }
    }
    let mut pr = Array::<f32>::new(GRAD_ROWS);
    let n_tiles = t.div_ceil(GRAD_BLOCK);
    for tile in q_start / GRAD_BLOCK..n_tiles {
        let start = tile * GRAD_BLOCK;
        let i = start + u;
        let mut n_rows = t - start;
        if n_rows > GRAD_BLOCK {
            n_rows = GRAD_BLOCK;
        }
        let mut row_lse = f32::new(0.0);
        let mut row_delta = f32::new(0.0);
        if i < t {
            row_lse = lse[lo + i * l_t];
            row_delta = delta[eo + i * e_t];
        }
        // Scores of this thread's query against the block's keys.
        if staged {
            stage_rows::<F>(&mut tile_sh, q, qo, start, t, GRAD_BLOCK, d, stride);
            sync_cube();
        }
        #[unroll]
        for kj in 0..GRAD_ROWS {
            pr[kj] = f32::new(0.0);
        }
        if i < t {
            for x in 0..d {
                let qv = if staged {
                    tile_sh[u * stride + x]
                } else {
                    f32::cast_from(q[qo + i * q_t + x * q_d])
                };
                #[unroll]
                for kj in 0..GRAD_ROWS {
                    pr[kj] += qv * k_sh[kj * d + x];
                }
            }
        }
        #[unroll]
        for kj in 0..GRAD_ROWS {
            let key = first + kj;
            let mut visible = i < t && key < s_len;
            if causal {
                visible = visible && key + t <= i + s_len;
            }
            let mut p = f32::new(0.0);
            if visible {
                p = (pr[kj] * scale - row_lse).exp();
            }
            pr[kj] = p;
        }
        if staged {
            // Everyone is done with the query tile: dout's rows replace it.
            sync_cube();
            stage_rows::<F>(&mut tile_sh, dout, go, start, t, GRAD_BLOCK, dv, stride);
        }
        if with_v {
            #[unroll]
            for kj in 0..GRAD_ROWS {
                p_sh[kj * GRAD_BLOCK + u] = pr[kj];
            }
        }
        sync_cube();
        if with_v {
            // dv += pᵀ·dout
            #[unroll]
            for c in 0..cols_v {
                let col = c * GRAD_BLOCK + u;
                if col < dv {
                    for x in 0..n_rows {
                        let g = if staged {
                            tile_sh[x * stride + col]
                        } else {
                            f32::cast_from(dout[go + (start + x) * g_t + col * g_d])
                        };
                        #[unroll]
                        for kj in 0..GRAD_ROWS {
                            acc_v[kj * cols_v + c] += p_sh[kj * GRAD_BLOCK + x] * g;
                        }
                    }
                }
            }
        }
        if with_k {
            // ds = p·(dout·vᵀ − delta)·scale from the same p and dout's
            // tile, then dk += dsᵀ·q.
            let mut dp = Array::<f32>::new(GRAD_ROWS);
            #[unroll]
            for kj in 0..GRAD_ROWS {
                dp[kj] = f32::new(0.0);
            }
            if i < t {
                for x in 0..dv {
                    let g = if staged {
                        tile_sh[u * stride + x]
                    } else {
                        f32::cast_from(dout[go + i * g_t + x * g_d])
                    };
                    #[unroll]
                    for kj in 0..GRAD_ROWS {
                        dp[kj] += g * v_sh[kj * dv + x];
                    }
                }
            }
            // Everyone is done with p and dout's tile: ds and the query
            // rows replace them.
            sync_cube();
            #[unroll]
            for kj in 0..GRAD_ROWS {
                p_sh[kj * GRAD_BLOCK + u] = pr[kj] * (dp[kj] - row_delta) * scale;
            }
            if staged {
                stage_rows::<F>(&mut tile_sh, q, qo, start, t, GRAD_BLOCK, d, stride);
            }
            sync_cube();
            #[unroll]
            for c in 0..cols_k {
                let col = c * GRAD_BLOCK + u;
                if col < d {
                    for x in 0..n_rows {
                        let qv = if staged {
                            tile_sh[x * stride + col]
                        } else {
                            f32::cast_from(q[qo + (start + x) * q_t + col * q_d])
                        };
                        #[unroll]
                        for kj in 0..GRAD_ROWS {
                            acc_k[kj * cols_k + c] += p_sh[kj * GRAD_BLOCK + x] * qv;
                        }
                    }
                }
            }
        }
        sync_cube();
    }
    #[unroll]
    for kj in 0..GRAD_ROWS {
        let key = first + kj;
        if key < s_len {
            let row = (batch * s_len + key) * width;
            if with_k {
                #[unroll]
                for c in 0..cols_k {
                    let col = c * GRAD_BLOCK + u;
                    if col < d {
                        out[row + col] = F::cast_from(acc_k[kj * cols_k + c]);
                    }
                }
            }
            if with_v {
                #[unroll]
                for c in 0..cols_v {
                    let col = c * GRAD_BLOCK + u;
                    if col < dv {
                        out[row + k_width + col] = F::cast_from(acc_v[kj * cols_v + c]);
                    }
                }
            }
        }
    }
}

/// The operands of one attention gradient, every view broadcast to the
/// result's batch axes: q `(batch…, T, d)`, k `(batch…, S, d)`, v
/// `(batch…, S, dv)`, dout `(batch…, T, dv)`, all stored as the launch's
/// `elem`; lse and delta `(batch…, T, 1)`, stored as `f32`.
pub struct GradOperands<'a> {
    pub q: &'a View,
    pub k: &'a View,
    pub v: &'a View,
    pub dout: &'a View,
    pub lse: &'a View,
    pub delta: &'a View,
}

impl GradOperands<'_> {
    fn dims(&self) -> (usize, usize, usize, usize, usize) {
        let r = self.q.shape.len();
        let batch: usize = self.q.shape[..r - 2].iter().product();
        (
            batch,
            self.q.shape[r - 2],
            self.k.shape[r - 2],
            self.q.shape[r - 1],
            self.v.shape[r - 1],
        )
    }

    /// Whether a tile of `GRAD_BLOCK` rows fits the device's shared memory
    /// next to the cube's own rows (`f32` whatever the storage).
    fn staged<R: Runtime>(&self, client: &ComputeClient<R>) -> bool {
        let (_, _, _, d, dv) = self.dims();
        let shared =
            4 * (GRAD_BLOCK * (d.max(dv) + 1) + GRAD_ROWS * (d + dv) + GRAD_ROWS * GRAD_BLOCK);
        shared <= client.properties().hardware.max_shared_memory_size
    }
}

/// `dq = ds·k` into `out`, dense `(batch…, T, d)`; `out` and the operands
/// but lse and delta (`f32`) are stored as `elem`.
pub fn launch_attention_dq<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    x: &GradOperands,
    out: &View,
    causal: bool,
    scale: f32,
) {
    let (batch, t, _, d, dv) = x.dims();
    if batch * t * d == 0 {
        return;
    }
    if crate::attention_tc::try_launch_dq(client, elem, x, out, causal, scale) {
        return;
    }
    let cubes = batch * t.div_ceil(GRAD_ROWS);
    with_float!(elem, F => unsafe {
        attention_dq_kernel::launch_unchecked::<F, R>(
            client,
            grid_1d(cubes, 1),
            CubeDim::new_1d(GRAD_BLOCK as u32),
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
            dv.max(1),
            x.staged(client),
        );
    });
}

/// `dq` into `dq_out` (as [`launch_attention_dq`]) and `dk‖dv` into
/// `dkv_out` (as [`launch_attention_dkv`] with [`KeyGrads::KV`]). With
/// `atomic_dq`, on tensor cores, the key-major kernel adds each tile's
/// `ds·k` into an f32 sum with atomic adds
/// (`attention_tc::try_launch_grads`), which is then rounded into
/// `dq_out`: five products per tile pair instead of seven, but the sum's
/// order depends on scheduling (not bit-reproducible run to run), and on
/// an H100 it measured slower than the two kernels (NOTES, fifteenth
/// session), so the executor asks for it only under `CARAMBA_ATOMIC_DQ=1`.
/// Otherwise, and where the tensor-core kernels do not run, the two
/// kernels.
#[allow(clippy::too_many_arguments)]
pub fn launch_attention_grads<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    x: &GradOperands,
    dq_out: &View,
    dkv_out: &View,
    causal: bool,
    scale: f32,
    atomic_dq: bool,
) {
    let (batch, t, s, d, dv) = x.dims();
    if atomic_dq && batch * t * s * d > 0 && crate::attention_tc::serves_grads(client, elem, d, dv)
    {
        let n = batch * t * d;
        let sum = client.empty(n * FloatElem::F32.size());
        crate::elementwise::launch_fill_float(client, FloatElem::F32, &sum, n, 0.0);
        let sum = View::contiguous(sum, &dq_out.shape);
        let tc = crate::attention_tc::try_launch_grads;
        if tc(client, elem, x, &sum, dkv_out, causal, scale) {
            let (from, to) = (
                crate::Storage::Float(FloatElem::F32),
                crate::Storage::Float(elem),
            );
            crate::cast::launch_convert_view(client, from, to, &sum, dq_out);
            return;
        }
    }
    launch_attention_dq(client, elem, x, dq_out, causal, scale);
    launch_attention_dkv(client, elem, x, dkv_out, causal, scale, KeyGrads::KV);
}

/// Which gradients of the keys' side [`launch_attention_dkv`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyGrads {
    /// `dk = dsᵀ·q`, dense `(batch…, S, d)`.
    K,
    /// `dv = pᵀ·dout`, dense `(batch…, S, dv)`.
    V,
    /// Both from one pass over the scores, each row dk's then dv's
    /// columns: dense `(batch…, S, d + dv)`.
    KV,
}

/// `dk`, `dv` or both (`grads`) into `out`; `out` and the operands but lse
/// and delta (`f32`) are stored as `elem`.
#[allow(clippy::too_many_arguments)]
pub fn launch_attention_dkv<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    x: &GradOperands,
    out: &View,
    causal: bool,
    scale: f32,
    grads: KeyGrads,
) {
    let (batch, _, s, d, dv) = x.dims();
    let (with_k, with_v) = (grads != KeyGrads::V, grads != KeyGrads::K);
    let width = if with_k { d } else { 0 } + if with_v { dv } else { 0 };
    if batch * s * width == 0 {
        return;
    }
    if grads == KeyGrads::KV
        && crate::attention_tc::try_launch_dkv(client, elem, x, out, causal, scale)
    {
        return;
    }
    let cubes = batch * s.div_ceil(GRAD_ROWS);
    with_float!(elem, F => unsafe {
        attention_dkv_kernel::launch_unchecked::<F, R>(
            client,
            grid_1d(cubes, 1),
            CubeDim::new_1d(GRAD_BLOCK as u32),
            x.q.arg::<R>(),
            x.k.arg::<R>(),
            x.v.arg::<R>(),
            x.dout.arg::<R>(),
            x.lse.arg::<R>(),
            x.delta.arg::<R>(),
            out.arg::<R>(),
            scale,
            causal,
            d.max(1),
            dv.max(1),
            x.staged(client),
            with_k,
            with_v,
        );
    });
}
