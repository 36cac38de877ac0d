//! Decode attention over q8 and q4 caches on tensor cores: the
//! `kv_attention` kernel for a decode step (at most `KV_QUERIES` query rows
//! per kv head) whose key and value caches are q8 or q4 with head slices of
//! whole quantization blocks, on CUDA devices with `mma.sync.m16n8k16` for
//! `f16` (sm_80 on). Same partials as `kv_attention`'s decode kernel (one
//! per key chunk, combined by its combine kernel), same semantics. The
//! description below is of q8; q4 differs where its codes are read
//! ([`key_scores_s8`], [`compute_step`], [`nibble_codes`]).
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
//! logic instruction and one half-pair subtraction per two codes (the
//! bias comes in as a kernel argument: with both the mask and the bias
//! known, ptxas spends two logic instructions).
//!
//! The softmax runs in base 2 (`q` pre-scaled by `log₂ e`, one
//! `ex2.approx` a score, as in `attention_tc`); the partials' maxima are
//! written back in natural units for the combine.
//!
//! **Staging.** A plane's steps go through shared memory: each step's key
//! and value codes and scales are copied there by `cp.async` (16- or
//! 8-byte copies of codes, 4-byte copies of scales, spread over the
//! plane), `stages − 1` steps ahead of the step the plane computes on, and
//! read back as the products take them. The bytes in flight then take no
//! registers (the register-pipelined version held two steps in about 160
//! of its 255), and the kernel fits in 128 registers. The cube's planes
//! meet on one barrier a stage. Staged rows are padded so that the rows a
//! plane reads at once fall in distinct banks (an XOR swizzle instead
//! saved the padding but cost 20% more instructions, NOTES).
//!
//! **Integer scores.** Where the device has `mma.sync.m16n8k32` for s8
//! (sm_80 on), the score products run there instead: the key codes are
//! the B operand as they are (no unpacking, one product a block instead
//! of two) and `q` goes in as two int8 halves per row
//! ([`q_fragments_s8`], [`key_scores_s8`]). On the H200: 14% fewer
//! instructions, 89.6 µs against 92.8 (Nsight Compute), 81% of the copy's
//! rate (NOTES, twenty-fourth session). `CARAMBA_KV_IMMA=0` keeps the
//! `f16` score products, which the module doc above describes and which
//! serve devices without the integer ones.
//!
//! **q4.** A q4 code (`c + 8` in a nibble) goes into the integer score
//! products as a signed byte (three logic and integer instructions per
//! four codes) and into the value products as an exact `f16` like a q8
//! code; a unit takes a block's word `t` of a key (scores) and half `g %
//! 2` of word `g / 2` of a value (the same dims `4g..4g + 3` as q8's word
//! `g`). q4 keys need the integer products (their `f16` score path is not
//! written). On the H200 q4 decode went from 0.25 ms (CUDA-core kernel)
//! to 0.087–0.088 ms (2 stages); its step loop is 838 instructions
//! against q8's 755 for half the bytes (NOTES, twenty-fourth session).
//!
//! Where it stops: q8 or q4 keys (every key part the same) and values,
//! every part's head slice a multiple of 32 dims and an even number of
//! scale words a cache row (the copies are at least 8 bytes), at most
//! [`MMA_MAX_DK`] key dims and [`MMA_MAX_DV`] value dims per head
//! (registers), at most 8 query rows per kv head; anything else (NF4,
//! whose levels are not integers, among it) takes the CUDA-core decode
//! kernel.

use crate::attention_tc::{env_choice, fast_exp2, has_half_mma};
use crate::kv_attention::{combine_planes, visible_keys, CachePart, WARPS};
use crate::quant::{BLOCK, Q4, Q8};
use cubecl::cmma::MmaDefinition;
use cubecl::prelude::barrier::{copy_async, Barrier};
use cubecl::prelude::*;
use half::f16;
use std::f32::consts::{LN_2, LOG2_E};

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
/// exact `f16` pair. `bias` is [`CODE_BIAS`], passed in at run time so
/// that the mask and the bias take one `LOP3` (an instruction takes one
/// immediate operand; with both known, ptxas emits two).
#[cube]
fn codes(x: u32, bias: u32) -> Pair<f16> {
    let bits = (x & 0x00ff_00ffu32) ^ bias;
    Pair::<f16>::reinterpret(bits) - Pair::<f16>::new(f16::new(1152.0))
}

/// The exponent of 1024 in both halves of a word, and each code's top bit
/// flipped: `(c + 128) + 1024` as an `f16` once the code is in place.
pub(crate) const CODE_BIAS: u32 = 0x6480_6480;

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

/// Adds the keys' contribution to this unit's four scores `s` of the
/// step staged in buffer `buf` (score block `nb`'s columns `2t, 2t + 1`
/// at `s[2nb + e]`): for each quantization block, two products from zero
/// over the codes of the unit's B column key (words `8b + 2t` and `8b +
/// 2t + 1` of block `b`, one 8-byte load: k-steps `2b`, `2b + 1`), scaled
/// by the score keys' block scales as they join the score.
#[cube]
fn key_scores(
    sh: &Staged,
    qsh: &SharedMemory<Vector<u32, Const<4>>>,
    s: &mut Array<f32>,
    buf: usize,
    lane: usize,
    bias: u32,
    #[comptime] dk: usize,
) {
    let def = mma_def();
    let (g, t) = (lane / 4, lane % 4);
    let words = comptime!(key_stage_words(dk, 8));
    let (kst, kb_all) = comptime!((key_stride(dk, 8), dk / BLOCK));
    #[unroll]
    for nb in 0..2usize {
        let row = (buf * comptime!(words[0]) + (nb * 8 + g) * kst) / 2;
        #[unroll]
        for b in 0..kb_all {
            let pair = sh.keys[row + 4 * b + t];
            let mut acc = Array::<Pair<f32>>::new(2usize);
            acc[0] = Pair::<f32>::new(f32::new(0.0));
            acc[1] = Pair::<f32>::new(f32::new(0.0));
            #[unroll]
            for i in 0..2usize {
                let cc = comptime!(2 * b + i);
                let x = u32::reinterpret(pair[i]);
                let mut bf = Array::<Pair<f16>>::new(2usize);
                bf[0] = codes(x, bias);
                bf[1] = codes(x >> 8u32, bias);
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
                let key = comptime!(8 * nb + e) + 2 * t;
                let scale = sh.key_scales[buf * comptime!(words[1]) + key * kb_all + b];
                s[comptime!(2 * nb + e)] += f32::reinterpret(scale) * (acc[0][e] + acc[1][e]);
            }
        }
    }
}

