//! Training on the device: the training graph (forward, loss, one
//! `grad:<param>` output per parameter) is prepared once, and parameters,
//! gradients and optimizer state stay on the device from step to step. One
//! optimizer step is
//!
//! ```text
//! per micro-batch: run_resident (forward + backward) → acc += grads
//! → global norm (partial sums read back) → clip factor and 1/count folded
//!   into grad_scale → one fused optimizer launch per parameter
//! ```
//!
//! The optimizer kernels write the executor's own parameter buffers, so the
//! next step (and an evaluation executor sharing them) reads the new
//! weights with no upload. The host sees the weights and the optimizer
//! state only when asked ([`GpuTrainer::params_to_host`],
//! [`GpuTrainer::optimizer_to_host`], for checkpoints), as the same
//! `Params` and `Optimizer` the host loop uses, so checkpoints and resumes
//! do not depend on where training ran.
//!
//! The arithmetic is the host optimizer's (`train::optim`), with the same
//! per-step scalars; what differs is summation order (the norm's partial
//! sums, accumulation), and `1/count · clip` applied as one product instead
//! of two successive scalings: results agree to f32 rounding, not bit for
//! bit.

use super::{download, ops, Buffers, DevTensor, DeviceTensor, GpuError, GpuExecutor, GpuOptions};
use crate::train::optim::Rule;
use crate::train::{clip_factor, Optimizer, OptimizerConfig, Params};
use caramba_ir::autodiff::grad_name;
use caramba_ir::reference::{SymValues, Tensor};
use caramba_ir::{DType, Graph};
use caramba_kernels::cubecl::prelude::*;
use caramba_kernels::cubecl::server::Handle;
use caramba_kernels::elementwise::launch_fill_float;
use caramba_kernels::optim as k;
use caramba_kernels::FloatElem;
use std::collections::BTreeMap;

/// One parameter's optimizer state on the device.
struct Moments {
    shape: Vec<usize>,
    /// First moment (AdamW), momentum (Lion, SGD with momentum).
    m: Option<Handle>,
    /// Second moment (AdamW).
    v: Option<Handle>,
}

/// An [`Optimizer`] whose state lives on the device and whose update is one
/// fused kernel launch per parameter.
pub struct DeviceOptimizer<R: Runtime> {
    client: ComputeClient<R>,
    config: OptimizerConfig,
    step: u64,
    /// Created at a parameter's first update, as the host optimizer does.
    state: BTreeMap<String, Moments>,
    /// Whether the state's buffers are exact ([`super::Buffers::Exact`]).
    exact: bool,
}

impl<R: Runtime> DeviceOptimizer<R> {
    pub fn new(client: &ComputeClient<R>, config: OptimizerConfig) -> Self {
        DeviceOptimizer {
            client: client.clone(),
            config,
            step: 0,
            state: BTreeMap::new(),
            exact: false,
        }
    }

    /// Allocates the state's buffers at their exact sizes (see
    /// [`super::Buffers::Exact`]), those uploaded from now on included.
    pub fn with_exact_buffers(mut self, exact: bool) -> Self {
        self.exact = exact;
        self
    }

    /// The host optimizer's configuration, step count and state, uploaded
    /// (to resume a run on the device).
    pub fn from_host(client: &ComputeClient<R>, host: &Optimizer) -> Self {
        let mut state: BTreeMap<String, Moments> = BTreeMap::new();
        for (key, shape, data) in host.state_buffers() {
            let (param, suffix) = key
                .rsplit_once('.')
                .expect("optimizer state buffers are named <param>.<buffer>");
            let handle = upload_f32(client, data);
            let s = state.entry(param.to_string()).or_insert_with(|| Moments {
                shape: shape.to_vec(),
                m: None,
                v: None,
            });
            match suffix {
                "m" => s.m = Some(handle),
                _ => s.v = Some(handle),
            }
        }
        DeviceOptimizer {
            client: client.clone(),
            config: *host.config(),
            step: host.step_count(),
            state,
            exact: false,
        }
    }

    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One optimizer step at learning rate `lr`, as
    /// [`Optimizer::step`]: every parameter with a gradient in `grads` is
    /// updated in place (its buffer in `params`, which is the buffer every
    /// holder of that `DeviceTensor` reads); the others are left alone.
    /// Each gradient is read as `g · grad_scale`, so averaging over
    /// micro-batches and clipping cost no pass of their own.
    pub fn step(
        &mut self,
        params: &BTreeMap<String, DeviceTensor>,
        grads: &BTreeMap<String, DeviceTensor>,
        lr: f64,
        grad_scale: f32,
    ) -> Result<(), GpuError> {
        self.step_with_copies(params, grads, &BTreeMap::new(), lr, grad_scale)
    }

