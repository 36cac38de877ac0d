//! The training loop of `caramba run` (mode `train`), top to bottom:
//!
//! ```text
//! lower the model → append the next-token loss → differentiate (IR → IR)
//! for each step: sample batches → forward + backward → mean of micro-batches
//!                → clip → lr(step) → optimizer step → metrics, eval, checkpoint
//! ```
//!
//! Everything a resumed run needs (weights, optimizer state, step, the data
//! sampler's RNG state) is in each checkpoint, so 10 steps + resume + 10
//! steps equal 20 steps straight, bit for bit, on the CPU reference.
//!
//! On a GPU the same loop hands each step's micro-batches to a
//! `DeviceTrainer`, built once: weights, gradients and optimizer state stay
//! on the device, and are read back only for checkpoints. Evaluation runs
//! the forward graph on the device too, on the same weight buffers.

use crate::commands::Failure;
use caramba_compiler::manifest::{
    DTypeSpec, Manifest, OptimizerKind as MOpt, Phase, Run, Schedule, TrainConfig,
};
use caramba_compiler::Precision;
use caramba_ir::autodiff::{add_next_token_loss, grad_name};
use caramba_ir::reference::{eval, Bindings, Tensor};
use caramba_ir::{DType, Graph, Sym};
use caramba_runtime::backend::{Backend, DeviceTrainer, Executor};
use caramba_runtime::data::{NpyDataset, Split};
use caramba_runtime::gpu::train::{MicroBatch, StepError};
use caramba_runtime::rng::SplitMix64;
use caramba_runtime::train::{
    clip_grad_norm, global_grad_norm, load_checkpoint, Console, GradAccumulator, LrSchedule,
    MetricsRecord, MetricsWriter, Optimizer, OptimizerConfig, Params, RunDir, SaveRequest,
    ScheduleKind,
};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where a training run reads and writes, and what the command line overrides.
pub struct TrainOptions {
    pub data: Option<PathBuf>,
    pub resume: Option<PathBuf>,
    pub seed: Option<u64>,
    pub artifacts: PathBuf,
    /// Initial weights (from an `init_from` run).
    pub init: Option<Params>,
    pub group_data: Option<String>,
    pub quiet: bool,
    /// Stop (with a checkpoint) after this global step, as if interrupted.
    pub stop_after: Option<u64>,
    /// Where training runs: on a GPU, forward, backward, the optimizer and
    /// evaluation all run on the device.
    pub backend: Backend,
    /// GPU choices (TF32 matmuls); ignored on the CPU.
    pub gpu: caramba_runtime::gpu::GpuOptions,
}

/// What a finished run reports.
pub struct TrainOutcome {
    pub params: Params,
    pub first_loss: f64,
    pub last_loss: f64,
    pub val_loss: Option<f64>,
    pub run_dir: PathBuf,
    pub steps: u64,
}

/// The model's training graph: forward, loss, and a `grad:<name>` output per parameter.
pub struct TrainGraph {
    pub graph: Graph,
    pub forward: Graph,
    pub params: Vec<(String, Vec<usize>)>,
    pub vocab: usize,
}

/// The precision a run trains in. `use_amp: true` computes in `amp_dtype`
/// (bf16 unless given or `auto`; `float32` turns it off); a half `dtype` (the run's, else the defaults')
/// means the same: activations, gradients of activations and the
/// matrix products in that dtype, while weights, their gradients and the
/// optimizer state stay f32 (master weights). Otherwise (`float32`,
/// `auto`, unset) everything is f32.
pub fn train_precision(m: &Manifest, t: &TrainConfig) -> Precision {
    let half = |d: Option<DTypeSpec>| match d {
        Some(DTypeSpec::Float16) => Some(DType::F16),
        Some(DTypeSpec::Bfloat16) => Some(DType::BF16),
        _ => None,
    };
    let compute = if t.use_amp {
        match t.amp_dtype {
            // Autocast to f32 is no autocast.
            Some(DTypeSpec::Float32) => None,
            d => Some(half(d).unwrap_or(DType::BF16)),
        }
    } else {
        half(t.dtype.or(m.defaults.dtype))
    };
    compute.map_or(Precision::uniform(DType::F32), Precision::mixed)
}

/// `precision` in words, for the console: `f32` or `bf16 compute, f32 weights`.
pub fn describe_precision(p: Precision) -> String {
    if p.compute == p.params {
        p.compute.to_string()
    } else {
        format!(
            "{} compute, {} weights and optimizer state",
            p.compute, p.params
        )
    }
}

