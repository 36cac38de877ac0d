//! `recompute-layers`: activation checkpointing, a layer at a time. A
//! training step keeps every activation its backward reads alive from the
//! forward to the backward: with the loss's logits gone (`linear_ce`) and
//! weight gradients run as soon as they can (`caramba_ir::schedule`), a
//! step's peak is the start of the backward, where every layer's saved
//! activations are alive at once. This pass trades compute for that memory
//! as PyTorch's `checkpoint` around a transformer block does: a layer keeps
//! only its input (the previous layer's output) from the forward, and its
//! backward reads copies of its activations, recomputed from that input
//! when the backward reaches the layer.
//!
//! ```text
//! y = f(x);  … g(y, dy) …          →   y = f(x);  … g(f(after(x, a)), dy) …
//! ```
//!
//! for `f` the layer's forward nodes, `g` its backward readers, and `a` the
//! anchor: a backward value that every one of those readers depends on
//! (the gradient arriving at the layer). `after(x, a)` is `x` (`Op::After`),
//! read once `a` is computed, so that no order runs the copies in the
//! forward.
//!
//! Proof: `after(x, a) = x`, and a copy of a node over equal operands is
//! equal to it: every op is a function of its operands (`dropout` is the
//! identity today; a training-mode dropout must draw its mask from an
//! operand, a key, for this to hold). So each reader sees the same values,
//! and the graph's outputs are unchanged.
//!
//! Which nodes: a layer is a block of a nested topology, the scope
//! `….layers.N` (`lower`'s names, as Hugging Face's). Its saved values are
//! its forward nodes read by the backward, other than those read by the
//! forward outside the layer (its output, the next layer's input: the
//! checkpoint, kept). The copies are those values and what they are
//! computed from inside the layer; weights (parameters and what is
//! computed from them alone), inputs and constants are shared, not copied.
//! A layer whose readers have no common backward ancestor is left alone.
//!
//! A graph pass on the optimized training graph, not an e-graph rule: the
//! e-graph would merge each copy with its original (they are the same
//! expression but for `after`, which the rules do not see through), and
//! which values the backward reads is known only once the graph is chosen.

use caramba_ir::{Graph, IrError, NodeId, Op};
use std::collections::{HashMap, HashSet};

/// The pass's name, as reports and docs give it.
pub const NAME: &str = "recompute-layers";

/// The layer of a scope: its prefix through `layers.N`, the outermost
/// block of a nested topology (`model.layers.3.mlp/grad` →
/// `model.layers.3`).
pub fn layer_of(scope: &str) -> Option<&str> {
    let start = if scope.starts_with("layers.") {
        0
    } else {
        scope.find(".layers.")? + 1
    };
    let digits = start + "layers.".len();
    let n = scope[digits..]
        .bytes()
        .take_while(u8::is_ascii_digit)
        .count();
    if n == 0 {
        return None;
    }
    let end = digits + n;
    match scope.as_bytes().get(end) {
        None | Some(b'.') | Some(b'/') => Some(&scope[..end]),
        _ => None,
    }
}

