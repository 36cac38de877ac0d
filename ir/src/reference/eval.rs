//! The evaluator: walks the live part of a graph in topological order,
//! checks every bound input and parameter against its declared type, applies
//! each op's reference semantics, and frees each value after its last use.
//!
//! A `permute` that only swaps the last two axes and feeds only matmuls is
//! not materialized: the matmul reads its operand through strides.

use super::bindings::{Bindings, SymValues};
use super::ops::matmul::MatOperand;
use super::ops::{attention, elementwise, fused, layout, matmul, quant, reduce, Raw};
use super::tensor::{round_bf16, round_f16, storage_dtype, ShapeFmt, Tensor};
use crate::graph::{Graph, Node, NodeId};
use crate::op::Op;
use crate::types::{DType, Dim, Shape, Sym};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

/// Why an evaluation failed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum EvalError {
    #[error("input {name:?} is not bound")]
    MissingInput { name: String },
    #[error("parameter {name:?} is not bound")]
    MissingParam { name: String },
    /// A bound value whose dtype or shape differs from its declaration.
    /// `what` is `input` or `parameter`.
    #[error("{what} {name:?}: expected {expected}, found {found}")]
    Mismatch {
        what: &'static str,
        name: String,
        expected: String,
        found: String,
    },
    #[error("symbol {sym} is not bound and no input or parameter determines it (needed at {at})")]
    UnboundSymbol { sym: Sym, at: String },
    #[error("graph output {name:?} refers to a node that is not in the graph")]
    MissingOutput { name: String },
    /// An op could not be applied; `at` is the op's mnemonic and scope.
    #[error("{at}: {message}")]
    Op { at: String, message: String },
}

/// Where a node sits, for messages: `matmul @ model.layers.0.mlp`.
fn at(node: &Node) -> String {
    if node.scope.is_empty() {
        node.op.mnemonic().to_string()
    } else {
        format!("{} @ {}", node.op.mnemonic(), node.scope)
    }
}

/// Evaluates the graph's outputs.
pub fn eval(graph: &Graph, bindings: &Bindings) -> Result<BTreeMap<String, Tensor>, EvalError> {
    run(graph, bindings, None)
}

/// Evaluates the graph's outputs, calling `observe` with every node's value
/// as soon as it is computed (inputs and parameters included), in
/// evaluation order. Only nodes the outputs depend on are evaluated.
pub fn eval_observed(
    graph: &Graph,
    bindings: &Bindings,
    mut observe: impl FnMut(NodeId, &Node, &Tensor),
) -> Result<BTreeMap<String, Tensor>, EvalError> {
    run(graph, bindings, Some(&mut observe))
}

type Observer<'o> = &'o mut dyn FnMut(NodeId, &Node, &Tensor);