pub fn train_graph(m: &Manifest, precision: Precision) -> Result<TrainGraph, Failure> {
    let lowered = caramba_compiler::lower_model_with(&m.model, &m.name, precision, None)
        .map_err(|d| Failure::runtime(format!("lowering failed:\n{}", d.render(&m.name, ""))))?;
    let mut forward = lowered.graph;
    add_next_token_loss(&mut forward, "logits").map_err(|e| Failure::runtime(e.to_string()))?;
    let params: Vec<(String, Vec<usize>)> = forward
        .params()
        .map(|(n, id)| {
            (
                n.to_string(),
                forward
                    .node(id)
                    .ty
                    .shape
                    .dims()
                    .iter()
                    .map(|d| d.as_const().unwrap_or(0))
                    .collect(),
            )
        })
        .collect();
    let names: Vec<String> = params.iter().map(|p| p.0.clone()).collect();
    // The training graph returns the loss and the gradients, not the logits
    // (a backend would keep them alive for nothing).
    let mut loss_only = forward.clone();
    loss_only.remove_output("logits");
    // Attention fused before differentiation (its flash-style backward keeps
    // no T × S matrix per layer), everything else differentiated as
    // primitives, and the backward's log-sum-exp taken from the forward.
    let graph = caramba_compiler::differentiate_for_training(&loss_only, "loss", &names)
        .map_err(|e| Failure::runtime(e.to_string()))?;
    Ok(TrainGraph {
        graph,
        forward,
        params,
        vocab: m.model.embedder.vocab_size,
    })
}

/// Initial weights from `seed`: N(0, 0.02) for matrices, ones for norm
/// weights, zeros for biases and DBA gate logits (g = 0.5, ungated DBA).
pub fn init_params(shapes: &[(String, Vec<usize>)], seed: u64) -> Params {
    let mut rng = SplitMix64::new(seed);
    let mut normal = move || {
        // Box–Muller.
        let u1 = rng.next_f64().max(1e-300);
        let u2 = rng.next_f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    };
    shapes
        .iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else if name.ends_with(".bias") || name.ends_with("gate_logit") {
                vec![0.0; n]
            } else {
                (0..n).map(|_| (0.02 * normal()) as f32).collect()
            };
            (name.clone(), Tensor::f32(shape.clone(), data))
        })
        .collect()
}

/// Loss and gradients of one batch (x, y: B × T token ids) on the CPU reference.
pub fn forward_backward(
    tg: &TrainGraph,
    params: &Params,
    x: &[u32],
    y: &[u32],
    b: usize,
    t: usize,
) -> Result<(f64, Params), Failure> {
    forward_backward_on(Backend::Cpu, tg, params, x, y, b, t)
}

/// [`forward_backward`] on a backend, one-shot: on a GPU the parameters are
/// uploaded and the gradients read back on every call. For comparing
/// backends; the training loop keeps everything on the device instead
/// (`DeviceTrainer`).
pub fn forward_backward_on(
    backend: Backend,
    tg: &TrainGraph,
    params: &Params,
    x: &[u32],
    y: &[u32],
    b: usize,
    t: usize,
) -> Result<(f64, Params), Failure> {
    let bindings = bind(params, x, y, b, t);
    let out = match backend {
        Backend::Cpu => eval(&tg.graph, &bindings).map_err(|e| e.to_string()),
        _ => Executor::new(backend, &tg.graph, params)
            .and_then(|e| e.run(&bindings))
            .map_err(|e| e.to_string()),
    }
    .map_err(|e| Failure::runtime(format!("training step failed on {backend}: {e}")))?;
    let loss = out["loss"].to_f64_vec()[0];
    let grads = tg
        .params
        .iter()
        .map(|(n, _)| (n.clone(), out[&grad_name(n)].clone()))
        .collect();
    Ok((loss, grads))
}

/// Mean loss of one batch without gradients.
pub fn loss_only(
    tg: &TrainGraph,
    params: &Params,
    x: &[u32],
    y: &[u32],
    b: usize,
    t: usize,
) -> Result<f64, Failure> {
    let out = eval(&tg.forward, &bind(params, x, y, b, t))
        .map_err(|e| Failure::runtime(format!("evaluation failed: {e}")))?;
    Ok(out["loss"].to_f64_vec()[0])
}

/// One batch as a device trainer's micro-batch (the inputs of [`bind`]).
fn micro_batch(x: &[u32], y: &[u32], b: usize, t: usize) -> MicroBatch {
    let no_params = Params::new();
    let bound = bind(&no_params, x, y, b, t);
    MicroBatch {
        inputs: bound.inputs,
        syms: bound.syms,
    }
}