#[cube]
fn imma_def() -> MmaDefinition<i8, i8, i32> {
    MmaDefinition::<i8, i8, i32>::new(16usize, 8usize, 32usize)
}

/// Four signed bytes in a word, `v[0]` lowest.
#[cube]
fn pack_s8(v: &Array<i32>, #[comptime] at: usize) -> u32 {
    let mut w = 0u32;
    #[unroll]
    for i in 0..4usize {
        w |= (u32::cast_from(v[comptime!(at + i)]) & 0xffu32) << comptime!((8 * i) as u32);
    }
    w
}

/// `q`'s rows (pre-scaled) as two int8 halves for the integer score
/// products ([`key_scores_s8`]), one 32-dim block a product: per row,
/// `q ≈ s/256 · (256·h + l)` with `s = max|q| / 127`, `h = round(q / s)`
/// and `l = round(256 · (q − h·s) / s)` (clamped to ±127; NOTES,
/// twenty-third session, has the precision). Unit `(g, t)` holds each
/// block's dims `8t..8t+7` of row `g`, as [`key_scores_s8`] pairs them
/// with k-indices for keys of `kbits`: for q8 `8t..8t+3` are its k-indices
/// `4t..4t+3` (the keys' word `2t`) and `8t+4..8t+7` its `16+4t..` (word
/// `2t + 1`); for q4 (word `t`) the even dims `8t, 8t+2, ..` are `4t..`
/// and the odd ones `16+4t..`. A registers `[h, l, h, l]` of the two
/// (rows `g` and `g + 8` of the product), at `qsh[b · 32 + lane]`; `s/256`
/// at `qscale[g]`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn q_fragments_s8<F: Float>(
    q: &Array<F>,
    qsh: &mut SharedMemory<Vector<u32, Const<4>>>,
    qscale: &mut SharedMemory<f32>,
    row_at: usize,
    valid: bool,
    lane: usize,
    scale: f32,
    #[comptime] dk: usize,
    #[comptime] kbits: usize,
) {
    let (g, t) = (lane / 4, lane % 4);
    // The row's largest |q| (its four units hold it all).
    let mut m = f32::new(0.0);
    if valid {
        #[unroll]
        for b in 0..dk / BLOCK {
            #[unroll]
            for i in 0..8usize {
                let v = f32::cast_from(q[row_at + comptime!(b * BLOCK) + 8 * t + i]) * scale;
                m = m.max(v.abs());
            }
        }
    }
    m = m.max(plane_shuffle_xor(m, 1u32));
    m = m.max(plane_shuffle_xor(m, 2u32));
    let s = m / f32::new(127.0);
    let mut inv = f32::new(0.0);
    if m > f32::new(0.0) {
        inv = f32::new(127.0) / m;
    }
    if t == 0 {
        qscale[g] = s / f32::new(256.0);
    }
    #[unroll]
    for b in 0..dk / BLOCK {
        let mut x = Array::<f32>::new(8usize);
        #[unroll]
        for i in 0..8usize {
            let mut v = f32::new(0.0);
            if valid {
                v = f32::cast_from(q[row_at + comptime!(b * BLOCK) + 8 * t + i]) * scale;
            }
            x[i] = v;
        }
        let mut hl = Array::<i32>::new(16usize);
        #[unroll]
        for i in 0..8usize {
            let h = (x[i] * inv).round();
            let l = ((x[i] - h * s) * inv * f32::new(256.0))
                .round()
                .clamp(f32::new(-127.0), f32::new(127.0));
            // Words: h of the first k-indices' four dims, their l, h of
            // the second four, their l.
            let at = comptime!(if kbits == 8 {
                8 * (i / 4) + i % 4
            } else {
                8 * (i % 2) + i / 2
            });
            hl[at] = i32::cast_from(h);
            hl[comptime!(at + 4)] = i32::cast_from(l);
        }
        let mut v = Vector::<u32, Const<4>>::new(0u32);
        #[unroll]
        for r in 0..4usize {
            v[r] = pack_s8(&hl, comptime!(4 * r));
        }
        qsh[comptime!(b * MMA_PLANE) + lane] = v;
    }
}

/// [`key_scores`] on integer tensor cores (the default where the device
/// has them): each block's product takes the unit's B column key's codes
/// against `q`'s int8 halves ([`q_fragments_s8`]); `256·hi + lo` is exact
/// in 32 bits, the key's block scale weighs it, and `sq` (`s/256` of this
/// unit's row) scales the sum. q8 codes are the int8 operand as they are
/// (an 8-byte load: words `2t` and `2t + 1` of the block, its k-indices
/// `4t..` and `16+4t..`); q4 codes (`c + 8` in a nibble) take word `t` of
/// the block, its even nibbles the k-indices `4t..` and its odd ones
/// `16+4t..`, each made a signed byte `(u + 0x78) ^ 0x80` (no carry
/// leaves a byte).
#[cube]
#[allow(clippy::too_many_arguments)]
fn key_scores_s8(
    sh: &Staged,
    qsh: &SharedMemory<Vector<u32, Const<4>>>,
    sq: f32,
    s: &mut Array<f32>,
    buf: usize,
    lane: usize,
    #[comptime] dk: usize,
    #[comptime] kbits: usize,
) {
    let def = imma_def();
    let (g, t) = (lane / 4, lane % 4);
    let words = comptime!(key_stage_words(dk, kbits));
    let (kst, kb_all) = comptime!((key_stride(dk, kbits), dk / BLOCK));
    // Pairs of words a block, and this unit's pair in it.
    let per_block = comptime!(code_words(BLOCK, kbits) / 2);
    let mut at = t;
    if comptime!(kbits == 4) {
        at = t / 2;
    }
    let odd = t % 2 == 1;
    #[unroll]
    for nb in 0..2usize {
        let row = (buf * comptime!(words[0]) + (nb * 8 + g) * kst) / 2;
        #[unroll]
        for b in 0..kb_all {
            let pair = sh.keys[row + comptime!(per_block * b) + at];
            let qv = qsh[comptime!(b * MMA_PLANE) + lane];
            let mut af = Array::<Vector<i8, Const<4>>>::new(4usize);
            #[unroll]
            for r in 0..4usize {
                af[r] = Vector::<i8, Const<4>>::reinterpret(qv[r]);
            }
            let mut bf = Array::<Vector<i8, Const<4>>>::new(2usize);
            if comptime!(kbits == 8) {
                bf[0] = Vector::<i8, Const<4>>::reinterpret(pair[0]);
                bf[1] = Vector::<i8, Const<4>>::reinterpret(pair[1]);
            } else {
                let x = u32::reinterpret(select(odd, pair[1], pair[0]));
                bf[0] = nibbles_s8(x);
                bf[1] = nibbles_s8(x >> 4u32);
            }
            let mut acc = Array::<Vector<i32, Const<2>>>::new(2usize);
            acc[0] = Vector::<i32, Const<2>>::new(0i32);
            acc[1] = Vector::<i32, Const<2>>::new(0i32);
            let out = def.execute(&af, &bf, &acc);
            #[unroll]
            for e in 0..2usize {
                let key = comptime!(8 * nb + e) + 2 * t;
                let scale = sh.key_scales[buf * comptime!(words[1]) + key * kb_all + b];
                let x = f32::cast_from(out[0][e] * 256i32 + out[1][e]);
                s[comptime!(2 * nb + e)] += f32::reinterpret(scale) * x;
            }
        }
    }
    #[unroll]
    for i in 0..4usize {
        s[i] *= sq;
    }
}

