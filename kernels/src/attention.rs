//! Fused attention, `softmax(mask(q·kᵀ·scale))·v`, flash-style: keys are
//! visited in tiles of `ATTN_BLOCK` with an online softmax (running max `m`,
//! running sum `l`, rescaled accumulator), so no `T × S` matrix is ever
//! written to global memory.
//!
//! Layout: q `(batch…, T, d)`, k `(batch…, S, d)`, v `(batch…, S, dv)` as
//! strided views broadcast to the output's batch axes (stride 0 where an
//! operand broadcasts, e.g. GQA's shared key/value heads), out dense
//! `(batch…, T, dv)`, or `(batch…, T, dv + 1)` with each row's log-sum-exp
//! `m + ln l` appended (`attention_with_lse`: a training graph's forward,
//! whose backward needs the statistic), or `(batch…, T, 1)`, the
//! log-sum-exp alone (`attention_lse`, which skips the values). One cube
//! per block of `ATTN_QUERIES` query rows (held in shared memory): each
//! tile of keys, then of values, is staged in shared memory by the whole
//! cube (consecutive units read consecutive elements; rows at an odd
//! stride, free of bank conflicts); thread `u`
//! scores key `tile·B + u` against every query of the block, the block's
//! weights go through shared memory, and each thread accumulates output
//! columns `u, u + B, …` of `p · v` for every query. Each key and value
//! element is read once per block of queries.
//!
//! Every operand is stored as the launch's `elem` and computed in `f32`:
//! elements are widened as they are staged or read, and the staged tiles in
//! shared memory, the scores, running statistics and accumulators are
//! `f32`. Attention's output is stored as `elem` too, each value rounded
//! once as it is stored; the two modes with the log-sum-exp write `f32`
//! whatever `elem` is (the IR's statistics dtype, `f32` for f16/bf16 q;
//! the device holds no f64), the output part of `attention_with_lse`
//! included, unrounded. Both instantiations share one body
//! (`attention_rows`), generic over the output's type.
//!
//! Where it stops: scalar FMAs, no tensor cores; causal blocks skip key
//! tiles past their last query but not the masked part of the diagonal
//! tile; wider heads than the device's shared memory holds a tile of
//! (about 180 dims with 48 KiB) read keys and values from global memory.

use crate::{grid_1d, linear_cube, with_float, FloatElem, View};
use cubecl::prelude::*;

/// Where the forward writes each query row's log-sum-exp `m + ln l`.
#[derive(CubeType, Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Lse {
    /// Nowhere: attention alone.
    Without,
    /// After the row's values, in an `f32` output `(batch…, T, dv + 1)`.
    Appended,
    /// In a tensor of its own, `f32` `(batch…, T, 1)`; the output is stored
    /// as the operands are.
    Apart,
    /// The log-sum-exp alone, the values skipped: `(batch…, T, 1)`, `f32`.
    Alone,
}

/// Batches of a `(batch…, rows, cols)` tensor: the product of its leading
/// axes.
#[cube]
pub(crate) fn batches<T: CubePrimitive>(t: &Tensor<T>) -> usize {
    let mut n = 1;
    for a in 0..t.rank() - 2 {
        n *= t.shape(a);
    }
    n
}

/// Keys per tile, also the cube size.
pub const ATTN_BLOCK: usize = 64;
/// Query rows per cube: each key and value read from global memory serves
/// this many queries.
pub const ATTN_QUERIES: usize = 8;

