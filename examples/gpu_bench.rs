//! GPU benchmarks of caramba's kernels and a model forward pass, printed as
//! JSON lines next to `scripts/bench_torch.py` (same shapes) so one command
//! on the GPU machine gives both sides on the same card:
//!
//! ```text
//! cargo build --release --features cuda --example gpu_bench
//! target/release/examples/gpu_bench cuda; python3 scripts/bench_torch.py
//! ```
//!
//! `CARAMBA_BENCH_ONLY=rmsnorm,gemm` (a comma list of `rmsnorm`,
//! `attention`, `gemm`, `kvdecode`, `decode`, `smollm2`, `llama1b`) runs only
//! those cases; `decode` is SmolLM2-shaped cached generation, with a per-op
//! profile; `smollm2` and `llama1b` are the models' forward and loss at
//! batch 8 × 1024 (f32, or `gpu_bench cuda bf16` / `tf32`).
//! `CARAMBA_BENCH_ATTN=bf16` keeps the `attention` case's bf16 shapes only
//! (for a profiler: three shapes, 30 launches each, in the order listed).
//! `CARAMBA_BENCH_KV=q4` (a comma list of `q8`, `q4`, `nf4`, `fp32`) keeps
//! those of the `kvdecode` case's cache formats.
//! `CARAMBA_BENCH_UNFOLDED=1` optimizes the models as before the norm fold:
//! projections unmerged and no `fuse-norm-matmul` (for A/B runs).
//! `CARAMBA_BENCH_WITHOUT=fuse-rope-matmul` (a comma list of rule and pass
//! names) optimizes the models without those (for A/B runs).
//! `CARAMBA_BENCH_GEMM=cubek` puts every GEMM on cubek instead of cuBLASLt
//! (the `gemm` case times both). `CARAMBA_BENCH_GEMMS=gemm4096x2048x8192_bf16`
//! (a comma list of the names it prints) keeps those of its lines.
//!
//! The executor reads its outputs back after each run, so a kernel's time is
//! measured as the difference between a chain of N copies of it and a chain
//! of none, both ending in a scalar reduction, divided by N.

use caramba_compiler::hf::{llama_model, LlamaDims};
use caramba_ir::autodiff::add_next_token_loss;
use caramba_ir::reference::{Bindings, SymValues, Tensor};
use caramba_ir::*;
use caramba_runtime::backend::{Backend, Executor};
use caramba_runtime::gpu::{GemmLibrary, GpuOptions};
use std::collections::BTreeMap;
use std::time::Instant;

/// A tensor type of the benchmarks' float dtype (`PER_OP_DTYPE`: f32
/// unless a case switches it).
fn f32ty(shape: &[usize]) -> TensorType {
    let dtype = PER_OP_DTYPE.with(|d| d.get());
    TensorType::new(dtype, Shape::new(shape.iter().map(|&d| Dim::Const(d))))
}

fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

/// Sum of everything, as a scalar output.
fn total(g: &mut Graph, mut x: NodeId) -> NodeId {
    let r = g.node(x).ty.shape.rank();
    for axis in 0..r {
        x = g
            .add(
                Op::Reduce {
                    op: ReduceOp::Sum,
                    axis,
                },
                &[x],
                "sum",
            )
            .unwrap();
    }
    x = g.add(Op::Reshape(Shape::scalar()), &[x], "sum").unwrap();
    g.set_output("out", x);
    x
}

thread_local! {
    /// The dtype of `per_op`'s tensors (the `gemm` case's bf16 lines).
    static PER_OP_DTYPE: std::cell::Cell<DType> = const { std::cell::Cell::new(DType::F32) };
    /// The options the executors here are built with. The `gemm` case
    /// switches them per line; elsewhere `CARAMBA_BENCH_GEMM=cubek` puts
    /// every GEMM on cubek (default: cuBLASLt on CUDA when it loads).
    static OPTIONS: std::cell::Cell<GpuOptions> = std::cell::Cell::new(GpuOptions {
        gemm: match std::env::var("CARAMBA_BENCH_GEMM").as_deref() {
            Ok("cubek") => GemmLibrary::Cubek,
            _ => GemmLibrary::Vendor,
        },
        ..Default::default()
    });
}

