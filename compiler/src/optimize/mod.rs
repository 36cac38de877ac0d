//! The optimize stage: an IR graph in, an equivalent cheaper graph out, with
//! a report of which rules formed each fused node.
//!
//! ```text
//! Graph ─ merge_projections ─ layers: per region (the rest, one layer per class)
//!         lang::load ─ rule::saturate(rules) ─ extract::dag(cost) ─ norm_matmul::fold
//!         ─ rope_matmul::fuse ─ splice ─ elementwise::fuse ─ verify ─ Graph
//! ```
//!
//! Rules are grouped by family, one file each: `algebra` (layout and
//! identity cleanup), `rmsnorm`, `attention`, `dba`, `kv`, `precision`
//! (half-precision values read where lowering widened them), `row_dot`
//! (a row's dot product read in place); `norm_matmul` (a norm folded
//! into the one product that reads it), `rope_matmul` (RoPE into the
//! epilogue of the product whose columns it rotates) and `elementwise` run
//! after extraction. Every rule has a property test in `tests.rs` that
//! evaluates both sides with the reference interpreter. Training graphs
//! meet this module twice more around differentiation: `fuse_for_training`
//! (this stage with the attention and RMSNorm rules only) before it, and `reuse_lse`,
//! a deterministic graph pass, after it.
//!
//! Identical layers are optimized once (`layers.rs`, on by default,
//! `Options::reuse_layers`): the graph is cut into its layers and the rest;
//! the rest and one layer of each class of identical layers go through
//! saturation, extraction and norm folding; the chosen layer is copied into
//! every layer of its class; elementwise fusion then runs over the whole
//! graph. It gives the graph that saturating the whole model gives
//! (`every_model_optimizes_alike_by_layers`) from e-graphs of a layer's
//! size. It stops at the IR: scheduling and kernels come after.

pub mod algebra;
pub mod attention;
pub mod cost;
pub mod dba;
pub mod elementwise;
pub mod extract;
pub mod fold_weights;
pub mod kv;
pub mod lang;
pub mod layers;
pub mod linear_ce;
pub mod merge_projections;
pub mod norm_matmul;
pub mod precision;
pub mod recompute;
pub mod reuse_lse;
pub mod rmsnorm;
pub mod rope_matmul;
pub mod row_dot;
pub mod rule;
#[cfg(test)]
mod tests;

pub use fold_weights::{fold_weights, FoldError, Folded};
pub use merge_projections::merge_projections;
pub use recompute::recompute_layers;
pub use reuse_lse::reuse_attention_lse;
pub use rule::{Limits, Rule, Stop};

use caramba_ir::{Graph, IrError, NodeId, Op};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Every e-graph rule, in the order reports list them.
pub fn rules() -> Vec<&'static Rule> {
    let mut r = algebra::rules();
    r.push(&dba::MERGE_DBA_SCORES);
    r.push(&attention::FUSE_ATTENTION);
    r.push(&kv::DEQUANTIZE_IN_ATTENTION);
    r.push(&rmsnorm::FUSE_RMSNORM);
    r.extend(precision::rules());
    r.push(&row_dot::ROW_DOT);
    r
}

/// Every rule name, e-graph rules first, then the graph passes: before
/// differentiation `fuse-linear-cross-entropy` (training graphs only, see
/// [`fuse_for_training`]), after extraction `fuse-norm-matmul`,
/// `fuse-rope-matmul`, `fuse-elementwise`, and on an optimized training
/// graph where a run asks for it `recompute-layers`.
pub fn rule_names() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = rules().iter().map(|r| r.name).collect();
    v.push(linear_ce::NAME);
    v.push(norm_matmul::NAME);
    v.push(rope_matmul::NAME);
    v.push(elementwise::NAME);
    v.push(recompute::NAME);
    v
}

/// How to optimize.
#[derive(Clone, Debug)]
pub struct Options {
    pub limits: Limits,
    /// Only these e-graph rules (by name); all when `None`.
    pub only: Option<Vec<String>>,
    /// Run the elementwise fusion pass after extraction.
    pub fuse_elementwise: bool,
    /// Merge projections of one input ([`merge_projections`]) before
    /// saturating, so that each norm has one product to fold into
    /// (`fuse-norm-matmul`).
    pub merge_projections: bool,
    /// Extract by tree costs (egg's `Extractor`) instead of DAG costs: the
    /// optimizer before `extract.rs`, for comparisons.
    pub tree_extraction: bool,
    /// Optimize each class of identical layers once and copy the result
    /// into every layer of the class (`layers.rs`); off: the whole graph
    /// is saturated at once.
    pub reuse_layers: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            limits: Limits::default(),
            only: None,
            fuse_elementwise: true,
            merge_projections: true,
            tree_extraction: false,
            reuse_layers: true,
        }
    }
}