/// The q4 codes in the low nibbles of `x`'s four bytes (`u = c + 8`) as
/// signed bytes `c`: `(u + 0x78) ^ 0x80`, which carries out of no byte.
#[cube]
fn nibbles_s8(x: u32) -> Vector<i8, Const<4>> {
    Vector::<i8, Const<4>>::reinterpret(((x & 0x0f0f_0f0fu32) + 0x7878_7878u32) ^ 0x8080_8080u32)
}

/// A byte pair as an exact `f16` pair: byte `j` of `a` (low half) and of
/// `b` (high half), from `x = a's bytes 0, 1 ‖ b's bytes 0, 1` (`j` < 2)
/// or `y` the same of bytes 2, 3.
#[cube]
fn value_codes(x: u32, y: u32, bias: u32, #[comptime] j: usize) -> Pair<f16> {
    let w = if comptime!(j < 2) { x } else { y };
    codes(w >> comptime!((8 * (j % 2)) as u32), bias)
}

/// Two q4 codes (`c + 8`, the low nibbles of both halves of `x`) as an
/// exact `f16` pair: `(c + 8) + 1024` in place, less 1032. `bias` is
/// [`NIBBLE_BIAS`], passed in at run time as [`CODE_BIAS`] is.
#[cube]
fn nibble_codes(x: u32, bias: u32) -> Pair<f16> {
    let bits = (x & 0x000f_000fu32) | bias;
    Pair::<f16>::reinterpret(bits) - Pair::<f16>::new(f16::new(1032.0))
}

/// The exponent of 1024 in both halves of a word: [`CODE_BIAS`] without
/// the flipped top bits (the kernel derives it so).
pub(crate) const NIBBLE_BIAS: u32 = 0x6400_6400;
const _: () = assert!(CODE_BIAS & 0xff7f_ff7f == NIBBLE_BIAS);

/// Words of codes of `d` dims at `bits` bits a code (8: q8, 4: q4).
pub(crate) const fn code_words(d: usize, bits: usize) -> usize {
    d * bits / 32
}

/// Words of a staged key row (every key part's codes), padded so that the
/// rows a plane reads at once fall in distinct banks. q8: `dk / 4` words,
/// plus 8 where that is a multiple of 16 (a plane reads 8-byte words of 8
/// rows at once, half a plane a pass, and a stride of 8 (mod 32) words
/// puts each pass's 4 rows in distinct banks). q4: `dk / 8` words, plus 4
/// where that is a multiple of 8 (the plane reads two 8-byte words of 8
/// rows at once, and a stride of 4 (mod 8) words spreads them over the 32
/// banks).
pub(crate) const fn key_stride(dk: usize, bits: usize) -> usize {
    let w = code_words(dk, bits);
    let pad = if bits == 8 { 16 } else { 8 };
    if w.is_multiple_of(pad) {
        w + pad / 2
    } else {
        w
    }
}

/// Words of a staged value row, padded to 4 or 12 (mod 16) words: a unit
/// group reads one word (q8: word `g`, q4: word `g / 2`) of the rows `2t
/// (+ 1)`, and that stride puts the 4 rows of a pass in distinct banks.
pub(crate) const fn value_stride(dv: usize, bits: usize) -> usize {
    let w = code_words(dv, bits);
    if w % 16 == 4 || w % 16 == 12 {
        w
    } else {
        w + 4
    }
}

/// Words of one plane's stage of keys, per buffer: codes, scales (the
/// first two of [`stage_words`]).
pub(crate) const fn key_stage_words(dk: usize, kbits: usize) -> [usize; 2] {
    [STEP * key_stride(dk, kbits), STEP * (dk / BLOCK)]
}

/// Words of one plane's stage, per buffer: key codes, key scales, value
/// codes, value scales (`STEP` rows each), for keys and values of
/// `bits = (key bits, value bits)`.
pub(crate) const fn stage_words(dk: usize, dv: usize, bits: (usize, usize)) -> [usize; 4] {
    let [keys, key_scales] = key_stage_words(dk, bits.0);
    [
        keys,
        key_scales,
        STEP * value_stride(dv, bits.1),
        STEP * (dv / BLOCK),
    ]
}

/// One asynchronous copy of `words` 4-byte words from element `from` of
/// `src` to unit `to` of `dst` (both in their own element units).
#[cube]
fn copy_words<S: CubePrimitive, D: CubePrimitive>(
    src: &Array<S>,
    from: usize,
    dst: &mut SharedMemory<D>,
    to: usize,
    #[comptime] words: u32,
) {
    unsafe {
        copy_async::<i32>(
            &src.slice(from, from + 1).downcast_unchecked::<i32>(),
            &mut dst.slice_mut(to, to + 1).downcast_unchecked::<i32>(),
            words,
        );
    }
}

