//! The plan: what `caramba run` would execute, in order — models with their
//! parameter counts and KV-cache sizes, layers (repeated blocks folded), then
//! each group's runs and benchmarks. Printed by `--print-plan`.

use crate::lower::{LayerInfo, Lowered};
use crate::manifest::*;
use std::fmt::Write;

/// Renders the plan of a compiled manifest; `group` restricts it to one group.
pub fn render(c: &crate::Compiled, group: Option<&str>) -> String {
    let m = &c.manifest;
    let mut s = String::new();
    let _ = writeln!(s, "manifest {} (version {})", m.name, m.version);
    if let Some(n) = &m.notes {
        let _ = writeln!(s, "  {n}");
    }
    let _ = writeln!(s);
    model(&mut s, "student", &c.student, &m.model);
    if let Some(t) = &c.teacher {
        let _ = writeln!(s);
        model(
            &mut s,
            "teacher (the student with standard attention, loaded from teacher_ckpt)",
            t,
            &m.model,
        );
    }
    for g in groups(m) {
        if group.is_some_and(|name| name != g.name) {
            continue;
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "group {}{}",
            g.name,
            g.description
                .as_deref()
                .map(|d| format!(" — {d}"))
                .unwrap_or_default()
        );
        for (i, r) in resolve_runs(m, &g).iter().enumerate() {
            run(
                &mut s,
                i + 1,
                r,
                g.data.as_deref().or(m.defaults.data.as_deref()),
            );
        }
        for b in &g.benchmarks {
            bench(&mut s, b);
        }
        if g.runs.is_empty() && g.benchmarks.is_empty() {
            let _ = writeln!(s, "  (nothing to run)");
        }
    }
    s
}

fn model(s: &mut String, title: &str, l: &Lowered, m: &ModelSpec) {
    let params = l.graph.param_count();
    let kv: usize = l.layers.iter().map(|x| x.kv_elements_per_token).sum();
    let attn = l
        .layers
        .iter()
        .filter(|x| x.kv_elements_per_token > 0)
        .count();
    let _ = writeln!(s, "model {title}");
    let _ = writeln!(
        s,
        "  parameters: {} ({}), {} tensors; vocab {}, d_model {}",
        group_digits(params),
        human(params as f64),
        l.graph.params().count(),
        m.embedder.vocab_size,
        m.embedder.d_model
    );
    if attn > 0 {
        let per_kind: Vec<String> = [
            CacheKind::Fp32,
            CacheKind::Fp16,
            CacheKind::Q8,
            CacheKind::Q4,
        ]
        .iter()
        .map(|k| {
            format!(
                "{} {}",
                k.name(),
                bytes(kv as f64 * k.bits_per_element() / 8.0)
            )
        })
        .collect();
        let _ = writeln!(
            s,
            "  KV cache per token ({attn} attention layers, {kv} values): {}",
            per_kind.join(", ")
        );
    }
    let _ = writeln!(s, "  layers:");
    for (scope, info, count) in fold_blocks(&l.layers) {
        let rep = if count > 1 {
            format!(" ×{count}")
        } else {
            String::new()
        };
        let kv = if info.kv_elements_per_token > 0 {
            format!(", KV {} B/token fp16", info.kv_elements_per_token * 2)
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "    {scope:<44} {}{rep}  [{} params{kv}]",
            info.kind,
            group_digits(info.params)
        );
    }
}

/// Folds `model.layers.{i}.x` entries that repeat across blocks into one
/// line `model.layers.*.x ×n`.
fn fold_blocks(layers: &[LayerInfo]) -> Vec<(String, LayerInfo, usize)> {
    let mut out: Vec<(String, LayerInfo, usize)> = Vec::new();
    for l in layers {
        let pattern = star_indices(&l.scope);
        if let Some(pos) = out
            .iter()
            .position(|(p, i, _)| *p == pattern && i.kind == l.kind && i.params == l.params)
        {
            if pattern != l.scope {
                out[pos].2 += 1;
                continue;
            }
        }
        out.push((pattern, l.clone(), 1));
    }
    out
}

