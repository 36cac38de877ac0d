//! `fuse-elementwise`: chains of unary and binary ops (with scalar constants
//! folded in) become one `elementwise` kernel, and a cheap unary op read by
//! several such kernels is recomputed in each of them instead of stored.
//!
//! This runs after extraction, as a greedy pass over the graph rather than
//! as e-graph rules: which nodes may share a kernel depends on how many users
//! each value has in the *chosen* graph, which the e-graph does not know
//! (every class there may have users that extraction drops).
//!
//! Walking from the last node back, each unfused unary/binary node roots a
//! group and pulls in the producers of its operands that are themselves
//! unary/binary, have every user inside the group, are not graph outputs, and
//! have the root's exact type. That last condition is the cost model's: a
//! member then writes nothing to memory, and no small operand is recomputed
//! per element of a larger result (fusing `sigmoid(gate[H, 1])` into a
//! `[B, T, H, d]` product would repeat it B·T·d times for nothing). A group
//! of at least two ops saves writing and re-reading each inner value, so it
//! is always fused; a lone op is left as it is.
//!
//! **Recomputation.** A value whose users land in different groups is
//! written once and read by each of them. SwiGLU in a training graph is the
//! case that matters: the forward's `mul(silu(a), b)` and the backward's
//! `mul(dy, silu(a))` both read `silu(a)`, a `[B, T, d_ff]` tensor, so
//! `silu` was a kernel of its own and neither product fused with it. So a
//! first grouping of the graph as it is picks the float unary ops `u` that
//! - are stored: not inside a group (there all their users already share
//!   one kernel, and a copy would only compute them twice), and not graph
//!   outputs;
//! - have at least two users, each a float unary/binary op of exactly
//!   `u`'s type;
//! - read, with the group they root if any, exactly one tensor, of exactly
//!   `u`'s type (the group's other operands are scalar constants: it is
//!   `u` alone, a chain of unary ops, or such a chain with a scalar folded
//!   in, like `sigmoid(x·0.5)`).
//!
//! Each such `u`, with its group, is then copied into the groups of its
//! users, and the copied graph grouped again. Recomputing is free in this
//! model: each kernel that read `u` reads `u`'s one input instead, the same
//! number of bytes (fewer where the kernel reads that input already), `u`
//! is no longer written, and one launch fewer runs; what it costs is `u`'s
//! few ops per element, in kernels bound by memory traffic. Reading two
//! tensors, `silu(x + y)`, would read more than `u` in every user, so it is
//! stored. Users that shared a group in the first grouping share one copy,
//! so no kernel computes `u` twice, and each copy's users are all in its
//! group, so it always joins it: no copy is left as a kernel of its own.
//!
//! In [`Fused::map`], a node folded into a fused program has no entry:
//! a group's members other than its root, and, likewise, a recomputed node,
//! which has a copy in several kernels and no one node of its own;
//! [`Fused::recomputed`] lists those. Callers (`optimize_with`) use `map`
//! only to carry fused ops of the e-graph (attention, norms) to the new
//! graph, and those are never recomputed. Reports count each recomputed
//! op as one application of `fuse-elementwise`, as they count each kernel
//! formed.
//!
//! It stops at elementwise ops: casts, reductions and layout ops end a
//! group, and nothing is fused into matmuls or the other fused ops.

use caramba_ir::{ElemInstr, ElemProgram, Graph, IrError, NodeId, Op};
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet};

/// The rule name fused elementwise nodes report.
pub const NAME: &str = "fuse-elementwise";

/// The graph after fusion, where each old node went, and the fused nodes.
pub struct Fused {
    pub graph: Graph,
    /// Old node → new node, for every old node that is a node of its own in
    /// the new graph: not for those folded into a fused program (inner
    /// members of a group, recomputed nodes), nor for scalar constants all
    /// of whose users were fused.
    pub map: HashMap<NodeId, NodeId>,
    /// The `elementwise` nodes formed, in the new graph's construction order.
    pub fused: Vec<NodeId>,
    /// Old nodes recomputed in each of their users' kernels instead of
    /// stored (each such unary op and the other members of the group it
    /// rooted), sorted.
    pub recomputed: Vec<NodeId>,
}

fn fusible(g: &Graph, id: NodeId) -> bool {
    let n = g.node(id);
    matches!(n.op, Op::Unary(_) | Op::Binary(_)) && n.ty.dtype.is_float()
}