/// Copies one cache part's codes of the step's `STEP` keys from row `row0`
/// on (rows past `last` take it) into `dst`: key `k`'s [`code_words`] at
/// word `to + k · stride` (`du` words a unit of `dst`), in copies of `kn`
/// words spread over the plane. `layout`: the part's scale words a row
/// (`nb_row`), head dims (`d`) and bits a code (a row: `nb_row` scales,
/// then `nb_row` blocks of `bits` words of codes).
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_codes<N: Size, D: CubePrimitive>(
    src: &Array<Vector<i32, N>>,
    dst: &mut SharedMemory<D>,
    to: usize,
    row0: usize,
    last: usize,
    h: usize,
    lane: usize,
    #[comptime] layout: (usize, usize, usize),
    #[comptime] stride: usize,
    #[comptime] du: usize,
    #[comptime] kn: usize,
) {
    let (nb_row, d, bits) = layout;
    let per_row = comptime!(code_words(d, bits) / kn);
    // A row in copies, and the head's first copy in it.
    let row_copies = comptime!(nb_row * (1 + code_words(BLOCK, bits)) / kn);
    let head = (comptime!(nb_row) + h * comptime!(code_words(d, bits))) / comptime!(kn);
    if comptime!(MMA_PLANE.is_multiple_of(per_row)) {
        // Unit `lane` takes copy `lane % per_row` of keys `lane / per_row
        // + n · per_pass`: the column and the destination are the unit's
        // for every key.
        let per_pass = comptime!(MMA_PLANE / per_row);
        let (k0, c) = (lane / per_row, lane % per_row);
        let from = head + c;
        let at = (to + k0 * stride + c * kn) / du;
        #[unroll]
        for n in 0..comptime!(STEP.div_ceil(per_pass)) {
            if comptime!(per_pass <= STEP) || k0 < STEP {
                let row = (row0 + k0 + comptime!(n * per_pass)).min(last);
                let to_n = at + comptime!(n * per_pass * stride / du);
                copy_words(
                    src,
                    row * row_copies + from,
                    dst,
                    to_n,
                    comptime!(kn as u32),
                );
            }
        }
    } else {
        let total = comptime!(STEP * per_row);
        #[unroll]
        for n in 0..comptime!(total.div_ceil(MMA_PLANE)) {
            let i = lane + n * MMA_PLANE;
            if comptime!(total.is_multiple_of(MMA_PLANE)) || i < total {
                let (k, c) = (i / per_row, i % per_row);
                let row = (row0 + k).min(last);
                let at = to + k * stride + c * kn;
                copy_words(
                    src,
                    row * row_copies + head + c,
                    dst,
                    at / du,
                    comptime!(kn as u32),
                );
            }
        }
    }
}

/// Copies one cache part's block scales of the step's keys (as
/// [`stage_codes`]): key `k`'s `d / 32` scales at `to + k · stride`, one
/// 4-byte copy each.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_scales(
    src: &Array<i32>,
    dst: &mut SharedMemory<i32>,
    to: usize,
    row0: usize,
    last: usize,
    h: usize,
    lane: usize,
    #[comptime] layout: (usize, usize, usize),
    #[comptime] stride: usize,
) {
    let (nb_row, d, bits) = layout;
    let per_row = comptime!(d / BLOCK);
    let row_words = comptime!(nb_row * (1 + code_words(BLOCK, bits)));
    let head = h * per_row;
    if comptime!(MMA_PLANE.is_multiple_of(per_row)) {
        let per_pass = comptime!(MMA_PLANE / per_row);
        let (k0, c) = (lane / per_row, lane % per_row);
        let from = head + c;
        let at = to + k0 * stride + c;
        #[unroll]
        for n in 0..comptime!(STEP.div_ceil(per_pass)) {
            if comptime!(per_pass <= STEP) || k0 < STEP {
                let row = (row0 + k0 + comptime!(n * per_pass)).min(last);
                copy_words(
                    src,
                    row * row_words + from,
                    dst,
                    at + comptime!(n * per_pass * stride),
                    1u32,
                );
            }
        }
    } else {
        let total = comptime!(STEP * per_row);
        #[unroll]
        for n in 0..comptime!(total.div_ceil(MMA_PLANE)) {
            let i = lane + n * MMA_PLANE;
            if comptime!(total.is_multiple_of(MMA_PLANE)) || i < total {
                let (k, c) = (i / per_row, i % per_row);
                let row = (row0 + k).min(last);
                copy_words(
                    src,
                    row * row_words + head + c,
                    dst,
                    to + k * stride + c,
                    1u32,
                );
            }
        }
    }
}

/// The shared buffers a cube stages its steps in, `stages` per plane
/// ([`stage_words`] words each).
#[derive(CubeType)]
struct Staged {
    keys: SharedMemory<Vector<i32, Const<2>>>,
    key_scales: SharedMemory<i32>,
    /// Words of codes, held as `f32` so that the planes' outputs can take
    /// their place at the end.
    values: SharedMemory<f32>,
    value_scales: SharedMemory<i32>,
}

/// Issues the asynchronous copies of this plane's step at `tile` into
/// buffer `buf` (the plane's and stage's): both key parts' codes and
/// scales, the values' codes and scales. `dims`: `d0`, `d1`, `dv`;
/// `kv_heads` and `bits` (the keys' and the values' bits a code) set the
/// rows' layout, `kn` the words a code copy.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_step<N: Size>(
    c0: &Array<Vector<i32, N>>,
    c1: &Array<Vector<i32, N>>,
    s0: &Array<i32>,
    s1: &Array<i32>,
    cvn: &Array<Vector<i32, N>>,
    cv: &Array<i32>,
    sh: &mut Staged,
    buf: usize,
    tile: usize,
    hi: usize,
    first: usize,
    h: usize,
    lane: usize,
    #[comptime] kv_heads: usize,
    #[comptime] dims: (usize, usize, usize),
    #[comptime] bits: (usize, usize),
    #[comptime] kn: usize,
) {
    let (d0, d1, dv) = dims;
    let (kbits, vbits) = bits;
    let dk = comptime!(d0 + d1);
    let words = comptime!(stage_words(dk, dv, bits));
    let (kst, vst) = comptime!((key_stride(dk, kbits), value_stride(dv, vbits)));
    let (kb_all, vb) = comptime!((dk / BLOCK, dv / BLOCK));
    let (nb0, nb1, nbv) = comptime!((
        kv_heads * d0 / BLOCK,
        kv_heads * d1 / BLOCK,
        kv_heads * dv / BLOCK
    ));
    let (k_at, s_at) = (buf * comptime!(words[0]), buf * comptime!(words[1]));
    // Keys past `hi` take its last.
    let (row0, last) = (first + tile, first + hi - 1);
    stage_codes::<N, Vector<i32, Const<2>>>(
        c0,
        &mut sh.keys,
        k_at,
        row0,
        last,
        h,
        lane,
        (nb0, d0, kbits),
        kst,
        2usize,
        kn,
    );
    stage_scales(
        s0,
        &mut sh.key_scales,
        s_at,
        row0,
        last,
        h,
        lane,
        (nb0, d0, kbits),
        kb_all,
    );
    if comptime!(d1 > 0) {
        stage_codes::<N, Vector<i32, Const<2>>>(
            c1,
            &mut sh.keys,
            k_at + comptime!(code_words(d0, kbits)),
            row0,
            last,
            h,
            lane,
            (nb1, d1, kbits),
            kst,
            2usize,
            kn,
        );
        stage_scales(
            s1,
            &mut sh.key_scales,
            s_at + comptime!(d0 / BLOCK),
            row0,
            last,
            h,
            lane,
            (nb1, d1, kbits),
            kb_all,
        );
    }
    stage_codes::<N, f32>(
        cvn,
        &mut sh.values,
        buf * comptime!(words[2]),
        row0,
        last,
        h,
        lane,
        (nbv, dv, vbits),
        vst,
        1usize,
        kn,
    );
    stage_scales(
        cv,
        &mut sh.value_scales,
        buf * comptime!(words[3]),
        row0,
        last,
        h,
        lane,
        (nbv, dv, vbits),
        vb,
    );
}

