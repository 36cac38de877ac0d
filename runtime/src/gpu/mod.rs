//! The GPU executor: runs an `ir::Graph` on a CubeCL device (wgpu or CUDA),
//! node by node in the graph's topological order, one kernel launch per op
//! (see `ops.rs` for the op → kernel table). Parameters are uploaded once
//! when the executor is built; inputs are uploaded per call; every value is
//! released after its last use (use counts, as the reference interpreter
//! does); outputs are read back as reference `Tensor`s so the two backends
//! compare directly.
//!
//! Values can also stay on the device between calls ([`DeviceTensor`],
//! [`GpuExecutor::run_resident`]): the trainer (`train.rs`) keeps gradients
//! and optimizer state there and updates the executor's parameter buffers
//! in place, and a decoder can feed a cache output back as the next call's
//! input without a round trip through the host.
//!
//! Storage: `f32` tensors are `f32` buffers and `i32` tensors `i32`
//! buffers. `f16` and `bf16` tensors are 2-byte buffers of their own type
//! where the device supports the type (CUDA: both; wgpu: `f16` where the
//! adapter has shader f16, never `bf16`), and otherwise `f32` buffers of
//! values rounded to the narrow grid after every op (see [`HalfStorage`]).
//! Either way kernels compute in `f32` and round each half-precision result
//! once, as the reference interpreter does. `f64`, `u32` and `bool` are not
//! supported on the device: building an executor for a graph that uses
//! them is an error, found before any launch.

mod append;
mod liveness;
mod ops;
pub mod source;
pub mod train;

pub use liveness::PlanReport;
pub use source::{kernel_sources, KernelSource, Target};

use caramba_ir::reference::{
    self as reference, round_bf16, round_f16, Bindings, EvalError, ParamSource, Storage, SymValues,
    Tensor,
};
use caramba_ir::{DType, Graph, Node, NodeId, Shape};
use caramba_kernels::cubecl::prelude::*;
use caramba_kernels::cubecl::server::Handle;
use caramba_kernels::vendor_gemm::VendorGemm;
use caramba_kernels::FloatElem;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

#[cfg(feature = "cuda")]
pub use caramba_kernels::cubecl::cuda::{CudaDevice, CudaRuntime};
#[cfg(feature = "wgpu")]
pub use caramba_kernels::cubecl::wgpu::{WgpuDevice, WgpuRuntime};

/// Why a GPU run failed.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("input {name:?} is not bound")]
    MissingInput { name: String },
    #[error("parameter {name:?} is not bound")]
    MissingParam { name: String },
    #[error("{what} {name:?}: expected {expected}, found {found}")]
    Mismatch {
        what: &'static str,
        name: String,
        expected: String,
        found: String,
    },
    #[error("symbol {sym} is not bound and no input or parameter determines it (needed at {at})")]
    UnboundSymbol { sym: caramba_ir::Sym, at: String },
    /// An op or dtype the GPU backend does not implement.
    #[error("{at}: not supported on the GPU backend: {message}")]
    Unsupported { at: String, message: String },
    /// An op could not be applied to its operands.
    #[error("{at}: {message}")]
    Op { at: String, message: String },
    /// The device failed (launch, read-back, no device).
    #[error("device error: {0}")]
    Device(String),
    /// An input given both as a host tensor and as a device tensor.
    #[error("input {name:?} is bound both on the host and on the device")]
    BoundTwice { name: String },
}

/// Choices that trade exactness for speed.
#[derive(Clone, Copy, Debug, Default)]
pub struct GpuOptions {
    /// Let matmuls use tensor cores (CMMA), which on NVIDIA cards computes
    /// `f32` products in TF32 (about 3 decimal digits). Off: exact `f32`.
    pub fast_matmul: bool,
    /// Which library computes GEMMs: the vendor's where there is one
    /// (the default), or cubek everywhere (to compare them).
    pub gemm: GemmLibrary,
    /// Wait for each kernel and add its time to a per-op table
    /// ([`GpuExecutor::profile`]). Serializes the device: for finding where
    /// time goes, not for timing whole runs.
    pub profile: bool,
    /// Keep each parameter's half-precision cast (a mixed-precision graph's
    /// `cast(param, bf16)`) as a buffer made once, instead of casting on
    /// every run ([`GpuExecutor::param_copies`]). Whoever updates the
    /// parameters must update the copies too: the trainer turns this on and
    /// its optimizer writes them in the same launch. Executors made by
    /// [`GpuExecutor::sharing`] never keep copies (they would go stale).
    pub param_copies: bool,
    /// How buffers are allocated; `None`: the runner's default, which is
    /// [`Buffers::Planned`] for [`train::GpuTrainer`] (every step asks for
    /// the same sizes) and [`Buffers::Pooled`] for everything else.
    pub buffers: Option<Buffers>,
    /// With [`Buffers::Exact`] or [`Buffers::Planned`]: the smallest value,
    /// in bytes, that takes an exact (or planned) buffer; smaller ones
    /// (norms' weights, per-row statistics) stay in the pools' small
    /// pages. `None`: 1 MiB. Tests lower it to plan a tiny model's values.
    pub exact_min_bytes: Option<u64>,
    /// Rows of logits one block of a `linear_cross_entropy` (or its
    /// gradients) holds, rounded down to a multiple of 256 (at least 256);
    /// `None`: as many as fit in 1 GiB (or the device's largest buffer).
    /// Tests lower it to run a tiny model's loss in several blocks.
    pub loss_block_rows: Option<usize>,
}

/// Where an executor's buffers come from.
///
/// CubeCL's pools slice large pages: on an H200 an allocation between
/// 0.56 and 4.49 GB takes a slice of a 9 GB page, a larger one a slice of
/// a 35.9 GB page, and a page stays reserved while any slice of it lives.
/// Training SmolLM2-135M at batch 32 × 2048 in bf16 kept 47.8 GiB of live
/// values and reserved 83.6 GiB for them; with exact buffers it reserves
/// 55.9 GiB at the same step time, the 1B shape 51.0 GiB for 45.0 instead
/// of 59.6 (BENCHMARKS.md, twenty-ninth session).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Buffers {
    /// Every buffer from CubeCL's pools: right where sizes change from run
    /// to run (generation without a cache), since pages are shared by any
    /// size.
    Pooled,
    /// Parameters, the executor's own tables and every value of a
    /// megabyte or more in a buffer of exactly its size, reused (by
    /// CubeCL's persistent pool, not held by the executor) for the same
    /// size only: right where every run asks for the same sizes (a
    /// training step), since such buffers are never sliced and never
    /// returned to the device while it is open.
    Exact,
    /// As [`Buffers::Exact`], and the values of a run placed by a plan:
    /// the first run with each set of input shapes records which values
    /// are alive together, and the runs after it place those that die
    /// within the run (or before the next run starts, as a trainer's
    /// gradients do) at offsets in a few large buffers, so that memory is
    /// reserved for the most bytes alive at once rather than for the most
    /// buffers of each size (see `liveness.rs`; BENCHMARKS.md, thirtieth
    /// session). The trainer's default.
    Planned,
}

impl Buffers {
    /// Whether large buffers are allocated at their exact sizes.
    pub fn exact(self) -> bool {
        matches!(self, Buffers::Exact | Buffers::Planned)
    }
}

/// Who computes matrix products on the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GemmLibrary {
    /// cuBLASLt on CUDA devices when `libcublasLt` loads (products whose
    /// layout it cannot read, and matrix-vector products, stay on our
    /// kernels); cubek elsewhere.
    #[default]
    Vendor,
    /// cubek's GEMM (and our matrix-vector kernel) everywhere.
    Cubek,
}

/// One op kind's line of a profile ([`GpuOptions::profile`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OpProfile {
    /// The op's mnemonic (matmuls with their operand shapes).
    pub op: String,
    pub launches: usize,
    /// From the launch call until the device finished it (the device idle
    /// before it).
    pub secs: f64,
    /// Of `secs`, the time in the launch call on the host: buffer
    /// allocation, kernel selection and enqueueing. Where it is most of
    /// `secs`, the op is host-bound.
    pub host_secs: f64,
}

/// Which half-precision types a device stores as 2-byte buffers; the
/// others are widened to `f32` buffers (values on the narrow grid).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct HalfStorage {
    pub f16: bool,
    pub bf16: bool,
}

impl HalfStorage {
    pub fn of<R: Runtime>(client: &ComputeClient<R>) -> HalfStorage {
        HalfStorage {
            f16: FloatElem::F16.supported(client),
            bf16: FloatElem::BF16.supported(client),
        }
    }

    /// The storage of a float tensor of `dtype` (`F32` for non-floats,
    /// whose storage is not a float type).
    pub fn elem(self, dtype: DType) -> FloatElem {
        match dtype {
            DType::F16 if self.f16 => FloatElem::F16,
            DType::BF16 if self.bf16 => FloatElem::BF16,
            _ => FloatElem::F32,
        }
    }

    /// Whether values of `dtype` are widened to `f32` buffers (and so
    /// rounded by a separate kernel after each op).
    pub fn widens(self, dtype: DType) -> bool {
        matches!(dtype, DType::F16 | DType::BF16) && self.elem(dtype) == FloatElem::F32
    }
}

/// A device buffer with its logical dtype and shape. The buffer is dense
/// row-major in `shape`; or, when `transposed`, in `shape` with its last
/// two axes swapped (an unmaterialized permute that only matmuls read); or,
/// when `layout` is set, laid out by its strides from its offset (an
/// unmaterialized permute or slice that only view-reading ops read, see
/// `ops::reads_views`).
#[derive(Clone, Debug)]
pub(crate) struct DevTensor {
    pub handle: Handle,
    pub shape: Vec<usize>,
    pub dtype: DType,
    /// The buffer's element type when `dtype` is a float (`F32` otherwise).
    pub elem: FloatElem,
    pub transposed: bool,
    /// Strides and element offset of a lazy view (`None`: dense).
    pub layout: Option<(Vec<usize>, usize)>,
}

impl DevTensor {
    pub fn dense(handle: Handle, shape: Vec<usize>, dtype: DType, elem: FloatElem) -> DevTensor {
        DevTensor {
            handle,
            shape,
            dtype,
            elem,
            transposed: false,
            layout: None,
        }
    }

    /// Whether the buffer holds `shape` dense and row-major.
    pub fn is_dense(&self) -> bool {
        !self.transposed && self.layout.is_none()
    }

    /// An `f32` tensor (gradients, optimizer state).
    pub fn f32(handle: Handle, shape: Vec<usize>) -> DevTensor {
        DevTensor::dense(handle, shape, DType::F32, FloatElem::F32)
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// What a run's buffer decisions read of the run so far.
struct RunState<'a> {
    syms: &'a SymValues,
    values: &'a HashMap<NodeId, DevTensor>,
    /// Rows a cache allocated this run has room for (see `append`).
    reserve_rows: usize,
}

/// A value that lives on the device: an output of
/// [`GpuExecutor::run_resident`], an [`GpuExecutor::upload`], or one of an
/// executor's parameters. Cloning it clones the handle, not the data: every
/// clone names the same buffer, so a kernel that writes through one (the
/// optimizer updating a parameter) is seen through all of them.
#[derive(Clone, Debug)]
pub struct DeviceTensor(pub(crate) DevTensor);

impl DeviceTensor {
    pub fn shape(&self) -> &[usize] {
        &self.0.shape
    }

