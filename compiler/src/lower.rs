//! Lowering: a validated model description becomes an IR graph of
//! primitives. Composite layers expand here (attention, norms, SwiGLU, ...);
//! topologies decide how values flow between them. Parameters get Hugging
//! Face Llama names (see `Namer`), so checkpoints map without a table.
//!
//! Width agreement is checked here, where the data flows: a layer whose
//! `d_model` differs from the width it receives is an error at that layer.

use crate::diag::{Diagnostic, Diagnostics};
use crate::manifest::*;
use caramba_ir::{
    BinaryOp, DType, Dim, Graph, NodeId, Op, QuantFormat, ReduceOp, RopeScaling, RopeSpec, Scalar,
    Shape, Sym, TensorType, UnaryOp,
};
use std::collections::{BTreeMap, HashMap};

/// What lowering produced: the graph plus a per-layer summary for plans.
#[derive(Clone, Debug)]
pub struct Lowered {
    pub graph: Graph,
    pub layers: Vec<LayerInfo>,
    /// The KV-cache tensors of a cached graph, in attention order (empty
    /// without a cache).
    pub cache: Vec<CacheEntry>,
}

/// How a KV cache stores one attention path (keys, values, DBA's semantic
/// or geometric keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CacheFormat {
    Fp32,
    Fp16,
    Quant(QuantFormat),
}

impl CacheFormat {
    /// Reads `fp32`, `fp16`, `q8`, `q4` or `nf4` (case-insensitive).
    pub fn parse(s: &str) -> Option<CacheFormat> {
        match s.to_ascii_lowercase().as_str() {
            "fp32" | "f32" => Some(CacheFormat::Fp32),
            "fp16" | "f16" => Some(CacheFormat::Fp16),
            other => QuantFormat::parse(other).map(CacheFormat::Quant),
        }
    }

    /// Bytes per cached value (quantized scales included).
    pub fn bytes_per_value(self) -> f64 {
        match self {
            CacheFormat::Fp32 => 4.0,
            CacheFormat::Fp16 => 2.0,
            CacheFormat::Quant(q) => q.bytes_per_value(),
        }
    }
}

impl std::fmt::Display for CacheFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CacheFormat::Fp32 => f.write_str("fp32"),
            CacheFormat::Fp16 => f.write_str("fp16"),
            CacheFormat::Quant(q) => write!(f, "{q}"),
        }
    }
}

/// The storage of each path of a KV cache. Standard and GQA attention cache
/// `k` and `v`; decoupled attention caches `k_sem`, `k_geo` and `v`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCacheSpec {
    pub k: CacheFormat,
    pub k_sem: CacheFormat,
    pub k_geo: CacheFormat,
    pub v: CacheFormat,
}

impl KvCacheSpec {
    /// Every path in one format.
    pub fn uniform(f: CacheFormat) -> KvCacheSpec {
        KvCacheSpec {
            k: f,
            k_sem: f,
            k_geo: f,
            v: f,
        }
    }
}

/// One cache tensor of a cached graph: the graph reads the cached rows as
/// input `past.<name>` `[B, P, width]` and returns them with this call's rows
/// appended as output `present.<name>` `[B, S, width]`.
#[derive(Clone, Debug, PartialEq)]
pub struct CacheEntry {
    /// `kv<i>.<path>`: the i-th attention call of the model, path `k`,
    /// `k_sem`, `k_geo` or `v`.
    pub name: String,
    /// The attention layer's parameter prefix.
    pub scope: String,
    pub format: CacheFormat,
    /// Values per token (all heads of the path).
    pub values: usize,
    /// Elements per token as stored: `values`, or the words of its blocks.
    pub width: usize,
    /// The stored dtype (`i32` for quantized blocks).
    pub dtype: DType,
}

/// One lowered layer, for `--print-plan` and traces.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerInfo {
    /// Parameter prefix, e.g. `model.layers.3.self_attn`.
    pub scope: String,
    /// Manifest path of the layer.
    pub path: String,
    pub kind: String,
    pub params: usize,
    /// Cached key + value elements per token (attention layers).
    pub kv_elements_per_token: usize,
}

/// Lowers a model to a graph named `name` computing `logits` [B, T, vocab]
/// from `input_ids` i32[B, T] and `positions` i32[T].
pub fn lower_model(m: &ModelSpec, name: &str, dtype: DType) -> Result<Lowered, Diagnostics> {
    lower(m, name, Precision::uniform(dtype), None)
}

/// The dtypes of a lowered model: what its activations are computed and
/// stored in, and what its parameters are stored in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Precision {
    pub compute: DType,
    pub params: DType,
}

impl Precision {
    /// Parameters and activations of one dtype.
    pub fn uniform(dtype: DType) -> Precision {
        Precision {
            compute: dtype,
            params: dtype,
        }
    }

    /// Mixed precision: `f32` parameters (master weights, which the
    /// optimizer updates), activations in `compute` (f16 or bf16). Each
    /// parameter is cast to `compute` where it is read, so its gradient
    /// arrives in `f32` through the cast's backward.
    pub fn mixed(compute: DType) -> Precision {
        Precision {
            compute,
            params: DType::F32,
        }
    }
}

