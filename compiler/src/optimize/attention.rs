//! `fuse-attention`: scores, mask, softmax and the product with values
//! become one `attention`.
//!
//! It matches `matmul(softmax_last(causal_mask(S)), v)` and the same without
//! the mask, where the scores `S` are `matmul(q, kᵀ) · c` (either operand
//! order of the product, `c` a scalar constant) or a bare `matmul(q, kᵀ)`
//! (scale 1, the form `merge-dba-scores` builds). The fused op takes `k`
//! un-transposed: `kᵀ`'s permute composed with a swap of the last two axes,
//! which for lowering's `[B, kv, 1, d, T]` keys is the `[B, kv, 1, T, d]`
//! layout values already use.
//!
//! It stops at the eval-mode graph: dropout between softmax and the value
//! product (training with `dropout_p > 0`) blocks the match, and so would
//! any mask other than `causal_mask`.

use super::algebra::{compose, is_identity};
use super::lang::EG;
use super::rule::{Recipe, Ref, Rule};
use caramba_ir::{BinaryOp, Op, Scalar};
use egg::Id;

/// `matmul(softmax_last([causal_mask](matmul(q, kᵀ) · c)), v)
///  = attention{causal, scale = c}(q, k, v)`.
///
/// Proof: `Attention`'s defining decomposition is
/// `matmul(softmax_last(mask(mul(matmul(q, permute_last2(k)), scale))), v)`;
/// with `k = permute_last2(kᵀ)` the two sides are that decomposition term for
/// term (`permute_last2` is an involution). `c · s = s · c` exactly in IEEE
/// arithmetic, so either operand order matches.
pub static FUSE_ATTENTION: Rule = Rule {
    name: "fuse-attention",
    search,
};

/// The permutation swapping the last two of `rank` axes.
pub fn swap_last2(rank: usize) -> Vec<usize> {
    let mut p: Vec<usize> = (0..rank).collect();
    p.swap(rank - 2, rank - 1);
    p
}

/// `permute_last2(kt)` as a recipe operand: composed with a permute already
/// in `kt`'s class when there is one (so `permute(permute(k))` becomes `k` or
/// one permute of it), else a new permute.
pub fn untranspose(r: &mut Recipe, eg: &EG, kt: Id) -> Ref {
    let swap = swap_last2(eg[kt].data.ty.shape.rank());
    for n in &eg[kt].nodes {
        if let Op::Permute(p) = &n.op {
            let c = compose(p, &swap);
            return if is_identity(&c) {
                Ref::Class(n.children[0])
            } else {
                r.node(Op::Permute(c), &[Ref::Class(n.children[0])])
            };
        }
    }
    r.node(Op::Permute(swap), &[Ref::Class(kt)])
}

/// The ways class `s` is a scaled score product: `(q, kᵀ, scale class)`,
/// with no scale class for a bare product.
pub fn scaled_scores(eg: &EG, s: Id) -> Vec<(Id, Id, Option<Id>)> {
    let mut out = Vec::new();
    for n in &eg[s].nodes {
        match n.op {
            Op::MatMul => out.push((n.children[0], n.children[1], None)),
            Op::Binary(BinaryOp::Mul) => {
                let (a, b) = (n.children[0], n.children[1]);
                for (m, c) in [(a, b), (b, a)] {
                    if eg[c].data.scalar().is_none() || eg[m].data.ty != eg[s].data.ty {
                        continue;
                    }
                    for mm in &eg[m].nodes {
                        if mm.op == Op::MatMul {
                            out.push((mm.children[0], mm.children[1], Some(c)));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    out
}

fn search(eg: &EG, id: Id) -> Vec<Recipe> {
    let mut out = Vec::new();
    for n in &eg[id].nodes {
        if n.op != Op::MatMul {
            continue;
        }
        let (p, v) = (n.children[0], n.children[1]);
        let last = eg[p].data.ty.shape.rank() - 1;
        for sm in &eg[p].nodes {
            if sm.op != (Op::Softmax { axis: last }) {
                continue;
            }
            let m = sm.children[0];
            let mut candidates = vec![(false, m)];
            for mk in &eg[m].nodes {
                if mk.op == Op::CausalMask {
                    candidates.push((true, mk.children[0]));
                }
            }
            for (causal, s) in candidates {
                for (q, kt, c) in scaled_scores(eg, s) {
                    let scale = c.map_or(Some(1.0), |c| eg[c].data.scalar());
                    let Some(scale) = scale else { continue };
                    let mut r = Recipe::new();
                    let k = untranspose(&mut r, eg, kt);
                    let y = r.node(
                        Op::Attention {
                            causal,
                            scale: Scalar(scale),
                        },
                        &[Ref::Class(q), k, Ref::Class(v)],
                    );
                    let mut r = r.result(y);
                    r.inherit.push(s);
                    out.push(r);
                }
            }
        }
    }
    out
}