/// How the optimized graph was chosen from the e-graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extraction {
    /// By DAG cost, every class counted once ([`extract::dag`]), settled
    /// after this many visits of a class.
    Dag { visits: usize },
    /// By tree cost (egg's `Extractor`), because the DAG choice did not
    /// settle: shared operands counted once per path.
    Tree,
}

/// One fused node of the optimized graph and the rules that formed it.
#[derive(Clone, Debug, PartialEq)]
pub struct FusedNode {
    pub node: NodeId,
    pub op: Op,
    pub scope: String,
    pub rules: Vec<&'static str>,
}

/// What the optimizer did.
#[derive(Clone, Debug)]
pub struct OptimizeReport {
    /// Fused nodes of the optimized graph, in its topological order.
    pub fused: Vec<FusedNode>,
    /// Rule → applications that changed the e-graph (`fuse-elementwise`:
    /// kernels formed, plus ops recomputed in their users' kernels instead
    /// of stored).
    pub applied: BTreeMap<&'static str, usize>,
    /// Recipes that did not type (`rule: reason`); always empty unless a
    /// rule is broken.
    pub rejected: Vec<String>,
    pub stop: Stop,
    pub iterations: usize,
    pub extraction: Extraction,
    /// E-graph sizes summed over the graphs saturated (with layer reuse:
    /// the rest of the model and one layer of each class).
    pub egraph_nodes: usize,
    pub egraph_classes: usize,
    /// With layer reuse: how the layers were grouped.
    pub layers: Option<layers::Reuse>,
    pub nodes_before: usize,
    pub nodes_after: usize,
    /// Modelled cost (bytes moved + weighted flops, see `cost.rs`).
    pub cost_before: f64,
    pub cost_after: f64,
    pub elapsed: Duration,
}

impl OptimizeReport {
    /// The rules of the fused node `id`, if it is one.
    pub fn rules_of(&self, id: NodeId) -> Option<&[&'static str]> {
        self.fused
            .iter()
            .find(|f| f.node == id)
            .map(|f| f.rules.as_slice())
    }
}

/// Why optimization failed: always a compiler bug.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum OptimizeError {
    #[error("internal error: the optimizer built an ill-typed graph: {0}")]
    Build(#[from] IrError),
    #[error("internal error: the optimized graph does not verify: {}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Verify(Vec<IrError>),
}

/// Optimizes `g` with every rule.
pub fn optimize(g: &Graph) -> Result<(Graph, OptimizeReport), OptimizeError> {
    optimize_with(g, &Options::default())
}

/// Optimizes `g` as `opts` says.
pub fn optimize_with(g: &Graph, opts: &Options) -> Result<(Graph, OptimizeReport), OptimizeError> {
    let start = Instant::now();
    let all = rules();
    let active: Vec<&Rule> = all
        .iter()
        .copied()
        .filter(|r| {
            opts.only
                .as_ref()
                .is_none_or(|o| o.iter().any(|n| n == r.name))
        })
        .collect();
    let original = g;
    let merged;
    let g = if opts.merge_projections {
        merged = merge_projections(g)?;
        &merged
    } else {
        g
    };
    let part = |g: &Graph| extract_part(g, opts, &active);
    let reused = if opts.reuse_layers {
        layers::optimize(g, part)?
    } else {
        None
    };
    let (part, layers) = match reused {
        Some((part, layers)) => (part, Some(layers)),
        None => (part(g)?, None),
    };
    let Part {
        graph,
        mut fused,
        mut applied,
        rejected,
        stop,
        iterations,
        extraction,
        egraph_nodes,
        egraph_classes,
    } = part;
    let graph = if opts.fuse_elementwise {
        let f = elementwise::fuse(&graph)?;
        fused = fused
            .into_iter()
            .filter_map(|(old, rules)| f.map.get(&old).map(|&new| (new, rules)))
            .collect();
        for &n in &f.fused {
            fused.insert(n, vec![elementwise::NAME]);
        }
        if !f.fused.is_empty() {
            applied.insert(elementwise::NAME, f.fused.len() + f.recomputed.len());
        }
        f.graph
    } else {
        graph
    };
    caramba_ir::verify(&graph).map_err(OptimizeError::Verify)?;
    let pos: BTreeMap<NodeId, usize> = graph
        .topo_order()
        .into_iter()
        .enumerate()
        .map(|(i, n)| (n, i))
        .collect();
    let mut fused: Vec<FusedNode> = fused
        .into_iter()
        .map(|(node, rules)| FusedNode {
            node,
            op: graph.node(node).op.clone(),
            scope: graph.node(node).scope.clone(),
            rules,
        })
        .collect();
    fused.sort_by_key(|f| pos[&f.node]);
    let report = OptimizeReport {
        fused,
        applied,
        rejected,
        stop,
        iterations,
        extraction,
        egraph_nodes,
        egraph_classes,
        layers,
        nodes_before: original.node_count(),
        nodes_after: graph.node_count(),
        cost_before: cost::graph_cost(original),
        cost_after: cost::graph_cost(&graph),
        elapsed: start.elapsed(),
    };
    Ok((graph, report))
}

