//! Decode attention over q8 caches on tensor cores: the `kv_attention`
//! kernel for a decode step (at most `KV_QUERIES` query rows per kv head)
//! whose key and value caches are all q8 with head slices of whole
//! quantization blocks, on CUDA devices with `mma.sync.m16n8k16` for `f16`
//! (sm_80 on). Same partials as `kv_attention`'s decode kernel (one per
//! key chunk, combined by its combine kernel), same semantics.
//!
//! Why: over a q8 cache the CUDA-core kernel spends four FMAs per cached
//! value and query row plus the unpacking, and is bound by instructions
//! and latency, not memory (NOTES, eighteenth session). Here both
//! products run on the tensor cores and the codes go into them as they
//! are: a q8 code is an integer in [-128, 127], exact in `f16`.
//!
//! A plane takes 16 keys a step, FlashAttention-2 style with the roles
//! set for a decode step's few query rows:
//!
//! - **Scores** `S = Q·Kᵀ` (M = 16 query rows, N = 8 keys, K = 16 dims):
//!   the A operand is `q`, pre-scaled and split into two `f16` halves,
//!   `q = hi + lo`, row `r` of the 16 holding `hi` of query row `r` and
//!   row `r + 8` its `lo` (so `S = D[r] + D[r + 8]` keeps about 22 bits;
//!   a unit holds both rows), built once per cube into shared memory and read
//!   back each step as one 16-byte load a k-step. The B operand is a key's codes
//!   straight from the cache: unit `(g, t)` (`g = lane / 4`, `t = lane %
//!   4`) reads key `g`'s word `8b + 2t + i` for the k-steps `2b + i` of
//!   block `b`, and a word's four codes are the k-indices `2t, 2t + 8`
//!   (bytes 0, 1) and `2t + 1, 2t + 9` (bytes 2, 3): a permutation of the
//!   dims, applied to `q` alike, that lets one 8-byte load per block feed
//!   two k-steps and keeps every k-step inside one quantization block.
//!   Each block's product starts from zero and is scaled by its keys'
//!   block scales as it joins the score.
//! - **Softmax**: online, per query row, in the accumulator registers
//!   (a row's four units share its maximum through two shuffles); the
//!   output is rescaled only when the maximum grows.
//! - **Values** `O += P·V` (M = 16, N = 8 dims, K = 16 keys): the
//!   probabilities' accumulator layout is the A layout of the next
//!   product (FlashAttention-2's trick); per value block `b` each key's
//!   probability is multiplied by its value scale of that block and split
//!   into `hi + lo` again (rows `r` and `r + 8`). The B operand is the
//!   value codes: unit `(g, t)` reads word `g` of block `b` of its four
//!   keys (`2t, 2t + 1, 2t + 8, 2t + 9`), and code `j` of that word is
//!   column `g` of the block's `j`-th 8-dim product, i.e. dim `32b + 4g +
//!   j`.
//!
//! A code `c` becomes an `f16` by placing `c + 128` (the byte with its
//! top bit flipped) in the mantissa of 1024 and subtracting 1152: one
//! logic instruction and one half-pair subtraction per two codes.
//!
//! Where it stops: q8 keys and values, every part's head slice a multiple
//! of 32 dims, at most [`MMA_MAX_DK`] key dims and [`MMA_MAX_DV`] value
//! dims per head (registers), at most 8 query rows per kv head; anything
//! else takes the CUDA-core decode kernel.

use crate::attention_tc::has_half_mma;
use crate::kv_attention::{combine_planes, visible_keys, CachePart, WARPS};
use crate::quant::{BLOCK, Q8};
use cubecl::cmma::MmaDefinition;
use cubecl::prelude::*;
use half::f16;

type Pair<E> = Vector<E, Const<2>>;

/// Units per plane the kernel is written for.
pub const MMA_PLANE: usize = 32;
/// Keys a plane takes per step: two 8-key score products, one 16-key
/// value product.
const STEP: usize = 16;
/// The widest key (all parts) and value head slices the kernel takes:
/// `q`'s fragments take `Σdₖ / 4` registers a unit and the output `dv / 2`.
pub const MMA_MAX_DK: usize = 256;
pub const MMA_MAX_DV: usize = 128;
/// Query rows the kernel computes per kv head (the M = 16 rows hold each
/// row's two halves).
pub const MMA_ROWS: usize = 8;