fn bench_options() -> GpuOptions {
    OPTIONS.with(|o| o.get())
}

/// The model graphs' optimizer: every rule, or with
/// `CARAMBA_BENCH_UNFOLDED=1` the optimizer before the norm fold
/// (projections not merged, no `fuse-norm-matmul`); with
/// `CARAMBA_BENCH_TREE=1`, extraction by tree costs (before `extract.rs`);
/// `CARAMBA_BENCH_WITHOUT` leaves the rules and passes it lists out.
fn optimize_model(g: &Graph) -> Graph {
    use caramba_compiler::optimize::{optimize_with, rule_names, Options};
    let mut opts = if std::env::var("CARAMBA_BENCH_UNFOLDED").is_ok_and(|v| v == "1") {
        Options {
            only: Some(
                rule_names()
                    .into_iter()
                    .filter(|n| *n != "fuse-norm-matmul")
                    .map(String::from)
                    .collect(),
            ),
            merge_projections: false,
            ..Options::default()
        }
    } else {
        Options::default()
    };
    opts.tree_extraction = std::env::var("CARAMBA_BENCH_TREE").is_ok_and(|v| v == "1");
    if let Ok(without) = std::env::var("CARAMBA_BENCH_WITHOUT") {
        let left_out: Vec<&str> = without.split(',').map(str::trim).collect();
        let kept = opts
            .only
            .take()
            .unwrap_or_else(|| rule_names().into_iter().map(String::from).collect());
        opts.only = Some(
            kept.into_iter()
                .filter(|n| !left_out.contains(&n.as_str()))
                .collect(),
        );
    }
    optimize_with(g, &opts).expect("optimize").0
}

/// A model as `caramba sample` and `perplexity` load it: optimized
/// ([`optimize_model`]), random weights, and the values made from the
/// weights alone (merged projections' stacked weights) made once, in place
/// of the weights they were made from (`fold-weights`).
fn loaded_model(g: &Graph) -> (Graph, BTreeMap<String, Tensor>) {
    let g = optimize_model(g);
    let params = random_params(&g);
    let f = caramba_compiler::fold_weights(&g, &params).expect("fold weights");
    (f.graph, f.params)
}

fn time_graph(backend: Backend, g: &Graph, params: &BTreeMap<String, Tensor>, iters: usize) -> f64 {
    let exec = Executor::with_options(backend, g, params, bench_options()).expect("executor");
    let b = Bindings::new(params);
    exec.run(&b).expect("warm-up");
    let start = Instant::now();
    for _ in 0..iters {
        exec.run(&b).expect("run");
    }
    start.elapsed().as_secs_f64() * 1e3 / iters as f64
}

/// Milliseconds per application of `op` to `x` (shape kept), by chain difference.
fn per_op(
    backend: Backend,
    name: &str,
    shape: &[usize],
    extra: &[(&str, Vec<usize>)],
    n: usize,
    apply: impl Fn(&mut Graph, NodeId, &[NodeId]) -> NodeId,
) -> f64 {
    let mut params = BTreeMap::new();
    let numel: usize = shape.iter().product();
    params.insert("x".to_string(), Tensor::f32(shape.to_vec(), rand(numel, 1)));
    for (i, (p, s)) in extra.iter().enumerate() {
        params.insert(
            p.to_string(),
            Tensor::f32(s.clone(), rand(s.iter().product(), 2 + i as u64)),
        );
    }
    let build = |k: usize| {
        let mut g = Graph::new(name);
        let mut x = g.param("x", f32ty(shape), "x").unwrap();
        let ex: Vec<NodeId> = extra
            .iter()
            .map(|(p, s)| g.param(p, f32ty(s), p).unwrap())
            .collect();
        for _ in 0..k {
            x = apply(&mut g, x, &ex);
        }
        total(&mut g, x);
        g
    };
    let t0 = time_graph(backend, &build(0), &params, 5);
    let tn = time_graph(backend, &build(n), &params, 5);
    (tn - t0) / n as f64
}

fn emit(name: &str, ms: f64, key: &str, value: f64) {
    println!(
        "{{\"name\": \"{name}\", \"impl\": \"caramba\", \"ms\": {ms:.4}, \"{key}\": {value:.2}}}"
    );
}

