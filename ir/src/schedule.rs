//! The order a device runs a graph in: topological, and among the nodes
//! ready at each step, the one that leaves the least memory alive.
//!
//! Any topological order computes the same values; they differ in how many
//! are alive at once. A graph's node ids follow its construction, and an
//! optimized training graph is constructed by extraction output by output:
//! the loss, then `grad:model.embed_tokens.weight`, whose chain runs through
//! every layer's input gradient, then each layer's weight gradients. In id
//! order (`Graph::topo_order`) every weight gradient therefore ran after the
//! whole backward, and each layer's activations and output gradient stayed
//! alive until then: the step's peak was the end of the backward.
//!
//! Here each step takes the ready node with the largest `freed − written`:
//! `written` the bytes of its value, `freed` the bytes of the values it is
//! the last reader of. A weight gradient whose layer's input gradient has
//! been computed frees that layer's activations and output gradient, so it
//! runs at once. Ties go to the smaller id (construction order), so a
//! chain with nothing to choose runs as before.
//!
//! Views are aliases, not values: a `reshape`, `permute`, `slice`,
//! `broadcast` or `after` writes nothing here (a device reads most of them
//! in place), and a value is freed by the last reader of any of its views
//! (`after`'s anchor is read, not aliased). Sources
//! (inputs, parameters, constants) come first and are never freed. Sizes
//! take symbolic dims at nominal values (`B` 8, `T`, `S` and `P` 2048):
//! what matters is the comparison of sizes, not the bytes.

use crate::{Dim, Graph, NodeId, Op, Sym};
use std::collections::{HashMap, HashSet};

/// The nodes the outputs depend on, in an order that keeps little alive.
pub fn memory_order(graph: &Graph) -> Vec<NodeId> {
    let mut live = HashSet::new();
    let mut stack: Vec<NodeId> = graph.outputs().iter().map(|(_, id)| *id).collect();
    while let Some(n) = stack.pop() {
        if live.insert(n) {
            stack.extend(graph.operands(n));
        }
    }
    let mut ids: Vec<NodeId> = live.iter().copied().collect();
    ids.sort();
    let outputs: HashSet<NodeId> = graph.outputs().iter().map(|(_, id)| *id).collect();
    let is_view = |n: NodeId| is_view(graph, n);
    let operands: HashMap<NodeId, Vec<NodeId>> =
        ids.iter().map(|&n| (n, graph.operands(n))).collect();
    let topo: Vec<NodeId> = graph
        .topo_order()
        .into_iter()
        .filter(|n| live.contains(n))
        .collect();
    let (root, mut readers) = values(graph, &topo);
    let bytes = |n: NodeId| nominal_bytes(graph, n);
    let freeable = |r: NodeId| !graph.node(r).op.is_source() && !outputs.contains(&r);
    let mut waiting: HashMap<NodeId, usize> = ids
        .iter()
        .map(|&n| {
            let mut os = operands[&n].clone();
            os.sort();
            os.dedup();
            (n, os.len())
        })
        .collect();
    let mut users: HashMap<NodeId, Vec<NodeId>> = HashMap::new();
    for &n in &ids {
        let mut os = operands[&n].clone();
        os.sort();
        os.dedup();
        for o in os {
            users.entry(o).or_default().push(n);
        }
    }
    let mut order = Vec::with_capacity(ids.len());
    let mut ready: Vec<NodeId> = Vec::new();
    let starts: Vec<NodeId> = ids.iter().copied().filter(|n| waiting[n] == 0).collect();
    let mut done = |n: NodeId, ready: &mut Vec<NodeId>, order: &mut Vec<NodeId>| {
        order.push(n);
        for &u in users.get(&n).map(Vec::as_slice).unwrap_or(&[]) {
            let w = waiting.get_mut(&u).expect("a live user");
            *w -= 1;
            if *w == 0 {
                ready.push(u);
            }
        }
    };
    for n in starts {
        {
            if graph.node(n).op.is_source() {
                done(n, &mut ready, &mut order);
            } else {
                ready.push(n);
            }
        }
    }
    while !ready.is_empty() {
        let score = |n: NodeId| -> f64 {
            if is_view(n) {
                return f64::INFINITY;
            }
            let mut reads: HashMap<NodeId, usize> = HashMap::new();
            for o in &operands[&n] {
                *reads.entry(root[o]).or_default() += 1;
            }
            let freed: f64 = reads
                .iter()
                .filter(|&(&r, &k)| freeable(r) && readers[&r] == k)
                .map(|(&r, _)| bytes(r))
                .sum();
            freed - bytes(n)
        };
        let (i, _) = ready
            .iter()
            .enumerate()
            .map(|(i, &n)| (i, (score(n), std::cmp::Reverse(n))))
            .max_by(|a, b| a.1 .0.total_cmp(&b.1 .0).then(a.1 .1.cmp(&b.1 .1)))
            .expect("a ready node");
        let n = ready.swap_remove(i);
        for o in reads(graph, n) {
            *readers.get_mut(&root[&o]).expect("counted") -= 1;
        }
        done(n, &mut ready, &mut order);
    }
    debug_assert_eq!(order.len(), ids.len(), "the live graph is acyclic");
    order
}

