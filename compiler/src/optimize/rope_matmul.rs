//! `fuse-rope-matmul`: RoPE moved into the epilogue of the projection whose
//! columns it rotates, so that the unrotated queries and keys are never
//! stored.
//!
//! ```text
//! y  = matmul(x, b)  or  rms_norm_matmul{eps}(x, w, b)      [..., T, N]
//! qᵢ = rope{spec}(reshape(slice{last, sᵢ..eᵢ}(y), [..., T, Hᵢ, d]), pos)
//!   →
//! y' = matmul_rope{eps?, spec, d, ranges=[sᵢ..eᵢ]}(x, w?, b, pos)
//! qᵢ = reshape(slice{last, sᵢ..eᵢ}(y'), [..., T, Hᵢ, d])
//! ```
//!
//! Proof: `matmul_rope`'s decomposition (`ir::op`) is the product, then
//! `rope{spec}` over the heads of each range at `pos`, the other columns
//! unchanged. Column `sᵢ + h·d + j` of `y'` is therefore element `(h, j)`
//! of `rope(reshape(slice(y)))` at its row, which is what `qᵢ` read; a
//! slice outside every range reads `y`'s columns unchanged (`v` of a merged
//! q/k/v projection). The reshape only splits the last axis, so it is the
//! inverse of the flattening the decomposition applies after rotating.
//!
//! Conditions, all checked on the chosen graph (as `fuse-norm-matmul`'s
//! are, and for the same reason: "every reader of y" is a property of the
//! graph, not of an e-class):
//! - `y` is not an output and every reader of `y` is a slice of its last
//!   axis;
//! - a rotated slice has one reader, a reshape that splits its last axis
//!   into `[H, d]`, whose one reader is a forward rope of it (operand 0);
//! - every such rope has the same spec, positions and head dim `d`;
//! - no other slice overlaps a rotated range (it would read rotated
//!   columns).
//!
//! Adjacent ranges are joined (q and k of a merged projection are one range
//! of `H + H_kv` heads), so the device's fallback rotates them in one
//! launch.
//!
//! Why: attention's q and k projections are followed by RoPE, which read
//! them back and wrote rotated copies (two launches a layer and two values
//! as large as q and k); a merged projection's q and k become views of the
//! product. On a decode step's few rows the matrix-vector kernel rotates
//! each pair of columns where it sums them (`gemv`); with more rows the
//! product runs as before and RoPE rotates its ranges in place, one launch,
//! with no second buffer (cuBLASLt and cubek 0.2 take no epilogue).

use caramba_ir::{Graph, IrError, NodeId, Op, RopeSpec};
use std::collections::{HashMap, HashSet};

/// The pass's name, as reports and docs give it.
pub const NAME: &str = "fuse-rope-matmul";

/// The graph after the pass, where each old node went, and the fusions.
pub struct Fused {
    pub graph: Graph,
    /// Old node → new node for every old node; a rope folded into a
    /// product maps to the reshape that now reads the rotated columns.
    pub map: HashMap<NodeId, NodeId>,
    /// Each `matmul_rope` formed, with the product it replaced.
    pub fused: Vec<(NodeId, NodeId)>,
}

/// What the pass does to one product.
struct Plan {
    rope: RopeSpec,
    pos: NodeId,
    head_dim: usize,
    ranges: Vec<(usize, usize)>,
    /// The ropes folded in.
    ropes: Vec<NodeId>,
}

/// `g` with every product whose readers fit the conditions (module docs)
/// given RoPE in its epilogue.
pub fn fuse(g: &Graph) -> Result<Fused, IrError> {
    let outputs: HashSet<NodeId> = g.outputs().iter().map(|(_, id)| *id).collect();
    let mut plans: HashMap<NodeId, Plan> = HashMap::new();
    for id in g.node_ids() {
        if let Some(plan) = plan(g, id, &outputs) {
            plans.insert(id, plan);
        }
    }
    let folded: HashMap<NodeId, NodeId> = plans
        .values()
        .flat_map(|p| p.ropes.iter().map(|&r| (r, g.operands(r)[0])))
        .collect();
    let mut out = Graph::new(g.name.clone());
    let mut map: HashMap<NodeId, NodeId> = HashMap::new();
    let mut fused = Vec::new();
    for id in g.topo_order() {
        let n = g.node(id);
        let new = if let Some(&reshape) = folded.get(&id) {
            map[&reshape]
        } else if let Some(p) = plans.get(&id) {
            let eps = match n.op {
                Op::RmsNormMatMul { eps } => Some(eps),
                _ => None,
            };
            let mut xs: Vec<NodeId> = g.operands(id).iter().map(|o| map[o]).collect();
            // The positions are a graph input (`plan` checks), declared again
            // by name if the order has not reached them yet.
            let pos = match map.get(&p.pos) {
                Some(&pos) => pos,
                None => out.add_copy(g.node(p.pos), &[])?,
            };
            map.insert(p.pos, pos);
            xs.push(pos);
            let op = Op::MatMulRope {
                eps,
                rope: p.rope,
                head_dim: p.head_dim,
                ranges: p.ranges.clone(),
            };
            let y = out.add(op, &xs, &n.scope)?;
            fused.push((y, id));
            y
        } else {
            match map.get(&id) {
                // Positions declared early for a product.
                Some(&done) => done,
                None => {
                    let xs: Vec<NodeId> = g.operands(id).iter().map(|o| map[o]).collect();
                    out.add_copy(n, &xs)?
                }
            }
        };
        map.insert(id, new);
    }
    for (name, id) in g.outputs() {
        out.set_output(name, map[id]);
    }
    Ok(Fused {
        graph: out,
        map,
        fused,
    })
}

