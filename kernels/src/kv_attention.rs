//! Attention over KV caches as stored (the `kv_attention` op): keys and
//! values are read from token-major caches `[B, S, heads·dim]` in a float
//! storage (`f32`, `f16` or `bf16`, each cache its own: [`CachePart`]'s
//! `elem`) or in a quantized block format (`quant.rs`) and widened or
//! dequantized to `f32` on chip; DBA's two key paths are two caches whose
//! per-head slices concatenate. `q` and the output are stored as the
//! launch's `elem`; everything else (shared memory, registers, the chunks'
//! partials) is `f32`.
//!
//! The kernels share the work, all flash-decoding (the keys cut into
//! chunks, each chunk's unnormalized partial — running max, running sum,
//! accumulator — combined by a third kernel), so that many chunks keep
//! every SM busy when a decode step has only `g` query rows:
//!
//! - the *tensor-core decode* kernel (`kv_decode_mma.rs`), for a decode
//!   step over q8 caches of whole-block head slices on CUDA (sm_80 on);
//! - the *decode* kernel, for at most `KV_QUERIES` query rows per head on
//!   devices with fixed-size planes (CUDA): a group of lanes per key, each
//!   lane reading vectors of words of the caches straight into registers
//!   and unpacking them there (`kv_decode_groups_kernel`);
//! - the *staged* kernel for everything else (prefill, lavapipe), described
//!   here.
//!
//! Staged: the keys are cut into `splits` chunks, and one cube
//! handles a block of up to `KV_QUERIES` query rows of one (batch, kv head)
//! — the `g · T` rows sharing those keys (GQA reads each key once per
//! block) — over one chunk, with an online softmax. Each 64-key tile is
//! dequantized into shared memory by the whole cube, consecutive units
//! reading consecutive values (coalesced; four values per word read when
//! the dims allow), then scored by one unit per key; the tile's values go
//! through the same shared memory and are accumulated column by column.
//! Rows in shared memory have an odd stride, so units reading different
//! rows never share a bank. Each cube writes its unnormalized partial
//! (running max, running sum, accumulator); a second kernel combines the
//! chunks. Many chunks keep every SM busy when a decode step has only `g`
//! query rows.
//!
//! Where it stops: f32 arithmetic (no tensor cores); a 2-byte float cache
//! needs an even number of dims per head; the staged kernel's tile of
//! `64 × max(Σdₖ, dv)` floats in shared memory limits it to 160 dims per
//! head (less where shared memory is smaller: 96 on lavapipe's 32 KB);
//! the decode kernel takes up to 256 (BENCHMARKS.md has its speed).

use crate::quant::{
    fetch_scale, float_code, is_float, load4_regs, load_value, nf4_levels, per_word, row_words,
    unpack_word, word_at, BLOCK, FLOAT,
};
use crate::{grid_1d, kv_decode_mma, linear_pos, with_float, FloatElem, KernelError, ELEM_BLOCK};
use cubecl::prelude::*;
use cubecl::server::Handle;

/// Keys per tile, also the cube size.
pub const KV_TILE: usize = 64;
/// Query rows per cube.
pub const KV_QUERIES: usize = 8;
/// The largest key (and value) dims per head: a tile of 64 keys or values
/// lives in shared memory.
pub const KV_MAX_DK: usize = 160;

/// One cache operand: its handle, storage format and dims per head.
#[derive(Clone, Debug)]
pub struct CachePart {
    pub handle: Handle,
    /// [`FLOAT`] or a quantized format (`quant.rs`).
    pub format: u32,
    /// The storage of a [`FLOAT`] cache (ignored for a quantized one).
    pub elem: FloatElem,
    pub dim: usize,
}

impl CachePart {
    /// The kernels' comptime code of this part's storage.
    fn code(&self) -> u32 {
        if self.format == FLOAT {
            float_code(self.elem)
        } else {
            self.format
        }
    }
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

/// Writes key or value `key` of a tile, dims `[x, x + 4)` (or only `x`
/// when `vec4` is off) of head `h`, into `sh[at ..]`: from the first key
/// cache for `x < d0`, else from the second.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage(
    c0: &Array<i32>,
    c1: &Array<i32>,
    tok: usize,
    x: usize,
    h: usize,
    rows: (usize, usize, usize, usize),
    levels: &SharedMemory<f32>,
    sh: &mut SharedMemory<f32>,
    at: usize,
    #[comptime] parts: (u32, usize, u32, usize),
    #[comptime] vec4: bool,
) {
    let (f0, d0, f1, d1) = parts;
    let (w0, nb0, w1, nb1) = rows;
    let mut four = Array::<f32>::new(4usize);
    if x < d0 {
        if vec4 {
            load4_regs(c0, tok * w0, h * d0 + x, nb0, levels, &mut four, 0, f0);
        } else {
            sh[at] = load_value(c0, tok * w0, h * d0 + x, nb0, levels, f0);
        }
    } else {
        if comptime!(d1 > 0) {
            if vec4 {
                load4_regs(c1, tok * w1, h * d1 + x - d0, nb1, levels, &mut four, 0, f1);
            } else {
                sh[at] = load_value(c1, tok * w1, h * d1 + x - d0, nb1, levels, f1);
            }
        }
    }
    if vec4 {
        #[unroll]
        for k in 0..4usize {
            sh[at + k] = four[k];
        }
    }
}

/// Words per token of a cache of `n` values per token in `format` (for a
/// float cache, elements: the unit [`load_value`] indexes it in).
#[cube]
fn words_of(n: usize, #[comptime] format: u32) -> usize {
    let mut w = n;
    if comptime!(!is_float(format)) {
        w = comptime!(row_words(format, BLOCK)) * (n / BLOCK);
    }
    w
}

