//! `fuse-elementwise`: chains of unary and binary ops (with scalar constants
//! folded in) become one `elementwise` kernel.
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
//! It stops at elementwise ops: casts, reductions and layout ops end a
//! group, and nothing is fused into matmuls or the other fused ops.

use caramba_ir::{ElemInstr, ElemProgram, Graph, IrError, NodeId, Op};
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet};

/// The rule name fused elementwise nodes report.
pub const NAME: &str = "fuse-elementwise";

/// The graph after fusion, where each old node went, and the fused nodes.
pub struct Fused {
    pub graph: Graph,
    pub map: HashMap<NodeId, NodeId>,
    pub fused: Vec<NodeId>,
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

/// Fuses elementwise chains of `g`.
pub fn fuse(g: &Graph) -> Result<Fused, IrError> {
    let order = g.topo_order();
    let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let mut plans: HashMap<NodeId, (ElemProgram, Vec<NodeId>)> = HashMap::new();
    let mut inner: HashSet<NodeId> = HashSet::new();
    for (root, members) in groups(g, &order) {
        if let Some(p) = program(g, &members, &pos) {
            inner.extend(members.iter().copied().filter(|&m| m != root));
            plans.insert(root, p);
        }
    }
    let mut out = Graph::new(g.name.clone());
    let mut map: HashMap<NodeId, NodeId> = HashMap::new();
    let mut fused = Vec::new();
    for &id in &order {
        if inner.contains(&id) {
            continue;
        }
        let n = g.node(id);
        let new = match (&n.op, plans.get(&id)) {
            (_, Some((prog, leaves))) => {
                let xs: Vec<NodeId> = leaves.iter().map(|l| map[l]).collect();
                let f = out.add(Op::Elementwise(prog.clone()), &xs, &n.scope)?;
                fused.push(f);
                f
            }
            (Op::Input { name }, None) => out.input(name, n.ty.clone())?,
            (Op::Param { name }, None) => out.param(name, n.ty.clone(), &n.scope)?,
            (Op::Constant(v), None) => out.constant(v.0, n.ty.dtype, &n.scope),
            (op, None) => {
                let xs: Vec<NodeId> = g.operands(id).iter().map(|o| map[o]).collect();
                out.add(op.clone(), &xs, &n.scope)?
            }
        };
        map.insert(id, new);
    }
    for (name, id) in g.outputs() {
        out.set_output(name, map[id]);
    }
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
    })
}
