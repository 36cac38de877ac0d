//! Compile-time benchmarks: parse → validate → lower for the presets.
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

criterion_group!(benches, compile);
criterion_main!(benches);
