//! The closed set of primitive operations and their typing rules.
//!
//! Every composite layer (attention, norms, SwiGLU, ...) lowers into these.
//! Fused operations appear only later, through rewrites, and each carries its
//! decomposition into these primitives. Adding a variant: see `ADDING_AN_OP.md`.

pub use crate::quant::QuantFormat;
use crate::types::{DType, Dim, Shape, Sym, TensorType};
use std::fmt;

/// An `f64` compared, hashed and ordered by its bits, so ops can be keys
/// (the e-graph language needs `Eq + Hash + Ord`).
#[derive(Clone, Copy, Debug)]
pub struct Scalar(pub f64);

impl PartialEq for Scalar {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}
impl Eq for Scalar {}
impl std::hash::Hash for Scalar {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.to_bits().hash(state)
    }
}
impl PartialOrd for Scalar {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scalar {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}
impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == f64::NEG_INFINITY {
            f.write_str("-inf")
        } else if self.0 == f64::INFINITY {
            f.write_str("inf")
        } else {
            // Shortest representation that round-trips.
            write!(f, "{:?}", self.0)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Recip,
    Abs,
    Sigmoid,
    /// x·σ(x), SwiGLU's activation.
    Silu,
    Tanh,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
}

/// Frequency scaling applied to RoPE's inverse frequencies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: Scalar },
    /// Llama 3's piecewise scaling of the inverse frequencies.
    Llama3 {
        factor: Scalar,
        low_freq_factor: Scalar,
        high_freq_factor: Scalar,
        original_max_position: usize,
    },
}

/// Rotary position embedding, "rotate half" convention (Hugging Face Llama):
/// for pair `(x[i], x[i + d/2])` at position `p`, angle `p · inv_freq[i]` with
/// `inv_freq[i] = theta^(-2i/d)` (then scaled).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RopeSpec {
    pub theta: Scalar,
    pub scaling: Option<RopeScaling>,
    /// Rotates by `−a` instead of `a`: the transpose of the rotation, which
    /// is RoPE's gradient (`sin a` negated; `cos a` is even).
    pub inverse: bool,
}

impl RopeSpec {
    /// The inverse frequencies for a head of `dim` (even) dimensions.
    pub fn inv_freq(&self, dim: usize) -> Vec<f64> {
        let half = dim / 2;
        (0..half)
            .map(|i| {
                let f = self.theta.0.powf(-(2.0 * i as f64) / dim as f64);
                match self.scaling {
                    None => f,
                    Some(RopeScaling::Linear { factor }) => f / factor.0,
                    Some(RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position,
                    }) => {
                        let old = original_max_position as f64;
                        let low_wavelen = old / low_freq_factor.0;
                        let high_wavelen = old / high_freq_factor.0;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor.0
                        } else {
                            let smooth = (old / wavelen - low_freq_factor.0)
                                / (high_freq_factor.0 - low_freq_factor.0);
                            (1.0 - smooth) * f / factor.0 + smooth * f
                        }
                    }
                }
            })
            .collect()
    }
}

