//! Rules as data, and the saturation loop that applies them.
//!
//! A [`Rule`] has a stable kebab-case name and a search function: given an
//! e-class, it returns the equivalent terms it can build there, each as a
//! [`Recipe`] of new nodes over existing classes. Searching reads the e-graph
//! only; the loop then type-checks each recipe against the class types (a
//! recipe that does not type is dropped and counted as a rule bug), adds it,
//! and unions it with the matched class. Rules that need shape conditions
//! read them from the type analysis.
//!
//! The loop stops at saturation (an iteration that changes nothing) or at a
//! node, iteration or time limit, and says which. It does not extract.

use super::lang::{ENode, EG};
use caramba_ir::{DType, Op, Shape, TensorType};
use egg::Id;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// A rewrite rule.
pub struct Rule {
    /// Stable name: it appears in reports, plans and snapshots.
    pub name: &'static str,
    /// The terms equivalent to the class `id` that this rule can build.
    pub search: fn(&EG, Id) -> Vec<Recipe>,
}

/// An operand of a recipe node: an existing class or an earlier new node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ref {
    Class(Id),
    New(usize),
}

/// New nodes to add, in order, and the term equivalent to the matched class.
#[derive(Clone, Debug)]
pub struct Recipe {
    nodes: Vec<(ENode, Vec<Ref>)>,
    root: Option<Ref>,
    /// Classes whose provenance the result inherits (e.g. the scores another
    /// rule formed), so a fused node lists every rule that built it.
    pub inherit: Vec<Id>,
}

impl Recipe {
    pub fn new() -> Recipe {
        Recipe {
            nodes: Vec::new(),
            root: None,
            inherit: Vec::new(),
        }
    }

    /// The matched class equals an existing one.
    pub fn existing(id: Id) -> Recipe {
        let mut r = Recipe::new();
        r.root = Some(Ref::Class(id));
        r
    }

    pub fn node(&mut self, op: Op, args: &[Ref]) -> Ref {
        self.nodes.push((ENode::new(op, Vec::new()), args.to_vec()));
        let r = Ref::New(self.nodes.len() - 1);
        self.root = Some(r);
        r
    }

    pub fn constant(&mut self, v: f64, dtype: DType) -> Ref {
        let mut n = ENode::new(Op::Constant(caramba_ir::Scalar(v)), Vec::new());
        n.decl = Some((dtype, Shape::scalar()));
        self.nodes.push((n, Vec::new()));
        Ref::New(self.nodes.len() - 1)
    }

    /// Ends the recipe with `r` as the result.
    pub fn result(mut self, r: Ref) -> Recipe {
        self.root = Some(r);
        self
    }

    /// The types of the new nodes, or why one does not type.
    fn types(&self, eg: &EG) -> Result<Vec<TensorType>, String> {
        let mut tys: Vec<TensorType> = Vec::with_capacity(self.nodes.len());
        for (n, args) in &self.nodes {
            let ty = match &n.decl {
                Some((d, s)) => TensorType::new(*d, s.clone()),
                None => {
                    let xs: Vec<&TensorType> = args
                        .iter()
                        .map(|a| match *a {
                            Ref::Class(c) => &eg[c].data.ty,
                            Ref::New(i) => &tys[i],
                        })
                        .collect();
                    n.op.infer(&xs)
                        .map_err(|e| format!("{}: {e}", n.op.mnemonic()))?
                }
            };
            tys.push(ty);
        }
        Ok(tys)
    }

    /// The type of the result, or why the recipe does not type.
    fn result_type(&self, eg: &EG) -> Result<TensorType, String> {
        let mut tys = self.types(eg)?;
        match self.root.ok_or("a recipe without a result")? {
            Ref::Class(c) => Ok(eg[c].data.ty.clone()),
            Ref::New(i) => Ok(tys.swap_remove(i)),
        }
    }

    /// Adds the new nodes; returns the result's class and the new classes.
    fn add(&self, eg: &mut EG, scope: &str) -> (Id, Vec<Id>) {
        let mut ids: Vec<Id> = Vec::with_capacity(self.nodes.len());
        for (n, args) in &self.nodes {
            let mut n = n.clone();
            n.children = args
                .iter()
                .map(|a| match *a {
                    Ref::Class(c) => c,
                    Ref::New(i) => ids[i],
                })
                .collect();
            let id = eg.add(n);
            if eg[id].data.scope.is_empty() {
                eg[id].data.scope = scope.to_string();
            }
            ids.push(id);
        }
        let root = match self.root.expect("a recipe has a result") {
            Ref::Class(c) => c,
            Ref::New(i) => ids[i],
        };
        (root, ids)
    }
}

