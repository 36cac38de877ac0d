//! The cost model extraction minimizes: bytes moved through device memory
//! plus weighted flops, per kernel, at nominal sizes for the symbolic dims.
//!
//! Every non-source op is one kernel that reads its operands and writes its
//! result once, so a fused op that keeps an intermediate on chip (attention's
//! T×S scores, RMSNorm's row statistics) is cheaper than the primitives that
//! round-trip it through memory. A reshape is a view: it costs only a launch,
//! which every kernel pays so that no op is free (a free op would let
//! extraction choose a cycle such as `x = reshape(x)`). Sources cost nothing.
//!
//! It stops at estimating: it knows no device, and the numbers only need to
//! rank alternatives, not predict times.

use super::lang::{ENode, EG};
use caramba_ir::{AttnArg, Dim, ElemInstr, Graph, Op, Sym, TensorType};
use egg::{CostFunction, Id};

/// Nominal sizes of the symbolic dims: one sequence of 2048 tokens.
pub fn nominal(d: Dim) -> f64 {
    match d {
        Dim::Const(n) => n as f64,
        Dim::Sym(Sym::B) => 1.0,
        Dim::Sym(Sym::T) | Dim::Sym(Sym::S) | Dim::Sym(Sym::P) => 2048.0,
    }
}

pub fn numel(t: &TensorType) -> f64 {
    t.shape.dims().iter().map(|&d| nominal(d)).product()
}

pub fn bytes(t: &TensorType) -> f64 {
    numel(t) * t.dtype.size() as f64
}

/// The fixed cost of launching one kernel, in bytes-equivalent.
pub const LAUNCH: f64 = 4096.0;
/// How many flops cost as much as moving one byte (a GPU does some hundreds
/// of flops per byte of memory bandwidth; a low figure keeps flops visible).
pub const FLOPS_PER_BYTE: f64 = 64.0;

/// The cost of one op as a kernel, given its operand and result types.
pub fn op_cost(op: &Op, xs: &[&TensorType], out: &TensorType) -> f64 {
    if op.is_source() {
        return 0.0;
    }
    if matches!(op, Op::Reshape(_) | Op::After) {
        return LAUNCH;
    }
    let moved: f64 = xs.iter().map(|t| bytes(t)).sum::<f64>() + bytes(out);
    LAUNCH + moved + flops(op, xs, out) / FLOPS_PER_BYTE
}