/// The forward kernel: operands stored as `F`, the output as `O` (`F`
/// for attention alone or with its log-sum-exp apart, `f32` where the
/// log-sum-exp is appended to each row or stands alone), the log-sum-exp
/// in `stats` where it goes apart (`stats` is otherwise unused: the
/// launch binds any buffer there).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn attention_kernel<F: Float + CubeElement, O: Float + CubeElement>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    out: &mut Tensor<O>,
    stats: &mut Tensor<f32>,
    scale: f32,
    neg_inf: f32,
    #[comptime] causal: bool,
    #[comptime] d: usize,
    #[comptime] dv: usize,
    #[comptime] staged: bool,
    #[comptime] lse: Lse,
) {
    let rank = out.rank();
    let t = out.shape(rank - 2);
    let s_len = k.shape(rank - 2);
    let q_blocks = t.div_ceil(ATTN_QUERIES);
    let cube = linear_cube(); // (batch, query block) flattened
    let batch = cube / q_blocks;
    if batch >= batches(out) {
        terminate!();
    }
    let lse_only = comptime!(lse == Lse::Alone);
    let first = (cube % q_blocks) * ATTN_QUERIES; // first query row of the block
    let mut rem = batch;
    let mut qo = 0;
    let mut ko = 0;
    let mut vo = 0;
    let mut oo = 0;
    let mut so = 0;
    for x in 0..rank - 2 {
        let a = rank - 3 - x;
        let c = rem % out.shape(a);
        rem /= out.shape(a);
        qo += c * q.stride(a);
        ko += c * k.stride(a);
        vo += c * v.stride(a);
        oo += c * out.stride(a);
        if comptime!(lse == Lse::Apart) {
            so += c * stats.stride(a);
        }
    }
    let (q_t, q_d) = (q.stride(rank - 2), q.stride(rank - 1));
    let (k_s, k_d) = (k.stride(rank - 2), k.stride(rank - 1));
    let (v_s, v_d) = (v.stride(rank - 2), v.stride(rank - 1));

    let u = UNIT_POS as usize;
    let mut q_sh = SharedMemory::<f32>::new(ATTN_QUERIES * d); // (Q, d)
    let mut p_sh = SharedMemory::<f32>::new(ATTN_QUERIES * ATTN_BLOCK); // (Q, B)
                                                                        // A tile of keys, then of values: (B, stride), odd stride so that
                                                                        // units reading different rows never share a bank.
    let stride = comptime!(if d > dv { d + 1 } else { dv + 1 });
    let mut kv_sh = SharedMemory::<f32>::new(comptime!(if staged {
        ATTN_BLOCK * if d > dv { d + 1 } else { dv + 1 }
    } else {
        1
    }));
    let mut j = u;
    while j < ATTN_QUERIES * d {
        let (qi, x) = (j / d, j % d);
        let mut val = f32::new(0.0);
        if first + qi < t {
            val = f32::cast_from(q[qo + (first + qi) * q_t + x * q_d]);
        }
        q_sh[j] = val;
        j += ATTN_BLOCK;
    }
    sync_cube();

    // Keys visible to query `first + qi`: all, or up to its absolute
    // position; rows past T see none (and are not written).
    let mut limits = Array::<usize>::new(ATTN_QUERIES);
    let mut max_limit = 0;
    #[unroll]
    for qi in 0..ATTN_QUERIES {
        let i = first + qi;
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
        limits[qi] = limit;
        if limit > max_limit {
            max_limit = limit;
        }
    }
    let cols = comptime!(dv.div_ceil(ATTN_BLOCK));
    let mut acc = Array::<f32>::new(ATTN_QUERIES * cols); // (Q, cols): columns u + c·B
    #[unroll]
    for c in 0..ATTN_QUERIES * cols {
        acc[c] = f32::new(0.0);
    }
    let mut m = Array::<f32>::new(ATTN_QUERIES); // running max per query
    let mut l = Array::<f32>::new(ATTN_QUERIES); // running sum per query
    let mut sc = Array::<f32>::new(ATTN_QUERIES); // this thread's key's scores
    let mut corr = Array::<f32>::new(ATTN_QUERIES);
    #[unroll]
    for qi in 0..ATTN_QUERIES {
        m[qi] = neg_inf;
        l[qi] = f32::new(0.0);
    }
    let n_tiles = max_limit.div_ceil(ATTN_BLOCK);
    for tile in 0..n_tiles {
        let start = tile * ATTN_BLOCK;
        // Stage the keys: consecutive units read consecutive elements.
        if staged {
            let mut idx = u;
            while idx < ATTN_BLOCK * d {
                let (kk, x) = (idx / d, idx % d);
                let mut val = f32::new(0.0);
                if start + kk < s_len {
                    val = f32::cast_from(k[ko + (start + kk) * k_s + x * k_d]);
                }
                kv_sh[kk * stride + x] = val;
                idx += ATTN_BLOCK;
            }
            sync_cube();
        }
        let key = start + u;
        #[unroll]
        for qi in 0..ATTN_QUERIES {
            sc[qi] = f32::new(0.0);
        }
        if key < s_len {
            for x in 0..d {
                let kv = if staged {
                    kv_sh[u * stride + x]
                } else {
                    f32::cast_from(k[ko + key * k_s + x * k_d])
                };
                #[unroll]
                for qi in 0..ATTN_QUERIES {
                    sc[qi] += q_sh[qi * d + x] * kv;
                }
            }
        }
        #[unroll]
        for qi in 0..ATTN_QUERIES {
            let mut s = neg_inf;
            if key < limits[qi] {
                s = sc[qi] * scale;
            }
            sc[qi] = s;
            p_sh[qi * ATTN_BLOCK + u] = s;
        }
        sync_cube();
        #[unroll]
        for qi in 0..ATTN_QUERIES {
            let mut tile_max = neg_inf;
            for x in 0..ATTN_BLOCK {
                tile_max = tile_max.max(p_sh[qi * ATTN_BLOCK + x]);
            }
            let m_new = m[qi].max(tile_max);
            corr[qi] = (m[qi] - m_new).exp();
            m[qi] = m_new;
        }
        sync_cube();
        #[unroll]
        for qi in 0..ATTN_QUERIES {
            p_sh[qi * ATTN_BLOCK + u] = (sc[qi] - m[qi]).exp();
        }
        let mut n_keys = max_limit - start;
        if n_keys > ATTN_BLOCK {
            n_keys = ATTN_BLOCK;
        }
        // Stage the values (every unit is past the scores: the sync above).
        if staged && !lse_only {
            let mut idx = u;
            while idx < ATTN_BLOCK * dv {
                let (kk, x) = (idx / dv, idx % dv);
                let mut val = f32::new(0.0);
                if kk < n_keys {
                    val = f32::cast_from(v[vo + (start + kk) * v_s + x * v_d]);
                }
                kv_sh[kk * stride + x] = val;
                idx += ATTN_BLOCK;
            }
        }
        sync_cube();
        #[unroll]
        for qi in 0..ATTN_QUERIES {
            let mut psum = f32::new(0.0);
            for x in 0..n_keys {
                psum += p_sh[qi * ATTN_BLOCK + x];
            }
            l[qi] = l[qi] * corr[qi] + psum;
        }
        #[unroll]
        for c in 0..cols {
            let col = c * ATTN_BLOCK + u;
            if col < dv && !lse_only {
                #[unroll]
                for qi in 0..ATTN_QUERIES {
                    acc[qi * cols + c] *= corr[qi];
                }
                for x in 0..n_keys {
                    let vv = if staged {
                        kv_sh[x * stride + col]
                    } else {
                        f32::cast_from(v[vo + (start + x) * v_s + col * v_d])
                    };
                    #[unroll]
                    for qi in 0..ATTN_QUERIES {
                        acc[qi * cols + c] += p_sh[qi * ATTN_BLOCK + x] * vv;
                    }
                }
            }
        }
        sync_cube();
    }
    let (o_t, o_d) = (out.stride(rank - 2), out.stride(rank - 1));
    #[unroll]
    for qi in 0..ATTN_QUERIES {
        let i = first + qi;
        if i < t {
            let row = oo + i * o_t;
            if u == 0 {
                let x = m[qi] + l[qi].ln();
                match lse {
                    Lse::Without => {}
                    Lse::Apart => {
                        stats[so + i * stats.stride(rank - 2)] = x;
                    }
                    // After the row's dv values.
                    Lse::Appended => {
                        out[row + dv * o_d] = O::cast_from(x);
                    }
                    Lse::Alone => {
                        out[row] = O::cast_from(x);
                    }
                }
            }
            if !lse_only {
                #[unroll]
                for c in 0..cols {
                    let col = c * ATTN_BLOCK + u;
                    if col < dv {
                        out[row + col * o_d] = O::cast_from(acc[qi * cols + c] / l[qi]);
                    }
                }
            }
        }
    }
}