/// [`lower_model`] with parameters and activations in their own dtypes
/// (see [`Precision`]), with or without a KV cache.
pub fn lower_model_with(
    m: &ModelSpec,
    name: &str,
    precision: Precision,
    cache: Option<KvCacheSpec>,
) -> Result<Lowered, Diagnostics> {
    lower(m, name, precision, cache)
}

/// [`lower_model`] for generation with a KV cache: `input_ids` are the `T`
/// new tokens, `positions` their absolute positions `P..P+T`, and every
/// attention reads its cached keys and values (inputs `past.*`, `P` rows),
/// appends this call's rows in the cache's format and returns the whole
/// cache (outputs `present.*`, `S = P + T` rows). Attention runs over the
/// cache as stored: quantized formats are dequantized, so a token's keys
/// are the same whether they were computed now or read back later.
pub fn lower_model_cached(
    m: &ModelSpec,
    name: &str,
    dtype: DType,
    cache: KvCacheSpec,
) -> Result<Lowered, Diagnostics> {
    lower(m, name, Precision::uniform(dtype), Some(cache))
}

fn lower(
    m: &ModelSpec,
    name: &str,
    precision: Precision,
    cache: Option<KvCacheSpec>,
) -> Result<Lowered, Diagnostics> {
    let mut l = Lower {
        cache,
        cache_entries: Vec::new(),
        attention_calls: 0,
        g: Graph::new(name),
        dtype: precision.compute,
        param_dtype: precision.params,
        param_casts: HashMap::new(),
        diags: Diagnostics::default(),
        layers: Vec::new(),
        namer: Namer::default(),
        pos: None,
        vocab: m.embedder.vocab_size,
    };
    let r = l.model(m);
    if let Err(d) = r {
        l.diags.push(d);
    }
    if !l.diags.is_empty() {
        return Err(l.diags);
    }
    let mut graph = l.g;
    graph.remove_dead();
    if let Err(errs) = caramba_ir::verify(&graph) {
        // A verifier failure after lowering is a compiler bug, reported as such.
        let mut d = Diagnostics::default();
        for e in errs {
            d.push(Diagnostic::new(format!(
                "internal error: lowering produced an invalid graph: {e}"
            )));
        }
        return Err(d);
    }
    Ok(Lowered {
        graph,
        layers: l.layers,
        cache: l.cache_entries,
    })
}

/// A value flowing through the model: its node and its feature width.
#[derive(Clone, Copy)]
struct Val {
    id: NodeId,
    width: usize,
}

struct Lower {
    /// Lowering for cached generation (see [`lower_model_cached`]).
    cache: Option<KvCacheSpec>,
    cache_entries: Vec<CacheEntry>,
    /// Attention calls lowered so far (names the cache entries).
    attention_calls: usize,
    g: Graph,
    /// The activations' dtype.
    dtype: DType,
    /// The parameters' dtype; where it differs from `dtype`, each parameter
    /// is read through one cast (`param_casts`, by parameter node).
    param_dtype: DType,
    param_casts: HashMap<NodeId, NodeId>,
    diags: Diagnostics,
    layers: Vec<LayerInfo>,
    namer: Namer,
    pos: Option<NodeId>,
    /// The vocabulary size: a final top-level linear to it is the LM head.
    vocab: usize,
}

type R<T> = Result<T, Diagnostic>;

impl Lower {
    fn model(&mut self, m: &ModelSpec) -> R<()> {
        let e = &m.embedder;
        let ids = self
            .g
            .input(
                "input_ids",
                TensorType::new(DType::I32, Shape::new([Dim::Sym(Sym::B), Dim::Sym(Sym::T)])),
            )
            .map_err(ir)?;
        let table = self.param(
            "model.embed_tokens.weight",
            &[e.vocab_size, e.d_model],
            "model.embed_tokens",
        )?;
        let x = self.op(Op::Gather, &[table, ids], "model.embed_tokens")?;
        self.layers.push(LayerInfo {
            scope: "model.embed_tokens".into(),
            path: "model.embedder".into(),
            kind: format!("token embedding {}×{}", e.vocab_size, e.d_model),
            params: e.vocab_size * e.d_model,
            kv_elements_per_token: 0,
        });
        let x = self.topology(
            &m.topology,
            Val {
                id: x,
                width: e.d_model,
            },
            "model",
            true,
        )?;
        let head_is_explicit = ends_with_head(&m.topology, e.vocab_size);
        let logits = if head_is_explicit {
            x
        } else {
            if x.width != e.d_model {
                return Err(m.topology.loc.err(format!(
                    "the topology outputs width {} but the LM head expects d_model = {}",
                    x.width, e.d_model
                )));
            }
            let (w, scope) = if e.tie_embeddings {
                (table, "model.embed_tokens")
            } else {
                (
                    self.param("lm_head.weight", &[e.vocab_size, e.d_model], "lm_head")?,
                    "lm_head",
                )
            };
            self.layers.push(LayerInfo {
                scope: "lm_head".into(),
                path: "model.embedder".into(),
                kind: format!(
                    "LM head {}→{}{}",
                    e.d_model,
                    e.vocab_size,
                    if e.tie_embeddings { " (tied)" } else { "" }
                ),
                params: if e.tie_embeddings {
                    0
                } else {
                    e.vocab_size * e.d_model
                },
                kv_elements_per_token: 0,
            });
            let wt = self.op(Op::Permute(vec![1, 0]), &[w], scope)?;
            Val {
                id: self.op(Op::MatMul, &[x.id, wt], "lm_head")?,
                width: e.vocab_size,
            }
        };
        let rank = self.rank(logits.id);
        if rank != 3 {
            let shape = self.g.node(logits.id).ty.shape.clone();
            return Err(m.topology.loc.err(format!(
                "the model must produce logits [B, T, vocab], but its output is {shape}"
            ))
            .help("a parallel topology with `combine: stack` adds an axis; use `combine: sum` or `mean` for branches whose output reaches the LM head"));
        }
        self.g.set_output("logits", logits.id);
        Ok(())
    }