/// Whether case `name` is selected by `CARAMBA_BENCH_ONLY` (all when unset).
fn selected(name: &str) -> bool {
    listed("CARAMBA_BENCH_ONLY", name)
}

/// Whether the comma list in `var` names `name` (true when `var` is unset).
fn listed(var: &str, name: &str) -> bool {
    match std::env::var(var) {
        Ok(list) => list.split(',').any(|c| c.trim() == name),
        Err(_) => true,
    }
}

fn main() {
    let which = std::env::args().nth(1).unwrap_or_else(|| "auto".into());
    let backend = Backend::parse(&which).expect("backend");
    eprintln!("backend: {backend}");
    // No copy case of our own: a chain of elementwise ops fuses into one
    // kernel, and one op fuses into the scalar reduction that ends every
    // timed graph, so neither measures a copy. The bandwidth ceiling is
    // `bench_torch.py`'s `copy` line, in the same command.
    let n = 16384 * 4096;
    // RMSNorm 16384 × 4096, f32 and bf16 (a bf16 model's: the normalized
    // row rounded before the weight), and its two gradients in bf16 (dx
    // reads x and dy and writes dx; dw reads x and dy, chained through w).
    if selected("rmsnorm") {
        let eps = Scalar(1e-5);
        for dtype in [DType::F32, DType::BF16] {
            PER_OP_DTYPE.with(|d| d.set(dtype));
            let ms = per_op(
                backend,
                "rmsnorm",
                &[16384, 4096],
                &[("w", vec![4096])],
                10,
                |g, x, e| g.add(Op::RmsNorm { eps }, &[x, e[0]], "rms").unwrap(),
            );
            let size = dtype.size() as f64;
            emit(
                &format!("rmsnorm_{dtype}"),
                ms,
                "gbps",
                2.0 * size * n as f64 / ms / 1e6,
            );
        }
        PER_OP_DTYPE.with(|d| d.set(DType::BF16));
        let s = vec![16384, 4096];
        let grad = |wrt| Op::RmsNormGrad { eps, wrt };
        let ms = per_op(
            backend,
            "rmsnorm_grad_x",
            &s,
            &[("w", vec![4096]), ("dy", s.clone())],
            10,
            |g, x, e| g.add(grad(NormArg::X), &[x, e[0], e[1]], "dx").unwrap(),
        );
        emit(
            "rmsnorm_grad_x_bf16",
            ms,
            "gbps",
            3.0 * 2.0 * n as f64 / ms / 1e6,
        );
        let ms = per_op(
            backend,
            "rmsnorm_grad_w",
            &[4096],
            &[("xx", s.clone()), ("dy", s.clone())],
            10,
            |g, w, e| g.add(grad(NormArg::W), &[e[0], w, e[1]], "dw").unwrap(),
        );
        emit(
            "rmsnorm_grad_w_bf16",
            ms,
            "gbps",
            2.0 * 2.0 * n as f64 / ms / 1e6,
        );
        PER_OP_DTYPE.with(|d| d.set(DType::F32));
    }
    // The generated elementwise kernels over 16384 × 4096, f32 and bf16:
    // SwiGLU's `silu(a)·b` (one fused program, as the optimizer makes it:
    // two reads and a write) and a residual add, each chained (its output
    // the next one's `a`). `bench_torch.py`'s `elementwise` case runs the
    // same in eager and compiled PyTorch, with the copy beside them.
    if selected("elementwise") {
        let swiglu = ElemProgram(vec![
            ElemInstr::Input(0),
            ElemInstr::Unary(UnaryOp::Silu, 0),
            ElemInstr::Input(1),
            ElemInstr::Binary(BinaryOp::Mul, 1, 2),
        ]);
        let s = vec![16384, 4096];
        for dtype in [DType::F32, DType::BF16] {
            PER_OP_DTYPE.with(|d| d.set(dtype));
            let bytes = 3.0 * dtype.size() as f64 * n as f64;
            let ms = per_op(backend, "swiglu", &s, &[("b", s.clone())], 10, |g, x, e| {
                g.add(Op::Elementwise(swiglu.clone()), &[x, e[0]], "swiglu")
                    .unwrap()
            });
            emit(&format!("swiglu_{dtype}"), ms, "gbps", bytes / ms / 1e6);
            let ms = per_op(backend, "add", &s, &[("b", s.clone())], 10, |g, x, e| {
                g.add(Op::Binary(BinaryOp::Add), &[x, e[0]], "add").unwrap()
            });
            emit(&format!("add_{dtype}"), ms, "gbps", bytes / ms / 1e6);
        }
        PER_OP_DTYPE.with(|d| d.set(DType::F32));
    }
    // Causal attention, H32 T4096: f32 at B1 (head dim 64 and 128), bf16
    // at B4 as `bench_torch.py`'s SDPA lines (head dim 64 and 128, and
    // DBA's 12: sem 128 + geo 256 over 32 heads, values 12 dims too, as
    // lowering makes them).
    let attention_cases = [
        (DType::F32, 1usize, 64usize, 3usize),
        (DType::F32, 1, 128, 3),
        (DType::BF16, 4, 64, 5),
        (DType::BF16, 4, 128, 5),
        (DType::BF16, 4, 12, 5),
    ];
    // `CARAMBA_BENCH_ATTN=bf16` (or `f32`) keeps one storage's cases, for
    // profiling one kernel.
    let attn_dtype = std::env::var("CARAMBA_BENCH_ATTN").ok();
    for (dtype, b, hd, n) in attention_cases {
        if !selected("attention")
            || attn_dtype
                .as_deref()
                .is_some_and(|want| want != dtype.to_string())
        {
            continue;
        }
        PER_OP_DTYPE.with(|d| d.set(dtype));
        let s = vec![b, 32, 4096, hd];
        let ms = per_op(
            backend,
            "attention",
            &s,
            &[("k", s.clone()), ("v", s.clone())],
            n,
            |g, q, e| {
                g.add(
                    Op::Attention {
                        causal: true,
                        scale: Scalar(1.0 / (hd as f64).sqrt()),
                    },
                    &[q, e[0], e[1]],
                    "attn",
                )
                .unwrap()
            },
        );
        PER_OP_DTYPE.with(|d| d.set(DType::F32));
        let flops = 4.0 * b as f64 * 32.0 * 4096.0 * 4096.0 * hd as f64 / 2.0;
        let kind = if hd == 12 {
            "attention_dba"
        } else {
            "attention"
        };
        let name = format!("{kind}_causal_hd{hd}_{dtype}_b{b}");
        emit(&name, ms, "tflops", flops / ms / 1e9);
    }
    // GEMM 4096³.
    if selected("gemm") {
        // cubek against cuBLASLt, exact f32 and TF32, on a square GEMM and
        // the 1B shape's MLP projection (B2 × T2048 rows).
        let base = bench_options();
        for (m, k, n) in [(512, 512, 512), (4096, 4096, 4096), (4096, 2048, 8192)] {
            for (label, gemm, tf32, dtype) in [
                ("f32_cubek", GemmLibrary::Cubek, false, DType::F32),
                ("f32", GemmLibrary::Vendor, false, DType::F32),
                ("tf32_cubek", GemmLibrary::Cubek, true, DType::F32),
                ("tf32", GemmLibrary::Vendor, true, DType::F32),
                ("bf16_cubek", GemmLibrary::Cubek, false, DType::BF16),
                ("bf16", GemmLibrary::Vendor, false, DType::BF16),
            ] {
                let name = format!("gemm{m}x{k}x{n}_{label}");
                if !listed("CARAMBA_BENCH_GEMMS", &name) {
                    continue;
                }
                PER_OP_DTYPE.with(|d| d.set(dtype));
                OPTIONS.with(|o| {
                    o.set(GpuOptions {
                        gemm,
                        fast_matmul: tf32,
                        ..base
                    })
                });
                // A chain needs a square weight; a [k, n] product is timed
                // as x·W then ·Wᵀ-shaped back ([n, k]), halved.
                let ms = if k == n {
                    per_op(
                        backend,
                        "gemm",
                        &[m, k],
                        &[("w", vec![k, n])],
                        5,
                        |g, x, e| g.add(Op::MatMul, &[x, e[0]], "mm").unwrap(),
                    )
                } else {
                    per_op(
                        backend,
                        "gemm",
                        &[m, k],
                        &[("w", vec![k, n]), ("w2", vec![n, k])],
                        3,
                        |g, x, e| {
                            let y = g.add(Op::MatMul, &[x, e[0]], "up").unwrap();
                            g.add(Op::MatMul, &[y, e[1]], "down").unwrap()
                        },
                    ) / 2.0
                };
                emit(&name, ms, "tflops", 2.0 * (m * k * n) as f64 / ms / 1e9);
            }
        }
        OPTIONS.with(|o| o.set(base));
        PER_OP_DTYPE.with(|d| d.set(DType::F32));
    }
    // Decode attention over a quantized KV cache at 32k context: B4, 32
    // query heads over 8 kv heads, head dim 128, one new token; q8 and q4
    // (the tensor-core kernel where the device has one), NF4 and f32 (the
    // CUDA-core kernel); `CARAMBA_BENCH_KV` keeps some of them.
    if selected("kvdecode") {
        use caramba_ir::QuantFormat;
        let formats = [
            ("q8", Some(QuantFormat::Q8)),
            ("q4", Some(QuantFormat::Q4)),
            ("nf4", Some(QuantFormat::Nf4)),
            ("fp32", None),
        ];
        for (label, format) in formats
            .into_iter()
            .filter(|(l, _)| listed("CARAMBA_BENCH_KV", l))
        {
            let ms = kv_decode(backend, format);
            let (b, s, kv, d) = (4usize, 32768usize, 8usize, 128usize);
            let per_value = format.map_or(4.0, |f| f.bytes_per_value());
            let bytes = 2.0 * (b * s * kv * d) as f64 * per_value;
            emit(
                &format!("kv_decode_{label}_b4_h32_kv8_d128_s32768"),
                ms,
                "gbps",
                bytes / ms / 1e6,
            );
        }
    }
    if selected("decode") {
        smollm2_decode(backend);
    }
    // The models' forward + loss: `smollm2`, then `llama1b`.
    for which in ["smollm2", "llama1b"] {
        if selected(which) {
            model_forward(backend, which);
        }
    }
}

