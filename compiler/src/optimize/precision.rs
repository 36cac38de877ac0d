//! Mixed-precision clean-up: half-precision values read where lowering
//! widened them first, so that nothing as large as the logits is copied to
//! f32 and back.
//!
//! Lowering writes the loss of an f16/bf16 model as Hugging Face does:
//! `cross_entropy(cast(logits, f32), t)`, and autodiff turns that into
//! `cast(cross_entropy_grad(cast(logits, f32), t, g), h)` for the logits'
//! gradient. Both casts move the whole `[B, T, V]` logits (for a 128k
//! vocabulary, 6 bytes an element each way); the cross-entropy ops read
//! half-precision logits themselves and compute in f32 (`Op::CrossEntropy`,
//! `Op::CrossEntropyGrad`), so the casts are unnecessary.

use super::lang::EG;
use super::rule::{Recipe, Ref, Rule};
use caramba_ir::{DType, Op};
use egg::Id;

/// `cross_entropy(cast(x, f32), t) = cross_entropy(x, t)` for an f16/bf16 `x`.
///
/// Proof: `Op::CrossEntropy` of half-precision logits is defined as the
/// cross-entropy of their exact widening to f32, with an f32 result; the
/// widening cast is that widening (every f16/bf16 value is an f32 value).
pub static WIDEN_INTO_CROSS_ENTROPY: Rule = Rule {
    name: "widen-into-cross-entropy",
    search: widen_into_cross_entropy,
};

/// `cast(cross_entropy_grad(cast(x, f32), t, g), h) =
/// cross_entropy_grad(x, t, g)` for `x` of dtype `h` ∈ {f16, bf16}.
///
/// Proof: `Op::CrossEntropyGrad` of half-precision logits is defined as the
/// f32 gradient of their exact widening, rounded once to the logits' dtype:
/// the inner cast is that widening, the outer cast that rounding; the loss
/// adjoint `g` is f32 on both sides.
pub static NARROW_CROSS_ENTROPY_GRAD: Rule = Rule {
    name: "narrow-cross-entropy-grad",
    search: narrow_cross_entropy_grad,
};

pub fn rules() -> Vec<&'static Rule> {
    vec![&WIDEN_INTO_CROSS_ENTROPY, &NARROW_CROSS_ENTROPY_GRAD]
}

fn is_half(d: DType) -> bool {
    matches!(d, DType::F16 | DType::BF16)
}

/// The half-precision classes `x` with `cast(x, f32)` in class `id`.
fn widened(eg: &EG, id: Id) -> Vec<Id> {
    eg[id]
        .nodes
        .iter()
        .filter(|n| n.op == Op::Cast(DType::F32))
        .map(|n| n.children[0])
        .filter(|&x| is_half(eg[x].data.ty.dtype))
        .collect()
}

fn widen_into_cross_entropy(eg: &EG, id: Id) -> Vec<Recipe> {
    let mut out = Vec::new();
    for n in eg[id].nodes.iter().filter(|n| n.op == Op::CrossEntropy) {
        for x in widened(eg, n.children[0]) {
            let mut r = Recipe::new();
            let y = r.node(
                Op::CrossEntropy,
                &[Ref::Class(x), Ref::Class(n.children[1])],
            );
            out.push(r.result(y));
        }
    }
    out
}

fn narrow_cross_entropy_grad(eg: &EG, id: Id) -> Vec<Recipe> {
    let h = eg[id].data.ty.dtype;
    if !is_half(h) {
        return Vec::new();
    }
    let mut out = Vec::new();
    for cast in eg[id].nodes.iter().filter(|n| n.op == Op::Cast(h)) {
        for n in eg[cast.children[0]]
            .nodes
            .iter()
            .filter(|n| n.op == Op::CrossEntropyGrad)
        {
            for x in widened(eg, n.children[0]) {
                if eg[x].data.ty.dtype != h {
                    continue;
                }
                let mut r = Recipe::new();
                let args = [
                    Ref::Class(x),
                    Ref::Class(n.children[1]),
                    Ref::Class(n.children[2]),
                ];
                let y = r.node(Op::CrossEntropyGrad, &args);
                out.push(r.result(y));
            }
        }
    }
    out
}
