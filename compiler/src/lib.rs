//! caramba's compiler: manifests to typed IR to plans. It never touches a device.
//!
//! The pipeline, one function per stage:
//!
//! ```text
//! source ─ yaml::parse ─ vars::substitute ─ manifest::parse ─ validate ─ lower ─ optimize ─ plan
//! ```

pub mod de;
pub mod diag;
pub mod hf;
pub mod last_position;
pub mod lower;
pub mod manifest;
pub mod optimize;
pub mod plan;
pub mod validate;
pub mod vars;
pub mod yaml;

pub use diag::{Diagnostic, Diagnostics, Span};
pub use last_position::{last_position, LAST_POSITION};
pub use lower::{
    lower_model, lower_model_cached, lower_model_with, CacheEntry, CacheFormat, KvCacheSpec,
    LayerInfo, Lowered, Precision,
};
pub use manifest::Manifest;
pub use optimize::{
    differentiate_for_training, fold_weights, fuse_for_training, optimize, recompute_layers,
    reuse_attention_lse, OptimizeError, OptimizeReport, Stage, TrainGraphError,
};

use caramba_ir::DType;
use manifest::{AttentionMode, Element, LayerKind, ModelSpec, Topology};

/// A compiled manifest: the typed manifest and its lowered models.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub manifest: Manifest,
    pub student: Lowered,
    /// The teacher, when a run distills from a checkpoint (`teacher_ckpt`).
    pub teacher: Option<Lowered>,
}

/// parse → validate → lower.
pub fn compile(src: &str) -> Result<Compiled, Diagnostics> {
    let manifest = manifest::parse(src)?;
    validate::validate(&manifest)?;
    let student = lower_model(&manifest.model, &manifest.name, DType::F32)?;
    let wants_teacher = manifest
        .runs
        .iter()
        .chain(manifest.groups.iter().flat_map(|g| {
            g.runs.iter().filter_map(|r| match r {
                manifest::GroupRun::Inline(r) => Some(&**r),
                manifest::GroupRun::Ref(..) => None,
            })
        }))
        .any(|r| {
            r.fields
                .train
                .as_ref()
                .is_some_and(|t| t.teacher_ckpt.is_some())
        });
    let teacher = if wants_teacher {
        Some(lower_model(
            &teacher_of(&manifest.model),
            &format!("{}_teacher", manifest.name),
            DType::F32,
        )?)
    } else {
        None
    };
    Ok(Compiled {
        manifest,
        student,
        teacher,
    })
}

/// The teacher of an upcycle: the same model with every decoupled attention
/// layer replaced by the standard/GQA attention it was cut from
/// (head_dim = d_model / n_heads, RoPE as configured).
pub fn teacher_of(m: &ModelSpec) -> ModelSpec {
    fn topo(t: &Topology) -> Topology {
        Topology {
            kind: t.kind,
            loc: t.loc.clone(),
            layers: t
                .layers
                .iter()
                .map(|e| match e {
                    Element::Topology(t) => Element::Topology(topo(t)),
                    Element::Layer(l) => {
                        let mut l = l.clone();
                        if let LayerKind::Attention(a) = &mut l.kind {
                            if a.mode() == AttentionMode::Decoupled {
                                a.mode = Some(if a.n_kv() < a.n_heads {
                                    AttentionMode::Gqa
                                } else {
                                    AttentionMode::Standard
                                });
                                a.sem_dim = None;
                                a.geo_dim = None;
                                a.decoupled_gate = None;
                                a.head_dim = None;
                            }
                        }
                        Element::Layer(l)
                    }
                })
                .collect(),
        }
    }
    ModelSpec {
        embedder: m.embedder.clone(),
        topology: topo(&m.topology),
    }
}

/// The model at test size: heads kept, head dims of 4 (DBA: 2 + 2 a
/// head), d_ff 16 and a vocabulary of 97, when it is large (d_model over
/// 256 or a vocabulary over 4096); small models as they are. The whole-graph
/// tests run every preset this way, on the reference and on each device.
pub fn reduced(m: &ModelSpec) -> ModelSpec {
    let d0 = m.embedder.d_model;
    if d0 <= 256 && m.embedder.vocab_size <= 4096 {
        return m.clone();
    }
    let heads = {
        fn find(t: &Topology) -> Option<usize> {
            t.layers.iter().find_map(|e| match e {
                Element::Topology(t) => find(t),
                Element::Layer(l) => match &l.kind {
                    LayerKind::Attention(a) => Some(a.n_heads),
                    _ => None,
                },
            })
        }
        find(&m.topology).unwrap_or(4)
    };
    let d = heads * 4;
    let w = |x: usize| if x == d0 { d } else { x };
    fn walk(t: &mut Topology, f: &dyn Fn(&mut LayerKind)) {
        for e in &mut t.layers {
            match e {
                Element::Topology(t) => walk(t, f),
                Element::Layer(l) => f(&mut l.kind),
            }
        }
    }
    let mut m = m.clone();
    m.embedder.d_model = d;
    m.embedder.vocab_size = 97;
    walk(&mut m.topology, &|k| match k {
        LayerKind::Attention(a) => {
            a.d_model = w(a.d_model);
            a.head_dim = a.head_dim.map(|_| 4);
            a.sem_dim = a.sem_dim.map(|_| a.n_heads * 2);
            a.geo_dim = a.geo_dim.map(|_| a.n_heads * 2);
        }
        LayerKind::RmsNorm(n) | LayerKind::LayerNorm(n) => n.d_model = w(n.d_model),
        LayerKind::SwiGlu(s) => {
            s.d_model = w(s.d_model);
            s.d_ff = 16;
        }
        LayerKind::Linear(l) => {
            l.d_in = w(l.d_in);
            l.d_out = w(l.d_out);
        }
        LayerKind::Rope(r) => r.d_model = w(r.d_model),
        LayerKind::Dropout(x) => x.d_model = x.d_model.map(w),
    });
    m
}
