//! Command-line arguments (clap). Each subcommand's help says what it does,
//! what it reads and writes, and gives an example.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "caramba",
    version,
    about = "A declarative graph compiler and runtime for neural-architecture research",
    long_about = "caramba compiles a YAML manifest — a model as a graph of topologies and layers, \
plus its runs, checks and benchmarks — into a typed dataflow IR and runs it.\n\n\
Pipeline: manifest → parse → lower → validate → optimize → kernels → run → verify → benchmark → artifacts.",
    after_help = "Examples:\n  caramba compile presets/dba.yml --emit ir\n  caramba compile presets/llama32_1b_dba.yml --print-plan\n  caramba run presets/tiny.yml\n\n\
Legacy mode (the original caramba's flags) is accepted without a subcommand:\n  caramba --manifest presets/tiny.yml --mode train --seed 1337",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub legacy: Legacy,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Compile a manifest (parse → lower → validate) and report errors
    #[command(
        long_about = "Compile a manifest: parse the YAML, substitute vars, check every field, lower the model \
to the typed IR and verify it. Errors name the manifest path, line and column, and exit with status 2.\n\n\
With no flag, prints a one-line summary per model.",
        after_help = "Examples:\n  caramba compile presets/dba.yml --emit ir\n  caramba compile presets/llama32_1b_dba.yml --print-plan --group quick\n  caramba compile presets/dba.yml --emit manifest\n  caramba compile presets/dba.yml --emit kernels --target wgsl\n  caramba compile presets/dba.yml --emit kernels --target cuda"
    )]
    Compile(CompileArgs),

    /// Run a manifest's groups: runs, verification, benchmarks, artifacts
    #[command(
        long_about = "Run the experiment a manifest describes: each group's runs in order, then its benchmarks. \
Each training run writes artifacts/<name>_<run>_<timestamp>/ with the resolved manifest, metrics.jsonl \
(step, loss, lr, grad norm, tokens/s, val loss) and checkpoints (weights, optimizer state, step, RNG state; \
written atomically). --resume <checkpoint> continues a run exactly.\n\n\
This version executes `mode: train` runs with `phase: standard` and `perplexity` benchmarks, on the \
device --device names (the CPU reference by default; on wgpu or cuda the forward, backward, optimizer and \
evaluation run on the GPU with weights and optimizer state kept there); a manifest that needs more (distillation phases, verify blocks, other benchmarks) \
is refused before anything runs, with the list of what is missing.",
        after_help = "Examples:\n  scripts/fixtures.sh && caramba run presets/tiny.yml\n  caramba run presets/tiny.yml --resume artifacts/tiny_train_20261126_120000/checkpoints/latest"
    )]
    Run(RunArgs),

    /// Generate text from a checkpoint (greedy at temperature 0)
    #[command(
        long_about = "Generate a continuation of a prompt with a pretrained checkpoint: a Hugging Face directory \
(config.json + model.safetensors), a .safetensors file next to its config.json, or a .gguf file (whose own \
metadata gives the tokenizer). No special tokens are added unless --bos is given. Temperature 0 is greedy \
decoding; otherwise tokens are sampled with --top-k / --top-p from a --seed.",
        after_help = "Examples:\n  caramba sample --ckpt .fixtures/SmolLM2-135M-Instruct.Q4_1.gguf --prompt \"The capital of France is\" --max-new-tokens 16 --temperature 0\n  caramba sample --ckpt model_dir --prompt \"Once upon a time\" --temperature 0.8 --top-p 0.9 --seed 7"
    )]
    Sample(SampleArgs),

    /// Perplexity of a checkpoint on a text file or a token file
    #[command(
        long_about = "Score a text (tokenized without special tokens) or a .npy of token ids with a checkpoint. \
The tokens are cut into windows of --block-size; each window is scored on every position after its first \
(the model predicts token i+1 from tokens 0..=i of its window). Prints the mean negative log-likelihood \
(nats per token) and `perplexity: exp(mean NLL)`.",
        after_help = "Example:\n  caramba perplexity --ckpt .fixtures/SmolLM2-135M-Instruct.Q4_1.gguf --text kjv.txt --max-tokens 1024 --block-size 1024"
    )]
    Perplexity(PerplexityArgs),

    /// Convert a GGUF file into a Hugging Face directory
    #[command(
        long_about = "Write config.json, model.safetensors (f32, Hugging Face tensor names, llama.cpp's Q/K row \
permutation undone) and tokenizer.json (built from the GGUF's tokenizer metadata) into <out_dir>. \
Supported tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_1. Each file is written atomically.",
        after_help = "Example:\n  caramba convert .fixtures/SmolLM2-135M-Instruct.Q4_1.gguf smollm2-hf/"
    )]
    Convert(ConvertArgs),

    /// Tokenize a corpus (.txt or .jsonl) into a .npy of token ids
    #[command(
        long_about = "Tokenize a corpus into a .npy file of token ids for training and perplexity (the original's \
prepare_fineweb.py). A .jsonl file is one document per line (the --field holds its text); a .txt file is one \
document. Documents are separated by the tokenizer's EOS token when it has one. Token ids are stored as \
uint16 when the vocabulary fits, else uint32. The output is written atomically.",
        after_help = "Example:\n  caramba prepare --tokenizer tokenizer.json --input kjv.jsonl --field text --output kjv_tokens.npy"
    )]
    Prepare(PrepareArgs),
}

