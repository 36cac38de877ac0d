//! `fuse-rmsnorm`: the lowered RMSNorm chain becomes one `rms_norm`.
//!
//! Lowering writes `x · rsqrt(mean_last(x · x) + eps) · w`; this finds that
//! chain (either operand order of each product and of the `+ eps`) with `w`
//! a vector over the last axis of `x` and `eps` a scalar constant. LayerNorm
//! contains the same chain over the centred `x − mean(x)`, so it becomes
//! `rms_norm(x − mean(x), w) (+ b)`, which is exactly its definition.
//!
//! For f16/bf16 models lowering widens `x` to f32, normalizes there and
//! narrows the normalized row before multiplying by `w` in the model dtype:
//! `cast(x₃₂ · rsqrt(mean_last(x₃₂ · x₃₂) + eps), h) · w` with
//! `x₃₂ = cast(x, f32)`, which is `rms_norm`'s definition for a half `x`
//! (see `Op::RmsNorm`), so it becomes `rms_norm(x, w)` too. A half
//! LayerNorm normalizes the centred f32 row, which is not the widening of a
//! half tensor: it is left as primitives (the elementwise pass still fuses
//! its tail).

use super::lang::EG;
use super::rule::{Recipe, Ref, Rule};
use caramba_ir::{BinaryOp, DType, Op, ReduceOp, Scalar, UnaryOp};
use egg::Id;

/// `(x · rsqrt(mean_last(x · x) + eps)) · w = rms_norm{eps}(x, w)`, and for
/// a half `x`, `cast(x₃₂ · rsqrt(mean_last(x₃₂ · x₃₂) + eps), h) · w =
/// rms_norm{eps}(x, w)` with `x₃₂ = cast(x, f32)`.
///
/// Proof: these are `RmsNorm`'s defining decompositions in `ir::op` (and its
/// reference semantics): the same products in the same order, the mean taken
/// over the last axis, `w` broadcast along it, and for a half `x` the
/// normalized row rounded to x's dtype before the product with `w`.
pub static FUSE_RMSNORM: Rule = Rule {
    name: "fuse-rmsnorm",
    search,
};

fn binary_pairs(eg: &EG, id: Id, op: BinaryOp) -> Vec<(Id, Id)> {
    eg[id]
        .nodes
        .iter()
        .filter(|n| n.op == Op::Binary(op))
        .flat_map(|n| {
            let (a, b) = (n.children[0], n.children[1]);
            [(a, b), (b, a)]
        })
        .collect()
}

fn search(eg: &EG, id: Id) -> Vec<Recipe> {
    let mut out = Vec::new();
    let ty = &eg[id].data.ty;
    for (xn, w) in binary_pairs(eg, id, BinaryOp::Mul) {
        let wt = &eg[w].data.ty;
        if wt.shape.rank() != 1 || wt.shape.last() != ty.shape.last() || wt.dtype != ty.dtype {
            continue;
        }
        for (x, eps) in normalized(eg, xn, ty) {
            let mut r = Recipe::new();
            let y = r.node(
                Op::RmsNorm { eps: Scalar(eps) },
                &[Ref::Class(x), Ref::Class(w)],
            );
            out.push(r.result(y));
        }
    }
    out
}

/// Each `(x, eps)` for which class `xn` (of type `ty`) is `x`'s normalized
/// row: `x · rsqrt(mean_last(x · x) + eps)` with `x` of type `ty`, or for a
/// half `ty` that product over `x₃₂ = cast(x, f32)`, narrowed to `ty`.
fn normalized(eg: &EG, xn: Id, ty: &caramba_ir::TensorType) -> Vec<(Id, f64)> {
    let mut out = Vec::new();
    if !matches!(ty.dtype, DType::F16 | DType::BF16) {
        for (x, inv) in binary_pairs(eg, xn, BinaryOp::Mul) {
            if eg[x].data.ty == *ty {
                if let Some(eps) = rsqrt_of_mean_square(eg, inv, x) {
                    out.push((x, eps));
                }
            }
        }
        return out;
    }
    // A chain computed in half precision throughout would round its
    // intermediates, which `rms_norm` does not: only the widened form.
    for narrow in eg[xn].nodes.iter().filter(|n| n.op == Op::Cast(ty.dtype)) {
        for (x32, inv) in binary_pairs(eg, narrow.children[0], BinaryOp::Mul) {
            let Some(eps) = rsqrt_of_mean_square(eg, inv, x32) else {
                continue;
            };
            for widen in eg[x32]
                .nodes
                .iter()
                .filter(|n| n.op == Op::Cast(DType::F32))
            {
                let x = widen.children[0];
                if eg[x].data.ty == *ty {
                    out.push((x, eps));
                }
            }
        }
    }
    out
}

/// `eps` when `inv` is `rsqrt(mean_last(x · x) + eps)`.
fn rsqrt_of_mean_square(eg: &EG, inv: Id, x: Id) -> Option<f64> {
    let last = eg[x].data.ty.shape.rank().checked_sub(1)?;
    for n in &eg[inv].nodes {
        if n.op != Op::Unary(UnaryOp::Rsqrt) {
            continue;
        }
        for (ms, e) in binary_pairs(eg, n.children[0], BinaryOp::Add) {
            let Some(eps) = eg[e].data.scalar() else {
                continue;
            };
            let mean_of_square = eg[ms].nodes.iter().any(|m| {
                m.op == Op::Reduce {
                    op: ReduceOp::Mean,
                    axis: last,
                } && eg[m.children[0]].nodes.iter().any(|s| {
                    s.op == Op::Binary(BinaryOp::Mul)
                        && eg.find(s.children[0]) == eg.find(x)
                        && eg.find(s.children[1]) == eg.find(x)
                })
            });
            if mean_of_square {
                return Some(eps);
            }
        }
    }
    None
}
