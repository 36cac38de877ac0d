//! `caramba run`: compile the manifest and execute its groups.
//!
//! Execution (training, distillation, benchmarks) is not in this version:
//! the command compiles, prints the plan it would execute, and says plainly
//! that it stopped there.

use super::{compile_file, CmdResult, Failure};
use crate::cli::RunArgs;
use caramba_compiler::plan;

pub fn run(a: &RunArgs) -> CmdResult {
    let c = compile_file(&a.manifest)?;
    if let Some(g) = &a.group {
        let names: Vec<String> = plan::groups(&c.manifest)
            .into_iter()
            .map(|g| g.name)
            .collect();
        if !names.contains(g) {
            return Err(Failure::usage(format!(
                "no group `{g}` in {}; groups: {}",
                a.manifest.display(),
                names.join(", ")
            )));
        }
    }
    print!("{}", plan::render(&c, a.group.as_deref()));
    println!();
    Err(Failure::runtime(
        "execution of runs is not implemented in this version of caramba: the manifest compiled and the plan above \
is what `run` will execute once training lands. Nothing was run and nothing was written.",
    ))
}