/// A primitive operation. Axes are absolute (`0` is the outermost axis).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// A value supplied per call (token ids, positions). Type declared.
    Input { name: String },
    /// A named learned parameter (Hugging Face naming). Type declared.
    Param { name: String },
    /// A scalar constant of the node's dtype, broadcast by its consumers.
    Constant(Scalar),
    /// Elementwise, float only.
    Unary(UnaryOp),
    /// Elementwise with NumPy broadcasting; both operands of one dtype.
    Binary(BinaryOp),
    /// Elementwise conversion to the node's dtype.
    Cast(DType),
    /// Reduction over one axis, which is kept with size 1.
    Reduce { op: ReduceOp, axis: usize },
    /// `a @ b` over the last two axes; leading axes broadcast.
    MatMul,
    /// Same elements, new shape (row-major).
    Reshape(Shape),
    /// Output axis `i` is input axis `perm[i]`.
    Permute(Vec<usize>),
    /// Elements `start..end` along `axis`.
    Slice {
        axis: usize,
        start: usize,
        end: usize,
    },
    /// Joins its operands along `axis`; other axes must agree.
    Concat { axis: usize },
    /// `table[ids]`: table `[V, ...]`, ids (int) `[...]` → `[ids..., table[1..]...]`.
    Gather,
    /// Softmax along `axis`.
    Softmax { axis: usize },
    /// Scores `[..., T, S]`: entry `(i, j)` becomes -inf where `j > i + (S - T)`,
    /// so query `i` sits at absolute position `S - T + i` and sees keys up to it.
    CausalMask,
    /// Rotary embedding of `x [..., T, H, d]` at positions `pos (i32) [T]`.
    Rope(RopeSpec),
    /// Zeroes elements with probability `p` and scales the rest by 1/(1-p)
    /// when training; the identity in evaluation.
    Dropout { p: Scalar },
    /// `after(x, y)`: `x` itself, read once `y` is computed. An order for
    /// executors and nothing else: `y`'s value is never read. Activation
    /// checkpointing (`recompute-layers`) reads a layer's input through it,
    /// anchored on the gradient that reaches the layer, so that no order
    /// recomputes the layer's activations in the forward. Any dtype; `y`
    /// any type.
    After,
    /// Broadcasts the operand to `shape` (NumPy rules: axes of size 1 and
    /// missing leading axes repeat).
    Broadcast(Shape),
    /// The adjoint of `Gather`: `out[ids[i]] += src[i]`, with ids (int)
    /// `[...]` and src `[..., tail...]` giving `[size, tail...]` (zeros where
    /// no id points). An id outside `0..size` is an error.
    ScatterAdd { size: usize },
    /// `out[..., j] = 1 if ids[...] == j else 0` for `j < depth`, as `dtype`.
    OneHot { depth: usize, dtype: DType },
    /// Per-position cross-entropy: logits `[..., V]` (float) and targets
    /// (i32) `[...]` give `logsumexp(logits) − logits[target]`, `[...]`, in
    /// the logits' statistics dtype (`DType::stats`: f32 for f16/bf16
    /// logits, which are widened exactly first, so that
    /// `cross_entropy(x) = cross_entropy(cast(x, f32))`; the logits' own
    /// dtype otherwise). A target outside `0..V` is an error.
    CrossEntropy,
    /// Cross-entropy's gradient with respect to the logits: logits
    /// `[..., V]` (float), targets (i32) `[...]` and the loss adjoint `g`
    /// `[...]` (the loss's dtype, `DType::stats` of the logits') give
    /// `(softmax(logits) − one_hot(target)) · g`, `[..., V]`, in the
    /// logits' dtype: for f16/bf16 logits, computed in f32 on their exact
    /// widening and rounded once, so that `cross_entropy_grad(x, t, g) =
    /// cast(cross_entropy_grad(cast(x, f32), t, g), dtype(x))`. Fused so
    /// that the probabilities and the one-hot matrix, each as large as the
    /// logits, are never stored.
    CrossEntropyGrad,
    /// Quantizes rows along the last axis: float `[..., n]` → i32
    /// `[..., words(n)]` in `format`'s block layout (see `quant.rs`); `n` a
    /// multiple of 32. How a KV cache stores new keys and values.
    Quantize(QuantFormat),
    /// The inverse: i32 `[..., words]` → `dtype` `[..., n]`.
    Dequantize { format: QuantFormat, dtype: DType },

    // Fused ops. They appear only through rewrites (never from lowering), and
    // each is defined by the primitive decomposition in its comment.
    /// `softmax(mask(q·kᵀ·scale))·v` with q `[..., T, d]`, k `[..., S, d]`,
    /// v `[..., S, dv]` → `[..., T, dv]`; leading axes broadcast as in
    /// `MatMul`; `causal` applies `CausalMask`. Decomposition:
    /// `matmul(softmax{last}(mask(mul(matmul(q, permute_last2(k)), scale))), v)`.
    Attention { causal: bool, scale: Scalar },
    /// The log-sum-exp of `attention`'s masked, scaled scores per query row:
    /// q `[..., T, d]`, k `[..., S, d]` → `[..., T, 1]` (leading axes
    /// broadcast) of the statistics dtype of q's ([`DType::stats`]: `f32`
    /// for f16/bf16 q, q's dtype otherwise). Decomposition, with `s =
    /// mask(mul(matmul(q, permute_last2(k)), scale))` and `m =
    /// reduce_max{last}(s)`: `add(m, log(sum{last}(exp(sub(s, m)))))`,
    /// which for f16/bf16 q is computed in f32 (as every op is) and stored
    /// in f32, never rounded to q's dtype. What the backward of attention
    /// recomputes its probabilities from, without storing them.
    AttentionLse { causal: bool, scale: Scalar },
    /// `attention` and its `attention_lse` from one pass over the scores:
    /// q `[..., T, d]`, k `[..., S, d]`, v `[..., S, dv]` → `[..., T, dv + 1]`
    /// of `attention_lse`'s dtype (`f32` for f16/bf16 q), the attention
    /// output with each query row's log-sum-exp appended as the last column
    /// (`dv` constant). Decomposition: `concat{last}(attention{causal,
    /// scale}(q, k, v), attention_lse{causal, scale}(q, k))`, the
    /// log-sum-exp broadcast to the output's leading axes. For f16/bf16 q
    /// the attention part is attention's f32 value before the rounding to
    /// q's dtype: computed in f32 and stored unrounded, so that
    /// `cast(slice{last, 0..dv}(·), q's dtype)` is exactly `attention{causal,
    /// scale}(q, k, v)` (which computes in f32 and rounds once). What a
    /// training graph computes where its backward needs the statistic its
    /// forward already had (see `caramba_compiler::reuse_attention_lse`,
    /// which reads the attention part through that cast), instead of
    /// recomputing it.
    AttentionWithLse { causal: bool, scale: Scalar },
    /// One gradient of `attention{causal, scale}(q, k, v)`, flash-style:
    /// operands `q, k, v, dout [..., T, dv]` of one float dtype, then
    /// `lse [..., T, 1]` (from `attention_lse`) and `delta [..., T, 1]` =
    /// `sum{last}(mul(dout, out))` (`out` the forward's output), both of the
    /// statistics dtype ([`DType::stats`]: `f32` for f16/bf16 q, `delta`
    /// then summed from dout and out widened to f32). The result is of q's
    /// dtype, computed in f32 for f16/bf16 q (the statistics unrounded).
    /// With `p = exp(sub(s, lse))` (`s` as in `AttentionLse`) and
    /// `ds = mul(mul(p, sub(matmul(dout, permute_last2(v)), delta)), scale)`
    /// the result is, by `wrt`: `q` → `matmul(ds, k)` `[..., T, d]`;
    /// `k` → `matmul(permute_last2(ds), q)` `[..., S, d]`; `v` →
    /// `matmul(permute_last2(p), dout)` `[..., S, dv]`; `kv` → both,
    /// `concat{last}(<k result>, <v result>)` `[..., S, d + dv]`, all over the
    /// broadcast leading axes (summing them down to an operand's own shape is
    /// left to the caller). `kv` is what autodiff emits: one pass over the
    /// scores gives both (FlashAttention-2's backward), where `k` and `v`
    /// would each recompute `p`.
    AttentionGrad {
        causal: bool,
        scale: Scalar,
        wrt: AttnArg,
    },
    /// The dot product of two tensors' rows along the last axis: x and y
    /// `[..., n]` of one float dtype and one shape (no broadcasting) →
    /// `[..., 1]` of the statistics dtype of x's ([`DType::stats`]: `f32`
    /// for f16/bf16 x, x's dtype otherwise). Decomposition, with `s` that
    /// dtype: `sum{last}(mul(cast(x, s), cast(y, s)))`, which for f32 and
    /// f64 x is `sum{last}(mul(x, y))`: for f16/bf16 x the operands are
    /// widened exactly, and each product and the sum are computed in f32
    /// and stored in f32, never rounded to x's dtype. What attention's
    /// backward sums per query row (`delta = Σ dout·out`, see
    /// `AttentionGrad`), read from the two operands in place instead of
    /// through widened copies and their product.
    RowDot,
    /// RMS normalization over the last axis: `x · rsqrt(mean(x²) + eps) · w`,
    /// x `[..., D]`, w `[D]`, both of one float dtype. For f16/bf16 it is
    /// what lowering writes for half-precision models (as Hugging Face
    /// does): `mul(cast(mul(x₃₂, rsqrt(mean(x₃₂·x₃₂) + eps)), x's dtype), w)`
    /// with `x₃₂ = cast(x, f32)`: the normalized row computed in f32 and
    /// rounded to x's dtype, then multiplied by `w` (in f32, rounded once).
    RmsNorm { eps: Scalar },
    /// One gradient of `rms_norm{eps}(x, w)` for the output adjoint `dy`:
    /// operands x `[..., D]`, w `[D]` and dy `[..., D]` of one float dtype.
    /// Per row, with `r = rsqrt(mean(x²) + eps)`, `x̂ = x·r` and `g = dy·w`
    /// (all in f32 for f16/bf16 operands, unrounded), by `wrt`: `x` →
    /// `r·(g − x̂·mean(g·x̂))` `[..., D]`, which is `r·g − x·r³·mean(g·x)`;
    /// `w` → `Σ dy·n` over every row `[D]`, `n` the normalized row as
    /// `rms_norm` multiplies it by `w` (for f16/bf16 `x̂` rounded to x's
    /// dtype). The result is of x's dtype, computed in f32 for f16/bf16
    /// and rounded once. These are the gradients of `rms_norm`'s
    /// decomposition, the half-precision roundings passed straight through
    /// (as a cast's gradient is): what autodiff of the lowered chain
    /// computes, without its intermediates.
    RmsNormGrad { eps: Scalar, wrt: NormArg },
    /// A linear layer that reads its input through an RMSNorm: x `[..., K]`
    /// (rank ≥ 2), w `[K]` and b `[K, N]` of one float dtype → `[..., N]`.
    /// Decomposition: `matmul(rms_norm{eps}(x, w), b)`, the normalized rows
    /// rounded as `rms_norm` rounds them (for f16/bf16 x, `x̂` and `x̂·w`
    /// each rounded to x's dtype), the product accumulated as `matmul`'s.
    /// What a pre-norm block's first projection computes, with the
    /// normalized rows never stored: a device computes each row's
    /// statistic where the product reads the row (see `gemv`), or falls
    /// back to the two kernels.
    RmsNormMatMul { eps: Scalar },
    /// A linear layer with rotary embedding in its epilogue: x `[..., T, K]`
    /// (rank ≥ 2), with `eps` a norm weight w `[K]`, then b `[K, N]`, all of
    /// one float dtype, and positions pos (i32) `[T]` → `[..., T, N]`.
    /// Decomposition: `y = matmul(x, b)`, or `rms_norm_matmul{eps}(x, w, b)`
    /// with `eps`; then each column range `s..e` of `ranges` (sorted,
    /// disjoint, each a whole number of `head_dim`-wide heads) is replaced by
    /// `reshape(rope{rope}(reshape(slice{last, s..e}(y), [..., T, (e−s)/head_dim,
    /// head_dim]), pos), [..., T, e−s])`; the other columns are `y`'s. `y` is
    /// rounded to x's dtype as the product's result is, then rotated as
    /// `rope` rotates it (in f32 for f16/bf16, rounded once). What a merged
    /// q/k/v projection followed by RoPE on q and k computes, with the
    /// unrotated q and k never stored: a decode step's few rows rotate each
    /// pair of columns where the matrix-vector kernel sums them (see
    /// `gemv`); more rows run the product, then RoPE over its ranges in
    /// place.
    MatMulRope {
        eps: Option<Scalar>,
        rope: RopeSpec,
        head_dim: usize,
        ranges: Vec<(usize, usize)>,
    },
    /// A language model's head and its loss in one: x `[..., K]` (rank ≥ 2)
    /// and w `[K, V]` of one float dtype, targets (i32) `[...]` → the
    /// per-row loss `[...]` in x's statistics dtype (`DType::stats`).
    /// Decomposition: `cross_entropy(matmul(x, w), targets)`, the logits
    /// rounded to x's dtype as the product's result is (and widened
    /// exactly by `cross_entropy`). What `fuse-linear-cross-entropy` makes
    /// of a head read only by its loss, before differentiation: a device
    /// computes the logits a block of rows at a time and never stores
    /// them whole.
    LinearCrossEntropy,
    /// A gradient of `linear_cross_entropy(x, w, targets)` for the loss
    /// adjoint `g` `[...]` (the loss's dtype): operands x, w, targets, g.
    /// With `l = matmul(x, w)` and `dl = cross_entropy_grad(l, targets, g)`
    /// (each rounded to x's dtype), by `wrt`: `x` → `matmul(dl,
    /// permute_last2(w))` `[..., K]`; `w` → `Σ xᵢᵀ·dlᵢ` over every row `i`
    /// of the leading axes, `[K, V]`, one product over all rows
    /// (`matmul(permute_last2(reshape(x, [N, K])), reshape(dl, [N, V]))`),
    /// accumulated in f32 and rounded once. What autodiff of the
    /// decomposition computes, the logits and their gradient never stored
    /// whole: a device recomputes them a block of rows at a time.
    LinearCrossEntropyGrad { wrt: NormArg },
    /// A chain of elementwise ops evaluated per element over operands
    /// broadcast to one shape (NumPy rules), all of one float dtype.
    Elementwise(ElemProgram),
    /// Attention over token-major key/value caches, read in their storage
    /// format (dequantized in registers): operands `q [B, kv, g, T, Σdₖ]`
    /// (kv = `heads`), then one cache per part, `[B, S, heads·dim]` as a
    /// float tensor or as i32 words of the part's quantized format. All parts
    /// but the last are keys (their per-head dims concatenate, as DBA's
    /// semantic and geometric keys); the last is the values. Result
    /// `[B, kv, g, T, dv]` in q's dtype. Decomposition: each part `c` as
    /// `permute[0,2,3,1,4](reshape[B,S,kv,1,dim](dequantize(c)))` (no
    /// dequantize for a float part), the keys concatenated on the last axis,
    /// then `attention{causal, scale}(q, keys, values)`.
    KvAttention {
        causal: bool,
        scale: Scalar,
        heads: usize,
        parts: Vec<KvPart>,
    },
}