    // ------------------------------------------------------------ plumbing

    fn op(&mut self, op: Op, xs: &[NodeId], scope: &str) -> R<NodeId> {
        self.g.add(op, xs, scope).map_err(ir)
    }

    /// A parameter as the model computes with it (in the activations'
    /// dtype: cast once from the stored dtype when they differ).
    fn param(&mut self, name: &str, dims: &[usize], scope: &str) -> R<NodeId> {
        let ty = TensorType::new(
            self.param_dtype,
            Shape::new(dims.iter().map(|&d| Dim::Const(d))),
        );
        let p = self.g.param(name, ty, scope).map_err(ir)?;
        if self.param_dtype == self.dtype {
            return Ok(p);
        }
        if let Some(&c) = self.param_casts.get(&p) {
            return Ok(c);
        }
        let c = self.op(Op::Cast(self.dtype), &[p], scope)?;
        self.param_casts.insert(p, c);
        Ok(c)
    }

    fn constant(&mut self, v: f64, scope: &str) -> NodeId {
        self.g.constant(v, self.dtype, scope)
    }

    fn bin(&mut self, op: BinaryOp, a: NodeId, b: NodeId, scope: &str) -> R<NodeId> {
        self.op(Op::Binary(op), &[a, b], scope)
    }

    fn positions(&mut self) -> R<NodeId> {
        if let Some(p) = self.pos {
            return Ok(p);
        }
        let p = self
            .g
            .input(
                "positions",
                TensorType::new(DType::I32, Shape::new([Dim::Sym(Sym::T)])),
            )
            .map_err(ir)?;
        self.pos = Some(p);
        Ok(p)
    }

    /// The shape of `x` with its last axis split or joined: `[lead..., tail...]`.
    fn reshape_tail(&mut self, x: NodeId, keep: usize, tail: &[usize], scope: &str) -> R<NodeId> {
        let mut dims: Vec<Dim> = self.g.node(x).ty.shape.dims()[..keep].to_vec();
        dims.extend(tail.iter().map(|&d| Dim::Const(d)));
        self.op(Op::Reshape(Shape(dims)), &[x], scope)
    }

    /// `x @ Wᵀ (+ b)` with W [out, in] as Hugging Face stores it.
    fn linear(
        &mut self,
        x: NodeId,
        d_in: usize,
        d_out: usize,
        bias: bool,
        prefix: &str,
    ) -> R<NodeId> {
        let w = self.param(&format!("{prefix}.weight"), &[d_out, d_in], prefix)?;
        let wt = self.op(Op::Permute(vec![1, 0]), &[w], prefix)?;
        let y = self.op(Op::MatMul, &[x, wt], prefix)?;
        if bias {
            let b = self.param(&format!("{prefix}.bias"), &[d_out], prefix)?;
            return self.bin(BinaryOp::Add, y, b, prefix);
        }
        Ok(y)
    }

    fn rank(&self, x: NodeId) -> usize {
        self.g.node(x).ty.shape.rank()
    }

    // ---------------------------------------------------------- topologies

    fn element(
        &mut self,
        el: &Element,
        x: Val,
        prefix: &str,
        top: bool,
        next: Option<&Element>,
    ) -> R<Val> {
        match el {
            Element::Topology(t) => self.topology(t, x, prefix, false),
            Element::Layer(l) => {
                let role = role_of(&l.kind, next, top, self.vocab);
                let scope = self.namer.name(prefix, role);
                self.layer(l, x, &scope)
            }
        }
    }

    fn seq(&mut self, els: &[Element], mut x: Val, prefix: &str, top: bool) -> R<Val> {
        for (i, el) in els.iter().enumerate() {
            x = self.element(el, x, prefix, top, els.get(i + 1))?;
        }
        Ok(x)
    }

