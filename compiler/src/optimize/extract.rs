//! Extraction that counts a shared value once: the cheapest node of each
//! e-class, where a node costs its own kernel plus the kernels of every
//! class it needs, each class counted once however many paths reach it.
//!
//! egg's `Extractor` sums its operands' costs as trees. A residual stream
//! read by both branches of a block counts twice per block, so by block 11
//! of a 16-layer model a class costs 1e23–1e28, where f64's spacing is
//! larger than what a rule saves by a constant amount (a launch, a pass
//! over `[T, d]`): the two choices compare equal, and the rule is lost in
//! the deep half of the model. Counted as a DAG, a class costs at most the
//! whole graph's cost (about 1e11 for a 1B model at the nominal sizes of
//! `cost.rs`), where a launch is still visible.
//!
//! The algorithm is the greedy DAG extraction of egg-extraction-gym's
//! `greedy-dag`, with sets of classes as bitsets:
//!
//! ```text
//! queue every class (in creation order: operands mostly first)
//! while a class c is queued, take it:
//!     for each node n of c whose operands all have a choice:
//!         needs(n) = {c} ∪ ⋃ set(operand)       (n is skipped if c ∈ ⋃ set(operand))
//!         cost(n)  = own(n) + Σ_{d ∈ needs(n), d ≠ c} own(best(d))
//!     best(c), set(c) = the cheapest n (the current choice kept on ties), needs(n)
//!     if either changed, queue the classes with a node that reads c
//! ```
//!
//! At the fixpoint every set is its class's chosen sub-DAG
//! (`set(c) = {c} ∪ ⋃ set(operands of best(c))`), so a chosen cycle through
//! `c` would put `c` in an operand's set, which the skip forbids: the
//! choice is acyclic. Without a fixpoint within [`MAX_VISITS_PER_CLASS`] the caller
//! falls back to tree extraction, which is acyclic by its positive costs.
//!
//! Classes are visited by rank (the fewest steps from a source), so
//! operands settle before their users: the presets settle in 1.0–1.1
//! visits a class. A set costs one bit per class: the 16-layer 1B preset
//! has 1.4 k classes (180 bytes a set) and extracts in 2 ms, where tree
//! extraction took 45–70 ms (release, this project's 2-core machine).

use super::cost;
use super::lang::{ENode, EG};
use egg::Id;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

/// Visits a class (on average) after which extraction gives up without a
/// fixpoint. The presets settle in 1.0–1.1.
pub const MAX_VISITS_PER_CLASS: usize = 32;

/// The chosen node of every class that has one, and how many class visits
/// it took.
pub struct Choice {
    pub best: HashMap<Id, ENode>,
    pub visits: usize,
}

/// One candidate node: its own cost and its operand classes (dense
/// indices, deduplicated).
struct Cand {
    node: ENode,
    own: f64,
    operands: Vec<usize>,
}

/// The DAG-cost choice of `eg`, or `None` when it did not settle within
/// [`MAX_VISITS_PER_CLASS`] visits a class.
pub fn dag(eg: &EG) -> Option<Choice> {
    let mut ids: Vec<Id> = eg.classes().map(|c| c.id).collect();
    ids.sort();
    let index: HashMap<Id, usize> = ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let n = ids.len();
    let words = n.div_ceil(64);
    let mut cands: Vec<Cand> = Vec::new();
    let mut of_class: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (ci, &id) in ids.iter().enumerate() {
        for node in &eg[id].nodes {
            let own = cost::enode_cost(eg, node);
            if !own.is_finite() {
                continue;
            }
            let mut operands: Vec<usize> = node
                .children
                .iter()
                .map(|&ch| index[&eg.find(ch)])
                .collect();
            operands.sort_unstable();
            operands.dedup();
            of_class[ci].push(cands.len());
            cands.push(Cand {
                node: node.clone(),
                own,
                operands,
            });
        }
    }
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (c, ks) in of_class.iter().enumerate() {
        for &k in ks {
            for &o in &cands[k].operands {
                users[o].push(c);
            }
        }
    }
    users.iter_mut().for_each(|u| u.dedup());
    let mut best: Vec<Option<usize>> = vec![None; n];
    let mut own_best = vec![0.0f64; n];
    let mut sets: Vec<Vec<u64>> = vec![Vec::new(); n];
    let mut scratch = vec![0u64; words];
    let mut pick_set = vec![0u64; words];
    let rank = ranks(&cands, &of_class, &users);
    let mut queue: BinaryHeap<Reverse<(usize, usize)>> =
        (0..n).map(|c| Reverse((rank[c], c))).collect();
    let mut queued = vec![true; n];
    let mut visits = 0;
    while let Some(Reverse((_, c))) = queue.pop() {
        queued[c] = false;
        visits += 1;
        if visits > MAX_VISITS_PER_CLASS * n {
            return None;
        }
        // The current choice first, so that it wins ties.
        let order = best[c]
            .into_iter()
            .chain(of_class[c].iter().copied().filter(|&k| Some(k) != best[c]));
        let mut pick: Option<(usize, f64)> = None;
        for k in order {
            let cand = &cands[k];
            if cand.operands.iter().any(|&o| best[o].is_none()) {
                continue;
            }
            scratch.iter_mut().for_each(|w| *w = 0);
            for &o in &cand.operands {
                for (w, s) in scratch.iter_mut().zip(&sets[o]) {
                    *w |= s;
                }
            }
            if scratch[c / 64] >> (c % 64) & 1 == 1 {
                continue; // a cycle through c
            }
            let mut total = cand.own;
            for (wi, &w) in scratch.iter().enumerate() {
                let mut bits = w;
                while bits != 0 {
                    total += own_best[wi * 64 + bits.trailing_zeros() as usize];
                    bits &= bits - 1;
                }
            }
            if pick.is_none_or(|(_, p)| total < p) {
                pick = Some((k, total));
                scratch[c / 64] |= 1 << (c % 64);
                pick_set.copy_from_slice(&scratch);
            }
        }
        let Some((k, _)) = pick else { continue };
        if best[c] != Some(k) || sets[c] != pick_set {
            best[c] = Some(k);
            own_best[c] = cands[k].own;
            sets[c].clone_from(&pick_set);
            for &u in &users[c] {
                if !queued[u] {
                    queued[u] = true;
                    queue.push(Reverse((rank[u], u)));
                }
            }
        }
    }
    let best = best
        .iter()
        .enumerate()
        .filter_map(|(c, k)| k.map(|k| (ids[c], cands[k].node.clone())))
        .collect();
    Some(Choice { best, visits })
}