/// Attention over views already broadcast to the output's batch axes:
/// q `(batch…, T, d)`, k `(batch…, S, d)`, v `(batch…, S, dv)`; `out`
/// `(batch…, T, dv)`, any strides (a consumer's permuted layout); all
/// stored as `elem`.
#[allow(clippy::too_many_arguments)]
pub fn launch_attention<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    q: &View,
    k: &View,
    v: &View,
    out: &View,
    causal: bool,
    scale: f32,
) {
    launch(
        client,
        elem,
        q,
        k,
        Some(v),
        out,
        None,
        Lse::Without,
        causal,
        scale,
    );
}

/// Attention and the log-sum-exp of its scores from one pass
/// (`AttentionWithLse`), as [`launch_attention`]. Without `lse`, `out` is
/// `(batch…, T, dv + 1)` stored as `f32` whatever `elem` is, each row the
/// output (unrounded) followed by its log-sum-exp: the op's own layout.
/// With `lse` (`f32`, `(batch…, T, 1)`), the two parts go apart: `out`
/// `(batch…, T, dv)` is stored as `elem` (each value rounded once, as a
/// cast of the op's output to the operands' dtype would), the log-sum-exp
/// in `lse`; the executor does this where the op's readers are the two
/// slices that take it apart (`reuse-attention-lse`'s form).
#[allow(clippy::too_many_arguments)]
pub fn launch_attention_with_lse<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    q: &View,
    k: &View,
    v: &View,
    out: &View,
    lse: Option<&View>,
    causal: bool,
    scale: f32,
) {
    let mode = if lse.is_some() {
        Lse::Apart
    } else {
        Lse::Appended
    };
    launch(client, elem, q, k, Some(v), out, lse, mode, causal, scale);
}

