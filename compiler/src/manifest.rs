//! The manifest language: typed, strict (`deny_unknown_fields`) structs for
//! every section, and the parse stage that builds them from YAML, collecting
//! every error rather than stopping at the first.
//!
//! Tagged sections (topologies, layers, verify blocks, benchmark configs)
//! are dispatched on their `type` field by hand, so each element is checked
//! on its own and errors keep their exact positions.

use crate::de::from_node;
use crate::diag::{suggest, Diagnostic, Diagnostics, Span};
use crate::vars;
use crate::yaml::{self, Node, Value};
use serde::Deserialize;
use std::collections::BTreeMap;

/// A parsed manifest, after variable substitution.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub version: u32,
    pub name: String,
    pub notes: Option<String>,
    pub vars: BTreeMap<String, serde_yaml::Value>,
    pub defaults: Defaults,
    pub model: ModelSpec,
    /// Runs defined at the top level: referenced by id from groups, or the
    /// implicit `default` group when there are no groups.
    pub runs: Vec<Run>,
    pub groups: Vec<Group>,
    /// Benchmarks at the top level belong to the implicit `default` group.
    pub benchmarks: Vec<Benchmark>,
    /// The substituted YAML, for `--emit manifest` and run artifacts.
    pub resolved: serde_yaml::Value,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Defaults {
    pub tokenizer: Option<TokenizerRef>,
    pub data: Option<String>,
    pub val_frac: Option<f64>,
    pub instrument: Option<Instrument>,
    pub wandb: Option<bool>,
    pub wandb_project: Option<String>,
    pub wandb_entity: Option<String>,
    pub wandb_mode: Option<String>,
    pub eval_iters: Option<u64>,
    pub eval_every: Option<u64>,
    pub save_every: Option<u64>,
    pub device: Option<Device>,
    pub dtype: Option<DTypeSpec>,
    pub seed: Option<u64>,
    /// Where the section was written, for validation errors.
    #[serde(skip)]
    pub loc: Loc,
}

