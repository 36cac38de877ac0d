//! Forward-pass benchmark of the CPU reference backend on the real
//! SmolLM2-135M checkpoint (run `scripts/fixtures.sh` first):
//! `cargo bench --bench forward`.

use caramba::model::{open_checkpoint, Model};
use caramba_runtime::checkpoint::testing::{fixture_path, SMOLLM2_GGUF};
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;

fn forward(c: &mut Criterion) {
    let Some(path) = fixture_path(SMOLLM2_GGUF) else {
        return;
    };
    let ckpt = open_checkpoint(&path).unwrap_or_else(|e| panic!("{}", e.message));
    let model = Model::load(&ckpt).unwrap_or_else(|e| panic!("{}", e.message));
    let mut g = c.benchmark_group("smollm2_135m_cpu_forward");
    g.sample_size(10);
    for t in [64usize, 512] {
        let ids: Vec<u32> = (0..t as u32).map(|i| (i * 7919) % 49152).collect();
        g.bench_function(format!("T={t}"), |b| {
            b.iter(|| model.logits(black_box(&ids)).expect("forward"))
        });
    }
    g.finish();
}

criterion_group!(benches, forward);
criterion_main!(benches);
