//! `reuse-layers`: a model's identical layers are optimized once.
//!
//! A 16-layer model is 16 copies of one layer over different weights.
//! Saturating the whole graph rewrites each copy again; this pass cuts the
//! graph into regions, saturates and extracts one layer of each class of
//! identical layers (and the rest of the model once), and copies the
//! chosen layer into every layer of its class with that layer's weights.
//!
//! ```text
//! regions:  rest (embedding, head, loss, sources)   layer 0 … layer n−1
//! classes:  layers with the same key                 {0, 1, …, n−1}
//! optimize: rest, one layer per class (saturate, extract, fold norms)
//! splice:   from the outputs, each layer's copy of its class's choice
//!           (its parameters and scopes), common values merged
//! ```
//!
//! A node's layer is the first numeric segment of its scope
//! (`model.layers.3.self_attn/grad` is layer 3 of `model.layers`); nodes
//! without one (inputs, the embedding, the head, the loss) are the rest.
//! A region reads the values of other regions as inputs and gives the values
//! others read (or the graph's outputs) as outputs.
//!
//! Two layers are identical when their keys are: the region's nodes in
//! topological order, each with its op, its type, its scope and its
//! parameter's name relative to the layer (the layer's number replaced),
//! and its operands as local positions or input positions; the inputs'
//! types; which positions are outputs. Equal keys mean the two regions are
//! the same graph up to parameter names and scopes, so the choice made for
//! one is a choice for the other: the splice renames parameters position by
//! position, never by guessing from names.
//!
//! Proof that the result is equivalent to the input: each region's
//! optimized graph is equivalent to the region (the optimizer's own
//! guarantee, inputs held abstract), a copy with another layer's parameters
//! is that layer's region optimized (same key), and the splice connects
//! each copy's inputs to the values the original region read. Merging two
//! nodes with the same op over the same operands changes no value.
//!
//! What it gives up: a rewrite whose pattern spans two regions (none of the
//! e-graph rules does in the presets: attention, norms, DBA scores and
//! cache reads lie within a layer). Elementwise fusion runs after the
//! splice, over the whole graph, so chains across a layer's edge still
//! fuse. `every_model_optimizes_alike_by_layers` checks that every preset
//! and example gives the same graph both ways.

use super::{OptimizeError, Part, Stop};
use crate::optimize::Extraction;
use caramba_ir::{DType, Graph, NodeId, Op, Shape};
use std::collections::{BTreeMap, HashMap};

/// The pass's name, as reports and docs give it.
pub const NAME: &str = "reuse-layers";

/// How a graph's layers were grouped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reuse {
    /// Layers (their scope prefixes with numbers, `model.layers.3`).
    pub layers: usize,
    /// Classes of identical layers, each optimized once.
    pub classes: usize,
}

/// A region of the graph: one layer, or everything outside the layers.
struct Region {
    /// `model.layers.3` (empty for the rest).
    label: String,
    /// Its nodes, in the graph's topological order.
    nodes: Vec<NodeId>,
    /// Values of other regions it reads, in order of first use.
    inputs: Vec<NodeId>,
    /// Its values read elsewhere or given as graph outputs, in order.
    outputs: Vec<NodeId>,
}

/// The layer a scope belongs to: the prefix before its first numeric
/// segment and the number (`model.layers.3.mlp` → `("model.layers", 3)`).
/// A segment is read up to a `/` (`3/grad`).
pub fn layer_of(scope: &str) -> Option<(&str, usize)> {
    let mut at = 0;
    for seg in scope.split('.') {
        let head = seg.split('/').next().unwrap_or("");
        if !head.is_empty() && head.bytes().all(|b| b.is_ascii_digit()) {
            let prefix = scope[..at].trim_end_matches('.');
            return head.parse().ok().map(|n| (prefix, n));
        }
        at += seg.len() + 1;
    }
    None
}