    /// [`DeviceOptimizer::step`], also writing each updated parameter's
    /// half-precision copy in `copies` (by name; see
    /// [`super::GpuOptions::param_copies`]) in the same launch, rounded as
    /// a cast would round the new weights.
    pub fn step_with_copies(
        &mut self,
        params: &BTreeMap<String, DeviceTensor>,
        grads: &BTreeMap<String, DeviceTensor>,
        copies: &BTreeMap<String, DeviceTensor>,
        lr: f64,
        grad_scale: f32,
    ) -> Result<(), GpuError> {
        for (name, c) in copies {
            let p = params
                .get(name)
                .ok_or_else(|| GpuError::MissingParam { name: name.clone() })?;
            if p.shape() != c.shape() || !c.0.is_dense() {
                return Err(GpuError::Mismatch {
                    what: "parameter copy",
                    name: name.clone(),
                    expected: p.to_string(),
                    found: c.to_string(),
                });
            }
        }
        for (name, g) in grads {
            let p = params
                .get(name)
                .ok_or_else(|| GpuError::MissingParam { name: name.clone() })?;
            if p.shape() != g.shape() || !is_float(p) || !is_float(g) {
                return Err(GpuError::Mismatch {
                    what: "gradient",
                    name: name.clone(),
                    expected: p.to_string(),
                    found: g.to_string(),
                });
            }
        }
        self.step += 1;
        let rule = Rule::new(&self.config, self.step, lr);
        let buffers = self.config.buffers();
        let client = &self.client;
        for (name, g) in grads {
            let p = &params[name];
            let n = p.numel();
            let s = self.state.entry(name.clone()).or_insert_with(|| {
                let _exact = ops::ExactAllocation::start(client, self.exact);
                Moments::zeros(client, p.shape(), buffers)
            });
            let decay = self.config.decays(name, p.shape());
            let (w, g) = (p.handle(), g.handle());
            let copy = copies.get(name).map(|c| k::HalfCopy {
                elem: c.elem(),
                handle: c.handle(),
            });
            match rule {
                Rule::Adamw {
                    b1,
                    b2,
                    one_minus_b1,
                    one_minus_b2,
                    eps,
                    step_size,
                    bc2_sqrt,
                    decay_factor,
                } => {
                    let step = k::AdamwStep {
                        b1,
                        b2,
                        one_minus_b1,
                        one_minus_b2,
                        eps,
                        step_size,
                        bc2_sqrt,
                        keep: if decay { decay_factor } else { 1.0 },
                    };
                    let (m, v) = (s.m.as_ref(), s.v.as_ref());
                    let (m, v) = m.zip(v).expect("AdamW keeps two moments");
                    k::launch_adamw(client, &step, w, g, m, v, copy, n, grad_scale);
                }
                Rule::Lion {
                    b1,
                    b2,
                    one_minus_b1,
                    one_minus_b2,
                    lr,
                    decay_factor,
                } => {
                    let step = k::LionStep {
                        b1,
                        b2,
                        one_minus_b1,
                        one_minus_b2,
                        lr,
                        keep: if decay { decay_factor } else { 1.0 },
                    };
                    let m = s.m.as_ref().expect("Lion keeps a momentum");
                    k::launch_lion(client, &step, w, g, m, copy, n, grad_scale);
                }
                Rule::Sgd { momentum, lr, wd } => {
                    let step = k::SgdStep {
                        momentum,
                        lr,
                        wd: if decay { wd } else { 0.0 },
                    };
                    k::launch_sgd(client, &step, w, g, s.m.as_ref(), copy, n, grad_scale);
                }
            }
        }
        client
            .flush()
            .map_err(|e| GpuError::Device(format!("{e:?}")))
    }

