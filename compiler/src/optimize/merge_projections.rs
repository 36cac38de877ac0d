//! `merge-projections`: linear projections of one input become one matrix
//! product over their weights stacked, and slices of it.
//!
//! Lowering writes each projection as `matmul(x, permute[1, 0](w))` with
//! `w` its `[N, K]` weight (as read: through a cast in mixed precision).
//! Attention's q, k and v projections read the same normalized `x`, and so
//! do SwiGLU's gate and up projections. This pass replaces every such
//! group by
//!
//! ```text
//! y   = matmul(x, permute[1, 0](concat{0}(w₁, …, wₙ)))     [..., ΣNᵢ]
//! yᵢ  = slice{last, offᵢ..offᵢ + Nᵢ}(y)
//! ```
//!
//! Proof: column `offᵢ + j` of `permute(concat{0}(w₁…wₙ))` is row `j` of
//! `wᵢ`, which is column `j` of `permute(wᵢ)`; each output element of a
//! product is the dot product of a row of `x` with a column of the right
//! operand, the same `K` terms in the same order, so the slice holds exactly
//! `matmul(x, permute(wᵢ))`.
//!
//! Why: each product is one GEMM launch, and on CUDA a cuBLASLt call waits
//! for the device before and after it (cubecl-cuda keeps its stream
//! private, see NOTES), so fewer, wider products are worth more than their
//! flops say. In a training graph the merge pays three times: autodiff
//! turns the merged product's backward into one product for `dx` and one
//! for the stacked weights' gradient (and gathers the slices' adjoints into
//! one concatenation), where the separate projections took one of each per
//! projection. Five products a layer instead of seven, each way.
//!
//! Why a graph pass and not an e-graph rule: it joins several classes that
//! share an operand without any being part of another's term, the
//! multi-pattern the rule engine does not have (as `reuse-attention-lse`).
//! Training runs it on the fused forward graph before differentiating
//! (`fuse_for_training`).
//!
//! It stops at weights of one dtype and constant shapes that are not
//! computed from the group's own products (the merged product stands where
//! the first one did, its weights copied before it). A weight read by
//! anything else keeps its own transpose for those readers.

use caramba_ir::{Dim, Graph, IrError, NodeId, Op};
use std::collections::{BTreeMap, HashMap};

/// The pass's name, as reports and docs give it.
pub const NAME: &str = "merge-projections";

/// One projection: `matmul(x, permute[1, 0](w))`.
struct Projection {
    matmul: NodeId,
    permute: NodeId,
    w: NodeId,
    /// Output features (`w`'s rows).
    n: usize,
}

/// `g` with every group of at least two projections of one input merged;
/// `g` itself (a clone) when there is none.
pub fn merge_projections(g: &Graph) -> Result<Graph, IrError> {
    let order = g.topo_order();
    let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    // Projections by their input's position (so that the pass is
    // deterministic), in order. The same weight projected twice is one
    // product (the e-graph merges equal nodes): the group keeps the first.
    let mut by_input: BTreeMap<usize, Vec<Projection>> = BTreeMap::new();
    for &id in &order {
        if g.node(id).op != Op::MatMul {
            continue;
        }
        let ops = g.operands(id);
        let (x, p) = (ops[0], ops[1]);
        if g.node(p).op != Op::Permute(vec![1, 0]) {
            continue;
        }
        let w = g.operands(p)[0];
        let wt = &g.node(w).ty;
        let (Some(n), Some(_)) = (wt.shape.dims()[0].as_const(), wt.shape.dims()[1].as_const())
        else {
            continue;
        };
        if g.node(x).ty.shape.rank() < 2 {
            continue;
        }
        let group = by_input.entry(pos[&x]).or_default();
        if group.iter().all(|q| q.w != w) {
            group.push(Projection {
                matmul: id,
                permute: p,
                w,
                n,
            });
        }
    }
    let mut merged: Vec<Vec<Projection>> = Vec::new();
    for (_, mut ps) in by_input {
        let dtype = g.node(ps[0].w).ty.dtype;
        let k = g.node(ps[0].w).ty.shape.dims()[1];
        let members: Vec<NodeId> = ps.iter().map(|p| p.matmul).collect();
        ps.retain(|p| {
            let t = &g.node(p.w).ty;
            t.dtype == dtype && t.shape.dims()[1] == k && !depends_on_any(g, p.w, &members)
        });
        if ps.len() >= 2 {
            merged.push(ps);
        }
    }
    if merged.is_empty() {
        return Ok(g.clone());
    }

    // What each merged product's node becomes: (group, index in group).
    let mut member: HashMap<NodeId, (usize, usize)> = HashMap::new();
    for (gi, ps) in merged.iter().enumerate() {
        for (i, p) in ps.iter().enumerate() {
            member.insert(p.matmul, (gi, i));
        }
    }
    // Transposes read only by merged products are no longer needed.
    let dropped: std::collections::HashSet<NodeId> = merged
        .iter()
        .flatten()
        .map(|p| p.permute)
        .filter(|&p| g.users(p).iter().all(|u| member.contains_key(u)))
        .collect();

    let mut c = Copy {
        g,
        out: Graph::new(g.name.clone()),
        map: HashMap::new(),
    };
    let mut built: Vec<Option<Vec<NodeId>>> = vec![None; merged.len()];
    for &id in &order {
        if dropped.contains(&id) || c.map.contains_key(&id) {
            continue;
        }
        match member.get(&id) {
            Some(&(gi, i)) => {
                if built[gi].is_none() {
                    // The weights (and what they are computed from) may come
                    // later in `g`'s order: copy them first.
                    for p in &merged[gi] {
                        c.copy(p.w)?;
                    }
                    built[gi] = Some(merge(&mut c, &merged[gi])?);
                }
                let slice = built[gi].as_ref().expect("just built")[i];
                c.map.insert(id, slice);
            }
            None => {
                c.copy(id)?;
            }
        }
    }
    let Copy { mut out, map, .. } = c;
    for (name, id) in g.outputs() {
        out.set_output(name, map[id]);
    }
    Ok(out)
}