/// `g` (a training graph whose forward computes output `loss`) with each
/// layer's activations recomputed for its backward, and how many layers
/// were.
pub fn recompute_layers(g: &Graph, loss: &str) -> Result<(Graph, usize), IrError> {
    let Some(loss) = g.output(loss) else {
        return Ok((g.clone(), 0));
    };
    let order = g.topo_order();
    let position: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let forward = ancestors(g, [loss], |_| true);
    let weights = g.weight_only(&order);
    let outputs: HashSet<NodeId> = g.outputs().iter().map(|(_, id)| *id).collect();
    let backward = |n: NodeId| !forward.contains(&n);
    // What may anchor a layer: backward values that wait for something
    // (sources and weights' values are ready from the start).
    let anchorable = |n: NodeId| backward(n) && !g.node(n).op.is_source() && !weights.contains(&n);
    // An activation: a forward value that is neither a source nor a
    // weight's.
    let activation =
        |n: NodeId| forward.contains(&n) && !g.node(n).op.is_source() && !weights.contains(&n);
    // Each layer's saved values, in order.
    let mut saved: HashMap<&str, Vec<NodeId>> = HashMap::new();
    let mut layers: Vec<&str> = Vec::new();
    for &n in &order {
        if !activation(n) || outputs.contains(&n) {
            continue;
        }
        let Some(layer) = layer_of(&g.node(n).scope) else {
            continue;
        };
        let users = g.users(n);
        let leaves = users
            .iter()
            .any(|&u| !backward(u) && layer_of(&g.node(u).scope) != Some(layer));
        if leaves || !users.iter().any(|&u| backward(u)) {
            continue;
        }
        if !saved.contains_key(layer) {
            layers.push(layer);
        }
        saved.entry(layer).or_default().push(n);
    }
    // Per layer: its anchor, and the nodes copied.
    let mut plans: Vec<Layer> = Vec::new();
    for layer in layers {
        let values = &saved[layer];
        let inside = |n: NodeId| layer_of(&g.node(n).scope) == Some(layer);
        // The forward after the layer: what its output flows into.
        let starts = order
            .iter()
            .copied()
            .filter(|&n| activation(n) && inside(n));
        let after_layer = descendants(g, starts, |u| forward.contains(&u) && !inside(u));
        // Late: backward values computed from the forward after the layer
        // (the gradient reaching it and what follows from it), as opposed
        // to backward values of the layer's own activations alone (a
        // transposed activation for a weight's gradient), which an order
        // may compute in the forward.
        let late = descendants(g, after_layer, anchorable);
        // The readers of the saved values: late ones read the copies; the
        // others are copied too, and their readers looked at in turn.
        let mut readers = HashSet::new();
        let mut along = HashSet::new();
        let mut stack: Vec<NodeId> = values
            .iter()
            .flat_map(|&v| g.users(v))
            .filter(|&u| backward(u))
            .collect();
        while let Some(r) = stack.pop() {
            if readers.contains(&r) || along.contains(&r) {
                continue;
            }
            if late.contains(&r) {
                readers.insert(r);
            } else {
                along.insert(r);
                stack.extend(g.users(r).into_iter().filter(|&u| backward(u)));
            }
        }
        // Their latest common late ancestor.
        let is_late = |o: NodeId| late.contains(&o);
        let mut common: Option<HashSet<NodeId>> = None;
        for &r in &readers {
            let a = ancestors(
                g,
                g.operands(r).into_iter().filter(|&o| is_late(o)),
                is_late,
            );
            common = Some(match common {
                None => a,
                Some(c) => c.intersection(&a).copied().collect(),
            });
        }
        // (The last in topological order: no other one is below it.)
        let Some(anchor) = common.and_then(|c| c.into_iter().max_by_key(|a| position[a])) else {
            continue;
        };
        // What the saved values are computed from inside the layer, and
        // the backward nodes copied along.
        let mut region = along;
        region.extend(ancestors(g, values.iter().copied(), |o| {
            activation(o) && inside(o)
        }));
        // Copied: the region's nodes that read an activation from outside
        // it (then anchored) or a copied node.
        let mut copied = HashSet::new();
        let mut anchored = HashSet::new();
        for &n in &order {
            if !region.contains(&n) {
                continue;
            }
            let outside: Vec<NodeId> = g
                .operands(n)
                .into_iter()
                .filter(|o| activation(*o) && !region.contains(o))
                .collect();
            if !outside.is_empty() || g.operands(n).iter().any(|o| copied.contains(o)) {
                copied.insert(n);
                anchored.extend(outside);
            }
        }
        if copied.is_empty() {
            continue;
        }
        plans.push(Layer {
            anchor,
            copied,
            anchored,
            readers,
        });
    }
    if plans.is_empty() {
        return Ok((g.clone(), 0));
    }
    let count = plans.len();
    let mut copies: Vec<HashMap<NodeId, NodeId>> = vec![HashMap::new(); plans.len()];
    // A backward node may read the copies of more than one layer.
    let mut reader_of: HashMap<NodeId, Vec<usize>> = HashMap::new();
    for (i, p) in plans.iter().enumerate() {
        for &r in &p.readers {
            reader_of.entry(r).or_default().push(i);
        }
    }
    let (h, _) = g.rebuilt(&HashSet::new(), |out, id, map| {
        let Some(layers) = reader_of.get(&id) else {
            return Ok(None);
        };
        let mut xs = Vec::new();
        for o in g.operands(id) {
            let x = match layers.iter().find(|&&i| plans[i].copied.contains(&o)) {
                Some(&i) => copy(g, out, &plans[i], &mut copies[i], map, o)?,
                None => map[&o],
            };
            xs.push(x);
        }
        out.add_copy(g.node(id), &xs).map(Some)
    })?;
    Ok((h, count))
}