/// A tokenizer: a name (`llama`, `smollm2`, `gpt2`), a path to a
/// `tokenizer.json`, or `{type: tiktoken, encoding: cl100k_base}`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TokenizerRef {
    Name(String),
    Spec(TokenizerSpec),
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenizerSpec {
    #[serde(rename = "type")]
    pub kind: TokenizerKind,
    pub encoding: Option<String>,
    pub path: Option<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TokenizerKind {
    Tiktoken,
    Huggingface,
    Llama,
    Gguf,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Instrument {
    Rich,
    Plain,
    Json,
}

/// Where a run executes. `mps` is accepted for manifests written for the
/// original caramba and means wgpu (Metal on a Mac).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    Auto,
    Cpu,
    Cuda,
    Wgpu,
    Mps,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DTypeSpec {
    Auto,
    #[serde(alias = "f32", alias = "fp32")]
    Float32,
    #[serde(alias = "f16", alias = "fp16")]
    Float16,
    #[serde(alias = "bf16")]
    Bfloat16,
}

// ---------------------------------------------------------------- model ----

#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    pub embedder: Embedder,
    pub topology: Topology,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Embedder {
    #[serde(rename = "type", default = "token")]
    pub kind: String,
    pub vocab_size: usize,
    pub d_model: usize,
    /// The LM head reuses the token embedding matrix.
    #[serde(default, alias = "tied_embeddings")]
    pub tie_embeddings: bool,
}

fn token() -> String {
    "token".into()
}

/// Where an element sits in the manifest, for diagnostics.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Loc {
    pub path: String,
    pub span: Span,
    /// Positions of the values of the element's fields, and of the fields
    /// nested in them (`train.lr`, `verify.cases[0].answer`), for precise errors.
    pub fields: Vec<(String, Span)>,
}

impl Loc {
    pub fn of(node: &Node, path: &str) -> Loc {
        fn walk(node: &Node, prefix: &str, out: &mut Vec<(String, Span)>) {
            match &node.value {
                Value::Map(m) => {
                    for (k, v) in m {
                        let p = join(prefix, k.as_str().unwrap_or_default());
                        out.push((p.clone(), v.span));
                        walk(v, &p, out);
                    }
                }
                Value::Seq(xs) => {
                    for (i, x) in xs.iter().enumerate() {
                        let p = format!("{prefix}[{i}]");
                        out.push((p.clone(), x.span));
                        walk(x, &p, out);
                    }
                }
                _ => {}
            }
        }
        let mut fields = Vec::new();
        if node.as_map().is_some() {
            walk(node, "", &mut fields);
        }
        Loc {
            path: path.to_string(),
            span: node.span,
            fields,
        }
    }

    /// An error about the whole element.
    pub fn err(&self, msg: impl Into<String>) -> Diagnostic {
        Diagnostic::new(msg).path(self.path.clone()).at(self.span)
    }

    /// An error about one field, pointing at its value when it was written.
    pub fn field(&self, name: &str, msg: impl Into<String>) -> Diagnostic {
        match self.fields.iter().find(|(k, _)| k == name) {
            Some((_, span)) => Diagnostic::new(msg)
                .path(format!("{}.{name}", self.path))
                .at(*span),
            None => self.err(msg),
        }
    }

    /// Like [`Loc::field`], but for a field that may not have been written:
    /// then the error points at the element and still names the field's path.
    pub fn field_or_self(&self, name: &str, msg: impl Into<String>) -> Diagnostic {
        match self.fields.iter().find(|(k, _)| k == name) {
            Some((_, span)) => Diagnostic::new(msg)
                .path(format!("{}.{name}", self.path))
                .at(*span),
            None => Diagnostic::new(msg)
                .path(format!("{}.{name}", self.path))
                .at(self.span),
        }
    }

    pub fn has(&self, name: &str) -> bool {
        self.fields.iter().any(|(k, _)| k == name)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Topology {
    pub kind: TopologyKind,
    pub layers: Vec<Element>,
    pub loc: Loc,
}

/// How a topology composes its children. Semantics: ARCHITECTURE.md and the
/// README's manifest reference.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TopologyKind {
    Stacked,
    Sequential,
    Residual,
    Nested { repeat: usize },
    Parallel { combine: Combine },
    Branching,
    Cyclic { iterations: usize },
    Recurrent { steps: usize },
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Combine {
    Stack,
    Sum,
    Mean,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Element {
    Topology(Topology),
    Layer(Layer),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Layer {
    pub kind: LayerKind,
    pub loc: Loc,
}

#[derive(Clone, Debug, PartialEq)]
pub enum LayerKind {
    Attention(AttentionCfg),
    RmsNorm(NormCfg),
    LayerNorm(NormCfg),
    SwiGlu(SwiGluCfg),
    Linear(LinearCfg),
    Dropout(DropoutCfg),
    Rope(RopeCfg),
}

impl LayerKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            LayerKind::Attention(_) => "AttentionLayer",
            LayerKind::RmsNorm(_) => "RMSNormLayer",
            LayerKind::LayerNorm(_) => "LayerNormLayer",
            LayerKind::SwiGlu(_) => "SwiGLULayer",
            LayerKind::Linear(_) => "LinearLayer",
            LayerKind::Dropout(_) => "DropoutLayer",
            LayerKind::Rope(_) => "RoPE",
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AttentionMode {
    Standard,
    Gqa,
    Decoupled,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AttentionCfg {
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: Option<usize>,
    /// Defaults to `standard`, or `gqa` when `n_kv_heads < n_heads`.
    pub mode: Option<AttentionMode>,
    /// Per-head width for standard/GQA attention; defaults to d_model / n_heads.
    pub head_dim: Option<usize>,
    pub sem_dim: Option<usize>,
    pub geo_dim: Option<usize>,
    #[serde(default = "yes")]
    pub rope_enabled: bool,
    #[serde(default = "default_theta", alias = "rope_base")]
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScalingCfg>,
    pub decoupled_gate: Option<bool>,
    #[serde(default = "yes", alias = "is_causal")]
    pub causal: bool,
    #[serde(default, alias = "dropout")]
    pub dropout_p: f64,
    #[serde(default)]
    pub bias: bool,
}

impl AttentionCfg {
    pub fn n_kv(&self) -> usize {
        self.n_kv_heads.unwrap_or(self.n_heads)
    }

    pub fn mode(&self) -> AttentionMode {
        self.mode.unwrap_or(if self.n_kv() < self.n_heads {
            AttentionMode::Gqa
        } else {
            AttentionMode::Standard
        })
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.d_model / self.n_heads.max(1))
    }
}

fn yes() -> bool {
    true
}

fn default_theta() -> f64 {
    10000.0
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RopeScalingCfg {
    #[serde(rename = "type", alias = "rope_type")]
    pub kind: RopeScalingKind,
    pub factor: f64,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RopeScalingKind {
    Linear,
    Llama3,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NormCfg {
    pub d_model: usize,
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// LayerNorm only: learn a bias.
    #[serde(default = "yes")]
    pub bias: bool,
}

fn default_eps() -> f64 {
    1e-5
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SwiGluCfg {
    pub d_model: usize,
    pub d_ff: usize,
    #[serde(default)]
    pub bias: bool,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LinearCfg {
    pub d_in: usize,
    pub d_out: usize,
    #[serde(default)]
    pub bias: bool,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DropoutCfg {
    #[serde(alias = "p")]
    pub dropout_p: f64,
    pub d_model: Option<usize>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RopeCfg {
    pub d_model: usize,
    pub n_heads: usize,
    #[serde(default = "default_theta", alias = "rope_base")]
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScalingCfg>,
}

// ------------------------------------------------------ runs and groups ----

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunFields {
    pub id: String,
    pub mode: RunMode,
    /// A label from the original caramba (`baseline`, `gqa`, `dba_blockwise`, ...).
    pub exp: Option<String>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub steps: u64,
    pub data: Option<String>,
    /// Start from the weights another run produced.
    pub init_from: Option<String>,
    pub train: Option<TrainConfig>,
    pub expected: Option<serde_yaml::Value>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    pub fields: RunFields,
    pub verify: Option<Verify>,
    pub loc: Loc,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RunMode {
    Train,
    Sample,
    Chat,
    Eval,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Plain next-token training.
    #[default]
    Standard,
    /// Layer-by-layer distillation of attention outputs from the teacher.
    Blockwise,
    /// Whole-model fine-tuning (cross-entropy, optionally against the teacher).
    Global,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    #[default]
    Adamw,
    Lion,
    Sgd,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    #[default]
    Constant,
    Cosine,
    Linear,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    #[serde(default)]
    pub phase: Phase,
    pub batch_size: u64,
    pub block_size: u64,
    pub lr: f64,
    #[serde(default)]
    pub optimizer: OptimizerKind,
    #[serde(default)]
    pub weight_decay: f64,
    pub grad_clip: Option<f64>,
    #[serde(default)]
    pub schedule: Schedule,
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default = "one", alias = "grad_accum_steps")]
    pub gradient_accumulation_steps: u64,
    pub teacher_ckpt: Option<String>,
    pub device: Option<Device>,
    pub dtype: Option<DTypeSpec>,
    #[serde(default)]
    pub use_amp: bool,
    pub amp_dtype: Option<DTypeSpec>,
    pub convergence_target: Option<f64>,
    pub convergence_patience: Option<u64>,
    pub convergence_max_steps: Option<u64>,
    #[serde(default)]
    pub cache_teacher_outputs: bool,
    /// Recompute each layer's activations for its backward instead of
    /// keeping them from the forward (`recompute-layers`): on GPUs, a
    /// step's memory for about a third more compute. Layers are the blocks
    /// of nested topologies.
    #[serde(default)]
    pub activation_checkpointing: bool,
}

fn one() -> u64 {
    1
}

#[derive(Clone, Debug, PartialEq)]
pub enum Verify {
    Compare(CompareVerify),
    Eval(EvalVerify),
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CompareVerify {
    #[serde(default = "one")]
    pub batches: u64,
    #[serde(default = "yes")]
    pub fail_fast: bool,
    pub attention: Option<L1Thresholds>,
    pub logits: Option<L1Thresholds>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct L1Thresholds {
    pub max_mean_l1: f64,
    pub max_max_l1: f64,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalVerify {
    pub tokenizer: Option<TokenizerRef>,
    #[serde(default = "default_new_tokens")]
    pub max_new_tokens: u64,
    pub context_window: Option<u64>,
    pub cases: Vec<EvalCase>,
    pub thresholds: EvalThresholds,
}

fn default_new_tokens() -> u64 {
    32
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalCase {
    pub id: String,
    pub prompt: String,
    pub kind: EvalKind,
    pub answer: serde_yaml::Value,
    pub choices: Option<Vec<String>>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EvalKind {
    IntGreedy,
    ChoiceLogprob,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalThresholds {
    pub min_student_accuracy: Option<f64>,
    pub max_accuracy_drop: Option<f64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    pub name: String,
    pub description: Option<String>,
    pub data: Option<String>,
    pub runs: Vec<GroupRun>,
    pub benchmarks: Vec<Benchmark>,
    pub loc: Loc,
}

/// A group's run: defined in place, or a reference to a top-level run.
#[derive(Clone, Debug, PartialEq)]
pub enum GroupRun {
    Inline(Box<Run>),
    Ref(String, Loc),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Benchmark {
    pub id: String,
    pub config: BenchConfig,
    pub models: Vec<String>,
    pub repeats: u64,
    pub loc: Loc,
    /// Position of each entry of `models`, for reference errors.
    pub model_locs: Vec<Loc>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum BenchConfig {
    Perplexity(PerplexityBench),
    Latency(LatencyBench),
    Memory(MemoryBench),
    Accuracy(AccuracyBench),
    Generation(GenerationBench),
}

impl BenchConfig {
    pub fn type_name(&self) -> &'static str {
        match self {
            BenchConfig::Perplexity(_) => "perplexity",
            BenchConfig::Latency(_) => "latency",
            BenchConfig::Memory(_) => "memory",
            BenchConfig::Accuracy(_) => "accuracy",
            BenchConfig::Generation(_) => "generation",
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PerplexityBench {
    pub dataset: String,
    pub block_size: u64,
    #[serde(default = "one")]
    pub batch_size: u64,
    pub num_batches: u64,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LatencyBench {
    pub prompt_lengths: Vec<u64>,
    pub generation_lengths: Vec<u64>,
    #[serde(default = "one_list")]
    pub batch_sizes: Vec<u64>,
    #[serde(default = "three")]
    pub warmup_runs: u64,
    #[serde(default = "ten")]
    pub timed_runs: u64,
    #[serde(default = "yes")]
    pub use_cache: bool,
    pub cache_kind: Option<CacheKind>,
}

fn one_list() -> Vec<u64> {
    vec![1]
}
fn three() -> u64 {
    3
}
fn ten() -> u64 {
    10
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MemoryBench {
    pub sequence_lengths: Vec<u64>,
    #[serde(default = "one_list")]
    pub batch_sizes: Vec<u64>,
    #[serde(default = "fp16_list")]
    pub quantization_modes: Vec<CacheKind>,
    #[serde(default = "yes")]
    pub measure_peak: bool,
    #[serde(default = "yes")]
    pub measure_kvcache: bool,
}

fn fp16_list() -> Vec<CacheKind> {
    vec![CacheKind::Fp16]
}

/// KV-cache storage formats.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CacheKind {
    Fp32,
    Fp16,
    Q8,
    Q4,
    Nf4,
}

impl CacheKind {
    /// How caramba stores this kind (`lower_model_cached`).
    pub fn format(self) -> crate::CacheFormat {
        use caramba_ir::QuantFormat;
        match self {
            CacheKind::Fp32 => crate::CacheFormat::Fp32,
            CacheKind::Fp16 => crate::CacheFormat::Fp16,
            CacheKind::Q8 => crate::CacheFormat::Quant(QuantFormat::Q8),
            CacheKind::Q4 => crate::CacheFormat::Quant(QuantFormat::Q4),
            CacheKind::Nf4 => crate::CacheFormat::Quant(QuantFormat::Nf4),
        }
    }

    /// Storage per element in bits as caramba stores it, counting the
    /// per-block scales (an f32 per 32 values: q8 9 bits, q4/nf4 5).
    pub fn bits_per_element(self) -> f64 {
        self.format().bytes_per_value() * 8.0
    }

    pub fn name(self) -> &'static str {
        match self {
            CacheKind::Fp32 => "fp32",
            CacheKind::Fp16 => "fp16",
            CacheKind::Q8 => "q8",
            CacheKind::Q4 => "q4",
            CacheKind::Nf4 => "nf4",
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AccuracyBench {
    pub tasks: Vec<String>,
    pub limit: Option<u64>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GenerationBench {
    pub prompts: Vec<String>,
    #[serde(default = "default_new_tokens")]
    pub max_new_tokens: u64,
    #[serde(default)]
    pub temperature: f64,
    pub top_k: Option<u64>,
    pub top_p: Option<f64>,
}

// ---------------------------------------------------------------- parse ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    version: u32,
    name: String,
    notes: Option<String>,
}

const TOP_LEVEL: &[&str] = &[
    "version",
    "name",
    "notes",
    "vars",
    "defaults",
    "model",
    "runs",
    "groups",
    "benchmarks",
];

/// Parses manifest source text: YAML → variable substitution → typed sections.
pub fn parse(src: &str) -> Result<Manifest, Diagnostics> {
    let root = yaml::parse(src)?;
    if root.as_map().is_some_and(|m| m.is_empty()) {
        return Err(Diagnostic::new("the manifest is empty")
            .help("a manifest needs at least `version`, `name` and `model: {embedder: ..., topology: ...}`")
            .into());
    }
    if root.as_map().is_none() {
        return Err(Diagnostic::new(format!(
            "a manifest is a mapping of sections, found {}",
            root.kind()
        ))
        .at(root.span)
        .into());
    }
    let (tree, vars) = vars::substitute(&root)?;
    let mut p = P {
        diags: Diagnostics::default(),
    };

    for (k, _) in tree.as_map().unwrap_or_default() {
        let key = k.as_str().unwrap_or_default();
        if !TOP_LEVEL.contains(&key) {
            let mut d = Diagnostic::new(format!("unknown section `{key}`"))
                .path(key)
                .at(k.span);
            d = match suggest(key, TOP_LEVEL) {
                Some(s) => d.help(format!("did you mean `{s}`?")),
                None => d.help(format!("sections are {}", TOP_LEVEL.join(", "))),
            };
            p.diags.push(d);
        }
    }
    let header_node = Node::new(
        Value::Map(
            tree.as_map()
                .unwrap_or_default()
                .iter()
                .filter(|(k, _)| matches!(k.as_str(), Some("version" | "name" | "notes")))
                .cloned()
                .collect(),
        ),
        tree.span,
    );
    let header: Option<Header> = p.de(&header_node, "");
    let defaults = match tree.get("defaults") {
        Some(n) => Defaults {
            loc: Loc::of(n, "defaults"),
            ..p.de(n, "defaults").unwrap_or_default()
        },
        None => Defaults::default(),
    };
    let model = match tree.get("model") {
        Some(n) => p.model(n, "model"),
        None => {
            p.diags
                .push(Diagnostic::new("missing section `model`").help(
                    "every manifest declares its model: `model: {embedder: ..., topology: ...}`",
                ));
            None
        }
    };
    let runs = match tree.get("runs") {
        Some(n) => p.list(n, "runs", |p, n, path| p.run(n, &path)),
        None => Vec::new(),
    };
    let groups = match tree.get("groups") {
        Some(n) => p.list(n, "groups", |p, n, path| p.group(n, &path)),
        None => Vec::new(),
    };
    let benchmarks = match tree.get("benchmarks") {
        Some(n) => p.list(n, "benchmarks", |p, n, path| p.benchmark(n, &path)),
        None => Vec::new(),
    };
    match (header, model) {
        (Some(h), Some(model)) if p.diags.is_empty() => Ok(Manifest {
            version: h.version,
            name: h.name,
            notes: h.notes,
            vars: vars
                .iter()
                .map(|(k, v)| (k.clone(), v.to_serde()))
                .collect(),
            defaults,
            model,
            runs,
            groups,
            benchmarks,
            resolved: tree.to_serde(),
        }),
        _ => Err(p.diags),
    }
}

struct P {
    diags: Diagnostics,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl P {
    fn de<T: serde::de::DeserializeOwned>(&mut self, node: &Node, path: &str) -> Option<T> {
        match from_node(node, path) {
            Ok(v) => Some(v),
            Err(d) => {
                self.diags.push(d);
                None
            }
        }
    }

    fn list<T>(
        &mut self,
        node: &Node,
        path: &str,
        mut f: impl FnMut(&mut P, &Node, String) -> Option<T>,
    ) -> Vec<T> {
        match &node.value {
            Value::Seq(xs) => xs
                .iter()
                .enumerate()
                .filter_map(|(i, x)| f(self, x, format!("{path}[{i}]")))
                .collect(),
            Value::Null => Vec::new(),
            _ => {
                self.diags.push(
                    Diagnostic::new(format!("`{path}` must be a list, found {}", node.kind()))
                        .path(path)
                        .at(node.span),
                );
                Vec::new()
            }
        }
    }

    /// The `type` of a tagged mapping, checked against the known tags.
    fn tag<'n>(
        &mut self,
        node: &'n Node,
        path: &str,
        what: &str,
        known: &[&str],
    ) -> Option<&'n str> {
        let Some(_) = node.as_map() else {
            self.diags.push(
                Diagnostic::new(format!(
                    "a {what} must be a mapping with a `type`, found {}",
                    node.kind()
                ))
                .path(path)
                .at(node.span),
            );
            return None;
        };
        let Some(t) = node.get("type") else {
            self.diags.push(
                Diagnostic::new(format!("this {what} has no `type`"))
                    .path(path)
                    .at(node.span)
                    .help(format!("expected one of {}", known.join(", "))),
            );
            return None;
        };
        let Some(s) = t.as_str() else {
            self.diags.push(
                Diagnostic::new(format!("`type` must be a string, found {}", t.kind()))
                    .path(join(path, "type"))
                    .at(t.span),
            );
            return None;
        };
        if known.contains(&s) {
            return Some(s);
        }
        let mut d = Diagnostic::new(format!("unknown {what} type `{s}`"))
            .path(join(path, "type"))
            .at(t.span);
        d = match suggest(s, known) {
            Some(k) => d.help(format!(
                "did you mean `{k}`? expected one of {}",
                known.join(", ")
            )),
            None => d.help(format!("expected one of {}", known.join(", "))),
        };
        self.diags.push(d);
        None
    }

    fn model(&mut self, node: &Node, path: &str) -> Option<ModelSpec> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Shell {
            #[serde(rename = "type")]
            kind: Option<ModelType>,
            embedder: serde::de::IgnoredAny,
            topology: serde::de::IgnoredAny,
        }
        // Enum values are matched case-insensitively (lowercased).
        #[derive(Deserialize)]
        enum ModelType {
            #[serde(rename = "transformermodel")]
            TransformerModel,
        }
        self.de::<Shell>(node, path)?;
        let embedder = self.de::<Embedder>(node.get("embedder")?, &join(path, "embedder"));
        let topo_node = node.get("topology")?;
        let topology = self.topology(topo_node, &join(path, "topology"));
        Some(ModelSpec {
            embedder: embedder?,
            topology: topology?,
        })
    }

    fn topology(&mut self, node: &Node, path: &str) -> Option<Topology> {
        const TOPOLOGIES: &[&str] = &[
            "StackedTopology",
            "SequentialTopology",
            "ResidualTopology",
            "NestedTopology",
            "ParallelTopology",
            "BranchingTopology",
            "CyclicTopology",
            "RecurrentTopology",
        ];
        let Some(t) = self.tag(node, path, "topology", TOPOLOGIES) else {
            self.children(node, path);
            return None;
        };
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Fields {
            #[allow(dead_code)]
            layers: serde::de::IgnoredAny,
            repeat: Option<usize>,
            #[serde(alias = "iters")]
            iterations: Option<usize>,
            steps: Option<usize>,
            combine: Option<Combine>,
        }
        let loc = Loc::of(node, path);
        let f: Fields = self.de(&node.without(&["type"]), path)?;
        let mut bad = |field: &str, present: bool| {
            if present {
                self.diags
                    .push(loc.field(field, format!("`{field}` does not apply to {t}")));
            }
        };
        bad("repeat", f.repeat.is_some() && t != "NestedTopology");
        bad(
            "iterations",
            f.iterations.is_some() && t != "CyclicTopology",
        );
        bad("steps", f.steps.is_some() && t != "RecurrentTopology");
        bad("combine", f.combine.is_some() && t != "ParallelTopology");
        let kind = match t {
            "StackedTopology" => TopologyKind::Stacked,
            "SequentialTopology" => TopologyKind::Sequential,
            "ResidualTopology" => TopologyKind::Residual,
            "NestedTopology" => TopologyKind::Nested {
                repeat: f.repeat.unwrap_or(1),
            },
            "ParallelTopology" => TopologyKind::Parallel {
                combine: f.combine.unwrap_or(Combine::Stack),
            },
            "BranchingTopology" => TopologyKind::Branching,
            "CyclicTopology" => TopologyKind::Cyclic {
                iterations: f.iterations.unwrap_or(1),
            },
            _ => TopologyKind::Recurrent {
                steps: f.steps.unwrap_or(1),
            },
        };
        let layers_path = join(path, "layers");
        let layers = self.list(node.get("layers")?, &layers_path, |p, n, path| {
            p.element(n, &path)
        });
        Some(Topology { kind, layers, loc })
    }

    /// Checks the `layers` of an element whose own `type` is wrong, so that
    /// mistakes inside it are reported too.
    fn children(&mut self, node: &Node, path: &str) {
        if let Some(layers) = node.get("layers") {
            self.list(layers, &join(path, "layers"), |p, n, path| {
                p.element(n, &path)
            });
        }
    }

    fn element(&mut self, node: &Node, path: &str) -> Option<Element> {
        match node.get("type").and_then(Node::as_str) {
            Some(t) if t.ends_with("Topology") => self.topology(node, path).map(Element::Topology),
            _ => self.layer(node, path).map(Element::Layer),
        }
    }

    fn layer(&mut self, node: &Node, path: &str) -> Option<Layer> {
        const LAYERS: &[&str] = &[
            "AttentionLayer",
            "RMSNormLayer",
            "LayerNormLayer",
            "SwiGLULayer",
            "LinearLayer",
            "DropoutLayer",
            "RoPE",
            "StackedTopology",
            "SequentialTopology",
            "ResidualTopology",
            "NestedTopology",
            "ParallelTopology",
            "BranchingTopology",
            "CyclicTopology",
            "RecurrentTopology",
        ];
        let Some(t) = self.tag(node, path, "layer", LAYERS) else {
            self.children(node, path);
            return None;
        };
        let body = node.without(&["type"]);
        let loc = Loc::of(node, path);
        let kind = match t {
            "AttentionLayer" => LayerKind::Attention(self.de(&body, path)?),
            "RMSNormLayer" => {
                if let Some(b) = node.get("bias") {
                    self.diags.push(
                        Diagnostic::new("`bias` does not apply to RMSNormLayer")
                            .path(join(path, "bias"))
                            .at(b.span),
                    );
                }
                LayerKind::RmsNorm(self.de(&body, path)?)
            }
            "LayerNormLayer" => LayerKind::LayerNorm(self.de(&body, path)?),
            "SwiGLULayer" => LayerKind::SwiGlu(self.de(&body, path)?),
            "LinearLayer" => LayerKind::Linear(self.de(&body, path)?),
            "DropoutLayer" => LayerKind::Dropout(self.de(&body, path)?),
            _ => LayerKind::Rope(self.de(&body, path)?),
        };
        Some(Layer { kind, loc })
    }

    fn run(&mut self, node: &Node, path: &str) -> Option<Run> {
        let fields = self.de::<RunFields>(&node.without(&["verify"]), path);
        let verify = match node.get("verify") {
            Some(v) => Some(self.verify(v, &join(path, "verify"))?),
            None => None,
        };
        Some(Run {
            fields: fields?,
            verify,
            loc: Loc::of(node, path),
        })
    }

    fn verify(&mut self, node: &Node, path: &str) -> Option<Verify> {
        let t = self.tag(node, path, "verify block", &["compare", "eval"])?;
        let body = node.without(&["type"]);
        Some(match t {
            "compare" => Verify::Compare(self.de(&body, path)?),
            _ => Verify::Eval(self.de(&body, path)?),
        })
    }

    fn group(&mut self, node: &Node, path: &str) -> Option<Group> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Fields {
            name: String,
            description: Option<String>,
            data: Option<String>,
            #[allow(dead_code)]
            runs: Option<serde::de::IgnoredAny>,
            #[allow(dead_code)]
            benchmarks: Option<serde::de::IgnoredAny>,
        }
        let f: Option<Fields> = self.de(node, path);
        let runs = match node.get("runs") {
            Some(n) => self.list(n, &join(path, "runs"), |p, n, path| match &n.value {
                Value::Str(s) => Some(GroupRun::Ref(s.clone(), Loc::of(n, &path))),
                _ => p.run(n, &path).map(|r| GroupRun::Inline(Box::new(r))),
            }),
            None => Vec::new(),
        };
        let benchmarks = match node.get("benchmarks") {
            Some(n) => self.list(n, &join(path, "benchmarks"), |p, n, path| {
                p.benchmark(n, &path)
            }),
            None => Vec::new(),
        };
        let f = f?;
        Some(Group {
            name: f.name,
            description: f.description,
            data: f.data,
            runs,
            benchmarks,
            loc: Loc::of(node, path),
        })
    }

    fn benchmark(&mut self, node: &Node, path: &str) -> Option<Benchmark> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Fields {
            id: String,
            #[allow(dead_code)]
            config: serde::de::IgnoredAny,
            models: Vec<String>,
            #[serde(default = "one")]
            repeats: u64,
        }
        let f: Option<Fields> = self.de(node, path);
        let cfg_path = join(path, "config");
        let config = node.get("config").and_then(|c| {
            let t = self.tag(
                c,
                &cfg_path,
                "benchmark",
                &["perplexity", "latency", "memory", "accuracy", "generation"],
            )?;
            let body = c.without(&["type"]);
            Some(match t {
                "perplexity" => BenchConfig::Perplexity(self.de(&body, &cfg_path)?),
                "latency" => BenchConfig::Latency(self.de(&body, &cfg_path)?),
                "memory" => BenchConfig::Memory(self.de(&body, &cfg_path)?),
                "accuracy" => BenchConfig::Accuracy(self.de(&body, &cfg_path)?),
                _ => BenchConfig::Generation(self.de(&body, &cfg_path)?),
            })
        });
        let model_locs = match node.get("models").map(|m| &m.value) {
            Some(Value::Seq(xs)) => xs
                .iter()
                .enumerate()
                .map(|(i, x)| Loc::of(x, &format!("{path}.models[{i}]")))
                .collect(),
            _ => Vec::new(),
        };
        let f = f?;
        Some(Benchmark {
            id: f.id,
            config: config?,
            models: f.models,
            repeats: f.repeats,
            loc: Loc::of(node, path),
            model_locs,
        })
    }
}