/// Whether `node` is computed from any of `of`.
fn depends_on_any(g: &Graph, node: NodeId, of: &[NodeId]) -> bool {
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![node];
    while let Some(n) = stack.pop() {
        if of.contains(&n) {
            return true;
        }
        if seen.insert(n) {
            stack.extend(g.operands(n));
        }
    }
    false
}

/// The rebuilt graph and where each node of `g` went.
struct Copy<'a> {
    g: &'a Graph,
    out: Graph,
    map: HashMap<NodeId, NodeId>,
}

impl Copy<'_> {
    /// Copies `id` (and first whatever it reads that is not copied yet).
    fn copy(&mut self, id: NodeId) -> Result<NodeId, IrError> {
        if let Some(&n) = self.map.get(&id) {
            return Ok(n);
        }
        let mut xs = Vec::new();
        for o in self.g.operands(id) {
            xs.push(self.copy(o)?);
        }
        let new = self.out.add_copy(self.g.node(id), &xs)?;
        self.map.insert(id, new);
        Ok(new)
    }
}

/// Adds one group's merged product to `out` (over the new nodes in `map`)
/// and returns the slice standing for each projection.
fn merge(c: &mut Copy, ps: &[Projection]) -> Result<Vec<NodeId>, IrError> {
    let g = c.g;
    let (out, map) = (&mut c.out, &c.map);
    let scope = common_scope(ps.iter().map(|p| g.node(p.matmul).scope.as_str()));
    let ws: Vec<NodeId> = ps.iter().map(|p| map[&p.w]).collect();
    let stacked = out.add(Op::Concat { axis: 0 }, &ws, &scope)?;
    let t = out.add(Op::Permute(vec![1, 0]), &[stacked], &scope)?;
    let x = map[&g.operands(ps[0].matmul)[0]];
    let y = out.add(Op::MatMul, &[x, t], &scope)?;
    let last = out.node(y).ty.shape.rank() - 1;
    debug_assert!(matches!(out.node(y).ty.shape.dims()[last], Dim::Const(_)));
    let mut at = 0;
    let mut slices = Vec::with_capacity(ps.len());
    for p in ps {
        let op = Op::Slice {
            axis: last,
            start: at,
            end: at + p.n,
        };
        slices.push(out.add(op, &[y], &g.node(p.matmul).scope)?);
        at += p.n;
    }
    Ok(slices)
}

/// The longest common prefix of `scopes` that ends at a `.` (or the first
/// scope whole when they agree), e.g. `model.layers.3.self_attn` for the
/// scopes of `q_proj`, `k_proj` and `v_proj`.
fn common_scope<'a>(mut scopes: impl Iterator<Item = &'a str>) -> String {
    let first: Vec<&str> = scopes.next().unwrap_or("").split('.').collect();
    let mut n = first.len();
    for s in scopes {
        n = first
            .iter()
            .zip(s.split('.'))
            .take(n)
            .take_while(|(a, b)| *a == b)
            .count();
    }
    first[..n].join(".")
}

#[cfg(test)]
mod tests {
    use super::common_scope;

    #[test]
    fn common_scope_keeps_whole_segments() {
        let qkv = [
            "model.layers.3.self_attn.q_proj",
            "model.layers.3.self_attn.k_proj",
            "model.layers.3.self_attn.v_proj",
        ];
        assert_eq!(common_scope(qkv.into_iter()), "model.layers.3.self_attn");
        assert_eq!(common_scope(["a.bc", "a.bd"].into_iter()), "a");
        assert_eq!(common_scope(["x.y", "x.y"].into_iter()), "x.y");
        assert_eq!(common_scope(["x.y"].into_iter()), "x.y");
    }
}