    /// The state read back as a host [`Optimizer`] (for checkpoints).
    pub fn to_host(&self) -> Result<Optimizer, GpuError> {
        let mut shapes = Vec::new();
        let mut buffers = Vec::new();
        for (name, s) in &self.state {
            shapes.push((name.clone(), s.shape.clone()));
            for (suffix, h) in [("m", &s.m), ("v", &s.v)] {
                if let Some(h) = h {
                    let t = DevTensor::f32(h.clone(), s.shape.clone());
                    buffers.push((format!("{name}.{suffix}"), download(&self.client, &t)?));
                }
            }
        }
        Optimizer::from_state(self.config, self.step, buffers, &shapes)
            .map_err(|e| GpuError::Device(format!("reading the optimizer state back: {e}")))
    }
}

impl Moments {
    fn zeros<R: Runtime>(client: &ComputeClient<R>, shape: &[usize], buffers: &[&str]) -> Self {
        let n: usize = shape.iter().product();
        let buf = |name: &str| {
            buffers.contains(&name).then(|| {
                let h = client.empty(n.max(1) * 4);
                launch_fill_float(client, FloatElem::F32, &h, n, 0.0);
                h
            })
        };
        Moments {
            shape: shape.to_vec(),
            m: buf("m"),
            v: buf("v"),
        }
    }
}

fn upload_f32<R: Runtime>(client: &ComputeClient<R>, data: &[f32]) -> Handle {
    if data.is_empty() {
        client.empty(4)
    } else {
        client.create_from_slice(f32::as_bytes(data))
    }
}

/// Whether the tensor is stored as `f32` (f16/bf16 are held widened).
/// Whether the optimizer kernels read `t`: a float tensor in `f32`
/// storage (master weights and their gradients; a mixed-precision graph
/// casts its parameters to half precision where it reads them).
fn is_float(t: &DeviceTensor) -> bool {
    t.dtype() != DType::I32 && t.elem() == caramba_kernels::FloatElem::F32
}

/// The L2 norm of all `grads` taken together, as
/// `train::global_grad_norm`: one launch per tensor writes its partial sums
/// of squares (f32, in parallel), and the host adds the partials in f64.
pub fn global_grad_norm<R: Runtime>(
    client: &ComputeClient<R>,
    grads: &[&DeviceTensor],
) -> Result<f64, GpuError> {
    let partials = launch_norm_partials(client, grads)?;
    read_norm(client, partials)
}

/// Queues the partial sums of squares of `grads` (`None`: nothing to sum).
fn launch_norm_partials<R: Runtime>(
    client: &ComputeClient<R>,
    grads: &[&DeviceTensor],
) -> Result<Option<DevTensor>, GpuError> {
    let counts: Vec<usize> = grads
        .iter()
        .map(|g| k::sum_squares_partials(g.numel()))
        .collect();
    let total: usize = counts.iter().sum();
    if total == 0 {
        return Ok(None);
    }
    let partials = client.empty(total * 4);
    let mut offset = 0;
    for (g, &count) in grads.iter().zip(&counts) {
        if !is_float(g) {
            return Err(GpuError::Unsupported {
                at: "gradient norm".into(),
                message: format!("{g} gradients"),
            });
        }
        k::launch_sum_squares(client, g.handle(), g.numel(), &partials, offset);
        offset += count;
    }
    Ok(Some(DevTensor::f32(partials, vec![total])))
}

/// Reads the partials back (waiting for them) and finishes the norm.
fn read_norm<R: Runtime>(
    client: &ComputeClient<R>,
    partials: Option<DevTensor>,
) -> Result<f64, GpuError> {
    let Some(partials) = partials else {
        return Ok(0.0);
    };
    let sum: f64 = download(client, &partials)?.to_f64_vec().iter().sum();
    Ok(sum.sqrt())
}

/// One micro-batch: the training graph's inputs and symbols.
#[derive(Clone, Debug)]
pub struct MicroBatch {
    pub inputs: BTreeMap<String, Tensor>,
    pub syms: SymValues,
}

/// What one optimizer step reports.
#[derive(Clone, Debug, PartialEq)]
pub struct StepStats {
    /// The loss of each micro-batch, in order.
    pub losses: Vec<f64>,
    /// The global norm of the mean gradient, before clipping.
    pub grad_norm: f64,
    /// Where the host's time went.
    pub timing: StepTiming,
}