/// The log-sum-exp of attention's masked, scaled scores per query row
/// (`AttentionLse`): the forward kernel without the values. q
/// `(batch…, T, d)` and k `(batch…, S, d)`, stored as `elem`, broadcast to
/// the output's batch axes; `out` `(batch…, T, 1)`, stored as `f32`
/// whatever `elem` is.
pub fn launch_attention_lse<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    q: &View,
    k: &View,
    out: &View,
    causal: bool,
    scale: f32,
) {
    launch(
        client,
        elem,
        q,
        k,
        None,
        out,
        None,
        Lse::Alone,
        causal,
        scale,
    );
}

/// The forward kernel over `v`, or in its log-sum-exp mode without one;
/// `lse` is the log-sum-exp's own tensor in mode `Apart`.
#[allow(clippy::too_many_arguments)]
fn launch<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    q: &View,
    k: &View,
    v: Option<&View>,
    out: &View,
    lse: Option<&View>,
    mode: Lse,
    causal: bool,
    scale: f32,
) {
    debug_assert_eq!(lse.is_some(), mode == Lse::Apart);
    let r = out.shape.len();
    let d = q.shape[r - 1];
    let dv = v.map_or(1, |v| v.shape[r - 1]);
    let t = out.shape[r - 2];
    let batch: usize = out.shape[..r - 2].iter().product();
    if batch * t == 0 || dv == 0 {
        return;
    }
    if let Some(v) = v {
        let tc = crate::attention_tc::try_launch_forward;
        if tc(client, elem, q, k, v, out, lse, mode, causal, scale) {
            return;
        }
    }
    let cubes = batch * t.div_ceil(ATTN_QUERIES);
    // Stage K and V tiles when they fit the device's shared memory (`f32`
    // whatever the storage).
    let stride = d.max(dv) + 1;
    let shared = 4 * (ATTN_BLOCK * stride + ATTN_QUERIES * (d + ATTN_BLOCK));
    let staged = shared <= client.properties().hardware.max_shared_memory_size;
    let (grid, block) = (grid_1d(cubes, 1), CubeDim::new_1d(ATTN_BLOCK as u32));
    // Without a tensor of its own, the statistics' binding is the output's
    // (never read or written then).
    let (q, k, v, o, stats) = unsafe {
        (
            q.arg::<R>(),
            k.arg::<R>(),
            v.unwrap_or(k).arg::<R>(),
            out.arg::<R>(),
            lse.unwrap_or(out).arg::<R>(),
        )
    };
    let d = d.max(1);
    let neg_inf = f32::NEG_INFINITY;
    macro_rules! forward {
        ($F:ty, $O:ty) => {
            unsafe {
                attention_kernel::launch_unchecked::<$F, $O, R>(
                    client, grid, block, q, k, v, o, stats, scale, neg_inf, causal, d, dv, staged,
                    mode,
                )
            }
        };
    }
    with_float!(elem, F => match mode {
        // The output as the operands are stored.
        Lse::Without | Lse::Apart => forward!(F, F),
        Lse::Appended | Lse::Alone => forward!(F, f32),
    });
}
