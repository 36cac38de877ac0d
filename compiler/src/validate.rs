//! Validation: the rules a manifest must satisfy beyond its types — head
//! divisibility, mode-specific fields, positive sizes, thresholds, and
//! references between runs, groups and models. Every violation is reported.
//! Width agreement between consecutive layers is checked by lowering, which
//! follows the data.

use crate::diag::{Diagnostic, Diagnostics};
use crate::manifest::*;
use std::collections::BTreeSet;

/// The largest size of one dimension (2^24): far above any real model's, and
/// small enough that products of sizes cannot overflow while lowering.
pub const MAX_DIM: usize = 1 << 24;

/// The most times one topology may repeat its layers.
pub const MAX_REPEAT: usize = 10_000;

pub fn validate(m: &Manifest) -> Result<(), Diagnostics> {
    let mut v = V {
        d: Diagnostics::default(),
    };
    v.defaults(&m.defaults);
    v.model(&m.model);
    let top_ids: BTreeSet<&str> = m.runs.iter().map(|r| r.fields.id.as_str()).collect();
    v.runs(m.runs.iter(), &top_ids);
    let mut names = BTreeSet::new();
    for g in &m.groups {
        if !names.insert(g.name.as_str()) {
            v.d.push(
                g.loc
                    .field("name", format!("group `{}` is defined twice", g.name)),
            );
        }
        v.group(g, m);
    }
    if !m.groups.is_empty() && !m.benchmarks.is_empty() {
        v.d.push(
            Diagnostic::new("top-level `benchmarks` are only allowed when there are no `groups`")
                .path("benchmarks")
                .at(m.benchmarks[0].loc.span)
                .help("move them into the group they belong to"),
        );
    }
    if m.groups.is_empty() {
        let runs: Vec<&Run> = m.runs.iter().collect();
        for b in &m.benchmarks {
            v.benchmark(b, &runs);
        }
    }
    if v.d.is_empty() {
        Ok(())
    } else {
        Err(v.d)
    }
}

struct V {
    d: Diagnostics,
}

impl V {
    fn check(&mut self, ok: bool, d: impl FnOnce() -> Diagnostic) {
        if !ok {
            self.d.push(d());
        }
    }

    fn defaults(&mut self, d: &Defaults) {
        if let Some(f) = d.val_frac {
            self.check((0.0..1.0).contains(&f), || {
                d.loc.field_or_self(
                    "val_frac",
                    format!("`val_frac` must be in [0, 1), found {f}"),
                )
            });
        }
        for (name, val) in [
            ("eval_iters", d.eval_iters),
            ("save_every", d.save_every),
            ("eval_every", d.eval_every),
        ] {
            if val == Some(0) {
                self.d.push(
                    d.loc
                        .field_or_self(name, format!("`{name}` must be at least 1")),
                );
            }
        }
    }

    fn model(&mut self, m: &ModelSpec) {
        let e = &m.embedder;
        self.check(e.kind == "token", || {
            Diagnostic::new(format!("unknown embedder type `{}`", e.kind))
                .path("model.embedder.type")
                .help("expected `token`")
        });
        self.check(e.vocab_size > 0, || {
            Diagnostic::new("`vocab_size` must be at least 1").path("model.embedder.vocab_size")
        });
        self.check(e.d_model > 0, || {
            Diagnostic::new("`d_model` must be at least 1").path("model.embedder.d_model")
        });
        for (f, v) in [("vocab_size", e.vocab_size), ("d_model", e.d_model)] {
            self.check(v <= MAX_DIM, || {
                Diagnostic::new(format!(
                    "`{f}` is {v}, more than the largest supported size ({MAX_DIM})"
                ))
                .path(format!("model.embedder.{f}"))
            });
        }
        self.topology(&m.topology);
    }