/// A model-shaped forward + loss (`smollm2` or `llama1b`), random weights,
/// batch 8 × 1024, in f32 (`tf32` on tensor cores) or bf16 by the second
/// argument; then a profile of one run.
fn model_forward(backend: Backend, which: &str) {
    let dims = LlamaDims::benchmark_shape(which).expect("a benchmark shape");
    // `gpu_bench cuda bf16`: the model in bf16 (weights and activations).
    let dtype = match std::env::args().nth(2).as_deref() {
        Some("bf16") => DType::BF16,
        _ => DType::F32,
    };
    let mut g = caramba_compiler::lower_model(&llama_model(&dims), which, dtype)
        .unwrap()
        .graph;
    add_next_token_loss(&mut g, "logits").unwrap();
    // Only the loss comes back, as with PyTorch's `.loss` (reading the
    // 1.6 GB of logits back to the host took most of an earlier run).
    g.remove_output("logits");
    let (g, params) = loaded_model(&g);
    // `gpu_bench cuda tf32`: the model's matmuls on tensor cores.
    let tf32 = std::env::args().nth(2).is_some_and(|s| s == "tf32");
    let options = GpuOptions {
        fast_matmul: tf32,
        ..bench_options()
    };
    let exec = Executor::with_options(backend, &g, &params, options).expect("executor");
    let (b, t) = (8usize, 1024usize);
    let ids: Vec<i32> = (0..b * t)
        .map(|i| (i * 7919 % dims.vocab_size) as i32)
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
    let mut bind = Bindings::new(&params);
    bind.syms = SymValues::default();
    for (k, v) in inputs {
        bind = bind.input(&k, v);
    }
    let bind = bind.sym(Sym::B, b).sym(Sym::T, t);
    exec.run(&bind).expect("warm-up");
    let iters = 5;
    let start = Instant::now();
    for _ in 0..iters {
        exec.run(&bind).expect("run");
    }
    let ms = start.elapsed().as_secs_f64() * 1e3 / iters as f64;
    let label = match (tf32, dtype) {
        (true, _) => "tf32",
        (false, DType::BF16) => "bf16",
        _ => "f32",
    };
    emit(
        &format!("{which}_forward_loss_b8_t1024_{label}"),
        ms,
        "tokens_per_s",
        (b * t) as f64 / ms * 1e3,
    );
    // Where the time goes: one profiled run (each kernel waited for).
    let options = GpuOptions {
        profile: true,
        ..bench_options()
    };
    let exec = Executor::with_options(backend, &g, &params, options).expect("executor");
    exec.run(&bind).expect("profiled run");
    let rows = exec.profile();
    let total: f64 = rows.iter().map(|r| r.secs).sum();
    eprintln!(
        "profile of one {which} forward + loss ({:.1} ms in kernels):",
        total * 1e3
    );
    for r in rows.iter().take(20) {
        eprintln!(
            "  {:>8.2} ms {:>5.1}%  {:>4}×  ({:>7.1} µs host each)  {}",
            r.secs * 1e3,
            100.0 * r.secs / total,
            r.launches,
            r.host_secs * 1e6 / r.launches as f64,
            r.op
        );
    }
}