    fn topology(&mut self, t: &Topology, x: Val, prefix: &str, top: bool) -> R<Val> {
        let scope = prefix.to_string();
        match t.kind {
            TopologyKind::Stacked | TopologyKind::Sequential => self.seq(&t.layers, x, prefix, top),
            TopologyKind::Residual => {
                let y = self.seq(&t.layers, x, prefix, false)?;
                if y.width != x.width {
                    return Err(t.loc.err(format!(
                        "a residual topology must keep its width: it receives {} but its layers output {}",
                        x.width, y.width
                    )));
                }
                Ok(Val {
                    id: self.bin(BinaryOp::Add, x.id, y.id, &scope)?,
                    width: x.width,
                })
            }
            TopologyKind::Nested { repeat } => {
                let mut x = x;
                for _ in 0..repeat {
                    let block = self.namer.block(prefix);
                    x = self.seq(&t.layers, x, &block, false)?;
                }
                Ok(x)
            }
            TopologyKind::Parallel { combine } => {
                let ys = self.branches(t, x, prefix)?;
                let w = ys[0].width;
                if let Some(bad) = ys.iter().position(|y| y.width != w) {
                    return Err(t.loc.err(format!(
                        "parallel branches must have one output width: branch 0 gives {w}, branch {bad} gives {}",
                        ys[bad].width
                    )));
                }
                match combine {
                    Combine::Stack => {
                        // [.., W] each → [.., n, W]: a new axis before the features.
                        let mut parts = Vec::new();
                        for y in &ys {
                            let r = self.rank(y.id);
                            parts.push(self.reshape_tail(y.id, r - 1, &[1, w], &scope)?);
                        }
                        let r = self.rank(parts[0]);
                        Ok(Val {
                            id: self.op(Op::Concat { axis: r - 2 }, &parts, &scope)?,
                            width: w,
                        })
                    }
                    Combine::Sum | Combine::Mean => {
                        let mut acc = ys[0].id;
                        for y in &ys[1..] {
                            acc = self.bin(BinaryOp::Add, acc, y.id, &scope)?;
                        }
                        if combine == Combine::Mean {
                            let k = self.constant(1.0 / ys.len() as f64, &scope);
                            acc = self.bin(BinaryOp::Mul, acc, k, &scope)?;
                        }
                        Ok(Val { id: acc, width: w })
                    }
                }
            }
            TopologyKind::Branching => {
                let ys = self.branches(t, x, prefix)?;
                let r = self.rank(ys[0].id);
                let ids: Vec<NodeId> = ys.iter().map(|y| y.id).collect();
                let width = ys.iter().map(|y| y.width).sum();
                Ok(Val {
                    id: self.op(Op::Concat { axis: r - 1 }, &ids, &scope)?,
                    width,
                })
            }
            TopologyKind::Cyclic { iterations } => {
                // The same layers (same parameters) applied `iterations` times.
                let mut x = x;
                let saved = self.namer.clone();
                for _ in 0..iterations {
                    self.namer = saved.clone();
                    x = self.seq(&t.layers, x, prefix, false)?;
                }
                Ok(x)
            }
            TopologyKind::Recurrent { steps } => {
                // h₁ = f(x), hₛ₊₁ = f(hₛ + x): shared parameters, input injected each step.
                let saved = self.namer.clone();
                let mut h = self.seq(&t.layers, x, prefix, false)?;
                if h.width != x.width && steps > 1 {
                    return Err(t.loc.err(format!(
                        "a recurrent topology must keep its width: it receives {} but its layers output {}",
                        x.width, h.width
                    )));
                }
                for _ in 1..steps {
                    self.namer = saved.clone();
                    let inp = Val {
                        id: self.bin(BinaryOp::Add, h.id, x.id, &scope)?,
                        width: x.width,
                    };
                    h = self.seq(&t.layers, inp, prefix, false)?;
                }
                Ok(h)
            }
        }
    }

    /// Each child of a parallel/branching topology applied to the same input.
    fn branches(&mut self, t: &Topology, x: Val, prefix: &str) -> R<Vec<Val>> {
        let mut ys = Vec::new();
        for (i, el) in t.layers.iter().enumerate() {
            let p = format!("{prefix}.branches.{i}");
            ys.push(self.element(el, x, &p, false, None)?);
        }
        Ok(ys)
    }

    // -------------------------------------------------------------- layers