#[cube]
fn mma_def() -> MmaDefinition<f16, f16, f32> {
    MmaDefinition::<f16, f16, f32>::new(16usize, 8usize, 16usize)
}

/// Two codes of a word, bytes 0 and 2 of `x` (after a shift), as an
/// exact `f16` pair.
#[cube]
fn codes(x: u32) -> Pair<f16> {
    let bits = (x & 0x00ff_00ffu32) ^ 0x6480_6480u32;
    Pair::<f16>::reinterpret(bits) - Pair::<f16>::new(f16::new(1152.0))
}

/// `x` split into two `f16` pairs whose sum is `x` to about 22 bits.
#[cube]
fn split(x: Pair<f32>) -> (Pair<f16>, Pair<f16>) {
    let hi = Pair::<f16>::cast_from(x);
    let lo = Pair::<f16>::cast_from(x - Pair::<f32>::cast_from(hi));
    (hi, lo)
}

/// The word a unit `t` reads for k-step `c` of a head slice (module doc).
#[cube]
fn k_word(t: usize, #[comptime] c: usize) -> usize {
    comptime!(8 * (c / 2) + c % 2) + 2 * t
}

/// The A fragments of `q`'s rows (pre-scaled) for the k-steps of one key
/// part (`d` dims from `q`'s dim `off`), four registers a k-step from
/// `frags[4·c0]` on: `[hi row g, lo row g, hi, lo]` for the k-index pairs
/// `(2t, 2t + 1)` and `(2t + 8, 2t + 9)`, i.e. dims `4w, 4w + 2` and
/// `4w + 1, 4w + 3` of word `w`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn q_fragments<F: Float>(
    q: &Array<F>,
    frags: &mut Array<Pair<f16>>,
    row_at: usize,
    valid: bool,
    t: usize,
    scale: f32,
    #[comptime] off: usize,
    #[comptime] d: usize,
    #[comptime] c0: usize,
) {
    #[unroll]
    for c in 0..d / 16 {
        let w = k_word(t, c);
        let mut v = Array::<f32>::new(4usize);
        #[unroll]
        for i in 0..4usize {
            let mut x = f32::new(0.0);
            if valid {
                x = f32::cast_from(q[row_at + off + 4 * w + i]) * scale;
            }
            v[i] = x;
        }
        let mut p = Pair::<f32>::new(f32::new(0.0));
        p[0] = v[0];
        p[1] = v[2];
        let (h0, l0) = split(p);
        p[0] = v[1];
        p[1] = v[3];
        let (h1, l1) = split(p);
        frags[comptime!(4 * (c0 + c))] = h0;
        frags[comptime!(4 * (c0 + c) + 1)] = l0;
        frags[comptime!(4 * (c0 + c) + 2)] = h1;
        frags[comptime!(4 * (c0 + c) + 3)] = l1;
    }
}

/// Loads one key part's share of a step into registers: the codes of
/// this unit's B column key of each score block (`kb[nb]`, the words of
/// [`k_word`]) into `raw[nb·kw + c0 + cc]` (`kw` the k-steps of all
/// parts), and the block scales of its four score keys (`ks[kk]`) into
/// `sc[kk·kb_all + b0 + b]` (`kb_all` the blocks of all parts). `layout`:
/// the part's scale words a row and code words a head.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_keys<N: Size>(
    c: &Array<Vector<i32, N>>,
    cs: &Array<i32>,
    raw: &mut Array<u32>,
    sc: &mut Array<f32>,
    kb: &Array<usize>,
    ks: &Array<usize>,
    h: usize,
    t: usize,
    #[comptime] layout: (usize, usize, usize),
    #[comptime] d: usize,
    #[comptime] at: (usize, usize, usize, usize),
) {
    let (nb_row, head_words, kn) = layout;
    let (c0, kw, b0, kb_all) = at;
    // A row: its scales (one word a block), then its codes.
    let row_words = comptime!(nb_row * 9);
    #[unroll]
    for nb in 0..2usize {
        let base = kb[nb] * row_words + nb_row + h * head_words;
        // A block's two words of this unit, k-steps 2b and 2b + 1: one
        // 8-byte load where the rows are even (`kn` = 2).
        #[unroll]
        for cc in 0..d / 16 {
            if comptime!(kn == 1 || cc % 2 == 0) {
                let v = c[(base + k_word(t, cc)) / kn];
                #[unroll]
                for i in 0..kn {
                    raw[comptime!(nb * kw + c0 + cc + i)] = u32::reinterpret(v[i]);
                }
            }
        }
    }
    #[unroll]
    for kk in 0..4usize {
        let base = ks[kk] * row_words + h * comptime!(d / BLOCK);
        #[unroll]
        for b in 0..d / BLOCK {
            sc[comptime!(kk * kb_all + b0 + b)] = f32::reinterpret(cs[base + b]);
        }
    }
}

