//! The e-graph language of the IR and the conversions in and out of it.
//!
//! An e-node is an [`Op`] with its operand e-classes: the op enum itself is
//! the language, so adding a variant needs nothing here. Sources (inputs,
//! parameters, constants) also carry their declared type, because a source's
//! type is not inferred from operands and a constant's dtype is not in its op
//! (`const 1.0 : f32` and `const 1.0 : f16` are different values).
//!
//! Types ride along as the e-class analysis ([`ClassData`]): every class has
//! the [`TensorType`] its op infers, and a merge of two classes of different
//! types is a broken rule, reported by a panic naming both types. The
//! analysis also records a constant's value (for rule conditions) and the
//! scope of the first node seen (for plans and the text form).
//!
//! It stops at conversion: rules live in their own files, extraction's cost
//! model in `cost.rs`.

use caramba_ir::{DType, Graph, IrError, NodeId, Op, Shape, TensorType};
use egg::{Analysis, DidMerge, Id, Language};
use std::collections::HashMap;
use std::fmt;

/// One e-node: an op over operand classes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ENode {
    pub op: Op,
    /// The declared type of a source; `None` for every other op.
    pub decl: Option<(DType, Shape)>,
    pub children: Vec<Id>,
}

impl ENode {
    pub fn new(op: Op, children: Vec<Id>) -> ENode {
        ENode {
            op,
            decl: None,
            children,
        }
    }
}

impl Language for ENode {
    type Discriminant = std::mem::Discriminant<Op>;

    fn discriminant(&self) -> Self::Discriminant {
        std::mem::discriminant(&self.op)
    }

    fn matches(&self, other: &Self) -> bool {
        self.op == other.op
            && self.decl == other.decl
            && self.children.len() == other.children.len()
    }

    fn children(&self) -> &[Id] {
        &self.children
    }

    fn children_mut(&mut self) -> &mut [Id] {
        &mut self.children
    }
}

impl fmt::Display for ENode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.op.mnemonic())?;
        let attrs = self.op.attrs();
        if !attrs.is_empty() {
            write!(f, " {attrs}")?;
        }
        Ok(())
    }
}

/// What every e-class knows about its value.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassData {
    pub ty: TensorType,
    /// The value, when the class holds a scalar constant.
    pub konst: Option<f64>,
    /// The scope of the first node that formed the class.
    pub scope: String,
}

impl ClassData {
    /// The constant value when the class is a constant with a single element
    /// (so multiplying by it never changes a shape it broadcasts against).
    pub fn scalar(&self) -> Option<f64> {
        let single = self
            .ty
            .shape
            .dims()
            .iter()
            .all(|d| *d == caramba_ir::Dim::Const(1));
        self.konst.filter(|_| single)
    }
}

/// The type analysis.
#[derive(Clone, Debug, Default)]
pub struct Types;

pub type EG = egg::EGraph<ENode, Types>;

impl Analysis<ENode> for Types {
    type Data = ClassData;

    fn make(egraph: &mut EG, enode: &ENode, _id: Id) -> ClassData {
        if let Some((dtype, shape)) = &enode.decl {
            let konst = match enode.op {
                Op::Constant(v) => Some(v.0),
                _ => None,
            };
            return ClassData {
                ty: TensorType::new(*dtype, shape.clone()),
                konst,
                scope: String::new(),
            };
        }
        let tys: Vec<&TensorType> = enode.children.iter().map(|&c| &egraph[c].data.ty).collect();
        let ty = enode.op.infer(&tys).unwrap_or_else(|e| {
            panic!("ill-typed e-node {enode} (rules check types before adding nodes): {e}")
        });
        ClassData {
            ty,
            konst: None,
            scope: String::new(),
        }
    }

    fn merge(&mut self, a: &mut ClassData, b: ClassData) -> DidMerge {
        assert_eq!(
            a.ty, b.ty,
            "a rewrite merged values of different types: {} and {}",
            a.ty, b.ty
        );
        let mut changed = false;
        if a.konst.is_none() && b.konst.is_some() {
            a.konst = b.konst;
            changed = true;
        }
        if a.scope.is_empty() && !b.scope.is_empty() {
            a.scope = b.scope.clone();
            changed = true;
        }
        let b_changed = a.konst != b.konst || a.scope != b.scope;
        DidMerge(changed, b_changed)
    }
}

/// A graph in an e-graph: the classes of its outputs, and the declared
/// inputs and parameters so extraction keeps their names.
pub struct Loaded {
    pub egraph: EG,
    pub outputs: Vec<(String, Id)>,
    pub name: String,
}

/// Adds every node of `g` to a fresh e-graph (common subexpressions merge as
/// they are added).
pub fn load(g: &Graph) -> Loaded {
    let mut eg = EG::new(Types);
    let mut ids: HashMap<NodeId, Id> = HashMap::new();
    for n in g.topo_order() {
        let node = g.node(n);
        let children = g.operands(n).iter().map(|o| ids[o]).collect();
        let decl = node
            .op
            .is_source()
            .then(|| (node.ty.dtype, node.ty.shape.clone()));
        let id = eg.add(ENode {
            op: node.op.clone(),
            decl,
            children,
        });
        if eg[id].data.scope.is_empty() {
            eg[id].data.scope = node.scope.clone();
        }
        ids.insert(n, id);
    }
    eg.rebuild();
    let outputs = g
        .outputs()
        .iter()
        .map(|(name, id)| (name.clone(), eg.find(ids[id])))
        .collect();
    Loaded {
        egraph: eg,
        outputs,
        name: g.name.clone(),
    }
}

/// Builds a graph from the chosen node of every class the outputs reach, in
/// depth-first post-order from the outputs (operands in order), so the
/// result is deterministic. Returns the graph and the class of each node.
pub fn extract(
    l: &Loaded,
    choose: impl Fn(Id) -> ENode,
) -> Result<(Graph, HashMap<NodeId, Id>), IrError> {
    let eg = &l.egraph;
    let mut g = Graph::new(l.name.clone());
    let mut built: HashMap<Id, NodeId> = HashMap::new();
    let mut class_of = HashMap::new();
    let mut open: std::collections::HashSet<Id> = Default::default();
    // An explicit stack: (class, operands already pushed).
    for (name, out) in &l.outputs {
        let mut stack = vec![(eg.find(*out), false)];
        while let Some((c, expanded)) = stack.pop() {
            if built.contains_key(&c) {
                continue;
            }
            let node = choose(c);
            if !expanded {
                // Positive costs make the chosen terms acyclic; say so if not.
                assert!(open.insert(c), "extraction chose a cycle through {}", node);
                stack.push((c, true));
                for &ch in node.children.iter().rev() {
                    let ch = eg.find(ch);
                    if !built.contains_key(&ch) {
                        stack.push((ch, false));
                    }
                }
                continue;
            }
            let data = &eg[c].data;
            let operands: Vec<NodeId> = node
                .children
                .iter()
                .map(|ch| built[&eg.find(*ch)])
                .collect();
            let id = match &node.op {
                Op::Input { name } => g.input(name, data.ty.clone())?,
                Op::Param { name } => g.param(name, data.ty.clone(), &data.scope)?,
                Op::Constant(v) => g.constant(v.0, data.ty.dtype, &data.scope),
                op => g.add(op.clone(), &operands, &data.scope)?,
            };
            built.insert(c, id);
            class_of.insert(id, c);
        }
        g.set_output(name, built[&eg.find(*out)]);
    }
    Ok((g, class_of))
}