    fn layer(&mut self, l: &Layer, x: Val, scope: &str) -> R<Val> {
        let expect = |field: &str, want: usize| -> R<()> {
            if want == x.width {
                Ok(())
            } else {
                Err(l.loc.field(field, format!(
                    "{} expects input width {field} = {want}, but receives width {} from the layer before it",
                    l.kind.type_name(),
                    x.width
                )))
            }
        };
        let params_before = self.g.param_count();
        let mut kv = 0;
        let (out, kind) = match &l.kind {
            LayerKind::RmsNorm(n) => {
                expect("d_model", n.d_model)?;
                (
                    Val {
                        id: self.rms_norm(x.id, n, scope)?,
                        width: x.width,
                    },
                    format!("RMSNorm {}", n.d_model),
                )
            }
            LayerKind::LayerNorm(n) => {
                expect("d_model", n.d_model)?;
                (
                    Val {
                        id: self.layer_norm(x.id, n, scope)?,
                        width: x.width,
                    },
                    format!("LayerNorm {}", n.d_model),
                )
            }
            LayerKind::Linear(c) => {
                expect("d_in", c.d_in)?;
                (
                    Val {
                        id: self.linear(x.id, c.d_in, c.d_out, c.bias, scope)?,
                        width: c.d_out,
                    },
                    format!("Linear {}→{}", c.d_in, c.d_out),
                )
            }
            LayerKind::SwiGlu(c) => {
                expect("d_model", c.d_model)?;
                let gate = self.linear(
                    x.id,
                    c.d_model,
                    c.d_ff,
                    c.bias,
                    &format!("{scope}.gate_proj"),
                )?;
                let up =
                    self.linear(x.id, c.d_model, c.d_ff, c.bias, &format!("{scope}.up_proj"))?;
                let a = self.op(Op::Unary(UnaryOp::Silu), &[gate], scope)?;
                let h = self.bin(BinaryOp::Mul, a, up, scope)?;
                let y = self.linear(h, c.d_ff, c.d_model, c.bias, &format!("{scope}.down_proj"))?;
                (
                    Val {
                        id: y,
                        width: c.d_model,
                    },
                    format!("SwiGLU {}→{}→{}", c.d_model, c.d_ff, c.d_model),
                )
            }
            LayerKind::Dropout(c) => {
                if let Some(d) = c.d_model {
                    expect("d_model", d)?;
                }
                (
                    Val {
                        id: self.op(
                            Op::Dropout {
                                p: Scalar(c.dropout_p),
                            },
                            &[x.id],
                            scope,
                        )?,
                        width: x.width,
                    },
                    format!("Dropout p={}", c.dropout_p),
                )
            }
            LayerKind::Rope(c) => {
                expect("d_model", c.d_model)?;
                self.need_tokens(l, x)?;
                let hd = c.d_model / c.n_heads;
                let xr = self.reshape_tail(x.id, 2, &[c.n_heads, hd], scope)?;
                let spec = rope_spec(c.rope_theta, c.rope_scaling.as_ref());
                let pos = self.positions()?;
                let y = self.op(Op::Rope(spec), &[xr, pos], scope)?;
                (
                    Val {
                        id: self.reshape_tail(y, 2, &[c.d_model], scope)?,
                        width: x.width,
                    },
                    format!("RoPE {} heads × {hd}", c.n_heads),
                )
            }
            LayerKind::Attention(a) => {
                expect("d_model", a.d_model)?;
                self.need_tokens(l, x)?;
                let (y, k) = self.attention(x.id, a, scope)?;
                kv = k;
                let kind = match a.mode() {
                    AttentionMode::Decoupled => format!(
                        "DBA attention {} heads ({} kv), sem {} + geo {}{}",
                        a.n_heads,
                        a.n_kv(),
                        a.sem_dim.unwrap_or(0),
                        a.geo_dim.unwrap_or(0),
                        if a.decoupled_gate.unwrap_or(false) {
                            ", gated"
                        } else {
                            ""
                        }
                    ),
                    AttentionMode::Gqa => format!(
                        "GQA attention {} heads ({} kv) × {}",
                        a.n_heads,
                        a.n_kv(),
                        a.head_dim()
                    ),
                    AttentionMode::Standard => {
                        format!("attention {} heads × {}", a.n_heads, a.head_dim())
                    }
                };
                (
                    Val {
                        id: y,
                        width: a.d_model,
                    },
                    kind,
                )
            }
        };
        self.layers.push(LayerInfo {
            scope: scope.to_string(),
            path: l.loc.path.clone(),
            kind,
            params: self.g.param_count() - params_before,
            kv_elements_per_token: kv,
        });
        Ok(out)
    }

    /// Attention and RoPE work on token sequences [B, T, D].
    fn need_tokens(&self, l: &Layer, x: Val) -> R<()> {
        let dims = self.g.node(x.id).ty.shape.dims().to_vec();
        if dims.len() == 3 && dims[0] == Dim::Sym(Sym::B) && dims[1] == Dim::Sym(Sym::T) {
            Ok(())
        } else {
            Err(l.loc.err(format!(
                "{} needs a token sequence [B, T, D] as input, but receives {}",
                l.kind.type_name(),
                Shape(dims)
            ))
            .help("a parallel topology with `combine: stack` adds an axis; use `combine: sum` or `mean` before attention"))
        }
    }

    /// Norms compute in f32 for half-precision models, else in the model's dtype.
    fn compute_dtype(&self) -> DType {
        if matches!(self.dtype, DType::F16 | DType::BF16) {
            DType::F32
        } else {
            self.dtype
        }
    }

    fn widen(&mut self, x: NodeId, scope: &str) -> R<NodeId> {
        if !matches!(self.dtype, DType::F16 | DType::BF16) {
            Ok(x)
        } else {
            self.op(Op::Cast(DType::F32), &[x], scope)
        }
    }

    fn narrow(&mut self, x: NodeId, scope: &str) -> R<NodeId> {
        if !matches!(self.dtype, DType::F16 | DType::BF16) {
            Ok(x)
        } else {
            self.op(Op::Cast(self.dtype), &[x], scope)
        }
    }

    /// Mean over the last axis (kept with size 1).
    fn mean_last(&mut self, x: NodeId, scope: &str) -> R<NodeId> {
        let axis = self.rank(x) - 1;
        self.op(
            Op::Reduce {
                op: ReduceOp::Mean,
                axis,
            },
            &[x],
            scope,
        )
    }

    /// The shared end of both norms: `x · rsqrt(mean(sq) + eps)`, back to the
    /// model's dtype, times the learned weight.
    fn scale_by_rms(&mut self, x: NodeId, sq: NodeId, n: &NormCfg, scope: &str) -> R<NodeId> {
        let ms = self.mean_last(sq, scope)?;
        let eps = self.g.constant(n.eps, self.compute_dtype(), scope);
        let v = self.bin(BinaryOp::Add, ms, eps, scope)?;
        let inv = self.op(Op::Unary(UnaryOp::Rsqrt), &[v], scope)?;
        let xn = self.bin(BinaryOp::Mul, x, inv, scope)?;
        let xn = self.narrow(xn, scope)?;
        let w = self.param(&format!("{scope}.weight"), &[n.d_model], scope)?;
        self.bin(BinaryOp::Mul, xn, w, scope)
    }