/// Where models run.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum DeviceArg {
    /// CUDA if compiled in and present, else a real wgpu GPU, else the CPU
    Auto,
    /// The CPU reference backend
    Cpu,
    /// NVIDIA GPUs through CubeCL (binaries built with `--features cuda`)
    Cuda,
    /// Vulkan/Metal/DX12 through CubeCL (Mesa lavapipe on CPU-only machines)
    Wgpu,
}

/// What a checkpoint's model computes in.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum DtypeArg {
    /// f32 everywhere
    #[value(name = "f32", alias = "fp32", alias = "float32")]
    F32,
    /// bfloat16 weights and activations (norms and the softmax statistics
    /// in f32; every product accumulates in f32)
    #[value(name = "bf16", alias = "bfloat16")]
    Bf16,
    /// float16, as bf16
    #[value(name = "f16", alias = "fp16", alias = "float16")]
    F16,
}

impl From<DtypeArg> for caramba_ir::DType {
    fn from(d: DtypeArg) -> Self {
        match d {
            DtypeArg::F32 => caramba_ir::DType::F32,
            DtypeArg::Bf16 => caramba_ir::DType::BF16,
            DtypeArg::F16 => caramba_ir::DType::F16,
        }
    }
}

/// Who computes GPU matrix products.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum GemmArg {
    /// The vendor library where there is one (cuBLASLt on CUDA)
    Vendor,
    /// CubeCL's cubek kernels everywhere
    Cubek,
}

impl From<GemmArg> for caramba_runtime::gpu::GemmLibrary {
    fn from(g: GemmArg) -> Self {
        match g {
            GemmArg::Vendor => caramba_runtime::gpu::GemmLibrary::Vendor,
            GemmArg::Cubek => caramba_runtime::gpu::GemmLibrary::Cubek,
        }
    }
}

