//! One module per subcommand; `dispatch` maps the parsed command line,
//! legacy flags included, onto them.

pub mod compile;
pub mod convert;
pub mod perplexity;
pub mod prepare;
pub mod run;
pub mod sample;

use crate::cli::{Cli, Command, DeviceArg, DtypeArg, GemmArg, LegacyMode, RunArgs, SampleArgs};
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
        Failure {
            message: format!("error: {}", message.into()),
            code: 2,
        }
    }

    pub fn runtime(message: impl Into<String>) -> Failure {
        Failure {
            message: format!("error: {}", message.into()),
            code: 1,
        }
    }
}

pub type CmdResult = Result<(), Failure>;

pub fn dispatch(cli: Cli) -> CmdResult {
    match cli.command {
        Some(Command::Compile(a)) => compile::compile(&a),
        Some(Command::Run(a)) => run::run(&a),
        Some(Command::Sample(a)) => sample::sample(&a),
        Some(Command::Perplexity(a)) => perplexity::perplexity(&a),
        Some(Command::Convert(a)) => convert::convert(&a),
        Some(Command::Prepare(a)) => prepare::prepare(&a),
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
            run::run(&RunArgs {
                manifest,
                group: None,
                data: l.data,
                resume: l.resume,
                seed: Some(l.seed),
                artifacts: "artifacts".into(),
                stop_after: None,
                device: None,
                tf32: false,
                gemm: GemmArg::Vendor,
            })
        }
        LegacyMode::Sample | LegacyMode::Chat => {
            let what = if mode == LegacyMode::Sample {
                "sample"
            } else {
                "chat"
            };
            let Some(ckpt) = l.ckpt else {
                return Err(Failure::usage(format!(
                    "--mode {what} needs --ckpt <checkpoint>"
                )));
            };
            if mode == LegacyMode::Chat {
                return Err(Failure::runtime(
                    "--mode chat is not available in this version (it arrives with KV-cached inference); \
use `caramba sample --ckpt ... --prompt ...`",
                ));
            }
            // The original's sample mode had no prompt flag; start from BOS.
            sample::sample(&SampleArgs {
                ckpt,
                prompt: String::new(),
                max_new_tokens: 64,
                temperature: 0.8,
                top_k: Some(50),
                top_p: Some(0.9),
                seed: l.seed,
                bos: true,
                stop_at_eos: true,
                dump_logits: None,
                tokenizer: None,
                ids: false,
                kv_cache: "fp32".into(),
                prefill_chunk: None,
                stats: false,
                profile: false,
                device: DeviceArg::Auto,
                tf32: false,
                gemm: GemmArg::Vendor,
                dtype: DtypeArg::F32,
            })
        }
    }
}

/// Reads a manifest file, mapping I/O errors to a usage failure.
pub fn read_manifest(path: &Path) -> Result<String, Failure> {
    std::fs::read_to_string(path)
        .map_err(|e| Failure::usage(format!("cannot read manifest {}: {e}", path.display())))
}

/// Compiles a manifest file, rendering diagnostics against its source.
pub fn compile_file(path: &Path) -> Result<caramba_compiler::Compiled, Failure> {
    let src = read_manifest(path)?;
    caramba_compiler::compile(&src).map_err(|d| Failure {
        message: d.render(&path.display().to_string(), &src),
        code: 2,
    })
}

/// The backend `--device` names: `auto` picks CUDA when compiled in and a
/// device is present, else a real wgpu GPU, else the CPU reference.
pub fn backend_for(d: DeviceArg) -> Result<caramba_runtime::backend::Backend, Failure> {
    backend_named(d, "--device".to_string())
}

/// [`backend_for`], errors naming where the device was asked for (`what`:
/// `--device`, or a manifest's field).
pub fn backend_named(
    d: DeviceArg,
    what: String,
) -> Result<caramba_runtime::backend::Backend, Failure> {
    use caramba_runtime::backend::Backend;
    let b = match d {
        DeviceArg::Auto => Backend::auto(),
        DeviceArg::Cpu => Backend::Cpu,
        DeviceArg::Wgpu => Backend::Wgpu,
        DeviceArg::Cuda => Backend::Cuda,
    };
    if b == Backend::Cuda && !cfg!(feature = "cuda") {
        return Err(Failure::usage(format!("{what} cuda: this binary was built without CUDA; rebuild with `cargo build --release --features cuda`")));
    }
    if !b.available() {
        return Err(Failure::usage(format!(
            "{what} {b}: no {b} device was found on this machine"
        )));
    }
    Ok(b)
}

/// `--group NAME` must name a group of the manifest.
pub fn check_group(
    c: &caramba_compiler::Compiled,
    manifest: &Path,
    group: Option<&str>,
) -> CmdResult {
    let Some(g) = group else { return Ok(()) };
    let names: Vec<String> = caramba_compiler::plan::groups(&c.manifest)
        .into_iter()
        .map(|g| g.name)
        .collect();
    if names.iter().any(|n| n == g) {
        Ok(())
    } else {
        Err(Failure::usage(format!(
            "no group `{g}` in {}; groups: {}",
            manifest.display(),
            names.join(", ")
        )))
    }
}
