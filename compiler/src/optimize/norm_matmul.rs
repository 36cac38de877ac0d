//! `fuse-norm-matmul`: a product that reads an RMSNorm's output becomes one
//! `rms_norm_matmul`, so that the normalized rows are never stored.
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
//! Why after `merge-projections`: a norm read by three unmerged products
//! would fold into each of them, and a GEMM that falls back to the norm
//! kernel would normalize three times. Merged, each norm has one reader.
//! Extraction counts a shared operand once per reader (egg's tree cost), so
//! it cannot see that; `optimize` merges projections before saturating.
//!
//! It stops at products whose right operand is a matrix (a linear layer's
//! weight, read through any view): a batched product of two activations
//! after a norm is not a projection, and the op does not take one.

use super::lang::EG;
use super::rule::{Recipe, Ref, Rule};
use caramba_ir::Op;
use egg::Id;

/// `matmul(rms_norm{eps}(x, w), b) = rms_norm_matmul{eps}(x, w, b)` for a
/// matrix `b`.
///
/// Proof: this is `RmsNormMatMul`'s defining decomposition in `ir::op`
/// (and its reference semantics): the normalized rows rounded as
/// `rms_norm`'s result is, then `matmul` with `b`; the output's leading
/// axes are x's, as `matmul`'s are for a rank-2 right operand.
pub static FUSE_NORM_MATMUL: Rule = Rule {
    name: "fuse-norm-matmul",
    search,
};

fn search(eg: &EG, id: Id) -> Vec<Recipe> {
    let mut out = Vec::new();
    for m in eg[id].nodes.iter().filter(|n| n.op == Op::MatMul) {
        let (a, b) = (m.children[0], m.children[1]);
        if eg[b].data.ty.shape.rank() != 2 || eg[a].data.ty.shape.rank() < 2 {
            continue;
        }
        for n in &eg[a].nodes {
            let Op::RmsNorm { eps } = n.op else {
                continue;
            };
            let mut r = Recipe::new();
            let y = r.node(
                Op::RmsNormMatMul { eps },
                &[
                    Ref::Class(n.children[0]),
                    Ref::Class(n.children[1]),
                    Ref::Class(b),
                ],
            );
            out.push(r.result(y));
        }
    }
    out
}
