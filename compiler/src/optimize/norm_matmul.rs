//! `fuse-norm-matmul`: a product that is the only reader of an RMSNorm's
//! output becomes one `rms_norm_matmul`, so that the normalized rows are
//! never stored.
//!
//! ```text
//! matmul(rms_norm{eps}(x, w), b)  →  rms_norm_matmul{eps}(x, w, b)    b a matrix
//! ```
//!
//! Proof: this is `RmsNormMatMul`'s defining decomposition in `ir::op`
//! (and its reference semantics): the normalized rows rounded as
//! `rms_norm`'s result is, then `matmul` with `b`; the output's leading
//! axes are x's, as `matmul`'s are for a rank-2 right operand.
//!
//! A pre-norm block normalizes its input and projects it at once: attention
//! its q, k and v (one product after `merge-projections`), SwiGLU its gate
//! and up, the LM head the last hidden state. As two ops the normalized
//! rows are written by the norm and read back by the product; fused, the
//! device computes each row's statistic where the product reads the row.
//! How much that saves depends on the kernel: a decode step's few rows
//! (the matrix-vector kernel) fold the norm in for free, saving the norm's
//! launch and its round trip; a GEMM of many rows still runs the norm as
//! a kernel of its own first (cubek's and cuBLASLt's matmuls take no
//! prologue), as before the rewrite.
//!
//! Why a graph pass after extraction and not an e-graph rule: the rule
//! needs to know that the product is the norm's *only* reader (a norm read
//! by three unmerged products would be computed three times by GEMMs that
//! fall back to the norm kernel), which only the chosen graph knows; and it
//! was one first, which extraction took in 27 of the 33 places of
//! `llama32_1b_dba.yml`. egg's extractor sums the costs of a node's
//! operands as trees, so a residual stream read by two branches per block
//! doubles the cost per block: by layer 11 a class costs about 1e23, whose
//! f64 spacing is larger than what the fold saves (a launch and two passes
//! over the rows), and the two choices compared equal (NOTES). `optimize`
//! merges projections before saturating, so each norm of a block has one
//! product to fold into.
//!
//! It stops at products whose right operand is a matrix (a linear layer's
//! weight, read through any view): a batched product of two activations
//! after a norm is not a projection, and the op does not take one.

use caramba_ir::{Graph, IrError, NodeId, Op};
use std::collections::{HashMap, HashSet};

/// The pass's name, as reports and docs give it.
pub const NAME: &str = "fuse-norm-matmul";

/// The graph after the pass, where each old node went, and the folds.
pub struct Folded {
    pub graph: Graph,
    /// Old node → new node, for every old node but the folded norms (the
    /// product each folded into maps to its `rms_norm_matmul`).
    pub map: HashMap<NodeId, NodeId>,
    /// Each `rms_norm_matmul` formed, with the old norm folded into it.
    pub folds: Vec<(NodeId, NodeId)>,
}

/// `g` with every `matmul(rms_norm(x, w), b)` whose norm has no other
/// reader (and is not an output) and whose `b` is a matrix folded.
pub fn fold(g: &Graph) -> Result<Folded, IrError> {
    let outputs: HashSet<NodeId> = g.outputs().iter().map(|(_, id)| *id).collect();
    let mut norm_of: HashMap<NodeId, NodeId> = HashMap::new();
    for id in g.node_ids() {
        if g.node(id).op != Op::MatMul {
            continue;
        }
        let [a, b] = g.operands(id)[..] else {
            continue;
        };
        if matches!(g.node(a).op, Op::RmsNorm { .. })
            && g.node(b).ty.shape.rank() == 2
            && g.node(a).ty.shape.rank() >= 2
            && !outputs.contains(&a)
            && g.users(a) == [id]
        {
            norm_of.insert(id, a);
        }
    }
    let folded: HashSet<NodeId> = norm_of.values().copied().collect();
    let mut folds = Vec::new();
    let (out, map) = g.rebuilt(&folded, |out, id, map| {
        let Some(&norm) = norm_of.get(&id) else {
            return Ok(None);
        };
        let Op::RmsNorm { eps } = g.node(norm).op else {
            unreachable!("folds are of norms")
        };
        let xs = g.operands(norm);
        let b = g.operands(id)[1];
        let y = out.add(
            Op::RmsNormMatMul { eps },
            &[map[&xs[0]], map[&xs[1]], map[&b]],
            &g.node(id).scope,
        )?;
        folds.push((y, norm));
        Ok(Some(y))
    })?;
    Ok(Folded {
        graph: out,
        map,
        folds,
    })
}