/// Each class's rank: the fewest steps from the sources to a node of it
/// (`rank(c) = min over nodes n of c of 1 + max rank(operand of n)`, sources
/// 0; `usize::MAX` where no node can be built). Visiting classes by rank
/// settles a class's operands before it, so a deep model is not revisited
/// once per layer.
fn ranks(cands: &[Cand], of_class: &[Vec<usize>], users: &[Vec<usize>]) -> Vec<usize> {
    let n = of_class.len();
    let mut rank = vec![usize::MAX; n];
    let mut waiting: Vec<usize> = cands.iter().map(|c| c.operands.len()).collect();
    let mut heap: BinaryHeap<Reverse<(usize, usize)>> = BinaryHeap::new();
    for (c, ks) in of_class.iter().enumerate() {
        if ks.iter().any(|&k| waiting[k] == 0) {
            heap.push(Reverse((0, c)));
        }
    }
    while let Some(Reverse((r, c))) = heap.pop() {
        if rank[c] != usize::MAX {
            continue;
        }
        rank[c] = r;
        for &u in &users[c] {
            for &k in &of_class[u] {
                if cands[k].operands.binary_search(&c).is_ok() {
                    waiting[k] -= 1;
                    if waiting[k] == 0 && rank[u] == usize::MAX {
                        let r = 1 + cands[k]
                            .operands
                            .iter()
                            .map(|&o| rank[o])
                            .max()
                            .unwrap_or(0);
                        heap.push(Reverse((r, u)));
                    }
                }
            }
        }
    }
    rank
}

#[cfg(test)]
mod tests {
    use super::super::{cost, lang};
    use caramba_ir::{BinaryOp, DType, Graph, Op, Shape, TensorType};

    fn f32t(r: usize, c: usize) -> TensorType {
        TensorType::new(DType::F32, Shape::new([r.into(), c.into()]))
    }

    /// One value two ways: `x + x` with `x = a·b`, or `z + k` with
    /// `z = c·d`, a larger product. Counted as trees, `x + x` pays for
    /// `x` twice and loses; counted as a DAG it pays once and wins, and
    /// the graph it makes is the cheaper one.
    #[test]
    fn a_value_read_twice_is_paid_for_once() {
        let mut g = Graph::new("t");
        let a = g.input("a", f32t(256, 256)).unwrap();
        let b = g.input("b", f32t(256, 256)).unwrap();
        let c = g.input("c", f32t(256, 320)).unwrap();
        let d = g.input("d", f32t(320, 256)).unwrap();
        let k = g.input("k", f32t(256, 256)).unwrap();
        let x = g.add(Op::MatMul, &[a, b], "").unwrap();
        let twice = g.add(Op::Binary(BinaryOp::Add), &[x, x], "").unwrap();
        let z = g.add(Op::MatMul, &[c, d], "").unwrap();
        let other = g.add(Op::Binary(BinaryOp::Add), &[z, k], "").unwrap();
        g.set_output("y", twice);
        g.set_output("w", other);
        let mut loaded = lang::load(&g);
        let (y, w) = (loaded.outputs[0].1, loaded.outputs[1].1);
        loaded.egraph.union(y, w);
        loaded.egraph.rebuild();
        let y = loaded.egraph.find(y);
        loaded.outputs = vec![("y".into(), y)];
        let eg = &loaded.egraph;

        let tree = egg::Extractor::new(eg, cost::Cost { egraph: eg });
        let (tg, _) = lang::extract(&loaded, |c| tree.find_best_node(c).clone()).unwrap();
        let dag = super::dag(eg).expect("settles");
        let (dg, _) = lang::extract(&loaded, |c| dag.best[&c].clone()).unwrap();
        let reads = |g: &Graph, name: &str| g.inputs().any(|(n, _)| n == name);
        assert!(
            reads(&tg, "c") && !reads(&tg, "a"),
            "tree: {}",
            caramba_ir::to_text(&tg)
        );
        assert!(
            reads(&dg, "a") && !reads(&dg, "c"),
            "dag: {}",
            caramba_ir::to_text(&dg)
        );
        assert!(cost::graph_cost(&dg) < cost::graph_cost(&tg));
        assert!(dag.visits <= 2 * eg.number_of_classes());
    }
}