    fn topology(&mut self, t: &Topology) {
        if t.layers.is_empty() {
            self.d.push(
                t.loc
                    .field("layers", "empty topology: `layers` has no elements")
                    .help("a topology needs at least one layer"),
            );
        }
        let (field, n) = match t.kind {
            TopologyKind::Nested { repeat } => ("repeat", repeat),
            TopologyKind::Cyclic { iterations } => ("iterations", iterations),
            TopologyKind::Recurrent { steps } => ("steps", steps),
            _ => ("", 1),
        };
        if n == 0 {
            self.d
                .push(t.loc.field(field, format!("`{field}` must be at least 1")));
        }
        if n > MAX_REPEAT {
            self.d.push(t.loc.field(
                field,
                format!("`{field}` is {n}, more than the supported {MAX_REPEAT}"),
            ));
        }
        for el in &t.layers {
            match el {
                Element::Topology(t) => self.topology(t),
                Element::Layer(l) => self.layer(l),
            }
        }
    }

    fn layer(&mut self, l: &Layer) {
        let loc = &l.loc;
        match &l.kind {
            LayerKind::Attention(a) => self.attention(a, loc),
            LayerKind::RmsNorm(n) | LayerKind::LayerNorm(n) => {
                self.positive(loc, "d_model", n.d_model);
                self.check(n.eps > 0.0, || {
                    loc.field("eps", format!("`eps` must be positive, found {}", n.eps))
                });
            }
            LayerKind::SwiGlu(s) => {
                self.positive(loc, "d_model", s.d_model);
                self.positive(loc, "d_ff", s.d_ff);
            }
            LayerKind::Linear(s) => {
                self.positive(loc, "d_in", s.d_in);
                self.positive(loc, "d_out", s.d_out);
            }
            LayerKind::Dropout(s) => self.probability(loc, "dropout_p", s.dropout_p),
            LayerKind::Rope(r) => {
                self.positive(loc, "d_model", r.d_model);
                self.positive(loc, "n_heads", r.n_heads);
                if r.n_heads > 0 && r.d_model % r.n_heads != 0 {
                    self.d.push(loc.field(
                        "n_heads",
                        format!(
                            "d_model ({}) is not divisible by n_heads ({})",
                            r.d_model, r.n_heads
                        ),
                    ));
                } else if r.n_heads > 0 && (r.d_model / r.n_heads) % 2 == 1 {
                    self.d.push(loc.field(
                        "d_model",
                        format!(
                            "RoPE needs an even head dimension, but d_model / n_heads = {}",
                            r.d_model / r.n_heads
                        ),
                    ));
                }
                self.rope(loc, r.rope_theta, r.rope_scaling.as_ref());
            }
        }
    }

    /// A size: at least 1 and at most [`MAX_DIM`].
    fn positive(&mut self, loc: &Loc, field: &str, v: usize) {
        self.check(v > 0, || {
            loc.field(field, format!("`{field}` must be at least 1"))
        });
        self.check(v <= MAX_DIM, || {
            loc.field(
                field,
                format!("`{field}` is {v}, more than the largest supported size ({MAX_DIM})"),
            )
        });
    }

    fn probability(&mut self, loc: &Loc, field: &str, p: f64) {
        self.check((0.0..1.0).contains(&p), || {
            loc.field(field, format!("`{field}` must be in [0, 1), found {p}"))
        });
    }

    fn rope(&mut self, loc: &Loc, theta: f64, scaling: Option<&RopeScalingCfg>) {
        self.check(theta > 0.0, || {
            loc.field(
                "rope_theta",
                format!("`rope_theta` must be positive, found {theta}"),
            )
        });
        if let Some(s) = scaling {
            self.check(s.factor > 0.0, || {
                loc.field("rope_scaling", "rope scaling `factor` must be positive")
            });
            if s.kind == RopeScalingKind::Llama3 {
                let complete = s.low_freq_factor.is_some()
                    && s.high_freq_factor.is_some()
                    && s.original_max_position_embeddings.is_some();
                self.check(complete, || {
                    loc.field("rope_scaling", "llama3 rope scaling needs `low_freq_factor`, `high_freq_factor` and `original_max_position_embeddings`")
                });
                if let (Some(lo), Some(hi)) = (s.low_freq_factor, s.high_freq_factor) {
                    self.check(hi > lo, || {
                        loc.field(
                            "rope_scaling",
                            "`high_freq_factor` must exceed `low_freq_factor`",
                        )
                    });
                }
            }
        }
    }

