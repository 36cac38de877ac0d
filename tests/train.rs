//! Training on the CPU reference backend: the loop learns, resumes exactly,
//! and refuses bad data and bad resumes with clear errors.

use caramba::train::{forward_backward, init_params, train, train_graph, TrainOptions};
use caramba_compiler::Precision;
use caramba_ir::reference::{eval, Bindings, Tensor};
use caramba_ir::{AttnArg, DType, NormArg, Sym};
use caramba_runtime::backend::Backend;
use caramba_runtime::data::write_tokens;
use caramba_runtime::data::NpyDtype;
use caramba_runtime::rng::SplitMix64;
use caramba_runtime::train::{Optimizer, OptimizerConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("caramba-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn manifest(data: &Path, steps: u64, extra_defaults: &str) -> String {
    format!(
        r#"
version: 1
name: tiny_test
defaults:
  data: {data}
  val_frac: 0.1
  eval_iters: 2
  save_every: 10
{extra_defaults}
model:
  embedder: {{vocab_size: 32, d_model: 32, tie_embeddings: true}}
  topology:
    type: StackedTopology
    layers:
      - type: NestedTopology
        repeat: 2
        layers:
          - type: ResidualTopology
            layers:
              - {{type: RMSNormLayer, d_model: 32}}
              - {{type: AttentionLayer, d_model: 32, n_heads: 4, n_kv_heads: 2}}
          - type: ResidualTopology
            layers:
              - {{type: RMSNormLayer, d_model: 32}}
              - {{type: SwiGLULayer, d_model: 32, d_ff: 64}}
      - {{type: RMSNormLayer, d_model: 32}}
runs:
  - id: train
    mode: train
    seed: 7
    steps: {steps}
    train: {{batch_size: 4, block_size: 16, lr: 3.0e-3, optimizer: adamw, schedule: cosine, warmup_steps: 3, grad_clip: 1.0}}
"#,
        data = data.display()
    )
}

/// A token stream with structure to learn: repeated counting sequences.
fn write_data(dir: &Path) -> PathBuf {
    let path = dir.join("tokens.npy");
    let tokens: Vec<u32> = (0..20_000u32).map(|i| (i % 7 + (i / 7) % 3) % 32).collect();
    write_tokens(&path, &tokens, NpyDtype::U16).unwrap();
    path
}

fn run_train(
    src: &str,
    artifacts: &Path,
    resume: Option<PathBuf>,
    stop_after: Option<u64>,
) -> caramba::train::TrainOutcome {
    run_train_on(Backend::Cpu, src, artifacts, resume, stop_after)
}

fn run_train_on(
    backend: Backend,
    src: &str,
    artifacts: &Path,
    resume: Option<PathBuf>,
    stop_after: Option<u64>,
) -> caramba::train::TrainOutcome {
    let c = caramba_compiler::compile(src).unwrap_or_else(|d| panic!("{}", d.render("m", src)));
    let opts = TrainOptions {
        data: None,
        resume,
        seed: None,
        artifacts: artifacts.to_path_buf(),
        init: None,
        group_data: None,
        quiet: true,
        stop_after,
        backend,
        gpu: Default::default(),
    };
    train(&c.manifest, &c.manifest.runs[0], opts).unwrap_or_else(|e| panic!("{}", e.message))
}

#[test]
fn resume_after_ten_steps_is_bit_identical_to_twenty_straight() {
    let dir = scratch("resume");
    let data = write_data(&dir);
    let src = manifest(&data, 20, "");
    let straight = run_train(&src, &dir.join("a"), None, None);
    let first = run_train(&src, &dir.join("b"), None, Some(10));
    assert_eq!(first.steps, 10);
    let ckpt = first.run_dir.join("checkpoints");
    let resumed = run_train(&src, &dir.join("c"), Some(ckpt), None);
    for (name, a) in &straight.params {
        let b = &resumed.params[name];
        let same = a
            .as_f32()
            .unwrap()
            .iter()
            .zip(b.as_f32().unwrap())
            .all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "parameter {name} differs after resume");
    }
    assert!(straight.last_loss < straight.first_loss);
    // The run folder holds the resolved manifest, metrics and checkpoints.
    let metrics = std::fs::read_to_string(straight.run_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 20);
    for line in metrics.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        for key in ["step", "loss", "lr", "grad_norm", "tokens_per_s"] {
            assert!(v.get(key).is_some(), "metrics line lacks {key}: {line}");
        }
    }
    assert!(
        straight.run_dir.join("manifest.yml").exists()
            || straight.run_dir.join("manifest.yaml").exists()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tiny_preset_trains_well_below_uniform_loss() {
    let Some(data) = caramba_runtime::checkpoint::testing::fixture_path("kjv_bytes.npy") else {
        return;
    };
    let src =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/presets/tiny.yml")).unwrap();
    let dir = scratch("tiny");
    let c = caramba_compiler::compile(&src).unwrap();
    let opts = TrainOptions {
        data: Some(data),
        resume: None,
        seed: None,
        artifacts: dir.clone(),
        init: None,
        group_data: None,
        quiet: true,
        stop_after: None,
        backend: caramba_runtime::backend::Backend::Cpu,
        gpu: Default::default(),
    };
    let out =
        train(&c.manifest, &c.manifest.runs[0], opts).unwrap_or_else(|e| panic!("{}", e.message));
    let uniform = (256f64).ln();
    println!(
        "tiny: loss {:.3} → {:.3}, val {:?} (uniform {uniform:.3})",
        out.first_loss, out.last_loss, out.val_loss
    );
    assert!(
        (out.first_loss - uniform).abs() < 0.3,
        "an untrained model should start near ln(256)"
    );
    assert!(
        out.last_loss < uniform - 2.5,
        "loss {:.3} did not fall well below ln(256) = {uniform:.3}",
        out.last_loss
    );
    assert!(out.val_loss.unwrap() < uniform - 2.5);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A synthetic task: copy the first half of each sequence into the second.
/// A 2-layer model learns it to near-perfect accuracy.
#[test]
fn learns_to_copy() {
    let src = manifest(Path::new("unused.npy"), 1, "");
    let src = src.replace("vocab_size: 32", "vocab_size: 16");
    let c = caramba_compiler::compile(&src).unwrap();
    let tg = train_graph(&c.manifest, Precision::uniform(DType::F32)).unwrap();
    let mut params = init_params(&tg.params, 3);
    let mut opt = Optimizer::new(OptimizerConfig::adamw(0.0));
    let mut rng = SplitMix64::new(11);
    let (b, half) = (16usize, 6usize);
    let t = 2 * half + 1;
    let batch = |rng: &mut SplitMix64| {
        let mut x = Vec::new();
        let mut y = Vec::new();
        for _ in 0..b {
            let body: Vec<u32> = (0..half).map(|_| 2 + rng.below(14) as u32).collect();
            let mut seq = body.clone();
            seq.push(1);
            seq.extend(&body);
            seq.push(1);
            x.extend(&seq[..t]);
            y.extend(&seq[1..t + 1]);
        }
        (x, y)
    };
    for step in 0..400 {
        let (x, y) = batch(&mut rng);
        let (_loss, grads) = forward_backward(&tg, &params, &x, &y, b, t).unwrap();
        let lr = if step < 300 { 1e-2 } else { 2e-3 };
        opt.step(&mut params, &grads, lr);
    }
    // Accuracy on the copied half (predicting body tokens after the separator).
    let (x, y) = batch(&mut rng);
    let ids = Tensor::i32(vec![b, t], x.iter().map(|&i| i as i32).collect());
    let bind = Bindings::new(&params)
        .sym(Sym::B, b)
        .sym(Sym::T, t)
        .input("input_ids", ids)
        .input("positions", Tensor::i32(vec![t], (0..t as i32).collect()))
        .input(
            "targets",
            Tensor::i32(vec![b, t], y.iter().map(|&i| i as i32).collect()),
        );
    let out = eval(&tg.forward, &bind).unwrap();
    let logits = out["logits"].as_f32().unwrap();
    let v = 16;
    let (mut right, mut total) = (0, 0);
    for s in 0..b {
        for p in half..t - 1 {
            let row = &logits[(s * t + p) * v..(s * t + p + 1) * v];
            let pred = (0..v).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap() as u32;
            right += (pred == y[s * t + p]) as usize;
            total += 1;
        }
    }
    let acc = right as f64 / total as f64;
    println!("copy accuracy {acc:.3}");
    assert!(acc >= 0.95, "copy accuracy {acc:.3} is not near-perfect");
}

fn caramba(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_caramba"))
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "{err}");
    (out.status.code().unwrap_or(-1), err)
}

#[test]
fn bad_data_and_bad_resumes_are_clear_errors() {
    let dir = scratch("bad");
    let m = dir.join("m.yml");
    // Trains on `data` with exit code and stderr back.
    let run_on = |data: &Path| {
        std::fs::write(&m, manifest(data, 5, "")).unwrap();
        caramba(&[
            "run",
            m.to_str().unwrap(),
            "--artifacts",
            dir.join("art").to_str().unwrap(),
        ])
    };
    // Missing data file.
    let (code, err) = run_on(&dir.join("nope.npy"));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("nope.npy") && err.contains("does not exist"),
        "{err}"
    );
    // Wrong dtype.
    let f = dir.join("floats.npy");
    caramba_runtime::data::write_f32_npy(&f, &[100], &[0.5; 100]).unwrap();
    let (code, err) = run_on(&f);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("floats.npy"), "{err}");
    // Fewer tokens than one block.
    let short = dir.join("short.npy");
    write_tokens(&short, &[1, 2, 3, 4, 5], NpyDtype::U16).unwrap();
    let (code, err) = run_on(&short);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("tokens"), "{err}");
    // Token ids beyond the vocabulary.
    let big = dir.join("big.npy");
    write_tokens(&big, &vec![40u32; 1000], NpyDtype::U16).unwrap();
    let (code, err) = run_on(&big);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("40") && err.contains("vocabulary"), "{err}");
    // A checkpoint of a different model.
    let data = write_data(&dir);
    std::fs::write(&m, manifest(&data, 3, "")).unwrap();
    let (code, err) = caramba(&[
        "run",
        m.to_str().unwrap(),
        "--artifacts",
        dir.join("art2").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let run_dir = std::fs::read_dir(dir.join("art2"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(&m, manifest(&data, 3, "").replace("d_ff: 64", "d_ff: 48")).unwrap();
    let (code, err) = caramba(&[
        "run",
        m.to_str().unwrap(),
        "--artifacts",
        dir.join("art3").to_str().unwrap(),
        "--resume",
        run_dir.join("checkpoints").to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("mlp") && err.contains("cannot resume"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether a wgpu adapter exists; without one the test says SKIPPED
/// loudly, and fails when `CARAMBA_REQUIRE_GPU` is set (CI sets it).
fn wgpu_or_skip() -> bool {
    if Backend::Wgpu.available() {
        return true;
    }
    assert!(
        std::env::var_os("CARAMBA_REQUIRE_GPU").is_none(),
        "no wgpu adapter and CARAMBA_REQUIRE_GPU is set"
    );
    eprintln!("*** SKIPPED: no wgpu adapter ***");
    false
}

/// The backward pass on the wgpu backend (lavapipe in CI) agrees with the
/// CPU reference: loss and every parameter's gradient.
#[test]
fn wgpu_gradients_match_the_cpu_reference() {
    use caramba::train::forward_backward_on;
    if !wgpu_or_skip() {
        return;
    }
    let src = manifest(Path::new("unused.npy"), 1, "");
    let c = caramba_compiler::compile(&src).unwrap();
    let tg = train_graph(&c.manifest, Precision::uniform(DType::F32)).unwrap();
    let params = init_params(&tg.params, 5);
    let (b, t) = (2usize, 8usize);
    let x: Vec<u32> = (0..b * t).map(|i| (i * 7 % 32) as u32).collect();
    let y: Vec<u32> = (0..b * t).map(|i| (i * 3 % 32) as u32).collect();
    let (lc, gc) = forward_backward_on(Backend::Cpu, &tg, &params, &x, &y, b, t).unwrap();
    let (lg, gg) = forward_backward_on(Backend::Wgpu, &tg, &params, &x, &y, b, t)
        .unwrap_or_else(|e| panic!("{}", e.message));
    assert!(
        (lc - lg).abs() < 1e-4 * lc.abs().max(1.0),
        "loss {lc} vs {lg}"
    );
    for (name, a) in &gc {
        let (a, g) = (a.to_f32_vec(), gg[name].to_f32_vec());
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let diff = a
            .iter()
            .zip(&g)
            .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(
            diff <= 1e-3 * scale,
            "gradient of {name}: max |cpu − wgpu| {diff:e} (scale {scale:e})"
        );
    }
}

/// Training on wgpu (the device trainer: weights, gradients and AdamW
/// state stay on the device) follows the CPU run: 4 clipped steps of 2
/// micro-batches each, with evaluation, give the same losses and weights
/// to f32 rounding. Its checkpoints resume on the device, and `caramba
/// run --device wgpu` runs end to end.
#[test]
fn wgpu_training_follows_the_cpu_run() {
    if !wgpu_or_skip() {
        return;
    }
    let dir = scratch("wgpu");
    let data = write_data(&dir);
    let src = manifest(&data, 4, "  eval_every: 2").replace(
        "grad_clip: 1.0}",
        "grad_clip: 1.0, gradient_accumulation_steps: 2}",
    );
    let cpu = run_train_on(Backend::Cpu, &src, &dir.join("cpu"), None, None);
    let gpu = run_train_on(Backend::Wgpu, &src, &dir.join("gpu"), None, None);
    let close = |a: f64, b: f64, what: &str| {
        assert!(
            (a - b).abs() <= 1e-4 * a.abs().max(1.0),
            "{what}: cpu {a}, wgpu {b}"
        );
    };
    close(cpu.first_loss, gpu.first_loss, "first loss");
    close(cpu.last_loss, gpu.last_loss, "last loss");
    close(cpu.val_loss.unwrap(), gpu.val_loss.unwrap(), "val loss");
    assert_eq!(gpu.steps, 4);
    let max_diff = |a: &caramba_runtime::train::Params, b: &caramba_runtime::train::Params| {
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        a.iter()
            .flat_map(|(n, t)| {
                let u = b[n].as_f32().unwrap();
                t.as_f32()
                    .unwrap()
                    .iter()
                    .zip(u)
                    .map(|(x, y)| (x - y).abs())
            })
            .fold(0f32, f32::max)
    };
    let d = max_diff(&cpu.params, &gpu.params);
    assert!(d <= 1e-4, "weights after 4 steps: max |cpu − wgpu| = {d:e}");
    let moved = max_diff(
        &cpu.params,
        &init_params(
            &train_graph(
                &caramba_compiler::compile(&src).unwrap().manifest,
                Precision::uniform(DType::F32),
            )
            .unwrap()
            .params,
            7,
        ),
    );
    assert!(
        moved > 1e-3,
        "training did not move the weights ({moved:e})"
    );
    let metrics = std::fs::read_to_string(gpu.run_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 4);

    // Stop at step 2 (a checkpoint of the device state) and resume on the device.
    let first = run_train_on(Backend::Wgpu, &src, &dir.join("g1"), None, Some(2));
    let ckpt = first.run_dir.join("checkpoints");
    let resumed = run_train_on(Backend::Wgpu, &src, &dir.join("g2"), Some(ckpt), None);
    let d = max_diff(&gpu.params, &resumed.params);
    assert!(
        d <= 1e-6,
        "resumed on wgpu: max |straight − resumed| = {d:e}"
    );

    // The command line.
    let m = dir.join("m.yml");
    std::fs::write(&m, &src).unwrap();
    let (code, err) = caramba(&[
        "run",
        m.to_str().unwrap(),
        "--device",
        "wgpu",
        "--artifacts",
        dir.join("cli").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The optimized joint forward + backward graph (what GPUs train with:
/// fused norms, attention, elementwise chains) gives the differentiated
/// graph's loss and gradients on the CPU reference, for a Llama-style
/// model and the DBA preset.
#[test]
fn optimized_training_graph_gives_the_same_gradients() {
    use caramba::train::optimized;
    let dba = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/presets/dba.yml"))
        .unwrap()
        .replace("vocab_size: 512", "vocab_size: 64");
    for src in [manifest(Path::new("unused.npy"), 1, ""), dba] {
        let c = caramba_compiler::compile(&src).unwrap();
        let mut tg = train_graph(&c.manifest, Precision::uniform(DType::F32)).unwrap();
        let params = init_params(&tg.params, 9);
        let (b, t) = (2usize, 8usize);
        let x: Vec<u32> = (0..b * t).map(|i| (i * 7 % 32) as u32).collect();
        let y: Vec<u32> = (0..b * t).map(|i| (i * 3 % 32) as u32).collect();
        let (lp, gp) = forward_backward(&tg, &params, &x, &y, b, t).unwrap();
        // Attention's fused backward against differentiating its primitives.
        let mut plain = tg.forward.clone();
        plain.remove_output("logits");
        let names: Vec<String> = tg.params.iter().map(|p| p.0.clone()).collect();
        let plain = caramba_ir::autodiff::differentiate(&plain, "loss", &names).unwrap();
        let flash = std::mem::replace(&mut tg.graph, plain);
        let (l0, g0) = forward_backward(&tg, &params, &x, &y, b, t).unwrap();
        tg.graph = flash;
        assert!((l0 - lp).abs() < 1e-5 * lp.abs(), "loss {l0} vs {lp}");
        assert_grads_close(&g0, &gp, "primitive backward", "flash backward");
        let fused = optimized(&tg.graph).unwrap();
        // No T × T matrix (scores, probabilities or their gradients) is
        // left anywhere in the optimized training graph.
        let tt = |n: caramba_ir::NodeId| {
            let d = fused.node(n).ty.shape.dims().to_vec();
            d.len() >= 2 && d[d.len() - 1] == d[d.len() - 2] && d[d.len() - 1].as_const().is_none()
        };
        let square: Vec<String> = fused
            .node_ids()
            .filter(|&n| tt(n))
            .map(|n| format!("{} @ {}", fused.node(n).op.mnemonic(), fused.node(n).scope))
            .collect();
        assert!(
            square.is_empty(),
            "T × T values in the training graph: {square:?}"
        );
        // Each attention layer's forward is one kernel that also gives the
        // backward its log-sum-exp (nothing recomputes it), and its backward
        // is one gradient for q and one for k and v together.
        let forward = caramba_compiler::fuse_for_training(&tg.forward).unwrap();
        let layers = forward
            .node_ids()
            .filter(|&n| matches!(forward.node(n).op, caramba_ir::Op::Attention { .. }))
            .count();
        let mut ops: BTreeMap<&str, usize> = BTreeMap::new();
        let mut grads = BTreeMap::new();
        for n in fused.node_ids() {
            let op = &fused.node(n).op;
            *ops.entry(op.mnemonic()).or_insert(0) += 1;
            if let caramba_ir::Op::AttentionGrad { wrt, .. } = op {
                *grads.entry(*wrt).or_insert(0) += 1;
            }
        }
        assert!(layers > 0);
        let n_ops = |m: &str| ops.get(m).copied().unwrap_or(0);
        assert_eq!(n_ops("attention_with_lse"), layers, "{ops:?}");
        assert_eq!(n_ops("attention_lse"), 0, "{ops:?}");
        assert_eq!(n_ops("attention"), 0, "{ops:?}");
        assert_eq!(
            grads,
            BTreeMap::from([(AttnArg::Q, layers), (AttnArg::KV, layers)])
        );
        let fused_ops = fused
            .node_ids()
            .filter(|&n| {
                matches!(
                    fused.node(n).op,
                    caramba_ir::Op::AttentionWithLse { .. }
                        | caramba_ir::Op::RmsNorm { .. }
                        | caramba_ir::Op::Elementwise(_)
                )
            })
            .count();
        assert!(fused_ops > 0, "nothing fused in the training graph");
        // Every RMSNorm is one op forward and one per gradient (x and its
        // weight), with no primitive norm chain left to differentiate.
        let norms = n_ops("rms_norm");
        let grads: BTreeMap<NormArg, usize> = fused.node_ids().fold(BTreeMap::new(), |mut m, n| {
            if let caramba_ir::Op::RmsNormGrad { wrt, .. } = fused.node(n).op {
                *m.entry(wrt).or_insert(0) += 1;
            }
            m
        });
        assert!(norms > 0, "{ops:?}");
        assert_eq!(
            grads,
            BTreeMap::from([(NormArg::X, norms), (NormArg::W, norms)])
        );
        let rsqrt = fused
            .node_ids()
            .filter(|&n| fused.node(n).op == caramba_ir::Op::Unary(caramba_ir::UnaryOp::Rsqrt))
            .count();
        assert_eq!(rsqrt, 0, "a norm chain left as primitives");
        tg.graph = fused;
        let (lf, gf) = forward_backward(&tg, &params, &x, &y, b, t).unwrap();
        assert!((lp - lf).abs() < 1e-5 * lp.abs(), "loss {lp} vs {lf}");
        assert_grads_close(&gp, &gf, "plain", "optimized");
    }
}

/// Every gradient in `b` within 1e-4 of the largest magnitude of the same
/// gradient in `a`.
fn assert_grads_close(
    a: &BTreeMap<String, Tensor>,
    b: &BTreeMap<String, Tensor>,
    what_a: &str,
    what_b: &str,
) {
    for (name, x) in a {
        let (x, y) = (x.to_f32_vec(), b[name].to_f32_vec());
        let scale = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let diff = x
            .iter()
            .zip(&y)
            .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(
            diff <= 1e-4 * scale,
            "gradient of {name}: max |{what_a} − {what_b}| {diff:e} (scale {scale:e})"
        );
    }
}

/// Mixed precision (`use_amp: true`): the parameters, their gradients and
/// the loss stay f32 while every parameter is read through one cast to
/// bf16; the gradients follow the f32 run's to bf16's precision; and a
/// short CPU run with it learns as the f32 run does.
#[test]
fn mixed_precision_keeps_f32_weights_and_follows_the_f32_gradients() {
    let dir = scratch("amp");
    let data = write_data(&dir);
    let src = manifest(&data, 30, "").replace(
        "grad_clip: 1.0}",
        "grad_clip: 1.0, use_amp: true, amp_dtype: bf16}",
    );
    let c = caramba_compiler::compile(&src).unwrap();
    let t = c.manifest.runs[0].fields.train.as_ref().unwrap();
    let precision = caramba::train::train_precision(&c.manifest, t);
    assert_eq!(precision, Precision::mixed(DType::BF16));
    let amp = train_graph(&c.manifest, precision).unwrap();
    let f32g = train_graph(&c.manifest, Precision::uniform(DType::F32)).unwrap();
    let g = &amp.graph;
    for (name, id) in g.params() {
        assert_eq!(g.node(id).ty.dtype, DType::F32, "parameter {name}");
        let users: Vec<_> = g.users(id);
        assert!(
            users
                .iter()
                .any(|&u| g.node(u).op == caramba_ir::Op::Cast(DType::BF16)),
            "{name} is not read through a cast to bf16"
        );
    }
    let matmuls_in_bf16 = g
        .node_ids()
        .filter(|&n| g.node(n).op == caramba_ir::Op::MatMul)
        .all(|n| g.node(n).ty.dtype == DType::BF16);
    assert!(matmuls_in_bf16, "every product computes in bf16");

    let params = init_params(&amp.params, 5);
    let (b, tt) = (4usize, 16usize);
    let x: Vec<u32> = (0..b * tt).map(|i| (i * 7 % 31) as u32).collect();
    let y: Vec<u32> = (0..b * tt).map(|i| ((i * 7 + 3) % 31) as u32).collect();
    let (loss_amp, grads_amp) = forward_backward(&amp, &params, &x, &y, b, tt).unwrap();
    let (loss_f32, grads_f32) = forward_backward(&f32g, &params, &x, &y, b, tt).unwrap();
    assert!(
        (loss_amp - loss_f32).abs() < 0.02 * loss_f32.abs(),
        "loss {loss_amp} in bf16 against {loss_f32} in f32"
    );
    let mut worst = (f64::INFINITY, "");
    for (name, ga) in &grads_amp {
        assert_eq!(ga.dtype(), DType::F32, "gradient of {name}");
        let (p, q) = (ga.to_f32_vec(), grads_f32[name].to_f32_vec());
        let dot: f64 = p
            .iter()
            .zip(&q)
            .map(|(a, b)| (*a as f64) * (*b as f64))
            .sum();
        let norm = |v: &[f32]| v.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
        let cos = dot / (norm(&p) * norm(&q)).max(1e-30);
        assert!(
            cos > 0.99,
            "gradient of {name}: cosine {cos} to the f32 gradient"
        );
        if cos < worst.0 {
            worst = (cos, name.as_str());
        }
    }
    println!(
        "lowest gradient cosine to f32: {:.6} ({})",
        worst.0, worst.1
    );

    let out = run_train(&src, &dir.join("artifacts"), None, None);
    let f32_out = run_train(
        &manifest(&data, 30, ""),
        &dir.join("artifacts-f32"),
        None,
        None,
    );
    println!(
        "amp: loss {:.3} → {:.3}; f32: {:.3} → {:.3}",
        out.first_loss, out.last_loss, f32_out.first_loss, f32_out.last_loss
    );
    assert!(out.last_loss < out.first_loss - 0.5, "bf16 training learns");
    assert!(
        (out.last_loss - f32_out.last_loss).abs() < 0.15 * f32_out.last_loss,
        "bf16 run ends at {:.3}, f32 at {:.3}",
        out.last_loss,
        f32_out.last_loss
    );
    for (name, p) in &out.params {
        assert_eq!(p.dtype(), DType::F32, "master weight {name}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A run trains where the manifest says (its `train` block's `device`, else
/// `defaults.device`) unless `--device` says otherwise; a device this
/// binary lacks is a clear error naming the field.
#[test]
fn the_manifest_names_the_device_unless_the_flag_does() {
    if cfg!(feature = "cuda") {
        // The errors below need a binary built without CUDA.
        return;
    }
    let dir = scratch("device");
    let data = write_data(&dir);
    let m = dir.join("m.yml");
    let (m_s, dir_s) = (m.to_str().unwrap(), dir.to_str().unwrap());
    std::fs::write(&m, manifest(&data, 2, "  device: cuda")).unwrap();
    let (code, err) = caramba(&["run", m_s, "--artifacts", dir_s]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("`defaults.device` cuda"), "{err}");
    let own = manifest(&data, 2, "").replace("grad_clip: 1.0}", "grad_clip: 1.0, device: cuda}");
    std::fs::write(&m, own).unwrap();
    let (code, err) = caramba(&["run", m_s, "--artifacts", dir_s]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("run `train`'s `device` cuda"), "{err}");
    let (code, err) = caramba(&["run", m_s, "--artifacts", dir_s, "--device", "cpu"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("device: cpu"), "{err}");
}
