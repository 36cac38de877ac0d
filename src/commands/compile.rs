//! `caramba compile`: parse → lower → validate, then print what was asked.

use super::{check_group, compile_file, CmdResult, Failure};
use crate::cli::{CompileArgs, Emit, Which};
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
            print!("{}", caramba_ir::to_text(&lowered.graph));
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