/// Issues this plane's step `j` (tile `own + j · WARPS · STEP`; no copies
/// where that is at or past `hi`) into its buffer `plane_buf + j mod
/// stages`, and commits it on that stage's barrier, which every unit
/// arrives on whether or not it copied.
#[cube]
#[allow(clippy::too_many_arguments)]
fn issue_step<N: Size>(
    c0: &Array<Vector<i32, N>>,
    c1: &Array<Vector<i32, N>>,
    s0: &Array<i32>,
    s1: &Array<i32>,
    cvn: &Array<Vector<i32, N>>,
    cv: &Array<i32>,
    sh: &mut Staged,
    bars: &StageBarriers,
    j: usize,
    own: usize,
    hi: usize,
    first: usize,
    h: usize,
    lane: usize,
    plane_buf: usize,
    #[comptime] kv_heads: usize,
    #[comptime] dims: (usize, usize, usize),
    #[comptime] bits: (usize, usize),
    #[comptime] kn: usize,
    #[comptime] stages: usize,
) {
    let tile = own + j * comptime!(WARPS * STEP);
    let s = j % stages;
    if tile < hi {
        stage_step::<N>(
            c0,
            c1,
            s0,
            s1,
            cvn,
            cv,
            sh,
            plane_buf + s,
            tile,
            hi,
            first,
            h,
            lane,
            kv_heads,
            dims,
            bits,
            kn,
        );
    }
    commit_stage(bars, s);
}

/// Ends this unit's share of staging into buffer `s` of the stages'
/// barriers: its copies complete on that barrier, then it arrives.
#[cube]
fn commit_stage(bars: &StageBarriers, s: usize) {
    if s == 0 {
        bars.b0.commit_copy_async();
        let _ = bars.b0.arrive();
    } else if s == 1 {
        bars.b1.commit_copy_async();
        let _ = bars.b1.arrive();
    } else if s == 2 {
        bars.b2.commit_copy_async();
        let _ = bars.b2.arrive();
    } else {
        bars.b3.commit_copy_async();
        let _ = bars.b3.arrive();
    }
}

/// Waits for step `i`'s stage: barrier `i % stages`, its
/// `i / stages`-th phase.
#[cube]
fn wait_stage(bars: &StageBarriers, i: usize, #[comptime] stages: usize) {
    let s = i % stages;
    let parity = u32::cast_from((i / stages) % 2);
    if s == 0 {
        bars.b0.wait_parity(parity);
    } else if s == 1 {
        bars.b1.wait_parity(parity);
    } else if s == 2 {
        bars.b2.wait_parity(parity);
    } else {
        bars.b3.wait_parity(parity);
    }
}

/// The stages' barriers (up to [`MAX_STAGES`]); every unit of the cube
/// arrives on each.
#[derive(CubeType)]
struct StageBarriers {
    b0: Shared<Barrier>,
    b1: Shared<Barrier>,
    b2: Shared<Barrier>,
    b3: Shared<Barrier>,
}

