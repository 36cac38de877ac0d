//! `merge-dba-scores`: decoupled attention's two score products become one.
//!
//! DBA lowers its scores as `(q_s·k_sᵀ)·s₁ + (q_g·k_gᵀ)·s₂`. This rewrites
//! that sum into a single product over concatenated features,
//! `[q_s·s₁ ‖ q_g·s₂] · [k_s ‖ k_g]ᵀ`, which `fuse-attention` then turns into
//! one `attention{scale = 1}` — so a DBA layer runs as one fused attention
//! whose key is exactly what a KV cache would store per token.
//!
//! Conditions: `s₁`, `s₂` are single-element constants (or absent); the two
//! query sides agree on every axis but the last, and so do the two key sides
//! (their feature axis is the second-to-last of `kᵀ`); the sum broadcasts
//! nothing. It stops at two terms: a sum of three score products would need
//! the rule twice, which it does not attempt.

use super::attention::{scaled_scores, swap_last2, untranspose};
use super::lang::EG;
use super::rule::{Recipe, Ref, Rule};
use caramba_ir::{BinaryOp, Op};
use egg::Id;

/// `(a·aₖᵀ)·s₁ + (b·bₖᵀ)·s₂ = [a·s₁ ‖ b·s₂] · [aₖ ‖ bₖ]ᵀ` (concatenation on
/// the feature axis).
///
/// Proof: entry `(t, s)` of the left side is
/// `s₁·Σᵢ a[t,i]·aₖ[s,i] + s₂·Σⱼ b[t,j]·bₖ[s,j]`
/// `= Σᵢ (s₁·a[t,i])·aₖ[s,i] + Σⱼ (s₂·b[t,j])·bₖ[s,j]`,
/// one sum over the concatenated index `i ‖ j` of
/// `[a·s₁ ‖ b·s₂][t,·] · [aₖ ‖ bₖ][s,·]`, which is entry `(t, s)` of the
/// right side. Leading axes broadcast identically on both sides because the
/// concatenated operands agree on them. (Exact in real arithmetic; in
/// floating point the scale moves before the products, a rounding-level
/// change.)
pub static MERGE_DBA_SCORES: Rule = Rule {
    name: "merge-dba-scores",
    search,
};

fn search(eg: &EG, id: Id) -> Vec<Recipe> {
    let mut out = Vec::new();
    let ty = &eg[id].data.ty;
    for n in &eg[id].nodes {
        if n.op != Op::Binary(BinaryOp::Add) {
            continue;
        }
        let (a, b) = (n.children[0], n.children[1]);
        if eg[a].data.ty != *ty || eg[b].data.ty != *ty {
            continue;
        }
        let Some(recipe) = merge(eg, a, b) else {
            continue;
        };
        out.push(recipe);
    }
    out
}

/// The merged product of the first pair of score forms of `a` and `b` whose
/// shapes allow it.
fn merge(eg: &EG, a: Id, b: Id) -> Option<Recipe> {
    for (qa, ka, sa) in scaled_scores(eg, a) {
        for (qb, kb, sb) in scaled_scores(eg, b) {
            if !agree_but(eg, qa, qb, 1) || !agree_but(eg, ka, kb, 2) {
                continue;
            }
            let rank = eg[qa].data.ty.shape.rank();
            let krank = eg[ka].data.ty.shape.rank();
            let mut r = Recipe::new();
            let scaled = |r: &mut Recipe, q: Id, s: Option<Id>| match s {
                Some(s) => r.node(Op::Binary(BinaryOp::Mul), &[Ref::Class(q), Ref::Class(s)]),
                None => Ref::Class(q),
            };
            let qa = scaled(&mut r, qa, sa);
            let qb = scaled(&mut r, qb, sb);
            let q = r.node(Op::Concat { axis: rank - 1 }, &[qa, qb]);
            let ka = untranspose(&mut r, eg, ka);
            let kb = untranspose(&mut r, eg, kb);
            let k = r.node(Op::Concat { axis: krank - 1 }, &[ka, kb]);
            let kt = r.node(Op::Permute(swap_last2(krank)), &[k]);
            let s = r.node(Op::MatMul, &[q, kt]);
            let mut r = r.result(s);
            r.inherit.extend([a, b]);
            return Some(r);
        }
    }
    None
}

/// Whether `x` and `y` have one dtype and rank and agree on every axis but
/// the `from_end`-th from the end (1 = last).
fn agree_but(eg: &EG, x: Id, y: Id, from_end: usize) -> bool {
    let (tx, ty) = (&eg[x].data.ty, &eg[y].data.ty);
    let r = tx.shape.rank();
    tx.dtype == ty.dtype
        && r == ty.shape.rank()
        && r >= 2
        && (0..r).all(|i| i == r - from_end || tx.shape.dims()[i] == ty.shape.dims()[i])
}