/// Small random weights (uniform in ±0.02) for every parameter of `g`.
fn random_params(g: &Graph) -> BTreeMap<String, Tensor> {
    g.params()
        .map(|(name, id)| {
            let shape: Vec<usize> = g
                .node(id)
                .ty
                .shape
                .dims()
                .iter()
                .map(|d| d.as_const().unwrap())
                .collect();
            let n = shape.iter().product();
            (
                name.to_string(),
                Tensor::f32(shape, rand(n, 7).into_iter().map(|v| v * 0.04).collect()),
            )
        })
        .collect()
}

/// SmolLM2-135M-shaped cached generation (random weights, fp32 cache), as
/// `caramba sample` runs it: a 16-token prefill, then one token per step
/// with the cache resident on the device and the logits read back. Prints
/// tokens/s, then a profile of 16 more steps (each kernel waited for) with
/// the host's share of each op.
fn smollm2_decode(backend: Backend) {
    use caramba_compiler::{CacheFormat, KvCacheSpec};
    let lowered = caramba_compiler::lower_model_cached(
        &llama_model(&LlamaDims::benchmark_shape("smollm2").expect("a benchmark shape")),
        "smollm2",
        DType::F32,
        KvCacheSpec::uniform(CacheFormat::Fp32),
    )
    .unwrap();
    let (g, params) = loaded_model(&lowered.graph);
    // The prompt's tokens (`CARAMBA_BENCH_DECODE_CONTEXT`, default 16):
    // each step then attends over that many positions and more.
    let context: usize = std::env::var("CARAMBA_BENCH_DECODE_CONTEXT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let run = |exec: &Executor, steps: usize| -> f64 {
        let mut device = BTreeMap::new();
        let mut host = BTreeMap::new();
        for e in &lowered.cache {
            host.insert(
                format!("past.{}", e.name),
                Tensor::f32(vec![1, 0, e.width], Vec::new()),
            );
        }
        let mut pos = 0usize;
        let mut start = Instant::now();
        for step in 0..=steps {
            let t = if step == 0 { context } else { 1 };
            host.insert(
                "input_ids".to_string(),
                Tensor::i32(
                    vec![1, t],
                    (0..t).map(|i| ((pos + i) * 7919 % 49152) as i32).collect(),
                ),
            );
            host.insert(
                "positions".to_string(),
                Tensor::i32(vec![t], (pos as i32..(pos + t) as i32).collect()),
            );
            let syms = SymValues {
                b: Some(1),
                t: Some(t),
                p: Some(pos),
                ..Default::default()
            };
            // The cache moved in, room made for every step's rows: each
            // step appends in place (`CARAMBA_NO_APPEND=1` copies it).
            let mut out = exec
                .run_appending(&host, std::mem::take(&mut device), syms, context + steps)
                .expect("decode step");
            host.retain(|k, _| !k.starts_with("past."));
            for e in &lowered.cache {
                let c = out.remove(&format!("present.{}", e.name)).expect("cache");
                device.insert(format!("past.{}", e.name), c);
            }
            exec.download(&out["logits"]).expect("logits");
            pos += t;
            if step == 0 {
                start = Instant::now();
            }
        }
        start.elapsed().as_secs_f64() * 1e3 / steps as f64
    };
    let exec = Executor::with_options(backend, &g, &params, bench_options()).expect("executor");
    run(&exec, 8);
    let steps = 64;
    let ms = run(&exec, steps);
    let name = match context {
        16 => "smollm2_decode_fp32_cache".to_string(),
        n => format!("smollm2_decode_fp32_cache_ctx{n}"),
    };
    emit(&name, ms, "tokens_per_s", 1e3 / ms);
    eprintln!(
        "caches appended in place: {} (decode steps × caches: {})",
        exec.appends_in_place(),
        (steps + 8) * lowered.cache.len()
    );
    let options = GpuOptions {
        profile: true,
        ..bench_options()
    };
    let exec = Executor::with_options(backend, &g, &params, options).expect("executor");
    run(&exec, 16);
    let rows = exec.profile();
    let rows: Vec<_> = rows.into_iter().collect();
    let (total, host): (f64, f64) = rows
        .iter()
        .fold((0.0, 0.0), |(a, b), r| (a + r.secs, b + r.host_secs));
    eprintln!(
        "profile of 17 decode calls: {:.1} ms with every kernel waited for, {:.1} ms of it in launch calls on the host",
        total * 1e3,
        host * 1e3
    );
    for r in rows.iter().take(16) {
        eprintln!(
            "  {:>8.2} ms {:>5.1}%  {:>5}×  {:>7.1} µs each, {:>7.1} µs host  {}",
            r.secs * 1e3,
            100.0 * r.secs / total,
            r.launches,
            r.secs * 1e6 / r.launches as f64,
            r.host_secs * 1e6 / r.launches as f64,
            r.op
        );
    }
}

