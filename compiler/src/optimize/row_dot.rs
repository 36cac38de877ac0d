//! `row-dot`: a row's dot product summed from widened copies becomes one
//! `row_dot` that reads its operands as they are.
//!
//! Attention's backward sums `delta = Σ dout·out` per query row; autodiff
//! writes it as `sum_last(mul(cast(dout, f32), cast(out, f32)))` for
//! f16/bf16 models (the operands widened, as FlashAttention-2 does) and as
//! `sum_last(mul(dout, out))` for f32 ones. As primitives that is four
//! kernels for half models (two casts writing f32 copies, their product,
//! the sum) and two for f32 ones; `row_dot` reads x and y once and writes
//! the rows. The rule matches any such sum over the last axis, not only
//! attention's: either operand order of the product, operands of one type
//! (the product must not broadcast), and for half operands both widened to
//! f32 (a product computed in half precision rounds, which `row_dot` does
//! not). A widened copy that has other users is still matched: extraction
//! decides whether computing it for them alone is worth it.
//!
//! It stops at exact sums over the last axis: a mean, a sum over another
//! axis or a product with a broadcast operand is left as it is.

use super::lang::EG;
use super::rule::{Recipe, Ref, Rule};
use caramba_ir::{BinaryOp, DType, Op, ReduceOp};
use egg::Id;

/// `sum_last(mul(x, y)) = row_dot(x, y)` for f32/f64 `x` and `y` of one
/// type, and `sum_last(mul(cast(x, f32), cast(y, f32))) = row_dot(x, y)`
/// for f16/bf16 `x` and `y` of one type.
///
/// Proof: these are `RowDot`'s defining decomposition in `ir::op` (and its
/// reference semantics), `sum{last}(mul(cast(x, s), cast(y, s)))` with `s`
/// the statistics dtype of x's, where a cast to x's own dtype (f32, f64) is
/// the identity. The product's operand order does not matter (`a·b = b·a`
/// exactly in IEEE arithmetic), and operands of one type make the product
/// elementwise without broadcasting, as `row_dot` is.
pub static ROW_DOT: Rule = Rule {
    name: "row-dot",
    search,
};

/// The classes whose widening to `s` (a cast, or the class itself when it
/// is of dtype `s` already) is class `id`, each of a dtype whose statistics
/// dtype is `s`.
fn narrowed(eg: &EG, id: Id) -> Vec<Id> {
    let s = eg[id].data.ty.dtype;
    let mut out = Vec::new();
    if s.stats() == s {
        out.push(id);
    }
    for n in &eg[id].nodes {
        if n.op == Op::Cast(s) {
            let x = n.children[0];
            let d = eg[x].data.ty.dtype;
            if d != s && d.is_float() && d.stats() == s {
                out.push(x);
            }
        }
    }
    out
}

fn search(eg: &EG, id: Id) -> Vec<Recipe> {
    let mut out = Vec::new();
    let ty = &eg[id].data.ty;
    let Some(last) = ty.shape.rank().checked_sub(1) else {
        return out;
    };
    if !matches!(ty.dtype, DType::F32 | DType::F64) {
        return out;
    }
    let sum = Op::Reduce {
        op: ReduceOp::Sum,
        axis: last,
    };
    for s in eg[id].nodes.iter().filter(|n| n.op == sum) {
        let prod = s.children[0];
        for m in eg[prod]
            .nodes
            .iter()
            .filter(|n| n.op == Op::Binary(BinaryOp::Mul))
        {
            let (a, b) = (m.children[0], m.children[1]);
            if eg[a].data.ty != eg[prod].data.ty || eg[b].data.ty != eg[prod].data.ty {
                continue;
            }
            for x in narrowed(eg, a) {
                for y in narrowed(eg, b) {
                    if eg[x].data.ty != eg[y].data.ty {
                        continue;
                    }
                    let mut r = Recipe::new();
                    let d = r.node(Op::RowDot, &[Ref::Class(x), Ref::Class(y)]);
                    out.push(r.result(d));
                }
            }
        }
    }
    out
}