#[derive(Args, Debug)]
pub struct SampleArgs {
    /// Checkpoint: Hugging Face directory, .safetensors file, or .gguf file
    #[arg(long)]
    pub ckpt: PathBuf,
    /// The prompt text
    #[arg(long)]
    pub prompt: String,
    /// Number of tokens to generate
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Keep only the k most likely tokens
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches p
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Random seed for sampling
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
    /// Put the BOS token in front of the prompt
    #[arg(long)]
    pub bos: bool,
    /// Stop at the EOS token
    #[arg(long)]
    pub stop_at_eos: bool,
    /// Write the logits of every prompt position as f32 .npy (T, vocab)
    #[arg(long, value_name = "FILE")]
    pub dump_logits: Option<PathBuf>,
    /// Tokenizer file (tokenizer.json or .tiktoken) instead of the checkpoint's
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Print the token ids as well as the text
    #[arg(long)]
    pub ids: bool,
    /// KV cache storage: `none` (recompute the sequence every step, the
    /// head on the last position only), one
    /// format for every path (`fp32`, `fp16`, `q8`, `q4`, `nf4`), or per
    /// path, e.g. `k=q8,v=fp16` or `k_sem=q8,k_geo=q4,v=fp16` (paths not
    /// named stay fp32). Quantized paths need a multiple of 32 values per
    /// token (all heads together)
    #[arg(long, default_value = "fp32", value_name = "SPEC")]
    pub kv_cache: String,
    /// Run the prompt through the model N tokens at a time, each chunk over
    /// the cache of the ones before (default: all at once, or as many as
    /// the device's largest buffer holds the logits of, e.g. 682 tokens of
    /// SmolLM2 on lavapipe). Needs a KV cache
    #[arg(long, value_name = "N")]
    pub prefill_chunk: Option<usize>,
    /// Print prefill and decode timings and the KV-cache size to stderr
    #[arg(long)]
    pub stats: bool,
    /// On a GPU, wait for every kernel and print where the time went, per
    /// op kind, to stderr (slows the run: for finding bottlenecks)
    #[arg(long)]
    pub profile: bool,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Let GPU matmuls use tensor cores: TF32 on NVIDIA cards (about 3
    /// decimal digits, like PyTorch's `allow_tf32`). Off: exact f32
    #[arg(long)]
    pub tf32: bool,
    /// The model's dtype: weights are converted from the checkpoint (round
    /// to nearest even) and activations stored in it; on GPUs that lack the
    /// type, values are kept in f32 buffers rounded to it after each op
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// Who computes GPU matrix products: cuBLASLt on CUDA when
    /// `libcublasLt` is on the loader path (else cubek), or cubek always
    #[arg(long, value_enum, default_value_t = GemmArg::Vendor)]
    pub gemm: GemmArg,
}

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    /// Checkpoint: Hugging Face directory, .safetensors file, or .gguf file
    #[arg(long)]
    pub ckpt: PathBuf,
    /// A text file, tokenized without special tokens
    #[arg(long, conflicts_with = "data", required_unless_present = "data")]
    pub text: Option<PathBuf>,
    /// A .npy file of token ids
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Window length in tokens
    #[arg(long, default_value_t = 1024)]
    pub block_size: usize,
    /// Use only the first N tokens
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Tokenizer file instead of the checkpoint's
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Let GPU matmuls use tensor cores: TF32 on NVIDIA cards (about 3
    /// decimal digits, like PyTorch's `allow_tf32`). Off: exact f32
    #[arg(long)]
    pub tf32: bool,
    /// The model's dtype: weights are converted from the checkpoint (round
    /// to nearest even) and activations stored in it; on GPUs that lack the
    /// type, values are kept in f32 buffers rounded to it after each op
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// Who computes GPU matrix products: cuBLASLt on CUDA when
    /// `libcublasLt` is on the loader path (else cubek), or cubek always
    #[arg(long, value_enum, default_value_t = GemmArg::Vendor)]
    pub gemm: GemmArg,
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// The .gguf file
    pub gguf: PathBuf,
    /// The output directory (created if missing)
    pub out_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct PrepareArgs {
    /// Tokenizer: tokenizer.json, a .tiktoken rank file, or a .gguf file
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// The corpus: .txt or .jsonl
    #[arg(long)]
    pub input: PathBuf,
    /// The JSON field holding each document's text (.jsonl)
    #[arg(long, default_value = "text")]
    pub field: String,
    /// The .npy file to write
    #[arg(long)]
    pub output: PathBuf,
    /// No progress bar
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct CompileArgs {
    /// The manifest (YAML)
    pub manifest: PathBuf,
    /// Print what `run` would execute: groups, runs, benchmarks, parameter counts, KV-cache bytes per token, and the kernels of each layer with the rewrite rules that formed them
    #[arg(long)]
    pub print_plan: bool,
    /// Print an intermediate form
    #[arg(long, value_enum)]
    pub emit: Option<Emit>,
    /// Which model to emit with `--emit ir` or `--emit kernels`
    #[arg(long, value_enum, default_value_t = Which::Student)]
    pub model: Which,
    /// The kernel language `--emit kernels` prints (default: wgsl)
    #[arg(long, value_enum)]
    pub target: Option<KernelTarget>,
    /// Which stage of the IR `--emit ir` prints: as lowered (primitives), or after the e-graph rewrites and fusion
    #[arg(long, value_enum, default_value_t = StageArg::Lowered)]
    pub stage: StageArg,
    /// Restrict `--print-plan` to one group
    #[arg(long)]
    pub group: Option<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Emit {
    /// The lowered IR in its text form
    Ir,
    /// The manifest after variable substitution, as YAML
    Manifest,
    /// The generated source of each distinct GPU kernel the optimized graph launches (see `--target`)
    Kernels,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum KernelTarget {
    /// WGSL, from cubecl-wgpu's compiler, compiled offline for Mesa's lavapipe (needs no GPU, adapter or Vulkan driver)
    Wgsl,
    /// CUDA C++ for an H100 (sm_90), from cubecl-cpp's CUDA dialect, compiled offline (in a binary built with `--features cuda`; needs no GPU, driver or CUDA toolkit)
    Cuda,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum StageArg {
    Lowered,
    Optimized,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Which {
    Student,
    Teacher,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The manifest (YAML)
    pub manifest: PathBuf,
    /// Run only this group (default: every group in order)
    #[arg(long)]
    pub group: Option<String>,
    /// Override the dataset path of every run
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Resume from a checkpoint
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Override every run's seed
    #[arg(long)]
    pub seed: Option<u64>,
    /// Where run folders are created
    #[arg(long, default_value = "artifacts")]
    pub artifacts: PathBuf,
    /// Stop each run after this global step (saving a checkpoint), to resume later
    #[arg(long, value_name = "STEP")]
    pub stop_after: Option<u64>,
    /// Where training runs (on a GPU: forward, backward, the optimizer and
    /// evaluation, with weights and optimizer state kept on the device).
    /// Without it: each run's `device` in the manifest (its `train` block,
    /// else `defaults`), else the CPU reference
    #[arg(long, value_enum)]
    pub device: Option<DeviceArg>,
    /// Let GPU matmuls use tensor cores: TF32 on NVIDIA cards (about 3
    /// decimal digits, like PyTorch's `allow_tf32`). Off: exact f32
    #[arg(long)]
    pub tf32: bool,
    /// Who computes GPU matrix products: cuBLASLt on CUDA when
    /// `libcublasLt` is on the loader path (else cubek), or cubek always
    #[arg(long, value_enum, default_value_t = GemmArg::Vendor)]
    pub gemm: GemmArg,
}

/// The original caramba's flags, used when no subcommand is given.
#[derive(Args, Debug, Default)]
pub struct Legacy {
    /// [legacy] Path to the manifest file
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// [legacy] Run mode
    #[arg(long, value_enum)]
    pub mode: Option<LegacyMode>,
    /// [legacy] Experiment preset label
    #[arg(long, value_enum)]
    pub exp: Option<LegacyExp>,
    /// [legacy] Dataset path (train mode)
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// [legacy] Checkpoint path (sample/chat modes)
    #[arg(long)]
    pub ckpt: Option<PathBuf>,
    /// [legacy] Resume from a checkpoint (train mode)
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// [legacy] Random seed
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
    /// [legacy] W&B entity label
    #[arg(long)]
    pub entity: Option<String>,
    /// [legacy] W&B project label
    #[arg(long)]
    pub project: Option<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum LegacyMode {
    Train,
    Sample,
    Chat,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum LegacyExp {
    Baseline,
    Gqa,
    Bottleneck,
    Decoupled,
}
