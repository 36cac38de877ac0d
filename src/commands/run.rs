//! `caramba run`: compile the manifest and execute its groups.
//!
//! Execution (training, distillation, benchmarks) is not in this version:
//! the command compiles, prints the plan it would execute, and says plainly
//! that it stopped there.

use super::{check_group, compile_file, CmdResult, Failure};
use crate::cli::RunArgs;
use caramba_compiler::plan;

pub fn run(a: &RunArgs) -> CmdResult {
    let c = compile_file(&a.manifest)?;
    check_group(&c, &a.manifest, a.group.as_deref())?;
    print!("{}", plan::render(&c, a.group.as_deref()));
    println!();
    Err(Failure::runtime(
        "execution of runs is not implemented in this version of caramba: the manifest compiled and the plan above \
is what `run` will execute once training lands. Nothing was run and nothing was written.",
    ))
}