/// `name` with its first numeric segment replaced by `to` (a parameter's
/// or scope's name in another layer).
fn with_layer(name: &str, to: &str) -> String {
    let mut out = Vec::new();
    let mut done = false;
    for seg in name.split('.') {
        let (head, tail) = seg.split_at(seg.find('/').unwrap_or(seg.len()));
        if !done && !head.is_empty() && head.bytes().all(|b| b.is_ascii_digit()) {
            out.push(format!("{to}{tail}"));
            done = true;
        } else {
            out.push(seg.to_string());
        }
    }
    out.join(".")
}

/// The rest and the layers of `g` (layers in order of first node).
fn regions(g: &Graph, order: &[NodeId]) -> (Region, Vec<Region>) {
    let mut home: HashMap<NodeId, usize> = HashMap::new();
    let mut labels: Vec<String> = vec![String::new()];
    let mut index: HashMap<String, usize> = HashMap::new();
    for &n in order {
        let r = match layer_of(&g.node(n).scope) {
            Some((prefix, k)) => {
                let label = format!("{prefix}.{k}");
                *index.entry(label.clone()).or_insert_with(|| {
                    labels.push(label);
                    labels.len() - 1
                })
            }
            None => 0,
        };
        home.insert(n, r);
    }
    let outputs: std::collections::HashSet<NodeId> =
        g.outputs().iter().map(|(_, id)| *id).collect();
    let mut regions: Vec<Region> = labels
        .into_iter()
        .map(|label| Region {
            label,
            nodes: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
        })
        .collect();
    for &n in order {
        let r = home[&n];
        regions[r].nodes.push(n);
        for o in g.operands(n) {
            if home[&o] != r && !regions[r].inputs.contains(&o) {
                regions[r].inputs.push(o);
            }
        }
        if outputs.contains(&n) || g.users(n).iter().any(|u| home[u] != r) {
            regions[r].outputs.push(n);
        }
    }
    let rest = regions.remove(0);
    (rest, regions)
}

/// What makes two layers the same graph (see the module's doc).
fn key(g: &Graph, r: &Region) -> String {
    use std::fmt::Write;
    let local: HashMap<NodeId, usize> = r.nodes.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let input: HashMap<NodeId, usize> = r.inputs.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let mut k = String::new();
    for &i in &r.inputs {
        let _ = writeln!(k, "in {}", g.node(i).ty);
    }
    for &n in &r.nodes {
        let node = g.node(n);
        let op = match &node.op {
            Op::Param { name } => format!("param {}", with_layer(name, "#")),
            op => format!("{op:?}"),
        };
        let refs: Vec<String> = g
            .operands(n)
            .iter()
            .map(|o| match local.get(o) {
                Some(l) => format!("%{l}"),
                None => format!("in{}", input[o]),
            })
            .collect();
        let _ = writeln!(
            k,
            "{op} ({}) : {} @ {}",
            refs.join(", "),
            node.ty,
            with_layer(&node.scope, "#")
        );
    }
    for o in &r.outputs {
        let _ = writeln!(k, "out %{}", local[o]);
    }
    k
}

/// The region as a graph of its own: inputs `%in{k}`, outputs `%out{k}`.
fn region_graph(g: &Graph, r: &Region) -> Result<Graph, OptimizeError> {
    let mut h = Graph::new(g.name.clone());
    let mut map: HashMap<NodeId, NodeId> = HashMap::new();
    for (k, &i) in r.inputs.iter().enumerate() {
        map.insert(i, h.input(&input_name(k), g.node(i).ty.clone())?);
    }
    for &n in &r.nodes {
        let ops: Vec<NodeId> = g.operands(n).iter().map(|o| map[o]).collect();
        map.insert(n, h.add_copy(g.node(n), &ops)?);
    }
    for (k, o) in r.outputs.iter().enumerate() {
        h.set_output(&output_name(k), map[o]);
    }
    Ok(h)
}

// `%` starts no name that lowering gives an input.
fn input_name(k: usize) -> String {
    format!("%in{k}")
}

