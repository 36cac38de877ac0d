//! `caramba run`: compile the manifest and execute its groups in order —
//! each group's runs, then its benchmarks.
//!
//! This version executes `mode: train` runs with `phase: standard` (on the
//! CPU reference backend) and `perplexity` benchmarks of trained models.
//! Anything else in a selected group (distillation phases, verification,
//! other benchmarks, teacher models) is reported before anything runs, and
//! nothing is executed or written.

use super::{backend_named, check_group, compile_file, CmdResult, Failure};
use crate::cli::{DeviceArg, RunArgs};
use crate::train::{loss_only, train, train_graph, TrainOptions};
use caramba_compiler::manifest::{BenchConfig, Device, Phase, RunMode};
use caramba_compiler::plan;
use caramba_runtime::data::{NpyDataset, Split};
use caramba_runtime::rng::SplitMix64;
use caramba_runtime::train::Params;
use std::collections::BTreeMap;
use std::path::PathBuf;

pub fn run(a: &RunArgs) -> CmdResult {
    let c = compile_file(&a.manifest)?;
    check_group(&c, &a.manifest, a.group.as_deref())?;
    let m = &c.manifest;
    // Benchmarks run where `--device` or the manifest's defaults say.
    let backend = backend_named(
        a.device
            .or(m.defaults.device.map(device_arg))
            .unwrap_or(DeviceArg::Cpu),
        if a.device.is_some() {
            "--device".to_string()
        } else {
            "`defaults.device`".to_string()
        },
    )?;
    let groups: Vec<_> = plan::groups(m)
        .into_iter()
        .filter(|g| a.group.as_ref().is_none_or(|n| *n == g.name))
        .collect();

    // Refuse up front what this version cannot execute.
    let mut unsupported = Vec::new();
    for g in &groups {
        for r in plan::resolve_runs(m, g) {
            let f = &r.fields;
            if f.mode != RunMode::Train {
                unsupported.push(format!(
                    "run `{}`: mode {:?} is not executable yet",
                    f.id, f.mode
                ));
            }
            if let Some(t) = &f.train {
                if t.phase != Phase::Standard {
                    unsupported.push(format!(
                        "run `{}`: the {:?} phase (upcycle distillation) is not implemented yet",
                        f.id, t.phase
                    ));
                }
            }
            if r.verify.is_some() {
                unsupported.push(format!(
                    "run `{}`: `verify` blocks are not implemented yet",
                    f.id
                ));
            }
        }
        for b in &g.benchmarks {
            if !matches!(b.config, BenchConfig::Perplexity(_)) {
                unsupported.push(format!(
                    "benchmark `{}`: {} benchmarks are not implemented yet",
                    b.id,
                    b.config.type_name()
                ));
            }
            if b.models.iter().any(|m| m == "teacher") {
                unsupported.push(format!(
                    "benchmark `{}`: teacher models are not loadable yet",
                    b.id
                ));
            }
        }
    }
    if !unsupported.is_empty() {
        print!("{}", plan::render(&c, a.group.as_deref()));
        return Err(Failure::runtime(format!(
            "this version cannot execute everything in {}; nothing was run:\n  - {}",
            a.manifest.display(),
            unsupported.join("\n  - ")
        )));
    }

    for g in &groups {
        eprintln!("group {}", g.name);
        let mut trained: BTreeMap<String, Params> = BTreeMap::new();
        let mut last: Option<Params> = None;
        for r in plan::resolve_runs(m, g) {
            // `--device`, else the run's own, else the manifest's default.
            let own = r.fields.train.as_ref().and_then(|t| t.device);
            let backend = match (a.device, own) {
                (Some(_), _) | (None, None) => backend,
                (None, Some(d)) => {
                    backend_named(device_arg(d), format!("run `{}`'s `device`", r.fields.id))?
                }
            };
            let init = r
                .fields
                .init_from
                .as_ref()
                .and_then(|id| trained.get(id).cloned());
            let opts = TrainOptions {
                data: a.data.clone(),
                resume: a.resume.clone(),
                seed: a.seed,
                artifacts: a.artifacts.clone(),
                init,
                group_data: g.data.clone(),
                quiet: false,
                stop_after: a.stop_after,
                backend,
                gpu: caramba_runtime::gpu::GpuOptions {
                    fast_matmul: a.tf32,
                    gemm: a.gemm.into(),
                    ..Default::default()
                },
            };
            let out = train(m, &r, opts)?;
            last = Some(out.params.clone());
            trained.insert(r.fields.id.clone(), out.params);
        }
        for b in &g.benchmarks {
            let BenchConfig::Perplexity(p) = &b.config else {
                unreachable!("checked above")
            };
            for name in &b.models {
                let params = if name == "student" {
                    last.clone()
                } else {
                    trained.get(name).cloned()
                };
                let Some(params) = params else {
                    return Err(Failure::usage(format!(
                        "benchmark `{}`: model `{name}` has no trained weights in this group",
                        b.id
                    )));
                };
                let tg = train_graph(
                    m,
                    caramba_compiler::Precision::uniform(caramba_ir::DType::F32),
                )?;
                let ds = NpyDataset::open(
                    &PathBuf::from(&p.dataset),
                    p.block_size as usize,
                    m.defaults.val_frac.unwrap_or(0.0),
                )
                .map_err(|e| Failure::usage(format!("benchmark `{}`: {e}", b.id)))?;
                let split = if ds.split_len(Split::Val) > 0 {
                    Split::Val
                } else {
                    Split::Train
                };
                let mut rng = SplitMix64::new(0xbe7c);
                let (bs, t) = (p.batch_size as usize, p.block_size as usize);
                let mut total = 0.0;
                for _ in 0..p.num_batches {
                    let (x, y) = ds.sample_batch(&mut rng, split, bs);
                    total += loss_only(&tg, &params, &x, &y, bs, t)?;
                }
                let nll = total / p.num_batches as f64;
                println!(
                    "benchmark {} — {name}: perplexity {:.4} (mean NLL {nll:.4} over {} × {bs} × {t} tokens of the {} split)",
                    b.id,
                    nll.exp(),
                    p.num_batches,
                    split.name()
                );
            }
        }
    }
    Ok(())
}

/// The command-line name of a manifest's device (`mps`, Metal, is wgpu's).
fn device_arg(d: Device) -> DeviceArg {
    match d {
        Device::Auto => DeviceArg::Auto,
        Device::Cpu => DeviceArg::Cpu,
        Device::Cuda => DeviceArg::Cuda,
        Device::Wgpu | Device::Mps => DeviceArg::Wgpu,
    }
}