/// Which operand of `attention` an `AttentionGrad` differentiates for
/// (`KV`: keys and values together, their gradients side by side).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AttnArg {
    Q,
    K,
    V,
    KV,
}

/// Which operand an `RmsNormGrad` or a `LinearCrossEntropyGrad`
/// differentiates for: the input `x` or the weight `w`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NormArg {
    X,
    W,
}

impl fmt::Display for NormArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NormArg::X => "x",
            NormArg::W => "w",
        })
    }
}

impl fmt::Display for AttnArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttnArg::Q => "q",
            AttnArg::K => "k",
            AttnArg::V => "v",
            AttnArg::KV => "kv",
        })
    }
}

/// One cache operand of `KvAttention`: its storage (`None`: a float tensor)
/// and its dims per head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KvPart {
    pub format: Option<QuantFormat>,
    pub dim: usize,
}

impl fmt::Display for KvPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.format {
            Some(q) => write!(f, "{q}×{}", self.dim),
            None => write!(f, "float×{}", self.dim),
        }
    }
}

/// The program of a fused elementwise op: instructions in order, each
/// reading operands (`Input`) or earlier instructions by index; the last
/// instruction is the result.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ElemProgram(pub Vec<ElemInstr>);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ElemInstr {
    Input(u16),
    Const(Scalar),
    Unary(UnaryOp, u16),
    Binary(BinaryOp, u16, u16),
}

impl ElemProgram {
    /// Number of operands the program reads (one more than the largest input index).
    pub fn n_inputs(&self) -> usize {
        self.0
            .iter()
            .filter_map(|i| {
                if let ElemInstr::Input(k) = i {
                    Some(*k as usize + 1)
                } else {
                    None
                }
            })
            .max()
            .unwrap_or(0)
    }

    /// Checks that every instruction reads only earlier ones.
    pub fn check(&self) -> Result<(), String> {
        if self.0.is_empty() {
            return Err("empty elementwise program".into());
        }
        for (i, ins) in self.0.iter().enumerate() {
            let ok = match *ins {
                ElemInstr::Input(_) | ElemInstr::Const(_) => true,
                ElemInstr::Unary(_, a) => (a as usize) < i,
                ElemInstr::Binary(_, a, b) => (a as usize) < i && (b as usize) < i,
            };
            if !ok {
                return Err(format!("instruction {i} reads a later instruction"));
            }
        }
        Ok(())
    }
}