/// Groups of nodes to fuse: root → members (root included).
fn groups(g: &Graph, order: &[NodeId]) -> HashMap<NodeId, BTreeSet<NodeId>> {
    let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let outputs: HashSet<NodeId> = g.outputs().iter().map(|(_, id)| *id).collect();
    let mut taken: HashSet<NodeId> = HashSet::new();
    let mut out = HashMap::new();
    for &root in order.iter().rev() {
        if taken.contains(&root) || !fusible(g, root) {
            continue;
        }
        let mut members: HashSet<NodeId> = HashSet::from([root]);
        let mut heap: BinaryHeap<(usize, NodeId)> =
            g.operands(root).iter().map(|&o| (pos[&o], o)).collect();
        while let Some((_, o)) = heap.pop() {
            let ok = !members.contains(&o)
                && !taken.contains(&o)
                && fusible(g, o)
                && !outputs.contains(&o)
                && g.node(o).ty == g.node(root).ty
                && g.users(o).iter().all(|u| members.contains(u));
            if ok {
                members.insert(o);
                heap.extend(g.operands(o).iter().map(|&x| (pos[&x], x)));
            }
        }
        if members.len() >= 2 {
            taken.extend(members.iter().copied());
            out.insert(root, members.into_iter().collect());
        }
    }
    out
}

/// The program of a group and the operands it reads, or `None` when it
/// reads no tensor (a chain of constants, left alone).
fn program(
    g: &Graph,
    members: &BTreeSet<NodeId>,
    pos: &HashMap<NodeId, usize>,
) -> Option<(ElemProgram, Vec<NodeId>)> {
    let mut sorted: Vec<NodeId> = members.iter().copied().collect();
    sorted.sort_by_key(|n| pos[n]);
    let mut instrs: Vec<ElemInstr> = Vec::new();
    let mut at: HashMap<NodeId, u16> = HashMap::new();
    let mut leaves: Vec<NodeId> = Vec::new();
    for &m in &sorted {
        let mut refs = Vec::new();
        for o in g.operands(m) {
            if let Some(&i) = at.get(&o) {
                refs.push(i);
                continue;
            }
            let ins = match g.node(o).op {
                Op::Constant(v) => ElemInstr::Const(v),
                _ => {
                    leaves.push(o);
                    ElemInstr::Input((leaves.len() - 1) as u16)
                }
            };
            instrs.push(ins);
            let i = (instrs.len() - 1) as u16;
            at.insert(o, i);
            refs.push(i);
        }
        instrs.push(match g.node(m).op {
            Op::Unary(u) => ElemInstr::Unary(u, refs[0]),
            Op::Binary(b) => ElemInstr::Binary(b, refs[0], refs[1]),
            _ => unreachable!("only unary and binary ops join a group"),
        });
        at.insert(m, (instrs.len() - 1) as u16);
    }
    (!leaves.is_empty()).then_some((ElemProgram(instrs), leaves))
}

/// A group that will be fused: its members, program and operands.
struct Plan {
    members: BTreeSet<NodeId>,
    program: ElemProgram,
    leaves: Vec<NodeId>,
}

/// The groups of `g` that are fused (by root) and their members other than
/// the root.
fn plan(
    g: &Graph,
    order: &[NodeId],
    pos: &HashMap<NodeId, usize>,
) -> (HashMap<NodeId, Plan>, HashSet<NodeId>) {
    let mut plans = HashMap::new();
    let mut inner = HashSet::new();
    for (root, members) in groups(g, order) {
        if let Some((program, leaves)) = program(g, &members, pos) {
            inner.extend(members.iter().copied().filter(|&m| m != root));
            plans.insert(
                root,
                Plan {
                    members,
                    program,
                    leaves,
                },
            );
        }
    }
    (plans, inner)
}

/// The nodes to recompute in their users' groups rather than store (see
/// the module doc): each stored unary op that qualifies, with the inner
/// members of the group it roots.
fn recomputable(
    g: &Graph,
    order: &[NodeId],
    plans: &HashMap<NodeId, Plan>,
    inner: &HashSet<NodeId>,
) -> BTreeSet<NodeId> {
    let outputs: HashSet<NodeId> = g.outputs().iter().map(|(_, id)| *id).collect();
    let mut out = BTreeSet::new();
    for &u in order {
        let n = g.node(u);
        if !matches!(n.op, Op::Unary(_))
            || !fusible(g, u)
            || inner.contains(&u)
            || outputs.contains(&u)
        {
            continue;
        }
        let users = g.users(u);
        if users.len() < 2 || !users.iter().all(|&k| fusible(g, k) && g.node(k).ty == n.ty) {
            continue;
        }
        let (chain, input) = match plans.get(&u) {
            Some(p) if p.leaves.len() == 1 => (p.members.clone(), p.leaves[0]),
            Some(_) => continue,
            None => (BTreeSet::from([u]), g.operands(u)[0]),
        };
        let x = g.node(input);
        if x.ty != n.ty || matches!(x.op, Op::Constant(_)) {
            continue;
        }
        out.extend(chain);
    }
    out
}

