//! `dequantize-in-attention`: attention over keys and values read from a
//! KV cache becomes one `kv_attention` that reads the cache as stored.
//!
//! A cached graph (`lower_model_cached`) reads each path's cache as
//! `dequantize(cache) [B, S, kv·d]` (or a cast of an fp16 cache, or the fp32
//! cache itself), views it as heads with `reshape [B, S, kv, 1, d]` and
//! `permute [0, 2, 3, 1, 4]`, and — after `fuse-attention` — attends over
//! it; DBA's two key paths are concatenated on the feature axis (the form
//! `merge-dba-scores` builds). This rule replaces the dequantized, permuted
//! copies with the caches themselves, so the kernel dequantizes in
//! registers and no dequantized cache is ever written to device memory.
//! Each path keeps its own format (`KvPart`).
//!
//! It matches float caches too (the "dequantization" is the identity or a
//! cast, recognized by the cache's append `concat` on the position axis),
//! so every cached attention runs on the same kernel. It needs every
//! key part and the values to be such views; anything else (a key computed
//! in place, a mask other than causal) leaves the attention as it is.

use super::lang::EG;
use super::rule::{Recipe, Ref, Rule};
use caramba_ir::{DType, Dim, KvPart, Op, QuantFormat};
use egg::Id;

/// `attention{c, s}(q, concat₄(view(deq(k₁)), …), view(deq(v)))
///  = kv_attention{c, s, kv, parts}(q, k₁, …, v)`.
///
/// Proof: the right side is defined by its decomposition (`Op::KvAttention`),
/// which rebuilds each part as `permute[0,2,3,1,4](reshape[B,S,kv,1,d](
/// dequantize(c)))`, concatenates the key parts on the last axis and applies
/// `attention{c, s}` — term for term the left side. A float part skips the
/// dequantization: its decomposition reads `c` directly (converted to q's
/// dtype, which is what the matched cast did).
pub static DEQUANTIZE_IN_ATTENTION: Rule = Rule {
    name: "dequantize-in-attention",
    search,
};

/// A cache viewed as heads: the part, the cache's class and its heads.
fn cache_view(eg: &EG, c: Id, dtype: DType) -> Option<(KvPart, Id, usize)> {
    for n in &eg[c].nodes {
        if n.op != Op::Permute(vec![0, 2, 3, 1, 4]) {
            continue;
        }
        for r in &eg[n.children[0]].nodes {
            let Op::Reshape(shape) = &r.op else { continue };
            let x = r.children[0];
            let (Some(&[b, s, kv, one, d]), xd) = (
                Some(shape.dims()).filter(|d| d.len() == 5),
                eg[x].data.ty.shape.dims(),
            ) else {
                continue;
            };
            let (Dim::Const(kv), Dim::Const(d)) = (kv, d) else {
                continue;
            };
            if one != Dim::Const(1) || xd != [b, s, Dim::Const(kv * d)] {
                continue;
            }
            let (format, cache) = storage(eg, x, dtype)?;
            return Some((KvPart { format, dim: d }, cache, kv));
        }
    }
    None
}

/// How the dense values `x` are read from a cache: `dequantize` of words,
/// a cast of a float cache of another dtype, or the appended fp32 cache.
fn storage(eg: &EG, x: Id, dtype: DType) -> Option<(Option<QuantFormat>, Id)> {
    for n in &eg[x].nodes {
        match n.op {
            Op::Dequantize { format, dtype: to } if to == dtype => {
                return Some((Some(format), n.children[0]))
            }
            Op::Cast(to) if to == dtype && eg[n.children[0]].data.ty.dtype.is_float() => {
                return Some((None, n.children[0]))
            }
            _ => {}
        }
    }
    // An fp32 cache: the append itself. (Any float tensor would do for the
    // op, but the rule is for caches; other attentions keep `attention`.)
    let appended = eg[x].nodes.iter().any(|n| n.op == Op::Concat { axis: 1 });
    (appended && eg[x].data.ty.dtype == dtype).then_some((None, x))
}

fn search(eg: &EG, id: Id) -> Vec<Recipe> {
    let mut out = Vec::new();
    for n in &eg[id].nodes {
        let Op::Attention { causal, scale } = n.op else {
            continue;
        };
        let (q, k, v) = (n.children[0], n.children[1], n.children[2]);
        let dtype = eg[q].data.ty.dtype;
        let Some(values) = cache_view(eg, v, dtype) else {
            continue;
        };
        let mut key_forms: Vec<Vec<(KvPart, Id, usize)>> = Vec::new();
        if let Some(one) = cache_view(eg, k, dtype) {
            key_forms.push(vec![one]);
        }
        for kn in &eg[k].nodes {
            if kn.op != (Op::Concat { axis: 4 }) {
                continue;
            }
            let parts: Option<Vec<_>> = kn
                .children
                .iter()
                .map(|&c| cache_view(eg, c, dtype))
                .collect();
            if let Some(parts) = parts {
                key_forms.push(parts);
            }
        }
        for keys in key_forms {
            let heads = values.2;
            if keys.iter().any(|p| p.2 != heads) {
                continue;
            }
            let mut r = Recipe::new();
            let mut args = vec![Ref::Class(q)];
            args.extend(keys.iter().map(|p| Ref::Class(p.1)));
            args.push(Ref::Class(values.1));
            let mut parts: Vec<KvPart> = keys.iter().map(|p| p.0).collect();
            parts.push(values.0);
            let y = r.node(
                Op::KvAttention {
                    causal,
                    scale,
                    heads,
                    parts,
                },
                &args,
            );
            let mut r = r.result(y);
            r.inherit.push(id);
            out.push(r);
            break;
        }
    }
    out
}