impl Default for Recipe {
    fn default() -> Self {
        Recipe::new()
    }
}

/// Bounds on saturation.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_nodes: usize,
    pub max_iterations: usize,
    pub max_time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_nodes: 200_000,
            max_iterations: 30,
            max_time: Duration::from_millis(1500),
        }
    }
}

/// Why saturation stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stop {
    Saturated,
    NodeLimit,
    IterationLimit,
    TimeLimit,
}

/// What saturation did.
#[derive(Clone, Debug)]
pub struct Saturation {
    pub stop: Stop,
    pub iterations: usize,
    /// Rule name → number of applications that changed the e-graph.
    pub applied: BTreeMap<&'static str, usize>,
    /// Recipes that did not type: a rule bug, `rule: reason`.
    pub rejected: Vec<String>,
    /// Per class (canonical after the run), the rules that formed it.
    pub provenance: HashMap<Id, BTreeSet<&'static str>>,
}

/// Applies `rules` to `eg` until saturation or a limit.
pub fn saturate(eg: &mut EG, rules: &[&Rule], limits: &Limits) -> Saturation {
    let start = Instant::now();
    let mut out = Saturation {
        stop: Stop::IterationLimit,
        iterations: 0,
        applied: BTreeMap::new(),
        rejected: Vec::new(),
        provenance: HashMap::new(),
    };
    for _ in 0..limits.max_iterations {
        if eg.total_number_of_nodes() > limits.max_nodes {
            out.stop = Stop::NodeLimit;
            break;
        }
        if start.elapsed() > limits.max_time {
            out.stop = Stop::TimeLimit;
            break;
        }
        out.iterations += 1;
        let classes: Vec<Id> = eg.classes().map(|c| c.id).collect();
        let mut found: Vec<(&Rule, Id, Recipe)> = Vec::new();
        for rule in rules {
            for &c in &classes {
                for r in (rule.search)(eg, c) {
                    found.push((rule, c, r));
                }
            }
        }
        let mut changed = false;
        for (rule, c, recipe) in found {
            match recipe.result_type(eg) {
                Ok(ty) if ty == eg[c].data.ty => {}
                Ok(ty) => {
                    out.rejected.push(format!(
                        "{}: builds {ty} for a class of type {}",
                        rule.name, eg[c].data.ty
                    ));
                    continue;
                }
                Err(why) => {
                    out.rejected.push(format!("{}: {why}", rule.name));
                    continue;
                }
            }
            let scope = eg[c].data.scope.clone();
            let before = eg.total_number_of_nodes();
            let (root, _) = recipe.add(eg, &scope);
            let merged = eg.union(c, root);
            if merged || eg.total_number_of_nodes() != before {
                changed = true;
                *out.applied.entry(rule.name).or_default() += 1;
                let mut set: BTreeSet<&'static str> = BTreeSet::from([rule.name]);
                for &i in &recipe.inherit {
                    set.extend(provenance_of(eg, &out.provenance, i));
                }
                out.provenance.entry(eg.find(c)).or_default().extend(set);
            }
        }
        eg.rebuild();
        canonicalize(eg, &mut out.provenance);
        if !changed {
            out.stop = Stop::Saturated;
            break;
        }
    }
    out
}

/// The rules that formed class `id` (keys may be stale until canonicalized).
pub fn provenance_of(
    eg: &EG,
    prov: &HashMap<Id, BTreeSet<&'static str>>,
    id: Id,
) -> BTreeSet<&'static str> {
    let id = eg.find(id);
    prov.iter()
        .filter(|(k, _)| eg.find(**k) == id)
        .flat_map(|(_, v)| v.iter().copied())
        .collect()
}

fn canonicalize(eg: &EG, prov: &mut HashMap<Id, BTreeSet<&'static str>>) {
    let old = std::mem::take(prov);
    for (k, v) in old {
        prov.entry(eg.find(k)).or_default().extend(v);
    }
}