/// The keys each of the `nq` query rows from `first` sees (all `s_len`,
/// or, causal, up to its absolute position; none past the last row) into
/// `limits`; returns the end of the chunk ending at `end` that any of them
/// sees.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn visible_keys(
    limits: &mut Array<usize>,
    first: usize,
    rows: usize,
    t: usize,
    s_len: usize,
    end: usize,
    #[comptime] nq: usize,
    #[comptime] causal: bool,
) -> usize {
    let mut max_limit = 0;
    #[unroll]
    for qi in 0..nq {
        let r = first + qi;
        let mut limit = 0;
        if r < rows {
            limit = s_len;
            if causal {
                // Row r is query position r mod T, at absolute S − T + it.
                limit = r % t + s_len + 1 - t;
            }
        }
        limits[qi] = limit;
        if limit > max_limit {
            max_limit = limit;
        }
    }
    let mut hi = end;
    if hi > max_limit {
        hi = max_limit;
    }
    hi
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn kv_attention_kernel<F: Float + CubeElement>(
    q: &Array<F>,
    c0: &Array<i32>,
    c1: &Array<i32>,
    cv: &Array<i32>,
    m_out: &mut Array<f32>,
    l_out: &mut Array<f32>,
    acc_out: &mut Array<f32>,
    heads: usize,
    rows: usize,
    t: usize,
    s_len: usize,
    chunk: usize,
    splits: usize,
    scale: f32,
    neg_inf: f32,
    #[comptime] causal: bool,
    #[comptime] f0: u32,
    #[comptime] d0: usize,
    #[comptime] f1: u32,
    #[comptime] d1: usize,
    #[comptime] fv: u32,
    #[comptime] dv: usize,
    #[comptime] nq: usize,
    #[comptime] vec4: bool,
) {
    let levels = nf4_levels();
    let dk = comptime!(d0 + d1);
    // Odd row stride: unit u reading row u hits bank (u · stride) mod 32,
    // all different.
    let stride = comptime!(if dk > dv { dk + 1 } else { dv + 1 });
    let group = comptime!(if vec4 { 4usize } else { 1usize });
    let row_blocks = rows.div_ceil(nq);
    let cube = CUBE_POS_X as usize;
    let split = CUBE_POS_Y as usize;
    let bh = cube / row_blocks; // batch · heads + head
    let first = (cube % row_blocks) * nq;
    let (b, h) = (bh / heads, bh % heads);
    let u = UNIT_POS as usize;

    let (n0, n1, nv) = (heads * d0, heads * d1, heads * dv);
    let krows = (words_of(n0, f0), n0 / BLOCK, words_of(n1, f1), n1 / BLOCK);
    let vrows = (words_of(nv, fv), nv / BLOCK, 0usize, 0usize);

    let mut q_sh = SharedMemory::<f32>::new(comptime!(nq * (d0 + d1)));
    let mut kv_sh = SharedMemory::<f32>::new(comptime!(
        KV_TILE * if d0 + d1 > dv { d0 + d1 + 1 } else { dv + 1 }
    ));
    let mut p_sh = SharedMemory::<f32>::new(comptime!(nq * KV_TILE));
    let q_base = bh * rows * dk;
    let mut j = u;
    while j < nq * dk {
        let qi = j / dk;
        let mut val = f32::new(0.0);
        if first + qi < rows {
            val = f32::cast_from(q[q_base + (first + qi) * dk + j % dk]);
        }
        q_sh[j] = val;
        j += KV_TILE;
    }
    sync_cube();

    // Keys visible to each row (row r is query position r mod T).
    let mut limits = Array::<usize>::new(nq);
    let hi = visible_keys(
        &mut limits,
        first,
        rows,
        t,
        s_len,
        split * chunk + chunk,
        nq,
        causal,
    );
    let lo = split * chunk;

    let cols = comptime!(dv.div_ceil(KV_TILE));
    let mut acc = Array::<f32>::new(comptime!(nq * dv.div_ceil(KV_TILE)));
    #[unroll]
    for c in 0..comptime!(nq * dv.div_ceil(KV_TILE)) {
        acc[c] = f32::new(0.0);
    }
    let mut m = Array::<f32>::new(nq);
    let mut l = Array::<f32>::new(nq);
    let mut sc = Array::<f32>::new(nq);
    let mut corr = Array::<f32>::new(nq);
    #[unroll]
    for qi in 0..nq {
        m[qi] = neg_inf;
        l[qi] = f32::new(0.0);
    }
    let mut start = lo;
    while start < hi {
        // The tile's keys, dequantized into shared memory: consecutive
        // units read consecutive values of a key (coalesced).
        let per_key = comptime!((d0 + d1) / if vec4 { 4usize } else { 1usize });
        let mut idx = u;
        while idx < KV_TILE * per_key {
            let key = start + idx / per_key;
            let x = (idx % per_key) * group;
            if key < hi {
                stage(
                    c0,
                    c1,
                    b * s_len + key,
                    x,
                    h,
                    krows,
                    &levels,
                    &mut kv_sh,
                    (idx / per_key) * stride + x,
                    (f0, d0, f1, d1),
                    vec4,
                );
            }
            idx += KV_TILE;
        }
        sync_cube();
        let key = start + u;
        #[unroll]
        for qi in 0..nq {
            sc[qi] = f32::new(0.0);
        }
        if key < hi {
            for x in 0..dk {
                let kx = kv_sh[u * stride + x];
                #[unroll]
                for qi in 0..nq {
                    sc[qi] += q_sh[qi * dk + x] * kx;
                }
            }
        }
        #[unroll]
        for qi in 0..nq {
            let mut s = neg_inf;
            if key < limits[qi] && key < hi {
                s = sc[qi] * scale;
            }
            sc[qi] = s;
            p_sh[qi * KV_TILE + u] = s;
        }
        sync_cube();
        #[unroll]
        for qi in 0..nq {
            let mut tile_max = neg_inf;
            for x in 0..KV_TILE {
                tile_max = tile_max.max(p_sh[qi * KV_TILE + x]);
            }
            let m_new = m[qi].max(tile_max);
            // A row with no visible key yet keeps m = -inf: no correction.
            let mut cr = f32::new(1.0);
            if m_new != neg_inf {
                cr = (m[qi] - m_new).exp();
            }
            corr[qi] = cr;
            m[qi] = m_new;
        }
        sync_cube();
        #[unroll]
        for qi in 0..nq {
            let mut p = f32::new(0.0);
            if sc[qi] != neg_inf {
                p = (sc[qi] - m[qi]).exp();
            }
            p_sh[qi * KV_TILE + u] = p;
        }
        // The tile's values into the same shared memory (every unit is
        // past the scores: the sync above).
        let per_val = comptime!(dv / if vec4 { 4usize } else { 1usize });
        let mut idx = u;
        while idx < KV_TILE * per_val {
            let key = start + idx / per_val;
            let x = (idx % per_val) * group;
            if key < hi {
                stage(
                    cv,
                    cv,
                    b * s_len + key,
                    x,
                    h,
                    vrows,
                    &levels,
                    &mut kv_sh,
                    (idx / per_val) * stride + x,
                    (fv, dv, FLOAT, 0usize),
                    vec4,
                );
            }
            idx += KV_TILE;
        }
        sync_cube();
        let mut n_keys = hi - start;
        if n_keys > KV_TILE {
            n_keys = KV_TILE;
        }
        #[unroll]
        for qi in 0..nq {
            let mut psum = f32::new(0.0);
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
                for qi in 0..nq {
                    acc[qi * cols + c] *= corr[qi];
                }
                for x in 0..n_keys {
                    let vv = kv_sh[x * stride + col];
                    #[unroll]
                    for qi in 0..nq {
                        acc[qi * cols + c] += p_sh[qi * KV_TILE + x] * vv;
                    }
                }
            }
        }
        sync_cube();
        start += KV_TILE;
    }
    #[unroll]
    for qi in 0..nq {
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

/// Planes per cube of the decode kernel: each takes every `WARPS`-th step
/// of the cube's chunk.
pub(crate) const WARPS: usize = 4;

/// Decode (at most `KV_QUERIES` query rows per head): each plane splits
/// into groups of `g` lanes, a group per key, so a plane scores
/// `lanes / g` keys at once and reads each of them coalesced.
///
/// - **Loads**: a head's slice of a cache row is read in *accesses* of
///   `nw` consecutive words (one vector load each, `N = nw`); lane `j` of
///   a group takes accesses `j, j + g, j + 2g, …` of its key's and its
///   value's slices, so a group reads `g · nw` consecutive words per load
///   instruction whatever the format. `u` keys a group at a time, all of a
///   step's loads issued before any arithmetic, straight into registers.
///   An access never straddles a quantization block, so it needs one
///   scale, read through a scalar view of the same cache (`s0`, `s1`,
///   `sv`). Quantized words are unpacked in registers ([`unpack_word`]);
///   `q` (pre-scaled) lives in registers, each lane holding the dims of its
///   accesses.
/// - **Scores**: partial dot products summed over the group with
///   `log₂ g` butterfly shuffles, so every lane of a group holds its key's
///   score.
/// - **Softmax**: each group keeps its own running max and sum over the
///   keys it saw (no plane-wide reduction in the loop); its accumulator
///   is rescaled only when its max grows.
/// - **Values**: each lane accumulates its own dims of every row.
/// - At the end the plane's groups merge their partials with shuffles,
///   then the cube's planes through shared memory: one partial per chunk.
///
/// Keys past the chunk are clamped to its last one (a valid row) and
/// weighted zero; accesses past a head's slice (when `g` does not divide
/// their number) are clamped to its last one and meet zero dims of `q`,
/// and their accumulators are never written.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn kv_decode_groups_kernel<F: Float + CubeElement, N: Size>(
    q: &Array<F>,
    c0: &Array<Vector<i32, N>>,
    c1: &Array<Vector<i32, N>>,
    cv: &Array<Vector<i32, N>>,
    s0: &Array<i32>,
    s1: &Array<i32>,
    sv: &Array<i32>,
    m_out: &mut Array<f32>,
    l_out: &mut Array<f32>,
    acc_out: &mut Array<f32>,
    heads: usize,
    rows: usize,
    t: usize,
    s_len: usize,
    chunk: usize,
    slots: usize,
    scale: f32,
    neg_inf: f32,
    #[comptime] causal: bool,
    #[comptime] f0: u32,
    #[comptime] d0: usize,
    #[comptime] f1: u32,
    #[comptime] d1: usize,
    #[comptime] fv: u32,
    #[comptime] dv: usize,
    #[comptime] nq: usize,
    #[comptime] lanes: usize,
    #[comptime] geometry: (usize, usize, usize),
) {
    let (g, u, nw) = geometry;
    let levels = nf4_levels();
    let dk = comptime!(d0 + d1);
    // Values per access, accesses per head slice, accesses per lane.
    let (e0, e1, ev) = comptime!((nw * per_word(f0), nw * per_word(f1), nw * per_word(fv)));
    let (a0, a1, av) = comptime!((d0 / e0, d1 / e1, dv / ev));
    let (p0, p1, pv) = comptime!((a0.div_ceil(g), a1.div_ceil(g), av.div_ceil(g)));
    // Registers per row: q's dims of this lane, then the accumulator's.
    let qk = comptime!(p0 * e0 + p1 * e1);
    let na = comptime!(pv * ev);
    let per_plane = comptime!(lanes / g);
    let bh = CUBE_POS_X as usize;
    let split = CUBE_POS_Y as usize;
    let (b, h) = (bh / heads, bh % heads);
    let lane = UNIT_POS_X as usize;
    let warp = UNIT_POS_Y as usize;
    let (grp, j) = (lane / g, lane % g);
    let (n0, n1, nv) = (heads * d0, heads * d1, heads * dv);
    let (w0, w1, wv) = (words_of(n0, f0), words_of(n1, f1), words_of(nv, fv));
    let (nb0, nb1, nbv) = (n0 / BLOCK, n1 / BLOCK, nv / BLOCK);

    // This lane's dims of q, zero past a head slice.
    let mut qr = Array::<f32>::new(comptime!(nq * (p0 * e0 + p1 * e1)));
    #[unroll]
    for r in 0..nq {
        #[unroll]
        for i in 0..p0 {
            #[unroll]
            for k in 0..e0 {
                let a = j + i * g;
                let mut v = f32::new(0.0);
                if r < rows && a < a0 {
                    v = f32::cast_from(q[(bh * rows + r) * dk + a * e0 + k]) * scale;
                }
                qr[r * qk + i * e0 + k] = v;
            }
        }
        #[unroll]
        for i in 0..p1 {
            #[unroll]
            for k in 0..e1 {
                let a = j + i * g;
                let mut v = f32::new(0.0);
                if r < rows && a < a1 {
                    v = f32::cast_from(q[(bh * rows + r) * dk + d0 + a * e1 + k]) * scale;
                }
                qr[r * qk + p0 * e0 + i * e1 + k] = v;
            }
        }
    }
    let mut limits = Array::<usize>::new(nq);
    let hi = visible_keys(
        &mut limits,
        0,
        rows,
        t,
        s_len,
        split * chunk + chunk,
        nq,
        causal,
    );
    let lo = split * chunk;
    let mut m = Array::<f32>::new(nq);
    let mut l = Array::<f32>::new(nq);
    let mut acc = Array::<f32>::new(comptime!(nq * pv * ev));
    empty_partials(&mut m, &mut l, &mut acc, neg_inf, nq, comptime!(nq * na));
    // A step's raw words and scales, u keys of this lane's group.
    let mut kr0 = Array::<u32>::new(comptime!((u * p0 * nw).max(1)));
    let mut ks0 = Array::<f32>::new(comptime!((u * p0).max(1)));
    let mut kr1 = Array::<u32>::new(comptime!((u * p1 * nw).max(1)));
    let mut ks1 = Array::<f32>::new(comptime!((u * p1).max(1)));
    let mut vr = Array::<u32>::new(comptime!(u * pv * nw));
    let mut vs = Array::<f32>::new(comptime!(u * pv));
    let mut vals = Array::<f32>::new(comptime!(per_word(f0).max(per_word(f1)).max(per_word(fv))));
    let mut sc = Array::<f32>::new(comptime!(u * nq));
    let mut tile = lo + warp * comptime!(u * lanes / g);
    while tile < hi {
        // Every load of the step first.
        #[unroll]
        for x in 0..u {
            let mut key = tile + x * per_plane + grp;
            if key >= hi {
                key = hi - 1;
            }
            let tok = b * s_len + key;
            let r0 = (tok * w0, nb0, h * d0);
            let k0 = comptime!((f0, a0, p0, x * p0, g, nw));
            fetch_accesses(c0, s0, r0, j, &mut kr0, &mut ks0, k0);
            let r1 = (tok * w1, nb1, h * d1);
            let k1 = comptime!((f1, a1, p1, x * p1, g, nw));
            fetch_accesses(c1, s1, r1, j, &mut kr1, &mut ks1, k1);
            let rv = (tok * wv, nbv, h * dv);
            let kv = comptime!((fv, av, pv, x * pv, g, nw));
            fetch_accesses(cv, sv, rv, j, &mut vr, &mut vs, kv);
        }
        // Scores: this lane's partial dot products, summed over the group.
        #[unroll]
        for x in 0..u {
            #[unroll]
            for r in 0..nq {
                sc[x * nq + r] = f32::new(0.0);
            }
            // Part 0's dims of q first in each row, then part 1's.
            let d0_at = comptime!((f0, p0, x * p0, 0usize));
            dot_accesses(
                &kr0,
                &ks0,
                &qr,
                &levels,
                &mut vals,
                &mut sc,
                d0_at,
                (qk, nw, nq, x),
            );
            let d1_at = comptime!((f1, p1, x * p1, p0 * e0));
            dot_accesses(
                &kr1,
                &ks1,
                &qr,
                &levels,
                &mut vals,
                &mut sc,
                d1_at,
                (qk, nw, nq, x),
            );
            let key = tile + x * per_plane + grp;
            #[unroll]
            for r in 0..nq {
                let mut s = sc[x * nq + r];
                #[unroll]
                for bit in 0..comptime!(g.trailing_zeros() as usize) {
                    s += plane_shuffle_xor(s, comptime!(1u32 << bit));
                }
                if key >= limits[r] || key >= hi {
                    s = neg_inf;
                }
                sc[x * nq + r] = s;
            }
        }
        // The group's online softmax over its u keys; then the values.
        #[unroll]
        for r in 0..nq {
            let mut mx = m[r];
            #[unroll]
            for x in 0..u {
                mx = mx.max(sc[x * nq + r]);
            }
            if mx > m[r] {
                // A row with no visible key before keeps a zero
                // accumulator: exp(-inf) = 0.
                let corr = (m[r] - mx).exp();
                l[r] *= corr;
                #[unroll]
                for a in 0..na {
                    acc[r * na + a] *= corr;
                }
                m[r] = mx;
            }
            #[unroll]
            for x in 0..u {
                let mut p = f32::new(0.0);
                if sc[x * nq + r] != neg_inf {
                    p = (sc[x * nq + r] - mx).exp();
                }
                l[r] += p;
                sc[x * nq + r] = p;
            }
        }
        #[unroll]
        for x in 0..u {
            #[unroll]
            for i in 0..pv {
                #[unroll]
                for k in 0..nw {
                    unpack_word(vr[(x * pv + i) * nw + k], &levels, &mut vals, 0, fv);
                    #[unroll]
                    for r in 0..nq {
                        let w = sc[x * nq + r] * vs[x * pv + i];
                        #[unroll]
                        for z in 0..comptime!(per_word(fv)) {
                            let at = r * na + i * ev + k * comptime!(per_word(fv)) + z;
                            acc[at] += w * vals[z];
                        }
                    }
                }
            }
        }
        tile += comptime!(WARPS * u * lanes / g);
    }
    // The plane's groups merge (lanes j of every group hold the same dims).
    #[unroll]
    for bit in 0..comptime!((lanes / g).trailing_zeros() as usize) {
        let mask = comptime!((g << bit) as u32);
        #[unroll]
        for r in 0..nq {
            let mo = plane_shuffle_xor(m[r], mask);
            let lo_other = plane_shuffle_xor(l[r], mask);
            let mx = m[r].max(mo);
            let mut wa = f32::new(0.0);
            let mut wb = f32::new(0.0);
            if m[r] != neg_inf {
                wa = (m[r] - mx).exp();
            }
            if mo != neg_inf {
                wb = (mo - mx).exp();
            }
            l[r] = l[r] * wa + lo_other * wb;
            #[unroll]
            for a in 0..na {
                let other = plane_shuffle_xor(acc[r * na + a], mask);
                acc[r * na + a] = acc[r * na + a] * wa + other * wb;
            }
            m[r] = mx;
        }
    }
    let mut m_sh = SharedMemory::<f32>::new(comptime!(WARPS * nq));
    let mut l_sh = SharedMemory::<f32>::new(comptime!(WARPS * nq));
    let mut a_sh = SharedMemory::<f32>::new(comptime!(WARPS * nq * dv));
    if grp == 0 {
        #[unroll]
        for r in 0..nq {
            if j == 0 {
                m_sh[warp * nq + r] = m[r];
                l_sh[warp * nq + r] = l[r];
            }
            #[unroll]
            for i in 0..pv {
                let a = j + i * g;
                if a < av {
                    #[unroll]
                    for k in 0..ev {
                        a_sh[(warp * nq + r) * dv + a * ev + k] = acc[r * na + i * ev + k];
                    }
                }
            }
        }
    }
    sync_cube();
    combine_planes(
        &m_sh, &l_sh, &a_sh, m_out, l_out, acc_out, bh, rows, slots, split, neg_inf, nq, dv, lanes,
    );
}

/// This lane's (`j`) accesses of one key's head slice of a cache into
/// registers. `row`: the row's first word, its blocks and the head's
/// first element, as [`word_at`] takes them; `part`: the format, the
/// slice's accesses, this lane's `p` of them, where they go (raw words to
/// `raw[at · nw ..]`, scales to `scales[at ..]`), the group's lanes and
/// the words a load. Accesses past the slice are clamped to its last one.
#[cube]
fn fetch_accesses<N: Size>(
    c: &Array<Vector<i32, N>>,
    s: &Array<i32>,
    row: (usize, usize, usize),
    j: usize,
    raw: &mut Array<u32>,
    scales: &mut Array<f32>,
    #[comptime] part: (u32, usize, usize, usize, usize, usize),
) {
    let (start, nb, e0) = row;
    let (format, accesses, p, at, g, nw) = part;
    #[unroll]
    for i in 0..p {
        let w = access_word(j + i * g, accesses, nw);
        let word = c[word_at(start, nb, e0, w, format) / nw];
        #[unroll]
        for k in 0..nw {
            raw[(at + i) * nw + k] = u32::reinterpret(word[k]);
        }
        scales[at + i] = fetch_scale(s, start, e0, w, format);
    }
}

/// Adds to the scores of key `x` of the step (`sc[x · nq + r]`, each of
/// the `nq` query rows) the dot products of this lane's fetched accesses
/// of one cache part with its dims of `q`. `part`: the format, this
/// lane's `p` accesses at `at` (as [`fetch_accesses`] left them) and the
/// part's first dim in each of `qr`'s rows of `qk`; `step`: `qk`, the words
/// a load, `nq` and `x`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn dot_accesses(
    raw: &Array<u32>,
    scales: &Array<f32>,
    qr: &Array<f32>,
    levels: &SharedMemory<f32>,
    vals: &mut Array<f32>,
    sc: &mut Array<f32>,
    #[comptime] part: (u32, usize, usize, usize),
    #[comptime] step: (usize, usize, usize, usize),
) {
    let (format, p, at, offset) = part;
    let (qk, nw, nq, x) = step;
    let e = comptime!(per_word(format));
    #[unroll]
    for i in 0..p {
        #[unroll]
        for r in 0..nq {
            let mut dot = f32::new(0.0);
            #[unroll]
            for k in 0..nw {
                unpack_word(raw[(at + i) * nw + k], levels, vals, 0, format);
                #[unroll]
                for z in 0..e {
                    dot += qr[r * qk + offset + (i * nw + k) * e + z] * vals[z];
                }
            }
            sc[x * nq + r] += dot * scales[at + i];
        }
    }
}