/// Whether `n` is a view of its first operand here (it writes nothing).
fn is_view(graph: &Graph, n: NodeId) -> bool {
    matches!(
        graph.node(n).op,
        Op::Reshape(_) | Op::Permute(_) | Op::Slice { .. } | Op::Broadcast(_) | Op::After
    )
}

/// The operands `n` reads as values (each one read of its value): none for
/// a view, but `after`'s anchor, which keeps the anchor's value alive until
/// then as any read does (its first operand is the view's source).
fn reads(graph: &Graph, n: NodeId) -> Vec<NodeId> {
    match graph.node(n).op {
        Op::After => graph.operands(n)[1..].to_vec(),
        _ if is_view(graph, n) => Vec::new(),
        _ => graph.operands(n),
    }
}

/// `n`'s value in bytes, symbolic dims at their nominal sizes.
fn nominal_bytes(graph: &Graph, n: NodeId) -> f64 {
    let ty = &graph.node(n).ty;
    let numel: f64 = ty
        .shape
        .dims()
        .iter()
        .map(|d| match *d {
            Dim::Const(c) => c as f64,
            Dim::Sym(Sym::B) => NOMINAL_B,
            Dim::Sym(_) => NOMINAL_T,
        })
        .product();
    numel * ty.dtype.size() as f64
}

/// Nominal sizes of the symbolic dims: a batch, a sequence (and context).
const NOMINAL_B: f64 = 8.0;
const NOMINAL_T: f64 = 2048.0;

/// Over the nodes of `order` (topological): the value each node's result
/// lives in (its own, or through views its source's), and how many reads
/// of each value there are (edges from nodes that are not views, to the
/// value or any of its views).
fn values(graph: &Graph, order: &[NodeId]) -> (HashMap<NodeId, NodeId>, HashMap<NodeId, usize>) {
    let mut root: HashMap<NodeId, NodeId> = HashMap::new();
    for &n in order {
        let r = if is_view(graph, n) {
            root[&graph.operands(n)[0]]
        } else {
            n
        };
        root.insert(n, r);
    }
    let mut readers: HashMap<NodeId, usize> = HashMap::new();
    for &n in order {
        for o in reads(graph, n) {
            *readers.entry(root[&o]).or_default() += 1;
        }
    }
    (root, readers)
}