/// Adds the keys' contribution to this unit's four scores `s` of the
/// step (score block `nb`'s columns `2t, 2t + 1` at `s[2nb + e]`): for
/// each quantization block, two products from zero over the loaded codes
/// (`raw`, as [`load_keys`] left them), scaled by the score keys' block
/// scales (`sc`) as they join the score.
#[cube]
fn key_scores(
    raw: &Array<u32>,
    sc: &Array<f32>,
    qsh: &SharedMemory<Vector<u32, Const<4>>>,
    s: &mut Array<f32>,
    lane: usize,
    #[comptime] dk: usize,
) {
    let def = mma_def();
    let (kw, kb_all) = comptime!((dk / 16, dk / BLOCK));
    #[unroll]
    for nb in 0..2usize {
        #[unroll]
        for b in 0..kb_all {
            let mut acc = Array::<Pair<f32>>::new(2usize);
            acc[0] = Pair::<f32>::new(f32::new(0.0));
            acc[1] = Pair::<f32>::new(f32::new(0.0));
            #[unroll]
            for i in 0..2usize {
                let cc = comptime!(2 * b + i);
                let x = raw[comptime!(nb * kw + cc)];
                let mut bf = Array::<Pair<f16>>::new(2usize);
                bf[0] = codes(x);
                bf[1] = codes(x >> 8u32);
                let qv = qsh[cc * MMA_PLANE + lane];
                let mut af = Array::<Pair<f16>>::new(4usize);
                #[unroll]
                for r in 0..4usize {
                    af[r] = Pair::<f16>::reinterpret(qv[r]);
                }
                let out = def.execute(&af, &bf, &acc);
                acc[0] = out[0];
                acc[1] = out[1];
            }
            #[unroll]
            for e in 0..2usize {
                let kk = comptime!(2 * nb + e);
                s[kk] += sc[comptime!(kk * kb_all + b)] * (acc[0][e] + acc[1][e]);
            }
        }
    }
}

/// A byte pair as an exact `f16` pair: byte `j` of `a` (low half) and of
/// `b` (high half), from `x = a's bytes 0, 1 ‖ b's bytes 0, 1` (`j` < 2)
/// or `y` the same of bytes 2, 3.
#[cube]
fn value_codes(x: u32, y: u32, #[comptime] j: usize) -> Pair<f16> {
    let w = if comptime!(j < 2) { x } else { y };
    codes(w >> comptime!((8 * (j % 2)) as u32))
}

/// The tokens of a step from key `tile` on (keys past `hi` clamped to
/// its last): this unit's B column of each score block (`kb`), and its
/// four score / value keys (`ks`: columns `2t, 2t + 1` of both blocks).
#[cube]
fn step_tokens(
    kb: &mut Array<usize>,
    ks: &mut Array<usize>,
    tile: usize,
    hi: usize,
    first: usize,
    g: usize,
    t: usize,
) {
    #[unroll]
    for nb in 0..2usize {
        let key = (tile + nb * 8 + g).min(hi - 1);
        kb[nb] = first + key;
        #[unroll]
        for e in 0..2usize {
            let key = (tile + nb * 8 + 2 * t + e).min(hi - 1);
            ks[comptime!(2 * nb + e)] = first + key;
        }
    }
}

