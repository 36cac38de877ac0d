//! The verifier: run after every stage, it re-derives everything a graph
//! claims about itself. It stops at reporting; it never repairs.

use crate::graph::{Graph, IrError};
use petgraph::Direction;

/// Checks that the graph is acyclic, that each node has the operands its op
/// takes (positions 0..n, none missing), that each non-source node's stored
/// type equals the type its op infers, and that the outputs exist.
pub fn verify(g: &Graph) -> Result<(), Vec<IrError>> {
    let mut errs = Vec::new();
    let pg = g.petgraph();
    let err = |scope: &str, message: String| IrError {
        scope: scope.to_string(),
        message,
    };
    if petgraph::algo::is_cyclic_directed(pg) {
        errs.push(err(&g.name, "the graph has a cycle".into()));
    }
    if g.outputs().is_empty() {
        errs.push(err(&g.name, "the graph has no outputs".into()));
    }
    for (name, id) in g.outputs() {
        if !pg.contains_node(*id) {
            errs.push(err(
                &g.name,
                format!("output {name:?} refers to a removed node"),
            ));
        }
    }
    for id in pg.node_indices() {
        let node = &pg[id];
        let mut positions: Vec<u32> = pg
            .edges_directed(id, Direction::Incoming)
            .map(|e| *e.weight())
            .collect();
        positions.sort();
        if positions.iter().enumerate().any(|(i, &p)| p as usize != i) {
            errs.push(err(
                &node.scope,
                format!("{} has operand positions {positions:?}", node.op.mnemonic()),
            ));
            continue;
        }
        if !node.op.arity().accepts(positions.len()) {
            errs.push(err(
                &node.scope,
                format!(
                    "{} takes {} operand(s) but has {}",
                    node.op.mnemonic(),
                    node.op.arity(),
                    positions.len()
                ),
            ));
            continue;
        }
        if node.op.is_source() {
            if node.ty.shape.rank() > 0 && matches!(node.op, crate::Op::Constant(_)) {
                errs.push(err(&node.scope, "constants are scalars".into()));
            }
            continue;
        }
        let operands = g.operands(id);
        let tys: Vec<_> = operands.iter().map(|&o| &pg[o].ty).collect();
        match node.op.infer(&tys) {
            Ok(ty) if ty == node.ty => {}
            Ok(ty) => errs.push(err(
                &node.scope,
                format!(
                    "{} is typed {} but its operands give {}",
                    node.op.mnemonic(),
                    node.ty,
                    ty
                ),
            )),
            Err(m) => errs.push(err(&node.scope, format!("{}: {m}", node.op.mnemonic()))),
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs)
    }
}