    /// y = x · rsqrt(mean(x²) + eps) · w, computed in f32 (as Hugging Face does).
    fn rms_norm(&mut self, x: NodeId, n: &NormCfg, scope: &str) -> R<NodeId> {
        let x32 = self.widen(x, scope)?;
        let sq = self.bin(BinaryOp::Mul, x32, x32, scope)?;
        self.scale_by_rms(x32, sq, n, scope)
    }

    /// y = (x − mean) · rsqrt(var + eps) · w + b, in f32.
    fn layer_norm(&mut self, x: NodeId, n: &NormCfg, scope: &str) -> R<NodeId> {
        let x32 = self.widen(x, scope)?;
        let mean = self.mean_last(x32, scope)?;
        let xc = self.bin(BinaryOp::Sub, x32, mean, scope)?;
        let sq = self.bin(BinaryOp::Mul, xc, xc, scope)?;
        let y = self.scale_by_rms(xc, sq, n, scope)?;
        if n.bias {
            let b = self.param(&format!("{scope}.bias"), &[n.d_model], scope)?;
            return self.bin(BinaryOp::Add, y, b, scope);
        }
        Ok(y)
    }

    /// Projects x [B, T, D] to per-head vectors [B, T, heads, d], with RoPE
    /// when `rope` is given.
    fn heads(
        &mut self,
        x: NodeId,
        a: &AttentionCfg,
        (heads, d): (usize, usize),
        prefix: &str,
        rope: Option<RopeSpec>,
    ) -> R<NodeId> {
        let y = self.linear(x, a.d_model, heads * d, a.bias, prefix)?;
        let y = self.reshape_tail(y, 2, &[heads, d], prefix)?;
        match rope {
            Some(spec) => {
                let pos = self.positions()?;
                self.op(Op::Rope(spec), &[y, pos], prefix)
            }
            None => Ok(y),
        }
    }

    /// Queries [B, T, H, d] → [B, kv, g, T, d] (head h = kv·g + j, as Hugging Face's repeat_kv).
    fn group_q(&mut self, q: NodeId, kv: usize, g: usize, d: usize, scope: &str) -> R<NodeId> {
        let q = self.reshape_tail(q, 2, &[kv, g, d], scope)?;
        self.op(Op::Permute(vec![0, 2, 3, 1, 4]), &[q], scope)
    }

    /// Keys [B, T, kv, d] → transposed [B, kv, 1, d, T].
    fn group_kt(&mut self, k: NodeId, kv: usize, d: usize, scope: &str) -> R<NodeId> {
        let k = self.reshape_tail(k, 2, &[kv, 1, d], scope)?;
        self.op(Op::Permute(vec![0, 2, 3, 4, 1]), &[k], scope)
    }

    /// A path's new rows `x [B, T, kv, d]` through the KV cache: stored in
    /// the path's format, appended to the cached rows, and read back as
    /// `[B, S, kv·d]` values in the compute dtype. Without a cache, `x`.
    fn through_cache(&mut self, x: NodeId, path: &str, scope: &str) -> R<NodeId> {
        let Some(spec) = self.cache else {
            return Ok(x);
        };
        let format = match path {
            "k" => spec.k,
            "k_sem" => spec.k_sem,
            "k_geo" => spec.k_geo,
            _ => spec.v,
        };
        let dims = self.g.node(x).ty.shape.dims().to_vec();
        let values = match dims[2..] {
            [Dim::Const(h), Dim::Const(d)] => h * d,
            _ => unreachable!("heads are [B, T, heads, d]"),
        };
        let flat = self.reshape_tail(x, 2, &[values], scope)?;
        let name = format!("kv{}.{path}", self.attention_calls);
        let (stored, width) = match format {
            CacheFormat::Fp32 => (DType::F32, values),
            CacheFormat::Fp16 => (DType::F16, values),
            CacheFormat::Quant(q) => (
                DType::I32,
                q.words(values).ok_or_else(|| {
                    Diagnostic::new(format!(
                        "{scope}: a {q} KV cache stores blocks of 32 values, but `{path}` has {values} values per token"
                    ))
                    .help("choose fp16 or fp32 for this path")
                })?,
            ),
        };
        let encoded = match format {
            CacheFormat::Quant(q) => self.op(Op::Quantize(q), &[flat], scope)?,
            _ if stored == self.dtype => flat,
            _ => self.op(Op::Cast(stored), &[flat], scope)?,
        };
        let past = self
            .g
            .input(
                &format!("past.{name}"),
                TensorType::new(
                    stored,
                    Shape::new([Dim::Sym(Sym::B), Dim::Sym(Sym::P), Dim::Const(width)]),
                ),
            )
            .map_err(ir)?;
        let all = self.op(Op::Concat { axis: 1 }, &[past, encoded], scope)?;
        self.g.set_output(&format!("present.{name}"), all);
        self.cache_entries.push(CacheEntry {
            name,
            scope: scope.to_string(),
            format,
            values,
            width,
            dtype: stored,
        });
        match format {
            CacheFormat::Quant(q) => self.op(
                Op::Dequantize {
                    format: q,
                    dtype: self.dtype,
                },
                &[all],
                scope,
            ),
            _ if stored == self.dtype => Ok(all),
            _ => self.op(Op::Cast(self.dtype), &[all], scope),
        }
    }

