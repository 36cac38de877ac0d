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
        after_help = "Examples:\n  caramba compile presets/dba.yml --emit ir\n  caramba compile presets/llama32_1b_dba.yml --print-plan --group quick\n  caramba compile presets/dba.yml --emit manifest"
    )]
    Compile(CompileArgs),

    /// Run a manifest's groups: runs, verification, benchmarks, artifacts
    #[command(
        long_about = "Run the experiment a manifest describes. This version compiles the manifest and prints \
the plan `run` would execute; executing runs arrives with the training issue, and the command says so \
instead of pretending.",
        after_help = "Example:\n  caramba run presets/llama32_1b_dba.yml --group quick"
    )]
    Run(RunArgs),
}

#[derive(Args, Debug)]
pub struct CompileArgs {
    /// The manifest (YAML)
    pub manifest: PathBuf,
    /// Print what `run` would execute: groups, runs, benchmarks, parameter counts, KV-cache bytes per token
    #[arg(long)]
    pub print_plan: bool,
    /// Print an intermediate form
    #[arg(long, value_enum)]
    pub emit: Option<Emit>,
    /// Which model to emit with `--emit ir`
    #[arg(long, value_enum, default_value_t = Which::Student)]
    pub model: Which,
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
