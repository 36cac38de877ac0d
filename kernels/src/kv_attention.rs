//! Attention over KV caches as stored (the `kv_attention` op): keys and
//! values are read from token-major caches `[B, S, heads·dim]` in fp32 or in
//! a quantized block format (`quant.rs`) and dequantized on chip; DBA's two
//! key paths are two caches whose per-head slices concatenate.
//!
//! Flash-decoding: the keys are cut into `splits` chunks, and one cube
//! handles a block of `KV_QUERIES` query rows of one (batch, kv head) — the
//! `g · T` rows sharing those keys (GQA reads each key once per block) —
//! over one chunk, with an online softmax. Each 64-key tile is dequantized
//! into shared memory by the whole cube with consecutive units reading
//! consecutive values (coalesced), scored by one unit per key, and the
//! values are read column-wise (coalesced) and dequantized as they are
//! accumulated. Each cube writes its unnormalized partial (running max,
//! running sum, accumulator); a second kernel combines the chunks. Many
//! chunks keep every SM busy when a decode step has only `g` query rows.
//!
//! Where it stops: f32 arithmetic (no tensor cores); a key tile of
//! `64 × Σdₖ` floats in shared memory limits the key dims per head to 192.

use crate::quant::{load_value, nf4_levels, row_words, BLOCK, FLOAT};
use crate::{grid_1d, linear_pos, ELEM_BLOCK};
use cubecl::prelude::*;
use cubecl::server::Handle;

/// Keys per tile, also the cube size.
pub const KV_TILE: usize = 64;
/// Query rows per cube.
pub const KV_QUERIES: usize = 8;
/// The largest key dims per head (the key tile lives in shared memory).
pub const KV_MAX_DK: usize = 192;

/// One cache operand: its handle, storage format and dims per head.
#[derive(Clone, Debug)]
pub struct CachePart {
    pub handle: Handle,
    pub format: u32,
    pub dim: usize,
}

