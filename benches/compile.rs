//! Compile-time benchmarks: parse → validate → lower for the presets, and
//! the optimize stage (e-graph saturation, extraction, elementwise fusion)
//! on the lowered Llama 3.2 1B DBA model.
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

fn optimize(c: &mut Criterion) {
    let src = preset("llama32_1b_dba.yml");
    let lowered = caramba_compiler::compile(&src).expect("preset compiles");
    c.bench_function("optimize llama32_1b_dba.yml", |b| {
        b.iter(|| caramba_compiler::optimize(black_box(&lowered.student.graph)).expect("optimizes"))
    });
}

criterion_group!(benches, compile, optimize);
criterion_main!(benches);
