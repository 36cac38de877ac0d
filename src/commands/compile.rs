//! `caramba compile`: parse → lower → validate, then print what was asked.

use super::{check_group, compile_file, CmdResult, Failure};
use crate::cli::{CompileArgs, Emit, KernelTarget, StageArg, Which};
use caramba_compiler::plan;

pub fn compile(a: &CompileArgs) -> CmdResult {
    let c = compile_file(&a.manifest)?;
    check_group(&c, &a.manifest, a.group.as_deref())?;
    if a.target.is_some() && a.emit != Some(Emit::Kernels) {
        return Err(Failure::usage("--target only applies to `--emit kernels`"));
    }
    match a.emit {
        Some(Emit::Ir) => {
            let lowered = match a.model {
                Which::Student => &c.student,
                Which::Teacher => c.teacher.as_ref().ok_or_else(|| {
                    Failure::usage("this manifest has no teacher (no run sets `teacher_ckpt`)")
                })?,
            };
            let graph = match a.stage {
                StageArg::Lowered => lowered.graph.clone(),
                StageArg::Optimized => {
                    caramba_compiler::optimize(&lowered.graph)
                        .map_err(|e| {
                            Failure::runtime(format!("internal error: optimization failed: {e:?}"))
                        })?
                        .0
                }
            };
            print!("{}", caramba_ir::to_text(&graph));
        }
        Some(Emit::Kernels) => {
            let lowered = match a.model {
                Which::Student => &c.student,
                Which::Teacher => c.teacher.as_ref().ok_or_else(|| {
                    Failure::usage("this manifest has no teacher (no run sets `teacher_ckpt`)")
                })?,
            };
            // Kernels are always those of the optimized graph (what runs).
            let (graph, _) = caramba_compiler::optimize(&lowered.graph).map_err(|e| {
                Failure::runtime(format!("internal error: optimization failed: {e:?}"))
            })?;
            let target = match a.target.unwrap_or(KernelTarget::Wgsl) {
                KernelTarget::Wgsl => caramba_runtime::gpu::Target::Wgsl,
                KernelTarget::Cuda => caramba_runtime::gpu::Target::Cuda,
            };
            let kernels = caramba_runtime::gpu::kernel_sources(&graph, target);
            caramba_runtime::gpu::source::discard_log();
            let kernels = kernels
                .map_err(|e| Failure::runtime(format!("cannot generate kernel source: {e}")))?;
            print!("{}", render_kernels(&kernels));
        }
        Some(Emit::Manifest) => {
            let yaml = serde_yaml::to_string(&c.manifest.resolved)
                .map_err(|e| Failure::runtime(e.to_string()))?;
            print!("{yaml}");
        }
        None => {}
    }
    if a.print_plan {
        print!("{}", plan::render(&c, a.group.as_deref()));
        let (optimized, report) = caramba_compiler::optimize(&c.student.graph)
            .map_err(|e| Failure::runtime(format!("internal error: optimization failed: {e:?}")))?;
        println!();
        println!("kernels of the student (after the e-graph rewrites):");
        print!(
            "{}",
            plan::render_kernels(&c.student.layers, &optimized, &report)
        );
    }
    if a.emit.is_none() && !a.print_plan {
        let m = &c.manifest;
        println!(
            "ok: {} compiles — student {} parameters, {} IR nodes{}",
            m.name,
            plan::group_digits(c.student.graph.param_count()),
            c.student.graph.node_count(),
            c.teacher
                .as_ref()
                .map(|t| format!(
                    "; teacher {} parameters",
                    plan::group_digits(t.graph.param_count())
                ))
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// One section per kernel: a `// ===` header naming the node that first
/// launches it, then its source.
fn render_kernels(kernels: &[caramba_runtime::gpu::KernelSource]) -> String {
    let mut out = format!("// {} distinct kernels\n", kernels.len());
    for (i, k) in kernels.iter().enumerate() {
        out.push_str(&format!("\n// === kernel {}: {}\n", i + 1, k.title));
        out.push_str(&k.source);
        out.push('\n');
    }
    out
}