/// Issues every load of the step at `tile` into registers: key codes and
/// scales ([`load_keys`], both parts), this unit's value words (word `g`
/// of each value block of its four keys) and their scales. `dims`: `d0`,
/// `d1`, `dv`; `kv_heads` sets the rows' layout.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_step<N: Size>(
    c0: &Array<Vector<i32, N>>,
    c1: &Array<Vector<i32, N>>,
    s0: &Array<i32>,
    s1: &Array<i32>,
    cv: &Array<i32>,
    kraw: &mut Array<u32>,
    ksc: &mut Array<f32>,
    vw: &mut Array<u32>,
    vsc: &mut Array<f32>,
    tile: usize,
    hi: usize,
    first: usize,
    h: usize,
    lane: usize,
    #[comptime] kv_heads: usize,
    #[comptime] dims: (usize, usize, usize),
    #[comptime] kn: usize,
) {
    let (d0, d1, dv) = dims;
    let (g, t) = (lane / 4, lane % 4);
    let dk = comptime!(d0 + d1);
    let (kw, kb_all, vb) = comptime!((dk / 16, dk / BLOCK, dv / BLOCK));
    let (nb0, nb1, nbv) = comptime!((
        kv_heads * d0 / BLOCK,
        kv_heads * d1 / BLOCK,
        kv_heads * dv / BLOCK
    ));
    let mut kb = Array::<usize>::new(2usize);
    let mut ks = Array::<usize>::new(4usize);
    step_tokens(&mut kb, &mut ks, tile, hi, first, g, t);
    let parts0 = comptime!((0usize, kw, 0usize, kb_all));
    load_keys::<N>(
        c0,
        s0,
        kraw,
        ksc,
        &kb,
        &ks,
        h,
        t,
        (nb0, comptime!(d0 / 4), kn),
        d0,
        parts0,
    );
    if comptime!(d1 > 0) {
        let parts1 = comptime!((d0 / 16, kw, d0 / BLOCK, kb_all));
        load_keys::<N>(
            c1,
            s1,
            kraw,
            ksc,
            &kb,
            &ks,
            h,
            t,
            (nb1, comptime!(d1 / 4), kn),
            d1,
            parts1,
        );
    }
    #[unroll]
    for kk in 0..4usize {
        let row = ks[kk] * comptime!(nbv * 9);
        #[unroll]
        for bb in 0..vb {
            let at = row + nbv + h * comptime!(dv / 4) + bb * 8 + g;
            vw[comptime!(kk * vb + bb)] = u32::reinterpret(cv[at]);
            vsc[comptime!(kk * vb + bb)] = f32::reinterpret(cv[row + h * vb + bb]);
        }
    }
}

