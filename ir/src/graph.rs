//! The dataflow graph: nodes are ops with their types, edges carry operand
//! positions. Construction type-checks every node as it is added.

use crate::op::{Op, Scalar};
use crate::types::{DType, Shape, TensorType};
use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use std::collections::{BTreeMap, BinaryHeap};

pub type NodeId = NodeIndex<u32>;

/// One operation with the type of the value it produces.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    pub ty: TensorType,
    /// Where the node came from (a parameter prefix such as
    /// `model.layers.3.self_attn`); used by plans, traces and diagnostics.
    pub scope: String,
}

/// An error found while building or verifying a graph.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{scope}: {message}")]
pub struct IrError {
    pub scope: String,
    pub message: String,
}

/// A typed dataflow graph with named outputs.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub name: String,
    g: StableDiGraph<Node, u32>,
    outputs: Vec<(String, NodeId)>,
    params: BTreeMap<String, NodeId>,
    inputs: BTreeMap<String, NodeId>,
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Graph {
        Graph {
            name: name.into(),
            ..Graph::default()
        }
    }

    /// A per-call input. Asking twice for one name returns the same node.
    pub fn input(&mut self, name: &str, ty: TensorType) -> Result<NodeId, IrError> {
        if let Some(&id) = self.inputs.get(name) {
            return self.same_type(id, &ty, "input", name);
        }
        let id = self.g.add_node(Node {
            op: Op::Input {
                name: name.to_string(),
            },
            ty,
            scope: String::new(),
        });
        self.inputs.insert(name.to_string(), id);
        Ok(id)
    }

    /// A named parameter. Asking again for a name returns the same node, which
    /// is how weights are shared (tied embeddings, cyclic topologies).
    pub fn param(&mut self, name: &str, ty: TensorType, scope: &str) -> Result<NodeId, IrError> {
        if let Some(&id) = self.params.get(name) {
            return self.same_type(id, &ty, "parameter", name);
        }
        let id = self.g.add_node(Node {
            op: Op::Param {
                name: name.to_string(),
            },
            ty,
            scope: scope.to_string(),
        });
        self.params.insert(name.to_string(), id);
        Ok(id)
    }

    fn same_type(
        &self,
        id: NodeId,
        ty: &TensorType,
        what: &str,
        name: &str,
    ) -> Result<NodeId, IrError> {
        if &self.g[id].ty == ty {
            Ok(id)
        } else {
            Err(IrError {
                scope: self.g[id].scope.clone(),
                message: format!(
                    "{what} {name:?} is used as {ty} but was declared as {}",
                    self.g[id].ty
                ),
            })
        }
    }

    /// A scalar constant.
    pub fn constant(&mut self, value: f64, dtype: DType, scope: &str) -> NodeId {
        self.g.add_node(Node {
            op: Op::Constant(Scalar(value)),
            ty: TensorType::new(dtype, Shape::scalar()),
            scope: scope.to_string(),
        })
    }

    /// Adds a non-source op, inferring and checking its type.
    pub fn add(&mut self, op: Op, operands: &[NodeId], scope: &str) -> Result<NodeId, IrError> {
        if op.is_source() {
            return Err(IrError {
                scope: scope.to_string(),
                message: format!("{} is a source; use input/param/constant", op.mnemonic()),
            });
        }
        let tys: Vec<&TensorType> = operands.iter().map(|&o| &self.g[o].ty).collect();
        let ty = op.infer(&tys).map_err(|message| IrError {
            scope: scope.to_string(),
            message,
        })?;
        let id = self.g.add_node(Node {
            op,
            ty,
            scope: scope.to_string(),
        });
        for (i, &o) in operands.iter().enumerate() {
            self.g.add_edge(o, id, i as u32);
        }
        Ok(id)
    }

    /// Marks `id` as the output called `name`.
    pub fn set_output(&mut self, name: &str, id: NodeId) {
        self.outputs.retain(|(n, _)| n != name);
        self.outputs.push((name.to_string(), id));
    }

    /// Drops the output called `name` (its nodes stay until
    /// [`Graph::remove_dead`]); returns the node it named.
    pub fn remove_output(&mut self, name: &str) -> Option<NodeId> {
        let at = self.outputs.iter().position(|(n, _)| n == name)?;
        Some(self.outputs.remove(at).1)
    }

    pub fn outputs(&self) -> &[(String, NodeId)] {
        &self.outputs
    }

    pub fn output(&self, name: &str) -> Option<NodeId> {
        self.outputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.g[id]
    }

    pub fn node_count(&self) -> usize {
        self.g.node_count()
    }

    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.g.node_indices()
    }

    /// Operands of `id` in position order.
    pub fn operands(&self, id: NodeId) -> Vec<NodeId> {
        let mut es: Vec<(u32, NodeId)> = self
            .g
            .edges_directed(id, Direction::Incoming)
            .map(|e| (*e.weight(), e.source()))
            .collect();
        es.sort_by_key(|(i, _)| *i);
        es.into_iter().map(|(_, s)| s).collect()
    }

    /// Whether `user` reads `x` as `matmul` reads its operands (so a swap
    /// of `x`'s last two axes can be read through strides): any operand of
    /// a `matmul`; a fused projection's weight operand
    /// ([`crate::Op::weight_operand`]) when `x` is no earlier operand too.
    pub fn reads_as_matrix(&self, user: NodeId, x: NodeId) -> bool {
        let op = &self.node(user).op;
        *op == crate::Op::MatMul
            || op.weight_operand().is_some_and(|i| {
                let operands = self.operands(user);
                operands[i] == x && !operands[..i].contains(&x)
            })
    }

    /// Nodes that use `id`, each once.
    pub fn users(&self, id: NodeId) -> Vec<NodeId> {
        let mut us: Vec<NodeId> = self.g.neighbors_directed(id, Direction::Outgoing).collect();
        us.sort();
        us.dedup();
        us
    }

    /// Parameters by name, sorted.
    pub fn params(&self) -> impl Iterator<Item = (&str, NodeId)> + '_ {
        self.params.iter().map(|(n, &id)| (n.as_str(), id))
    }

    pub fn param_id(&self, name: &str) -> Option<NodeId> {
        self.params.get(name).copied()
    }

    /// Per-call inputs by name, sorted.
    pub fn inputs(&self) -> impl Iterator<Item = (&str, NodeId)> + '_ {
        self.inputs.iter().map(|(n, &id)| (n.as_str(), id))
    }

    /// Total number of parameter elements.
    pub fn param_count(&self) -> usize {
        self.params
            .values()
            .map(|&id| self.g[id].ty.shape.numel().unwrap_or(0))
            .sum()
    }

    /// A deterministic topological order: among ready nodes, the one added
    /// first goes first, so the order follows construction order.
    pub fn topo_order(&self) -> Vec<NodeId> {
        let mut indeg: BTreeMap<NodeId, usize> = self
            .g
            .node_indices()
            .map(|n| (n, self.g.edges_directed(n, Direction::Incoming).count()))
            .collect();
        let mut ready: BinaryHeap<std::cmp::Reverse<NodeId>> = indeg
            .iter()
            .filter(|(_, &d)| d == 0)
            .map(|(&n, _)| std::cmp::Reverse(n))
            .collect();
        let mut order = Vec::with_capacity(indeg.len());
        while let Some(std::cmp::Reverse(n)) = ready.pop() {
            order.push(n);
            for e in self.g.edges_directed(n, Direction::Outgoing) {
                let d = indeg.get_mut(&e.target()).expect("edge target is a node");
                *d -= 1;
                if *d == 0 {
                    ready.push(std::cmp::Reverse(e.target()));
                }
            }
        }
        order
    }

    /// Removes nodes no output depends on (parameters included: a parameter
    /// nothing reads is not part of the model).
    pub fn remove_dead(&mut self) -> usize {
        let mut live = std::collections::HashSet::new();
        let mut stack: Vec<NodeId> = self.outputs.iter().map(|(_, id)| *id).collect();
        while let Some(n) = stack.pop() {
            if live.insert(n) {
                stack.extend(self.g.neighbors_directed(n, Direction::Incoming));
            }
        }
        let dead: Vec<NodeId> = self
            .g
            .node_indices()
            .filter(|n| !live.contains(n))
            .collect();
        for &n in &dead {
            self.g.remove_node(n);
        }
        self.params.retain(|_, id| live.contains(id));
        self.inputs.retain(|_, id| live.contains(id));
        dead.len()
    }

    /// The nodes of `order` (a topological order) computed from
    /// parameters and constants alone: not sources, with operands that are
    /// all parameters, constants or such nodes (a stack of weights, a
    /// transposed weight). What a model whose weights never change can
    /// compute once.
    pub fn weight_only(&self, order: &[NodeId]) -> std::collections::HashSet<NodeId> {
        let mut only = std::collections::HashSet::new();
        for &id in order {
            let operands = self.operands(id);
            let from_weights = operands.iter().all(|o| {
                only.contains(o) || matches!(self.node(*o).op, Op::Param { .. } | Op::Constant(_))
            });
            if !self.node(id).op.is_source() && !operands.is_empty() && from_weights {
                only.insert(id);
            }
        }
        only
    }

    /// A copy of `n` (a node of another graph) reading `operands`, for
    /// passes that rebuild a graph: sources are declared again by name (a
    /// parameter asked for twice is the same node), other ops added.
    pub fn add_copy(&mut self, n: &Node, operands: &[NodeId]) -> Result<NodeId, IrError> {
        Ok(match &n.op {
            Op::Input { name } => self.input(name, n.ty.clone())?,
            Op::Param { name } => self.param(name, n.ty.clone(), &n.scope)?,
            Op::Constant(v) => self.constant(v.0, n.ty.dtype, &n.scope),
            op => self.add(op.clone(), operands, &n.scope)?,
        })
    }

    /// A copy of this graph with some nodes replaced, for passes that fuse:
    /// in topological order, each node not in `skip` (nodes absorbed into
    /// a replacement) is either built by `replace(out, id, map)`, which
    /// returns `Some(new)` (`map` holds the new id of every node before
    /// it), or, on `None`, copied as it is. Outputs keep their names.
    /// Returns the graph and each kept node's new id.
    pub fn rebuilt(
        &self,
        skip: &std::collections::HashSet<NodeId>,
        mut replace: impl FnMut(
            &mut Graph,
            NodeId,
            &std::collections::HashMap<NodeId, NodeId>,
        ) -> Result<Option<NodeId>, IrError>,
    ) -> Result<(Graph, std::collections::HashMap<NodeId, NodeId>), IrError> {
        let mut out = Graph::new(self.name.clone());
        let mut map = std::collections::HashMap::new();
        for id in self.topo_order() {
            if skip.contains(&id) {
                continue;
            }
            let new = match replace(&mut out, id, &map)? {
                Some(new) => new,
                None => {
                    let xs: Vec<NodeId> = self.operands(id).iter().map(|o| map[o]).collect();
                    out.add_copy(self.node(id), &xs)?
                }
            };
            map.insert(id, new);
        }
        for (name, id) in self.outputs() {
            out.set_output(name, map[id]);
        }
        Ok((out, map))
    }

    /// The underlying petgraph, for passes that need graph algorithms.
    pub fn petgraph(&self) -> &StableDiGraph<Node, u32> {
        &self.g
    }
}