/// A graph (or a part of one, see `layers.rs`) after saturation,
/// extraction, `fuse-norm-matmul` and `fuse-rope-matmul`, before elementwise
/// fusion.
pub(crate) struct Part {
    pub graph: Graph,
    /// Fused nodes and the rules that formed them.
    pub fused: BTreeMap<NodeId, Vec<&'static str>>,
    pub applied: BTreeMap<&'static str, usize>,
    pub rejected: Vec<String>,
    pub stop: Stop,
    pub iterations: usize,
    pub extraction: Extraction,
    pub egraph_nodes: usize,
    pub egraph_classes: usize,
}

/// Saturates `g` with `active`, extracts, folds norms into products and
/// RoPE into their epilogues.
fn extract_part(g: &Graph, opts: &Options, active: &[&Rule]) -> Result<Part, OptimizeError> {
    let mut loaded = lang::load(g);
    let sat = rule::saturate(&mut loaded.egraph, active, &opts.limits);
    let eg = &loaded.egraph;
    let dag = if opts.tree_extraction {
        None
    } else {
        extract::dag(eg)
    };
    let (graph, class_of, extraction) = match dag {
        Some(choice) => {
            let (graph, class_of) = lang::extract(&loaded, |c| choice.best[&c].clone())?;
            (
                graph,
                class_of,
                Extraction::Dag {
                    visits: choice.visits,
                },
            )
        }
        None => {
            let extractor = egg::Extractor::new(eg, cost::Cost { egraph: eg });
            let (graph, class_of) =
                lang::extract(&loaded, |c| extractor.find_best_node(c).clone())?;
            (graph, class_of, Extraction::Tree)
        }
    };
    let order = rule_names();
    let sorted = |set: std::collections::BTreeSet<&'static str>| {
        let mut v: Vec<&'static str> = set.into_iter().collect();
        v.sort_by_key(|n| order.iter().position(|o| o == n));
        v
    };
    let mut fused: BTreeMap<NodeId, Vec<&'static str>> = BTreeMap::new();
    for (&node, &class) in &class_of {
        if matches!(
            graph.node(node).op,
            Op::Attention { .. }
                | Op::AttentionWithLse { .. }
                | Op::RmsNorm { .. }
                | Op::RmsNormMatMul { .. }
                | Op::RmsNormGrad { .. }
                | Op::RowDot
                | Op::Elementwise(_)
                | Op::KvAttention { .. }
        ) {
            fused.insert(
                node,
                sorted(rule::provenance_of(eg, &sat.provenance, class)),
            );
        }
    }
    let mut applied = sat.applied.clone();
    let enabled = |name: &str| {
        opts.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|n| n == name))
    };
    let mut graph = graph;
    if enabled(norm_matmul::NAME) {
        let f = norm_matmul::fold(&graph)?;
        fused = through_pass(&fused, &f.map, &f.folds, norm_matmul::NAME, &mut applied);
        graph = f.graph;
    }
    if enabled(rope_matmul::NAME) {
        let f = rope_matmul::fuse(&graph)?;
        fused = through_pass(&fused, &f.map, &f.fused, rope_matmul::NAME, &mut applied);
        graph = f.graph;
    }
    Ok(Part {
        graph,
        fused,
        applied,
        rejected: sat.rejected,
        stop: sat.stop,
        iterations: sat.iterations,
        extraction,
        egraph_nodes: eg.total_number_of_nodes(),
        egraph_classes: eg.number_of_classes(),
    })
}

/// The fused nodes' rules carried through a graph pass after extraction:
/// `map` takes old nodes to new; each node the pass `name` formed (new,
/// and the old node it replaced) gets the old node's rules and `name`,
/// which `applied` counts.
fn through_pass(
    fused: &BTreeMap<NodeId, Vec<&'static str>>,
    map: &std::collections::HashMap<NodeId, NodeId>,
    formed: &[(NodeId, NodeId)],
    name: &'static str,
    applied: &mut BTreeMap<&'static str, usize>,
) -> BTreeMap<NodeId, Vec<&'static str>> {
    let mut out: BTreeMap<NodeId, Vec<&'static str>> = fused
        .iter()
        .filter_map(|(old, rules)| map.get(old).map(|&new| (new, rules.clone())))
        .collect();
    for &(new, old) in formed {
        let mut rules = fused.get(&old).cloned().unwrap_or_default();
        rules.push(name);
        out.insert(new, rules);
    }
    if !formed.is_empty() {
        applied.insert(name, formed.len());
    }
    out
}