fn output_name(k: usize) -> String {
    format!("%out{k}")
}

/// One region's copy of an optimized part.
struct Instance<'a> {
    region: &'a Region,
    /// Index into the optimized parts.
    part: usize,
    /// Parameter names of the part → this region's.
    params: HashMap<String, String>,
    /// The layer number to give scopes (`None`: the part's own region).
    layer: Option<String>,
}

/// Optimizes `g` by classes of identical layers, each region through
/// `optimize` (saturation, extraction, norm folding). `None` when no two
/// layers are identical: then there is nothing to reuse.
pub(crate) fn optimize(
    g: &Graph,
    optimize: impl Fn(&Graph) -> Result<Part, OptimizeError>,
) -> Result<Option<(Part, Reuse)>, OptimizeError> {
    let order = g.topo_order();
    let (rest, layers) = regions(g, &order);
    let mut classes: Vec<(String, Vec<usize>)> = Vec::new();
    let mut by_key: HashMap<String, usize> = HashMap::new();
    for (i, r) in layers.iter().enumerate() {
        let k = key(g, r);
        match by_key.get(&k) {
            Some(&c) => classes[c].1.push(i),
            None => {
                by_key.insert(k.clone(), classes.len());
                classes.push((k, vec![i]));
            }
        }
    }
    if classes.iter().all(|(_, members)| members.len() < 2) {
        return Ok(None);
    }
    // Part 0 is the rest; part 1 + c is class c's first layer.
    let mut parts = vec![optimize(&region_graph(g, &rest)?)?];
    let mut instances = vec![Instance {
        region: &rest,
        part: 0,
        params: HashMap::new(),
        layer: None,
    }];
    for (c, (_, members)) in classes.iter().enumerate() {
        let first = &layers[members[0]];
        parts.push(optimize(&region_graph(g, first)?)?);
        for &m in members {
            let r = &layers[m];
            let params = first
                .nodes
                .iter()
                .zip(&r.nodes)
                .filter_map(|(&a, &b)| match (&g.node(a).op, &g.node(b).op) {
                    (Op::Param { name: x }, Op::Param { name: y }) => Some((x.clone(), y.clone())),
                    _ => None,
                })
                .collect();
            let layer = (m != members[0])
                .then(|| layer_of(&r.label).map(|(_, k)| k.to_string()))
                .flatten();
            instances.push(Instance {
                region: r,
                part: 1 + c,
                params,
                layer,
            });
        }
    }
    let spliced = splice(g, &parts, &instances)?;
    let mut applied: BTreeMap<&'static str, usize> = BTreeMap::new();
    for inst in &instances {
        for (&rule, &n) in &parts[inst.part].applied {
            *applied.entry(rule).or_default() += n;
        }
    }
    let mut rejected: Vec<String> = Vec::new();
    for p in &parts {
        for r in &p.rejected {
            if !rejected.contains(r) {
                rejected.push(r.clone());
            }
        }
    }
    let stop = parts
        .iter()
        .map(|p| p.stop.clone())
        .find(|s| *s != Stop::Saturated)
        .unwrap_or(Stop::Saturated);
    let extraction = if parts.iter().any(|p| p.extraction == Extraction::Tree) {
        Extraction::Tree
    } else {
        Extraction::Dag {
            visits: parts
                .iter()
                .map(|p| match p.extraction {
                    Extraction::Dag { visits } => visits,
                    Extraction::Tree => 0,
                })
                .max()
                .unwrap_or(0),
        }
    };
    let part = Part {
        graph: spliced.0,
        fused: spliced.1,
        applied,
        rejected,
        stop,
        iterations: parts.iter().map(|p| p.iterations).max().unwrap_or(0),
        extraction,
        egraph_nodes: parts.iter().map(|p| p.egraph_nodes).sum(),
        egraph_classes: parts.iter().map(|p| p.egraph_classes).sum(),
    };
    let reuse = Reuse {
        layers: layers.len(),
        classes: classes.len(),
    };
    Ok(Some((part, reuse)))
}