    fn attention(&mut self, a: &AttentionCfg, loc: &Loc) {
        self.positive(loc, "d_model", a.d_model);
        self.positive(loc, "n_heads", a.n_heads);
        for (f, v) in [
            ("n_kv_heads", a.n_kv_heads),
            ("head_dim", a.head_dim),
            ("sem_dim", a.sem_dim),
            ("geo_dim", a.geo_dim),
        ] {
            if let Some(v) = v.filter(|&v| v > MAX_DIM) {
                self.d.push(loc.field(
                    f,
                    format!("`{f}` is {v}, more than the largest supported size ({MAX_DIM})"),
                ));
                return;
            }
        }
        if a.n_heads == 0 || a.d_model == 0 || a.n_heads > MAX_DIM || a.d_model > MAX_DIM {
            return;
        }
        let kv = a.n_kv();
        if kv == 0 {
            self.d
                .push(loc.field("n_kv_heads", "`n_kv_heads` must be at least 1"));
            return;
        }
        if !a.n_heads.is_multiple_of(kv) {
            self.d.push(
                loc.field(
                    "n_kv_heads",
                    format!(
                        "n_heads ({}) is not divisible by n_kv_heads ({kv})",
                        a.n_heads
                    ),
                )
                .help("each key/value head serves n_heads / n_kv_heads query heads"),
            );
        }
        self.probability(loc, "dropout_p", a.dropout_p);
        let mode = a.mode();
        if mode == AttentionMode::Standard && kv != a.n_heads {
            self.d.push(
                loc.field(
                    "n_kv_heads",
                    format!(
                        "standard attention has n_kv_heads = n_heads ({}), found {kv}",
                        a.n_heads
                    ),
                )
                .help("use `mode: gqa` for grouped-query attention"),
            );
        }
        if mode != AttentionMode::Decoupled {
            for f in ["sem_dim", "geo_dim", "decoupled_gate"] {
                if loc.has(f) {
                    self.d.push(loc.field(
                        f,
                        format!(
                            "`{f}` applies only to `mode: decoupled`, but this layer is `{}`",
                            mode_name(mode)
                        ),
                    ));
                }
            }
            if a.head_dim.is_none() && !a.d_model.is_multiple_of(a.n_heads) {
                self.d.push(
                    loc.field(
                        "n_heads",
                        format!(
                            "d_model ({}) is not divisible by n_heads ({})",
                            a.d_model, a.n_heads
                        ),
                    )
                    .help("set `head_dim` explicitly, or choose n_heads dividing d_model"),
                );
            } else if a.rope_enabled && a.head_dim() % 2 == 1 {
                self.d.push(
                    loc.field(
                        if a.head_dim.is_some() {
                            "head_dim"
                        } else {
                            "n_heads"
                        },
                        format!(
                            "RoPE needs an even head dimension, but it is {}",
                            a.head_dim()
                        ),
                    )
                    .help("use an even head dimension or set `rope_enabled: false`"),
                );
            }
        } else {
            if loc.has("head_dim") {
                self.d.push(loc.field("head_dim", "`head_dim` does not apply to `mode: decoupled`: per-head widths are sem_dim / n_heads and geo_dim / n_heads"));
            }
            for (f, v) in [("sem_dim", a.sem_dim), ("geo_dim", a.geo_dim)] {
                match v {
                    None => self
                        .d
                        .push(loc.err(format!("decoupled attention needs `{f}`"))),
                    Some(0) => self
                        .d
                        .push(loc.field(f, format!("`{f}` must be at least 1"))),
                    Some(d) if d % a.n_heads != 0 => self.d.push(loc.field(
                        f,
                        format!("{f} ({d}) is not divisible by n_heads ({})", a.n_heads),
                    )),
                    _ => {}
                }
            }
            if let Some(g) = a.geo_dim {
                if a.rope_enabled && g % a.n_heads == 0 && (g / a.n_heads) % 2 == 1 {
                    self.d.push(loc.field("geo_dim", format!("RoPE needs an even geometric head dimension, but geo_dim / n_heads = {}", g / a.n_heads)));
                }
            }
        }
        if a.rope_enabled {
            self.rope(loc, a.rope_theta, a.rope_scaling.as_ref());
        }
    }