    /// The logical dtype.
    pub fn dtype(&self) -> DType {
        self.0.dtype
    }

    /// How a float tensor's buffer stores it: `f16`/`bf16` tensors are
    /// 2-byte buffers on devices that support the type, else `f32`.
    pub fn elem(&self) -> FloatElem {
        self.0.elem
    }

    pub fn numel(&self) -> usize {
        self.0.numel()
    }

    /// The device buffer, for callers that launch their own kernels on it.
    /// It is dense and row-major; float tensors are stored as
    /// [`DeviceTensor::elem`], integer ones as `i32`.
    pub fn handle(&self) -> &Handle {
        &self.0.handle
    }
}

impl std::fmt::Display for DeviceTensor {
    /// `f32[2, 3]`, like a host `Tensor`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dims: Vec<String> = self.0.shape.iter().map(|d| d.to_string()).collect();
        write!(f, "{}[{}]", self.0.dtype, dims.join(", "))
    }
}

/// Where a node sits, for messages: `matmul @ model.layers.0.mlp`.
pub(crate) fn at(node: &Node) -> String {
    if node.scope.is_empty() {
        node.op.mnemonic().to_string()
    } else {
        format!("{} @ {}", node.op.mnemonic(), node.scope)
    }
}

/// Runs one graph on one device. Build once (parameters are uploaded
/// then), call [`GpuExecutor::run`] many times.
pub struct GpuExecutor<R: Runtime> {
    client: ComputeClient<R>,
    graph: Graph,
    /// Live nodes (those the outputs depend on) in topological order.
    order: Vec<NodeId>,
    operands: HashMap<NodeId, Vec<NodeId>>,
    /// Reads of each value per run: one per operand edge, one per output.
    uses: HashMap<NodeId, usize>,
    params: HashMap<NodeId, DevTensor>,
    /// Permutes of the last two axes that feed only matmuls: not copied.
    lazy_transposes: HashSet<NodeId>,
    /// Permutes and slices read in place (see `Plan`): not copied.
    lazy_views: HashSet<NodeId>,
    /// Weight-gradient matmuls whose batch sum is one GEMM (see `Plan`).
    batch_summed: HashSet<NodeId>,
    /// Those of them whose sum is read only transposed (see `Plan`).
    transposed_sums: HashSet<NodeId>,
    /// Elementwise ops computed into their concatenation's buffer (see
    /// `Plan`).
    slots: HashMap<NodeId, (NodeId, usize)>,
    /// Concatenations that may append to their first operand (see
    /// `append`), by that operand.
    appends: HashMap<NodeId, NodeId>,
    /// How many concatenations appended in place so far.
    appended: std::sync::atomic::AtomicUsize,
    /// `attention_with_lse` nodes whose values and log-sum-exp go to
    /// buffers of their own (see [`SplitLse`]).
    split_lse: HashMap<NodeId, SplitLse>,
    /// Values written in the order of their one permuting reader (see
    /// [`permuted_outputs`]), by that permutation.
    permuted: HashMap<NodeId, Vec<usize>>,
    /// `attention_grad` nodes computed together with a sibling (see
    /// [`grad_pairs`]): the first of each pair in order, by the other.
    grad_pairs: HashMap<NodeId, NodeId>,
    /// Losses whose launch computes their gradients too (see
    /// [`loss_grads`]).
    loss_grads: HashMap<NodeId, LossGrads>,
    /// Producers that add the other operand of their one reader, an add,
    /// in (see [`folded_adds`]): by that add and its other operand.
    folded_adds: HashMap<NodeId, (NodeId, NodeId)>,
    /// Ops that write their result over their first operand (see
    /// [`in_place`]).
    in_place: HashSet<NodeId>,
    /// Reductions of slices computed as slices of one whole reduction
    /// (see [`ReducedSlices`]).
    reduced_slices: ReducedSlices,
    options: GpuOptions,
    /// cuBLASLt on CUDA (shared by the device's executors), for matmuls.
    vendor: Option<Arc<VendorGemm>>,
    /// Per-op launches and times, when profiling.
    profile: std::sync::Mutex<BTreeMap<String, OpProfile>>,
    /// When profiling: the most bytes the device's pools had handed out
    /// (CubeCL's `bytes_in_use`) after any op.
    peak_in_use: std::sync::atomic::AtomicU64,
    /// The same, less the buffers held for reuse at that moment.
    peak_in_values: std::sync::atomic::AtomicU64,
    /// Which half-precision types the device stores narrow.
    narrow: HalfStorage,
    /// RoPE's inverse frequencies per rope node, uploaded once: an upload
    /// per launch cost about half a millisecond of host time on CUDA, most
    /// of a decode step.
    rope_freqs: HashMap<NodeId, Handle>,
    /// Each rope node's key among this run's angle tables (`rope_tables`).
    rope_keys: HashMap<NodeId, ops::RopeKey>,
    /// Each `matmul_rope` node's slots for RoPE in a gemv's epilogue, where
    /// its ranges allow it (`gemv::rope_slots`).
    rope_slots: HashMap<NodeId, Handle>,
    rope_tables: ops::RopeTables,
    /// With [`GpuOptions::param_copies`]: the casts of parameters to a half
    /// precision the device stores narrow, each bound to its copy, and the
    /// copies by parameter name.
    copies: HashMap<NodeId, DevTensor>,
    copies_by_name: BTreeMap<String, DeviceTensor>,
    /// Buffers of values no run needs any more, reused for new values.
    recycled: ops::Recycled,
}

impl<R: Runtime> GpuExecutor<R> {
    /// Checks that every live op is supported and uploads the parameters.
    pub fn new(
        device: &R::Device,
        graph: &Graph,
        params: &dyn ParamSource,
    ) -> Result<Self, GpuError> {
        Self::with_options(device, graph, params, GpuOptions::default())
    }