/// The host's time in one step, in three parts. Where `wait` is near
/// zero the device finished as soon as the host had queued everything:
/// the step is bound by the host's launches (or by whatever held them
/// back while queuing), not by the device running behind.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepTiming {
    /// Queuing every micro-batch's forward and backward kernels.
    pub issue: std::time::Duration,
    /// Waiting for the device to finish them (the losses and the
    /// gradient norm's partial sums read back).
    pub wait: std::time::Duration,
    /// Queuing the optimizer's updates (not waited for).
    pub update: std::time::Duration,
}

impl StepStats {
    /// The mean loss over the micro-batches.
    pub fn loss(&self) -> f64 {
        self.losses.iter().sum::<f64>() / self.losses.len() as f64
    }
}

/// Why a step was not taken.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// A micro-batch's loss was NaN or infinite; the parameters and the
    /// optimizer state are as they were before the step.
    #[error("the loss of micro-batch {micro_batch} is {loss}")]
    NonFiniteLoss { micro_batch: usize, loss: f64 },
}

/// A training graph on a device with its parameters, gradients and
/// optimizer state kept there (see the module documentation).
pub struct GpuTrainer<R: Runtime> {
    exec: GpuExecutor<R>,
    /// A forward-only graph sharing the parameter buffers, for evaluation.
    eval: Option<GpuExecutor<R>>,
    optimizer: DeviceOptimizer<R>,
    loss: String,
    /// The parameters with a gradient output, by name: the executor's own
    /// buffers (or, for one the graph never reads, an uploaded copy).
    /// Parameters without one are frozen.
    trainable: BTreeMap<String, DeviceTensor>,
    /// Host parameters the training graph neither reads nor updates,
    /// handed back by `params_to_host` as they came.
    untouched: Params,
    /// Gradients summed over the micro-batches since the last update.
    grads: BTreeMap<String, DeviceTensor>,
    /// Where those sums live once a second micro-batch arrives; kept from
    /// step to step so accumulation allocates once.
    acc: BTreeMap<String, DeviceTensor>,
    micro_batches: usize,
}

impl<R: Runtime> GpuTrainer<R> {
    /// Uploads `params` once and takes over the host optimizer's state
    /// (a fresh `Optimizer::new(config)`, or one loaded from a checkpoint).
    /// `graph` must have a scalar output `loss` and may have a
    /// `grad:<param>` output per trained parameter.
    pub fn new(
        device: &R::Device,
        graph: &Graph,
        loss: &str,
        params: &Params,
        optimizer: &Optimizer,
        options: GpuOptions,
    ) -> Result<Self, GpuError> {
        // The forward's casts of f32 master weights to the compute dtype
        // become copies the optimizer writes (`GpuOptions::param_copies`).
        let options = GpuOptions {
            param_copies: true,
            buffers: Some(options.buffers.unwrap_or(Buffers::Planned)),
            ..options
        };
        let exec = GpuExecutor::with_options(device, graph, params, options)?;
        let exact = exec.exact_buffers();
        let has_output = |name: &str| graph.outputs().iter().any(|(n, _)| n == name);
        if !has_output(loss) {
            return Err(GpuError::Op {
                at: "training graph".into(),
                message: format!("it has no output {loss:?}"),
            });
        }
        let on_device = exec.params();
        let mut trainable = BTreeMap::new();
        let mut untouched = Params::new();
        for (name, t) in params {
            let trained = has_output(&grad_name(name));
            match on_device.get(name) {
                Some(d) if trained => {
                    trainable.insert(name.clone(), d.clone());
                }
                Some(_) => {}
                // Updated (weight decay, momentum) though the loss does not read it.
                None if trained => {
                    trainable.insert(name.clone(), exec.upload(t)?);
                }
                None => {
                    untouched.insert(name.clone(), t.clone());
                }
            }
        }
        for (name, _) in graph.params() {
            if has_output(&grad_name(name)) && !trainable.contains_key(name) {
                return Err(GpuError::MissingParam {
                    name: name.to_string(),
                });
            }
        }
        let optimizer = {
            // The state a resumed run uploads lives as long as the trainer.
            let _exact = ops::ExactAllocation::start(exec.client(), exact);
            DeviceOptimizer::from_host(exec.client(), optimizer).with_exact_buffers(exact)
        };
        Ok(GpuTrainer {
            exec,
            eval: None,
            optimizer,
            loss: loss.to_string(),
            trainable,
            untouched,
            grads: BTreeMap::new(),
            acc: BTreeMap::new(),
            micro_batches: 0,
        })
    }

