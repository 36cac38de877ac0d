//! `last-position`: a model graph whose logits are those of the last
//! position only, for generation without a KV cache.
//!
//! Generating without a cache runs the whole sequence every token and needs
//! only the last position's logits. The lowered graph computes them for every
//! position: the head's product is `T × vocab` (SmolLM2: 49,152 columns, the
//! largest value of the graph; on lavapipe its buffer passes the device's
//! 128 MiB at 683 tokens). This pass selects the last row where it can,
//! before the work that treats rows independently.
//!
//! ```text
//! rows:  a value [B, T, ...] (batch, then positions)
//! S:     logits, and every value with rows that only nodes of S read and
//!        whose op treats rows independently (elementwise, casts, products
//!        with a weight, reductions and reshapes of the trailing axes)
//! cuts:  the values with rows that nodes of S read and that are not in S
//! after: each cut c becomes permute(gather(permute(c, 0↔1), [T − 1]), 0↔1),
//!        [B, 1, ...]; S is rebuilt over it with T = 1 in its reshapes
//! ```
//!
//! Proof: each node of S computes its output row `t` from row `t` of its
//! operands with rows and from operands without rows (weights, constants),
//! so its last row is the same function of its operands' last rows; by
//! induction from the cuts, the rebuilt `logits` equal the original's last
//! row. Nodes outside S are unchanged, and no node outside S reads one of
//! S (that is how S was grown), so they lose nothing. In a Llama, S holds
//! the head, the final norm, and the last layer's MLP and attention output
//! projection; the cuts are the last layer's input and its attention's
//! output (attention mixes rows, so it stays whole: the keys and values
//! need every position).

use caramba_ir::{Dim, Graph, IrError, NodeId, Op, Shape, Sym, TensorType};
use std::collections::{BTreeSet, HashMap};

/// The input holding the last position, `T − 1`, as `i32[1]`.
pub const LAST_POSITION: &str = "last_position";

/// Whether `ty` has rows: `[B, T, ...]`.
fn has_rows(ty: &TensorType) -> bool {
    let d = ty.shape.dims();
    d.len() >= 3 && d[0] == Dim::Sym(Sym::B) && d[1] == Dim::Sym(Sym::T)
}

/// Whether `ty` mentions no position axis.
fn rowless(ty: &TensorType) -> bool {
    !ty.shape.dims().contains(&Dim::Sym(Sym::T))
}

/// Whether `n` computes each row from the same row of its operands with
/// rows and from operands without rows.
fn row_local(g: &Graph, n: NodeId) -> bool {
    let node = g.node(n);
    if !has_rows(&node.ty) {
        return false;
    }
    let ops = g.operands(n);
    let each = |f: &dyn Fn(&TensorType) -> bool| ops.iter().all(|&o| f(&g.node(o).ty));
    let rows_or_none = |t: &TensorType| {
        has_rows(t) && t.shape.rank() == node.ty.shape.rank() || rowless(t) && t.shape.rank() <= 1
    };
    match &node.op {
        Op::Unary(_) | Op::Cast(_) => each(&has_rows),
        Op::Binary(_) => each(&rows_or_none) && ops.iter().any(|&o| has_rows(&g.node(o).ty)),
        Op::MatMul => has_rows(&g.node(ops[0]).ty) && rowless(&g.node(ops[1]).ty),
        Op::Reduce { axis, .. } => *axis >= 2 && each(&has_rows),
        Op::Reshape(_) => each(&has_rows),
        _ => false,
    }
}

/// `g` with `output` (`[B, T, V]`) computed for the last position only
/// (`[B, 1, V]`), reading the input [`LAST_POSITION`]; `None` when
/// `output` is missing, has no rows, is read by other nodes, or is not
/// computed row by row.
pub fn last_position(g: &Graph, output: &str) -> Result<Option<Graph>, IrError> {
    let Some(out) = g.output(output) else {
        return Ok(None);
    };
    // Read by another node (a loss), the output must stay whole.
    if !row_local(g, out) || !g.users(out).is_empty() {
        return Ok(None);
    }
    let outputs: BTreeSet<NodeId> = g
        .outputs()
        .iter()
        .filter(|(name, _)| name != output)
        .map(|(_, id)| *id)
        .collect();
    if outputs.contains(&out) {
        return Ok(None);
    }
    // Grow S from the output: a node joins once all of its users are in S.
    let mut s: BTreeSet<NodeId> = BTreeSet::from([out]);
    let mut grew = true;
    while grew {
        grew = false;
        let frontier: Vec<NodeId> = s
            .iter()
            .flat_map(|&n| g.operands(n))
            .filter(|o| !s.contains(o))
            .collect();
        for o in frontier {
            if !s.contains(&o)
                && row_local(g, o)
                && !outputs.contains(&o)
                && g.users(o).iter().all(|u| s.contains(u))
            {
                s.insert(o);
                grew = true;
            }
        }
    }
    let mut h = Graph::new(g.name.clone());
    let mut map: HashMap<NodeId, NodeId> = HashMap::new();
    let order = g.topo_order();
    let last = h.input(
        LAST_POSITION,
        TensorType::new(caramba_ir::DType::I32, Shape::new([Dim::Const(1)])),
    )?;
    let mut selected: HashMap<NodeId, NodeId> = HashMap::new();
    for &n in &order {
        let node = g.node(n);
        let operands: Vec<NodeId> = g.operands(n);
        if !s.contains(&n) {
            let ops: Vec<NodeId> = operands.iter().map(|o| map[o]).collect();
            map.insert(n, h.add_copy(node, &ops)?);
            continue;
        }
        let mut ops = Vec::with_capacity(operands.len());
        for o in operands {
            if s.contains(&o) || !has_rows(&g.node(o).ty) {
                ops.push(map[&o]);
                continue;
            }
            // A cut: its last row, [B, 1, ...].
            let cut = match selected.get(&o) {
                Some(&c) => c,
                None => {
                    let rank = g.node(o).ty.shape.rank();
                    let mut swap: Vec<usize> = (0..rank).collect();
                    swap.swap(0, 1);
                    let scope = &g.node(o).scope;
                    let t = h.add(Op::Permute(swap.clone()), &[map[&o]], scope)?;
                    let row = h.add(Op::Gather, &[t, last], scope)?;
                    let c = h.add(Op::Permute(swap), &[row], scope)?;
                    selected.insert(o, c);
                    c
                }
            };
            ops.push(cut);
        }
        let op = match &node.op {
            Op::Reshape(shape) => {
                let mut dims = shape.dims().to_vec();
                dims[1] = Dim::Const(1);
                Op::Reshape(Shape::new(dims))
            }
            op => op.clone(),
        };
        map.insert(n, h.add(op, &ops, &node.scope)?);
    }
    for (name, id) in g.outputs() {
        h.set_output(name, map[id]);
    }
    h.remove_dead();
    Ok(Some(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Logits a loss reads stay whole: the pass declines.
    #[test]
    fn logits_a_loss_reads_are_left_alone() {
        let src =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../presets/tiny.yml"))
                .unwrap();
        let c = crate::compile(&src).unwrap();
        let mut g = c.student.graph.clone();
        caramba_ir::autodiff::add_next_token_loss(&mut g, "logits").unwrap();
        assert!(last_position(&g, "logits").unwrap().is_none());
        assert!(last_position(&g, "no such output").unwrap().is_none());
        assert!(last_position(&c.student.graph, "logits").unwrap().is_some());
    }
}