fn run(
    graph: &Graph,
    bindings: &Bindings,
    mut observe: Option<Observer>,
) -> Result<BTreeMap<String, Tensor>, EvalError> {
    let order = live_order(graph)?;
    // Remaining reads of each value: one per operand edge, one per output.
    let mut uses: HashMap<NodeId, usize> = HashMap::new();
    for &id in &order {
        for o in graph.operands(id) {
            *uses.entry(o).or_default() += 1;
        }
    }
    for (_, id) in graph.outputs() {
        *uses.entry(*id).or_default() += 1;
    }
    let outputs: HashSet<NodeId> = graph.outputs().iter().map(|(_, id)| *id).collect();
    let mut syms = bindings.syms;
    let mut values: HashMap<NodeId, Value> = HashMap::new();
    for &id in &order {
        let node = graph.node(id);
        let operands = graph.operands(id);
        let value = match &node.op {
            Op::Input { name } => {
                let t = bindings
                    .inputs
                    .get(name)
                    .ok_or_else(|| EvalError::MissingInput { name: name.clone() })?;
                check_binding("input", name, node, t, &mut syms)?;
                bound(t, node.ty.dtype)
            }
            Op::Param { name } => {
                let t = bindings
                    .params
                    .get(name)
                    .ok_or_else(|| EvalError::MissingParam { name: name.clone() })?;
                check_binding("parameter", name, node, t, &mut syms)?;
                bound(t, node.ty.dtype)
            }
            Op::Permute(perm)
                if swaps_last_two(perm)
                    && !outputs.contains(&id)
                    && feeds_only_matmuls(graph, id) =>
            {
                let src = &values[&operands[0]];
                Value {
                    held: src.held.clone(),
                    transposed: !src.transposed,
                }
            }
            Op::Reshape(_) | Op::Dropout { .. } | Op::After if uses[&operands[0]] == 1 => {
                // The operand's last use: relabel its buffer instead of copying.
                let shape = concrete(&node.ty.shape, &syms, node)?;
                let src = values
                    .remove(&operands[0])
                    .expect("operand evaluated before its user");
                let t = src.into_tensor();
                if t.numel() != shape.iter().product::<usize>() {
                    return Err(EvalError::Op {
                        at: at(node),
                        message: format!("cannot reshape {t} to {shape:?}"),
                    });
                }
                Value::owned(t.reshaped(shape).relabelled(node.ty.dtype))
            }
            _ => {
                let args: Vec<(&Tensor, bool)> =
                    operands.iter().map(|o| values[o].parts()).collect();
                Value::owned(apply(node, &args, &syms)?)
            }
        };
        if let Some(observe) = observe.as_mut() {
            // An unmaterialized permute is copied only for the observer.
            match value.transposed {
                false => observe(id, node, value.tensor()),
                true => observe(id, node, &value.materialize()),
            }
        }
        values.insert(id, value);
        for o in operands {
            let left = uses.get_mut(&o).expect("operand counted");
            // A relabelled operand was already taken out of `values`.
            *left = left.saturating_sub(1);
            if *left == 0 {
                values.remove(&o);
            }
        }
    }
    let mut result = BTreeMap::new();
    for (name, id) in graph.outputs() {
        let left = uses.get_mut(id).expect("output counted");
        *left -= 1;
        let value = if *left == 0 {
            values.remove(id)
        } else {
            values.get(id).cloned()
        };
        let value = value.ok_or_else(|| EvalError::MissingOutput { name: name.clone() })?;
        result.insert(name.clone(), value.into_tensor());
    }
    Ok(result)
}

/// A bound tensor as the node reads it: `f32` values bound to an
/// `f16`/`bf16` node are rounded to its grid (as a device storing the type
/// converts them on upload); a tensor already of the node's dtype (on its
/// grid, as every op's result is) and others are borrowed as they are.
fn bound(t: &Tensor, dtype: DType) -> Value<'_> {
    let round = match dtype {
        DType::BF16 if t.dtype() != dtype => round_bf16,
        DType::F16 if t.dtype() != dtype => round_f16,
        _ => {
            return Value {
                held: Held::Borrowed(t),
                transposed: false,
            }
        }
    };
    let v: Vec<f32> = t.to_f32_vec().into_iter().map(round).collect();
    Value::owned(Tensor::new(
        dtype,
        t.shape().to_vec(),
        super::tensor::Storage::F32(v),
    ))
}

/// Applies one node's op to evaluated operands, checks the result against
/// the node's type (symbols substituted from `syms`) and labels it with the
/// node's dtype. Sources other than constants are bound, not applied.
pub fn eval_op(node: &Node, operands: &[&Tensor], syms: &SymValues) -> Result<Tensor, EvalError> {
    let args: Vec<(&Tensor, bool)> = operands.iter().map(|&t| (t, false)).collect();
    apply(node, &args, syms)
}