/// The rules that form the fused ops with gradient rules of their own,
/// `attention` and `rms_norm` (and the layout clean-up they need): what a
/// training graph runs before differentiation.
pub fn training_rules() -> Vec<&'static Rule> {
    let mut r = algebra::rules();
    r.push(&dba::MERGE_DBA_SCORES);
    r.push(&attention::FUSE_ATTENTION);
    r.push(&rmsnorm::FUSE_RMSNORM);
    r
}

/// `g` with its attention, RMSNorms and loss fused and nothing else: the
/// form training differentiates. Autodiff works on primitives, except for
/// the fused ops with their own gradient rules: `attention` (the flash-style
/// backward, which recomputes probabilities per tile instead of keeping
/// each layer's `T × S` matrix alive until the backward pass) and
/// `rms_norm` (one pass per gradient, the row statistics recomputed from
/// x, where the primitive chain's backward kept its f32 intermediates and
/// took eight passes over them); forming them first is what lets their
/// backward be fused. DBA's two score paths merge here as in inference.
///
/// Projections of one input (attention's q, k and v; SwiGLU's gate and up)
/// are then merged into one product each ([`merge_projections`]), so that
/// the backward has one product for their input's gradient and one for
/// their weights'. Last, the LM head read only by its loss becomes one
/// `linear_cross_entropy` ([`linear_ce`]), whose gradients recompute the
/// logits a block of rows at a time instead of keeping them alive.
pub fn fuse_for_training(g: &Graph) -> Result<Graph, OptimizeError> {
    fuse_for_training_with(g, true)
}

/// [`fuse_for_training`], with the head and its loss fused
/// (`fuse-linear-cross-entropy`) or, for comparisons, not.
pub fn fuse_for_training_with(
    g: &Graph,
    linear_cross_entropy: bool,
) -> Result<Graph, OptimizeError> {
    let only = training_rules()
        .iter()
        .map(|r| r.name.to_string())
        .collect();
    let opts = Options {
        only: Some(only),
        fuse_elementwise: false,
        merge_projections: false,
        ..Options::default()
    };
    let fused = optimize_with(g, &opts).map(|(g, _)| g)?;
    let merged = merge_projections(&fused)?;
    if !linear_cross_entropy {
        return Ok(merged);
    }
    Ok(linear_ce::fuse(&merged)?.0)
}

/// Why [`differentiate_for_training`] failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainGraphError {
    #[error("fusing attention and norms failed: {0}")]
    Fuse(OptimizeError),
    #[error("autodiff failed: {0}")]
    Autodiff(IrError),
    #[error("internal error: reusing attention's log-sum-exp failed: {0}")]
    ReuseLse(IrError),
}

/// The training graph of `forward`: the gradients of output `loss` with
/// respect to the parameters `wrt`, in the order training pipelines need.
/// Attention and RMSNorm are fused first ([`fuse_for_training`]) so that
/// their backward is fused too, the graph is differentiated, and each attention
/// then hands its backward the log-sum-exp its forward kernel computes
/// ([`reuse_attention_lse`]). The result is ready for [`optimize`].
pub fn differentiate_for_training(
    forward: &Graph,
    loss: &str,
    wrt: &[String],
) -> Result<Graph, TrainGraphError> {
    let fused = fuse_for_training(forward).map_err(TrainGraphError::Fuse)?;
    let graph = caramba_ir::autodiff::differentiate(&fused, loss, wrt)
        .map_err(TrainGraphError::Autodiff)?;
    reuse_attention_lse(&graph).map_err(TrainGraphError::ReuseLse)
}

/// Which stage of the graph `--emit ir` shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Stage {
    /// As lowering produced it: primitives only.
    #[default]
    Lowered,
    /// After the e-graph rewrites and elementwise fusion.
    Optimized,
}

impl Stage {
    pub const NAMES: [&'static str; 2] = ["lowered", "optimized"];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Lowered => "lowered",
            Stage::Optimized => "optimized",
        }
    }

    /// The graph at this stage of a lowered graph.
    pub fn apply(self, g: &Graph) -> Result<Graph, OptimizeError> {
        match self {
            Stage::Lowered => Ok(g.clone()),
            Stage::Optimized => optimize(g).map(|(g, _)| g),
        }
    }
}

impl std::str::FromStr for Stage {
    type Err = String;

    fn from_str(s: &str) -> Result<Stage, String> {
        match s {
            "lowered" => Ok(Stage::Lowered),
            "optimized" => Ok(Stage::Optimized),
            _ => Err(format!(
                "unknown stage {s:?}: expected one of {}",
                Stage::NAMES.join(", ")
            )),
        }
    }
}
