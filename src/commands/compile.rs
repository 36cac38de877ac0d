//! `caramba compile`: parse → lower → validate, then print what was asked.

use super::{check_group, compile_file, CmdResult, Failure};
use crate::cli::{CompileArgs, Emit, StageArg, Which};
use caramba_compiler::plan;

pub fn compile(a: &CompileArgs) -> CmdResult {
    let c = compile_file(&a.manifest)?;
    check_group(&c, &a.manifest, a.group.as_deref())?;
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