/// One step of 16 keys from `tile` on, staged in buffer `buf` of `sh`
/// (read back as the products take it): scores, mask (keys at or past this row's
/// `limit` or `hi`), the online softmax (`ml`: the row's running max and
/// this unit's share of its sum) and `o += p·v`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn compute_step(
    sh: &Staged,
    qsh: &SharedMemory<Vector<u32, Const<4>>>,
    sq: f32,
    buf: usize,
    ml: &mut Array<f32>,
    o: &mut Array<Pair<f32>>,
    tile: usize,
    hi: usize,
    limit: usize,
    lane: usize,
    neg_inf: f32,
    bias: u32,
    nibble_bias: u32,
    #[comptime] dk: usize,
    #[comptime] dv: usize,
    #[comptime] bits: (usize, usize),
    #[comptime] imma: bool,
) {
    let def = mma_def();
    let (g, t) = (lane / 4, lane % 4);
    let vbits = comptime!(bits.1);
    let vb = comptime!(dv / BLOCK);
    let mut s = Array::<f32>::new(4usize);
    #[unroll]
    for i in 0..4usize {
        s[i] = f32::new(0.0);
    }
    if comptime!(imma) {
        key_scores_s8(sh, qsh, sq, &mut s, buf, lane, dk, comptime!(bits.0));
    } else {
        key_scores(sh, qsh, &mut s, buf, lane, bias, dk);
    }
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
        let corr = fast_exp2(m - mx);
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
        // A masked score gives 0 (and NaN where the row has seen no key).
        let x = select(s[i] != neg_inf, fast_exp2(s[i] - mx), f32::new(0.0));
        ml[1] += x;
        p[i] = x;
    }
    // O += P·V, a 32-dim value block at a time: this unit's four keys
    // (`2t, 2t + 1, 2t + 8, 2t + 9`), their block scales and the block's
    // dims `4g..4g + 3`: q8 word `g`, q4 half `g % 2` of word `g / 2`.
    let words = comptime!(stage_words(dk, dv, bits));
    let vst = comptime!(value_stride(dv, vbits));
    let per_block = comptime!(code_words(BLOCK, vbits));
    let mut word = g;
    if comptime!(vbits == 4) {
        word = g / 2;
    }
    let high_half = g % 2 == 1;
    let mut vr = Array::<usize>::new(4usize);
    let mut vs = Array::<usize>::new(4usize);
    #[unroll]
    for kk in 0..4usize {
        let key = comptime!((kk / 2) * 8 + kk % 2) + 2 * t;
        vr[kk] = buf * comptime!(words[2]) + key * vst + word;
        vs[kk] = buf * comptime!(words[3]) + key * vb;
    }
    #[unroll]
    for bb in 0..vb {
        let mut af = Array::<Pair<f16>>::new(4usize);
        #[unroll]
        for half in 0..2usize {
            let mut x = Pair::<f32>::new(f32::new(0.0));
            #[unroll]
            for e in 0..2usize {
                let kk = comptime!(2 * half + e);
                x[e] = p[kk] * f32::reinterpret(sh.value_scales[vs[kk] + bb]);
            }
            let (hp, lp) = split(x);
            af[comptime!(2 * half)] = hp;
            af[comptime!(2 * half + 1)] = lp;
        }
        // Keys 2t, 2t + 1 (x) and 2t + 8, 2t + 9 (y) of this block's
        // word g, bytes interleaved a pair of keys at a time.
        let mut w = Array::<u32>::new(4usize);
        #[unroll]
        for kk in 0..4usize {
            w[kk] = u32::reinterpret(sh.values[vr[kk] + comptime!(bb * per_block)]);
        }
        let (w0, w1, w2, w3) = (w[0], w[1], w[2], w[3]);
        let x01 = (w0 & 0xffffu32) | (w1 << 16u32);
        let y01 = (w0 >> 16u32) | (w1 & 0xffff_0000u32);
        let x89 = (w2 & 0xffffu32) | (w3 << 16u32);
        let y89 = (w2 >> 16u32) | (w3 & 0xffff_0000u32);
        // q4: this unit's half of each key's word, keys side by side.
        let h01 = select(high_half, y01, x01);
        let h89 = select(high_half, y89, x89);
        #[unroll]
        for j in 0..4usize {
            let mut bf = Array::<Pair<f16>>::new(2usize);
            if comptime!(vbits == 8) {
                bf[0] = value_codes(x01, y01, bias, j);
                bf[1] = value_codes(x89, y89, bias, j);
            } else {
                bf[0] = nibble_codes(h01 >> comptime!((4 * j) as u32), nibble_bias);
                bf[1] = nibble_codes(h89 >> comptime!((4 * j) as u32), nibble_bias);
            }
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
/// `kv_attention`'s decode kernel does. A plane's steps go through
/// `stages` shared buffers of its own, filled by asynchronous copies
/// (`cp.async`) `stages - 1` steps ahead of the one it computes on; the
/// cube's planes take their steps in turn and meet on one barrier a stage.
/// `c0`, `c1` and `cvn` are the key parts' and the values' caches seen in
/// words of `kn`, `s0`, `s1` and `cv` the same caches in single words.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn kv_decode_mma_kernel<F: Float + CubeElement, N: Size>(
    q: &Array<F>,
    c0: &Array<Vector<i32, N>>,
    c1: &Array<Vector<i32, N>>,
    cvn: &Array<Vector<i32, N>>,
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
    code_bias: u32,
    #[comptime] causal: bool,
    #[comptime] kv_heads: usize,
    #[comptime] d0: usize,
    #[comptime] d1: usize,
    #[comptime] dv: usize,
    #[comptime] nq: usize,
    #[comptime] kn: usize,
    #[comptime] stages: usize,
    #[comptime] imma: bool,
    #[comptime] kbits: usize,
    #[comptime] vbits: usize,
) {
    let bias = code_bias;
    // [`NIBBLE_BIAS`] from it, at run time for the same reason.
    let nibble_bias = code_bias & 0xff7f_ff7fu32;
    let bits = comptime!((kbits, vbits));
    // The scores in base 2: the softmax takes `2^x`.
    let scale = scale * f32::new(LOG2_E);
    let dk = comptime!(d0 + d1);
    let bh = CUBE_POS_X as usize;
    let split_at = CUBE_POS_Y as usize;
    let (b, h) = (bh / kv_heads, bh % kv_heads);
    let lane = UNIT_POS_X as usize;
    let warp = UNIT_POS_Y as usize;
    let (g, t) = (lane / 4, lane % 4);

    let words = comptime!(stage_words(dk, dv, bits));
    let buffers = comptime!(WARPS * stages);
    let mut sh = Staged {
        keys: SharedMemory::<Vector<i32, Const<2>>>::new_aligned(
            comptime!(buffers * words[0] / 2),
            16usize,
        ),
        key_scales: SharedMemory::<i32>::new(comptime!(buffers * words[1])),
        values: SharedMemory::<f32>::new_aligned(comptime!(buffers * words[2]), 16usize),
        value_scales: SharedMemory::<i32>::new(comptime!(buffers * words[3])),
    };
    let bars = StageBarriers {
        b0: Barrier::shared_uninit(),
        b1: Barrier::shared_uninit(),
        b2: Barrier::shared_uninit(),
        b3: Barrier::shared_uninit(),
    };
    if UNIT_POS == 0 {
        bars.b0.init_manual(CUBE_DIM);
        bars.b1.init_manual(CUBE_DIM);
        bars.b2.init_manual(CUBE_DIM);
        bars.b3.init_manual(CUBE_DIM);
    }

    // q's fragments (row g of this head's rows, zero past them), shared
    // by the cube's planes: k-step c's four registers of unit `lane` at
    // `c · 32 + lane`.
    let mut qsh = SharedMemory::<Vector<u32, Const<4>>>::new(comptime!(dk / 16 * MMA_PLANE));
    let mut qscale = SharedMemory::<f32>::new(8usize);
    if comptime!(imma) {
        if warp == 0 {
            let row_at = (bh * rows + g) * dk;
            q_fragments_s8::<F>(
                q,
                &mut qsh,
                &mut qscale,
                row_at,
                g < rows,
                lane,
                scale,
                dk,
                kbits,
            );
        }
    } else if warp == 0 {
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
    // Publishes q's fragments and the initialized barriers.
    sync_cube();
    // This unit's row's `s/256` (the integer score products).
    let mut sq = f32::new(0.0);
    if comptime!(imma) {
        sq = qscale[g];
    }
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
    let dims = comptime!((d0, d1, dv));
    let stride = comptime!(WARPS * STEP);
    // The cube's steps (the same count for every plane, so that all of
    // them arrive on every stage), this plane's at `lo + warp · STEP + i ·
    // stride`.
    let own = lo + warp * STEP;
    let mut steps = 0;
    if hi > lo {
        steps = (hi - lo).div_ceil(stride);
    }
    let plane_buf = warp * stages;
    #[unroll]
    for s in 0..comptime!(stages - 1) {
        if s < steps {
            issue_step::<N>(
                c0, c1, s0, s1, cvn, cv, &mut sh, &bars, s, own, hi, first, h, lane, plane_buf,
                kv_heads, dims, bits, kn, stages,
            );
        }
    }
    let mut i = 0;
    while i < steps {
        // Step i + stages - 1 goes into the buffer step i - 1 used, once
        // every unit of the plane is done reading it.
        let ahead = i + comptime!(stages - 1);
        if ahead < steps {
            sync_plane();
            issue_step::<N>(
                c0, c1, s0, s1, cvn, cv, &mut sh, &bars, ahead, own, hi, first, h, lane, plane_buf,
                kv_heads, dims, bits, kn, stages,
            );
        }
        wait_stage(&bars, i, stages);
        let tile = own + i * stride;
        if tile < hi {
            compute_step(
                &sh,
                &qsh,
                sq,
                plane_buf + i % stages,
                &mut ml,
                &mut o,
                tile,
                hi,
                limit,
                lane,
                neg_inf,
                bias,
                nibble_bias,
                dk,
                dv,
                bits,
                imma,
            );
        }
        i += 1;
    }
    // The row's sum over its four units; rows' halves summed.
    let mut l = ml[1];
    l += plane_shuffle_xor(l, 1u32);
    l += plane_shuffle_xor(l, 2u32);
    let mut m_sh = SharedMemory::<f32>::new(comptime!(WARPS * nq));
    let mut l_sh = SharedMemory::<f32>::new(comptime!(WARPS * nq));
    // The planes' outputs go where the values were staged (`plan` sees
    // that it holds them), once every plane is done with its last step.
    sync_cube();
    if g < nq {
        if t == 0 {
            // The maximum in natural units, as the combine takes it.
            m_sh[warp * nq + g] = ml[0] * f32::new(LN_2);
            l_sh[warp * nq + g] = l;
        }
        #[unroll]
        for n in 0..nblocks {
            let (bb, j) = comptime!((n / 4, n % 4));
            let at = (warp * nq + g) * dv + bb * BLOCK + 8 * t + j;
            sh.values[at] = o[comptime!(2 * n)][0] + o[comptime!(2 * n + 1)][0];
            sh.values[at + 4] = o[comptime!(2 * n)][1] + o[comptime!(2 * n + 1)][1];
        }
    }
    sync_cube();
    combine_planes(
        &m_sh, &l_sh, &sh.values, m_out, l_out, acc_out, bh, rows, slots, split_at, neg_inf, nq,
        dv, MMA_PLANE,
    );
}

/// Shared buffers a plane stages its steps in, at most (the barriers).
pub const MAX_STAGES: usize = 4;
/// Stages unless `CARAMBA_KV_STAGES` says otherwise (2 to 4), for caches
/// of `bits` ([`Staging::bits`]). q8: on the H200 at 128 dims, 4 stages
/// (two cubes a multiprocessor) and 2 stages (four cubes) took the same
/// kernel time, 93 µs; 3 stages (three cubes) took 113 µs (BENCHMARKS,
/// twenty-second session). q4 keys and values: 2 stages 0.091 ms, 3
/// stages 0.094, 4 stages 0.106 by chain timing (twenty-fourth session;
/// four cubes a multiprocessor at every depth, by registers and shared
/// memory alike). Mixed formats were not measured: they take q8's.
const fn default_stages(bits: (usize, usize)) -> usize {
    if bits.0 == 4 && bits.1 == 4 {
        2
    } else {
        STAGES
    }
}

/// The q8 caches' stages ([`default_stages`]).
const STAGES: usize = 4;
/// Cubes of 128 units a multiprocessor holds at once by registers: ptxas
/// gives the kernel 127 registers a unit at 128 dims (sm_90).
const CUBES_BY_REGISTERS: usize = 4;

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

/// `CARAMBA_KV_IMMA=0`, read once per process (for comparisons): the
/// score products on `f16` tensor cores even where the device has the
/// integer ones.
fn imma_off() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var("CARAMBA_KV_IMMA").is_ok_and(|v| v == "0"))
}