/// One step of 16 keys from `tile` on, its loads in registers (as
/// [`load_step`] left them): scores, mask (keys at or past this row's
/// `limit` or `hi`), the online softmax (`ml`: the row's running max and
/// this unit's share of its sum) and `o += p·v`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn compute_step(
    kraw: &Array<u32>,
    ksc: &Array<f32>,
    vw: &Array<u32>,
    vsc: &Array<f32>,
    qsh: &SharedMemory<Vector<u32, Const<4>>>,
    ml: &mut Array<f32>,
    o: &mut Array<Pair<f32>>,
    tile: usize,
    hi: usize,
    limit: usize,
    lane: usize,
    neg_inf: f32,
    #[comptime] dk: usize,
    #[comptime] dv: usize,
) {
    let def = mma_def();
    let t = lane % 4;
    let vb = comptime!(dv / BLOCK);
    let mut s = Array::<f32>::new(4usize);
    #[unroll]
    for i in 0..4usize {
        s[i] = f32::new(0.0);
    }
    key_scores(kraw, ksc, qsh, &mut s, lane, dk);
    // Mask, then the online softmax over the row's 16 keys.
    let m = ml[0];
    let mut mx = m;
    #[unroll]
    for i in 0..4usize {
        let key = tile + (i / 2) * 8 + 2 * t + i % 2;
        if key >= limit || key >= hi {
            s[i] = neg_inf;
        }
        mx = mx.max(s[i]);
    }
    mx = mx.max(plane_shuffle_xor(mx, 1u32));
    mx = mx.max(plane_shuffle_xor(mx, 2u32));
    if mx > m {
        // A row with no visible key before has a zero output.
        let corr = (m - mx).exp();
        ml[1] *= corr;
        #[unroll]
        for i in 0..dv / 4 {
            o[i] = o[i] * Pair::<f32>::new(corr);
        }
        ml[0] = mx;
    }
    let mut p = Array::<f32>::new(4usize);
    #[unroll]
    for i in 0..4usize {
        let mut x = f32::new(0.0);
        if s[i] != neg_inf {
            x = (s[i] - mx).exp();
        }
        ml[1] += x;
        p[i] = x;
    }
    // O += P·V, a 32-dim value block at a time.
    #[unroll]
    for bb in 0..vb {
        let mut af = Array::<Pair<f16>>::new(4usize);
        #[unroll]
        for half in 0..2usize {
            let mut x = Pair::<f32>::new(f32::new(0.0));
            #[unroll]
            for e in 0..2usize {
                let kk = comptime!(2 * half + e);
                x[e] = p[kk] * vsc[comptime!(kk * vb + bb)];
            }
            let (hp, lp) = split(x);
            af[comptime!(2 * half)] = hp;
            af[comptime!(2 * half + 1)] = lp;
        }
        // Keys 2t, 2t + 1 (x) and 2t + 8, 2t + 9 (y) of this block's
        // word g, bytes interleaved a pair of keys at a time.
        let (w0, w1) = (vw[bb], vw[comptime!(vb + bb)]);
        let (w2, w3) = (vw[comptime!(2 * vb + bb)], vw[comptime!(3 * vb + bb)]);
        let x01 = (w0 & 0xffffu32) | (w1 << 16u32);
        let y01 = (w0 >> 16u32) | (w1 & 0xffff_0000u32);
        let x89 = (w2 & 0xffffu32) | (w3 << 16u32);
        let y89 = (w2 >> 16u32) | (w3 & 0xffff_0000u32);
        #[unroll]
        for j in 0..4usize {
            let mut bf = Array::<Pair<f16>>::new(2usize);
            bf[0] = value_codes(x01, y01, j);
            bf[1] = value_codes(x89, y89, j);
            let n = comptime!(4 * bb + j);
            let mut acc = Array::<Pair<f32>>::new(2usize);
            acc[0] = o[comptime!(2 * n)];
            acc[1] = o[comptime!(2 * n + 1)];
            let out = def.execute(&af, &bf, &acc);
            o[comptime!(2 * n)] = out[0];
            o[comptime!(2 * n + 1)] = out[1];
        }
    }
}