/// The fusion of the product `id`, if its readers fit the conditions.
fn plan(g: &Graph, id: NodeId, outputs: &HashSet<NodeId>) -> Option<Plan> {
    let n = g.node(id);
    let b = match n.op {
        Op::MatMul => g.operands(id)[1],
        Op::RmsNormMatMul { .. } => g.operands(id)[2],
        _ => return None,
    };
    let rank = n.ty.shape.rank();
    if rank < 2 || g.node(b).ty.shape.rank() != 2 || outputs.contains(&id) {
        return None;
    }
    let users = g.users(id);
    if users.is_empty() {
        return None;
    }
    let mut rotated: Vec<(usize, usize, NodeId)> = Vec::new();
    let mut plain: Vec<(usize, usize)> = Vec::new();
    let mut common: Option<(RopeSpec, NodeId, usize)> = None;
    for u in users {
        let Op::Slice { axis, start, end } = g.node(u).op else {
            return None;
        };
        if axis != rank - 1 {
            return None;
        }
        match rotation(g, u, outputs) {
            Some((rope, spec, pos, d)) => {
                if common.is_some_and(|c| c != (spec, pos, d)) {
                    return None;
                }
                common = Some((spec, pos, d));
                rotated.push((start, end, rope));
            }
            None => plain.push((start, end)),
        }
    }
    let (rope, pos, head_dim) = common?;
    // Positions a graph input: declared again wherever the new product
    // needs them (an op computing them might come after the product).
    if !matches!(g.node(pos).op, Op::Input { .. }) {
        return None;
    }
    rotated.sort_unstable();
    let overlaps = |(s, e): (usize, usize), (s2, e2): (usize, usize)| s < e2 && s2 < e;
    for w in rotated.windows(2) {
        if w[0].1 > w[1].0 {
            return None;
        }
    }
    if plain
        .iter()
        .any(|&p| rotated.iter().any(|&(s, e, _)| overlaps(p, (s, e))))
    {
        return None;
    }
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for &(s, e, _) in &rotated {
        match ranges.last_mut() {
            Some(last) if last.1 == s => last.1 = e,
            _ => ranges.push((s, e)),
        }
    }
    Some(Plan {
        rope,
        pos,
        head_dim,
        ranges,
        ropes: rotated.into_iter().map(|(_, _, r)| r).collect(),
    })
}

/// For a slice `s` of a product: the rope that rotates it, its spec, its
/// positions and its head dim, when `s` is read only by a reshape that
/// splits its last axis into heads, read only by that forward rope.
fn rotation(
    g: &Graph,
    s: NodeId,
    outputs: &HashSet<NodeId>,
) -> Option<(NodeId, RopeSpec, NodeId, usize)> {
    let [reshape] = g.users(s)[..] else {
        return None;
    };
    let [rope] = g.users(reshape)[..] else {
        return None;
    };
    let Op::Rope(spec) = g.node(rope).op else {
        return None;
    };
    let Op::Reshape(_) = g.node(reshape).op else {
        return None;
    };
    if spec.inverse
        || outputs.contains(&s)
        || outputs.contains(&reshape)
        || g.operands(rope)[0] != reshape
    {
        return None;
    }
    let from = g.node(s).ty.shape.dims();
    let to = g.node(reshape).ty.shape.dims();
    let r = from.len();
    if to.len() != r + 1 || from[..r - 1] != to[..r - 1] {
        return None;
    }
    let (h, d) = (to[r - 1].as_const()?, to[r].as_const()?);
    if from[r - 1].as_const()? != h * d {
        return None;
    }
    Some((rope, spec, g.operands(rope)[1], d))
}