impl fmt::Display for ElemProgram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, ins) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            match ins {
                ElemInstr::Input(k) => write!(f, "${i}=in{k}")?,
                ElemInstr::Const(c) => write!(f, "${i}={c}")?,
                ElemInstr::Unary(u, a) => write!(f, "${i}={}(${a})", Op::Unary(*u).mnemonic())?,
                ElemInstr::Binary(b, x, y) => {
                    write!(f, "${i}={}(${x}, ${y})", Op::Binary(*b).mnemonic())?
                }
            }
        }
        Ok(())
    }
}

/// How many operands an op takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arity {
    Exact(usize),
    AtLeast(usize),
}

impl Arity {
    pub fn accepts(self, n: usize) -> bool {
        match self {
            Arity::Exact(k) => n == k,
            Arity::AtLeast(k) => n >= k,
        }
    }
}

impl fmt::Display for Arity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Arity::Exact(k) => write!(f, "{k}"),
            Arity::AtLeast(k) => write!(f, "at least {k}"),
        }
    }
}

/// A rotation's attributes in the text form, without braces:
/// `theta=…[, scaling=…][, inverse]`.
fn rope_attrs(r: &RopeSpec) -> String {
    let mut s = format!("theta={}", r.theta);
    match r.scaling {
        None => {}
        Some(RopeScaling::Linear { factor }) => s += &format!(", scaling=linear(factor={factor})"),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position,
        }) => {
            s += &format!(
                ", scaling=llama3(factor={factor}, low={low_freq_factor}, \
                 high={high_freq_factor}, original={original_max_position})"
            )
        }
    }
    if r.inverse {
        s += ", inverse";
    }
    s
}

impl Op {
    pub fn arity(&self) -> Arity {
        match self {
            Op::Input { .. } | Op::Param { .. } | Op::Constant(_) => Arity::Exact(0),
            Op::Unary(_)
            | Op::Cast(_)
            | Op::Reduce { .. }
            | Op::Reshape(_)
            | Op::Permute(_)
            | Op::Slice { .. }
            | Op::Softmax { .. }
            | Op::CausalMask
            | Op::Dropout { .. }
            | Op::Quantize(_)
            | Op::Dequantize { .. } => Arity::Exact(1),
            Op::Binary(_)
            | Op::MatMul
            | Op::Gather
            | Op::Rope(_)
            | Op::CrossEntropy
            | Op::RowDot
            | Op::RmsNorm { .. }
            | Op::ScatterAdd { .. }
            | Op::After => Arity::Exact(2),
            Op::LinearCrossEntropy => Arity::Exact(3),
            Op::LinearCrossEntropyGrad { .. } => Arity::Exact(4),
            Op::Broadcast(_) | Op::OneHot { .. } => Arity::Exact(1),
            Op::Attention { .. } | Op::AttentionWithLse { .. } => Arity::Exact(3),
            Op::AttentionLse { .. } => Arity::Exact(2),
            Op::AttentionGrad { .. } => Arity::Exact(6),
            Op::CrossEntropyGrad | Op::RmsNormGrad { .. } | Op::RmsNormMatMul { .. } => {
                Arity::Exact(3)
            }
            Op::MatMulRope { eps, .. } => Arity::Exact(if eps.is_some() { 4 } else { 3 }),
            Op::Concat { .. } => Arity::AtLeast(1),
            Op::KvAttention { .. } => Arity::AtLeast(3),
            Op::Elementwise(p) => Arity::Exact(p.n_inputs()),
        }
    }

    /// The operand a fused projection reads as its matrix `b`, read as
    /// `matmul` reads its operands (a swap of the last two axes in place):
    /// `rms_norm_matmul`'s and `matmul_rope`'s. `None` for other ops
    /// (`matmul` reads every operand so).
    pub fn weight_operand(&self) -> Option<usize> {
        match self {
            Op::RmsNormMatMul { .. } => Some(2),
            Op::MatMulRope { eps, .. } => Some(if eps.is_some() { 2 } else { 1 }),
            _ => None,
        }
    }

    /// Sources have a declared type instead of an inferred one.
    pub fn is_source(&self) -> bool {
        matches!(self, Op::Input { .. } | Op::Param { .. } | Op::Constant(_))
    }