/// Whether `client`'s device lists `mma.sync.m16n8k32` for s8 × s8 → s32
/// ([`imma_def`]; sm_80 on).
fn has_int8_mma<R: Runtime>(client: &ComputeClient<R>) -> bool {
    use cubecl::ir::{ElemType, IntKind, StorageType};
    let s8 = StorageType::Scalar(ElemType::Int(IntKind::I8));
    let mma = cubecl::ir::features::MmaConfig {
        a_type: s8,
        b_type: s8,
        cd_type: StorageType::Scalar(ElemType::Int(IntKind::I32)),
        m: 16,
        n: 8,
        k: 32,
    };
    client.properties().features.matmul.mma.contains(&mma)
}

/// `CARAMBA_KV_STAGES`, read once per process (for sweeps), else
/// [`default_stages`].
fn stages_wanted(bits: (usize, usize)) -> usize {
    static STAGES_SET: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    // 2 to `MAX_STAGES`.
    STAGES_SET
        .get_or_init(|| env_choice("CARAMBA_KV_STAGES", &[2, 3, 4]))
        .unwrap_or(default_stages(bits))
}

/// How a launch stages its steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Staging {
    /// Words a copy of codes: 4 or 2, as the rows' alignment allows.
    pub kn: usize,
    /// Shared buffers a plane.
    pub stages: usize,
    /// Cubes a multiprocessor holds at once (shared memory, registers).
    pub cubes_per_sm: usize,
    /// The scores on integer tensor cores ([`key_scores_s8`]) rather
    /// than `f16` ones ([`key_scores`]): where the device has them, unless
    /// `CARAMBA_KV_IMMA=0`.
    pub imma: bool,
    /// Bits a code of the keys (every key part) and of the values: 8
    /// (q8) or 4 (q4; keys only on integer tensor cores).
    pub bits: (usize, usize),
}

/// Bits a code of a cache part the kernel takes: q8 and q4 (NF4's levels
/// are not integers).
fn code_bits(format: u32) -> Option<usize> {
    match format {
        Q8 => Some(8),
        Q4 => Some(4),
        _ => None,
    }
}

/// Bytes of shared memory a cube takes: the planes' stages (whose value
/// buffers also take the planes' outputs at the end), `q`'s fragments
/// (and its rows' scales where the scores run on integer tensor cores),
/// the planes' maxima and sums (`nq` rows) and the barriers.
pub(crate) fn shared_bytes(
    dk: usize,
    dv: usize,
    nq: usize,
    stages: usize,
    bits: (usize, usize),
) -> usize {
    let stage: usize = stage_words(dk, dv, bits).iter().sum();
    4 * (WARPS * stages * stage + dk / 16 * MMA_PLANE * 4 + MMA_ROWS + 2 * WARPS * nq)
        + 8 * MAX_STAGES
}

/// Whether a plane's value buffers (`stages` of them) hold its outputs of
/// `nq` rows at the end (the kernel's merge writes them there): always
/// for q8 values, not for q4 values of 8 rows at 3 stages or fewer.
fn holds_outputs(dv: usize, nq: usize, stages: usize, bits: (usize, usize)) -> bool {
    stages * STEP * value_stride(dv, bits.1) >= nq * dv
}