    pub fn with_options(
        device: &R::Device,
        graph: &Graph,
        params: &dyn ParamSource,
        options: GpuOptions,
    ) -> Result<Self, GpuError> {
        let plan = Plan::new(graph)?;
        // CubeCL panics when the device cannot be opened; report it instead.
        let client = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| R::client(device)))
            .map_err(|_| GpuError::Device(format!("cannot open device {device:?}")))?;
        let narrow = HalfStorage::of(&client);
        // What the executor holds for its life: exact buffers too.
        let _exact =
            ops::ExactAllocation::start(&client, options.buffers.is_some_and(Buffers::exact));
        let mut uploaded = HashMap::new();
        for &id in &plan.order {
            let node = graph.node(id);
            if let caramba_ir::Op::Param { name } = &node.op {
                let t = params
                    .get(name)
                    .ok_or_else(|| GpuError::MissingParam { name: name.clone() })?;
                let mut syms = SymValues::default();
                check_binding("parameter", name, node, t, &mut syms)?;
                let elem = narrow.elem(node.ty.dtype);
                uploaded.insert(id, upload_as(&client, t, node.ty.dtype, elem, &at(node))?);
            }
        }
        let vendor = match options.gemm {
            GemmLibrary::Vendor => VendorGemm::for_device::<R>(device),
            GemmLibrary::Cubek => None,
        };
        Ok(Self::from_plan(
            client, graph, plan, uploaded, options, vendor, narrow,
        ))
    }

    /// An executor of `graph` on this executor's device (its client,
    /// options and vendor GEMM) whose parameters are buffers already on the
    /// device (by name), not copies: a graph that shares its weights with
    /// another (evaluation beside training, decoding beside prefill) reads
    /// the same buffers, and sees them change when they are updated in
    /// place.
    pub fn sharing(
        &self,
        graph: &Graph,
        params: &BTreeMap<String, DeviceTensor>,
    ) -> Result<Self, GpuError> {
        let plan = Plan::new(graph)?;
        let mut bound = HashMap::new();
        for &id in &plan.order {
            let node = graph.node(id);
            if let caramba_ir::Op::Param { name } = &node.op {
                let t = params
                    .get(name)
                    .ok_or_else(|| GpuError::MissingParam { name: name.clone() })?;
                let mut syms = SymValues::default();
                check_device_binding("parameter", name, node, t, &mut syms)?;
                self.check_storage(name, node, t)?;
                bound.insert(id, t.0.clone());
            }
        }
        let options = GpuOptions {
            param_copies: false,
            ..self.options
        };
        let _exact = ops::ExactAllocation::start(&self.client, self.exact_buffers());
        let mut exec = Self::from_plan(
            self.client.clone(),
            graph,
            plan,
            bound,
            options,
            self.vendor.clone(),
            self.narrow,
        );
        // Their runs never overlap: one set of arenas serves both.
        if let Some(p) = &self.recycled.planner {
            let shared = p.lock().expect("buffer planner").sharing();
            exec.recycled.planner = Some(std::sync::Mutex::new(shared));
        }
        Ok(exec)
    }

    /// A device value bound to `node` must be stored as this device stores
    /// the node's dtype (a value from another executor of the device is).
    fn check_storage(&self, name: &str, node: &Node, t: &DeviceTensor) -> Result<(), GpuError> {
        let want = self.narrow.elem(node.ty.dtype);
        if t.elem() != want && node.ty.dtype.is_float() {
            return Err(GpuError::Mismatch {
                what: "device value",
                name: name.to_string(),
                expected: format!("{want:?} storage"),
                found: format!("{:?} storage", t.elem()),
            });
        }
        Ok(())
    }

    /// How this executor's device stores float tensors of `dtype`.
    pub fn storage_of(&self, dtype: DType) -> FloatElem {
        self.narrow.elem(dtype)
    }

    /// An executor of `graph` on this executor's device that reads this
    /// executor's parameter buffers (see [`GpuExecutor::sharing`]).
    pub fn sharing_params(&self, graph: &Graph) -> Result<Self, GpuError> {
        self.sharing(graph, &self.params())
    }

    /// The vendor GEMM library this executor's matmuls use, if any
    /// (cuBLASLt on CUDA when it loads and [`GpuOptions::gemm`] allows).
    pub fn vendor_gemm(&self) -> Option<&'static str> {
        self.vendor.as_ref().map(|v| v.name())
    }

    fn from_plan(
        client: ComputeClient<R>,
        graph: &Graph,
        plan: Plan,
        params: HashMap<NodeId, DevTensor>,
        options: GpuOptions,
        vendor: Option<Arc<VendorGemm>>,
        narrow: HalfStorage,
    ) -> Self {
        // Each distinct set of inverse frequencies is uploaded once; the
        // rotations over one positions operand with the same frequencies
        // and direction share a key, hence one angle table per run
        // (`CARAMBA_NO_ROPE_TABLES=1`: a table per launch, for A/B runs).
        let shared_tables = !env_off("CARAMBA_NO_ROPE_TABLES");
        let (mut rope_freqs, mut rope_keys) = (HashMap::new(), HashMap::new());
        let mut distinct: Vec<(Vec<u32>, Handle)> = Vec::new();
        let mut rope_slots = HashMap::new();
        for &id in &plan.order {
            // A rotation's spec, positions and head dim: rope's, or those of
            // RoPE in a product's epilogue, whose slots (see
            // `gemv::rope_slots`) are uploaded once too.
            let node = graph.node(id);
            let rotation = match &node.op {
                caramba_ir::Op::Rope(spec) => {
                    let (x, pos) = (graph.operands(id)[0], graph.operands(id)[1]);
                    let d = graph.node(x).ty.shape.last().and_then(|d| d.as_const());
                    Some((*spec, pos, d))
                }
                caramba_ir::Op::MatMulRope {
                    rope,
                    head_dim,
                    ranges,
                    ..
                } => {
                    let n = node.ty.shape.last().and_then(|d| d.as_const());
                    if let Some(slots) =
                        n.and_then(|n| caramba_kernels::gemv::rope_slots(n, *head_dim, ranges))
                    {
                        rope_slots.insert(id, client.create_from_slice(i32::as_bytes(&slots)));
                    }
                    let pos = *graph.operands(id).last().expect("typed: positions");
                    Some((*rope, pos, Some(*head_dim)))
                }
                _ => None,
            };
            if let Some((spec, pos, Some(d))) = rotation {
                let inv: Vec<f32> = spec.inv_freq(d).into_iter().map(|f| f as f32).collect();
                let bits: Vec<u32> = inv.iter().map(|f| f.to_bits()).collect();
                let k = match distinct.iter().position(|(b, _)| *b == bits) {
                    Some(k) => k,
                    None => {
                        let h = client.create_from_slice(f32::as_bytes(&inv));
                        distinct.push((bits, h));
                        distinct.len() - 1
                    }
                };
                rope_freqs.insert(id, distinct[k].1.clone());
                if shared_tables {
                    rope_keys.insert(id, (pos, k, spec.inverse));
                }
            }
        }
        let (copies, copies_by_name) = if options.param_copies {
            param_copies(&client, graph, &plan.order, &params, narrow)
        } else {
            Default::default()
        };
        let split_lse = split_lse(graph, &plan.order, narrow);
        let permuted = permuted_outputs(graph, &plan.order, &split_lse);
        let grad_pairs = grad_pairs(graph, &plan.order);
        let folded_adds = folded_adds(graph, &plan.order, &plan.slots, &plan.batch_summed, narrow);
        let reduced_slices = reduced_slices(graph, &plan.order);
        let in_place = in_place(graph, &plan.order);
        GpuExecutor {
            rope_freqs,
            rope_keys,
            rope_slots,
            rope_tables: ops::RopeTables::default(),
            copies,
            copies_by_name,
            recycled: ops::Recycled {
                exact_from: options
                    .buffers
                    .is_some_and(Buffers::exact)
                    .then(|| options.exact_min_bytes.unwrap_or(ops::EXACT_MIN_BYTES)),
                planner: (options.buffers == Some(Buffers::Planned))
                    .then(|| std::sync::Mutex::new(liveness::Planner::new(&client))),
                ..Default::default()
            },
            client,
            graph: graph.clone(),
            order: plan.order,
            operands: plan.operands,
            uses: plan.uses,
            params,
            lazy_transposes: plan.lazy_transposes,
            lazy_views: plan.lazy_views,
            batch_summed: plan.batch_summed,
            transposed_sums: plan.transposed_sums,
            slots: plan.slots,
            appends: plan.appends,
            appended: Default::default(),
            split_lse,
            permuted,
            grad_pairs,
            loss_grads: plan.loss_grads,
            folded_adds,
            in_place,
            reduced_slices,
            options,
            vendor,
            profile: Default::default(),
            peak_in_use: Default::default(),
            peak_in_values: Default::default(),
            narrow,
        }
    }

    /// The half-precision copies of parameters this executor reads instead
    /// of casting them ([`GpuOptions::param_copies`]), by parameter name:
    /// whoever updates a parameter in place must write its copy too.
    pub fn param_copies(&self) -> &BTreeMap<String, DeviceTensor> {
        &self.copies_by_name
    }

    /// The profile so far (with [`GpuOptions::profile`]): per op kind, the
    /// launches and the time spent, slowest first.
    pub fn profile(&self) -> Vec<OpProfile> {
        let table = self.profile.lock().expect("profile lock");
        let mut rows: Vec<OpProfile> = table.values().cloned().collect();
        rows.sort_by(|a, b| b.secs.total_cmp(&a.secs));
        rows
    }

    /// The bytes the device's memory pools hold now (CubeCL's
    /// `bytes_reserved`; pools keep their pages, so a high-water mark).
    pub fn reserved_bytes(&self) -> Option<u64> {
        self.client.memory_usage().ok().map(|u| u.bytes_reserved)
    }

    /// With [`GpuOptions::profile`]: the most bytes of live buffers
    /// (CubeCL's `bytes_in_use`, each buffer rounded up to its pool's
    /// alignment) seen after any profiled op, so the peak of what the
    /// plan keeps alive, apart from the pools' reserved pages. Sampled
    /// between ops: scratch buffers that live only inside one op's launch
    /// are not in it. `None` before a profiled run.
    pub fn peak_bytes_in_use(&self) -> Option<u64> {
        sampled(&self.peak_in_use)
    }

    /// As [`GpuExecutor::peak_bytes_in_use`], less the dead values'
    /// buffers held for reuse at each sample (`ops::Recycled`): the peak
    /// of what the values alive between two ops hold.
    pub fn peak_bytes_in_values(&self) -> Option<u64> {
        sampled(&self.peak_in_values)
    }

    fn wait(&self) -> Result<(), GpuError> {
        caramba_kernels::cubecl::future::block_on(self.client.sync())
            .map_err(|e| GpuError::Device(format!("{e:?}")))
    }

    /// The compute client, for callers that launch their own kernels.
    pub fn client(&self) -> &ComputeClient<R> {
        &self.client
    }

    /// The parameter `name` as the executor reads it: the same buffer, so
    /// a kernel that writes into it changes the weights of the next run.
    /// `None` for a parameter the graph does not declare or never reads.
    pub fn param(&self, name: &str) -> Option<DeviceTensor> {
        let id = self.graph.param_id(name)?;
        self.params.get(&id).map(|t| DeviceTensor(t.clone()))
    }

    /// Every parameter the executor reads, by name (see [`GpuExecutor::param`]).
    pub fn params(&self) -> BTreeMap<String, DeviceTensor> {
        self.graph
            .params()
            .filter_map(|(name, id)| {
                let t = self.params.get(&id)?;
                Some((name.to_string(), DeviceTensor(t.clone())))
            })
            .collect()
    }

    /// Copies a host tensor to the device (in its own dtype's storage).
    pub fn upload(&self, t: &Tensor) -> Result<DeviceTensor, GpuError> {
        let elem = self.narrow.elem(t.dtype());
        let _exact = ops::ExactAllocation::start(&self.client, self.exact_buffers());
        upload_as(&self.client, t, t.dtype(), elem, "upload").map(DeviceTensor)
    }

    /// Whether this executor allocates exact buffers ([`Buffers::Exact`]
    /// or [`Buffers::Planned`]).
    pub fn exact_buffers(&self) -> bool {
        self.recycled.exact_from.is_some()
    }

    /// What the buffer plan did so far ([`Buffers::Planned`]); `None` for
    /// other buffers.
    pub fn buffer_plan(&self) -> Option<liveness::PlanReport> {
        let p = self.recycled.planner.as_ref()?;
        Some(p.lock().expect("buffer planner").report.clone())
    }

    /// How many launches a run writes over their first operand, which dies
    /// there (cross-entropy gradients over their logits, see
    /// [`in_place`]).
    pub fn in_place_ops(&self) -> usize {
        self.in_place.len()
    }

    /// How many `linear_cross_entropy` launches compute their gradients
    /// too (see [`loss_grads`]).
    pub fn losses_with_grads(&self) -> usize {
        self.loss_grads.len()
    }

    /// Reads a device tensor back (waits for the work that writes it).
    pub fn download(&self, t: &DeviceTensor) -> Result<Tensor, GpuError> {
        download(&self.client, &t.0)
    }

    /// Runs the graph with the reference interpreter's bindings (their
    /// parameters are ignored: the executor's were uploaded at build time).
    pub fn run_bindings(&self, b: &Bindings) -> Result<BTreeMap<String, Tensor>, GpuError> {
        self.run(&b.inputs, b.syms)
    }

    /// Bytes of device memory the executor keeps for reuse: buffers of
    /// values no run needs any more, held for the next values of their
    /// size until a whole run has passed without taking them.
    pub fn recycled_bytes(&self) -> u64 {
        self.recycled.held_bytes()
    }

    /// Gives a value back for reuse (see `ops::Recycled`): its buffer
    /// serves a later value of the same size, unless something else still
    /// refers to it.
    pub(crate) fn recycle(&self, t: DeviceTensor) {
        self.recycled.give(t.0);
    }

    /// Evaluates the graph's outputs for one call's inputs. Unset symbols
    /// are inferred from the first input whose declared shape uses them.
    pub fn run(
        &self,
        inputs: &BTreeMap<String, Tensor>,
        syms: SymValues,
    ) -> Result<BTreeMap<String, Tensor>, GpuError> {
        let outputs = self.run_resident(inputs, &BTreeMap::new(), syms)?;
        outputs
            .into_iter()
            .map(|(name, t)| Ok((name, download(&self.client, &t.0)?)))
            .collect()
    }

    /// Evaluates the graph's outputs and leaves them on the device. Each
    /// input is bound either on the host (`host_inputs`, uploaded for this
    /// call) or on the device (`device_inputs`, read in place: a value fed
    /// back from an earlier call costs no transfer); both are checked
    /// against the input's declared type. The launches are queued, not
    /// awaited: reading an output back ([`GpuExecutor::download`]) waits.
    pub fn run_resident(
        &self,
        host_inputs: &BTreeMap<String, Tensor>,
        device_inputs: &BTreeMap<String, DeviceTensor>,
        syms: SymValues,
    ) -> Result<BTreeMap<String, DeviceTensor>, GpuError> {
        // Clones: the caller keeps its values, so nothing is appended in
        // place (see `append`).
        let device_inputs = device_inputs.clone();
        on_device_thread(&self.client, || {
            self.queue_run(host_inputs, device_inputs, syms, 0)
        })
    }

    /// [`GpuExecutor::run_resident`] with the device inputs moved in: a
    /// cache the graph extends (output `present.* = concat(past.*, new
    /// rows)`) is appended in place, only its new rows written, when
    /// nothing else holds the `past` value's buffer and the buffer has room
    /// (see `append`). Where a cache is allocated, its buffer has room for
    /// `reserve_rows` rows (the prompt and the tokens to come), or for half
    /// as many again as it needs when that is fewer. A clone of `past` kept
    /// elsewhere makes its append a copy, so the clone never changes.
    pub fn run_appending(
        &self,
        host_inputs: &BTreeMap<String, Tensor>,
        device_inputs: BTreeMap<String, DeviceTensor>,
        syms: SymValues,
        reserve_rows: usize,
    ) -> Result<BTreeMap<String, DeviceTensor>, GpuError> {
        on_device_thread(&self.client, || {
            self.queue_run(host_inputs, device_inputs, syms, reserve_rows)
        })
    }

    /// How many caches runs have appended to in place so far (see
    /// [`GpuExecutor::run_appending`]).
    pub fn appends_in_place(&self) -> usize {
        self.appended.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Operand `k`'s slot in concatenation `c`'s buffer (allocated on the
    /// first call for `c`), for a value of `shape`.
    fn slot(
        &self,
        c: NodeId,
        k: usize,
        shape: &[usize],
        run: &RunState,
        bufs: &mut HashMap<NodeId, (DevTensor, bool)>,
    ) -> Result<DevTensor, GpuError> {
        let cnode = self.graph.node(c);
        let caramba_ir::Op::Concat { axis } = cnode.op else {
            unreachable!("slots are in concatenations")
        };
        let (buf, _) = match bufs.entry(c) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.concat_buffer(c, run)?),
        };
        let syms = run.syms;
        let strides = caramba_kernels::contiguous_strides(&buf.shape);
        let mut before = 0;
        for &o in &self.operands[&c][..k] {
            let n = self.graph.node(o);
            before += concrete(&n.ty.shape, syms, n)?[axis];
        }
        Ok(DevTensor {
            shape: shape.to_vec(),
            layout: Some((strides.clone(), before * strides[axis])),
            ..buf.clone()
        })
    }

    /// Concatenation `c`'s buffer: `(buffer, true)` when it is the buffer
    /// of the cache it appends to, that cache's rows already in it (see
    /// `append`).
    fn concat_buffer(&self, c: NodeId, run: &RunState) -> Result<(DevTensor, bool), GpuError> {
        let cnode = self.graph.node(c);
        let caramba_ir::Op::Concat { axis } = cnode.op else {
            unreachable!("a concatenation")
        };
        let full = concrete(&cnode.ty.shape, run.syms, cnode)?;
        let (dtype, elem) = (cnode.ty.dtype, self.narrow.elem(cnode.ty.dtype));
        let appended = self
            .appends
            .get(&c)
            .and_then(|past| run.values.get(past))
            .and_then(|past| {
                append::buffer(
                    &self.client,
                    &self.recycled,
                    past,
                    &full,
                    axis,
                    dtype,
                    elem,
                    run.reserve_rows,
                )
            });
        if let Some((buf, in_place)) = appended {
            if in_place {
                self.appended
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            return Ok((buf, in_place));
        }
        let bytes = full.iter().product::<usize>().max(1) * elem.size();
        let handle = ops::Recycled::or_empty(Some(&self.recycled), &self.client, bytes);
        Ok((DevTensor::dense(handle, full, dtype, elem), false))
    }

    /// A fresh buffer for node `id`'s value, stored as the device stores
    /// its dtype: dense, or laid out in the order `perm` gives it (so that
    /// `permute(perm)` of it is dense; the value is then a strided view of
    /// the buffer).
    fn node_buffer(
        &self,
        id: NodeId,
        syms: &SymValues,
        perm: Option<&[usize]>,
    ) -> Result<DevTensor, GpuError> {
        let node = self.graph.node(id);
        let shape = concrete(&node.ty.shape, syms, node)?;
        let elem = self.narrow.elem(node.ty.dtype);
        let bytes = shape.iter().product::<usize>().max(1) * elem.size();
        let handle = ops::Recycled::or_empty(Some(&self.recycled), &self.client, bytes);
        let layout = perm.map(|perm| {
            let physical: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
            let dense = caramba_kernels::contiguous_strides(&physical);
            let mut strides = vec![0; shape.len()];
            for (i, &p) in perm.iter().enumerate() {
                strides[p] = dense[i];
            }
            (strides, 0)
        });
        Ok(DevTensor {
            layout,
            ..DevTensor::dense(handle, shape, node.ty.dtype, elem)
        })
    }

    /// `node`'s reduction over the whole of `x` (see `ReducedSlices`),
    /// profiled as its own row when profiling.
    fn reduce_whole(
        &self,
        node: &Node,
        x: &DevTensor,
        shape: Vec<usize>,
    ) -> Result<DevTensor, GpuError> {
        let ctx = ops::Ctx {
            client: &self.client,
            node,
            fast_matmul: self.options.fast_matmul,
            vendor: None,
            rope_freqs: None,
            rope_table: None,
            rope_slots: None,
            narrow: self.narrow,
            sum_batch: false,
            transposed_sum: false,
            recycled: Some(&self.recycled),
            dest: None,
            placed: &[],
            second: None,
            in_place: false,
            loss_block_rows: self.options.loss_block_rows,
            head_grads: None,
        };
        if !self.options.profile {
            return ctx.apply(&[x], shape);
        }
        self.wait()?;
        let start = std::time::Instant::now();
        let out = ctx.apply(&[x], shape)?;
        let host = start.elapsed().as_secs_f64();
        self.wait()?;
        let op = format!("{} (whole, then sliced)", node.op.mnemonic());
        self.record(op, start, host);
        Ok(out)
    }

    /// One launch of `op` in the profile: `start` when the device was
    /// idle before it, `host` the seconds of the launch call.
    fn record(&self, op: String, start: std::time::Instant, host: f64) {
        let mut table = self.profile.lock().expect("profile lock");
        let e = table.entry(op.clone()).or_insert_with(|| OpProfile {
            op,
            ..OpProfile::default()
        });
        e.launches += 1;
        e.secs += start.elapsed().as_secs_f64();
        e.host_secs += host;
        if let Ok(usage) = self.client.memory_usage() {
            self.peak_in_use
                .fetch_max(usage.bytes_in_use, std::sync::atomic::Ordering::Relaxed);
            let values = usage
                .bytes_in_use
                .saturating_sub(self.recycled.held_bytes());
            self.peak_in_values
                .fetch_max(values, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// [`GpuExecutor::run_resident`] on the calling thread.
    fn queue_run(
        &self,
        host_inputs: &BTreeMap<String, Tensor>,
        mut device_inputs: BTreeMap<String, DeviceTensor>,
        syms: SymValues,
        reserve_rows: usize,
    ) -> Result<BTreeMap<String, DeviceTensor>, GpuError> {
        let mut syms = syms;
        let mut uses = self.uses.clone();
        // What makes runs ask for the same buffers: the inputs' shapes,
        // where they are, and the symbols given (see `liveness`).
        let key = if self.recycled.planner.is_some() {
            let host = host_inputs
                .iter()
                .map(|(n, t)| format!("{n}:host{:?}", t.shape()));
            let dev = device_inputs
                .iter()
                .map(|(n, t)| format!("{n}:device{:?}", t.shape()));
            format!("{syms:?} {}", host.chain(dev).collect::<Vec<_>>().join(" "))
        } else {
            String::new()
        };
        self.recycled.next_run(key, &self.client);
        self.rope_tables.clear();
        let mut values: HashMap<NodeId, DevTensor> = HashMap::new();
        // Concatenations' buffers, from their first slot's op on, and the
        // values computed into them (see `Plan::slots`).
        // (`true`: a cache's buffer, its rows in place, see `append`.)
        let mut slot_bufs: HashMap<NodeId, (DevTensor, bool)> = HashMap::new();
        let mut in_slot: HashSet<NodeId> = HashSet::new();
        // Values an earlier launch computed (the parts of an
        // `attention_with_lse` taken apart, see `SplitLse`).
        let mut computed: HashMap<NodeId, DevTensor> = HashMap::new();
        // Whole reductions of sliced tensors (see `reduced_slices`), with
        // the readers each still has this run.
        let mut reductions: HashMap<(NodeId, NodeId), (DevTensor, usize)> = HashMap::new();
        for &id in &self.order {
            let node = self.graph.node(id);
            let operands = &self.operands[&id];
            let value = match &node.op {
                _ if computed.contains_key(&id) => computed.remove(&id).expect("computed"),
                caramba_ir::Op::Input { name } => {
                    // Taken out: the value is the run's only holder of a
                    // buffer moved in (see `append`).
                    match (host_inputs.get(name), device_inputs.remove(name)) {
                        (Some(_), Some(_)) => {
                            return Err(GpuError::BoundTwice { name: name.clone() })
                        }
                        (Some(t), None) => {
                            check_binding("input", name, node, t, &mut syms)?;
                            let elem = self.narrow.elem(node.ty.dtype);
                            upload_as(&self.client, t, node.ty.dtype, elem, &at(node))?
                        }
                        (None, Some(t)) => {
                            check_device_binding("input", name, node, &t, &mut syms)?;
                            self.check_storage(name, node, &t)?;
                            t.0
                        }
                        (None, None) => return Err(GpuError::MissingInput { name: name.clone() }),
                    }
                }
                caramba_ir::Op::Param { .. } => self.params[&id].clone(),
                // Its first operand as it is (the anchor only orders it).
                caramba_ir::Op::After => values[&operands[0]].clone(),
                // Read only by a reduction that reduces the whole tensor
                // (below): no copy, its value stands for the tensor.
                caramba_ir::Op::Slice { .. } if self.reduced_slices.sliced.contains(&id) => {
                    values[&operands[0]].clone()
                }
                caramba_ir::Op::Reduce { .. } if self.reduced_slices.group.contains_key(&id) => {
                    let (x, slice) = (&values[&operands[0]], &self.graph.node(operands[0]).op);
                    let group = self.reduced_slices.group[&id];
                    let whole = match reductions.get_mut(&group) {
                        Some((t, left)) => {
                            *left -= 1;
                            t.clone()
                        }
                        None => {
                            let mut shape = x.shape.clone();
                            let caramba_ir::Op::Reduce { axis, .. } = node.op else {
                                unreachable!("a reduction")
                            };
                            shape[axis] = 1;
                            let x = ops::materialized_in(&self.client, x, &self.recycled);
                            let t = self.reduce_whole(node, &x, shape)?;
                            let left = self.reduced_slices.readers[&group] - 1;
                            reductions.insert(group, (t.clone(), left));
                            t
                        }
                    };
                    if reductions.get(&group).is_some_and(|(_, left)| *left == 0) {
                        reductions.remove(&group);
                    }
                    ops::lazy_view(slice, &whole)
                }
                // A parameter's half-precision copy, kept up to date by the
                // trainer's optimizer (`GpuOptions::param_copies`).
                caramba_ir::Op::Cast(_) if self.copies.contains_key(&id) => {
                    self.copies[&id].clone()
                }
                caramba_ir::Op::Permute(_) | caramba_ir::Op::Slice { .. }
                    if self.lazy_views.contains(&id) =>
                {
                    // Read in place by the ops it feeds (see `Plan::new`).
                    ops::lazy_view(&node.op, &values[&operands[0]])
                }
                caramba_ir::Op::Permute(perm) if self.lazy_transposes.contains(&id) => {
                    // Read through strides by the matmuls it feeds.
                    let x = &ops::materialized(&self.client, &values[&operands[0]]);
                    let mut shape = x.shape.clone();
                    let r = shape.len();
                    debug_assert!(ops::swaps_last_two(perm));
                    shape.swap(r - 2, r - 1);
                    DevTensor {
                        transposed: !x.transposed,
                        shape,
                        ..x.clone()
                    }
                }
                _ => {
                    let shape = concrete(&node.ty.shape, &syms, node)?;
                    // A lazy view reaches only ops that read views, but a
                    // relabel (a cast to the same storage) passes one on:
                    // anything else gets it copied dense first.
                    let dense: Vec<std::borrow::Cow<DevTensor>> = operands
                        .iter()
                        .map(|o| {
                            let v = &values[o];
                            if !ops::reads_in_place(&node.op, v) {
                                std::borrow::Cow::Owned(ops::materialized_in(
                                    &self.client,
                                    v,
                                    &self.recycled,
                                ))
                            } else {
                                std::borrow::Cow::Borrowed(v)
                            }
                        })
                        .collect();
                    let args: Vec<&DevTensor> = dense.iter().map(|v| v.as_ref()).collect();
                    let run = RunState {
                        syms: &syms,
                        values: &values,
                        reserve_rows,
                    };
                    let dest = match self.slots.get(&id) {
                        // A device that keeps this dtype widened rounds
                        // into a new buffer: no slot then.
                        Some(&(c, k)) if !self.narrow.widens(node.ty.dtype) => {
                            let slot = self.slot(c, k, &shape, &run, &mut slot_bufs)?;
                            in_slot.insert(id);
                            Some(slot)
                        }
                        _ => None,
                    };
                    let concat_buf = match (&node.op, slot_bufs.remove(&id)) {
                        (caramba_ir::Op::Concat { .. }, Some(buf)) => Some(buf),
                        (caramba_ir::Op::Concat { .. }, None) if self.appends.contains_key(&id) => {
                            Some(self.concat_buffer(id, &run)?)
                        }
                        _ => None,
                    };
                    let (concat_buf, appended) = match concat_buf {
                        Some((buf, appended)) => (Some(buf), appended),
                        None => (None, false),
                    };
                    // Attention's output in its reader's order, the two
                    // parts of one taken apart, and the sibling of an
                    // attention gradient computed with it.
                    let (out_buf, second) = match self.split_lse.get(&id) {
                        Some(split) => {
                            let perm = self.permuted.get(&split.values).map(Vec::as_slice);
                            let values = self.node_buffer(split.values, &syms, perm)?;
                            let stats = self.node_buffer(split.lse, &syms, None)?;
                            if let Some(slice) = split.slice {
                                // Read only by the cast that `values` is.
                                computed.insert(slice, values.clone());
                            }
                            computed.insert(split.values, values.clone());
                            computed.insert(split.lse, stats.clone());
                            (Some(values), Some(stats))
                        }
                        None => match (self.permuted.get(&id), self.grad_pairs.get(&id)) {
                            (Some(perm), _) => {
                                (Some(self.node_buffer(id, &syms, Some(perm))?), None)
                            }
                            (None, Some(&sibling)) => {
                                let buf = self.node_buffer(sibling, &syms, None)?;
                                computed.insert(sibling, buf.clone());
                                (None, Some(buf))
                            }
                            (None, None) => match self.folded_adds.get(&id) {
                                // The add's other operand, added by this
                                // kernel (dense: it reads it as its output).
                                Some(&(_, r)) => {
                                    let r = ops::materialized_in(
                                        &self.client,
                                        &values[&r],
                                        &self.recycled,
                                    );
                                    (None, Some(r))
                                }
                                None => (None, None),
                            },
                        },
                    };
                    // A loss's gradients, computed by its launch: their
                    // buffers, and their adjoint (computed before it).
                    let head = match self.loss_grads.get(&id) {
                        Some(lg) => {
                            let mut buf = |n: Option<NodeId>| -> Result<_, GpuError> {
                                let Some(n) = n else { return Ok(None) };
                                let b = self.node_buffer(n, &syms, None)?;
                                computed.insert(n, b.clone());
                                Ok(Some(b))
                            };
                            let (dx, dw) = (buf(lg.dx)?, buf(lg.dw)?);
                            let g = &values[&lg.g];
                            let g = if g.layout.is_none() {
                                std::borrow::Cow::Borrowed(g)
                            } else {
                                std::borrow::Cow::Owned(ops::materialized_in(
                                    &self.client,
                                    g,
                                    &self.recycled,
                                ))
                            };
                            Some((g, dx, dw))
                        }
                        None => None,
                    };
                    let placed: Vec<bool> = if concat_buf.is_some() {
                        operands
                            .iter()
                            .enumerate()
                            .map(|(i, o)| in_slot.contains(o) || (i == 0 && appended))
                            .collect()
                    } else {
                        Vec::new()
                    };
                    let ctx = ops::Ctx {
                        client: &self.client,
                        node,
                        fast_matmul: self.options.fast_matmul,
                        vendor: self.vendor.as_deref(),
                        rope_freqs: self.rope_freqs.get(&id),
                        rope_table: self.rope_keys.get(&id).map(|&k| (&self.rope_tables, k)),
                        rope_slots: self.rope_slots.get(&id),
                        narrow: self.narrow,
                        sum_batch: self.batch_summed.contains(&id),
                        transposed_sum: self.transposed_sums.contains(&id),
                        recycled: Some(&self.recycled),
                        dest: dest.as_ref().or(concat_buf.as_ref()).or(out_buf.as_ref()),
                        placed: &placed,
                        second: second.as_ref(),
                        in_place: self.in_place.contains(&id),
                        loss_block_rows: self.options.loss_block_rows,
                        head_grads: head.as_ref().map(|(g, dx, dw)| ops::HeadGrads {
                            g: g.as_ref(),
                            dx: dx.as_ref(),
                            dw: dw.as_ref(),
                        }),
                    };
                    debug_assert!(
                        !ctx.in_place || uses[&operands[0]] == 1,
                        "written over an operand that is read later"
                    );
                    let out = if self.options.profile {
                        self.wait()?;
                        let start = std::time::Instant::now();
                        let batch = shape.first().copied();
                        let out = ctx.apply(&args, shape)?;
                        let host = start.elapsed().as_secs_f64();
                        self.wait()?;
                        // A batch-summed matmul returns its `[1, K, N]` sum,
                        // and the reduction after it is then a relabel: both
                        // get their own rows, so launches count kernels.
                        let op = match &node.op {
                            caramba_ir::Op::MatMul => format!(
                                "matmul{} {}",
                                if out.shape.first() == Some(&1) && batch != Some(1) {
                                    " (batch summed)"
                                } else {
                                    ""
                                },
                                args.iter()
                                    .map(|a| format!("{:?}", a.shape))
                                    .collect::<Vec<_>>()
                                    .join("×")
                            ),
                            caramba_ir::Op::Reduce { axis, .. } if args[0].shape[*axis] == 1 => {
                                format!("{} (size-1 axis, relabel)", node.op.mnemonic())
                            }
                            // Casts move weights, gradients, activations:
                            // which is which shows in the types and layout.
                            caramba_ir::Op::Cast(to) => format!(
                                "cast {}→{to} {:?}{}",
                                self.graph.node(operands[0]).ty.dtype,
                                args[0].shape,
                                if args[0].transposed {
                                    " (transposed)"
                                } else if args[0].is_dense() {
                                    ""
                                } else {
                                    " (view)"
                                }
                            ),
                            caramba_ir::Op::LinearCrossEntropy
                                if self.loss_grads.contains_key(&id) =>
                            {
                                "linear_cross_entropy + its gradients".to_string()
                            }
                            // dx and dw from one pass over the logits.
                            caramba_ir::Op::LinearCrossEntropyGrad { wrt } => format!(
                                "linear_cross_entropy_grad {{wrt={wrt}}}{}",
                                if self.grad_pairs.contains_key(&id) {
                                    " + its sibling"
                                } else {
                                    ""
                                }
                            ),
                            // dq and dk‖dv apart, or both from one launch.
                            caramba_ir::Op::AttentionGrad { wrt, .. } => format!(
                                "attention_grad {{wrt={wrt}}}{}",
                                if self.grad_pairs.contains_key(&id) {
                                    " + its sibling"
                                } else {
                                    ""
                                }
                            ),
                            op => op.mnemonic().to_string(),
                        };
                        self.record(op, start, host);
                        out
                    } else {
                        ctx.apply(&args, shape)?
                    };
                    if let Some(&(add, _)) = self.folded_adds.get(&id) {
                        computed.insert(add, out.clone());
                    }
                    // The dense copies made for this op serve later values.
                    drop(args);
                    if let Some((std::borrow::Cow::Owned(g), _, _)) = head {
                        self.recycled.give(g);
                    }
                    for d in dense {
                        if let std::borrow::Cow::Owned(t) = d {
                            self.recycled.give(t);
                        }
                    }
                    out
                }
            };
            values.insert(id, value);
            for o in operands {
                let left = uses.get_mut(o).expect("operand counted");
                *left -= 1;
                if *left == 0 {
                    if let Some(v) = values.remove(o) {
                        // A slot's buffer is its concatenation's.
                        if !in_slot.remove(o) {
                            self.recycled.give(v);
                        }
                    }
                }
            }
        }
        self.client
            .flush()
            .map_err(|e| GpuError::Device(format!("{e:?}")))?;
        let outputs = self
            .graph
            .outputs()
            .iter()
            .map(|(name, id)| {
                // Lazy transposes and views are never outputs (see
                // `Plan::new`), but a relabel of a view can be.
                let v = ops::materialized(&self.client, &values[id]);
                debug_assert!(
                    !v.transposed,
                    "output {name} is an unmaterialized transpose"
                );
                (name.clone(), DeviceTensor(v))
            })
            .collect();
        // What the run no longer needs is dead now; outputs are not.
        drop((values, computed, slot_bufs, reductions));
        self.recycled.end_run();
        Ok(outputs)
    }
}

/// A peak sampled by profiled runs: `None` before any sample.
fn sampled(peak: &std::sync::atomic::AtomicU64) -> Option<u64> {
    std::num::NonZeroU64::new(peak.load(std::sync::atomic::Ordering::Relaxed))
        .map(std::num::NonZeroU64::get)
}

/// For [`GpuOptions::param_copies`]: each live `cast` of a dense f32
/// parameter to f16 or bf16 that the device stores narrow, bound to one
/// copy per parameter made now (a second cast of the same parameter to the
/// same dtype shares it; to another dtype, it stays a cast). Devices that
/// keep the dtype widened in f32 buffers get no copies: the optimizer
/// writes storage types, not rounded grids.
fn param_copies<R: Runtime>(
    client: &ComputeClient<R>,
    graph: &Graph,
    order: &[NodeId],
    params: &HashMap<NodeId, DevTensor>,
    narrow: HalfStorage,
) -> (HashMap<NodeId, DevTensor>, BTreeMap<String, DeviceTensor>) {
    let mut copies = HashMap::new();
    let mut by_name: BTreeMap<String, DeviceTensor> = BTreeMap::new();
    for &id in order {
        let caramba_ir::Op::Cast(to) = graph.node(id).op else {
            continue;
        };
        let src = graph.operands(id)[0];
        let (caramba_ir::Op::Param { name }, Some(p)) = (&graph.node(src).op, params.get(&src))
        else {
            continue;
        };
        if !matches!(to, DType::F16 | DType::BF16)
            || narrow.widens(to)
            || p.elem != FloatElem::F32
            || p.dtype != DType::F32
            || !p.is_dense()
        {
            continue;
        }
        let copy = match by_name.get(name) {
            Some(c) if c.dtype() == to => c.0.clone(),
            Some(_) => continue,
            None => {
                let elem = narrow.elem(to);
                let n = p.numel();
                let h = client.empty(n.max(1) * elem.size());
                caramba_kernels::cast::launch_convert(
                    client,
                    caramba_kernels::Storage::Float(FloatElem::F32),
                    caramba_kernels::Storage::Float(elem),
                    &p.handle,
                    &h,
                    n,
                );
                let t = DevTensor::dense(h, p.shape.clone(), to, elem);
                by_name.insert(name.clone(), DeviceTensor(t.clone()));
                t
            }
        };
        copies.insert(id, copy);
    }
    (copies, by_name)
}

/// Cross-entropy gradients written over their logits (`Ctx::in_place`):
/// the gradient has the logits' type, and on a language model the two are
/// the largest values of a training step (SmolLM2 at B32 × 2048: 6 GiB
/// each in bf16), alive together at the loss's gradient unless one takes
/// the other's buffer. Those whose logits are a product (`matmul` or
/// `rms_norm_matmul`: a buffer of the run's own, never a view of another
/// value, a parameter, a caller's tensor or a concatenation's slot; a
/// weight gradient's batch-summed product has the sum as its one reader),
/// not an output and read by no op after the gradient (the op's type
/// rule makes the gradient the logits' type, and its other operands are
/// the targets and the loss's adjoint, never the logits again).
/// `CARAMBA_NO_IN_PLACE=1` keeps them apart (for measuring what this
/// saves).
fn in_place(graph: &Graph, order: &[NodeId]) -> HashSet<NodeId> {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *OFF.get_or_init(|| std::env::var("CARAMBA_NO_IN_PLACE").is_ok_and(|v| v == "1")) {
        return HashSet::new();
    }
    let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let outputs: HashSet<NodeId> = graph.outputs().iter().map(|(_, id)| *id).collect();
    order
        .iter()
        .copied()
        .filter(|&u| {
            if !matches!(graph.node(u).op, caramba_ir::Op::CrossEntropyGrad) {
                return false;
            }
            let l = graph.operands(u)[0];
            matches!(
                graph.node(l).op,
                caramba_ir::Op::MatMul | caramba_ir::Op::RmsNormMatMul { .. }
            ) && !outputs.contains(&l)
                && graph
                    .users(l)
                    .iter()
                    .filter_map(|r| pos.get(r))
                    .all(|&p| p <= pos[&u])
        })
        .collect()
}

/// Whether `CARAMBA_NO_LAZY_VIEWS=1` materializes every permute and slice
/// (for measuring what the lazy views save).
fn lazy_disabled() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var("CARAMBA_NO_LAZY_VIEWS").is_ok_and(|v| v == "1"))
}

/// Whether `CARAMBA_NO_TRANSPOSED_SUMS=1` keeps weight gradients in the
/// product's own layout (for measuring what `Plan::transposed_sums` saves).
fn transposed_sums_disabled() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var("CARAMBA_NO_TRANSPOSED_SUMS").is_ok_and(|v| v == "1"))
}