    /// The mnemonic used in the text form.
    pub fn mnemonic(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Param { .. } => "param",
            Op::Constant(_) => "const",
            Op::Unary(u) => match u {
                UnaryOp::Neg => "neg",
                UnaryOp::Exp => "exp",
                UnaryOp::Log => "log",
                UnaryOp::Sqrt => "sqrt",
                UnaryOp::Rsqrt => "rsqrt",
                UnaryOp::Recip => "recip",
                UnaryOp::Abs => "abs",
                UnaryOp::Sigmoid => "sigmoid",
                UnaryOp::Silu => "silu",
                UnaryOp::Tanh => "tanh",
            },
            Op::Binary(b) => match b {
                BinaryOp::Add => "add",
                BinaryOp::Sub => "sub",
                BinaryOp::Mul => "mul",
                BinaryOp::Div => "div",
                BinaryOp::Max => "max",
            },
            Op::Cast(_) => "cast",
            Op::Reduce { op, .. } => match op {
                ReduceOp::Sum => "sum",
                ReduceOp::Mean => "mean",
                ReduceOp::Max => "reduce_max",
            },
            Op::MatMul => "matmul",
            Op::Reshape(_) => "reshape",
            Op::Permute(_) => "permute",
            Op::Slice { .. } => "slice",
            Op::Concat { .. } => "concat",
            Op::Gather => "gather",
            Op::Softmax { .. } => "softmax",
            Op::CausalMask => "causal_mask",
            Op::Rope(_) => "rope",
            Op::Dropout { .. } => "dropout",
            Op::After => "after",
            Op::CrossEntropy => "cross_entropy",
            Op::CrossEntropyGrad => "cross_entropy_grad",
            Op::LinearCrossEntropy => "linear_cross_entropy",
            Op::LinearCrossEntropyGrad { .. } => "linear_cross_entropy_grad",
            Op::Broadcast(_) => "broadcast",
            Op::ScatterAdd { .. } => "scatter_add",
            Op::OneHot { .. } => "one_hot",
            Op::Attention { .. } => "attention",
            Op::AttentionLse { .. } => "attention_lse",
            Op::AttentionWithLse { .. } => "attention_with_lse",
            Op::AttentionGrad { .. } => "attention_grad",
            Op::RowDot => "row_dot",
            Op::RmsNorm { .. } => "rms_norm",
            Op::RmsNormGrad { .. } => "rms_norm_grad",
            Op::RmsNormMatMul { .. } => "rms_norm_matmul",
            Op::MatMulRope { eps: None, .. } => "matmul_rope",
            Op::MatMulRope { eps: Some(_), .. } => "rms_norm_matmul_rope",
            Op::Elementwise(_) => "elementwise",
            Op::Quantize(_) => "quantize",
            Op::Dequantize { .. } => "dequantize",
            Op::KvAttention { .. } => "kv_attention",
        }
    }

    /// Attributes as they appear in the text form, e.g. `{axis=2}`.
    pub fn attrs(&self) -> String {
        match self {
            Op::Input { name } | Op::Param { name } => format!("{name:?}"),
            Op::Constant(v) => v.to_string(),
            Op::Cast(d) => format!("{{to={d}}}"),
            Op::Reduce { axis, .. } | Op::Softmax { axis } | Op::Concat { axis } => {
                format!("{{axis={axis}}}")
            }
            Op::Reshape(s) => format!("{{shape={s}}}"),
            Op::Permute(p) => format!("{{perm={p:?}}}"),
            Op::Slice { axis, start, end } => format!("{{axis={axis}, range={start}..{end}}}"),
            Op::Rope(r) => format!("{{{}}}", rope_attrs(r)),
            Op::MatMulRope {
                eps,
                rope,
                head_dim,
                ranges,
            } => {
                let eps = eps.map(|e| format!("eps={e}, ")).unwrap_or_default();
                let ranges: Vec<String> = ranges.iter().map(|(s, e)| format!("{s}..{e}")).collect();
                format!(
                    "{{{eps}{}, head_dim={head_dim}, ranges=[{}]}}",
                    rope_attrs(rope),
                    ranges.join(", ")
                )
            }
            Op::Dropout { p } => format!("{{p={p}}}"),
            Op::Attention { causal, scale }
            | Op::AttentionLse { causal, scale }
            | Op::AttentionWithLse { causal, scale } => {
                format!("{{causal={causal}, scale={scale}}}")
            }
            Op::AttentionGrad { causal, scale, wrt } => {
                format!("{{causal={causal}, scale={scale}, wrt={wrt}}}")
            }
            Op::RmsNorm { eps } | Op::RmsNormMatMul { eps } => format!("{{eps={eps}}}"),
            Op::LinearCrossEntropyGrad { wrt } => format!("{{wrt={wrt}}}"),
            Op::RmsNormGrad { eps, wrt } => format!("{{eps={eps}, wrt={wrt}}}"),
            Op::Broadcast(s) => format!("{{shape={s}}}"),
            Op::ScatterAdd { size } => format!("{{size={size}}}"),
            Op::OneHot { depth, dtype } => format!("{{depth={depth}, to={dtype}}}"),
            Op::Elementwise(p) => format!("{{{p}}}"),
            Op::Quantize(f) => format!("{{format={f}}}"),
            Op::Dequantize { format, dtype } => format!("{{format={format}, to={dtype}}}"),
            Op::KvAttention {
                causal,
                scale,
                heads,
                parts,
            } => {
                let parts: Vec<String> = parts.iter().map(|p| p.to_string()).collect();
                format!(
                    "{{causal={causal}, scale={scale}, heads={heads}, parts=[{}]}}",
                    parts.join(", ")
                )
            }
            Op::Unary(_)
            | Op::Binary(_)
            | Op::MatMul
            | Op::Gather
            | Op::CausalMask
            | Op::CrossEntropy
            | Op::CrossEntropyGrad
            | Op::LinearCrossEntropy
            | Op::RowDot
            | Op::After => String::new(),
        }
    }

    /// The type rule: the output type for operands of the given types.
    /// Sources take their declared type and are not inferred here.
    pub fn infer(&self, xs: &[&TensorType]) -> Result<TensorType, String> {
        if !self.arity().accepts(xs.len()) {
            return Err(format!(
                "{} takes {} operand(s), got {}",
                self.mnemonic(),
                self.arity(),
                xs.len()
            ));
        }
        let float = |t: &TensorType| -> Result<(), String> {
            if t.dtype.is_float() {
                Ok(())
            } else {
                Err(format!(
                    "{} needs a float operand, got {}",
                    self.mnemonic(),
                    t
                ))
            }
        };
        // RMS normalization and its gradient: a float `x` and a weight over
        // its last axis, of its dtype.
        let norm_operands = |x: &TensorType, w: &TensorType| -> Result<(), String> {
            float(x)?;
            if w.dtype != x.dtype || w.shape.rank() != 1 || x.shape.last() != w.shape.last() {
                return Err(format!(
                    "{} needs a weight [{}] of the input's dtype, got {w} for {x}",
                    self.mnemonic(),
                    x.shape.last().map(|d| d.to_string()).unwrap_or_default()
                ));
            }
            Ok(())
        };
        let axis_ok = |t: &TensorType, axis: usize| -> Result<(), String> {
            if axis < t.shape.rank() {
                Ok(())
            } else {
                Err(format!("axis {axis} out of range for {t}"))
            }
        };
        match self {
            Op::Input { .. } | Op::Param { .. } | Op::Constant(_) => Err(format!(
                "{} is a source: its type is declared",
                self.mnemonic()
            )),
            Op::Unary(_) | Op::Dropout { .. } => {
                float(xs[0])?;
                Ok(xs[0].clone())
            }
            Op::After => Ok(xs[0].clone()),
            Op::Binary(_) => {
                let (a, b) = (xs[0], xs[1]);
                if a.dtype != b.dtype {
                    return Err(format!("operand dtypes differ: {a} and {b}"));
                }
                if a.dtype == DType::Bool {
                    return Err(format!("{} does not take bool operands", self.mnemonic()));
                }
                let shape = broadcast(&a.shape, &b.shape).ok_or_else(|| {
                    format!("shapes {} and {} do not broadcast", a.shape, b.shape)
                })?;
                Ok(TensorType::new(a.dtype, shape))
            }
            Op::Cast(to) => Ok(TensorType::new(*to, xs[0].shape.clone())),
            Op::Reduce { axis, .. } => {
                axis_ok(xs[0], *axis)?;
                if xs[0].dtype == DType::Bool {
                    return Err("cannot reduce bool".into());
                }
                let mut dims = xs[0].shape.0.clone();
                dims[*axis] = Dim::Const(1);
                Ok(TensorType::new(xs[0].dtype, Shape(dims)))
            }
            Op::MatMul => {
                let (a, b) = (xs[0], xs[1]);
                if a.dtype != b.dtype {
                    return Err(format!("operand dtypes differ: {a} and {b}"));
                }
                float(a)?;
                let (ra, rb) = (a.shape.rank(), b.shape.rank());
                if ra < 2 || rb < 2 {
                    return Err(format!("matmul needs rank ≥ 2 operands, got {a} and {b}"));
                }
                let (m, k) = (a.shape.0[ra - 2], a.shape.0[ra - 1]);
                let (k2, n) = (b.shape.0[rb - 2], b.shape.0[rb - 1]);
                if k != k2 {
                    return Err(format!("inner dimensions differ: {a} @ {b}"));
                }
                let batch = broadcast(
                    &Shape(a.shape.0[..ra - 2].to_vec()),
                    &Shape(b.shape.0[..rb - 2].to_vec()),
                )
                .ok_or_else(|| format!("batch dimensions do not broadcast: {a} @ {b}"))?;
                let mut dims = batch.0;
                dims.push(m);
                dims.push(n);
                Ok(TensorType::new(a.dtype, Shape(dims)))
            }
            Op::Reshape(to) => {
                if xs[0].shape.factored() != to.factored() {
                    return Err(format!("cannot reshape {} to {}", xs[0].shape, to));
                }
                Ok(TensorType::new(xs[0].dtype, to.clone()))
            }
            Op::Permute(perm) => {
                let r = xs[0].shape.rank();
                let mut seen = vec![false; r];
                if perm.len() != r
                    || perm
                        .iter()
                        .any(|&p| p >= r || std::mem::replace(&mut seen[p], true))
                {
                    return Err(format!(
                        "{perm:?} is not a permutation of the axes of {}",
                        xs[0]
                    ));
                }
                let dims = perm.iter().map(|&p| xs[0].shape.0[p]).collect();
                Ok(TensorType::new(xs[0].dtype, Shape(dims)))
            }
            Op::Slice { axis, start, end } => {
                axis_ok(xs[0], *axis)?;
                match xs[0].shape.0[*axis] {
                    Dim::Const(n) if start < end && *end <= n => {
                        let mut dims = xs[0].shape.0.clone();
                        dims[*axis] = Dim::Const(end - start);
                        Ok(TensorType::new(xs[0].dtype, Shape(dims)))
                    }
                    d => Err(format!(
                        "cannot slice {start}..{end} of axis {axis} (size {d})"
                    )),
                }
            }
            Op::Concat { axis } => {
                let first = xs[0];
                axis_ok(first, *axis)?;
                let mut total = 0usize;
                let mut syms = Vec::new();
                for x in xs {
                    if x.dtype != first.dtype || x.shape.rank() != first.shape.rank() {
                        return Err(format!("cannot concatenate {first} and {x}"));
                    }
                    for (i, (a, b)) in first.shape.0.iter().zip(&x.shape.0).enumerate() {
                        if i != *axis && a != b {
                            return Err(format!(
                                "cannot concatenate {first} and {x} along axis {axis}"
                            ));
                        }
                    }
                    match x.shape.0[*axis] {
                        Dim::Const(n) => total += n,
                        Dim::Sym(sym) => syms.push(sym),
                    }
                }
                // The one symbolic sum: cached positions and new ones make the
                // attended ones (a KV cache's append).
                let joined = match (syms.as_slice(), total) {
                    ([], n) => Dim::Const(n),
                    ([sym], 0) => Dim::Sym(*sym),
                    ([Sym::P, Sym::T], 0) => Dim::Sym(Sym::S),
                    _ => {
                        return Err(format!(
                        "cannot concatenate along axis {axis}: the only symbolic sum is P + T = S"
                    ))
                    }
                };
                let mut dims = first.shape.0.clone();
                dims[*axis] = joined;
                Ok(TensorType::new(first.dtype, Shape(dims)))
            }
            Op::Gather => {
                let (table, ids) = (xs[0], xs[1]);
                if !ids.dtype.is_int() {
                    return Err(format!("gather indices must be integers, got {ids}"));
                }
                if table.shape.rank() < 1 {
                    return Err("gather table must have rank ≥ 1".into());
                }
                let mut dims = ids.shape.0.clone();
                dims.extend_from_slice(&table.shape.0[1..]);
                Ok(TensorType::new(table.dtype, Shape(dims)))
            }
            Op::Softmax { axis } => {
                float(xs[0])?;
                axis_ok(xs[0], *axis)?;
                Ok(xs[0].clone())
            }
            Op::CausalMask => {
                float(xs[0])?;
                if xs[0].shape.rank() < 2 {
                    return Err(format!("causal_mask needs rank ≥ 2, got {}", xs[0]));
                }
                Ok(xs[0].clone())
            }
            Op::Broadcast(to) => match broadcast(&xs[0].shape, to) {
                Some(s) if &s == to => Ok(TensorType::new(xs[0].dtype, to.clone())),
                _ => Err(format!("cannot broadcast {} to {to}", xs[0].shape)),
            },
            Op::ScatterAdd { size } => {
                let (ids, src) = (xs[0], xs[1]);
                if !ids.dtype.is_int() {
                    return Err(format!("scatter_add indices must be integers, got {ids}"));
                }
                float(src)?;
                let k = ids.shape.rank();
                if src.shape.rank() < k || src.shape.0[..k] != ids.shape.0[..] {
                    return Err(format!(
                        "scatter_add source {src} does not start with the index shape {}",
                        ids.shape
                    ));
                }
                let mut dims = vec![Dim::Const(*size)];
                dims.extend_from_slice(&src.shape.0[k..]);
                Ok(TensorType::new(src.dtype, Shape(dims)))
            }
            Op::OneHot { depth, dtype } => {
                if !xs[0].dtype.is_int() || !dtype.is_float() {
                    return Err(format!(
                        "one_hot maps integer ids to floats, got {} → {dtype}",
                        xs[0]
                    ));
                }
                let mut dims = xs[0].shape.0.clone();
                dims.push(Dim::Const(*depth));
                Ok(TensorType::new(*dtype, Shape(dims)))
            }
            Op::CrossEntropy => {
                let (l, t) = (xs[0], xs[1]);
                float(l)?;
                let r = l.shape.rank();
                if t.dtype != DType::I32 || r == 0 || t.shape.0[..] != l.shape.0[..r - 1] {
                    return Err(format!(
                        "cross_entropy needs targets i32{} for logits {l}, got {t}",
                        Shape(l.shape.0[..r.max(1) - 1].to_vec())
                    ));
                }
                Ok(TensorType::new(l.dtype.stats(), t.shape.clone()))
            }
            Op::CrossEntropyGrad => {
                let (l, t, g) = (xs[0], xs[1], xs[2]);
                float(l)?;
                let r = l.shape.rank();
                let rows = Shape(l.shape.0[..r.max(1) - 1].to_vec());
                if t.dtype != DType::I32 || r == 0 || t.shape != rows {
                    return Err(format!(
                        "cross_entropy_grad needs targets i32{rows} for logits {l}, got {t}"
                    ));
                }
                if g.dtype != l.dtype.stats() || g.shape != rows {
                    return Err(format!(
                        "cross_entropy_grad needs the loss adjoint {}{rows} for logits {l}, got {g}",
                        l.dtype.stats()
                    ));
                }
                Ok(l.clone())
            }
            Op::LinearCrossEntropy | Op::LinearCrossEntropyGrad { .. } => {
                let (x, w, t) = (xs[0], xs[1], xs[2]);
                float(x)?;
                let r = x.shape.rank();
                if r < 2
                    || w.dtype != x.dtype
                    || w.shape.rank() != 2
                    || w.shape.0[0] != x.shape.0[r - 1]
                {
                    return Err(format!(
                        "{} needs x [..., K] (rank ≥ 2) and a weight [K, V] of x's dtype, got {x} and {w}",
                        self.mnemonic()
                    ));
                }
                let rows = Shape(x.shape.0[..r - 1].to_vec());
                if t.dtype != DType::I32 || t.shape != rows {
                    return Err(format!(
                        "{} needs targets i32{rows} for x {x}, got {t}",
                        self.mnemonic()
                    ));
                }
                match self {
                    Op::LinearCrossEntropyGrad { wrt } => {
                        let g = xs[3];
                        if g.dtype != x.dtype.stats() || g.shape != rows {
                            return Err(format!(
                                "{} needs the loss adjoint {}{rows} for x {x}, got {g}",
                                self.mnemonic(),
                                x.dtype.stats()
                            ));
                        }
                        Ok(match wrt {
                            NormArg::X => x.clone(),
                            NormArg::W => w.clone(),
                        })
                    }
                    _ => Ok(TensorType::new(x.dtype.stats(), rows)),
                }
            }
            Op::Attention { .. } => {
                let (q, v) = (xs[0], xs[2]);
                let mut dims = attention_batch(self.mnemonic(), q, xs[1], Some(v))?.0;
                dims.push(q.shape.0[q.shape.rank() - 2]);
                dims.push(v.shape.0[v.shape.rank() - 1]);
                Ok(TensorType::new(q.dtype, Shape(dims)))
            }
            Op::AttentionWithLse { .. } => {
                let (q, v) = (xs[0], xs[2]);
                let mut dims = attention_batch(self.mnemonic(), q, xs[1], Some(v))?.0;
                dims.push(q.shape.0[q.shape.rank() - 2]);
                match v.shape.last() {
                    Some(Dim::Const(dv)) => dims.push(Dim::Const(dv + 1)),
                    _ => {
                        return Err(format!(
                            "attention_with_lse needs a constant value head dim, got {v}"
                        ))
                    }
                }
                Ok(TensorType::new(q.dtype.stats(), Shape(dims)))
            }
            Op::AttentionLse { .. } => {
                let q = xs[0];
                let mut dims = attention_batch(self.mnemonic(), q, xs[1], None)?.0;
                dims.push(q.shape.0[q.shape.rank() - 2]);
                dims.push(Dim::Const(1));
                Ok(TensorType::new(q.dtype.stats(), Shape(dims)))
            }
            Op::AttentionGrad { wrt, .. } => {
                let (q, k, v) = (xs[0], xs[1], xs[2]);
                let batch = attention_batch(self.mnemonic(), q, k, Some(v))?;
                let row = |t: &TensorType, i: usize| t.shape.0[t.shape.rank() - i];
                let with = |last2: [Dim; 2]| {
                    let mut dims = batch.0.clone();
                    dims.extend(last2);
                    Shape(dims)
                };
                let stats = q.dtype.stats();
                let column = TensorType::new(stats, with([row(q, 2), Dim::Const(1)]));
                let expect = [
                    (
                        "dout",
                        TensorType::new(q.dtype, with([row(q, 2), row(v, 1)])),
                    ),
                    ("lse", column.clone()),
                    ("delta", column),
                ];
                for ((name, want), t) in expect.iter().zip(&xs[3..]) {
                    if *t != want {
                        let why = if *name != "dout" && stats != q.dtype {
                            format!(" (attention's statistics are {stats} for {} q)", q.dtype)
                        } else {
                            String::new()
                        };
                        return Err(format!("attention_grad needs {name} {want}{why}, got {t}"));
                    }
                }
                let shape = match wrt {
                    AttnArg::Q => with([row(q, 2), row(q, 1)]),
                    AttnArg::K => with([row(k, 2), row(k, 1)]),
                    AttnArg::V => with([row(v, 2), row(v, 1)]),
                    AttnArg::KV => match (row(k, 1), row(v, 1)) {
                        (Dim::Const(d), Dim::Const(dv)) => with([row(k, 2), Dim::Const(d + dv)]),
                        _ => {
                            return Err(format!(
                                "attention_grad for kv needs constant head dims, got {k} and {v}"
                            ))
                        }
                    },
                };
                Ok(TensorType::new(q.dtype, shape))
            }
            Op::Quantize(f) => {
                let x = xs[0];
                float(x)?;
                let r = x.shape.rank();
                let words = match x.shape.last() {
                    Some(Dim::Const(n)) => f.words(n),
                    _ => None,
                }
                .ok_or_else(|| format!("{f} quantizes rows of a multiple of 32 values, got {x}"))?;
                let mut dims = x.shape.0.clone();
                dims[r - 1] = Dim::Const(words);
                Ok(TensorType::new(DType::I32, Shape(dims)))
            }
            Op::Dequantize { format, dtype } => {
                let x = xs[0];
                let n = match (x.dtype, x.shape.last()) {
                    (DType::I32, Some(Dim::Const(w))) => format.values(w),
                    _ => None,
                }
                .ok_or_else(|| format!("{x} is not a row of {format} blocks"))?;
                if !dtype.is_float() {
                    return Err(format!("dequantize produces floats, not {dtype}"));
                }
                let mut dims = x.shape.0.clone();
                *dims.last_mut().expect("rank checked") = Dim::Const(n);
                Ok(TensorType::new(*dtype, Shape(dims)))
            }
            Op::KvAttention { heads, parts, .. } => {
                let q = xs[0];
                float(q)?;
                if parts.len() < 2 || xs.len() != parts.len() + 1 {
                    return Err(format!(
                        "kv_attention needs q, at least one key part and the values: {} parts for {} operands",
                        parts.len(),
                        xs.len()
                    ));
                }
                let dk: usize = parts[..parts.len() - 1].iter().map(|p| p.dim).sum();
                let dv = parts[parts.len() - 1].dim;
                let qd = q.shape.dims();
                if qd.len() != 5 || qd[1] != Dim::Const(*heads) || qd[4] != Dim::Const(dk) {
                    return Err(format!(
                        "kv_attention needs q [B, {heads}, g, T, {dk}], got {q}"
                    ));
                }
                let mut s_len = None;
                for (p, c) in parts.iter().zip(&xs[1..]) {
                    let n = heads * p.dim;
                    let (dtype_ok, width) = match p.format {
                        None => (c.dtype.is_float(), Some(n)),
                        Some(f) => (c.dtype == DType::I32, f.words(n)),
                    };
                    let cd = c.shape.dims();
                    let ok = dtype_ok
                        && cd.len() == 3
                        && cd[0] == qd[0]
                        && width.is_some_and(|w| cd[2] == Dim::Const(w))
                        && s_len.is_none_or(|s| s == cd[1]);
                    if !ok {
                        return Err(format!(
                            "kv_attention part {p} ({heads} heads) cannot be stored as {c}"
                        ));
                    }
                    s_len = Some(cd[1]);
                }
                let mut dims = qd[..4].to_vec();
                dims.push(Dim::Const(dv));
                Ok(TensorType::new(q.dtype, Shape(dims)))
            }
            Op::RowDot => {
                let (x, y) = (xs[0], xs[1]);
                float(x)?;
                if x.shape.rank() == 0 {
                    return Err(format!("row_dot needs rank ≥ 1 operands, got {x}"));
                }
                if y != x {
                    return Err(format!(
                        "row_dot needs two operands of one type (no broadcasting), got {x} and {y}"
                    ));
                }
                let mut dims = x.shape.0.clone();
                *dims.last_mut().expect("rank checked") = Dim::Const(1);
                Ok(TensorType::new(x.dtype.stats(), Shape(dims)))
            }
            Op::RmsNorm { .. } => {
                let (x, w) = (xs[0], xs[1]);
                norm_operands(x, w)?;
                Ok(x.clone())
            }
            Op::RmsNormMatMul { .. } => {
                let (x, w, b) = (xs[0], xs[1], xs[2]);
                norm_operands(x, w)?;
                let ra = x.shape.rank();
                if ra < 2 || b.shape.rank() != 2 || b.dtype != x.dtype {
                    return Err(format!(
                        "rms_norm_matmul needs x of rank ≥ 2 and a matrix b of x's dtype, got {x} and {b}"
                    ));
                }
                if b.shape.0[0] != x.shape.0[ra - 1] {
                    return Err(format!("inner dimensions differ: {x} @ {b}"));
                }
                let mut dims = x.shape.0.clone();
                dims[ra - 1] = b.shape.0[1];
                Ok(TensorType::new(x.dtype, Shape(dims)))
            }
            Op::MatMulRope {
                eps,
                head_dim,
                ranges,
                ..
            } => {
                let (x, b, pos) = match eps {
                    Some(_) => {
                        norm_operands(xs[0], xs[1])?;
                        (xs[0], xs[2], xs[3])
                    }
                    None => {
                        float(xs[0])?;
                        (xs[0], xs[1], xs[2])
                    }
                };
                let ra = x.shape.rank();
                if ra < 2 || b.shape.rank() != 2 || b.dtype != x.dtype {
                    return Err(format!(
                        "{} needs x of rank ≥ 2 and a matrix b of x's dtype, got {x} and {b}",
                        self.mnemonic()
                    ));
                }
                if b.shape.0[0] != x.shape.0[ra - 1] {
                    return Err(format!("inner dimensions differ: {x} @ {b}"));
                }
                if pos.dtype != DType::I32 || pos.shape.0 != [x.shape.0[ra - 2]] {
                    return Err(format!(
                        "{} needs i32 positions [{}], got {pos}",
                        self.mnemonic(),
                        x.shape.0[ra - 2]
                    ));
                }
                let Some(n) = b.shape.0[1].as_const() else {
                    return Err(format!(
                        "{} needs a constant output width, got {b}",
                        self.mnemonic()
                    ));
                };
                let mut end = 0;
                for &(s, e) in ranges {
                    if *head_dim == 0
                        || head_dim % 2 != 0
                        || s < end
                        || e <= s
                        || e > n
                        || (e - s) % head_dim != 0
                    {
                        return Err(format!(
                            "{} needs sorted, disjoint column ranges of whole heads of an even \
                             head_dim within its {n} columns, got {s}..{e} (head_dim {head_dim})",
                            self.mnemonic()
                        ));
                    }
                    end = e;
                }
                let mut dims = x.shape.0.clone();
                dims[ra - 1] = b.shape.0[1];
                Ok(TensorType::new(x.dtype, Shape(dims)))
            }
            Op::RmsNormGrad { wrt, .. } => {
                let (x, w, dy) = (xs[0], xs[1], xs[2]);
                norm_operands(x, w)?;
                if dy != x {
                    return Err(format!(
                        "rms_norm_grad needs an output adjoint of the input's type {x}, got {dy}"
                    ));
                }
                Ok(match wrt {
                    NormArg::X => x.clone(),
                    NormArg::W => w.clone(),
                })
            }
            Op::Elementwise(p) => {
                p.check()?;
                let first = xs
                    .first()
                    .ok_or("an elementwise program needs at least one operand")?;
                let mut shape = first.shape.clone();
                for x in xs {
                    float(x)?;
                    if x.dtype != first.dtype {
                        return Err(format!("operand dtypes differ: {first} and {x}"));
                    }
                    shape = broadcast(&shape, &x.shape).ok_or_else(|| {
                        format!("operands {} and {} do not broadcast", shape, x.shape)
                    })?;
                }
                Ok(TensorType::new(first.dtype, shape))
            }
            Op::Rope(_) => {
                let (x, pos) = (xs[0], xs[1]);
                float(x)?;
                let r = x.shape.rank();
                if r < 3 {
                    return Err(format!("rope needs [..., T, H, d], got {x}"));
                }
                match x.shape.0[r - 1] {
                    Dim::Const(d) if d % 2 == 0 => {}
                    d => return Err(format!("rope needs an even head dimension, got {d}")),
                }
                if pos.dtype != DType::I32
                    || pos.shape.rank() != 1
                    || pos.shape.0[0] != x.shape.0[r - 3]
                {
                    return Err(format!(
                        "rope positions must be i32[{}], got {pos}",
                        x.shape.0[r - 3]
                    ));
                }
                Ok(x.clone())
            }
        }
    }
}