/// The number of key chunks for `bh` (batch, kv head) pairs: one wave of
/// cubes where the device tells its multiprocessors (every plane walks
/// a long chunk, so that its pipeline's start, `q`'s fragments and the
/// planes' merge are paid once per wave), else about 2048 cubes.
pub(crate) fn splits<R: Runtime>(client: &ComputeClient<R>, bh: usize, plan: Staging) -> usize {
    match client.properties().hardware.num_streaming_multiprocessors {
        Some(sms) => (waves() * plan.cubes_per_sm * sms as usize / bh.max(1)).max(1),
        None => 2048usize.div_ceil(bh.max(1)),
    }
}

/// Words a copy of codes for parts of `dims` dims a head: 4 where every
/// part's rows of `heads` kv heads have a multiple of 4 scale words (then
/// every head slice of codes starts on 16 bytes), 2 where an even number,
/// else none (the kernel does not serve such caches).
fn copy_words_for(heads: usize, dims: &[usize]) -> Option<usize> {
    let scale_words = |d: &usize| heads * d / BLOCK;
    [4, 2]
        .into_iter()
        .find(|&n| dims.iter().all(|d| scale_words(d).is_multiple_of(n)))
}

/// How the kernel serves a decode step of `rows` query rows per kv head
/// (`nq` a cube) over these caches of `heads` kv heads on `client`'s
/// device (module doc), or `None` where it does not (then the CUDA-core
/// kernel does), or where `CARAMBA_KV_MMA=0`.
pub(crate) fn plan<R: Runtime>(
    client: &ComputeClient<R>,
    heads: usize,
    keys: &[CachePart],
    values: &CachePart,
    rows: usize,
    nq: usize,
) -> Option<Staging> {
    if waves() == 0 {
        return None;
    }
    let whole = |p: &CachePart| p.dim > 0 && p.dim.is_multiple_of(BLOCK);
    let dk: usize = keys.iter().map(|k| k.dim).sum();
    let dv = values.dim;
    let served = has_half_mma(client, cubecl::ir::FloatKind::F16)
        && (1..=2).contains(&keys.len())
        && keys.iter().chain([values]).all(whole)
        && keys.iter().all(|k| k.format == keys[0].format)
        && dk <= MMA_MAX_DK
        && dv <= MMA_MAX_DV
        && (1..=MMA_ROWS).contains(&rows);
    if !served {
        return None;
    }
    let bits = (code_bits(keys[0].format)?, code_bits(values.format)?);
    let imma = !imma_off() && has_int8_mma(client);
    // q4 keys only as integers (their f16 score path is not written).
    if bits.0 == 4 && !imma {
        return None;
    }
    let dims: Vec<usize> = keys.iter().chain([values]).map(|p| p.dim).collect();
    let kn = copy_words_for(heads, &dims)?;
    let hardware = &client.properties().hardware;
    let limit = hardware.max_shared_memory_size;
    // The stages wanted, else the deepest that fit.
    let stages = std::iter::once(stages_wanted(bits))
        .chain((2..=MAX_STAGES).rev())
        .find(|&s| shared_bytes(dk, dv, nq, s, bits) <= limit && holds_outputs(dv, nq, s, bits))?;
    // A multiprocessor's shared memory is taken to be the most a cube may
    // ask for plus 1 KB (sm_80 on), less 1 KB the driver keeps a cube.
    let by_shared = (limit + 1024) / (shared_bytes(dk, dv, nq, stages, bits) + 1024);
    Some(Staging {
        kn,
        imma,
        bits,
        stages,
        cubes_per_sm: by_shared.clamp(1, CUBES_BY_REGISTERS),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// H100 / H200: the most shared memory a cube may take.
    const SM90_SHARED: usize = 227 * 1024;

    fn cubes(dk: usize, dv: usize, nq: usize, stages: usize) -> usize {
        (SM90_SHARED + 1024) / (shared_bytes(dk, dv, nq, stages, (8, 8)) + 1024)
    }

    #[test]
    fn copies_are_as_wide_as_the_rows_allow() {
        // 8 kv heads of 128 dims: 32 scale words a row.
        assert_eq!(copy_words_for(8, &[128, 128]), Some(4));
        // 3 kv heads of 64: 6 scale words a row, 8-byte copies.
        assert_eq!(copy_words_for(3, &[64, 64, 128]), Some(2));
        // One kv head of 32 dims: 1 scale word, the CUDA-core kernel.
        assert_eq!(copy_words_for(1, &[64, 32, 64]), None);
    }

    #[test]
    fn staged_rows_keep_copies_aligned_and_hold_the_merge() {
        for bits in [(8, 8), (8, 4), (4, 8), (4, 4)] {
            for dk in (32..=MMA_MAX_DK).step_by(32) {
                for dv in (32..=MMA_MAX_DV).step_by(32) {
                    let [k, ks, v, vs] = stage_words(dk, dv, bits);
                    let (kst, vst) = (key_stride(dk, bits.0), value_stride(dv, bits.1));
                    // 16-byte copies land on 16 bytes: rows of whole chunks.
                    assert_eq!(kst % 4, 0, "dk {dk}");
                    assert_eq!(vst % 4, 0, "dv {dv}");
                    assert_eq!((k, v), (STEP * kst, STEP * vst));
                    assert_eq!((ks, vs), (STEP * dk / BLOCK, STEP * dv / BLOCK));
                    // The rows a plane reads at once fall in distinct banks
                    // (module doc, `key_stride`, `value_stride`).
                    if bits.0 == 4 {
                        assert_eq!(kst % 8, 4, "dk {dk}");
                    }
                    assert!(vst % 16 == 4 || vst % 16 == 12, "dv {dv}");
                    // The planes' outputs fit the value buffers (the
                    // kernel's merge writes them there) at every depth and
                    // row count for q8 values, at the default depth for
                    // q4.
                    for stages in 2..=MAX_STAGES {
                        let fits = holds_outputs(dv, MMA_ROWS, stages, bits);
                        assert_eq!(fits, stages * v >= MMA_ROWS * dv);
                        assert!(fits || (bits.1 == 4 && stages < STAGES), "{bits:?} {dv}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_benchmark_shape_fits_as_measured() {
        // 128-dim heads, 4 rows a kv head: two cubes a multiprocessor at
        // 4 stages, three at 3, four at 2 (BENCHMARKS, twenty-second
        // session; Nsight Compute showed the same limits).
        assert_eq!(cubes(128, 128, 4, 4), 2);
        assert_eq!(cubes(128, 128, 4, 3), 3);
        assert_eq!(cubes(128, 128, 4, 2), 4);
        // The widest heads still fit one cube at the deepest staging.
        assert!(shared_bytes(MMA_MAX_DK, MMA_MAX_DV, MMA_ROWS, MAX_STAGES, (8, 8)) <= SM90_SHARED);
    }
}