/// `apply` over operands that may be read transposed (`(tensor, true)`).
fn apply(node: &Node, args: &[(&Tensor, bool)], syms: &SymValues) -> Result<Tensor, EvalError> {
    let expected = concrete(&node.ty.shape, syms, node)?;
    let err = |message: String| EvalError::Op {
        at: at(node),
        message,
    };
    // Only matmul (and rms_norm_matmul's weight) reads a transposed operand in
    // place; others get a copy.
    let dense: Vec<Cow<Tensor>> = if matches!(node.op, Op::MatMul) {
        Vec::new()
    } else {
        let read = match node.op {
            Op::RmsNormMatMul { .. } => &args[..2],
            // Every operand but the weight (operand 1 without a norm, 2 with).
            Op::MatMulRope { .. } => &args[..0],
            _ => args,
        };
        read.iter()
            .map(|&(t, tr)| {
                if tr {
                    Cow::Owned(transpose_last_two(t))
                } else {
                    Cow::Borrowed(t)
                }
            })
            .collect()
    };
    let x = |i: usize| -> &Tensor { &dense[i] };
    let raw: Raw = match &node.op {
        Op::Input { .. } | Op::Param { .. } => {
            return Err(err("inputs and parameters are bound, not applied".into()))
        }
        Op::Constant(v) => elementwise::constant(v.0, node.ty.dtype),
        Op::Unary(u) => elementwise::unary(*u, x(0)),
        Op::Binary(b) => elementwise::binary(*b, x(0), x(1)),
        Op::Cast(to) => elementwise::cast(x(0), *to),
        Op::Dropout { .. } => elementwise::dropout(x(0)),
        Op::After => Ok((x(0).shape().to_vec(), x(0).storage().clone())),
        Op::Reduce { op, axis } => reduce::reduce(*op, *axis, x(0)),
        Op::Softmax { axis } => reduce::softmax(*axis, x(0)),
        Op::MatMul => {
            let operand = |i: usize| MatOperand {
                t: args[i].0,
                transposed: args[i].1,
            };
            matmul::matmul(operand(0), operand(1))
        }
        Op::Reshape(_) => layout::reshape(x(0), &expected),
        Op::Permute(perm) => layout::permute(x(0), perm),
        Op::Slice { axis, start, end } => layout::slice(x(0), *axis, *start, *end),
        Op::Concat { axis } => {
            let xs: Vec<&Tensor> = dense.iter().map(|c| &**c).collect();
            layout::concat(&xs, *axis)
        }
        Op::Gather => layout::gather(x(0), x(1)),
        Op::CausalMask => attention::causal_mask(x(0)),
        Op::Rope(spec) => attention::rope(spec, x(0), x(1)),
        Op::CrossEntropy => fused::cross_entropy(x(0), x(1)),
        Op::CrossEntropyGrad => fused::cross_entropy_grad(x(0), x(1), x(2)),
        Op::LinearCrossEntropy => fused::linear_cross_entropy(x(0), x(1), x(2)),
        Op::LinearCrossEntropyGrad { wrt } => {
            fused::linear_cross_entropy_grad(x(0), x(1), x(2), x(3), *wrt)
        }
        Op::Broadcast(_) => layout::broadcast_to(x(0), &expected),
        Op::ScatterAdd { size } => layout::scatter_add(x(0), x(1), *size),
        Op::OneHot { depth, dtype } => layout::one_hot(x(0), *depth, *dtype),
        Op::Attention { causal, scale } => fused::attention(x(0), x(1), x(2), *causal, *scale),
        Op::AttentionLse { causal, scale } => fused::attention_lse(x(0), x(1), *causal, *scale),
        Op::AttentionWithLse { causal, scale } => {
            fused::attention_with_lse(x(0), x(1), x(2), *causal, *scale)
        }
        Op::AttentionGrad { causal, scale, wrt } => {
            fused::attention_grad(x(0), x(1), x(2), x(3), x(4), x(5), *causal, *scale, *wrt)
        }
        Op::RowDot => fused::row_dot(x(0), x(1)),
        Op::RmsNorm { eps } => fused::rms_norm(x(0), x(1), *eps),
        Op::RmsNormMatMul { eps } => {
            // The weight read as matmul reads it (in place when transposed),
            // so that the product sums in matmul's order.
            let b = MatOperand {
                t: args[2].0,
                transposed: args[2].1,
            };
            fused::rms_norm_matmul(x(0), x(1), b, *eps)
        }
        Op::MatMulRope {
            eps,
            rope,
            head_dim,
            ranges,
        } => {
            // Operands dense but for the weight, read as matmul reads it.
            let plain = |i: usize| -> Cow<Tensor> {
                let (t, tr) = args[i];
                if tr {
                    Cow::Owned(transpose_last_two(t))
                } else {
                    Cow::Borrowed(t)
                }
            };
            let wb = node.op.weight_operand().expect("matmul_rope has a weight");
            let b = MatOperand {
                t: args[wb].0,
                transposed: args[wb].1,
            };
            let w = eps.map(|_| plain(1));
            fused::matmul_rope(
                &plain(0),
                w.as_deref(),
                b,
                &plain(wb + 1),
                *eps,
                rope,
                *head_dim,
                ranges,
            )
        }
        Op::RmsNormGrad { eps, wrt } => fused::rms_norm_grad(x(0), x(1), x(2), *eps, *wrt),
        Op::Elementwise(p) => {
            let xs: Vec<&Tensor> = dense.iter().map(|c| &**c).collect();
            fused::elementwise(p, &xs, &expected)
        }
        Op::Quantize(f) => quant::quantize(x(0), *f),
        Op::Dequantize { format, dtype } => quant::dequantize(x(0), *format, *dtype),
        Op::KvAttention {
            causal,
            scale,
            heads,
            parts,
        } => {
            let caches: Vec<&Tensor> = dense[1..].iter().map(|c| &**c).collect();
            quant::kv_attention(x(0), &caches, parts, *heads, *causal, *scale)
        }
    }
    .map_err(err)?;
    let (shape, mut data) = raw;
    // A narrow float result is computed in f32 and rounded once, as a GPU
    // kernel that computes in f32 and stores f16/bf16 does.
    if let (DType::F16 | DType::BF16, super::tensor::Storage::F32(v)) = (node.ty.dtype, &mut data) {
        let round = if node.ty.dtype == DType::BF16 {
            round_bf16
        } else {
            round_f16
        };
        v.iter_mut().for_each(|x| *x = round(*x));
    }
    if shape != expected {
        return Err(err(format!(
            "produced shape {} but the node is typed {}",
            ShapeFmt(&shape),
            node.ty.shape
        )));
    }
    if storage_dtype(node.ty.dtype) != Some(storage_kind(&data)) {
        return Err(err(format!(
            "produced {} elements for a {} node",
            storage_kind(&data),
            node.ty.dtype
        )));
    }
    Ok(Tensor::new(node.ty.dtype, shape, data))
}

