//! `reuse-attention-lse`: in a training graph, the forward attention hands
//! its backward the log-sum-exp it computed anyway, instead of a second
//! kernel recomputing it.
//!
//! Autodiff's rule for `attention{c, s}(q, k, v)` emits
//! `attention_lse{c, s}(q, k)` (one per gradient it feeds; they are equal
//! nodes). This pass replaces such an attention and every matching
//! `attention_lse` (same q and k nodes, same `causal` and `scale`) by one
//! `attention_with_lse{c, s}(q, k, v)` and two slices of its last axis:
//! `0..dv` stands for the attention, `dv..dv + 1` for the log-sum-exp.
//! The fused node has the log-sum-exp's dtype (`f32` for half-precision
//! q), so for half-precision attention the first slice is read through a
//! `cast` back to the attention's dtype.
//!
//! Proof: `attention_with_lse`'s decomposition is
//! `concat{last}(attention(q, k, v), attention_lse(q, k))`, and slicing a
//! concatenation along its axis at the parts' boundaries gives the parts
//! back. For half-precision q the attention part is attention's f32 value
//! before its rounding, which the cast rounds exactly as `attention` does;
//! the log-sum-exp part is `attention_lse`'s f32 value as it is. The pass
//! keeps every other node, every output and every name.
//!
//! Why a graph pass and not an e-graph rule: the rewrite pairs two nodes
//! that share operands without either being part of the other's term, a
//! multi-pattern the rule engine (which builds one class's equivalents at a
//! time) does not have; and extraction sums each term's tree, so the shared
//! kernel would be charged once per slice and chosen in neither class. The
//! pairs exist only after differentiation, so training pipelines run this
//! right after `differentiate` (`fuse_for_training → differentiate →
//! reuse_attention_lse`), before `optimize`, which keeps the result: no
//! rule rewrites `attention_with_lse` or slices, and the primitives that
//! `fuse-attention` forms attention from are gone by then.
//!
//! It stops at exact pairs. An `attention_lse` without its attention (or
//! an attention without one) is left as it is; so is a pair the fusion
//! cannot serve: a symbolic `dv`, values whose leading axes broadcast
//! beyond q's and k's (the slice would not have the log-sum-exp's type), or
//! values computed from the log-sum-exp (fusing would make a cycle).

use caramba_ir::{Dim, Graph, IrError, NodeId, Op};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};

/// The pass's name, as reports and docs give it.
pub const NAME: &str = "reuse-attention-lse";

/// What the pairs are keyed by: `attention_lse{causal, scale}` and its
/// operands q, k.
type Key = (Op, NodeId, NodeId);

/// An attention whose log-sum-exp is also wanted.
struct Pair {
    /// The first attention with the key (topological order); its operands.
    attention: NodeId,
    v: NodeId,
    dv: usize,
    /// The `attention_lse` nodes it serves.
    lses: Vec<NodeId>,
}

/// What a node of `g` becomes.
#[derive(Clone, Copy)]
enum Role {
    /// The attention part of the fused node.
    Output(usize),
    /// The log-sum-exp part.
    Lse(usize),
}

/// `g` with every attention whose log-sum-exp is recomputed by an
/// `attention_lse` replaced by one `attention_with_lse` and slices; `g`
/// itself (a clone) when there is none.
pub fn reuse_attention_lse(g: &Graph) -> Result<Graph, IrError> {
    let order = g.topo_order();
    let operands: HashMap<NodeId, Vec<NodeId>> =
        order.iter().map(|&n| (n, g.operands(n))).collect();
    let lse_key = |n: NodeId| -> Option<Key> {
        let (causal, scale) = match g.node(n).op {
            Op::Attention { causal, scale } | Op::AttentionLse { causal, scale } => (causal, scale),
            _ => return None,
        };
        let xs = &operands[&n];
        Some((Op::AttentionLse { causal, scale }, xs[0], xs[1]))
    };

    // The first attention of each key, when the fused op types for it.
    let mut pairs: BTreeMap<Key, Pair> = BTreeMap::new();
    for &n in &order {
        if !matches!(g.node(n).op, Op::Attention { .. }) {
            continue;
        }
        let key = lse_key(n).expect("an attention");
        if pairs.contains_key(&key) {
            continue;
        }
        let v = operands[&n][2];
        let Some(dv) = g.node(v).ty.shape.last().and_then(|d| d.as_const()) else {
            continue;
        };
        pairs.insert(
            key,
            Pair {
                attention: n,
                v,
                dv,
                lses: Vec::new(),
            },
        );
    }
    if pairs.is_empty() {
        return Ok(g.clone());
    }

    // Each `attention_lse` joins its attention's pair unless the types
    // disagree or the values depend on it. Joining makes the log-sum-exp
    // depend on the values too (`extra`); each check sees the joins before
    // it, so the dependencies stay acyclic.
    let mut extra: HashMap<NodeId, NodeId> = HashMap::new(); // lse → v
    for &n in &order {
        if !matches!(g.node(n).op, Op::AttentionLse { .. }) {
            continue;
        }
        let key = lse_key(n).expect("an attention_lse");
        let Some(pair) = pairs.get_mut(&key) else {
            continue;
        };
        let mut lse_shape = g.node(pair.attention).ty.shape.clone();
        *lse_shape.0.last_mut().expect("attention has rank ≥ 2") = Dim::Const(1);
        if g.node(n).ty.shape != lse_shape || depends_on(pair.v, n, &operands, &extra) {
            continue;
        }
        pair.lses.push(n);
        extra.insert(n, pair.v);
    }
    pairs.retain(|_, p| !p.lses.is_empty());
    if pairs.is_empty() {
        return Ok(g.clone());
    }

    // Every attention with a pair's key and values is that pair's output
    // (equal nodes that no pass merged yet).
    let pairs: Vec<(Key, Pair)> = pairs.into_iter().collect();
    let index: HashMap<&Key, usize> = pairs.iter().enumerate().map(|(i, (k, _))| (k, i)).collect();
    let mut role: HashMap<NodeId, Role> = HashMap::new();
    for &n in &order {
        if !matches!(g.node(n).op, Op::Attention { .. }) {
            continue;
        }
        let key = lse_key(n).expect("an attention");
        if let Some(&i) = index.get(&key) {
            if operands[&n][2] == pairs[i].1.v {
                role.insert(n, Role::Output(i));
            }
        }
    }
    for (i, (_, pair)) in pairs.iter().enumerate() {
        for &n in &pair.lses {
            role.insert(n, Role::Lse(i));
        }
    }

    let mut out = Graph::new(g.name.clone());
    let mut map: HashMap<NodeId, NodeId> = HashMap::new();
    // Per pair: the two slices of its fused node, once built.
    let mut built: Vec<Option<(NodeId, NodeId)>> = vec![None; pairs.len()];
    for id in order_with(g, &order, &operands, &extra) {
        let n = g.node(id);
        let new = match role.get(&id).copied() {
            Some(r) => {
                let i = match r {
                    Role::Output(i) | Role::Lse(i) => i,
                };
                let (y, lse) = match built[i] {
                    Some(b) => b,
                    None => *built[i].insert(fuse(g, &mut out, &map, &pairs[i])?),
                };
                match r {
                    Role::Output(_) => y,
                    Role::Lse(_) => lse,
                }
            }
            None => {
                let xs: Vec<NodeId> = operands[&id].iter().map(|o| map[o]).collect();
                out.add_copy(n, &xs)?
            }
        };
        map.insert(id, new);
    }
    for (name, id) in g.outputs() {
        out.set_output(name, map[id]);
    }
    Ok(out)
}

