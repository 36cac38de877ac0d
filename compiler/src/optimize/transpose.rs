//! Moving transposes (permutes that swap the last two axes) inward, so that
//! a weight gradient comes out of its product in the weight's own layout.
//!
//! Autodiff differentiates a projection `matmul(x, permute(w))` for the
//! transposed weight: `xᵀ·dy` summed over the batch (`[K, N]`), then the
//! permute's rule transposes it back to `w`'s `[N, K]`. That last transpose
//! is a strided copy (or a strided read in the cast to the f32 master
//! weight's gradient), while `dyᵀ·x` would give `[N, K]` directly. These
//! rules carry the transpose through the reshape and the batch sum onto the
//! product, where `(a·b)ᵀ = bᵀ·aᵀ` leaves it on the product's operands;
//! `permute-compose` then cancels the transposes that meet there, and the
//! executor reads the rest through strides.
//!
//! `P` below is the permute of a rank-`r` tensor that swaps axes `r − 2`
//! and `r − 1` and keeps the others.

use super::lang::EG;
use super::rule::{Recipe, Ref, Rule};
use caramba_ir::{Op, ReduceOp, Shape};
use egg::Id;

/// `P(matmul(a, b)) = matmul(P(b), P(a))`.
///
/// Proof: element `[…, i, j]` of the left side is element `[…, j, i]` of
/// `a·b`, `Σₖ a[…, j, k]·b[…, k, i]`; on the right it is `Σₖ P(b)[…, i, k]·
/// P(a)[…, k, j]`, the same products over the same `k` (leading axes
/// broadcast alike on both sides, since `P` keeps them).
pub static TRANSPOSE_PRODUCT: Rule = Rule {
    name: "transpose-product",
    search: transpose_product,
};

/// `P(sum{axis}(z)) = sum{axis}(P(z))` for an axis before the last two.
///
/// Proof: the sum keeps its axis (size 1), so both sides have `z`'s rank;
/// summing over one axis and permuting two others commute, element by
/// element with the same terms in the same order.
pub static TRANSPOSE_SUM: Rule = Rule {
    name: "transpose-sum",
    search: transpose_sum,
};

/// `P(reshape(y, s)) = reshape(P(y), P(s))` when the reshape only adds or
/// removes leading size-1 axes (`y` and `s` agree once those are dropped,
/// both of rank 2 or more).
///
/// Proof: such a reshape renames the leading unit axes and keeps every
/// element's last two coordinates, so swapping those before or after it
/// moves the same elements to the same places.
pub static TRANSPOSE_RESHAPE: Rule = Rule {
    name: "transpose-reshape",
    search: transpose_reshape,
};

pub fn rules() -> Vec<&'static Rule> {
    vec![&TRANSPOSE_PRODUCT, &TRANSPOSE_SUM, &TRANSPOSE_RESHAPE]
}

/// The permute of a rank-`r` tensor that swaps its last two axes.
fn swap_last2(r: usize) -> Vec<usize> {
    let mut p: Vec<usize> = (0..r).collect();
    p.swap(r - 2, r - 1);
    p
}

/// The child of each `P` node in class `id`.
fn transposed(eg: &EG, id: Id) -> Vec<Id> {
    let r = eg[id].data.ty.shape.rank();
    if r < 2 {
        return Vec::new();
    }
    let p = swap_last2(r);
    eg[id]
        .nodes
        .iter()
        .filter(|n| n.op == Op::Permute(p.clone()))
        .map(|n| n.children[0])
        .collect()
}

/// `P` over `x` (of rank `rank`) in recipe `r`, or `None` below rank 2.
fn permute(r: &mut Recipe, x: Ref, rank: usize) -> Option<Ref> {
    (rank >= 2).then(|| r.node(Op::Permute(swap_last2(rank)), &[x]))
}

fn transpose_product(eg: &EG, id: Id) -> Vec<Recipe> {
    let mut out = Vec::new();
    for m in transposed(eg, id) {
        for n in &eg[m].nodes {
            if n.op != Op::MatMul {
                continue;
            }
            let (a, b) = (n.children[0], n.children[1]);
            let (ra, rb) = (eg[a].data.ty.shape.rank(), eg[b].data.ty.shape.rank());
            let mut r = Recipe::new();
            let (Some(bt), Some(at)) = (
                permute(&mut r, Ref::Class(b), rb),
                permute(&mut r, Ref::Class(a), ra),
            ) else {
                continue;
            };
            let y = r.node(Op::MatMul, &[bt, at]);
            out.push(r.result(y));
        }
    }
    out
}

fn transpose_sum(eg: &EG, id: Id) -> Vec<Recipe> {
    let mut out = Vec::new();
    let rank = eg[id].data.ty.shape.rank();
    for s in transposed(eg, id) {
        for n in &eg[s].nodes {
            let Op::Reduce {
                op: ReduceOp::Sum,
                axis,
            } = n.op
            else {
                continue;
            };
            let z = n.children[0];
            if axis + 2 >= rank || eg[z].data.ty.shape.rank() != rank {
                continue;
            }
            let mut r = Recipe::new();
            let zt = r.node(Op::Permute(swap_last2(rank)), &[Ref::Class(z)]);
            let y = r.node(
                Op::Reduce {
                    op: ReduceOp::Sum,
                    axis,
                },
                &[zt],
            );
            out.push(r.result(y));
        }
    }
    out
}

/// `dims` without its leading 1s.
fn without_leading_ones(dims: &[caramba_ir::Dim]) -> &[caramba_ir::Dim] {
    let k = dims.iter().take_while(|d| d.as_const() == Some(1)).count();
    &dims[k..]
}

fn transpose_reshape(eg: &EG, id: Id) -> Vec<Recipe> {
    let mut out = Vec::new();
    for s in transposed(eg, id) {
        for n in &eg[s].nodes {
            let Op::Reshape(to) = &n.op else { continue };
            let y = n.children[0];
            let from = &eg[y].data.ty.shape;
            let (rf, rt) = (from.rank(), to.rank());
            if rf < 2
                || rt < 2
                || without_leading_ones(from.dims()) != without_leading_ones(to.dims())
                || without_leading_ones(to.dims()).len() < 2
            {
                continue;
            }
            let mut target = to.dims().to_vec();
            target.swap(rt - 2, rt - 1);
            let mut r = Recipe::new();
            let yt = r.node(Op::Permute(swap_last2(rf)), &[Ref::Class(y)]);
            let z = r.node(Op::Reshape(Shape(target)), &[yt]);
            out.push(r.result(z));
        }
    }
    out
}
