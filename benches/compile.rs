//! Compile-time benchmarks: parse → validate → lower for the presets, and
//! the optimize stage (e-graph saturation, extraction, elementwise fusion)
//! on the lowered Llama 3.2 1B DBA model and its training graph.
//! `cargo bench --bench compile`.

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;

fn preset(name: &str) -> String {
    let path = format!("{}/presets/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

fn compile(c: &mut Criterion) {
    for name in ["llama32_1b_dba.yml", "smollm2_135m_dba.yml", "dba.yml"] {
        let src = preset(name);
        c.bench_function(&format!("compile {name}"), |b| {
            b.iter(|| caramba_compiler::compile(black_box(&src)).expect("preset compiles"))
        });
    }
}

/// The optimizer on the 1B DBA model's inference graph and on its f32
/// training graph (forward and backward), each with one layer optimized
/// and reused for the 15 identical ones (the default) and with the whole
/// graph saturated at once.
fn optimize(c: &mut Criterion) {
    use caramba_compiler::optimize::{optimize_with, Options};
    let src = preset("llama32_1b_dba.yml");
    let lowered = caramba_compiler::compile(&src).expect("preset compiles");
    let mut forward =
        caramba_compiler::lower_model(&lowered.manifest.model, "m", caramba_ir::DType::F32)
            .expect("lowers")
            .graph;
    caramba_ir::autodiff::add_next_token_loss(&mut forward, "logits").expect("loss");
    forward.remove_output("logits");
    let names: Vec<String> = forward.params().map(|(n, _)| n.to_string()).collect();
    let training = caramba_compiler::differentiate_for_training(&forward, "loss", &names)
        .expect("differentiates");
    for (what, g) in [
        ("llama32_1b_dba.yml", &lowered.student.graph),
        ("llama32_1b_dba.yml training", &training),
    ] {
        for (how, reuse_layers) in [("", true), (" (whole graph)", false)] {
            let opts = Options {
                reuse_layers,
                ..Options::default()
            };
            c.bench_function(&format!("optimize {what}{how}"), |b| {
                b.iter(|| optimize_with(black_box(g), &opts).expect("optimizes"))
            });
        }
    }
}

criterion_group!(benches, compile, optimize);
criterion_main!(benches);