/// Decode attention over q8 caches on tensor cores (module doc). Cube:
/// `WARPS` planes of 32 units; `CUBE_POS_X` the (batch, kv head),
/// `CUBE_POS_Y` the key chunk. Writes each chunk's partial as
/// `kv_attention`'s decode kernel does. Each plane's steps are software
/// pipelined: two sets of registers, the next step's loads issued before
/// this step's arithmetic.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn kv_decode_mma_kernel<F: Float + CubeElement, N: Size>(
    q: &Array<F>,
    c0: &Array<Vector<i32, N>>,
    c1: &Array<Vector<i32, N>>,
    s0: &Array<i32>,
    s1: &Array<i32>,
    cv: &Array<i32>,
    m_out: &mut Array<f32>,
    l_out: &mut Array<f32>,
    acc_out: &mut Array<f32>,
    rows: usize,
    t_len: usize,
    s_len: usize,
    chunk: usize,
    slots: usize,
    scale: f32,
    neg_inf: f32,
    #[comptime] causal: bool,
    #[comptime] kv_heads: usize,
    #[comptime] d0: usize,
    #[comptime] d1: usize,
    #[comptime] dv: usize,
    #[comptime] nq: usize,
    #[comptime] kn: usize,
) {
    let dk = comptime!(d0 + d1);
    let bh = CUBE_POS_X as usize;
    let split_at = CUBE_POS_Y as usize;
    let (b, h) = (bh / kv_heads, bh % kv_heads);
    let lane = UNIT_POS_X as usize;
    let warp = UNIT_POS_Y as usize;
    let (g, t) = (lane / 4, lane % 4);

    // q's fragments (row g of this head's rows, zero past them), shared
    // by the cube's planes: k-step c's four registers of unit `lane` at
    // `c · 32 + lane`.
    let mut qsh = SharedMemory::<Vector<u32, Const<4>>>::new(comptime!(dk / 16 * MMA_PLANE));
    if warp == 0 {
        let mut qf = Array::<Pair<f16>>::new(comptime!(dk / 4));
        let valid = g < rows;
        let row_at = (bh * rows + g) * dk;
        q_fragments::<F>(q, &mut qf, row_at, valid, t, scale, 0usize, d0, 0usize);
        if comptime!(d1 > 0) {
            q_fragments::<F>(
                q,
                &mut qf,
                row_at,
                valid,
                t,
                scale,
                d0,
                d1,
                comptime!(d0 / 16),
            );
        }
        #[unroll]
        for c in 0..dk / 16 {
            let mut v = Vector::<u32, Const<4>>::new(0u32);
            #[unroll]
            for r in 0..4usize {
                v[r] = u32::reinterpret(qf[comptime!(4 * c + r)]);
            }
            qsh[c * MMA_PLANE + lane] = v;
        }
    }
    sync_cube();
    let mut limits = Array::<usize>::new(nq);
    let hi = visible_keys(
        &mut limits,
        0,
        rows,
        t_len,
        s_len,
        split_at * chunk + chunk,
        nq,
        causal,
    );
    // This unit's row's limit (rows past nq or past `rows` see nothing).
    let mut limit = 0;
    #[unroll]
    for r in 0..nq {
        if g == r {
            limit = limits[r];
        }
    }
    let lo = split_at * chunk;
    let first = b * s_len;
    let mut ml = Array::<f32>::new(2usize);
    ml[0] = neg_inf;
    ml[1] = f32::new(0.0);
    let nblocks = comptime!(dv / 8);
    let mut o = Array::<Pair<f32>>::new(comptime!(2 * nblocks));
    #[unroll]
    for i in 0..2 * nblocks {
        o[i] = Pair::<f32>::new(f32::new(0.0));
    }
    let (kw, kb_all, vb) = comptime!((dk / 16, dk / BLOCK, dv / BLOCK));
    let dims = comptime!((d0, d1, dv));
    // Two register sets, a and b, in turn.
    let mut ka = Array::<u32>::new(comptime!(2 * kw));
    let mut ksa = Array::<f32>::new(comptime!(4 * kb_all));
    let mut va = Array::<u32>::new(comptime!(4 * vb));
    let mut vsa = Array::<f32>::new(comptime!(4 * vb));
    let mut kb = Array::<u32>::new(comptime!(2 * kw));
    let mut ksb = Array::<f32>::new(comptime!(4 * kb_all));
    let mut vbr = Array::<u32>::new(comptime!(4 * vb));
    let mut vsb = Array::<f32>::new(comptime!(4 * vb));
    let stride = comptime!(WARPS * STEP);
    let mut tile = lo + warp * STEP;
    if tile < hi {
        load_step::<N>(
            c0, c1, s0, s1, cv, &mut ka, &mut ksa, &mut va, &mut vsa, tile, hi, first, h, lane,
            kv_heads, dims, kn,
        );
    }
    while tile < hi {
        let next = tile + stride;
        load_step::<N>(
            c0, c1, s0, s1, cv, &mut kb, &mut ksb, &mut vbr, &mut vsb, next, hi, first, h, lane,
            kv_heads, dims, kn,
        );
        compute_step(
            &ka, &ksa, &va, &vsa, &qsh, &mut ml, &mut o, tile, hi, limit, lane, neg_inf, dk, dv,
        );
        let after = next + stride;
        if next < hi {
            load_step::<N>(
                c0, c1, s0, s1, cv, &mut ka, &mut ksa, &mut va, &mut vsa, after, hi, first, h,
                lane, kv_heads, dims, kn,
            );
            compute_step(
                &kb, &ksb, &vbr, &vsb, &qsh, &mut ml, &mut o, next, hi, limit, lane, neg_inf, dk,
                dv,
            );
        }
        tile = after;
    }
    // The row's sum over its four units; rows' halves summed.
    let mut l = ml[1];
    l += plane_shuffle_xor(l, 1u32);
    l += plane_shuffle_xor(l, 2u32);
    let mut m_sh = SharedMemory::<f32>::new(comptime!(WARPS * nq));
    let mut l_sh = SharedMemory::<f32>::new(comptime!(WARPS * nq));
    let mut a_sh = SharedMemory::<f32>::new(comptime!(WARPS * nq * dv));
    if g < nq {
        if t == 0 {
            m_sh[warp * nq + g] = ml[0];
            l_sh[warp * nq + g] = l;
        }
        #[unroll]
        for n in 0..nblocks {
            let (bb, j) = comptime!((n / 4, n % 4));
            let at = (warp * nq + g) * dv + bb * BLOCK + 8 * t + j;
            a_sh[at] = o[comptime!(2 * n)][0] + o[comptime!(2 * n + 1)][0];
            a_sh[at + 4] = o[comptime!(2 * n)][1] + o[comptime!(2 * n + 1)][1];
        }
    }
    sync_cube();
    combine_planes(
        &m_sh, &l_sh, &a_sh, m_out, l_out, acc_out, bh, rows, slots, split_at, neg_inf, nq, dv,
        MMA_PLANE,
    );
}