/// Adds a pair's `attention_with_lse` to `out` over the new operands in
/// `map`; returns what stands for the attention (its slice, cast back to
/// the attention's dtype where the fused node is wider) and the
/// log-sum-exp's slice.
fn fuse(
    g: &Graph,
    out: &mut Graph,
    map: &HashMap<NodeId, NodeId>,
    (key, pair): &(Key, Pair),
) -> Result<(NodeId, NodeId), IrError> {
    let Op::AttentionLse { causal, scale } = key.0 else {
        unreachable!("keys hold attention_lse ops")
    };
    let xs = [map[&key.1], map[&key.2], map[&pair.v]];
    let scope = &g.node(pair.attention).scope;
    let fused = out.add(Op::AttentionWithLse { causal, scale }, &xs, scope)?;
    let axis = out.node(fused).ty.shape.rank() - 1;
    let slice = |start, end| Op::Slice { axis, start, end };
    let mut y = out.add(slice(0, pair.dv), &[fused], scope)?;
    let dtype = g.node(pair.attention).ty.dtype;
    if out.node(y).ty.dtype != dtype {
        y = out.add(Op::Cast(dtype), &[y], scope)?;
    }
    let lse_scope = &g.node(pair.lses[0]).scope;
    let lse = out.add(slice(pair.dv, pair.dv + 1), &[fused], lse_scope)?;
    Ok((y, lse))
}

/// Whether `node`'s value depends on `on`, counting the extra
/// dependencies (`lse → v`) of the pairs joined so far.
fn depends_on(
    node: NodeId,
    on: NodeId,
    operands: &HashMap<NodeId, Vec<NodeId>>,
    extra: &HashMap<NodeId, NodeId>,
) -> bool {
    let mut seen: HashSet<NodeId> = HashSet::new();
    let mut stack = vec![node];
    while let Some(n) = stack.pop() {
        if n == on {
            return true;
        }
        if seen.insert(n) {
            stack.extend(operands[&n].iter().copied());
            stack.extend(extra.get(&n).copied());
        }
    }
    false
}

/// A topological order of `g` with the extra dependencies, among ready
/// nodes the one first in `order` first (so without extra dependencies it
/// is `order`).
fn order_with(
    g: &Graph,
    order: &[NodeId],
    operands: &HashMap<NodeId, Vec<NodeId>>,
    extra: &HashMap<NodeId, NodeId>,
) -> Vec<NodeId> {
    let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let mut waiting: HashMap<NodeId, usize> = HashMap::new();
    let mut users: HashMap<NodeId, Vec<NodeId>> = HashMap::new();
    for &n in order {
        let deps = operands[&n].iter().chain(extra.get(&n));
        for &d in deps {
            *waiting.entry(n).or_default() += 1;
            users.entry(d).or_default().push(n);
        }
    }
    let mut ready: BinaryHeap<Reverse<usize>> = order
        .iter()
        .filter(|n| !waiting.contains_key(n))
        .map(|n| Reverse(pos[n]))
        .collect();
    let mut out = Vec::with_capacity(order.len());
    while let Some(Reverse(i)) = ready.pop() {
        let n = order[i];
        out.push(n);
        for u in users.get(&n).into_iter().flatten() {
            let w = waiting.get_mut(u).expect("a user waits");
            *w -= 1;
            if *w == 0 {
                ready.push(Reverse(pos[u]));
            }
        }
    }
    assert_eq!(
        out.len(),
        g.node_count(),
        "{NAME}: the extra dependencies made a cycle (checked before joining)"
    );
    out
}