/// Whether node `u` reads a lazy view in place: its op does
/// (`ops::reads_views`), or it is a reshape (which keeps a view where the
/// layout allows, `ops::reshaped_view`, and copies it itself where not)
/// whose every user does, in turn. So a slice of a merged projection
/// reshaped into heads reaches RoPE, and a permute of attention's gradient
/// reshaped back reaches RoPE's inverse, without a copy.
fn reads_views_through_reshapes(graph: &Graph, u: NodeId, outputs: &HashSet<NodeId>) -> bool {
    match graph.node(u).op {
        caramba_ir::Op::Reshape(_) => {
            let users = graph.users(u);
            !outputs.contains(&u)
                && !users.is_empty()
                && users
                    .iter()
                    .all(|&w| reads_views_through_reshapes(graph, w, outputs))
        }
        ref op => ops::reads_views(op),
    }
}

/// Whether `CARAMBA_NO_SLOTS=1` computes every concatenation's operands
/// into buffers of their own and copies them (for measuring what
/// `Plan::slots` saves).
fn slots_disabled() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var("CARAMBA_NO_SLOTS").is_ok_and(|v| v == "1"))
}

/// An `attention_with_lse` (a training graph's forward attention, in
/// `reuse-attention-lse`'s form) whose two readers are the slices that
/// take its rows apart: its values (`0..dv`) and its log-sum-exp
/// (`dv..dv + 1`). The op's layout keeps both in one f32 row, so the
/// values were read back through 65-wide rows and cast to the operands'
/// dtype by a kernel of their own; taken apart, the kernel writes the
/// values as the operands are stored, already rounded as the cast rounds,
/// into the buffer of the cast (`values`, and `slice` is the slice before
/// it, read by nothing else), and the log-sum-exp into a buffer of its own
/// (`lse`, the other slice's value).
#[derive(Clone, Debug)]
struct SplitLse {
    values: NodeId,
    slice: Option<NodeId>,
    lse: NodeId,
}

