//! GPU training throughput next to `scripts/bench_torch_train.py` (same
//! shapes, same card, same command): Llama-architecture models with random
//! weights, AdamW, next-token loss, f32, parameters, gradients and optimizer
//! state resident on the device (`DeviceTrainer`).
//!
//! ```text
//! cargo build --release --features cuda --example train_bench
//! target/release/examples/train_bench cuda [smollm2|llama1b] [batch] [seq] [steps]
//! ```
//!
//! Prints one JSON line per model: tokens/s over the timed steps (after one
//! warm-up step that compiles the kernels) and the model FLOPs utilization
//! by 6·N·tokens against the H100's dense f32 peak (67 TFLOP/s SXM, non
//! tensor core), the precision this run computes in.

use caramba_compiler::hf::{llama_model, LlamaDims};
use caramba_ir::autodiff::{add_next_token_loss, differentiate};
use caramba_ir::reference::{SymValues, Tensor};
use caramba_ir::*;
use caramba_runtime::backend::{Backend, DeviceTrainer};
use caramba_runtime::gpu::train::MicroBatch;
use caramba_runtime::train::{Optimizer, OptimizerConfig};
use std::collections::BTreeMap;
use std::time::Instant;

fn rand(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5) * scale
        })
        .collect()
}

fn main() {
    caramba::device_memory::install_panic_hook();
    let args: Vec<String> = std::env::args().collect();
    let backend = Backend::parse(args.get(1).map_or("auto", |s| s)).expect("backend");
    let which = args.get(2).map_or("smollm2", |s| s).to_string();
    let b: usize = args.get(3).map_or(4, |s| s.parse().expect("batch"));
    let t: usize = args.get(4).map_or(1024, |s| s.parse().expect("seq"));
    let steps: usize = args.get(5).map_or(3, |s| s.parse().expect("steps"));
    // `tf32` as the sixth argument: matmuls on tensor cores.
    let tf32 = args.get(6).is_some_and(|s| s == "tf32");
    // CARAMBA_BENCH_GEMM=cubek: every GEMM on cubek (default: cuBLASLt on
    // CUDA when it loads). CARAMBA_BENCH_BUFFERS=pooled|exact|planned:
    // where buffers come from (default for a trainer: planned).
    let options = caramba_runtime::gpu::GpuOptions {
        fast_matmul: tf32,
        gemm: match std::env::var("CARAMBA_BENCH_GEMM").as_deref() {
            Ok("cubek") => caramba_runtime::gpu::GemmLibrary::Cubek,
            _ => caramba_runtime::gpu::GemmLibrary::Vendor,
        },
        buffers: match std::env::var("CARAMBA_BENCH_BUFFERS").as_deref() {
            Ok("pooled") => Some(caramba_runtime::gpu::Buffers::Pooled),
            Ok("exact") => Some(caramba_runtime::gpu::Buffers::Exact),
            Ok("planned") | Err(_) => Some(caramba_runtime::gpu::Buffers::Planned),
            Ok(other) => panic!("CARAMBA_BENCH_BUFFERS={other:?}: pooled, exact or planned"),
        },
        ..Default::default()
    };
    let d = LlamaDims::benchmark_shape(&which)
        .unwrap_or_else(|| panic!("unknown model {which:?} (smollm2, llama1b or tiny)"));
    // `bf16` (or `f16`) as the sixth argument: mixed precision, as
    // `use_amp: true` trains (f32 weights and optimizer state, half
    // activations and products).
    let (precision, half) = match args.get(6).map(String::as_str) {
        Some("bf16") => (
            caramba_compiler::Precision::mixed(DType::BF16),
            Some("bf16"),
        ),
        Some("f16") => (caramba_compiler::Precision::mixed(DType::F16), Some("f16")),
        _ => (caramba_compiler::Precision::uniform(DType::F32), None),
    };
    eprintln!("precision: {precision:?}");
    let mut forward = caramba_compiler::lower_model_with(&llama_model(&d), &which, precision, None)
        .expect("lowering")
        .graph;
    add_next_token_loss(&mut forward, "logits").unwrap();
    forward.remove_output("logits");
    let names: Vec<String> = forward.params().map(|(n, _)| n.to_string()).collect();
    // As `caramba run` does: attention fused before differentiation (its
    // flash-style backward). CARAMBA_BENCH_PRIMITIVE_BACKWARD=1 differentiates
    // its primitives instead, for comparison (T × T matrices per layer).
    let primitive = std::env::var("CARAMBA_BENCH_PRIMITIVE_BACKWARD").is_ok_and(|v| v == "1");
    // CARAMBA_BENCH_WITHOUT naming fuse-linear-cross-entropy (below) keeps
    // the head's logits and the loss apart, for comparison.
    let linear_ce = !std::env::var("CARAMBA_BENCH_WITHOUT").is_ok_and(|w| {
        w.split(',')
            .any(|n| n.trim() == caramba_compiler::optimize::linear_ce::NAME)
    });
    let fused = if primitive {
        forward.clone()
    } else {
        caramba_compiler::optimize::fuse_for_training_with(&forward, linear_ce)
            .expect("fuse attention and norms")
    };
    let graph = differentiate(&fused, "loss", &names).expect("autodiff");
    // The forward attention also gives the backward its log-sum-exp.
    // CARAMBA_BENCH_RECOMPUTE_LSE=1 keeps `attention_lse` recomputing it,
    // for comparison.
    let recompute = std::env::var("CARAMBA_BENCH_RECOMPUTE_LSE").is_ok_and(|v| v == "1");
    let graph = if recompute {
        graph
    } else {
        caramba_compiler::reuse_attention_lse(&graph).expect("reuse attention's lse")
    };
    // As `caramba run` trains on GPUs: the joint graph optimized.
    let optimize = Instant::now();
    // CARAMBA_BENCH_TREE=1: extraction by tree costs, as before `extract.rs`.
    // CARAMBA_BENCH_WITHOUT=fuse-rope-matmul (a comma list): those rules
    // and passes left out, for A/B runs.
    let only = std::env::var("CARAMBA_BENCH_WITHOUT").ok().map(|without| {
        let left_out: Vec<&str> = without.split(',').map(str::trim).collect();
        caramba_compiler::optimize::rule_names()
            .into_iter()
            .filter(|n| !left_out.contains(n))
            .map(String::from)
            .collect()
    });
    let opts = caramba_compiler::optimize::Options {
        tree_extraction: std::env::var("CARAMBA_BENCH_TREE").is_ok_and(|v| v == "1"),
        only,
        ..Default::default()
    };
    let (graph, report) =
        caramba_compiler::optimize::optimize_with(&graph, &opts).expect("optimize");
    eprintln!(
        "training graph optimized in {:.2} s: {} nodes, modelled cost {:.3e} -> {:.3e}, \
         stopped by {:?} after {} iterations; rules applied: {:?}",
        optimize.elapsed().as_secs_f64(),
        graph.node_count(),
        report.cost_before,
        report.cost_after,
        report.stop,
        report.iterations,
        report.applied
    );
    // CARAMBA_BENCH_RECOMPUTE=1: activation checkpointing, each layer's
    // activations recomputed for its backward (`activation_checkpointing:
    // true` in a run).
    let graph = if std::env::var("CARAMBA_BENCH_RECOMPUTE").is_ok_and(|v| v == "1") {
        let (graph, layers) =
            caramba_compiler::recompute_layers(&graph, "loss").expect("recompute layers");
        eprintln!(
            "recompute-layers: {layers} layers recomputed, {} nodes",
            graph.node_count()
        );
        graph
    } else {
        graph
    };
    // CARAMBA_BENCH_DUMP=<file>: the optimized training graph's text form,
    // to see what each launch of the profile is.
    if let Ok(path) = std::env::var("CARAMBA_BENCH_DUMP") {
        std::fs::write(&path, caramba_ir::text::to_text(&graph)).expect("write the graph dump");
        eprintln!("training graph written to {path}");
    }
    let mut n_params = 0usize;
    let params: BTreeMap<String, Tensor> = forward
        .params()
        .enumerate()
        .map(|(i, (name, id))| {
            let shape: Vec<usize> = forward
                .node(id)
                .ty
                .shape
                .dims()
                .iter()
                .map(|x| x.as_const().unwrap())
                .collect();
            let n: usize = shape.iter().product();
            n_params += n;
            let data = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else {
                rand(n, i as u64 + 1, 0.04)
            };
            (name.to_string(), Tensor::f32(shape, data))
        })
        .collect();
    let optimizer = Optimizer::new(OptimizerConfig::adamw(0.1));
    let build = Instant::now();
    let mut trainer =
        DeviceTrainer::new(backend, &graph, None, &params, &optimizer, options).expect("trainer");
    eprintln!(
        "{which}: {n_params} parameters, batch {b} × {t}, trainer built in {:.1} s",
        build.elapsed().as_secs_f64()
    );
    let ids: Vec<i32> = (0..b * t)
        .map(|i| (i * 7919 % d.vocab_size) as i32)
        .collect();
    let mut inputs = BTreeMap::new();
    inputs.insert(
        "input_ids".to_string(),
        Tensor::i32(vec![b, t], ids.clone()),
    );
    inputs.insert("targets".to_string(), Tensor::i32(vec![b, t], ids));
    inputs.insert(
        "positions".to_string(),
        Tensor::i32(vec![t], (0..t as i32).collect()),
    );
    let syms = SymValues {
        b: Some(b),
        t: Some(t),
        ..Default::default()
    };
    let batch = [MicroBatch { inputs, syms }];
    let warm = Instant::now();
    let first = trainer.step(&batch, 1e-4, Some(1.0)).expect("warm-up step");
    eprintln!(
        "warm-up step (kernel compilation included): {:.1} s, loss {:.4}",
        warm.elapsed().as_secs_f64(),
        first.loss()
    );
    // A second step untimed: the buffer plan (a trainer's default) is
    // made from the first and its arenas allocated at the second.
    let second = Instant::now();
    trainer.step(&batch, 1e-4, Some(1.0)).expect("second step");
    eprintln!(
        "second step (the buffer plan made): {:.1} ms",
        second.elapsed().as_secs_f64() * 1e3
    );
    let start = Instant::now();
    let mut last = first.loss();
    // The host's share of each step: queuing the forward and backward,
    // waiting for the device, queuing the update (summed over the steps).
    let mut host = [0.0f64; 3];
    for _ in 0..steps {
        // Each step reads its loss back, so it is complete when it returns.
        let stats = trainer.step(&batch, 1e-4, Some(1.0)).expect("step");
        last = stats.loss();
        let t = stats.timing;
        for (h, d) in host.iter_mut().zip([t.issue, t.wait, t.update]) {
            *h += d.as_secs_f64() * 1e3 / steps as f64;
        }
    }
    let secs = start.elapsed().as_secs_f64() / steps as f64;
    let reserved = trainer.reserved_bytes();
    // The buffer plan (a trainer's default): its arenas against the most
    // bytes its values hold at once, and the first step's mark before it.
    if let Some(p) = trainer.buffer_plan() {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        eprintln!(
            "buffer plan: {} placed, arenas {:.2} GiB for a live peak of {:.2} GiB; {:.2} GiB \
             outlive a run; reserved {:.2} GiB before the plan, {:.2} GiB now; {} recorded, \
             {} replayed, {} off the recording",
            p.placed,
            gib(p.arena_bytes),
            gib(p.live_peak),
            gib(p.escaped),
            p.reserved_before.map_or(f64::NAN, gib),
            reserved.map_or(f64::NAN, gib),
            p.recorded,
            p.replayed,
            p.broken
        );
    }
    // CARAMBA_BENCH_PROFILE=1: one more step with every kernel waited for,
    // and where its time went.
    if std::env::var("CARAMBA_BENCH_PROFILE").is_ok_and(|v| v == "1") {
        drop(trainer);
        let options = caramba_runtime::gpu::GpuOptions {
            profile: true,
            ..options
        };
        let mut trainer = DeviceTrainer::new(backend, &graph, None, &params, &optimizer, options)
            .expect("trainer");
        // The first profiled step compiles kernels and grows the memory
        // pools; the second one alone is the steady state: the difference
        // of the two cumulative tables.
        trainer
            .step(&batch, 1e-4, Some(1.0))
            .expect("profiled step");
        let first = trainer.profile();
        trainer
            .step(&batch, 1e-4, Some(1.0))
            .expect("profiled step");
        let mut rows = trainer.profile();
        for r in &mut rows {
            if let Some(f) = first.iter().find(|f| f.op == r.op) {
                r.secs -= f.secs;
                r.host_secs -= f.host_secs;
                r.launches -= f.launches;
            }
        }
        rows.sort_by(|a, b| b.secs.total_cmp(&a.secs));
        let total: f64 = rows.iter().map(|r| r.secs).sum();
        eprintln!(
            "profile of one training step's forward + backward, each kernel waited for \
             (the optimizer's updates not included): {:.1} ms",
            total * 1e3
        );
        for r in rows.iter().take(40) {
            eprintln!(
                "  {:>9.2} ms {:>5.1}% ({:>7.2} ms host)  {:>5}×  {}",
                r.secs * 1e3,
                100.0 * r.secs / total,
                r.host_secs * 1e3,
                r.launches,
                r.op
            );
        }
        // Live buffers against the pools' pages: which of the two makes
        // the memory we hold beyond PyTorch's.
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        if let (Some(live), Some(values), Some(reserved)) = (
            trainer.peak_bytes_in_use(),
            trainer.peak_bytes_in_values(),
            trainer.reserved_bytes(),
        ) {
            eprintln!(
                "memory: {:.2} GiB of live buffers at the most between ops ({:.2} GiB in live values, \
                 the rest held for reuse), {:.2} GiB reserved by the pools",
                gib(live),
                gib(values),
                gib(reserved)
            );
        }
    }
    let tps = (b * t) as f64 / secs;
    // Model FLOPs (6·N per token) against the H100 SXM's dense peak for
    // the precision the products run in: f32 67, TF32 495, bf16/f16 989
    // TFLOP/s.
    let (label, peak) = match (half, tf32) {
        (Some(h), _) => (h, 989e12),
        (None, true) => ("tf32", 495e12),
        (None, false) => ("f32", 67e12),
    };
    let mfu = 6.0 * n_params as f64 * tps / peak;
    println!(
"{{\"name\": \"train_{which}_b{b}_t{t}_{label}{}\", \"impl\": \"caramba\", \"ms_per_step\": {:.1}, \"tokens_per_s\": {tps:.0}, \"mfu\": {mfu:.3}, \"peak_tflops\": {:.0}, \"loss\": {last:.4}, \"host_issue_ms\": {:.1}, \"host_wait_ms\": {:.1}, \"host_update_ms\": {:.1}, \"reserved_gib\": {}}}",
        if primitive { "_primitive_backward" } else { "" },
        secs * 1e3,
        peak / 1e12,
        host[0],
        host[1],
        host[2],
        reserved.map_or("null".to_string(), |r| format!("{:.1}", r as f64 / (1u64 << 30) as f64))
    );
}