/// The first word of access `a` of a head slice of `accesses` accesses of
/// `nw` words, clamped to the last access.
#[cube]
fn access_word(a: usize, accesses: usize, #[comptime] nw: usize) -> usize {
    let mut at = a;
    if at >= accesses {
        at = accesses - 1;
    }
    at * nw
}

/// A partial with no key yet: running maxima `-inf`, sums and the
/// accumulator zero.
#[cube]
fn empty_partials(
    m: &mut Array<f32>,
    l: &mut Array<f32>,
    acc: &mut Array<f32>,
    neg_inf: f32,
    #[comptime] nq: usize,
    #[comptime] n_acc: usize,
) {
    #[unroll]
    for r in 0..nq {
        m[r] = neg_inf;
        l[r] = f32::new(0.0);
    }
    #[unroll]
    for i in 0..n_acc {
        acc[i] = f32::new(0.0);
    }
}

/// The cube's planes' partials (in shared memory: running max and sum of
/// row `r` of plane `w` at `w · nq + r`, its accumulator at
/// `(w · nq + r) · dv`) rescaled to their common maximum and summed into
/// the chunk's one partial, slot `split` of each row; every unit of the
/// cube takes some of the rows' columns.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn combine_planes(
    m_sh: &SharedMemory<f32>,
    l_sh: &SharedMemory<f32>,
    a_sh: &SharedMemory<f32>,
    m_out: &mut Array<f32>,
    l_out: &mut Array<f32>,
    acc_out: &mut Array<f32>,
    bh: usize,
    rows: usize,
    slots: usize,
    split: usize,
    neg_inf: f32,
    #[comptime] nq: usize,
    #[comptime] dv: usize,
    #[comptime] lanes: usize,
) {
    let mut i = UNIT_POS_Y as usize * lanes + UNIT_POS_X as usize;
    while i < comptime!(nq * dv) {
        let (r, col) = (i / dv, i % dv);
        if r < rows {
            let mut mx = neg_inf;
            #[unroll]
            for w in 0..WARPS {
                mx = mx.max(m_sh[w * nq + r]);
            }
            let mut den = f32::new(0.0);
            let mut num = f32::new(0.0);
            #[unroll]
            for w in 0..WARPS {
                let mut wt = f32::new(0.0);
                if m_sh[w * nq + r] != neg_inf {
                    wt = (m_sh[w * nq + r] - mx).exp();
                }
                den += l_sh[w * nq + r] * wt;
                num += a_sh[(w * nq + r) * dv + col] * wt;
            }
            let slot = (bh * rows + r) * slots + split;
            if col == 0 {
                m_out[slot] = mx;
                l_out[slot] = den;
            }
            acc_out[slot * dv + col] = num;
        }
        i += comptime!(WARPS * lanes);
    }
}