/// Whether `CARAMBA_NO_SPLIT_LSE=1` keeps `attention_with_lse` in its own
/// layout, and `CARAMBA_NO_PERMUTED_OUT=1` attention's output in its own
/// order (for measuring what `split_lse` and `permuted_outputs` save).
fn env_off(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

/// The `attention_with_lse` nodes of `order` that [`SplitLse`] applies to:
/// read only by a slice of its values, and one of its log-sum-exp, neither
/// an output; the values either the operands' dtype already (f32), or cast
/// to it by the slice's one reader, on a device that stores that dtype as
/// itself (one that widens it rounds in a kernel of its own).
fn split_lse(graph: &Graph, order: &[NodeId], narrow: HalfStorage) -> HashMap<NodeId, SplitLse> {
    let mut out = HashMap::new();
    if env_off("CARAMBA_NO_SPLIT_LSE") {
        return out;
    }
    let outputs: HashSet<NodeId> = graph.outputs().iter().map(|(_, id)| *id).collect();
    for &id in order {
        let node = graph.node(id);
        if !matches!(node.op, caramba_ir::Op::AttentionWithLse { .. }) || outputs.contains(&id) {
            continue;
        }
        let rank = node.ty.shape.rank();
        let Some(width) = node.ty.shape.dims().last().and_then(|d| d.as_const()) else {
            continue;
        };
        let dv = width - 1;
        let q_dtype = graph.node(graph.operands(id)[0]).ty.dtype;
        let users = graph.users(id);
        let slice_of = |u: NodeId, range: (usize, usize)| {
            matches!(graph.node(u).op,
                caramba_ir::Op::Slice { axis, start, end }
                    if axis == rank - 1 && (start, end) == range)
                && !outputs.contains(&u)
        };
        let [a, b] = users[..] else {
            continue;
        };
        let (values, lse) = if slice_of(a, (0, dv)) && slice_of(b, (dv, width)) {
            (a, b)
        } else if slice_of(b, (0, dv)) && slice_of(a, (dv, width)) {
            (b, a)
        } else {
            continue;
        };
        let split = match graph.users(values)[..] {
            [cast]
                if matches!(graph.node(cast).op, caramba_ir::Op::Cast(to) if to == q_dtype)
                    && !narrow.widens(q_dtype)
                    && !outputs.contains(&cast) =>
            {
                SplitLse {
                    values: cast,
                    slice: Some(values),
                    lse,
                }
            }
            _ if q_dtype == graph.node(values).ty.dtype => SplitLse {
                values,
                slice: None,
                lse,
            },
            _ => continue,
        };
        out.insert(id, split);
    }
    out
}

/// Attention outputs (of `attention`, or the values of a split
/// `attention_with_lse`) read by one permute and otherwise only by ops
/// that read views: the kernel writes them in that permute's order, so the
/// permute (attention's heads moved back beside each other before the
/// output projection) is a relabel instead of a copy.
fn permuted_outputs(
    graph: &Graph,
    order: &[NodeId],
    split: &HashMap<NodeId, SplitLse>,
) -> HashMap<NodeId, Vec<usize>> {
    let mut out = HashMap::new();
    if env_off("CARAMBA_NO_PERMUTED_OUT") {
        return out;
    }
    let outputs: HashSet<NodeId> = graph.outputs().iter().map(|(_, id)| *id).collect();
    let values = order.iter().filter_map(|id| match graph.node(*id).op {
        caramba_ir::Op::Attention { .. } => Some(*id),
        caramba_ir::Op::AttentionWithLse { .. } => split.get(id).map(|s| s.values),
        _ => None,
    });
    for v in values {
        if outputs.contains(&v) {
            continue;
        }
        let users = graph.users(v);
        let perms: Vec<&Vec<usize>> = users
            .iter()
            .filter_map(|&u| match &graph.node(u).op {
                caramba_ir::Op::Permute(perm) => Some(perm),
                _ => None,
            })
            .collect();
        let others_read_views = users
            .iter()
            .filter(|&&u| !matches!(graph.node(u).op, caramba_ir::Op::Permute(_)))
            .all(|&u| ops::reads_views(&graph.node(u).op));
        // (A transpose of the last two axes feeding products is read
        // through strides already: `lazy_transposes`.)
        if let [perm] = perms[..] {
            if others_read_views && !ops::swaps_last_two(perm) {
                out.insert(v, perm.clone());
            }
        }
    }
    out
}

/// Attention's `dq` and `dk‖dv` (`attention_grad` with `wrt=q` and
/// `wrt=kv`, as autodiff emits them) over the same operands, computed by
/// one launch with `dq` added from the key-major kernel by atomic adds
/// ([`caramba_kernels::attention_backward::launch_attention_grads`]).
/// Keyed by the first of the two in `order`, valued by the other. Only
/// under `CARAMBA_ATOMIC_DQ=1`: on an H100 the two kernels were faster
/// (NOTES, fifteenth session), and they are bit-reproducible.
///
/// Also, always: the two gradients of one `linear_cross_entropy` (`wrt=x`
/// and `wrt=w` over the same operands), which then recompute the logits
/// once, not twice.
pub(crate) fn grad_pairs(graph: &Graph, order: &[NodeId]) -> HashMap<NodeId, NodeId> {
    use caramba_ir::{AttnArg, NormArg, Op};
    let mut out = HashMap::new();
    let mut heads: HashMap<(Vec<NodeId>, NormArg), NodeId> = HashMap::new();
    for &id in order {
        let Op::LinearCrossEntropyGrad { wrt } = graph.node(id).op else {
            continue;
        };
        let other = match wrt {
            NormArg::X => NormArg::W,
            NormArg::W => NormArg::X,
        };
        match heads.remove(&(graph.operands(id), other)) {
            Some(first) => {
                out.insert(first, id);
            }
            None => {
                heads.insert((graph.operands(id), wrt), id);
            }
        }
    }
    if !std::env::var("CARAMBA_ATOMIC_DQ").is_ok_and(|v| v == "1") {
        return out;
    }
    type Key = (Vec<NodeId>, bool, u64, bool);
    let mut seen: HashMap<Key, NodeId> = HashMap::new();
    for &id in order {
        let Op::AttentionGrad { causal, scale, wrt } = graph.node(id).op else {
            continue;
        };
        if !matches!(wrt, AttnArg::Q | AttnArg::KV) {
            continue;
        }
        let (operands, bits, is_q) = (graph.operands(id), scale.0.to_bits(), wrt == AttnArg::Q);
        let sibling = (operands.clone(), causal, bits, !is_q);
        match seen.remove(&sibling) {
            Some(first) => {
                out.insert(first, id);
            }
            None => {
                seen.insert((operands, causal, bits, is_q), id);
            }
        }
    }
    out
}

/// The gradients of a `linear_cross_entropy` computed by the loss's own
/// launch (see [`loss_grads`]): its adjoint and the two gradients' nodes,
/// where the graph has them.
#[derive(Clone, Copy, Debug)]
struct LossGrads {
    g: NodeId,
    dx: Option<NodeId>,
    dw: Option<NodeId>,
}

/// The `linear_cross_entropy` nodes whose gradients are computed with the
/// loss, from the same blocks of logits: the head's product once a step,
/// not twice (it was 3–5% of a training step).
///
/// That needs the gradients' adjoint before the loss: a training step's is
/// constants only (the mean's `1/N`, broadcast), which nothing orders
/// before the loss. `order` is changed so that the adjoint's producers run
/// just before the loss and the gradients just after it (their values are
/// then at hand, so `dx` and `dw` are not held longer than before). An
/// adjoint that depends on the loss's value leaves both apart.
///
/// `CARAMBA_LOSS_APART=1` leaves them apart, for A/B runs.
fn loss_grads(graph: &Graph, order: &mut Vec<NodeId>) -> HashMap<NodeId, LossGrads> {
    use caramba_ir::{NormArg, Op};
    let mut out = HashMap::new();
    if std::env::var("CARAMBA_LOSS_APART").is_ok_and(|v| v == "1") {
        return out;
    }
    let losses: Vec<NodeId> = order
        .iter()
        .copied()
        .filter(|&id| graph.node(id).op == Op::LinearCrossEntropy)
        .collect();
    for loss in losses {
        let xs = graph.operands(loss);
        // The first gradient found sets the adjoint; a second one joins it
        // only over the same adjoint.
        let (mut g, mut dx, mut dw) = (None, None, None);
        for &id in order.iter() {
            let Op::LinearCrossEntropyGrad { wrt } = graph.node(id).op else {
                continue;
            };
            let os = graph.operands(id);
            if os[..3] != xs[..] || g.is_some_and(|g| g != os[3]) {
                continue;
            }
            let slot = match wrt {
                NormArg::X => &mut dx,
                NormArg::W => &mut dw,
            };
            if slot.is_none() {
                *slot = Some(id);
                g = Some(os[3]);
            }
        }
        let Some(g) = g else {
            continue;
        };
        let grads = LossGrads { g, dx, dw };
        // The adjoint and what it is computed from.
        let mut ancestors = HashSet::new();
        let mut stack = vec![grads.g];
        while let Some(id) = stack.pop() {
            if ancestors.insert(id) {
                stack.extend(graph.operands(id));
            }
        }
        if ancestors.contains(&loss) {
            continue;
        }
        let at = order.iter().position(|&id| id == loss).expect("in order");
        let moved: HashSet<NodeId> = order[at + 1..]
            .iter()
            .copied()
            .filter(|id| ancestors.contains(id))
            .chain(grads.dx)
            .chain(grads.dw)
            .collect();
        let rest = order.split_off(at);
        order.extend(
            rest.iter()
                .filter(|id| ancestors.contains(id) && moved.contains(id)),
        );
        order.push(loss);
        order.extend(
            rest.iter()
                .filter(|&&id| Some(id) == grads.dx || Some(id) == grads.dw),
        );
        order.extend(rest.iter().filter(|id| **id != loss && !moved.contains(id)));
        out.insert(loss, grads);
    }
    out
}

/// Adds folded into the op that produces one of their operands:
/// - the residual stream's gradient joining an RMS norm's input gradient,
///   `add(r, rms_norm_grad{wrt=x}(…))`, twice a layer in a training step's
///   backward: the norm's kernel adds `r` in, one pass less over
///   `[B, T, d]`;
/// - the residual stream joining a linear layer's output, `add(r,
///   matmul(x, w))` with `w` a matrix (attention's output projection and
///   the MLP's down projection, twice a layer): a decode step's few rows
///   add `r` in the matrix-vector kernel's epilogue, one launch less; more
///   rows run the product and the add inside the one op, as before.
///
/// Each kernel rounds its own result to the storage type as its node would
/// be stored before adding `r` (so the sum is the add's, rounded the same
/// way), and its output is the add's value. The add must be the
/// producer's one reader, of its type and `r`'s (no broadcast), not a
/// concatenation's slot, `r` computed before the producer, and the dtype
/// stored as itself (not widened). By the producer, its add and `r`.
/// `CARAMBA_NO_FOLDED_ADDS=1` keeps the adds.
///
/// Many rows could add `r` in cuBLASLt's epilogue (`C` with `β = 1`), but
/// that sums the product unrounded: not the graph's rounding, and a tiny
/// bf16 Llama's logits then moved by 13% against the reference where a
/// product and the residual nearly cancel (NOTES, fifteenth session).
fn folded_adds(
    graph: &Graph,
    order: &[NodeId],
    slots: &HashMap<NodeId, (NodeId, usize)>,
    sum_batch: &HashSet<NodeId>,
    narrow: HalfStorage,
) -> HashMap<NodeId, (NodeId, NodeId)> {
    use caramba_ir::{BinaryOp, NormArg, Op};
    let mut out = HashMap::new();
    if env_off("CARAMBA_NO_FOLDED_ADDS") {
        return out;
    }
    let outputs: HashSet<NodeId> = graph.outputs().iter().map(|(_, id)| *id).collect();
    let position: HashMap<NodeId, usize> =
        order.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    for &g in order {
        let node = graph.node(g);
        let norm_grad = matches!(
            node.op,
            Op::RmsNormGrad {
                wrt: NormArg::X,
                ..
            }
        );
        let linear = node.op == Op::MatMul
            && graph.node(graph.operands(g)[1]).ty.shape.rank() == 2
            && !sum_batch.contains(&g);
        // A device that keeps the dtype widened rounds after the kernel, so
        // the kernel could not round between the two: no fold there.
        if !(norm_grad || linear) || outputs.contains(&g) || narrow.widens(node.ty.dtype) {
            continue;
        }
        let [add] = graph.users(g)[..] else {
            continue;
        };
        if graph.node(add).op != Op::Binary(BinaryOp::Add) || slots.contains_key(&add) {
            continue;
        }
        let r = match graph.operands(add)[..] {
            [a, b] if a == g && b != g => b,
            [a, b] if b == g && a != g => a,
            _ => continue,
        };
        let typed = |n: NodeId| graph.node(n).ty == node.ty;
        if typed(add) && typed(r) && position[&r] < position[&g] {
            out.insert(g, (add, r));
        }
    }
    out
}

/// Reductions of slices, `reduce{axis a}(slice{axis b}(x))` with `a ≠ b`
/// and the slice read by nothing else, grouped by `x`, the reduction and
/// its axis: where a group has two or more (GQA's `dk‖dv` summed over each
/// group of query heads, sliced into `dk` and `dv`), its first reduction
/// reduces the whole of `x` once and each one's value is a slice (a view)
/// of that, so the slices (a copy each: reductions read dense rows) and
/// the second reduction go. The same as the e-graph rule `reduce-of-slice`,
/// decided here because extraction does not take that rule in a training
/// graph's backward (NOTES, fifteenth session).
/// `CARAMBA_NO_REDUCED_SLICES=1` turns it off.
#[derive(Default)]
struct ReducedSlices {
    /// Each reduction's group: `x` and the first reduction of the group.
    group: HashMap<NodeId, (NodeId, NodeId)>,
    /// The reductions in each group.
    readers: HashMap<(NodeId, NodeId), usize>,
    /// The slices they read.
    sliced: HashSet<NodeId>,
}

fn reduced_slices(graph: &Graph, order: &[NodeId]) -> ReducedSlices {
    use caramba_ir::Op;
    let mut out = ReducedSlices::default();
    if env_off("CARAMBA_NO_REDUCED_SLICES") {
        return out;
    }
    let outputs: HashSet<NodeId> = graph.outputs().iter().map(|(_, id)| *id).collect();
    let mut groups: HashMap<(NodeId, Op), Vec<NodeId>> = HashMap::new();
    for &r in order {
        let Op::Reduce { axis: a, .. } = graph.node(r).op else {
            continue;
        };
        let s = graph.operands(r)[0];
        let Op::Slice { axis: b, .. } = graph.node(s).op else {
            continue;
        };
        if a != b && !outputs.contains(&s) && graph.users(s)[..] == [r] {
            let x = graph.operands(s)[0];
            groups
                .entry((x, graph.node(r).op.clone()))
                .or_default()
                .push(r);
        }
    }
    for ((x, _), rs) in groups {
        if rs.len() < 2 {
            continue;
        }
        for &r in &rs {
            out.group.insert(r, (x, rs[0]));
            out.sliced.insert(graph.operands(r)[0]);
        }
        out.readers.insert((x, rs[0]), rs.len());
    }
    out
}

/// What an executor precomputes from its graph: the live nodes in order,
/// operands, use counts, and the permutes left unmaterialized.
struct Plan {
    order: Vec<NodeId>,
    operands: HashMap<NodeId, Vec<NodeId>>,
    /// Reads of each value per run: one per operand edge, one per output.
    uses: HashMap<NodeId, usize>,
    lazy_transposes: HashSet<NodeId>,
    /// Permutes and slices whose every reader reads views in place
    /// (`ops::reads_views`): left as strides and an offset over their
    /// operand's buffer, no copy.
    lazy_views: HashSet<NodeId>,
    /// Matmuls `[B, K, N]` whose one user sums axis 0 (weight gradients):
    /// run as one GEMM over `B·T` rows when the layouts allow.
    batch_summed: HashSet<NodeId>,
    /// Those whose sum is read only through `reshape` to `[K, N]` and then
    /// `permute [1, 0]` (a weight's gradient in the weight's layout): the
    /// GEMM writes the transposed product, so that transpose reads it dense.
    transposed_sums: HashSet<NodeId>,
    /// Elementwise ops (programs, unary and binary ops) whose one user is a
    /// concatenation, by the concatenation and their operand position
    /// there: each writes straight into its slot of the concatenation's
    /// buffer (allocated when the first of them runs), and the
    /// concatenation copies only the operands that did not (SwiGLU's two
    /// input gradients, side by side in the merged gate/up product's
    /// gradient, were a 2 × [B, T, F] copy per layer).
    slots: HashMap<NodeId, (NodeId, usize)>,
    /// Concatenations that may append to their first operand, an input,
    /// by that input (see `append`).
    appends: HashMap<NodeId, NodeId>,
    /// Losses computed with their gradients (see [`loss_grads`]).
    loss_grads: HashMap<NodeId, LossGrads>,
}

impl Plan {
    /// Checks that every live op is supported.
    fn new(graph: &Graph) -> Result<Plan, GpuError> {
        let mut order = run_order(graph)?;
        let loss_grads = loss_grads(graph, &mut order);
        let mut operands = HashMap::new();
        let mut uses: HashMap<NodeId, usize> = HashMap::new();
        for &id in &order {
            let os = graph.operands(id);
            for &o in &os {
                *uses.entry(o).or_default() += 1;
            }
            operands.insert(id, os);
            ops::check_supported(graph, id)?;
        }
        for (_, id) in graph.outputs() {
            *uses.entry(*id).or_default() += 1;
        }
        let outputs: HashSet<NodeId> = graph.outputs().iter().map(|(_, id)| *id).collect();
        let lazy_transposes: HashSet<NodeId> = order
            .iter()
            .copied()
            .filter(|&id| match &graph.node(id).op {
                caramba_ir::Op::Permute(perm) => {
                    let users = graph.users(id);
                    ops::swaps_last_two(perm)
                        && !outputs.contains(&id)
                        && !users.is_empty()
                        && users.iter().all(|&u| ops::reads_transposed(graph, u, id))
                }
                _ => false,
            })
            .collect();
        let lazy_views = order
            .iter()
            .copied()
            .filter(|&id| {
                let users = graph.users(id);
                matches!(
                    graph.node(id).op,
                    caramba_ir::Op::Permute(_) | caramba_ir::Op::Slice { .. }
                ) && !lazy_transposes.contains(&id)
                    && !outputs.contains(&id)
                    && !users.is_empty()
                    && users
                        .iter()
                        .all(|&u| reads_views_through_reshapes(graph, u, &outputs))
                    && !lazy_disabled()
            })
            .collect();
        let batch_summed: HashSet<NodeId> = order
            .iter()
            .copied()
            .filter(|&id| {
                let users = graph.users(id);
                matches!(graph.node(id).op, caramba_ir::Op::MatMul)
                    && graph.node(id).ty.shape.rank() == 3
                    && !outputs.contains(&id)
                    && users.len() == 1
                    && matches!(
                        graph.node(users[0]).op,
                        caramba_ir::Op::Reduce {
                            op: caramba_ir::ReduceOp::Sum,
                            axis: 0
                        }
                    )
            })
            .collect();
        let only_user = |id: NodeId| match graph.users(id)[..] {
            [u] if !outputs.contains(&id) => Some(u),
            _ => None,
        };
        let transposed_sums = batch_summed
            .iter()
            .copied()
            .filter(|&m| {
                let Some(sum) = only_user(m) else {
                    return false;
                };
                let Some(reshape) = only_user(sum) else {
                    return false;
                };
                let users = graph.users(reshape);
                matches!(graph.node(reshape).op, caramba_ir::Op::Reshape(_))
                    && graph.node(reshape).ty.shape.rank() == 2
                    && !outputs.contains(&reshape)
                    && !users.is_empty()
                    && users.iter().all(|&u| {
                        matches!(&graph.node(u).op, caramba_ir::Op::Permute(p) if p[..] == [1, 0])
                    })
                    && !lazy_disabled()
                    && !transposed_sums_disabled()
            })
            .collect();
        let mut slots = HashMap::new();
        for &c in &order {
            if !matches!(graph.node(c).op, caramba_ir::Op::Concat { .. }) {
                continue;
            }
            let os = &operands[&c];
            for (k, &p) in os.iter().enumerate() {
                let n = graph.node(p);
                if matches!(
                    n.op,
                    caramba_ir::Op::Elementwise(_)
                        | caramba_ir::Op::Unary(_)
                        | caramba_ir::Op::Binary(_)
                ) && n.ty.dtype.is_float()
                    && !outputs.contains(&p)
                    && graph.users(p)[..] == [c]
                    && os.iter().filter(|&&o| o == p).count() == 1
                    && !slots_disabled()
                {
                    slots.insert(p, (c, k));
                }
            }
        }
        let appends = append::appends(graph, &order, &uses);
        // The inputs appended to come first, so that their buffers are
        // known when a producer writes into its slot of the append.
        order.sort_by_key(|id| !appends.values().any(|p| p == id));
        Ok(Plan {
            order,
            operands,
            uses,
            lazy_transposes,
            lazy_views,
            batch_summed,
            transposed_sums,
            slots,
            appends,
            loss_grads,
        })
    }
}

/// Runs `f` on CubeCL's device thread, blocking until it returns.
///
/// CubeCL 0.10 runs every launch, allocation and read of a calling thread
/// as a task on its device thread, and each call that returns a value
/// (`get_resource`, `flush`, reads) waits for the tasks queued before it;
/// calls made *on* the device thread run inline. A run queues thousands
/// of launches and, through cuBLASLt, several such waits per product, so
/// handing the whole run to the device thread once replaces thousands of
/// hand-offs by one (NOTES, thirteenth session). A panic in `f` is raised
/// again on the calling thread. `CARAMBA_NO_EXCLUSIVE=1` runs `f` here
/// instead (for A/B runs).
pub(crate) fn on_device_thread<R: Runtime, T, E>(
    client: &ComputeClient<R>,
    f: impl FnOnce() -> Result<T, E> + Send,
) -> Result<T, E>
where
    T: Send + 'static,
    E: From<GpuError> + Send + 'static,
{
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *OFF.get_or_init(|| std::env::var("CARAMBA_NO_EXCLUSIVE").is_ok_and(|v| v == "1")) {
        return f();
    }
    let caught =
        client.exclusive(move || std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    match caught {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(e) => Err(GpuError::Device(format!("CubeCL's device thread: {e:?}")).into()),
    }
}

/// Uploads `t` as a `dtype` tensor stored as `elem` (floats converted to
/// the storage type, rounding to nearest even).
fn upload_as<R: Runtime>(
    client: &ComputeClient<R>,
    t: &Tensor,
    dtype: DType,
    elem: FloatElem,
    at: &str,
) -> Result<DevTensor, GpuError> {
    use caramba_kernels::half::{bf16, f16};
    let handle = match t.storage() {
        // An empty tensor (a KV cache before its first token) still gets a
        // buffer: kernels are never launched over it, but bindings need one.
        _ if t.numel() == 0 => client.empty(4),
        Storage::F32(v) => match elem {
            // A widened half-precision tensor holds values on its grid.
            FloatElem::F32 if matches!(dtype, DType::F16 | DType::BF16) => {
                let round = if dtype == DType::BF16 {
                    round_bf16
                } else {
                    round_f16
                };
                let r: Vec<f32> = v.iter().map(|&x| round(x)).collect();
                client.create_from_slice(f32::as_bytes(&r))
            }
            FloatElem::F32 => client.create_from_slice(f32::as_bytes(v)),
            FloatElem::F16 => {
                let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
                client.create_from_slice(f16::as_bytes(&h))
            }
            FloatElem::BF16 => {
                let h: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
                client.create_from_slice(bf16::as_bytes(&h))
            }
        },
        Storage::I32(v) => client.create_from_slice(i32::as_bytes(v)),
        Storage::F64(_) => {
            return Err(GpuError::Unsupported {
                at: at.to_string(),
                message: "f64 tensors".into(),
            })
        }
    };
    Ok(DevTensor::dense(handle, t.shape().to_vec(), dtype, elem))
}

/// Reads a device tensor back (half-precision storage widened to `f32`).
fn download<R: Runtime>(client: &ComputeClient<R>, v: &DevTensor) -> Result<Tensor, GpuError> {
    use caramba_kernels::half::{bf16, f16};
    let n = v.numel();
    if n == 0 {
        return Ok(Tensor::full(v.dtype, v.shape.clone(), 0.0));
    }
    let bytes = client
        .read_one(v.handle.clone())
        .map_err(|e| GpuError::Device(format!("{e:?}")))?;
    let data = match (v.dtype, v.elem) {
        (DType::I32, _) => Storage::I32(i32::from_bytes(&bytes)[..n].to_vec()),
        (_, FloatElem::F32) => Storage::F32(f32::from_bytes(&bytes)[..n].to_vec()),
        (_, FloatElem::F16) => Storage::F32(
            f16::from_bytes(&bytes)[..n]
                .iter()
                .map(|x| x.to_f32())
                .collect(),
        ),
        (_, FloatElem::BF16) => Storage::F32(
            bf16::from_bytes(&bytes)[..n]
                .iter()
                .map(|x| x.to_f32())
                .collect(),
        ),
    };
    Ok(Tensor::new(v.dtype, v.shape.clone(), data))
}

/// A scalar constant as it is stored for `dtype` (narrow floats rounded).
pub(crate) fn constant_f32(value: f64, dtype: DType) -> f32 {
    match dtype {
        DType::F16 => round_f16(value as f32),
        DType::BF16 => round_bf16(value as f32),
        _ => value as f32,
    }
}

/// The reference interpreter's binding rules, reported as GPU errors.
fn live_order(graph: &Graph) -> Result<Vec<NodeId>, GpuError> {
    Ok(reference::live_order(graph)?)
}

/// The order the executor runs a graph in: the live nodes, each step the
/// ready one that leaves the least memory alive
/// ([`caramba_ir::schedule::memory_order`]). `CARAMBA_ID_ORDER=1` runs them
/// in id order, as before the thirty-fourth session, for A/B runs.
fn run_order(graph: &Graph) -> Result<Vec<NodeId>, GpuError> {
    let by_id = live_order(graph)?;
    if std::env::var("CARAMBA_ID_ORDER").is_ok_and(|v| v == "1") {
        return Ok(by_id);
    }
    Ok(caramba_ir::schedule::memory_order(graph))
}

pub(crate) fn concrete(
    shape: &Shape,
    syms: &SymValues,
    node: &Node,
) -> Result<Vec<usize>, GpuError> {
    Ok(reference::concrete(shape, syms, node)?)
}

fn check_binding(
    what: &'static str,
    name: &str,
    node: &Node,
    t: &Tensor,
    syms: &mut SymValues,
) -> Result<(), GpuError> {
    Ok(reference::check_binding(what, name, node, t, syms)?)
}

/// [`check_binding`] for a value already on the device: the same dtype
/// and shape rules (symbols inferred from the first value that uses them).
fn check_device_binding(
    what: &'static str,
    name: &str,
    node: &Node,
    t: &DeviceTensor,
    syms: &mut SymValues,
) -> Result<(), GpuError> {
    let found = || t.to_string();
    Ok(reference::check_value(
        what,
        name,
        node,
        t.dtype(),
        t.shape(),
        syms,
        found,
    )?)
}

impl From<EvalError> for GpuError {
    fn from(e: EvalError) -> GpuError {
        match e {
            EvalError::MissingInput { name } => GpuError::MissingInput { name },
            EvalError::MissingParam { name } => GpuError::MissingParam { name },
            EvalError::Mismatch {
                what,
                name,
                expected,
                found,
            } => GpuError::Mismatch {
                what,
                name,
                expected,
                found,
            },
            EvalError::UnboundSymbol { sym, at } => GpuError::UnboundSymbol { sym, at },
            EvalError::MissingOutput { name } => GpuError::Op {
                at: "output".into(),
                message: format!("graph output {name:?} refers to a node that is not in the graph"),
            },
            EvalError::Op { at, message } => GpuError::Op { at, message },
        }
    }
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use super::{on_device_thread, GpuError, WgpuDevice, WgpuRuntime};
    use caramba_kernels::cubecl::Runtime;

    /// `on_device_thread` runs its closure on CubeCL's device thread (not
    /// here: were it inline, the step would hand off every call again), a
    /// panic there reaches the caller, and the device thread outlives it.
    #[test]
    fn closures_run_on_the_device_thread_and_panics_come_back() {
        if !caramba_kernels::wgpu_available() {
            assert!(
                std::env::var_os("CARAMBA_REQUIRE_GPU").is_none(),
                "CARAMBA_REQUIRE_GPU is set but no wgpu adapter exists"
            );
            eprintln!("*** SKIPPED: no wgpu adapter ***");
            return;
        }
        if std::env::var("CARAMBA_NO_EXCLUSIVE").is_ok_and(|v| v == "1") {
            return;
        }
        let client = WgpuRuntime::client(&WgpuDevice::default());
        let here = std::thread::current().id();
        let there = on_device_thread::<_, _, GpuError>(&client, || Ok(std::thread::current().id()));
        assert_ne!(there.expect("a closure that returns"), here);
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            on_device_thread::<_, (), GpuError>(&client, || panic!("raised on the device thread"))
        }));
        let payload = caught.expect_err("the panic reaches the caller");
        assert_eq!(
            payload.downcast_ref::<&str>(),
            Some(&"raised on the device thread")
        );
        let after = on_device_thread::<_, u32, GpuError>(&client, || Ok(7));
        assert_eq!(after.expect("the device thread survives a panic"), 7);
        let err = on_device_thread::<_, u32, GpuError>(&client, || {
            Err(GpuError::Device("an error, not a panic".into()))
        });
        assert!(matches!(err, Err(GpuError::Device(m)) if m == "an error, not a panic"));
    }
}