    /// Adds a forward-only graph (same parameters, output `loss`) for
    /// [`GpuTrainer::eval_loss`]. It reads the trained buffers, so it is
    /// built once and always sees the current weights.
    pub fn with_eval_graph(mut self, graph: &Graph) -> Result<Self, GpuError> {
        let mut params = self.exec.params();
        params.extend(self.trainable.clone());
        let eval = self.exec.sharing(graph, &params)?;
        self.eval = Some(eval);
        Ok(self)
    }

    /// The executor of the training graph (its parameters are the trained
    /// buffers).
    pub fn executor(&self) -> &GpuExecutor<R> {
        &self.exec
    }

    /// Optimizer steps taken so far (including those of a resumed run).
    pub fn step_count(&self) -> u64 {
        self.optimizer.step_count()
    }

    /// Forward and backward on one micro-batch; its gradients are added to
    /// those of the micro-batches since the last [`GpuTrainer::apply`].
    /// Returns the loss still on the device (reading it would wait).
    pub fn backward(
        &mut self,
        inputs: &BTreeMap<String, Tensor>,
        syms: SymValues,
    ) -> Result<DeviceTensor, GpuError> {
        let mut out = self.exec.run_resident(inputs, &BTreeMap::new(), syms)?;
        let loss = out.remove(&self.loss).expect("checked when built");
        let client = &self.exec.client;
        let exact = self.exec.exact_buffers();
        for (name, p) in &self.trainable {
            let g = out.remove(&grad_name(name)).expect("checked when built");
            let n = g.numel();
            match self.micro_batches {
                // The executor's fresh output: nobody else holds it.
                0 => {
                    self.grads.insert(name.clone(), g);
                }
                1 => {
                    let acc = self.acc.entry(name.clone()).or_insert_with(|| {
                        let _exact = ops::ExactAllocation::start(client, exact);
                        let h = client.empty(n.max(1) * 4);
                        DeviceTensor(DevTensor::f32(h, p.shape().to_vec()))
                    });
                    k::launch_add(
                        client,
                        self.grads[name].handle(),
                        g.handle(),
                        acc.handle(),
                        n,
                    );
                    self.grads.insert(name.clone(), acc.clone());
                }
                _ => k::launch_accumulate(client, self.grads[name].handle(), g.handle(), n),
            }
        }
        self.micro_batches += 1;
        Ok(loss)
    }

    /// The optimizer step on the mean of the accumulated gradients, at
    /// learning rate `lr`, clipped to global norm `grad_clip` if given;
    /// returns the norm before clipping (what to log). The clipping factor
    /// and the 1/count of the mean are one `grad_scale` of the update.
    ///
    /// # Panics
    /// If no micro-batch was run since the last step.
    pub fn apply(&mut self, lr: f64, grad_clip: Option<f64>) -> Result<f64, GpuError> {
        let partials = self.launch_norm();
        let norm = partials.and_then(|p| read_norm(&self.exec.client, p));
        self.update(norm, lr, grad_clip)
    }

    /// One optimizer step over `micro_batches` (forward + backward each,
    /// then [`GpuTrainer::apply`]). The losses are read back before the
    /// update, so a non-finite loss leaves the weights as they were; the
    /// norm's partial sums are queued before that read, so the step waits
    /// for the device once.
    pub fn step(
        &mut self,
        micro_batches: &[MicroBatch],
        lr: f64,
        grad_clip: Option<f64>,
    ) -> Result<StepStats, StepError> {
        // One hand-off to CubeCL's device thread for the whole step (see
        // `on_device_thread`).
        let client = self.exec.client.clone();
        super::on_device_thread(&client, || self.queue_step(micro_batches, lr, grad_clip))
    }