fn bind<'p>(params: &'p Params, x: &[u32], y: &[u32], b: usize, t: usize) -> Bindings<'p> {
    let ids = |v: &[u32]| Tensor::i32(vec![b, t], v.iter().map(|&i| i as i32).collect());
    Bindings::new(params)
        .sym(Sym::B, b)
        .sym(Sym::T, t)
        .input("input_ids", ids(x))
        .input("positions", Tensor::i32(vec![t], (0..t as i32).collect()))
        .input("targets", ids(y))
}

/// Runs one training run of a manifest.
pub fn train(m: &Manifest, run: &Run, opts: TrainOptions) -> Result<TrainOutcome, Failure> {
    let f = &run.fields;
    let t = f
        .train
        .as_ref()
        .ok_or_else(|| Failure::usage(format!("run `{}` has no `train` block", f.id)))?;
    if t.phase != Phase::Standard {
        return Err(Failure::runtime(format!(
            "run `{}`: the {:?} phase (teacher distillation for the upcycle) is not implemented in this version; \
only `phase: standard` training runs",
            f.id, t.phase
        )));
    }
    let data = opts
        .data
        .clone()
        .or_else(|| f.data.as_ref().map(PathBuf::from))
        .or_else(|| opts.group_data.as_ref().map(PathBuf::from))
        .or_else(|| m.defaults.data.as_ref().map(PathBuf::from))
        .ok_or_else(|| {
            Failure::usage(format!(
                "run `{}` has no data: set `data` on the run or in `defaults`, or pass --data",
                f.id
            ))
        })?;
    if !data.exists() {
        return Err(Failure::usage(format!(
            "run `{}`: the data file {} does not exist (prepare one with `caramba prepare`)",
            f.id,
            data.display()
        )));
    }
    let (bsz, block) = (t.batch_size as usize, t.block_size as usize);
    let val_frac = m.defaults.val_frac.unwrap_or(0.0);
    let ds = NpyDataset::open(&data, block, val_frac)
        .map_err(|e| Failure::usage(format!("run `{}`: {e}", f.id)))?;
    let precision = train_precision(m, t);
    let tg = train_graph(m, precision)?;
    check_vocab(&ds, tg.vocab, &data)?;

    let seed = opts.seed.or(f.seed).or(m.defaults.seed).unwrap_or(1337);
    let config = match t.optimizer {
        MOpt::Adamw => OptimizerConfig::adamw(t.weight_decay),
        MOpt::Lion => OptimizerConfig::lion(t.weight_decay),
        MOpt::Sgd => OptimizerConfig::sgd(0.9, t.weight_decay),
    };
    let kind = match t.schedule {
        Schedule::Constant => ScheduleKind::Constant,
        Schedule::Cosine => ScheduleKind::Cosine,
        Schedule::Linear => ScheduleKind::Linear,
    };
    let schedule = LrSchedule::new(kind, t.lr, f.steps).with_warmup(t.warmup_steps);

    let (mut params, mut optimizer, mut rng, start) = match &opts.resume {
        Some(path) => {
            let ck = load_checkpoint(path, &tg.params).map_err(|e| {
                Failure::usage(format!("cannot resume from {}: {e}", path.display()))
            })?;
            if ck.state.optimizer.kind() != config.kind() {
                return Err(Failure::usage(format!(
                    "cannot resume from {}: it was trained with {:?}, this run uses {:?}",
                    path.display(),
                    ck.state.optimizer.kind(),
                    config.kind()
                )));
            }
            (
                ck.params,
                ck.optimizer,
                SplitMix64::from_state(ck.state.rng_state),
                ck.state.step,
            )
        }
        None => {
            let params = opts
                .init
                .clone()
                .unwrap_or_else(|| init_params(&tg.params, seed));
            (
                params,
                Optimizer::new(config),
                SplitMix64::new(seed ^ 0x5eed_da7a),
                0,
            )
        }
    };
    if start >= f.steps {
        return Err(Failure::usage(format!(
            "the checkpoint is at step {start}, and run `{}` has {} steps: nothing to do",
            f.id, f.steps
        )));
    }

    // On a GPU the trainer owns the weights and the optimizer state from
    // here on; `params` and `optimizer` are refreshed from it for each
    // checkpoint (the last step always saves one).
    // Layers recomputed in the backward (`activation_checkpointing`).
    let mut recomputed = None;
    let mut device = match opts.backend {
        Backend::Cpu => None,
        backend => {
            // GPUs run the joint forward + backward graph optimized (fused
            // norms, attention, elementwise chains); the CPU reference runs
            // it as differentiated, the oracle.
            let mut eval = tg.forward.clone();
            eval.remove_output("logits");
            let (graph, eval) = (optimized(&tg.graph)?, optimized(&eval)?);
            let graph = if t.activation_checkpointing {
                let (h, layers) =
                    caramba_compiler::recompute_layers(&graph, "loss").map_err(|e| {
                        Failure::runtime(format!(
                            "internal error: recomputing the layers of {} failed: {e}",
                            graph.name
                        ))
                    })?;
                recomputed = Some(layers);
                h
            } else {
                graph
            };
            Some(
                DeviceTrainer::new(backend, &graph, Some(&eval), &params, &optimizer, opts.gpu)
                    .map_err(|e| Failure::runtime(format!("cannot train on {backend}: {e}")))?,
            )
        }
    };

    let dir = RunDir::create(&opts.artifacts, &format!("{}_{}", m.name, f.id))
        .map_err(|e| Failure::runtime(e.to_string()))?;
    let yaml = serde_yaml::to_string(&m.resolved).map_err(|e| Failure::runtime(e.to_string()))?;
    dir.write_manifest(&yaml)
        .map_err(|e| Failure::runtime(e.to_string()))?;
    let mut metrics: MetricsWriter = dir.metrics().map_err(|e| Failure::runtime(e.to_string()))?;
    let ckpt = dir.checkpointer(3);
    let mut console = if opts.quiet {
        Console::plain()
    } else {
        Console::stderr()
    };
    console.header(&format!(
        "run {} — {} parameters",
        f.id,
        caramba_compiler::plan::group_digits(
            tg.params
                .iter()
                .map(|p| p.1.iter().product::<usize>())
                .sum()
        )
    ));
    console.key_value("data", data.display());
    console.key_value(
        "batch",
        format!(
            "{bsz} × {block} tokens, {} accumulation step(s)",
            t.gradient_accumulation_steps
        ),
    );
    console.key_value(
        "optimizer",
        format!(
            "{:?}, lr {} ({:?}, warmup {})",
            config.kind(),
            t.lr,
            kind,
            t.warmup_steps
        ),
    );
    console.key_value("device", opts.backend);
    console.key_value("precision", describe_precision(precision));
    match (t.activation_checkpointing, recomputed) {
        (false, _) => {}
        (true, Some(0)) => console.warning(
            "activation_checkpointing: the model has no layers to recompute (they are the \
             blocks of a nested topology); training without",
        ),
        (true, Some(n)) => console.key_value(
            "activation checkpointing",
            format!("{n} layers recompute their activations in the backward"),
        ),
        (true, None) => console.key_value(
            "activation checkpointing",
            "off on the CPU reference (it runs the graph as differentiated)",
        ),
    }
    console.path("artifacts", dir.path());

    let eval_every = m.defaults.eval_every.unwrap_or(f.steps.div_ceil(5).max(1));
    let eval_iters = m.defaults.eval_iters.unwrap_or(10) as usize;
    let save_every = m.defaults.save_every.unwrap_or(f.steps);
    let has_val = ds.split_len(Split::Val) > 0;
    let progress = console.progress(start, f.steps);
    let (mut first_loss, mut last_loss, mut val_loss) = (None, 0.0, None);
    let end = opts
        .stop_after
        .map_or(f.steps, |s| s.clamp(start + 1, f.steps));
    for step in start..end {
        let timer = Instant::now();
        let lr = schedule.lr_at(step);
        let (loss, grad_norm) = match &mut device {
            None => {
                let mut acc = GradAccumulator::new();
                let mut loss_sum = 0.0;
                for _ in 0..t.gradient_accumulation_steps {
                    let (x, y) = ds.sample_batch(&mut rng, Split::Train, bsz);
                    let (loss, grads) =
                        forward_backward_on(opts.backend, &tg, &params, &x, &y, bsz, block)?;
                    if !loss.is_finite() {
                        return Err(Failure::runtime(format!(
                            "run `{}`: the loss became {loss} at step {}",
                            f.id,
                            step + 1
                        )));
                    }
                    loss_sum += loss;
                    acc.add(grads);
                }
                let mut grads = acc.take_mean();
                let loss = loss_sum / t.gradient_accumulation_steps as f64;
                let grad_norm = match t.grad_clip {
                    Some(c) => clip_grad_norm(&mut grads, c),
                    None => global_grad_norm(&grads),
                };
                optimizer.step(&mut params, &grads, lr);
                (loss, grad_norm)
            }
            Some(trainer) => {
                let batches: Vec<MicroBatch> = (0..t.gradient_accumulation_steps)
                    .map(|_| {
                        let (x, y) = ds.sample_batch(&mut rng, Split::Train, bsz);
                        micro_batch(&x, &y, bsz, block)
                    })
                    .collect();
                let stats = trainer
                    .step(&batches, lr, t.grad_clip)
                    .map_err(|e| match e {
                        StepError::NonFiniteLoss { loss, .. } => Failure::runtime(format!(
                            "run `{}`: the loss became {loss} at step {}",
                            f.id,
                            step + 1
                        )),
                        e => Failure::runtime(format!(
                            "training step failed on {}: {e}",
                            opts.backend
                        )),
                    })?;
                (stats.loss(), stats.grad_norm)
            }
        };
        let tokens = (bsz * block) as f64 * t.gradient_accumulation_steps as f64;
        let tps = tokens / timer.elapsed().as_secs_f64();
        first_loss.get_or_insert(loss);
        last_loss = loss;
        let done = step + 1;
        let mut record = MetricsRecord {
            step: done,
            loss,
            lr,
            grad_norm,
            tokens_per_s: tps,
            val_loss: None,
        };
        if has_val && (done % eval_every == 0 || done == f.steps) {
            // Evaluation batches come from their own stream so they never
            // change the training data order.
            let mut erng = SplitMix64::new(seed ^ done.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut total = 0.0;
            for _ in 0..eval_iters {
                let (x, y) = ds.sample_batch(&mut erng, Split::Val, bsz);
                total += match &device {
                    None => loss_only(&tg, &params, &x, &y, bsz, block)?,
                    Some(trainer) => {
                        let b = micro_batch(&x, &y, bsz, block);
                        trainer.eval_loss(&b.inputs, b.syms).map_err(|e| {
                            Failure::runtime(format!("evaluation failed on {}: {e}", opts.backend))
                        })?
                    }
                };
            }
            let v = total / eval_iters as f64;
            record.val_loss = Some(v);
            val_loss = Some(v);
            progress.println(&format!(
                "step {done}: train loss {loss:.4}, val loss {v:.4}"
            ));
        }
        metrics
            .append(&record)
            .map_err(|e| Failure::runtime(e.to_string()))?;
        progress.update(done, loss, tps);
        if done % save_every == 0 || done == end {
            if let Some(trainer) = &device {
                let read_back =
                    |e| Failure::runtime(format!("reading the weights back failed: {e}"));
                params = trainer.params_to_host().map_err(read_back)?;
                optimizer = trainer.optimizer_to_host().map_err(read_back)?;
            }
            let req = SaveRequest {
                params: &params,
                optimizer: &optimizer,
                schedule,
                step: done,
                rng_state: rng.state(),
                data_position: 0,
                manifest_name: &m.name,
                run_id: &f.id,
            };
            ckpt.save(&req)
                .map_err(|e| Failure::runtime(format!("saving the checkpoint failed: {e}")))?;
        }
    }
    progress.finish();
    console.success(&format!(
        "run {}: loss {:.4} → {:.4}{}",
        f.id,
        first_loss.unwrap_or(last_loss),
        last_loss,
        val_loss
            .map(|v| format!(", val loss {v:.4}"))
            .unwrap_or_default()
    ));
    console.path("checkpoints", ckpt.root());
    Ok(TrainOutcome {
        params,
        first_loss: first_loss.unwrap_or(last_loss),
        last_loss,
        val_loss,
        run_dir: dir.path().to_path_buf(),
        steps: end,
    })
}

/// `g` through the e-graph optimizer.
pub fn optimized(g: &Graph) -> Result<Graph, Failure> {
    caramba_compiler::optimize(g).map(|(h, _)| h).map_err(|e| {
        Failure::runtime(format!(
            "internal error: optimizing {} failed: {e:?}",
            g.name
        ))
    })
}

fn check_vocab(ds: &NpyDataset, vocab: usize, path: &Path) -> Result<(), Failure> {
    let max = ds.max_token();
    if max as usize >= vocab {
        return Err(Failure::usage(format!(
            "{} holds token id {max}, but the model's vocabulary has {vocab} entries",
            path.display()
        )));
    }
    Ok(())
}
