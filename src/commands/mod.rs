//! One module per subcommand; `dispatch` maps the parsed command line,
//! legacy flags included, onto them.

mod compile;
mod run;

use crate::cli::{Cli, Command, LegacyMode, RunArgs};
use std::path::Path;

/// A failure to report: the message (already formatted) and the exit code
/// (2 for the user's input, 1 for everything else).
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub code: u8,
}

impl Failure {
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure { message: format!("error: {}", message.into()), code: 2 }
    }

    pub fn runtime(message: impl Into<String>) -> Failure {
        Failure { message: format!("error: {}", message.into()), code: 1 }
    }
}

pub type CmdResult = Result<(), Failure>;

pub fn dispatch(cli: Cli) -> CmdResult {
    match cli.command {
        Some(Command::Compile(a)) => compile::compile(&a),
        Some(Command::Run(a)) => run::run(&a),
        None => legacy(cli),
    }
}

/// The original caramba's flag-only interface.
fn legacy(cli: Cli) -> CmdResult {
    let l = cli.legacy;
    let mode = l.mode.unwrap_or(LegacyMode::Train);
    match mode {
        LegacyMode::Train => {
            let Some(manifest) = l.manifest else {
                return Err(Failure::usage(
                    "no subcommand and no --manifest given\n\nTry `caramba --help`, or `caramba compile <manifest>`.",
                ));
            };
            if let Some(exp) = l.exp {
                eprintln!("note: --exp {exp:?} is a label; the manifest decides the architecture");
            }
            if l.entity.is_some() || l.project.is_some() {
                eprintln!("note: --entity/--project are recorded only when W&B logging is enabled in the manifest");
            }
            run::run(&RunArgs { manifest, group: None, data: l.data, resume: l.resume, seed: Some(l.seed) })
        }
        LegacyMode::Sample | LegacyMode::Chat => {
            let what = if mode == LegacyMode::Sample { "sample" } else { "chat" };
            match l.ckpt {
                None => Err(Failure::usage(format!("--mode {what} needs --ckpt <checkpoint>"))),
                Some(_) => Err(Failure::runtime(format!(
                    "--mode {what} is not available in this version: generation from checkpoints arrives with the CPU backend"
                ))),
            }
        }
    }
}

/// Reads a manifest file, mapping I/O errors to a usage failure.
pub fn read_manifest(path: &Path) -> Result<String, Failure> {
    std::fs::read_to_string(path).map_err(|e| Failure::usage(format!("cannot read manifest {}: {e}", path.display())))
}

/// Compiles a manifest file, rendering diagnostics against its source.
pub fn compile_file(path: &Path) -> Result<caramba_compiler::Compiled, Failure> {
    let src = read_manifest(path)?;
    caramba_compiler::compile(&src).map_err(|d| Failure { message: d.render(&path.display().to_string(), &src), code: 2 })
}