fn storage_kind(s: &super::tensor::Storage) -> DType {
    match s {
        super::tensor::Storage::F32(_) => DType::F32,
        super::tensor::Storage::F64(_) => DType::F64,
        super::tensor::Storage::I32(_) => DType::I32,
    }
}

/// Nodes the outputs depend on, in the graph's topological order.
/// The nodes the outputs depend on, in topological order.
pub fn live_order(graph: &Graph) -> Result<Vec<NodeId>, EvalError> {
    let mut live = HashSet::new();
    let mut stack = Vec::new();
    for (name, id) in graph.outputs() {
        if !graph.petgraph().contains_node(*id) {
            return Err(EvalError::MissingOutput { name: name.clone() });
        }
        stack.push(*id);
    }
    while let Some(n) = stack.pop() {
        if live.insert(n) {
            stack.extend(graph.operands(n));
        }
    }
    Ok(graph
        .topo_order()
        .into_iter()
        .filter(|n| live.contains(n))
        .collect())
}

/// The concrete shape of a declared shape.
pub fn concrete(shape: &Shape, syms: &SymValues, node: &Node) -> Result<Vec<usize>, EvalError> {
    shape
        .dims()
        .iter()
        .map(|d| match *d {
            Dim::Const(n) => Ok(n),
            Dim::Sym(s) => syms.get(s).ok_or_else(|| EvalError::UnboundSymbol {
                sym: s,
                at: at(node),
            }),
        })
        .collect()
}

/// Checks a bound value against its node's declared type, binding symbols
/// that are still unset from the value's shape. `f16` and `bf16`
/// declarations accept `f32` values (weights widened on load).
pub fn check_binding(
    what: &'static str,
    name: &str,
    node: &Node,
    t: &Tensor,
    syms: &mut SymValues,
) -> Result<(), EvalError> {
    check_value(what, name, node, t.dtype(), t.shape(), syms, || {
        t.to_string()
    })
}

