//! Where a graph runs: the CPU reference interpreter, wgpu or CUDA, chosen
//! by `--device cpu|wgpu|cuda|auto`. `Backend::run` is the one-shot form
//! (it uploads the parameters on every call); loops that run one graph many
//! times should build a `gpu::GpuExecutor` once instead, and training loops
//! a [`DeviceTrainer`].

use crate::gpu::train::{StepError, StepStats};
use crate::gpu::GpuError;
use crate::train::{Optimizer, Params};
use caramba_ir::reference::{eval, Bindings, EvalError, SymValues, Tensor};
use caramba_ir::Graph;
use std::collections::BTreeMap;
use std::fmt;

/// A place to run graphs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The reference interpreter.
    Cpu,
    /// CubeCL on wgpu (Vulkan, Metal, DX12; lavapipe in CI).
    Wgpu,
    /// CubeCL on CUDA.
    Cuda,
}

/// Why a backend could not run a graph.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Cpu(#[from] EvalError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error("the {0} backend is not compiled into this build (enable the `{0}` feature)")]
    NotCompiled(&'static str),
    #[error("no {0} device found")]
    NoDevice(&'static str),
    #[error("unknown device {0:?}: expected cpu, wgpu, cuda or auto")]
    Unknown(String),
    #[error("the {0} backend trains with the host optimizer; there is no device trainer for it")]
    NoDeviceTrainer(&'static str),
    #[error("the {0} backend has no device memory to keep values in")]
    NoDeviceMemory(&'static str),
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Wgpu => "wgpu",
            Backend::Cuda => "cuda",
        }
    }

    /// Parses `--device`: `cpu`, `wgpu`, `cuda` or `auto`.
    pub fn parse(s: &str) -> Result<Backend, BackendError> {
        match s {
            "cpu" => Ok(Backend::Cpu),
            "wgpu" => Ok(Backend::Wgpu),
            "cuda" => Ok(Backend::Cuda),
            "auto" => Ok(Backend::auto()),
            _ => Err(BackendError::Unknown(s.to_string())),
        }
    }

    /// CUDA if compiled in and a device opens; else wgpu on a real GPU (a
    /// CPU adapter such as lavapipe is slower than the reference); else the
    /// CPU.
    pub fn auto() -> Backend {
        if Backend::Cuda.available() {
            Backend::Cuda
        } else if wgpu_has_gpu() {
            Backend::Wgpu
        } else {
            Backend::Cpu
        }
    }

    /// Whether this backend is compiled in and has a device (any wgpu
    /// adapter counts, CPU ones included).
    pub fn available(self) -> bool {
        match self {
            Backend::Cpu => true,
            Backend::Wgpu => wgpu_any(),
            Backend::Cuda => cuda_any(),
        }
    }

    /// The largest single buffer this backend's device can allocate, where
    /// it has such a limit: a wgpu device's maximum storage-buffer binding
    /// (128 MiB on Mesa's lavapipe), CUDA's largest memory page. `None` on
    /// the CPU or when the device does not open.
    pub fn max_buffer_bytes(self) -> Option<u64> {
        match self {
            Backend::Cpu => None,
            Backend::Wgpu => wgpu_max_buffer(),
            Backend::Cuda => cuda_max_buffer(),
        }
    }

    /// Evaluates the graph's outputs.
    pub fn run(
        self,
        graph: &Graph,
        bindings: &Bindings,
    ) -> Result<BTreeMap<String, Tensor>, BackendError> {
        match self {
            Backend::Cpu => Ok(eval(graph, bindings)?),
            Backend::Wgpu => run_wgpu(graph, bindings),
            Backend::Cuda => run_cuda(graph, bindings),
        }
    }
}

#[cfg(feature = "wgpu")]
fn wgpu_any() -> bool {
    caramba_kernels::wgpu_available()
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_any() -> bool {
    false
}

#[cfg(feature = "wgpu")]
fn wgpu_has_gpu() -> bool {
    caramba_kernels::wgpu_adapters().iter().any(|(_, cpu)| !cpu)
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_has_gpu() -> bool {
    false
}

#[cfg(feature = "cuda")]
fn cuda_any() -> bool {
    caramba_kernels::cuda_available()
}

#[cfg(not(feature = "cuda"))]
fn cuda_any() -> bool {
    false
}

#[cfg(feature = "wgpu")]
fn wgpu_max_buffer() -> Option<u64> {
    use crate::gpu::{WgpuDevice, WgpuRuntime};
    use caramba_kernels::cubecl::Runtime;
    wgpu_any().then(|| {
        let client = WgpuRuntime::client(&WgpuDevice::DefaultDevice);
        client.properties().memory.max_page_size
    })
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_max_buffer() -> Option<u64> {
    None
}

#[cfg(feature = "cuda")]
fn cuda_max_buffer() -> Option<u64> {
    use crate::gpu::{CudaDevice, CudaRuntime};
    use caramba_kernels::cubecl::Runtime;
    cuda_any().then(|| {
        let client = CudaRuntime::client(&CudaDevice { index: 0 });
        client.properties().memory.max_page_size
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda_max_buffer() -> Option<u64> {
    None
}

#[cfg(feature = "wgpu")]
fn run_wgpu(graph: &Graph, bindings: &Bindings) -> Result<BTreeMap<String, Tensor>, BackendError> {
    use crate::gpu::{GpuExecutor, WgpuDevice, WgpuRuntime};
    if !wgpu_any() {
        return Err(BackendError::NoDevice("wgpu"));
    }
    let exec = GpuExecutor::<WgpuRuntime>::new(&WgpuDevice::DefaultDevice, graph, bindings.params)?;
    Ok(exec.run_bindings(bindings)?)
}

#[cfg(not(feature = "wgpu"))]
fn run_wgpu(_: &Graph, _: &Bindings) -> Result<BTreeMap<String, Tensor>, BackendError> {
    Err(BackendError::NotCompiled("wgpu"))
}

#[cfg(feature = "cuda")]
fn run_cuda(graph: &Graph, bindings: &Bindings) -> Result<BTreeMap<String, Tensor>, BackendError> {
    use crate::gpu::{CudaDevice, CudaRuntime, GpuExecutor};
    if !cuda_any() {
        return Err(BackendError::NoDevice("cuda"));
    }
    let exec = GpuExecutor::<CudaRuntime>::new(&CudaDevice { index: 0 }, graph, bindings.params)?;
    Ok(exec.run_bindings(bindings)?)
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_: &Graph, _: &Bindings) -> Result<BTreeMap<String, Tensor>, BackendError> {
    Err(BackendError::NotCompiled("cuda"))
}

/// A graph prepared once on a backend and run many times: on a GPU its
/// parameters are uploaded when it is built; on the CPU it evaluates with
/// the parameters of each call's bindings.
pub enum Executor {
    Cpu(Graph),
    #[cfg(feature = "wgpu")]
    Wgpu(Box<crate::gpu::GpuExecutor<crate::gpu::WgpuRuntime>>),
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::gpu::GpuExecutor<crate::gpu::CudaRuntime>>),
}

impl Executor {
    pub fn new(
        backend: Backend,
        graph: &Graph,
        params: &dyn caramba_ir::reference::ParamSource,
    ) -> Result<Executor, BackendError> {
        Executor::with_options(backend, graph, params, Default::default())
    }

    /// [`Executor::new`] with GPU options (ignored on the CPU).
    pub fn with_options(
        backend: Backend,
        graph: &Graph,
        params: &dyn caramba_ir::reference::ParamSource,
        #[allow(unused_variables)] options: crate::gpu::GpuOptions,
    ) -> Result<Executor, BackendError> {
        match backend {
            Backend::Cpu => Ok(Executor::Cpu(graph.clone())),
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => {
                use crate::gpu::{GpuExecutor, WgpuDevice};
                if !wgpu_any() {
                    return Err(BackendError::NoDevice("wgpu"));
                }
                let e =
                    GpuExecutor::with_options(&WgpuDevice::DefaultDevice, graph, params, options)?;
                Ok(Executor::Wgpu(Box::new(e)))
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda => {
                use crate::gpu::{CudaDevice, GpuExecutor};
                if !cuda_any() {
                    return Err(BackendError::NoDevice("cuda"));
                }
                let e =
                    GpuExecutor::with_options(&CudaDevice { index: 0 }, graph, params, options)?;
                Ok(Executor::Cuda(Box::new(e)))
            }
            #[allow(unreachable_patterns)]
            other => Err(BackendError::NotCompiled(other.name())),
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Executor::Cpu(_) => Backend::Cpu,
            #[cfg(feature = "wgpu")]
            Executor::Wgpu(_) => Backend::Wgpu,
            #[cfg(feature = "cuda")]
            Executor::Cuda(_) => Backend::Cuda,
        }
    }

    /// The per-op profile of a GPU executor built with profiling (empty
    /// otherwise), slowest op kind first.
    pub fn profile(&self) -> Vec<crate::gpu::OpProfile> {
        match self {
            Executor::Cpu(_) => Vec::new(),
            #[cfg(feature = "wgpu")]
            Executor::Wgpu(e) => e.profile(),
            #[cfg(feature = "cuda")]
            Executor::Cuda(e) => e.profile(),
        }
    }

    pub fn run(&self, bindings: &Bindings) -> Result<BTreeMap<String, Tensor>, BackendError> {
        match self {
            Executor::Cpu(g) => Ok(eval(g, bindings)?),
            #[cfg(feature = "wgpu")]
            Executor::Wgpu(e) => Ok(e.run_bindings(bindings)?),
            #[cfg(feature = "cuda")]
            Executor::Cuda(e) => Ok(e.run_bindings(bindings)?),
        }
    }

    /// Whether values can stay on a device between runs
    /// ([`Executor::run_resident`]).
    pub fn is_device(&self) -> bool {
        !matches!(self, Executor::Cpu(_))
    }

    /// A GPU executor's `run_resident`: inputs bound on the host or on the
    /// device, every output left on the device. On the CPU there is no
    /// device: an error.
    #[cfg_attr(not(any(feature = "wgpu", feature = "cuda")), allow(unused_variables))]
    pub fn run_resident(
        &self,
        host: &BTreeMap<String, Tensor>,
        device: &BTreeMap<String, crate::gpu::DeviceTensor>,
        syms: caramba_ir::reference::SymValues,
    ) -> Result<BTreeMap<String, crate::gpu::DeviceTensor>, BackendError> {
        match self {
            Executor::Cpu(_) => Err(BackendError::NoDeviceMemory("cpu")),
            #[cfg(feature = "wgpu")]
            Executor::Wgpu(e) => Ok(e.run_resident(host, device, syms)?),
            #[cfg(feature = "cuda")]
            Executor::Cuda(e) => Ok(e.run_resident(host, device, syms)?),
        }
    }

    /// A GPU executor's `run_appending`: `run_resident` with the device
    /// inputs moved in, so that the caches the graph extends are appended
    /// in place (see [`crate::gpu::GpuExecutor::run_appending`]). On the
    /// CPU there is no device: an error.
    #[cfg_attr(not(any(feature = "wgpu", feature = "cuda")), allow(unused_variables))]
    pub fn run_appending(
        &self,
        host: &BTreeMap<String, Tensor>,
        device: BTreeMap<String, crate::gpu::DeviceTensor>,
        syms: caramba_ir::reference::SymValues,
        reserve_rows: usize,
    ) -> Result<BTreeMap<String, crate::gpu::DeviceTensor>, BackendError> {
        match self {
            Executor::Cpu(_) => Err(BackendError::NoDeviceMemory("cpu")),
            #[cfg(feature = "wgpu")]
            Executor::Wgpu(e) => Ok(e.run_appending(host, device, syms, reserve_rows)?),
            #[cfg(feature = "cuda")]
            Executor::Cuda(e) => Ok(e.run_appending(host, device, syms, reserve_rows)?),
        }
    }

    /// How many caches a GPU executor's runs appended to in place (0 on
    /// the CPU).
    pub fn appends_in_place(&self) -> usize {
        match self {
            Executor::Cpu(_) => 0,
            #[cfg(feature = "wgpu")]
            Executor::Wgpu(e) => e.appends_in_place(),
            #[cfg(feature = "cuda")]
            Executor::Cuda(e) => e.appends_in_place(),
        }
    }

    /// Reads a device value of a GPU executor back.
    #[cfg_attr(not(any(feature = "wgpu", feature = "cuda")), allow(unused_variables))]
    pub fn download(&self, t: &crate::gpu::DeviceTensor) -> Result<Tensor, BackendError> {
        match self {
            Executor::Cpu(_) => Err(BackendError::NoDeviceMemory("cpu")),
            #[cfg(feature = "wgpu")]
            Executor::Wgpu(e) => Ok(e.download(t)?),
            #[cfg(feature = "cuda")]
            Executor::Cuda(e) => Ok(e.download(t)?),
        }
    }
}

/// A training graph prepared once on a GPU, whichever runtime: parameters,
/// gradients and optimizer state stay on the device between steps (see
/// `gpu::train::GpuTrainer`, whose methods these forward to).
pub enum DeviceTrainer {
    #[cfg(feature = "wgpu")]
    Wgpu(Box<crate::gpu::train::GpuTrainer<crate::gpu::WgpuRuntime>>),
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::gpu::train::GpuTrainer<crate::gpu::CudaRuntime>>),
}

// Without a GPU runtime compiled in, the enum is empty and the arguments unused.
#[cfg_attr(not(any(feature = "wgpu", feature = "cuda")), allow(unused_variables))]
impl DeviceTrainer {
    /// Uploads the parameters and the optimizer's state. `graph` is the
    /// training graph (output `loss` and `grad:<param>` outputs); `eval`,
    /// if given, a forward-only graph with the same parameters and a `loss`
    /// output for [`DeviceTrainer::eval_loss`].
    pub fn new(
        backend: Backend,
        graph: &Graph,
        eval: Option<&Graph>,
        params: &Params,
        optimizer: &Optimizer,
        options: crate::gpu::GpuOptions,
    ) -> Result<DeviceTrainer, BackendError> {
        #[cfg(any(feature = "wgpu", feature = "cuda"))]
        fn build<R: caramba_kernels::cubecl::Runtime>(
            device: &R::Device,
            graph: &Graph,
            eval: Option<&Graph>,
            params: &Params,
            optimizer: &Optimizer,
            options: crate::gpu::GpuOptions,
        ) -> Result<Box<crate::gpu::train::GpuTrainer<R>>, GpuError> {
            let mut t = crate::gpu::train::GpuTrainer::new(
                device, graph, "loss", params, optimizer, options,
            )?;
            if let Some(g) = eval {
                t = t.with_eval_graph(g)?;
            }
            Ok(Box::new(t))
        }
        match backend {
            Backend::Cpu => Err(BackendError::NoDeviceTrainer("cpu")),
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => {
                if !wgpu_any() {
                    return Err(BackendError::NoDevice("wgpu"));
                }
                let device = crate::gpu::WgpuDevice::DefaultDevice;
                Ok(DeviceTrainer::Wgpu(build(
                    &device, graph, eval, params, optimizer, options,
                )?))
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda => {
                if !cuda_any() {
                    return Err(BackendError::NoDevice("cuda"));
                }
                let device = crate::gpu::CudaDevice { index: 0 };
                Ok(DeviceTrainer::Cuda(build(
                    &device, graph, eval, params, optimizer, options,
                )?))
            }
            #[allow(unreachable_patterns)]
            other => Err(BackendError::NotCompiled(other.name())),
        }
    }

    pub fn backend(&self) -> Backend {
        match *self {
            #[cfg(feature = "wgpu")]
            DeviceTrainer::Wgpu(_) => Backend::Wgpu,
            #[cfg(feature = "cuda")]
            DeviceTrainer::Cuda(_) => Backend::Cuda,
        }
    }

    /// The per-op profile of the training graph's runs, when built with
    /// `GpuOptions::profile` (the optimizer's update launches are not in it).
    pub fn profile(&self) -> Vec<crate::gpu::OpProfile> {
        match *self {
            #[cfg(feature = "wgpu")]
            DeviceTrainer::Wgpu(ref t) => t.executor().profile(),
            #[cfg(feature = "cuda")]
            DeviceTrainer::Cuda(ref t) => t.executor().profile(),
        }
    }

    /// The bytes the device's memory pools hold (CubeCL's
    /// `bytes_reserved`): pools keep their pages, so after a run this is
    /// the high-water mark of what the training needed, padding included
    /// (more than PyTorch's `max_memory_allocated`, which counts live
    /// tensors only). Except once: a buffer plan gives the first step's
    /// buffers back before it makes its arenas (the mark before that is
    /// `PlanReport::reserved_before`).
    pub fn reserved_bytes(&self) -> Option<u64> {
        match *self {
            #[cfg(feature = "wgpu")]
            DeviceTrainer::Wgpu(ref t) => t.executor().reserved_bytes(),
            #[cfg(feature = "cuda")]
            DeviceTrainer::Cuda(ref t) => t.executor().reserved_bytes(),
        }
    }

    /// What the training executor's buffer plan did
    /// ([`crate::gpu::GpuExecutor::buffer_plan`]; `None` unless planned).
    pub fn buffer_plan(&self) -> Option<crate::gpu::PlanReport> {
        match *self {
            #[cfg(feature = "wgpu")]
            DeviceTrainer::Wgpu(ref t) => t.executor().buffer_plan(),
            #[cfg(feature = "cuda")]
            DeviceTrainer::Cuda(ref t) => t.executor().buffer_plan(),
        }
    }

    /// The profiled runs' peak of live buffers
    /// ([`crate::gpu::GpuExecutor::peak_bytes_in_use`]; with
    /// `GpuOptions::profile` only).
    pub fn peak_bytes_in_use(&self) -> Option<u64> {
        match *self {
            #[cfg(feature = "wgpu")]
            DeviceTrainer::Wgpu(ref t) => t.executor().peak_bytes_in_use(),
            #[cfg(feature = "cuda")]
            DeviceTrainer::Cuda(ref t) => t.executor().peak_bytes_in_use(),
        }
    }

    /// The same peak less the buffers held for reuse
    /// ([`crate::gpu::GpuExecutor::peak_bytes_in_values`]).
    pub fn peak_bytes_in_values(&self) -> Option<u64> {
        match *self {
            #[cfg(feature = "wgpu")]
            DeviceTrainer::Wgpu(ref t) => t.executor().peak_bytes_in_values(),
            #[cfg(feature = "cuda")]
            DeviceTrainer::Cuda(ref t) => t.executor().peak_bytes_in_values(),
        }
    }

    /// One optimizer step over micro-batches (`GpuTrainer::step`).
    pub fn step(
        &mut self,
        micro_batches: &[crate::gpu::train::MicroBatch],
        lr: f64,
        grad_clip: Option<f64>,
    ) -> Result<StepStats, StepError> {
        match *self {
            #[cfg(feature = "wgpu")]
            DeviceTrainer::Wgpu(ref mut t) => t.step(micro_batches, lr, grad_clip),
            #[cfg(feature = "cuda")]
            DeviceTrainer::Cuda(ref mut t) => t.step(micro_batches, lr, grad_clip),
        }
    }

    /// The evaluation graph's loss with the current weights.
    pub fn eval_loss(
        &self,
        inputs: &BTreeMap<String, Tensor>,
        syms: SymValues,
    ) -> Result<f64, GpuError> {
        match *self {
            #[cfg(feature = "wgpu")]
            DeviceTrainer::Wgpu(ref t) => t.eval_loss(inputs, syms),
            #[cfg(feature = "cuda")]
            DeviceTrainer::Cuda(ref t) => t.eval_loss(inputs, syms),
        }
    }

    /// Every parameter, read back.
    pub fn params_to_host(&self) -> Result<Params, GpuError> {
        match *self {
            #[cfg(feature = "wgpu")]
            DeviceTrainer::Wgpu(ref t) => t.params_to_host(),
            #[cfg(feature = "cuda")]
            DeviceTrainer::Cuda(ref t) => t.params_to_host(),
        }
    }

    /// The optimizer and its state, read back.
    pub fn optimizer_to_host(&self) -> Result<Optimizer, GpuError> {
        match *self {
            #[cfg(feature = "wgpu")]
            DeviceTrainer::Wgpu(ref t) => t.optimizer_to_host(),
            #[cfg(feature = "cuda")]
            DeviceTrainer::Cuda(ref t) => t.optimizer_to_host(),
        }
    }
}