    /// [`GpuTrainer::step`] on the calling thread.
    fn queue_step(
        &mut self,
        micro_batches: &[MicroBatch],
        lr: f64,
        grad_clip: Option<f64>,
    ) -> Result<StepStats, StepError> {
        let began = std::time::Instant::now();
        let mut losses = Vec::with_capacity(micro_batches.len());
        for b in micro_batches {
            match self.backward(&b.inputs, b.syms) {
                Ok(loss) => losses.push(loss),
                Err(e) => {
                    self.discard_gradients();
                    return Err(e.into());
                }
            }
        }
        let partials = self.launch_norm();
        let issued = std::time::Instant::now();
        let read = partials.and_then(|partials| {
            let losses = losses
                .iter()
                .map(|l| Ok(self.exec.download(l)?.to_f64_vec()[0]))
                .collect::<Result<Vec<f64>, GpuError>>()?;
            Ok((losses, read_norm(&self.exec.client, partials)?))
        });
        let (losses, norm) = match read {
            Ok(r) => r,
            Err(e) => {
                self.discard_gradients();
                return Err(e.into());
            }
        };
        if let Some((i, &loss)) = losses.iter().enumerate().find(|(_, l)| !l.is_finite()) {
            self.discard_gradients();
            return Err(StepError::NonFiniteLoss {
                micro_batch: i,
                loss,
            });
        }
        let waited = std::time::Instant::now();
        let grad_norm = self.update(Ok(norm), lr, grad_clip)?;
        let timing = StepTiming {
            issue: issued - began,
            wait: waited - issued,
            update: waited.elapsed(),
        };
        Ok(StepStats {
            losses,
            grad_norm,
            timing,
        })
    }

    /// Queues the partial sums of the accumulated gradients' squares.
    ///
    /// # Panics
    /// If no micro-batch was run since the last step.
    fn launch_norm(&self) -> Result<Option<DevTensor>, GpuError> {
        assert!(
            self.micro_batches > 0,
            "GpuTrainer: an optimizer step without a backward pass"
        );
        let grads: Vec<&DeviceTensor> = self.grads.values().collect();
        launch_norm_partials(&self.exec.client, &grads)
    }

    /// The update, given the norm of the summed gradients; returns the norm
    /// of their mean. Clears the gradients whatever happens.
    fn update(
        &mut self,
        norm_of_sum: Result<f64, GpuError>,
        lr: f64,
        grad_clip: Option<f64>,
    ) -> Result<f64, GpuError> {
        let count = self.micro_batches;
        let result = norm_of_sum.and_then(|n| {
            let norm = n / count as f64;
            // As the host loop: the mean (scaled in f32), then the clip factor.
            let mut scale = if count > 1 { 1.0 / count as f32 } else { 1.0 };
            if let Some(factor) = grad_clip.and_then(|c| clip_factor(norm, c)) {
                scale *= factor as f32;
            }
            self.optimizer
                .step_with_copies(
                    &self.trainable,
                    &self.grads,
                    self.exec.param_copies(),
                    lr,
                    scale,
                )
                .map(|()| norm)
        });
        self.discard_gradients();
        result
    }

    /// The loss of the evaluation graph (see [`GpuTrainer::with_eval_graph`])
    /// on one batch, with the current weights.
    pub fn eval_loss(
        &self,
        inputs: &BTreeMap<String, Tensor>,
        syms: SymValues,
    ) -> Result<f64, GpuError> {
        let eval = self.eval.as_ref().ok_or_else(|| GpuError::Op {
            at: "evaluation".into(),
            message: "the trainer has no evaluation graph (see `with_eval_graph`)".into(),
        })?;
        let out = eval.run_resident(inputs, &BTreeMap::new(), syms)?;
        let loss = out.get(&self.loss).ok_or_else(|| GpuError::Op {
            at: "evaluation".into(),
            message: format!("the evaluation graph has no output {:?}", self.loss),
        })?;
        Ok(eval.download(loss)?.to_f64_vec()[0])
    }

    /// Every parameter read back (trained and frozen), for checkpoints and
    /// the run's result.
    pub fn params_to_host(&self) -> Result<Params, GpuError> {
        let mut out = self.untouched.clone();
        for (name, t) in self.exec.params().iter().chain(&self.trainable) {
            if !out.contains_key(name) {
                out.insert(name.clone(), self.exec.download(t)?);
            }
        }
        Ok(out)
    }

    /// The optimizer state read back as the host's [`Optimizer`].
    pub fn optimizer_to_host(&self) -> Result<Optimizer, GpuError> {
        self.optimizer.to_host()
    }

    fn discard_gradients(&mut self) {
        // The next step's backward makes gradients of the same sizes in
        // these buffers (those of the accumulators are kept by `acc`).
        for (_, g) in std::mem::take(&mut self.grads) {
            self.exec.recycle(g);
        }
        self.micro_batches = 0;
    }
}