    fn runs<'a>(&mut self, runs: impl Iterator<Item = &'a Run>, known: &BTreeSet<&str>) {
        let mut seen = BTreeSet::new();
        for r in runs {
            if !seen.insert(r.fields.id.clone()) {
                self.d.push(
                    r.loc
                        .field("id", format!("run id `{}` is used twice", r.fields.id)),
                );
            }
            self.run(r, known);
        }
    }

    fn run(&mut self, r: &Run, known: &BTreeSet<&str>) {
        let loc = &r.loc;
        if let Some(from) = &r.fields.init_from {
            self.check(
                known.contains(from.as_str()) && from != &r.fields.id,
                || {
                    loc.field(
                        "init_from",
                        format!("`init_from` refers to unknown run `{from}`"),
                    )
                    .help(format!("known runs: {}", list(known)))
                },
            );
        }
        if r.fields.mode == RunMode::Train {
            self.check(r.fields.train.is_some(), || {
                loc.err(format!(
                    "run `{}` is `mode: train` but has no `train` block",
                    r.fields.id
                ))
            });
            self.check(r.fields.steps > 0, || {
                loc.field("steps", "a training run needs `steps` of at least 1")
            });
        }
        if let Some(t) = &r.fields.train {
            let at = |f: &str, msg: String| loc.field_or_self(&format!("train.{f}"), msg);
            self.check(t.lr > 0.0, || {
                at("lr", format!("`lr` must be positive, found {}", t.lr))
            });
            self.check(t.batch_size > 0, || {
                at("batch_size", "`batch_size` must be at least 1".into())
            });
            self.check(t.block_size > 1, || {
                at("block_size", "`block_size` must be at least 2".into())
            });
            self.check(t.weight_decay >= 0.0, || {
                at(
                    "weight_decay",
                    format!(
                        "`weight_decay` must not be negative, found {}",
                        t.weight_decay
                    ),
                )
            });
            self.check(t.gradient_accumulation_steps > 0, || {
                at(
                    "gradient_accumulation_steps",
                    "`gradient_accumulation_steps` must be at least 1".into(),
                )
            });
            if let Some(c) = t.grad_clip {
                self.check(c > 0.0, || {
                    at(
                        "grad_clip",
                        format!("`grad_clip` must be positive, found {c}"),
                    )
                });
            }
            if let Some(c) = t.convergence_target {
                self.check(c >= 0.0, || {
                    at(
                        "convergence_target",
                        format!("`convergence_target` must not be negative, found {c}"),
                    )
                });
            }
            self.check(
                t.phase != Phase::Blockwise || t.teacher_ckpt.is_some(),
                || {
                    // Not written, so point at the phase that asks for it.
                    let d = Diagnostic::new("blockwise distillation needs a `teacher_ckpt`")
                        .path(format!("{}.train.teacher_ckpt", loc.path));
                    match loc.fields.iter().find(|(k, _)| k == "train.phase") {
                        Some((_, span)) => d.at(*span),
                        None => d.at(loc.span),
                    }
                },
            );
        }
        match &r.verify {
            Some(Verify::Compare(c)) => {
                self.check(c.batches > 0, || {
                    loc.field_or_self("verify.batches", "`batches` must be at least 1")
                });
                for (name, th) in [("attention", &c.attention), ("logits", &c.logits)] {
                    if let Some(th) = th {
                        for (f, x) in [
                            ("max_mean_l1", th.max_mean_l1),
                            ("max_max_l1", th.max_max_l1),
                        ] {
                            self.check(x >= 0.0 && x.is_finite(), || {
                                loc.field_or_self(
                                    &format!("verify.{name}.{f}"),
                                    format!(
                                        "threshold `{f}` must be a non-negative number, found {x}"
                                    ),
                                )
                            });
                        }
                        self.check(th.max_mean_l1 <= th.max_max_l1, || {
                            loc.field_or_self(
                                &format!("verify.{name}.max_mean_l1"),
                                format!(
                                    "`max_mean_l1` ({}) exceeds `max_max_l1` ({}): the mean can never be above the max",
                                    th.max_mean_l1, th.max_max_l1
                                ),
                            )
                        });
                    }
                }
                self.check(c.attention.is_some() || c.logits.is_some(), || {
                    loc.field_or_self(
                        "verify",
                        "a compare verify needs `attention` or `logits` thresholds",
                    )
                });
            }
            Some(Verify::Eval(e)) => self.eval(e, loc),
            None => {}
        }
    }

    fn eval(&mut self, e: &EvalVerify, loc: &Loc) {
        let at = |f: String, msg: String| loc.field_or_self(&format!("verify.{f}"), msg);
        self.check(!e.cases.is_empty(), || {
            at(
                "cases".into(),
                "an eval verify needs at least one case".into(),
            )
        });
        self.check(e.max_new_tokens > 0, || {
            at(
                "max_new_tokens".into(),
                "`max_new_tokens` must be at least 1".into(),
            )
        });
        if let Some(a) = e.thresholds.min_student_accuracy {
            self.check((0.0..=1.0).contains(&a), || {
                at(
                    "thresholds.min_student_accuracy".into(),
                    format!("accuracy thresholds are in [0, 1], found {a}"),
                )
            });
        }
        if let Some(a) = e.thresholds.max_accuracy_drop {
            self.check((0.0..=1.0).contains(&a), || {
                at(
                    "thresholds.max_accuracy_drop".into(),
                    format!("accuracy thresholds are in [0, 1], found {a}"),
                )
            });
        }
        let mut ids = BTreeSet::new();
        for (i, c) in e.cases.iter().enumerate() {
            let cp = format!("cases[{i}]");
            self.check(ids.insert(c.id.clone()), || {
                at(
                    format!("{cp}.id"),
                    format!("case id `{}` is used twice", c.id),
                )
            });
            match c.kind {
                EvalKind::IntGreedy => {
                    self.check(c.answer.is_i64() || c.answer.is_u64(), || {
                        at(
                            format!("{cp}.answer"),
                            format!(
                                "an `int_greedy` case needs an integer answer, found {}",
                                show(&c.answer)
                            ),
                        )
                    });
                    self.check(c.choices.is_none(), || {
                        at(
                            format!("{cp}.choices"),
                            "`choices` applies only to `choice_logprob` cases".into(),
                        )
                    });
                }
                EvalKind::ChoiceLogprob => match &c.choices {
                    None => self.d.push(at(
                        cp.to_string(),
                        "a `choice_logprob` case needs `choices`".into(),
                    )),
                    Some(ch) => {
                        let ans = c
                            .answer
                            .as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| show(&c.answer));
                        self.check(ch.len() >= 2, || {
                            at(
                                format!("{cp}.choices"),
                                "a `choice_logprob` case needs at least two choices".into(),
                            )
                        });
                        self.check(ch.contains(&ans), || {
                            let list = ch
                                .iter()
                                .map(|c| format!("`{c}`"))
                                .collect::<Vec<_>>()
                                .join(", ");
                            at(
                                format!("{cp}.answer"),
                                format!("answer `{ans}` is not one of the choices: {list}"),
                            )
                        });
                    }
                },
            }
        }
    }

    fn group(&mut self, g: &Group, m: &Manifest) {
        let top: BTreeSet<&str> = m.runs.iter().map(|r| r.fields.id.as_str()).collect();
        let mut runs: Vec<&Run> = Vec::new();
        for r in &g.runs {
            match r {
                GroupRun::Inline(r) => runs.push(r),
                GroupRun::Ref(id, loc) => match m.runs.iter().find(|r| &r.fields.id == id) {
                    Some(r) => runs.push(r),
                    None => self.d.push(
                        loc.err(format!("group `{}` refers to unknown run `{id}`", g.name))
                            .help(format!("top-level runs: {}", list(&top))),
                    ),
                },
            }
        }
        let mut known: BTreeSet<&str> = top.clone();
        known.extend(runs.iter().map(|r| r.fields.id.as_str()));
        let inline: Vec<&Run> = g
            .runs
            .iter()
            .filter_map(|r| {
                if let GroupRun::Inline(r) = r {
                    Some(&**r)
                } else {
                    None
                }
            })
            .collect();
        self.runs(inline.into_iter(), &known);
        let mut ids = BTreeSet::new();
        for b in &g.benchmarks {
            self.check(ids.insert(b.id.clone()), || {
                b.loc.field(
                    "id",
                    format!(
                        "benchmark id `{}` is used twice in group `{}`",
                        b.id, g.name
                    ),
                )
            });
            self.benchmark(b, &runs);
        }
    }

    fn benchmark(&mut self, b: &Benchmark, runs: &[&Run]) {
        let has_teacher = runs.iter().any(|r| {
            r.fields
                .train
                .as_ref()
                .is_some_and(|t| t.teacher_ckpt.is_some())
        });
        let mut known: Vec<String> = vec!["student".into()];
        if has_teacher {
            known.push("teacher".into());
        }
        known.extend(runs.iter().map(|r| r.fields.id.clone()));
        self.check(!b.models.is_empty(), || {
            b.loc
                .field("models", "a benchmark needs at least one model")
        });
        for (i, name) in b.models.iter().enumerate() {
            if !known.contains(name) {
                let loc = b
                    .model_locs
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| b.loc.clone());
                let why = if name == "teacher" {
                    " (no run in this group has a `teacher_ckpt`)"
                } else {
                    ""
                };
                self.d.push(
                    loc.err(format!(
                        "benchmark `{}` refers to unknown model `{name}`{why}",
                        b.id
                    ))
                    .help(format!("models here: {}", known.join(", "))),
                );
            }
        }
        self.check(b.repeats > 0, || {
            b.loc.field("repeats", "`repeats` must be at least 1")
        });
        let at = |f: &str, msg: &str| b.loc.field_or_self(&format!("config.{f}"), msg.to_string());
        match &b.config {
            BenchConfig::Perplexity(c) => {
                self.check(c.block_size > 1, || {
                    at("block_size", "`block_size` must be at least 2")
                });
                self.check(c.num_batches > 0, || {
                    at("num_batches", "`num_batches` must be at least 1")
                });
                self.check(c.batch_size > 0, || {
                    at("batch_size", "`batch_size` must be at least 1")
                });
            }
            BenchConfig::Latency(c) => {
                self.check(!c.prompt_lengths.is_empty(), || {
                    at("prompt_lengths", "`prompt_lengths` must not be empty")
                });
                self.check(!c.generation_lengths.is_empty(), || {
                    at(
                        "generation_lengths",
                        "`generation_lengths` must not be empty",
                    )
                });
                self.check(c.timed_runs > 0, || {
                    at("timed_runs", "`timed_runs` must be at least 1")
                });
                self.check(!c.prompt_lengths.contains(&0), || {
                    at("prompt_lengths", "prompt lengths must be at least 1")
                });
            }
            BenchConfig::Memory(c) => {
                self.check(!c.sequence_lengths.is_empty(), || {
                    at("sequence_lengths", "`sequence_lengths` must not be empty")
                });
            }
            BenchConfig::Accuracy(c) => self.check(!c.tasks.is_empty(), || {
                at("tasks", "`tasks` must not be empty")
            }),
            BenchConfig::Generation(c) => {
                self.check(!c.prompts.is_empty(), || {
                    at("prompts", "`prompts` must not be empty")
                });
                self.check(c.temperature >= 0.0, || {
                    at("temperature", "`temperature` must not be negative")
                });
                if let Some(p) = c.top_p {
                    self.check(p > 0.0 && p <= 1.0, || {
                        at("top_p", "`top_p` must be in (0, 1]")
                    });
                }
            }
        }
    }
}

fn mode_name(m: AttentionMode) -> &'static str {
    match m {
        AttentionMode::Standard => "standard",
        AttentionMode::Gqa => "gqa",
        AttentionMode::Decoupled => "decoupled",
    }
}

/// A YAML value as the user wrote it, for messages.
fn show(v: &serde_yaml::Value) -> String {
    match v {
        serde_yaml::Value::String(s) => format!("the string \"{s}\""),
        serde_yaml::Value::Null => "nothing".into(),
        other => serde_yaml::to_string(other)
            .map(|s| s.trim_end().to_string())
            .unwrap_or_else(|_| format!("{other:?}")),
    }
}

fn list(set: &BTreeSet<&str>) -> String {
    if set.is_empty() {
        "(none)".into()
    } else {
        set.iter().copied().collect::<Vec<_>>().join(", ")
    }
}
