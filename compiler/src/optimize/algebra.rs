//! Algebra and cleanup: layout ops that compose or vanish, and identities
//! of multiplication and addition.
//!
//! Common subexpressions need no rule (the e-graph hash-conses equal nodes)
//! and neither do dead nodes (extraction starts from the outputs). Every
//! rule here keeps the class type: a rule that would change a shape through
//! broadcasting (`x · 1` with a one of higher rank) does not fire.
//!
//! It stops at identities: no reassociation or commutation, which would grow
//! the e-graph without making any fused pattern appear.

use super::lang::EG;
use super::rule::{Recipe, Rule};
use caramba_ir::{BinaryOp, Op};
use egg::Id;

/// `permute(permute(x, p), q) = permute(x, r)` with `r[i] = p[q[i]]`.
///
/// Proof: output axis `i` of the outer permute is its input's axis `q[i]`,
/// which is `x`'s axis `p[q[i]]`. When `r` is the identity the result is `x`.
pub static PERMUTE_COMPOSE: Rule = Rule {
    name: "permute-compose",
    search: permute_compose,
};

/// `permute(x, [0, 1, …, n−1]) = x`.
///
/// Proof: output axis `i` is input axis `i`, so every element stays put.
pub static PERMUTE_IDENTITY: Rule = Rule {
    name: "permute-identity",
    search: permute_identity,
};

/// `reshape(reshape(x, s₁), s₂) = reshape(x, s₂)`.
///
/// Proof: a reshape keeps the row-major order of the elements, so two keep
/// it too; the element counts agree because both reshapes typed.
pub static RESHAPE_COMPOSE: Rule = Rule {
    name: "reshape-compose",
    search: reshape_compose,
};

/// `reshape(x, shape(x)) = x`.
///
/// Proof: same elements in the same order with the same shape.
pub static RESHAPE_IDENTITY: Rule = Rule {
    name: "reshape-identity",
    search: reshape_identity,
};

/// `x · 1 = 1 · x = x` when the product has `x`'s type.
///
/// Proof: IEEE multiplication by one is exact; the type condition rules out
/// a one that broadcasts `x` to a larger shape.
pub static MUL_ONE: Rule = Rule {
    name: "mul-one",
    search: mul_one,
};

/// `x + 0 = 0 + x = x` when the sum has `x`'s type.
///
/// Proof: IEEE addition of zero is exact (`-0 + 0 = +0` is the one change,
/// and no consumer here distinguishes the zeros).
pub static ADD_ZERO: Rule = Rule {
    name: "add-zero",
    search: add_zero,
};

/// `reduce(slice(x, axis b, s..e), axis a) = slice(reduce(x, axis a), axis
/// b, s..e)` for `a ≠ b` (sum, mean or max; the reduced axis keeps size 1).
///
/// Proof: both sides at index `i` reduce the same elements of `x`, those
/// at `i` with axis `b` moved by `s` and axis `a` running over its whole
/// length, in the same order, so even rounding agrees. Two slices of one
/// tensor reduced along the same axis then share one reduction (the
/// e-graph hash-conses it): GQA's `dk‖dv` is summed over each group of
/// query heads once, then sliced, instead of sliced (a copy each, for
/// the reduction reads dense rows) and summed twice.
pub static REDUCE_OF_SLICE: Rule = Rule {
    name: "reduce-of-slice",
    search: reduce_of_slice,
};

pub fn rules() -> Vec<&'static Rule> {
    vec![
        &PERMUTE_COMPOSE,
        &PERMUTE_IDENTITY,
        &RESHAPE_COMPOSE,
        &RESHAPE_IDENTITY,
        &MUL_ONE,
        &ADD_ZERO,
        &REDUCE_OF_SLICE,
    ]
}

pub fn is_identity(perm: &[usize]) -> bool {
    perm.iter().enumerate().all(|(i, &p)| i == p)
}

/// The permutation of `permute(permute(x, inner), outer)`.
pub fn compose(inner: &[usize], outer: &[usize]) -> Vec<usize> {
    outer.iter().map(|&q| inner[q]).collect()
}

fn permute_compose(eg: &EG, id: Id) -> Vec<Recipe> {
    let mut out = Vec::new();
    for n in &eg[id].nodes {
        let Op::Permute(outer) = &n.op else { continue };
        for m in &eg[n.children[0]].nodes {
            let Op::Permute(inner) = &m.op else { continue };
            let r = compose(inner, outer);
            let x = m.children[0];
            out.push(if is_identity(&r) {
                Recipe::existing(x)
            } else {
                let mut rec = Recipe::new();
                let y = rec.node(Op::Permute(r), &[super::rule::Ref::Class(x)]);
                rec.result(y)
            });
        }
    }
    out
}

fn permute_identity(eg: &EG, id: Id) -> Vec<Recipe> {
    eg[id]
        .nodes
        .iter()
        .filter(|n| matches!(&n.op, Op::Permute(p) if is_identity(p)))
        .map(|n| Recipe::existing(n.children[0]))
        .collect()
}

fn reshape_compose(eg: &EG, id: Id) -> Vec<Recipe> {
    let mut out = Vec::new();
    for n in &eg[id].nodes {
        let Op::Reshape(to) = &n.op else { continue };
        for m in &eg[n.children[0]].nodes {
            if !matches!(m.op, Op::Reshape(_)) {
                continue;
            }
            let mut rec = Recipe::new();
            let y = rec.node(
                Op::Reshape(to.clone()),
                &[super::rule::Ref::Class(m.children[0])],
            );
            out.push(rec.result(y));
        }
    }
    out
}

fn reshape_identity(eg: &EG, id: Id) -> Vec<Recipe> {
    eg[id]
        .nodes
        .iter()
        .filter(|n| matches!(&n.op, Op::Reshape(s) if eg[n.children[0]].data.ty.shape == *s))
        .map(|n| Recipe::existing(n.children[0]))
        .collect()
}

/// `op(x, c)` or `op(c, x)` with `c` the scalar `unit`, giving `x`.
fn drop_unit(eg: &EG, id: Id, op: BinaryOp, unit: f64) -> Vec<Recipe> {
    let mut out = Vec::new();
    for n in &eg[id].nodes {
        if n.op != Op::Binary(op) {
            continue;
        }
        let (a, b) = (n.children[0], n.children[1]);
        for (x, c) in [(a, b), (b, a)] {
            if eg[c].data.scalar() == Some(unit) && eg[x].data.ty == eg[id].data.ty {
                out.push(Recipe::existing(x));
            }
        }
    }
    out
}

fn mul_one(eg: &EG, id: Id) -> Vec<Recipe> {
    drop_unit(eg, id, BinaryOp::Mul, 1.0)
}

fn add_zero(eg: &EG, id: Id) -> Vec<Recipe> {
    drop_unit(eg, id, BinaryOp::Add, 0.0)
}

fn reduce_of_slice(eg: &EG, id: Id) -> Vec<Recipe> {
    let mut out = Vec::new();
    for n in &eg[id].nodes {
        let Op::Reduce { op, axis: a } = n.op else {
            continue;
        };
        for m in &eg[n.children[0]].nodes {
            let Op::Slice {
                axis: b,
                start,
                end,
            } = m.op
            else {
                continue;
            };
            if a == b {
                continue;
            }
            let mut rec = Recipe::new();
            let r = rec.node(
                Op::Reduce { op, axis: a },
                &[super::rule::Ref::Class(m.children[0])],
            );
            let y = rec.node(
                Op::Slice {
                    axis: b,
                    start,
                    end,
                },
                &[r],
            );
            out.push(rec.result(y));
        }
    }
    out
}