    /// Attention: returns the output and the cached elements per token.
    ///
    /// Standard / GQA, per query head h with key/value head ⌊h / g⌋:
    ///   softmax(mask(q·kᵀ / √d)) · v, RoPE on q and k.
    /// Decoupled (DBA), per head, with d_s = sem_dim/H, d_g = geo_dim/H:
    ///   scores = (q_s·k_sᵀ)/√d_s + (RoPE(q_g)·RoPE(k_g)ᵀ)/√d_g,
    ///   with the gate, q_s ← 2σ(γ_h)·q_s and q_g ← 2(1−σ(γ_h))·q_g;
    ///   v has (sem_dim + geo_dim)/H dims per head.
    fn attention(&mut self, x: NodeId, a: &AttentionCfg, scope: &str) -> R<(NodeId, usize)> {
        let (h, kv, d) = (a.n_heads, a.n_kv(), a.d_model);
        let g = h / kv;
        let rope = a
            .rope_enabled
            .then(|| rope_spec(a.rope_theta, a.rope_scaling.as_ref()));
        let (scores, dv, cached) = match a.mode() {
            AttentionMode::Standard | AttentionMode::Gqa => {
                let hd = a.head_dim();
                let q = self.heads(x, a, (h, hd), &format!("{scope}.q_proj"), rope)?;
                let k = self.heads(x, a, (kv, hd), &format!("{scope}.k_proj"), rope)?;
                let q = self.group_q(q, kv, g, hd, scope)?;
                let k = self.through_cache(k, "k", scope)?;
                let kt = self.group_kt(k, kv, hd, scope)?;
                let s = self.op(Op::MatMul, &[q, kt], scope)?;
                let c = self.constant(1.0 / (hd as f64).sqrt(), scope);
                (self.bin(BinaryOp::Mul, s, c, scope)?, hd, kv * 2 * hd)
            }
            AttentionMode::Decoupled => {
                let (sem, geo) = (a.sem_dim.unwrap_or(0), a.geo_dim.unwrap_or(0));
                let (ds, dg) = (sem / h, geo / h);
                let mut qs = self.heads(x, a, (h, ds), &format!("{scope}.q_sem_proj"), None)?;
                let ks = self.heads(x, a, (kv, ds), &format!("{scope}.k_sem_proj"), None)?;
                let mut qg = self.heads(x, a, (h, dg), &format!("{scope}.q_geo_proj"), rope)?;
                let kg = self.heads(x, a, (kv, dg), &format!("{scope}.k_geo_proj"), rope)?;
                if a.decoupled_gate.unwrap_or(false) {
                    let gl = self.param(&format!("{scope}.gate_logit"), &[h], scope)?;
                    let gl = self.op(
                        Op::Reshape(Shape::new([Dim::Const(h), Dim::Const(1)])),
                        &[gl],
                        scope,
                    )?;
                    let gate = self.op(Op::Unary(UnaryOp::Sigmoid), &[gl], scope)?;
                    let two = self.constant(2.0, scope);
                    let one = self.constant(1.0, scope);
                    let ws = self.bin(BinaryOp::Mul, gate, two, scope)?;
                    let inv = self.bin(BinaryOp::Sub, one, gate, scope)?;
                    let wg = self.bin(BinaryOp::Mul, inv, two, scope)?;
                    qs = self.bin(BinaryOp::Mul, qs, ws, scope)?;
                    qg = self.bin(BinaryOp::Mul, qg, wg, scope)?;
                }
                let qs = self.group_q(qs, kv, g, ds, scope)?;
                let ks = self.through_cache(ks, "k_sem", scope)?;
                let kst = self.group_kt(ks, kv, ds, scope)?;
                let qg = self.group_q(qg, kv, g, dg, scope)?;
                let kg = self.through_cache(kg, "k_geo", scope)?;
                let kgt = self.group_kt(kg, kv, dg, scope)?;
                let ss = self.op(Op::MatMul, &[qs, kst], scope)?;
                let cs = self.constant(1.0 / (ds as f64).sqrt(), scope);
                let ss = self.bin(BinaryOp::Mul, ss, cs, scope)?;
                let sg = self.op(Op::MatMul, &[qg, kgt], scope)?;
                let cg = self.constant(1.0 / (dg as f64).sqrt(), scope);
                let sg = self.bin(BinaryOp::Mul, sg, cg, scope)?;
                let dv = (sem + geo) / h;
                (
                    self.bin(BinaryOp::Add, ss, sg, scope)?,
                    dv,
                    kv * (ds + dg + dv),
                )
            }
        };
        // scores: [B, kv, g, T, S]
        let scores = if a.causal {
            self.op(Op::CausalMask, &[scores], scope)?
        } else {
            scores
        };
        let p = self.op(Op::Softmax { axis: 4 }, &[scores], scope)?;
        let p = if a.dropout_p > 0.0 {
            self.op(
                Op::Dropout {
                    p: Scalar(a.dropout_p),
                },
                &[p],
                scope,
            )?
        } else {
            p
        };
        let v = self.heads(x, a, (kv, dv), &format!("{scope}.v_proj"), None)?;
        let v = self.through_cache(v, "v", scope)?;
        self.attention_calls += 1;
        let v = self.reshape_tail(v, 2, &[kv, 1, dv], scope)?;
        let v = self.op(Op::Permute(vec![0, 2, 3, 1, 4]), &[v], scope)?; // [B, kv, 1, T, dv]
        let o = self.op(Op::MatMul, &[p, v], scope)?; // [B, kv, g, T, dv]
        let o = self.op(Op::Permute(vec![0, 3, 1, 2, 4]), &[o], scope)?; // [B, T, kv, g, dv]
        let o = self.reshape_tail(o, 2, &[h * dv], scope)?;
        let y = self.linear(o, h * dv, d, a.bias, &format!("{scope}.o_proj"))?;
        Ok((y, cached))
    }
}