/// [`check_binding`] for a value described by its dtype and shape (one
/// held elsewhere, e.g. on a device); `found` describes it for the error.
pub fn check_value(
    what: &'static str,
    name: &str,
    node: &Node,
    dtype: DType,
    shape: &[usize],
    syms: &mut SymValues,
    found: impl FnOnce() -> String,
) -> Result<(), EvalError> {
    let declared = node.ty.dtype;
    let dtype_ok =
        dtype == declared || (matches!(declared, DType::F16 | DType::BF16) && dtype == DType::F32);
    let mut bound = *syms;
    let dims = node.ty.shape.dims();
    let shape_ok = shape.len() == dims.len()
        && dims.iter().zip(shape).all(|(d, &n)| match *d {
            Dim::Const(c) => c == n,
            Dim::Sym(s) => match bound.get(s) {
                Some(v) => v == n,
                None => {
                    bound.set(s, n);
                    true
                }
            },
        });
    if dtype_ok && shape_ok {
        *syms = bound;
        return Ok(());
    }
    // Show the declaration with the symbols known before this value.
    let expected: Vec<String> = dims
        .iter()
        .map(|d| match *d {
            Dim::Sym(s) => syms.get(s).map_or(s.to_string(), |v| v.to_string()),
            Dim::Const(c) => c.to_string(),
        })
        .collect();
    Err(EvalError::Mismatch {
        what,
        name: name.to_string(),
        expected: format!("{declared}[{}]", expected.join(", ")),
        found: found(),
    })
}

fn swaps_last_two(perm: &[usize]) -> bool {
    let r = perm.len();
    r >= 2
        && perm[r - 2] == r - 1
        && perm[r - 1] == r - 2
        && perm[..r - 2].iter().enumerate().all(|(i, &p)| i == p)
}

fn feeds_only_matmuls(graph: &Graph, id: NodeId) -> bool {
    let users = graph.users(id);
    !users.is_empty()
        && users.iter().all(|&u| {
            let op = &graph.node(u).op;
            *op == Op::MatMul || op.weight_operand().is_some()
        })
}

/// A copy of `t` with its last two axes swapped.
fn transpose_last_two(t: &Tensor) -> Tensor {
    let r = t.rank();
    let mut perm: Vec<usize> = (0..r).collect();
    perm.swap(r - 2, r - 1);
    let (shape, data) =
        layout::permute(t, &perm).expect("a swap of the last two axes is a permutation");
    Tensor::new(t.dtype(), shape, data)
}

/// A tensor the evaluator holds: a borrowed binding or a computed value.
#[derive(Clone)]
enum Held<'a> {
    Borrowed(&'a Tensor),
    Owned(Arc<Tensor>),
}

/// A node's value: a tensor, possibly to be read with its last two axes
/// swapped (an unmaterialized permute).
#[derive(Clone)]
struct Value<'a> {
    held: Held<'a>,
    transposed: bool,
}

impl<'a> Value<'a> {
    fn owned(t: Tensor) -> Value<'a> {
        Value {
            held: Held::Owned(Arc::new(t)),
            transposed: false,
        }
    }

    fn tensor(&self) -> &Tensor {
        match &self.held {
            Held::Borrowed(t) => t,
            Held::Owned(t) => t,
        }
    }

    fn parts(&self) -> (&Tensor, bool) {
        (self.tensor(), self.transposed)
    }

    fn materialize(&self) -> Tensor {
        if self.transposed {
            transpose_last_two(self.tensor())
        } else {
            self.tensor().clone()
        }
    }

    /// The value as an owned tensor, copying only if it is shared.
    fn into_tensor(self) -> Tensor {
        match (self.held, self.transposed) {
            (Held::Owned(t), false) => Arc::try_unwrap(t).unwrap_or_else(|t| (*t).clone()),
            (held, transposed) => Value { held, transposed }.materialize(),
        }
    }
}