fn star_indices(scope: &str) -> String {
    scope
        .split('.')
        .map(|part| {
            if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
                "*"
            } else {
                part
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// The groups to run: the declared ones, or an implicit `default` group of
/// the top-level runs and benchmarks.
pub fn groups(m: &Manifest) -> Vec<Group> {
    if !m.groups.is_empty() {
        return m.groups.clone();
    }
    vec![Group {
        name: "default".into(),
        description: None,
        data: None,
        runs: m
            .runs
            .iter()
            .cloned()
            .map(|r| GroupRun::Inline(Box::new(r)))
            .collect(),
        benchmarks: m.benchmarks.clone(),
        loc: Loc::default(),
    }]
}

/// A group's runs with references resolved to the top-level definitions.
pub fn resolve_runs(m: &Manifest, g: &Group) -> Vec<Run> {
    g.runs
        .iter()
        .filter_map(|r| match r {
            GroupRun::Inline(r) => Some((**r).clone()),
            GroupRun::Ref(id, _) => m.runs.iter().find(|r| &r.fields.id == id).cloned(),
        })
        .collect()
}

fn run(s: &mut String, n: usize, r: &Run, data: Option<&str>) {
    let f = &r.fields;
    let mode = format!("{:?}", f.mode).to_lowercase();
    let _ = write!(s, "  {n}. run {} — {mode}", f.id);
    if f.mode == RunMode::Train {
        let _ = write!(s, ", {} steps", group_digits(f.steps as usize));
    }
    if let Some(seed) = f.seed {
        let _ = write!(s, ", seed {seed}");
    }
    let _ = writeln!(s);
    if let Some(t) = &f.train {
        let _ = writeln!(
            s,
            "       {} phase: batch {} × {} tokens, {} lr {} ({} schedule), weight decay {}{}",
            lower(&t.phase),
            t.batch_size,
            t.block_size,
            lower(&t.optimizer),
            t.lr,
            lower(&t.schedule),
            t.weight_decay,
            if t.gradient_accumulation_steps > 1 {
                format!(", accumulate {}", t.gradient_accumulation_steps)
            } else {
                String::new()
            }
        );
        if t.activation_checkpointing {
            let _ = writeln!(
                s,
                "       activation checkpointing: each layer's activations recomputed in the backward (GPUs)"
            );
        }
        if let Some(tc) = &t.teacher_ckpt {
            let _ = writeln!(s, "       teacher: {tc}");
        }
    }
    if let Some(d) = f.data.as_deref().or(data) {
        let _ = writeln!(s, "       data: {d}");
    }
    if let Some(from) = &f.init_from {
        let _ = writeln!(s, "       starts from the weights of run {from}");
    }
    match &r.verify {
        Some(Verify::Compare(c)) => {
            let th = |t: &Option<L1Thresholds>| {
                t.as_ref()
                    .map(|t| format!("mean L1 ≤ {}, max L1 ≤ {}", t.max_mean_l1, t.max_max_l1))
                    .unwrap_or("not checked".into())
            };
            let _ = writeln!(
                s,
                "       verify compare on {} batch(es): attention {}; logits {}",
                c.batches,
                th(&c.attention),
                th(&c.logits)
            );
        }
        Some(Verify::Eval(e)) => {
            let _ = writeln!(
                s,
                "       verify eval: {} case(s), {} new tokens{}{}",
                e.cases.len(),
                e.max_new_tokens,
                e.thresholds
                    .min_student_accuracy
                    .map(|x| format!(", student accuracy ≥ {x}"))
                    .unwrap_or_default(),
                e.thresholds
                    .max_accuracy_drop
                    .map(|x| format!(", accuracy drop ≤ {x}"))
                    .unwrap_or_default()
            );
        }
        None => {}
    }
}

fn bench(s: &mut String, b: &Benchmark) {
    let what = match &b.config {
        BenchConfig::Perplexity(c) => format!(
            "{} batch(es) of {} × {} tokens from {}",
            c.num_batches, c.batch_size, c.block_size, c.dataset
        ),
        BenchConfig::Latency(c) => format!(
            "prompts {:?} × generations {:?}, batch {:?}, {} warmup + {} timed",
            c.prompt_lengths, c.generation_lengths, c.batch_sizes, c.warmup_runs, c.timed_runs
        ),
        BenchConfig::Memory(c) => format!(
            "sequences {:?}, batch {:?}, KV formats {}",
            c.sequence_lengths,
            c.batch_sizes,
            c.quantization_modes
                .iter()
                .map(|k| k.name())
                .collect::<Vec<_>>()
                .join("/")
        ),
        BenchConfig::Accuracy(c) => format!("tasks {}", c.tasks.join(", ")),
        BenchConfig::Generation(c) => format!(
            "{} prompt(s), {} new tokens, temperature {}",
            c.prompts.len(),
            c.max_new_tokens,
            c.temperature
        ),
    };
    let rep = if b.repeats > 1 {
        format!(" ×{}", b.repeats)
    } else {
        String::new()
    };
    let _ = writeln!(
        s,
        "  benchmark {} ({}) on {}{rep}: {what}",
        b.id,
        b.config.type_name(),
        b.models.join(", ")
    );
}

pub fn group_digits(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn human(n: f64) -> String {
    if n >= 1e9 {
        format!("{:.2}B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1}K", n / 1e3)
    } else {
        format!("{n}")
    }
}

fn bytes(b: f64) -> String {
    if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / 1024.0 / 1024.0)
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b} B")
    }
}

/// An enum value as a manifest spells it (`adamw`, `cosine`).
fn lower(v: &impl std::fmt::Debug) -> String {
    format!("{v:?}").to_lowercase()
}

/// Renders the kernels of an optimized graph per layer (`layers` from
/// lowering; a node belongs to the layer whose scope is the longest prefix
/// of its own), in execution order, each fused kernel with the rules that
/// formed it; blocks that repeat with the same kernels fold into one
/// `model.layers.*.x ×n` entry. Reshapes are views and a permute that swaps
/// the last two axes of a matmul operand is a strided read, so neither is
/// listed as a kernel; nor are sources. Kernels over the weights alone are
/// marked: `sample` and `perplexity` run them once per loaded model.
pub fn render_kernels(
    layers: &[LayerInfo],
    g: &caramba_ir::Graph,
    report: &crate::OptimizeReport,
) -> String {
    use caramba_ir::Op;
    let layer_of = |scope: &str| -> Option<&LayerInfo> {
        layers
            .iter()
            .filter(|l| scope == l.scope || scope.starts_with(&format!("{}.", l.scope)))
            .max_by_key(|l| l.scope.len())
    };
    let mut kinds: std::collections::HashMap<String, String> = Default::default();
    let strided = |id: caramba_ir::NodeId| -> bool {
        let Op::Permute(p) = &g.node(id).op else {
            return false;
        };
        let r = p.len();
        r >= 2
            && p[r - 2] == r - 1
            && p[r - 1] == r - 2
            && p[..r - 2].iter().enumerate().all(|(i, &x)| i == x)
            && !g.users(id).is_empty()
            && g.users(id).iter().all(|&u| g.reads_as_matrix(u, id))
    };
    // Values made from the weights alone (merged projections' stacked
    // weights): a loaded model makes them once, not per run.
    let from_weights = g.weight_only(&g.topo_order());
    let mut order: Vec<String> = Vec::new();
    let mut by_scope: std::collections::HashMap<String, Vec<String>> = Default::default();
    for id in g.topo_order() {
        let n = g.node(id);
        if n.op.is_source() || matches!(n.op, Op::Reshape(_)) || strided(id) {
            continue;
        }
        let mut line = n.op.mnemonic().to_string();
        match &n.op {
            Op::Elementwise(p) => {
                let ops = p
                    .0
                    .iter()
                    .filter(|i| {
                        matches!(
                            i,
                            caramba_ir::ElemInstr::Unary(..) | caramba_ir::ElemInstr::Binary(..)
                        )
                    })
                    .count();
                let _ = write!(line, " ({ops} ops)");
            }
            op => {
                let attrs = op.attrs();
                if !attrs.is_empty() {
                    let _ = write!(line, " {attrs}");
                }
            }
        }
        let _ = write!(line, " → {}", n.ty);
        if let Some(rules) = report.rules_of(id) {
            let _ = write!(line, "  ← {}", rules.join(" + "));
        }
        if from_weights.contains(&id) {
            line.push_str("  (weights only: once per loaded model)");
        }
        let scope = match layer_of(&n.scope) {
            Some(l) => {
                kinds.insert(star_indices(&l.scope), l.kind.clone());
                l.scope.clone()
            }
            None if n.scope.is_empty() => "(graph)".to_string(),
            None => n.scope.clone(),
        };
        if !by_scope.contains_key(&scope) {
            order.push(scope.clone());
        }
        by_scope.entry(scope).or_default().push(line);
    }
    // Fold scopes that differ only in block indices and have equal kernels.
    let mut folded: Vec<(String, Vec<String>, usize)> = Vec::new();
    for scope in order {
        let kernels = by_scope.remove(&scope).unwrap_or_default();
        let pattern = star_indices(&scope);
        if pattern != scope {
            if let Some(f) = folded
                .iter_mut()
                .find(|(p, k, _)| *p == pattern && *k == kernels)
            {
                f.2 += 1;
                continue;
            }
        }
        folded.push((pattern, kernels, 1));
    }
    let total: usize = folded.iter().map(|(_, k, n)| k.len() * n).sum();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "kernels of {} ({total} kernels; {} → {} nodes, modelled traffic {} → {}):",
        g.name,
        report.nodes_before,
        report.nodes_after,
        traffic(report.cost_before),
        traffic(report.cost_after)
    );
    if let Some(l) = &report.layers {
        let _ = writeln!(
            s,
            "  {} layers optimized as {} ({}: each class of identical layers saturated once)",
            l.layers,
            match l.classes {
                1 => "one".to_string(),
                n => format!("{n} classes"),
            },
            crate::optimize::layers::NAME
        );
    }
    for (scope, kernels, n) in folded {
        let rep = if n > 1 {
            format!(" ×{n}")
        } else {
            String::new()
        };
        match kinds.get(&scope) {
            Some(kind) => writeln!(s, "  {scope}{rep}  ({kind})"),
            None => writeln!(s, "  {scope}{rep}"),
        }
        .ok();
        for k in kernels {
            let _ = writeln!(s, "      {k}");
        }
    }
    s
}

/// A modelled cost in bytes, in GiB (costs are large: T = S = 2048).
fn traffic(b: f64) -> String {
    format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
}