/// One unit per output element: the chunks' partials rescaled to their
/// common maximum and normalized.
#[cube(launch_unchecked)]
fn combine_kernel<F: Float + CubeElement>(
    m_in: &Array<f32>,
    l_in: &Array<f32>,
    acc_in: &Array<f32>,
    out: &mut Array<F>,
    total: usize,
    splits: usize,
    dv: usize,
    neg_inf: f32,
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
    let mut num = f32::new(0.0);
    let mut den = f32::new(0.0);
    for sp in 0..splits {
        let slot = row * splits + sp;
        let ms = m_in[slot];
        if ms != neg_inf {
            let w = (ms - mx).exp();
            den += l_in[slot] * w;
            num += acc_in[slot * dv + col] * w;
        }
    }
    out[i] = F::cast_from(num / den);
}

/// The number of key chunks of the staged kernel: enough cubes to fill a
/// large GPU (about 2048), never a chunk under one tile.
pub fn splits_for(shape: KvShape) -> usize {
    let rows = shape.groups * shape.t;
    let cubes = shape.batch * shape.heads * rows.div_ceil(rows_per_cube(rows));
    let tiles = shape.s.div_ceil(KV_TILE).max(1);
    2048usize.div_ceil(cubes.max(1)).clamp(1, tiles)
}