/// `g` with each node of `recompute` replaced by one copy per group of its
/// users (`group_of`: node → root of its group; a node in none is its own),
/// made just before the first user in that group; and where each other
/// node went.
fn duplicate(
    g: &Graph,
    recompute: &BTreeSet<NodeId>,
    group_of: &HashMap<NodeId, NodeId>,
) -> Result<(Graph, HashMap<NodeId, NodeId>), IrError> {
    struct Copier<'a> {
        g: &'a Graph,
        recompute: &'a BTreeSet<NodeId>,
        out: Graph,
        map: HashMap<NodeId, NodeId>,
        copies: HashMap<(NodeId, NodeId), NodeId>,
    }
    impl Copier<'_> {
        /// What a node of group `group` reads for its operand `o`.
        fn operand(&mut self, group: NodeId, o: NodeId) -> Result<NodeId, IrError> {
            if !self.recompute.contains(&o) {
                return Ok(self.map[&o]);
            }
            if let Some(&c) = self.copies.get(&(group, o)) {
                return Ok(c);
            }
            let xs = self
                .g
                .operands(o)
                .into_iter()
                .map(|x| self.operand(group, x))
                .collect::<Result<Vec<_>, _>>()?;
            let c = self.out.add_copy(self.g.node(o), &xs)?;
            self.copies.insert((group, o), c);
            Ok(c)
        }
    }
    let mut cp = Copier {
        g,
        recompute,
        out: Graph::new(g.name.clone()),
        map: HashMap::new(),
        copies: HashMap::new(),
    };
    for id in g.topo_order() {
        if recompute.contains(&id) {
            continue;
        }
        let group = group_of.get(&id).copied().unwrap_or(id);
        let xs = g
            .operands(id)
            .into_iter()
            .map(|o| cp.operand(group, o))
            .collect::<Result<Vec<_>, _>>()?;
        let new = cp.out.add_copy(g.node(id), &xs)?;
        cp.map.insert(id, new);
    }
    for (name, id) in g.outputs() {
        cp.out.set_output(name, cp.map[id]);
    }
    Ok((cp.out, cp.map))
}

/// Fuses elementwise chains of `g`, recomputing cheap unary ops in each of
/// their users' kernels where that saves storing them.
pub fn fuse(g: &Graph) -> Result<Fused, IrError> {
    let order = g.topo_order();
    let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let (plans, inner) = plan(g, &order, &pos);
    let recompute = recomputable(g, &order, &plans, &inner);
    if recompute.is_empty() {
        return build(g, &plans, &inner);
    }
    let group_of: HashMap<NodeId, NodeId> = plans
        .iter()
        .flat_map(|(&root, p)| p.members.iter().map(move |&m| (m, root)))
        .collect();
    let (h, to_h) = duplicate(g, &recompute, &group_of)?;
    let order = h.topo_order();
    let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let (plans, inner) = plan(&h, &order, &pos);
    debug_assert!(
        {
            let kept: HashSet<NodeId> = to_h.values().copied().collect();
            h.node_ids()
                .all(|n| kept.contains(&n) || inner.contains(&n))
        },
        "a recomputed copy was left out of its users' kernel"
    );
    let mut f = build(&h, &plans, &inner)?;
    f.map = to_h
        .iter()
        .filter_map(|(old, mid)| f.map.get(mid).map(|&new| (*old, new)))
        .collect();
    f.recomputed = recompute.into_iter().collect();
    Ok(f)
}

/// The graph with the planned groups of `g` fused.
fn build(
    g: &Graph,
    plans: &HashMap<NodeId, Plan>,
    inner: &HashSet<NodeId>,
) -> Result<Fused, IrError> {
    let mut fused = Vec::new();
    let (mut out, mut map) = g.rebuilt(inner, |out, id, map| {
        let Some(p) = plans.get(&id) else {
            return Ok(None);
        };
        let xs: Vec<NodeId> = p.leaves.iter().map(|l| map[l]).collect();
        let f = out.add(Op::Elementwise(p.program.clone()), &xs, &g.node(id).scope)?;
        fused.push(f);
        Ok(Some(f))
    })?;
    // Constants folded into programs may have no users left.
    let dead_constants: Vec<NodeId> = out
        .node_ids()
        .filter(|&n| matches!(out.node(n).op, Op::Constant(_)) && out.users(n).is_empty())
        .collect();
    if !dead_constants.is_empty() {
        out.remove_dead();
        map.retain(|_, v| out.petgraph().contains_node(*v));
    }
    Ok(Fused {
        graph: out,
        map,
        fused,
        recomputed: Vec::new(),
    })
}