/// One layer's recomputation.
struct Layer {
    /// The backward value its copies wait for.
    anchor: NodeId,
    /// The nodes copied.
    copied: HashSet<NodeId>,
    /// The activations from outside the layer they read, through `after`.
    anchored: HashSet<NodeId>,
    /// The backward nodes that read the copies.
    readers: HashSet<NodeId>,
}

/// The copy of `n`, a copied node of the layer, that its backward readers
/// read (made on first use, its operands first). Activations from outside
/// the layer are read through `after`.
fn copy(
    g: &Graph,
    out: &mut Graph,
    layer: &Layer,
    copies: &mut HashMap<NodeId, NodeId>,
    map: &HashMap<NodeId, NodeId>,
    n: NodeId,
) -> Result<NodeId, IrError> {
    if let Some(&c) = copies.get(&n) {
        return Ok(c);
    }
    let mut xs = Vec::new();
    for o in g.operands(n) {
        let x = if layer.copied.contains(&o) {
            copy(g, out, layer, copies, map, o)?
        } else if layer.anchored.contains(&o) {
            match copies.get(&o) {
                Some(&a) => a,
                None => {
                    let scope = format!("{}/recompute", g.node(n).scope);
                    let a = out.add(Op::After, &[map[&o], map[&layer.anchor]], &scope)?;
                    copies.insert(o, a);
                    a
                }
            }
        } else {
            map[&o]
        };
        xs.push(x);
    }
    let node = g.node(n);
    let mut copy = node.clone();
    copy.scope = format!("{}/recompute", node.scope);
    let c = out.add_copy(&copy, &xs)?;
    copies.insert(n, c);
    Ok(c)
}

/// `roots` and the nodes they are computed from that `keep` accepts,
/// reached through accepted nodes only.
fn ancestors(
    g: &Graph,
    roots: impl IntoIterator<Item = NodeId>,
    keep: impl Fn(NodeId) -> bool,
) -> HashSet<NodeId> {
    let mut seen = HashSet::new();
    let mut stack: Vec<NodeId> = roots.into_iter().collect();
    while let Some(n) = stack.pop() {
        if seen.insert(n) {
            stack.extend(g.operands(n).into_iter().filter(|&o| keep(o)));
        }
    }
    seen
}

/// The nodes computed from `starts` that `keep` accepts, reached through
/// accepted nodes only (not `starts` themselves, unless reached so).
fn descendants(
    g: &Graph,
    starts: impl IntoIterator<Item = NodeId>,
    keep: impl Fn(NodeId) -> bool,
) -> HashSet<NodeId> {
    let mut seen = HashSet::new();
    let mut stack: Vec<NodeId> = starts.into_iter().collect();
    while let Some(n) = stack.pop() {
        for u in g.users(n) {
            if keep(u) && seen.insert(u) {
                stack.push(u);
            }
        }
    }
    seen
}