/// The broadcast leading axes of attention's `q [..., T, d]`,
/// `k [..., S, d]` and (when given) `v [..., S, dv]`, after checking that
/// they are of one float dtype and their last two axes agree.
fn attention_batch(
    what: &str,
    q: &TensorType,
    k: &TensorType,
    v: Option<&TensorType>,
) -> Result<Shape, String> {
    let all: Vec<&TensorType> = [Some(q), Some(k), v].into_iter().flatten().collect();
    let names = all
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    for t in &all {
        if !t.dtype.is_float() || t.dtype != q.dtype || t.shape.rank() < 2 {
            return Err(format!(
                "{what} needs q, k, v of one float dtype and rank ≥ 2, got {names}"
            ));
        }
    }
    let last = |t: &TensorType, i: usize| t.shape.0[t.shape.rank() - i];
    if last(k, 1) != last(q, 1) || v.is_some_and(|v| last(v, 2) != last(k, 2)) {
        return Err(format!("{what} shapes disagree: {names}"));
    }
    let lead = |t: &TensorType| Shape(t.shape.0[..t.shape.rank() - 2].to_vec());
    let mut batch = lead(q);
    for t in &all[1..] {
        batch = broadcast(&batch, &lead(t))
            .ok_or_else(|| format!("{what} batch axes do not broadcast: {names}"))?;
    }
    Ok(batch)
}

/// NumPy broadcasting of two shapes, aligned from the last axis.
pub fn broadcast(a: &Shape, b: &Shape) -> Option<Shape> {
    let r = a.rank().max(b.rank());
    let mut out = vec![Dim::Const(1); r];
    for (i, slot) in out.iter_mut().enumerate() {
        let da = (i + a.rank())
            .checked_sub(r)
            .map(|j| a.0[j])
            .unwrap_or(Dim::Const(1));
        let db = (i + b.rank())
            .checked_sub(r)
            .map(|j| b.0[j])
            .unwrap_or(Dim::Const(1));
        *slot = match (da, db) {
            (x, y) if x == y => x,
            (Dim::Const(1), y) => y,
            (x, Dim::Const(1)) => x,
            _ => return None,
        };
    }
    Some(Shape(out))
}