/// Milliseconds per decode-step attention (T = 1) over a KV cache of 32768
/// positions in `format` (fp32 when `None`), by chain difference.
fn kv_decode(backend: Backend, format: Option<caramba_ir::QuantFormat>) -> f64 {
    let (b, s, kv, g, d) = (4usize, 32768usize, 8usize, 4usize, 128usize);
    let w = kv * d;
    let cache = |seed: u64| -> Tensor {
        let x = rand(b * s * w, seed);
        match format {
            None => Tensor::f32(vec![b, s, w], x),
            Some(f) => {
                let words = f.words(w).unwrap();
                let mut out = vec![0i32; b * s * words];
                for (o, row) in out.chunks_mut(words).zip(x.chunks(w)) {
                    f.quantize_row(row, o);
                }
                Tensor::i32(vec![b, s, words], out)
            }
        }
    };
    let mut params = BTreeMap::new();
    params.insert(
        "q".to_string(),
        Tensor::f32(vec![b, kv, g, 1, d], rand(b * kv * g * d, 1)),
    );
    params.insert("k".to_string(), cache(2));
    params.insert("v".to_string(), cache(3));
    let ty = |t: &Tensor| {
        let dt = if t.dtype() == DType::I32 {
            DType::I32
        } else {
            DType::F32
        };
        TensorType::new(dt, Shape::new(t.shape().iter().map(|&x| Dim::Const(x))))
    };
    let part = caramba_ir::KvPart { format, dim: d };
    let build = |n: usize| {
        let mut gr = Graph::new("kv_decode");
        let mut x = gr.param("q", ty(&params["q"]), "q").unwrap();
        let k = gr.param("k", ty(&params["k"]), "k").unwrap();
        let v = gr.param("v", ty(&params["v"]), "v").unwrap();
        for _ in 0..n {
            let op = Op::KvAttention {
                causal: true,
                scale: Scalar(1.0 / (d as f64).sqrt()),
                heads: kv,
                parts: vec![part, part],
            };
            x = gr.add(op, &[x, k, v], "attn").unwrap();
        }
        total(&mut gr, x);
        gr
    };
    let n = 20;
    let t0 = time_graph(backend, &build(0), &params, 5);
    let tn = time_graph(backend, &build(n), &params, 5);
    (tn - t0) / n as f64
}
