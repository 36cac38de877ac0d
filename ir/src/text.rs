//! The deterministic text form: one line per node in topological order,
//! numbered densely, with its type and scope.
//!
//! ```text
//! %4 = matmul %2, %3 : f32[B, T, 512]  @ model.layers.0.self_attn
//! ```

use crate::graph::{Graph, NodeId};
use std::collections::HashMap;
use std::fmt::Write;

pub fn to_text(g: &Graph) -> String {
    let order = g.topo_order();
    let num: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "graph {:?} {{  // {} nodes, {} parameter tensors, {} parameters",
        g.name,
        g.node_count(),
        g.params().count(),
        g.param_count()
    );
    for &id in &order {
        let node = g.node(id);
        let _ = write!(s, "  %{} = {}", num[&id], node.op.mnemonic());
        let attrs = node.op.attrs();
        if !attrs.is_empty() {
            let _ = write!(s, " {attrs}");
        }
        let operands = g.operands(id);
        for (i, o) in operands.iter().enumerate() {
            let _ = write!(s, "{}%{}", if i == 0 { " " } else { ", " }, num[o]);
        }
        let _ = write!(s, " : {}", node.ty);
        if !node.scope.is_empty() {
            let _ = write!(s, "  @ {}", node.scope);
        }
        s.push('\n');
    }
    let outs: Vec<String> = g
        .outputs()
        .iter()
        .map(|(n, id)| format!("{n}=%{}", num[id]))
        .collect();
    let _ = writeln!(s, "  return {}", outs.join(", "));
    s.push_str("}\n");
    s
}