/// The most bytes alive at once when `order` (every live node, in a
/// topological order) runs, as [`memory_order`] models them: each value
/// written by its node and freed after its last reader; views, sources and
/// outputs as there. For comparing orders, not a device's measure.
pub fn modelled_peak(graph: &Graph, order: &[NodeId]) -> f64 {
    let (root, mut readers) = values(graph, order);
    let outputs: HashSet<NodeId> = graph.outputs().iter().map(|(_, id)| *id).collect();
    let (mut live, mut peak) = (0.0f64, 0.0f64);
    for &n in order {
        if graph.node(n).op.is_source() {
            continue;
        }
        if !is_view(graph, n) {
            live += nominal_bytes(graph, n);
            peak = peak.max(live);
        }
        let mut os = reads(graph, n);
        os.sort();
        for o in os {
            let r = root[&o];
            let left = readers.get_mut(&r).expect("counted");
            *left -= 1;
            if *left == 0 && !graph.node(r).op.is_source() && !outputs.contains(&r) {
                live -= nominal_bytes(graph, r);
            }
        }
    }
    peak
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DType, Shape, TensorType};

    fn ty(dims: &[usize]) -> TensorType {
        TensorType::new(
            DType::F32,
            Shape(dims.iter().map(|&d| Dim::Const(d)).collect()),
        )
    }

    fn is_topological(g: &Graph, order: &[NodeId]) -> bool {
        let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
        order
            .iter()
            .all(|&n| g.operands(n).iter().all(|o| pos[o] < pos[&n]))
    }

    /// Two "layers" whose weight gradients were built after the whole
    /// input-gradient chain (as extraction builds a training graph): in id
    /// order both layers' big values stay alive to the end; the memory
    /// order runs each weight gradient as soon as it frees them.
    #[test]
    fn a_weight_gradient_runs_when_it_frees_its_layer() {
        let mut g = Graph::new("t");
        let x0 = g.input("x", ty(&[512, 64])).unwrap();
        let w0 = g.param("w0", ty(&[64, 64]), "l0").unwrap();
        let w1 = g.param("w1", ty(&[64, 64]), "l1").unwrap();
        let x1 = g.add(Op::MatMul, &[x0, w0], "l0").unwrap();
        let y = g.add(Op::MatMul, &[x1, w1], "l1").unwrap();
        // The input-gradient chain (dy = y for the test), built first.
        let w1t = g.add(Op::Permute(vec![1, 0]), &[w1], "l1").unwrap();
        let dx1 = g.add(Op::MatMul, &[y, w1t], "l1/grad").unwrap();
        let w0t = g.add(Op::Permute(vec![1, 0]), &[w0], "l0").unwrap();
        let dx0 = g.add(Op::MatMul, &[dx1, w0t], "l0/grad").unwrap();
        // Then the weight gradients.
        let x1t = g.add(Op::Permute(vec![1, 0]), &[x1], "l1/grad").unwrap();
        let dw1 = g.add(Op::MatMul, &[x1t, y], "l1/grad").unwrap();
        let x0t = g.add(Op::Permute(vec![1, 0]), &[x0], "l0/grad").unwrap();
        let dw0 = g.add(Op::MatMul, &[x0t, dx1], "l0/grad").unwrap();
        g.set_output("dx", dx0);
        g.set_output("dw0", dw0);
        g.set_output("dw1", dw1);
        let by_id = g.topo_order();
        let order = memory_order(&g);
        assert!(is_topological(&g, &order));
        assert_eq!(order.len(), by_id.len());
        let at = |o: &[NodeId], n: NodeId| o.iter().position(|&m| m == n).unwrap();
        // By id: dw1 after dx0. Here: dw1 before dx0 (it frees y and x1,
        // read by nothing after it once dx1 exists).
        assert!(at(&by_id, dw1) > at(&by_id, dx0));
        assert!(at(&order, dw1) < at(&order, dx0));
        assert!(modelled_peak(&g, &order) < modelled_peak(&g, &by_id));
    }

    /// A recomputed activation (`exp(after(x, a))`) runs after its anchor
    /// `a`, a late value, though its input is ready from the start; `after`
    /// writes nothing, and the anchor stays alive until `after` reads it.
    #[test]
    fn a_copy_behind_after_waits_for_its_anchor() {
        let mut g = Graph::new("t");
        let x = g.input("x", ty(&[512, 64])).unwrap();
        let w = g.param("w", ty(&[64, 64]), "l").unwrap();
        let y = g.add(Op::MatMul, &[x, w], "l").unwrap();
        let z = g.add(Op::MatMul, &[y, w], "l").unwrap();
        // The late value: the "gradient" reaching the layer.
        let a = g.add(Op::MatMul, &[z, w], "l/grad").unwrap();
        let later = g.add(Op::After, &[x, a], "l/recompute").unwrap();
        let copy = g
            .add(Op::Unary(crate::UnaryOp::Exp), &[later], "l/recompute")
            .unwrap();
        let out = g
            .add(Op::Binary(crate::BinaryOp::Mul), &[copy, a], "l/grad")
            .unwrap();
        g.set_output("out", out);
        let order = memory_order(&g);
        assert!(is_topological(&g, &order));
        let at = |n: NodeId| order.iter().position(|&m| m == n).unwrap();
        assert!(at(copy) > at(a));
        // At most three values of 128 KiB at once (`a`, the copy and their
        // product); `after` itself is never counted.
        let each = (512 * 64 * 4) as f64;
        assert_eq!(modelled_peak(&g, &order), 3.0 * each);
    }
}
