//! `fuse-linear-cross-entropy`: a language model's head read only by its
//! loss becomes one `linear_cross_entropy`, before differentiation, so that
//! the logits are never stored whole.
//!
//! ```text
//! cross_entropy(matmul(x, w), t)             →  linear_cross_entropy(x, w, t)
//! cross_entropy(cast{f32}(matmul(x, w)), t)  →  linear_cross_entropy(x, w, t)   x f16/bf16
//! ```
//!
//! with `w` a matrix, x of rank ≥ 2, and the product (and the cast) read by
//! nothing else and not graph outputs.
//!
//! Proof: the first is `LinearCrossEntropy`'s defining decomposition in
//! `ir::op` (and its reference semantics: the logits rounded to x's dtype
//! as the product's result, then `cross_entropy`). The second: for
//! half-precision logits `cross_entropy` is defined on their exact widening
//! to f32, with an f32 result, and the cast is that widening
//! (`widen-into-cross-entropy`), so both sides are the first rule's left
//! side.
//!
//! Why: in a training step the logits `[B, T, V]` and their gradient are
//! the largest values alive (SmolLM2 at 32 × 2048 tokens: 6 GiB each in
//! bf16). Autodiff of the fused op gives `linear_cross_entropy_grad` for x
//! and for w, and a device computes the loss, then both gradients, a block
//! of rows at a time: the logits of one block, their gradient over them, the
//! block's rows of `dx` and its share of `dw`. What it costs is the head's
//! product once more (the gradients recompute the logits the loss
//! computed).
//!
//! Why a graph pass before differentiation and not an e-graph rule: the
//! point is the gradient, which exists only once the fused op has been
//! differentiated (as for `attention` and `rms_norm`, `fuse_for_training`);
//! and "read by nothing else" is a property of one graph, not of a class.
//! A graph that keeps its logits as an output (to print them) is left
//! alone: its logits are stored anyway.

use caramba_ir::{DType, Graph, IrError, NodeId, Op};
use std::collections::{HashMap, HashSet};

/// The pass's name, as reports and docs give it.
pub const NAME: &str = "fuse-linear-cross-entropy";

/// `g` with each head read only by its loss fused, and how many were.
pub fn fuse(g: &Graph) -> Result<(Graph, usize), IrError> {
    let outputs: HashSet<NodeId> = g.outputs().iter().map(|(_, id)| *id).collect();
    let only_reader = |v: NodeId, u: NodeId| !outputs.contains(&v) && g.users(v) == [u];
    // Each loss fused → (x, w, targets), and the nodes it absorbs.
    let mut fused: HashMap<NodeId, [NodeId; 3]> = HashMap::new();
    let mut absorbed: HashSet<NodeId> = HashSet::new();
    for id in g.node_ids() {
        if g.node(id).op != Op::CrossEntropy {
            continue;
        }
        let [l, t] = g.operands(id)[..] else {
            continue;
        };
        let mut inner = vec![];
        let mut product = l;
        if let Op::Cast(DType::F32) = g.node(l).op {
            let from = g.operands(l)[0];
            if !matches!(g.node(from).ty.dtype, DType::F16 | DType::BF16) || !only_reader(l, id) {
                continue;
            }
            inner.push(l);
            product = from;
        }
        let reader = inner.last().copied().unwrap_or(id);
        if g.node(product).op != Op::MatMul || !only_reader(product, reader) {
            continue;
        }
        let [x, w] = g.operands(product)[..] else {
            continue;
        };
        if g.node(w).ty.shape.rank() != 2 || g.node(x).ty.shape.rank() < 2 {
            continue;
        }
        inner.push(product);
        absorbed.extend(inner);
        fused.insert(id, [x, w, t]);
    }
    let (out, _) = g.rebuilt(&absorbed, |out, id, map| {
        fused
            .get(&id)
            .map(|xs| {
                let xs: Vec<NodeId> = xs.iter().map(|o| map[o]).collect();
                out.add(Op::LinearCrossEntropy, &xs, &g.node(id).scope)
            })
            .transpose()
    })?;
    Ok((out, fused.len()))
}