/// A node of one instance's copy of its part.
type Virtual = (usize, NodeId);

/// Builds the optimized graph from the outputs of `g`, depth first with
/// operands in order (as extraction builds a graph), each instance's nodes
/// copied from its part, each region input taken from the instance that
/// gives it, and nodes with the same op over the same operands built once.
/// Returns the graph and its fused nodes' rules.
#[allow(clippy::type_complexity)]
fn splice(
    g: &Graph,
    parts: &[Part],
    instances: &[Instance<'_>],
) -> Result<(Graph, BTreeMap<NodeId, Vec<&'static str>>), OptimizeError> {
    // Which instance and output gives each region output.
    let mut gives: HashMap<NodeId, Virtual> = HashMap::new();
    for (i, inst) in instances.iter().enumerate() {
        let pg = &parts[inst.part].graph;
        for (k, &o) in inst.region.outputs.iter().enumerate() {
            let id = pg
                .output(&output_name(k))
                .expect("every region output is kept");
            gives.insert(o, (i, id));
        }
    }
    // A region input's node stands for the value another instance gives.
    let resolve = |mut v: Virtual| -> Virtual {
        loop {
            let inst = &instances[v.0];
            match &parts[inst.part].graph.node(v.1).op {
                Op::Input { name } if name.starts_with("%in") => {
                    let k: usize = name[3..].parse().expect("a region input's name");
                    v = gives[&inst.region.inputs[k]];
                }
                _ => return v,
            }
        }
    };
    let mut h = Graph::new(g.name.clone());
    let mut built: HashMap<Virtual, NodeId> = HashMap::new();
    let mut same: HashMap<(Op, Option<(DType, Shape)>, Vec<NodeId>), NodeId> = HashMap::new();
    for (name, out) in g.outputs() {
        let root = resolve(gives[out]);
        let mut stack = vec![(root, false)];
        while let Some((v, expanded)) = stack.pop() {
            if built.contains_key(&v) {
                continue;
            }
            let inst = &instances[v.0];
            let pg = &parts[inst.part].graph;
            let operands: Vec<Virtual> = pg
                .operands(v.1)
                .into_iter()
                .map(|o| resolve((v.0, o)))
                .collect();
            if !expanded {
                stack.push((v, true));
                for &o in operands.iter().rev() {
                    if !built.contains_key(&o) {
                        stack.push((o, false));
                    }
                }
                continue;
            }
            let node = pg.node(v.1);
            let op = match &node.op {
                Op::Param { name } => Op::Param {
                    name: inst
                        .params
                        .get(name)
                        .cloned()
                        .unwrap_or_else(|| name.clone()),
                },
                op => op.clone(),
            };
            let scope = match &inst.layer {
                Some(k) if layer_of(&node.scope).is_some() => with_layer(&node.scope, k),
                _ => node.scope.clone(),
            };
            let ops: Vec<NodeId> = operands.iter().map(|o| built[o]).collect();
            let decl = op
                .is_source()
                .then(|| (node.ty.dtype, node.ty.shape.clone()));
            let key = (op, decl, ops);
            let id = match same.get(&key) {
                Some(&id) => id,
                None => {
                    let copy = caramba_ir::Node {
                        op: key.0.clone(),
                        ty: node.ty.clone(),
                        scope,
                    };
                    let id = h.add_copy(&copy, &key.2)?;
                    same.insert(key, id);
                    id
                }
            };
            built.insert(v, id);
        }
        h.set_output(name, built[&root]);
    }
    let mut fused = BTreeMap::new();
    for (i, inst) in instances.iter().enumerate() {
        for (n, rules) in &parts[inst.part].fused {
            if let Some(&id) = built.get(&(i, *n)) {
                fused.insert(id, rules.clone());
            }
        }
    }
    Ok((h, fused))
}