/// Query rows per cube: all of a head's rows up to [`KV_QUERIES`] (a
/// power of two), so a decode step with `g` rows computes no idle rows.
pub fn rows_per_cube(rows: usize) -> usize {
    rows.next_power_of_two().clamp(1, KV_QUERIES)
}

/// The plane size the decode kernel can rely on: the device's, when it has
/// plane operations and a fixed plane size.
fn fixed_plane<R: Runtime>(client: &ComputeClient<R>) -> Option<usize> {
    let props = client.properties();
    let (lo, hi) = (
        props.hardware.plane_size_min as usize,
        props.hardware.plane_size_max as usize,
    );
    let ops = props
        .features
        .plane
        .contains(cubecl::ir::features::Plane::Ops);
    (ops && lo == hi && hi.is_power_of_two() && hi >= 4).then_some(hi)
}

/// The decode kernel's geometry: `group` lanes a key, `keys` keys a group
/// per step, `words` words a vector load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    group: usize,
    keys: usize,
    words: usize,
}

/// Registers a lane of the decode kernel may spend on `q`, the
/// accumulator and a step's raw words and scales: clear of spills under
/// the 255 a thread has, with room for occupancy.
const DECODE_REGISTERS: usize = 176;

/// The decode kernel's geometry for cache parts of these formats (kernel
/// codes) and dims per head (keys, then values) of `heads` kv heads and `nq` rows a cube, or `None` where a head's
/// slice of some part is not whole words of its storage.
///
/// - `keys`: 4 a step where a key is at most 12 raw words and scales a
///   lane (quantized caches), else 2;
/// - `words` and `group`: the widest vector load (4, 2 or 1 words) that
///   every part's head slices and rows are aligned to, and the smallest
///   group (at least 4 lanes: the most keys a plane at once; no idle
///   lanes beyond 4) whose registers fit [`DECODE_REGISTERS`]; else the
///   same with narrower loads; else the fewest registers.
///
/// Measured on an H100 (BENCHMARKS, eighteenth session): over a q8
/// cache of 128-dim heads this picks 8 lanes, 4 keys, 4 words (0.250 ms
/// where 2 keys took 0.281); over f32, 16 lanes, 2 keys, 4 words (0.410
/// ms, within 5% of the best geometry tried).
///
/// `CARAMBA_KV_DECODE=<group>:<keys>:<words>` overrides it, for
/// benchmarks (ignored where it does not fit the parts).
fn decode_geometry(
    parts: &[(u32, usize)],
    heads: usize,
    nq: usize,
    lanes: usize,
) -> Option<Geometry> {
    static FORCED: std::sync::OnceLock<Option<Geometry>> = std::sync::OnceLock::new();
    let forced = FORCED.get_or_init(|| {
        let v = std::env::var("CARAMBA_KV_DECODE").ok()?;
        let n: Vec<usize> = v
            .split(':')
            .map(|s| s.parse().ok())
            .collect::<Option<_>>()?;
        match n[..] {
            [group, keys, words] => Some(Geometry { group, keys, words }),
            _ => None,
        }
    });
    let words_of = |&(code, dim): &(u32, usize)| dim / per_word(code);
    let aligned = |p: &(u32, usize), nw: usize| {
        let (code, dim) = *p;
        let quant_rows = is_float(code) || (heads * dim / BLOCK).is_multiple_of(nw);
        dim % per_word(code) == 0 && words_of(p) % nw == 0 && quant_rows
    };
    let widest = [4, 2, 1]
        .into_iter()
        .find(|&nw| parts.iter().all(|p| aligned(p, nw)))?;
    // Alignment to `widest` is alignment to any of its divisors.
    let usable = |f: &Geometry| {
        f.words > 0
            && widest % f.words == 0
            && f.group > 0
            && lanes.is_multiple_of(f.group)
            && f.keys > 0
    };
    if let Some(f) = forced.filter(usable) {
        return Some(f);
    }
    let accesses = |p: &(u32, usize), nw: usize, g: usize| (words_of(p) / nw).div_ceil(g);
    // A key's raw words and scales a lane.
    let raw = |nw: usize, g: usize| -> usize {
        parts
            .iter()
            .map(|p| accesses(p, nw, g) * (nw + usize::from(!is_float(p.0))))
            .sum()
    };
    // Four keys a step where a key is few words a lane (quantized caches),
    // two where it is many: about the same bytes in flight a step.
    let keys = |nw: usize, g: usize| if raw(nw, g) <= 12 { 4 } else { 2 };
    let registers = |nw: usize, g: usize| {
        let (k, v) = parts.split_at(parts.len() - 1);
        let values = |p: &(u32, usize)| accesses(p, nw, g) * nw * per_word(p.0);
        let q: usize = k.iter().map(values).sum();
        nq * (q + values(&v[0])) + keys(nw, g) * raw(nw, g)
    };
    // Wider loads first, then smaller groups; no group wider than a head
    // slice's accesses (idle lanes) beyond the narrowest, 4.
    let candidates = [4, 2, 1]
        .into_iter()
        .filter(|&nw| widest % nw == 0)
        .flat_map(|nw| {
            let most = parts.iter().map(|p| words_of(p) / nw).max().unwrap_or(1);
            [4, 8, 16, 32]
                .into_iter()
                .filter(move |&g| g <= lanes && (g <= most || g == 4))
                .map(move |g| (nw, g))
        });
    let (words, group) = candidates
        .clone()
        .find(|&(nw, g)| registers(nw, g) <= DECODE_REGISTERS)
        .or_else(|| candidates.min_by_key(|&(nw, g)| registers(nw, g)))?;
    Some(Geometry {
        group,
        keys: keys(words, group),
        words,
    })
}