/// The geometry of one call, in the op's terms.
#[derive(Clone, Copy, Debug)]
pub struct KvShape {
    pub batch: usize,
    pub heads: usize,
    /// Query heads per kv head.
    pub groups: usize,
    /// New positions (query rows per head).
    pub t: usize,
    /// Attended positions.
    pub s: usize,
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn kv_attention_kernel<F: Float + CubeElement>(
    q: &Array<F>,
    c0: &Array<i32>,
    c1: &Array<i32>,
    cv: &Array<i32>,
    m_out: &mut Array<F>,
    l_out: &mut Array<F>,
    acc_out: &mut Array<F>,
    heads: usize,
    rows: usize,
    t: usize,
    s_len: usize,
    chunk: usize,
    splits: usize,
    scale: F,
    neg_inf: F,
    #[comptime] causal: bool,
    #[comptime] f0: u32,
    #[comptime] d0: usize,
    #[comptime] f1: u32,
    #[comptime] d1: usize,
    #[comptime] fv: u32,
    #[comptime] dv: usize,
) {
    let levels = nf4_levels::<F>();
    let dk = comptime!(d0 + d1);
    let row_blocks = rows.div_ceil(KV_QUERIES);
    let cube = CUBE_POS_X as usize;
    let split = CUBE_POS_Y as usize;
    let bh = cube / row_blocks; // batch · heads + head
    let first = (cube % row_blocks) * KV_QUERIES;
    let (b, h) = (bh / heads, bh % heads);
    let u = UNIT_POS as usize;

    // Row words and blocks of each cache.
    let n0 = heads * d0;
    let w0 = comptime!(row_words(f0, BLOCK)) * (n0 / BLOCK);
    let mut ww0 = w0;
    if comptime!(f0 == FLOAT) {
        ww0 = n0;
    }
    let n1 = heads * d1;
    let mut ww1 = comptime!(row_words(f1, BLOCK)) * (n1 / BLOCK);
    if comptime!(f1 == FLOAT) {
        ww1 = n1;
    }
    let nv = heads * dv;
    let mut wwv = comptime!(row_words(fv, BLOCK)) * (nv / BLOCK);
    if comptime!(fv == FLOAT) {
        wwv = nv;
    }

    let mut q_sh = SharedMemory::<F>::new(KV_QUERIES * dk);
    let mut k_sh = SharedMemory::<F>::new(KV_TILE * dk);
    let mut p_sh = SharedMemory::<F>::new(KV_QUERIES * KV_TILE);
    let q_base = bh * rows * dk;
    let mut j = u;
    while j < KV_QUERIES * dk {
        let qi = j / dk;
        let mut val = F::new(0.0);
        if first + qi < rows {
            val = q[q_base + (first + qi) * dk + j % dk];
        }
        q_sh[j] = val;
        j += KV_TILE;
    }
    sync_cube();

    // Keys visible to each row (row r is query position r mod T).
    let mut limits = Array::<usize>::new(KV_QUERIES);
    let mut max_limit = 0;
    #[unroll]
    for qi in 0..KV_QUERIES {
        let r = first + qi;
        let mut limit = 0;
        if r < rows {
            limit = s_len;
            if causal {
                limit = r % t + s_len + 1 - t;
            }
        }
        limits[qi] = limit;
        if limit > max_limit {
            max_limit = limit;
        }
    }
    let lo = split * chunk;
    let mut hi = lo + chunk;
    if hi > max_limit {
        hi = max_limit;
    }

    let cols = comptime!(dv.div_ceil(KV_TILE));
    let mut acc = Array::<F>::new(comptime!(KV_QUERIES * dv.div_ceil(KV_TILE)));
    #[unroll]
    for c in 0..comptime!(KV_QUERIES * dv.div_ceil(KV_TILE)) {
        acc[c] = F::new(0.0);
    }
    let mut m = Array::<F>::new(KV_QUERIES);
    let mut l = Array::<F>::new(KV_QUERIES);
    let mut sc = Array::<F>::new(KV_QUERIES);
    let mut corr = Array::<F>::new(KV_QUERIES);
    #[unroll]
    for qi in 0..KV_QUERIES {
        m[qi] = neg_inf;
        l[qi] = F::new(0.0);
    }
    let mut start = lo;
    while start < hi {
        // Dequantize the tile's keys into shared memory.
        let mut idx = u;
        while idx < KV_TILE * dk {
            let key = start + idx / dk;
            let x = idx % dk;
            let mut val = F::new(0.0);
            if key < hi {
                let tok = b * s_len + key;
                if x < d0 {
                    val = load_value(c0, tok * ww0, h * d0 + x, n0 / BLOCK, &levels, f0);
                } else {
                    if comptime!(d1 > 0) {
                        val = load_value(c1, tok * ww1, h * d1 + x - d0, n1 / BLOCK, &levels, f1);
                    }
                }
            }
            k_sh[idx] = val;
            idx += KV_TILE;
        }
        sync_cube();
        let key = start + u;
        #[unroll]
        for qi in 0..KV_QUERIES {
            sc[qi] = F::new(0.0);
        }
        for x in 0..dk {
            let kx = k_sh[u * dk + x];
            #[unroll]
            for qi in 0..KV_QUERIES {
                sc[qi] += q_sh[qi * dk + x] * kx;
            }
        }
        #[unroll]
        for qi in 0..KV_QUERIES {
            let mut s = neg_inf;
            if key < limits[qi] && key < hi {
                s = sc[qi] * scale;
            }
            sc[qi] = s;
            p_sh[qi * KV_TILE + u] = s;
        }
        sync_cube();
        #[unroll]
        for qi in 0..KV_QUERIES {
            let mut tile_max = neg_inf;
            for x in 0..KV_TILE {
                tile_max = tile_max.max(p_sh[qi * KV_TILE + x]);
            }
            let m_new = m[qi].max(tile_max);
            // A row with no visible key yet keeps m = -inf: no correction.
            let mut cr = F::new(1.0);
            if m_new != neg_inf {
                cr = (m[qi] - m_new).exp();
            }
            corr[qi] = cr;
            m[qi] = m_new;
        }
        sync_cube();
        #[unroll]
        for qi in 0..KV_QUERIES {
            let mut p = F::new(0.0);
            if sc[qi] != neg_inf {
                p = (sc[qi] - m[qi]).exp();
            }
            p_sh[qi * KV_TILE + u] = p;
        }
        sync_cube();
        let mut n_keys = hi - start;
        if n_keys > KV_TILE {
            n_keys = KV_TILE;
        }
        #[unroll]
        for qi in 0..KV_QUERIES {
            let mut psum = F::new(0.0);
            for x in 0..n_keys {
                psum += p_sh[qi * KV_TILE + x];
            }
            l[qi] = l[qi] * corr[qi] + psum;
        }
        #[unroll]
        for c in 0..cols {
            let col = c * KV_TILE + u;
            if col < dv {
                #[unroll]
                for qi in 0..KV_QUERIES {
                    acc[qi * cols + c] *= corr[qi];
                }
                for x in 0..n_keys {
                    let tok = b * s_len + start + x;
                    let vv = load_value(cv, tok * wwv, h * dv + col, nv / BLOCK, &levels, fv);
                    #[unroll]
                    for qi in 0..KV_QUERIES {
                        acc[qi * cols + c] += p_sh[qi * KV_TILE + x] * vv;
                    }
                }
            }
        }
        sync_cube();
        start += KV_TILE;
    }
    #[unroll]
    for qi in 0..KV_QUERIES {
        let r = first + qi;
        if r < rows {
            let slot = (bh * rows + r) * splits + split;
            if u == 0 {
                m_out[slot] = m[qi];
                l_out[slot] = l[qi];
            }
            #[unroll]
            for c in 0..cols {
                let col = c * KV_TILE + u;
                if col < dv {
                    acc_out[slot * dv + col] = acc[qi * cols + c];
                }
            }
        }
    }
}

/// One unit per output element: the chunks' partials rescaled to their
/// common maximum and normalized.
#[cube(launch_unchecked)]
fn combine_kernel<F: Float + CubeElement>(
    m_in: &Array<F>,
    l_in: &Array<F>,
    acc_in: &Array<F>,
    out: &mut Array<F>,
    total: usize,
    splits: usize,
    dv: usize,
    neg_inf: F,
) {
    let i = linear_pos();
    if i >= total {
        terminate!();
    }
    let (row, col) = (i / dv, i % dv);
    let mut mx = neg_inf;
    for sp in 0..splits {
        mx = mx.max(m_in[row * splits + sp]);
    }
    let mut num = F::new(0.0);
    let mut den = F::new(0.0);
    for sp in 0..splits {
        let slot = row * splits + sp;
        let ms = m_in[slot];
        if ms != neg_inf {
            let w = (ms - mx).exp();
            den += l_in[slot] * w;
            num += acc_in[slot * dv + col] * w;
        }
    }
    out[i] = num / den;
}

/// The number of key chunks: enough cubes to fill a large GPU (about 1024),
/// never a chunk under one tile.
pub fn splits_for(shape: KvShape) -> usize {
    let rows = shape.groups * shape.t;
    let cubes = shape.batch * shape.heads * rows.div_ceil(KV_QUERIES);
    let tiles = shape.s.div_ceil(KV_TILE).max(1);
    1024usize.div_ceil(cubes.max(1)).clamp(1, tiles)
}

/// `kv_attention` with `q` dense `[B, heads, g, T, Σdₖ]`, one or two key
/// caches and the value cache, into `out` dense `[B, heads, g, T, dv]`.
/// `partials` are three scratch buffers the caller allocates with
/// [`partial_sizes`].
#[allow(clippy::too_many_arguments)]
pub fn launch_kv_attention<R: Runtime>(
    client: &ComputeClient<R>,
    shape: KvShape,
    q: &Handle,
    keys: &[CachePart],
    values: &CachePart,
    out: &Handle,
    partials: [&Handle; 3],
    causal: bool,
    scale: f32,
) {
    let rows = shape.groups * shape.t;
    let bh = shape.batch * shape.heads;
    let dk: usize = keys.iter().map(|k| k.dim).sum();
    let dv = values.dim;
    if bh * rows == 0 || dv == 0 {
        return;
    }
    let splits = splits_for(shape);
    let chunk = shape.s.div_ceil(splits).div_ceil(KV_TILE) * KV_TILE;
    let words = |p: &CachePart| {
        let n = shape.heads * p.dim;
        shape.batch * shape.s.max(1) * row_words(p.format, n)
    };
    let (k0, k1) = (&keys[0], keys.get(1));
    let dummy = k1.map_or(k0.handle.clone(), |k| k.handle.clone());
    let slots = bh * rows * splits;
    unsafe {
        kv_attention_kernel::launch_unchecked::<f32, R>(
            client,
            CubeCount::Static((bh * rows.div_ceil(KV_QUERIES)) as u32, splits as u32, 1),
            CubeDim::new_1d(KV_TILE as u32),
            ArrayArg::from_raw_parts(q.clone(), bh * rows * dk),
            ArrayArg::from_raw_parts(k0.handle.clone(), words(k0)),
            ArrayArg::from_raw_parts(dummy, k1.map_or(words(k0), words)),
            ArrayArg::from_raw_parts(values.handle.clone(), words(values)),
            ArrayArg::from_raw_parts(partials[0].clone(), slots),
            ArrayArg::from_raw_parts(partials[1].clone(), slots),
            ArrayArg::from_raw_parts(partials[2].clone(), slots * dv),
            shape.heads,
            rows,
            shape.t,
            shape.s,
            chunk,
            splits,
            scale,
            f32::NEG_INFINITY,
            causal,
            k0.format,
            k0.dim,
            k1.map_or(FLOAT, |k| k.format),
            k1.map_or(0, |k| k.dim),
            values.format,
            dv,
        );
        let total = bh * rows * dv;
        combine_kernel::launch_unchecked::<f32, R>(
            client,
            grid_1d(total, ELEM_BLOCK),
            CubeDim::new_1d(ELEM_BLOCK),
            ArrayArg::from_raw_parts(partials[0].clone(), slots),
            ArrayArg::from_raw_parts(partials[1].clone(), slots),
            ArrayArg::from_raw_parts(partials[2].clone(), slots * dv),
            ArrayArg::from_raw_parts(out.clone(), total),
            total,
            splits,
            dv,
            f32::NEG_INFINITY,
        );
    }
}

/// Elements of the three scratch buffers (max, sum, accumulator).
pub fn partial_sizes(shape: KvShape, dv: usize) -> [usize; 3] {
    let slots = shape.batch * shape.heads * shape.groups * shape.t * splits_for(shape);
    [slots, slots, slots * dv]
}
