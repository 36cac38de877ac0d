//! `fold-weights`: values computed from the weights alone, computed once
//! when a model is loaded and bound as parameters of their own.
//!
//! ```text
//! w = concat(permute(q_w), permute(k_w), permute(v_w))     (merged projections)
//! y = rms_norm_matmul(x, n, w)
//!   ⇒  y = rms_norm_matmul(x, n, W)      W = param "….folded", its value w
//! ```
//!
//! Only for weights nobody updates (inference: `sample`, `perplexity`).
//! A value is folded where everything it is made from is read inside it
//! alone, so the originals are dropped and the model holds each weight
//! once. Views (transposes, reshapes) are not folded: a transpose a product
//! reads in place stays a view of the folded value, and a view of a
//! parameter (the LM head's transpose of a tied embedding, which the
//! gather reads as it is) stays a view rather than becoming a second copy.
//! The values are computed by the reference interpreter, so they are
//! exactly what the graph computed.
//!
//! Proof: the folded graph reads the same values where the original
//! computed them, and nothing else changes.

use caramba_ir::reference::{eval, Bindings, EvalError, Tensor};
use caramba_ir::{Graph, IrError, NodeId, Op};
use std::collections::{BTreeMap, HashMap, HashSet};

/// A graph with its weight-only values folded, and its parameters: those
/// still read, and the folded values under their new names.
pub struct Folded {
    pub graph: Graph,
    pub params: BTreeMap<String, Tensor>,
    /// The new parameters' names, in the graph's order.
    pub folded: Vec<String>,
}

/// Why folding failed: a parameter the graph reads is missing or does not
/// evaluate (a caller's error, reported as the interpreter's), or the
/// rebuilt graph does not type (a bug).
#[derive(Debug, thiserror::Error)]
pub enum FoldError {
    #[error("computing the values made from the weights alone: {0}")]
    Eval(#[from] EvalError),
    #[error("internal error: the folded graph does not type: {0}")]
    Build(#[from] IrError),
}

/// Folds `g`'s values made from its parameters (and constants) alone, with
/// the parameters' values `params`.
pub fn fold_weights(g: &Graph, params: &BTreeMap<String, Tensor>) -> Result<Folded, FoldError> {
    let order = g.topo_order();
    let only = g.weight_only(&order);
    let outputs: HashSet<NodeId> = g.outputs().iter().map(|(_, id)| *id).collect();
    let read_elsewhere =
        |id: NodeId| outputs.contains(&id) || g.users(id).iter().any(|u| !only.contains(u));
    // The weight-only values something else reads, each taken down
    // through the views over it (a transpose a product reads in place
    // stays a view, of the folded value), to a computed value: not to a
    // parameter, which is its own value already.
    let mut fold: Vec<NodeId> = Vec::new();
    for &id in &order {
        if !(only.contains(&id) && read_elsewhere(id)) {
            continue;
        }
        let mut at = id;
        while matches!(g.node(at).op, Op::Permute(_) | Op::Reshape(_)) {
            at = g.operands(at)[0];
        }
        if g.node(at).op.is_source() || fold.contains(&at) {
            continue;
        }
        // Everything it is made from (constants aside) is read inside it
        // alone, so the originals drop out and each weight is held once
        // (two values made from one weight would hold it twice).
        let cone = cone(g, at);
        let alone = cone.iter().all(|&n| {
            n == at
                || matches!(g.node(n).op, Op::Constant(_))
                || g.users(n).iter().all(|u| cone.contains(u))
        });
        if alone {
            fold.push(at);
        }
    }
    if fold.is_empty() {
        return Ok(Folded {
            graph: g.clone(),
            params: params.clone(),
            folded: Vec::new(),
        });
    }
    let mut sub = g.clone();
    for (name, _) in g.outputs().to_vec() {
        sub.remove_output(&name);
    }
    for (i, &id) in fold.iter().enumerate() {
        sub.set_output(&format!("fold{i}"), id);
    }
    let mut values = eval(&sub, &Bindings::new(params))?;
    let taken: HashSet<&str> = g.params().map(|(n, _)| n).collect();
    let mut names: HashMap<NodeId, String> = HashMap::new();
    let mut used: HashSet<String> = HashSet::new();
    for &id in &fold {
        let scope = &g.node(id).scope;
        let base = if scope.is_empty() {
            "folded".to_string()
        } else {
            format!("{scope}.folded")
        };
        let name = (0..)
            .map(|k| {
                if k == 0 {
                    base.clone()
                } else {
                    format!("{base}.{k}")
                }
            })
            .find(|n| !taken.contains(n.as_str()) && !used.contains(n))
            .expect("a free name");
        used.insert(name.clone());
        names.insert(id, name);
    }
    // Rebuild from the outputs: what only the folded values read drops out.
    let mut out = Graph::new(g.name.clone());
    let mut map: HashMap<NodeId, NodeId> = HashMap::new();
    let mut new_params = BTreeMap::new();
    let mut stack: Vec<(NodeId, bool)> = g
        .outputs()
        .iter()
        .rev()
        .map(|(_, id)| (*id, false))
        .collect();
    while let Some((id, expanded)) = stack.pop() {
        if map.contains_key(&id) {
            continue;
        }
        let n = g.node(id);
        if let Some(name) = names.get(&id) {
            let i = fold.iter().position(|&f| f == id).expect("folded");
            let v = values.remove(&format!("fold{i}")).expect("evaluated");
            map.insert(id, out.param(name, n.ty.clone(), &n.scope)?);
            new_params.insert(name.clone(), v);
            continue;
        }
        if !expanded && !g.operands(id).is_empty() {
            stack.push((id, true));
            for &o in g.operands(id).iter().rev() {
                stack.push((o, false));
            }
            continue;
        }
        if let Op::Param { name } = &n.op {
            if let Some(t) = params.get(name) {
                new_params.insert(name.clone(), t.clone());
            }
        }
        let xs: Vec<NodeId> = g.operands(id).iter().map(|o| map[o]).collect();
        map.insert(id, out.add_copy(n, &xs)?);
    }
    for (name, id) in g.outputs() {
        out.set_output(name, map[id]);
    }
    let folded = fold.iter().map(|id| names[id].clone()).collect();
    Ok(Folded {
        graph: out,
        params: new_params,
        folded,
    })
}

/// `id` and every node it is computed from.
fn cone(g: &Graph, id: NodeId) -> HashSet<NodeId> {
    let mut seen = HashSet::new();
    let mut stack = vec![id];
    while let Some(n) = stack.pop() {
        if seen.insert(n) {
            stack.extend(g.operands(n));
        }
    }
    seen
}