fn ir(e: caramba_ir::IrError) -> Diagnostic {
    Diagnostic::new(format!(
        "internal error while lowering {}: {}",
        e.scope, e.message
    ))
}

pub(crate) fn rope_spec(theta: f64, s: Option<&RopeScalingCfg>) -> RopeSpec {
    RopeSpec {
        theta: Scalar(theta),
        scaling: s.map(|s| match s.kind {
            RopeScalingKind::Linear => RopeScaling::Linear {
                factor: Scalar(s.factor),
            },
            RopeScalingKind::Llama3 => RopeScaling::Llama3 {
                factor: Scalar(s.factor),
                low_freq_factor: Scalar(s.low_freq_factor.unwrap_or(1.0)),
                high_freq_factor: Scalar(s.high_freq_factor.unwrap_or(4.0)),
                original_max_position: s.original_max_position_embeddings.unwrap_or(8192),
            },
        }),
        inverse: false,
    }
}

/// True when the topology's last element is a `LinearLayer` to the vocabulary:
/// that layer is then the LM head.
fn ends_with_head(t: &Topology, vocab: usize) -> bool {
    matches!(t.kind, TopologyKind::Stacked | TopologyKind::Sequential)
        && matches!(t.layers.last(), Some(Element::Layer(Layer { kind: LayerKind::Linear(c), .. })) if c.d_out == vocab)
}

/// The role that names a layer's parameters.
fn role_of(kind: &LayerKind, next: Option<&Element>, top: bool, vocab: usize) -> Role {
    match kind {
        LayerKind::Attention(_) => Role::Attn,
        LayerKind::SwiGlu(_) => Role::Mlp,
        // Only a linear to the vocabulary is the head (as in `ends_with_head`);
        // any other final linear is an ordinary layer before the LM head.
        LayerKind::Linear(c) if top && next.is_none() && c.d_out == vocab => Role::Head,
        LayerKind::Linear(_) => Role::Linear,
        LayerKind::Dropout(_) => Role::Dropout,
        LayerKind::Rope(_) => Role::Rope,
        LayerKind::RmsNorm(_) | LayerKind::LayerNorm(_) => match next {
            Some(Element::Layer(Layer {
                kind: LayerKind::Attention(_),
                ..
            })) => Role::InputNorm,
            Some(Element::Layer(Layer {
                kind: LayerKind::SwiGlu(_),
                ..
            })) => Role::PostAttnNorm,
            _ => Role::Norm,
        },
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    Attn,
    Mlp,
    InputNorm,
    PostAttnNorm,
    Norm,
    Linear,
    Head,
    Dropout,
    Rope,
}

/// Hands out parameter prefixes. Blocks of a nested topology under `P` are
/// `P.layers.{i}`; inside, the first attention is `self_attn`, the first
/// SwiGLU `mlp`, a norm before attention `input_layernorm`, a norm before
/// SwiGLU `post_attention_layernorm`, other norms `norm`; later ones of the
/// same role get `_1`, `_2`, ... A final top-level linear to the vocabulary
/// is `lm_head`. This reproduces Hugging Face Llama names for Llama-shaped
/// manifests.
#[derive(Clone, Debug, Default)]
struct Namer {
    blocks: BTreeMap<String, usize>,
    roles: BTreeMap<(String, Role), usize>,
}

impl Namer {
    fn block(&mut self, prefix: &str) -> String {
        let n = self.blocks.entry(prefix.to_string()).or_insert(0);
        let name = format!("{prefix}.layers.{n}");
        *n += 1;
        name
    }

    fn name(&mut self, prefix: &str, role: Role) -> String {
        let base = match role {
            Role::Attn => "self_attn",
            Role::Mlp => "mlp",
            Role::InputNorm => "input_layernorm",
            Role::PostAttnNorm => "post_attention_layernorm",
            Role::Norm => "norm",
            Role::Linear => "linear",
            Role::Head => return "lm_head".into(),
            Role::Dropout => "dropout",
            Role::Rope => "rope",
        };
        let n = self.roles.entry((prefix.to_string(), role)).or_insert(0);
        let name = if *n == 0 {
            format!("{prefix}.{base}")
        } else {
            format!("{prefix}.{base}_{n}")
        };
        *n += 1;
        name
    }
}