/// Cubes a multiprocessor holds at once: two of 128 units at the
/// kernel's 255 registers a unit (ptxas, sm_90).
const CUBES_PER_SM: usize = 2;

/// `CARAMBA_KV_MMA`, read once per process (for benchmarks): `0` turns
/// the kernel off (the CUDA-core kernel instead), `n` asks for `n` waves
/// of cubes; unset, one wave.
fn waves() -> usize {
    static WAVES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *WAVES.get_or_init(|| {
        std::env::var("CARAMBA_KV_MMA")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1)
    })
}

/// The number of key chunks for `bh` (batch, kv head) pairs: one wave of
/// cubes where the device tells its multiprocessors (every plane walks
/// a long chunk, so that its pipeline's start, `q`'s fragments and the
/// planes' merge are paid once per wave), else about 2048 cubes.
pub(crate) fn splits<R: Runtime>(client: &ComputeClient<R>, bh: usize) -> usize {
    match client.properties().hardware.num_streaming_multiprocessors {
        Some(sms) => (waves() * CUBES_PER_SM * sms as usize / bh.max(1)).max(1),
        None => 2048usize.div_ceil(bh.max(1)),
    }
}

/// Words a load of the key caches' codes: 2 where every part's rows of
/// `heads` kv heads have an even number of scale words (then a unit's two
/// words of a block are 8-byte aligned), else 1.
pub(crate) fn key_words(heads: usize, keys: &[CachePart]) -> usize {
    if keys
        .iter()
        .all(|k| (heads * k.dim / BLOCK).is_multiple_of(2))
    {
        2
    } else {
        1
    }
}

/// Whether the kernel serves a decode step of `rows` query rows per kv
/// head over these caches on `client`'s device (module doc), unless
/// `CARAMBA_KV_MMA=0`.
pub(crate) fn serves<R: Runtime>(
    client: &ComputeClient<R>,
    keys: &[CachePart],
    values: &CachePart,
    rows: usize,
) -> bool {
    if waves() == 0 {
        return false;
    }
    let q8 = |p: &CachePart| p.format == Q8 && p.dim > 0 && p.dim.is_multiple_of(BLOCK);
    let dk: usize = keys.iter().map(|k| k.dim).sum();
    has_half_mma(client, cubecl::ir::FloatKind::F16)
        && (1..=2).contains(&keys.len())
        && keys.iter().chain([values]).all(q8)
        && dk <= MMA_MAX_DK
        && values.dim <= MMA_MAX_DV
        && (1..=MMA_ROWS).contains(&rows)
}