fn flops(op: &Op, xs: &[&TensorType], out: &TensorType) -> f64 {
    let last = |t: &TensorType, k: usize| nominal(t.shape.dims()[t.shape.rank() - k]);
    match op {
        Op::MatMul => 2.0 * numel(out) * last(xs[0], 1),
        // q·kᵀ, softmax (about 5 flops per score) and p·v, without the scores in memory.
        Op::Attention { .. } | Op::KvAttention { .. } => {
            let scores = numel(out) / last(out, 1) * last(xs[1], 2);
            scores * (2.0 * last(xs[0], 1) + 5.0 + 2.0 * last(out, 1))
        }
        // Attention's work: the log-sum-exp comes from the running max and
        // sum the online softmax keeps anyway, a few flops per row.
        Op::AttentionWithLse { .. } => {
            let (rows, dv) = (numel(out) / last(out, 1), last(out, 1) - 1.0);
            rows * (last(xs[1], 2) * (2.0 * last(xs[0], 1) + 5.0 + 2.0 * dv) + 2.0)
        }
        // The scores once more, for the row's log-sum-exp.
        Op::AttentionLse { .. } => numel(out) * last(xs[1], 2) * (2.0 * last(xs[0], 1) + 5.0),
        // Scores recomputed, p (and for q and k, dp = dout·vᵀ and ds), then
        // the products that give the gradients: kv pays for the scores, p
        // and ds once.
        Op::AttentionGrad { wrt, .. } => {
            let scores = numel(xs[3]) / last(xs[3], 1) * last(xs[1], 2);
            let (d, dv) = (last(xs[0], 1), last(xs[2], 1));
            scores
                * match wrt {
                    AttnArg::V => 2.0 * d + 5.0 + 2.0 * dv,
                    AttnArg::Q | AttnArg::K => 2.0 * d + 2.0 * dv + 8.0 + 2.0 * d,
                    AttnArg::KV => 2.0 * d + 2.0 * dv + 8.0 + 2.0 * d + 2.0 * dv,
                }
        }
        Op::Softmax { .. } => 5.0 * numel(out),
        // The row's max and sum, then each element's probability.
        Op::CrossEntropyGrad => 6.0 * numel(out),
        // The head's product and the loss over its logits; each gradient
        // recomputes them, the logits' gradient, and its own product.
        Op::LinearCrossEntropy => {
            let logits = numel(out) * last(xs[1], 1);
            logits * (2.0 * last(xs[0], 1) + 6.0)
        }
        Op::LinearCrossEntropyGrad { .. } => {
            let logits = numel(xs[2]) * last(xs[1], 1);
            logits * (4.0 * last(xs[0], 1) + 12.0)
        }
        Op::RmsNorm { .. } => 4.0 * numel(out),
        // The norm's few flops per element of x, then the product.
        Op::RmsNormMatMul { .. } => 4.0 * numel(xs[0]) + 2.0 * numel(out) * last(xs[0], 1),
        // The product (and the norm), then a rotation's few flops per
        // element of its ranges, charged over the whole output.
        Op::MatMulRope { eps, .. } => {
            let norm = if eps.is_some() {
                4.0 * numel(xs[0])
            } else {
                0.0
            };
            norm + 2.0 * numel(out) * last(xs[0], 1) + 6.0 * numel(out)
        }
        // Per element of x: its square, g = dy·w and g·x for the row's
        // sums, then the gradient's few flops.
        Op::RmsNormGrad { .. } => 8.0 * numel(xs[0]),
        Op::Rope(_) => 6.0 * numel(out),
        // A product and a sum per element of x.
        Op::RowDot => 2.0 * numel(xs[0]),
        Op::Elementwise(p) => {
            let n =
                p.0.iter()
                    .filter(|i| matches!(i, ElemInstr::Unary(..) | ElemInstr::Binary(..)))
                    .count();
            n as f64 * numel(out)
        }
        _ => numel(out),
    }
}

/// The total cost of a graph: the sum over its nodes.
pub fn graph_cost(g: &Graph) -> f64 {
    g.node_ids()
        .map(|id| {
            let n = g.node(id);
            let ops = g.operands(id);
            let xs: Vec<&TensorType> = ops.iter().map(|&o| &g.node(o).ty).collect();
            op_cost(&n.op, &xs, &n.ty)
        })
        .sum()
}

/// An e-node's own kernel cost: sources cost nothing, and a node whose type
/// does not infer is never chosen.
pub fn enode_cost(eg: &EG, node: &ENode) -> f64 {
    if node.decl.is_some() {
        return 0.0;
    }
    let xs: Vec<&TensorType> = node.children.iter().map(|&c| &eg[c].data.ty).collect();
    match node.op.infer(&xs) {
        Ok(out) => op_cost(&node.op, &xs, &out),
        Err(_) => f64::INFINITY,
    }
}

/// Tree extraction's cost (egg's `Extractor`, the fallback of
/// [`super::extract::dag`]): a node's kernel cost plus the cost of its
/// operands, a shared operand counted once per path.
pub struct Cost<'a> {
    pub egraph: &'a EG,
}

impl CostFunction<ENode> for Cost<'_> {
    type Cost = f64;

    fn cost<C>(&mut self, enode: &ENode, mut costs: C) -> f64
    where
        C: FnMut(Id) -> f64,
    {
        let own = enode_cost(self.egraph, enode);
        enode.children.iter().fold(own, |acc, &c| acc + costs(c))
    }
}