/// `kv_attention` with `q` dense `[B, heads, g, T, Σdₖ]`, one or two key
/// caches and the value cache, into `out` dense `[B, heads, g, T, dv]`.
/// A decode step (at most [`KV_QUERIES`] query rows per head, head
/// slices of whole words) takes the decode kernel when the device has
/// fixed-size planes and plane operations (`decode_geometry`); anything
/// else the staged kernel. `q` and `out` are stored as `elem`, each cache
/// part as it says.
#[allow(clippy::too_many_arguments)]
pub fn launch_kv_attention<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    shape: KvShape,
    q: &Handle,
    keys: &[CachePart],
    values: &CachePart,
    out: &Handle,
    causal: bool,
    scale: f32,
) -> Result<(), KernelError> {
    let rows = shape.groups * shape.t;
    let bh = shape.batch * shape.heads;
    let dk: usize = keys.iter().map(|k| k.dim).sum();
    let dv = values.dim;
    if bh * rows == 0 || dv == 0 {
        return Ok(());
    }
    if let Some(p) = keys
        .iter()
        .chain([values])
        .find(|p| p.format == FLOAT && p.elem != FloatElem::F32 && p.dim % 2 != 0)
    {
        return Err(KernelError::Unsupported(format!(
            "kv_attention over a {:?} cache of {} dims per head (2-byte caches need an even number)",
            p.elem, p.dim
        )));
    }
    let vec4 = keys.iter().chain([values]).all(|p| p.dim % 4 == 0);
    let words = |p: &CachePart| {
        let n = shape.heads * p.dim;
        shape.batch * shape.s.max(1) * row_words(p.code(), n)
    };
    let (k0, k1) = (&keys[0], keys.get(1));
    let dummy = k1.map_or(k0.handle.clone(), |k| k.handle.clone());
    let (f1, d1) = (k1.map_or(FLOAT, |k| k.code()), k1.map_or(0, |k| k.dim));
    let scratch = |n: usize| client.empty(n.max(1) * 4);
    let nq = rows_per_cube(rows);
    let layout: Vec<(u32, usize)> = keys
        .iter()
        .chain([values])
        .map(|p| (p.code(), p.dim))
        .collect();
    let mma = kv_decode_mma::plan(client, shape.heads, keys, values, rows, nq);
    let decode = fixed_plane(client)
        .filter(|_| rows <= KV_QUERIES && dv <= 256)
        .and_then(|lanes| decode_geometry(&layout, shape.heads, nq, lanes).map(|d| (lanes, d)));
    // The key chunks: about 2048 cubes; for the decode kernels each chunk
    // a whole number of `WARPS · lanes` keys, for the staged one of tiles.
    let decode_lanes = if mma.is_some() {
        Some(kv_decode_mma::MMA_PLANE)
    } else {
        decode.map(|(lanes, _)| lanes)
    };
    let (splits, chunk) = match decode_lanes {
        Some(lanes) => {
            let step = WARPS * lanes;
            let wanted = match mma {
                Some(plan) => kv_decode_mma::splits(client, bh, plan),
                None => 2048usize.div_ceil(bh),
            };
            let splits = wanted.clamp(1, shape.s.div_ceil(step).max(1));
            let chunk = (shape.s.div_ceil(splits).div_ceil(step) * step).max(step);
            (shape.s.div_ceil(chunk).max(1), chunk)
        }
        None => {
            let shared = 4 * (KV_TILE * (dk.max(dv) + 1) + nq * (dk + KV_TILE) + 16);
            let limit = client.properties().hardware.max_shared_memory_size;
            if shared > limit {
                return Err(KernelError::Unsupported(format!(
                    "kv_attention with {dk} key and {dv} value dims per head needs {shared} bytes of shared memory; this device has {limit}"
                )));
            }
            let splits = splits_for(shape);
            (splits, shape.s.div_ceil(splits).div_ceil(KV_TILE) * KV_TILE)
        }
    };
    let slots = bh * rows * splits;
    let (m_buf, l_buf, acc_buf) = (scratch(slots), scratch(slots), scratch(slots * dv));
    let second = k1.map_or(words(k0), words);
    if let Some(plan) = mma {
        with_float!(elem, F => unsafe {
            kv_decode_mma::kv_decode_mma_kernel::launch_unchecked::<F, R>(
                client,
                CubeCount::Static(bh as u32, splits as u32, 1),
                CubeDim::new_2d(kv_decode_mma::MMA_PLANE as u32, WARPS as u32),
                plan.kn,
                ArrayArg::from_raw_parts(q.clone(), bh * rows * dk),
                ArrayArg::from_raw_parts(k0.handle.clone(), words(k0)),
                ArrayArg::from_raw_parts(dummy.clone(), second),
                ArrayArg::from_raw_parts(values.handle.clone(), words(values)),
                ArrayArg::from_raw_parts(k0.handle.clone(), words(k0)),
                ArrayArg::from_raw_parts(dummy.clone(), second),
                ArrayArg::from_raw_parts(values.handle.clone(), words(values)),
                ArrayArg::from_raw_parts(m_buf.clone(), slots),
                ArrayArg::from_raw_parts(l_buf.clone(), slots),
                ArrayArg::from_raw_parts(acc_buf.clone(), slots * dv),
                rows,
                shape.t,
                shape.s,
                chunk,
                splits,
                scale,
                f32::NEG_INFINITY,
                kv_decode_mma::CODE_BIAS,
                causal,
                shape.heads,
                k0.dim,
                d1,
                dv,
                nq,
                plan.kn,
                plan.stages,
                plan.imma,
                plan.bits.0,
                plan.bits.1,
            );
        });
    } else if let Some((lanes, geo)) = decode {
        with_float!(elem, F => unsafe {
            kv_decode_groups_kernel::launch_unchecked::<F, R>(
                client,
                CubeCount::Static(bh as u32, splits as u32, 1),
                CubeDim::new_2d(lanes as u32, WARPS as u32),
                geo.words,
                ArrayArg::from_raw_parts(q.clone(), bh * rows * dk),
                ArrayArg::from_raw_parts(k0.handle.clone(), words(k0)),
                ArrayArg::from_raw_parts(dummy.clone(), second),
                ArrayArg::from_raw_parts(values.handle.clone(), words(values)),
                ArrayArg::from_raw_parts(k0.handle.clone(), words(k0)),
                ArrayArg::from_raw_parts(dummy, second),
                ArrayArg::from_raw_parts(values.handle.clone(), words(values)),
                ArrayArg::from_raw_parts(m_buf.clone(), slots),
                ArrayArg::from_raw_parts(l_buf.clone(), slots),
                ArrayArg::from_raw_parts(acc_buf.clone(), slots * dv),
                shape.heads,
                rows,
                shape.t,
                shape.s,
                chunk,
                splits,
                scale,
                f32::NEG_INFINITY,
                causal,
                k0.code(),
                k0.dim,
                f1,
                d1,
                values.code(),
                dv,
                nq,
                lanes,
                (geo.group, geo.keys, geo.words),
            );
        });
    } else {
        with_float!(elem, F => unsafe {
            kv_attention_kernel::launch_unchecked::<F, R>(
                client,
                CubeCount::Static((bh * rows.div_ceil(nq)) as u32, splits as u32, 1),
                CubeDim::new_1d(KV_TILE as u32),
                ArrayArg::from_raw_parts(q.clone(), bh * rows * dk),
                ArrayArg::from_raw_parts(k0.handle.clone(), words(k0)),
                ArrayArg::from_raw_parts(dummy, second),
                ArrayArg::from_raw_parts(values.handle.clone(), words(values)),
                ArrayArg::from_raw_parts(m_buf.clone(), slots),
                ArrayArg::from_raw_parts(l_buf.clone(), slots),
                ArrayArg::from_raw_parts(acc_buf.clone(), slots * dv),
                shape.heads,
                rows,
                shape.t,
                shape.s,
                chunk,
                splits,
                scale,
                f32::NEG_INFINITY,
                causal,
                k0.code(),
                k0.dim,
                f1,
                d1,
                values.code(),
                dv,
                nq,
                vec4,
            );
        });
    }
    let total = bh * rows * dv;
    with_float!(elem, F => unsafe {
        combine_kernel::launch_unchecked::<F, R>(
            client,
            grid_1d(total, ELEM_BLOCK),
            CubeDim::new_1d(ELEM_BLOCK),
            ArrayArg::from_raw_parts(m_buf, slots),
            ArrayArg::from_raw_parts(l_buf, slots),
            ArrayArg::from_raw_parts(acc_buf, slots * dv),
            ArrayArg::from_raw_parts(out.clone(), total),
            total,
            splits,
            dv,
            f32::NEG_INFINITY,
        );
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_geometry_of_the_benchmark_caches() {
        use crate::quant::{Q4, Q8};
        let geo = |parts: &[(u32, usize)], nq| {
            decode_geometry(parts, 8, nq, 32).map(|g| (g.group, g.keys, g.words))
        };
        // 128-dim heads, 4 query rows (the `kvdecode` benchmark).
        assert_eq!(geo(&[(Q8, 128), (Q8, 128)], 4), Some((8, 4, 4)));
        assert_eq!(geo(&[(FLOAT, 128), (FLOAT, 128)], 4), Some((16, 2, 4)));
        // Twice the rows: narrower loads and wider groups for the same
        // registers.
        assert_eq!(geo(&[(Q8, 128), (Q8, 128)], 8), Some((16, 4, 2)));
        // 6-dim float heads: 2-word loads; 5 dims, scalar ones; a q4 slice
        // of 4 dims is half a word (the staged kernel).
        assert_eq!(geo(&[(FLOAT, 6), (FLOAT, 6)], 1), Some((4, 4, 2)));
        assert_eq!(geo(&[(FLOAT, 5), (FLOAT, 6)], 1), Some((4, 4, 1)));
        assert_eq!(geo(&[(Q4, 4), (FLOAT, 8)], 1), None);
    }
}
