//! The op → kernel table of the GPU executor: `check_supported` says up
//! front which ops and dtypes run on the device, and `Ctx::apply` launches
//! the kernel for one node. Layout ops become strided copies (reshape and
//! dropout-in-evaluation only relabel a buffer); broadcasting operands are
//! passed as stride-0 views, never materialized. A permute of the last two
//! axes that feeds only matmuls (a linear layer's `Wᵀ`, attention's `Kᵀ`)
//! is not copied either: cubek reads the operand through its strides. A
//! matmul whose right operand has no batch (a linear layer) folds the left
//! operand's batch axes into rows: one GEMM.

use super::{at, constant_f32, DevTensor, GpuError, HalfStorage};
use caramba_ir::{
    AttnArg, BinaryOp, DType, ElemInstr, Graph, Node, NodeId, NormArg, Op, QuantFormat, ReduceOp,
    UnaryOp,
};
use caramba_kernels::cast::Narrow;
use caramba_kernels::copy::CopyElem;
use caramba_kernels::cubecl::prelude::*;
use caramba_kernels::cubecl::server::Handle;
use caramba_kernels::cubecl::MemoryAllocationMode;
use caramba_kernels::elementwise::{Binary, Instr, Unary};
use caramba_kernels::reduce::ReduceKind;
use caramba_kernels::vendor_gemm::VendorGemm;
use caramba_kernels::{
    attention, attention_backward, cast, copy, elementwise, gather, gemv, kv_attention, matmul,
    norm, quant, reduce, rms_norm, rope, row_dot, FloatElem, Storage, View,
};
use std::collections::HashMap;

mod linear_ce;

/// Rejects ops and dtypes the device cannot run, before anything launches.
pub(crate) fn check_supported(graph: &Graph, id: NodeId) -> Result<(), GpuError> {
    let node = graph.node(id);
    let unsupported = |message: String| {
        Err(GpuError::Unsupported {
            at: at(node),
            message,
        })
    };
    let dtypes = std::iter::once(node.ty.dtype).chain(
        graph
            .operands(id)
            .into_iter()
            .map(|o| graph.node(o).ty.dtype),
    );
    for dt in dtypes {
        if matches!(dt, DType::F64 | DType::U32 | DType::Bool) {
            return unsupported(format!("{dt} tensors (device storage is f32 and i32)"));
        }
    }
    let float_out = node.ty.dtype.is_float();
    let i32_operand = |i: usize| graph.node(graph.operands(id)[i]).ty.dtype == DType::I32;
    match &node.op {
        Op::Gather if !i32_operand(1) => unsupported("gather indices must be i32".into()),
        Op::OneHot { .. } | Op::ScatterAdd { .. } if !i32_operand(0) => {
            unsupported(format!("{} indices must be i32", node.op.mnemonic()))
        }
        Op::Binary(_) | Op::Reduce { .. } if !float_out => unsupported(format!(
            "{} on {} operands (float only)",
            node.op.mnemonic(),
            node.ty.dtype
        )),
        Op::KvAttention { parts, .. } => {
            let dk: usize = parts[..parts.len() - 1].iter().map(|p| p.dim).sum();
            if parts.len() > 3 {
                unsupported(format!(
                    "kv_attention over {} key caches (at most 2)",
                    parts.len() - 1
                ))
            } else if dk.max(parts[parts.len() - 1].dim) > kv_attention::KV_MAX_DK {
                unsupported(format!(
                    "kv_attention with {dk} key and {} value dims per head (at most {} each)",
                    parts[parts.len() - 1].dim,
                    kv_attention::KV_MAX_DK
                ))
            } else {
                Ok(())
            }
        }
        _ => Ok(()),
    }
}

/// The kernels' code for a cache's storage.
fn format_code(f: Option<QuantFormat>) -> u32 {
    match f {
        None => quant::FLOAT,
        Some(QuantFormat::Q8) => quant::Q8,
        Some(QuantFormat::Q4) => quant::Q4,
        Some(QuantFormat::Nf4) => quant::NF4,
    }
}

/// Whole buffers that values no longer need, by size in bytes, for the
/// next allocation of that size. A training step allocates the same sizes
/// in the same order every time, so from the second step on its values
/// reuse the buffers of the step before instead of asking CubeCL's pools
/// (whose page search showed in the host profile). On CUDA it changed no
/// step time (BENCHMARKS.md, thirteenth session): CubeCL's pools already
/// serve a step's repeated sizes; what it bounds is memory held across
/// runs of changing shapes. Reuse is safe as
/// CubeCL's own is: kernels of one stream run in order (cuBLASLt's stream
/// is ordered with it by the handoff), so a kernel that writes a recycled
/// buffer runs after every kernel that read its previous value.
///
/// Buffers are kept for one run of the executor: those nobody took during
/// a whole run go back to CubeCL at the start of the next ([`Recycled::
/// next_run`]), so a graph whose sizes change from run to run (generation
/// without a cache, whose sequence grows by one token a run) holds at most
/// two runs' worth, not every size it ever used.
#[derive(Default)]
pub(crate) struct Recycled {
    pub held: std::sync::Mutex<Generations>,
    /// Fresh buffers of at least this many bytes are exact (see
    /// [`ExactAllocation`]); `None`: every buffer comes from the pools.
    pub exact_from: Option<u64>,
    /// With [`Buffers::Planned`](super::Buffers): where the exact ones go
    /// (see `liveness`).
    pub planner: Option<std::sync::Mutex<super::liveness::Planner>>,
}

/// Buffers given back during this run, and those left from the last one.
#[derive(Default)]
pub(crate) struct Generations {
    fresh: HashMap<u64, Vec<Handle>>,
    stale: HashMap<u64, Vec<Handle>>,
}

impl Recycled {
    /// A buffer of exactly `bytes`, if one was given back.
    pub fn take(&self, bytes: usize) -> Option<Handle> {
        let mut pools = self.held.lock().expect("recycled buffers");
        let key = bytes as u64;
        let Generations { fresh, stale } = &mut *pools;
        stale
            .get_mut(&key)
            .and_then(Vec::pop)
            .or_else(|| fresh.get_mut(&key).and_then(Vec::pop))
    }

    /// Keeps `t`'s buffer for reuse where nothing else refers to it (no
    /// view, output or queued copy of the handle) and it is whole.
    /// An exact buffer (see `exact_from`) goes back to CubeCL's persistent
    /// pool instead, which gives it to the next request of its size as
    /// this would, without holding it from other requests meanwhile (the
    /// 1B shape's training step reserved 51.0 GiB so against 51.8 held
    /// here, SmolLM2's 55.9 against 58.7; BENCHMARKS.md, twenty-ninth
    /// session). `CARAMBA_NO_RECYCLE=1` gives every buffer back to CubeCL,
    /// for A/B measurements.
    pub fn give(&self, t: DevTensor) {
        static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *OFF.get_or_init(|| std::env::var("CARAMBA_NO_RECYCLE").is_ok_and(|v| v == "1")) {
            return;
        }
        let h = t.handle;
        if self.exact_from.is_some_and(|m| h.size() >= m) {
            return;
        }
        // CubeCL's allocations carry zero offsets (`Some(0)`), not `None`.
        let whole = h.offset_start.unwrap_or(0) == 0 && h.offset_end.unwrap_or(0) == 0;
        if h.can_mut() && whole {
            let mut pools = self.held.lock().expect("recycled buffers");
            pools.fresh.entry(h.size()).or_default().push(h);
        }
    }

    /// A buffer of `bytes` for a new value: a recycled one where `pool`
    /// has one of the size, else a fresh allocation.
    pub fn or_empty<R: Runtime>(
        pool: Option<&Recycled>,
        client: &ComputeClient<R>,
        bytes: usize,
    ) -> Handle {
        pool.and_then(|r| r.take(bytes))
            .unwrap_or_else(|| match pool {
                Some(r) if r.exact_from.is_some_and(|m| bytes as u64 >= m) => match &r.planner {
                    Some(p) => p.lock().expect("buffer planner").request(bytes, client),
                    None => exact_empty(client, bytes),
                },
                _ => client.empty(bytes),
            })
    }

    /// Bytes held for reuse.
    pub fn held_bytes(&self) -> u64 {
        let pools = self.held.lock().expect("recycled buffers");
        [&pools.fresh, &pools.stale]
            .into_iter()
            .flat_map(|m| m.iter())
            .map(|(bytes, hs)| bytes * hs.len() as u64)
            .sum()
    }

    /// Starts a run with inputs described by `key` (see `liveness`): what
    /// the last run left untaken goes back to CubeCL, and what it gave
    /// back becomes this run's to take.
    pub fn next_run<R: Runtime>(&self, key: super::liveness::RunKey, client: &ComputeClient<R>) {
        let mut pools = self.held.lock().expect("recycled buffers");
        let fresh = std::mem::take(&mut pools.fresh);
        pools.stale = fresh;
        if let Some(p) = &self.planner {
            p.lock().expect("buffer planner").start(key, client);
        }
    }

    /// Ends a run that completed (a failed one is not planned from).
    pub fn end_run(&self) {
        if let Some(p) = &self.planner {
            p.lock().expect("buffer planner").end();
        }
    }
}

/// Fresh buffers of at least this many bytes are exact under
/// [`Buffers::Exact`](super::Buffers) (smaller ones, a few norms' weights and
/// per-row statistics, stay in the pools' small pages).
pub(crate) const EXACT_MIN_BYTES: u64 = 1 << 20;

/// While alive, this thread's fresh allocations on `client` are exact:
/// buffers of their own size from CubeCL's persistent pool, never a slice
/// of a larger page, reused only for a request of the same size (and
/// never given back to the device while the client lives, as the pools'
/// pages are not). See [`Buffers::Exact`](super::Buffers).
pub(crate) struct ExactAllocation<R: Runtime>(Option<ComputeClient<R>>);

impl<R: Runtime> ExactAllocation<R> {
    /// Starts exact allocation where `on`; a no-op guard otherwise.
    pub fn start(client: &ComputeClient<R>, on: bool) -> Self {
        if on {
            // SAFETY: CubeCL's caution is that the mode is shared by every
            // allocation on the stream until it is set back. The stream is
            // this thread's (`StreamId::current`), and the guard sets it
            // back when dropped, panics included.
            unsafe { client.allocation_mode(MemoryAllocationMode::Persistent) };
        }
        ExactAllocation(on.then(|| client.clone()))
    }
}

impl<R: Runtime> Drop for ExactAllocation<R> {
    fn drop(&mut self) {
        if let Some(client) = &self.0 {
            // SAFETY: as in `start`.
            unsafe { client.allocation_mode(MemoryAllocationMode::Auto) };
        }
    }
}

/// A fresh buffer of exactly `bytes` (see [`ExactAllocation`]).
pub(crate) fn exact_empty<R: Runtime>(client: &ComputeClient<R>, bytes: usize) -> Handle {
    let _exact = ExactAllocation::start(client, true);
    client.empty(bytes)
}

/// Which rotations share angle tables: those over the same positions (the
/// operand node), the same inverse frequencies (an index among the
/// executor's distinct ones) and in the same direction.
pub(crate) type RopeKey = (NodeId, usize, bool);

/// RoPE's angle tables of one run, by key and number of positions: every
/// layer's rotation of q and k over the same positions reads one table
/// (every rotation but the first saves a launch and two allocations).
/// Emptied at the start of each run, since the positions are an input the
/// caller may rewrite.
#[derive(Default)]
pub(crate) struct RopeTables(std::sync::Mutex<HashMap<(RopeKey, usize), rope::RopeTable>>);

impl RopeTables {
    /// The table for `key` at `t` positions, made by `make` the first time.
    pub fn get_or(
        &self,
        key: RopeKey,
        t: usize,
        make: impl FnOnce() -> rope::RopeTable,
    ) -> rope::RopeTable {
        let mut tables = self.0.lock().expect("rope tables");
        tables.entry((key, t)).or_insert_with(make).clone()
    }

    pub fn clear(&self) {
        self.0.lock().expect("rope tables").clear();
    }
}

/// What one launch needs to know.
pub(crate) struct Ctx<'a, R: Runtime> {
    pub client: &'a ComputeClient<R>,
    pub node: &'a Node,
    pub fast_matmul: bool,
    /// cuBLASLt, when the executor has it: GEMMs go there first.
    pub vendor: Option<&'a VendorGemm>,
    /// A rope node's inverse frequencies, when the executor uploaded them
    /// once; otherwise they are uploaded for the launch.
    pub rope_freqs: Option<&'a caramba_kernels::cubecl::server::Handle>,
    /// A rope node's angle tables this run and its key there (see
    /// `RopeTables`); `None`: the launch tabulates its own.
    pub rope_table: Option<(&'a RopeTables, RopeKey)>,
    /// A `matmul_rope` node's slots for RoPE in a gemv's epilogue, when
    /// the executor uploaded them once (`gemv::rope_slots`); otherwise the
    /// launch uploads its own.
    pub rope_slots: Option<&'a caramba_kernels::cubecl::server::Handle>,
    /// Which half-precision types the device stores narrow.
    pub narrow: HalfStorage,
    /// A matmul whose only user sums its batch axis (a weight's gradient,
    /// `Σ_b x_bᵀ·dy_b`): it may return that sum, `[1, K, N]`, from one GEMM
    /// over the batch and rows together (see `Ctx::matmul_summed`).
    pub sum_batch: bool,
    /// With `sum_batch`: the sum is read only transposed (a weight's
    /// gradient, `(Σ xᵀ·dy)ᵀ`), so the GEMM computes `Σ dyᵀ·x` into a
    /// `[N, K]` buffer and returns it as a `[1, K, N]` view of it: the
    /// relabels after it keep the view, and the transpose that follows is
    /// then a dense read.
    pub transposed_sum: bool,
    /// Buffers the executor's earlier values left (see `Recycled`): an
    /// output of the same size takes one instead of a fresh allocation.
    pub recycled: Option<&'a Recycled>,
    /// Where the value goes instead of a fresh buffer: for an elementwise
    /// op, its slot (a strided view) in the buffer of the concatenation
    /// that is its one user; for that concatenation, the whole buffer.
    /// See `Plan::slots`.
    pub dest: Option<&'a DevTensor>,
    /// For a concatenation with `dest`: which operands were already
    /// computed into their slots (nothing left to copy).
    pub placed: &'a [bool],
    /// The buffer of a second node whose value this launch computes too:
    /// for `attention_with_lse` taken apart (see `SplitLse`), the
    /// log-sum-exp's, with `dest` the values'; for `attention_grad` paired
    /// with its sibling (`dq` with `dk‖dv`, see `grad_pairs`), and for a
    /// `linear_cross_entropy_grad` paired with its sibling (`dx` with
    /// `dw`), the sibling's.
    pub second: Option<&'a DevTensor>,
    /// The first operand dies at this launch and its buffer is the run's
    /// alone (see `Plan::in_place`): an op that can write its result over
    /// it does (cross-entropy's gradient over its logits).
    pub in_place: bool,
    /// Rows of logits a `linear_cross_entropy` block holds
    /// ([`GpuOptions::loss_block_rows`](super::GpuOptions)); `None`: as many
    /// as fit in 1 GiB.
    pub loss_block_rows: Option<usize>,
    /// For a `linear_cross_entropy` whose gradients were found computable
    /// before it (see `loss_grads`): their adjoint and buffers, filled by
    /// the loss's own pass over the head.
    pub head_grads: Option<HeadGrads<'a>>,
}

/// The gradients a pass over a language model's head computes: the loss
/// adjoint (one value a row) and the buffers of `dx` and `dw`, where the
/// graph takes them (with its loss, see `Ctx::head_grads`; or as a
/// `linear_cross_entropy_grad` and its sibling).
#[derive(Clone, Copy)]
pub(crate) struct HeadGrads<'a> {
    pub g: &'a DevTensor,
    pub dx: Option<&'a DevTensor>,
    pub dw: Option<&'a DevTensor>,
}

fn unary(u: UnaryOp) -> Unary {
    match u {
        UnaryOp::Neg => Unary::Neg,
        UnaryOp::Exp => Unary::Exp,
        UnaryOp::Log => Unary::Log,
        UnaryOp::Sqrt => Unary::Sqrt,
        UnaryOp::Rsqrt => Unary::Rsqrt,
        UnaryOp::Recip => Unary::Recip,
        UnaryOp::Abs => Unary::Abs,
        UnaryOp::Sigmoid => Unary::Sigmoid,
        UnaryOp::Silu => Unary::Silu,
        UnaryOp::Tanh => Unary::Tanh,
    }
}

fn binary(b: BinaryOp) -> Binary {
    match b {
        BinaryOp::Add => Binary::Add,
        BinaryOp::Sub => Binary::Sub,
        BinaryOp::Mul => Binary::Mul,
        BinaryOp::Div => Binary::Div,
        BinaryOp::Max => Binary::Max,
    }
}

fn copy_elem(t: &DevTensor) -> CopyElem {
    if t.dtype == DType::I32 {
        CopyElem::I32
    } else {
        t.elem.into()
    }
}

/// The tensor as a strided view of its buffer: dense, lazily transposed, or
/// a lazy view's own strides and offset.
fn view_of(t: &DevTensor) -> View {
    if let Some((strides, offset)) = &t.layout {
        return View {
            handle: t.handle.clone(),
            shape: t.shape.clone(),
            strides: strides.clone(),
            offset: *offset,
        };
    }
    if !t.transposed {
        return View::contiguous(t.handle.clone(), &t.shape);
    }
    let r = t.shape.len();
    let mut physical = t.shape.clone();
    physical.swap(r - 2, r - 1);
    let mut strides = caramba_kernels::contiguous_strides(&physical);
    strides.swap(r - 2, r - 1);
    View {
        handle: t.handle.clone(),
        shape: t.shape.clone(),
        strides,
        offset: 0,
    }
}

/// Whether `op`'s launch reads an operand laid out as `t` is (dense, or a
/// lazy view), without a copy first: see [`reads_views`]; the attention
/// kernels take strides but not an offset.
pub(crate) fn reads_in_place(op: &Op, t: &DevTensor) -> bool {
    match &t.layout {
        None => true,
        // Relabels keep a view as it is (a reshape that cannot copies it
        // itself, see `reshaped_view`).
        Some(_) if matches!(op, Op::Reshape(_) | Op::After) => true,
        Some(_) if matches!(op, Op::Reduce { axis, .. } if t.shape[*axis] == 1) => true,
        Some((_, offset)) => {
            reads_views(op)
                && (*offset == 0
                    || matches!(
                        op,
                        Op::Permute(_)
                            | Op::Slice { .. }
                            | Op::Concat { .. }
                            | Op::Broadcast(_)
                            | Op::Cast(_)
                            | Op::Unary(_)
                            | Op::Binary(_)
                            | Op::Elementwise(_)
                            | Op::RowDot
                            | Op::Rope(_)
                    ))
        }
    }
}

/// Whether `user` reads its operand `x` (a swap of the last two axes)
/// through transposed strides, as a GEMM operand: every operand of a
/// matmul, the weight of an `rms_norm_matmul` or a `matmul_rope` (not its
/// rows, norm weight or positions).
pub(crate) fn reads_transposed(graph: &Graph, user: NodeId, x: NodeId) -> bool {
    graph.reads_as_matrix(user, x)
}

/// Whether `op`'s launch reads its operands through their views (strides,
/// and an offset for the copies and casts), so that a permute or slice feeding
/// it need not be copied: the layout ops (strided copies), casts (a strided
/// conversion, or a relabel that keeps the view), elementwise programs,
/// RoPE, attention, and `row_dot` (attention's backward's `delta`, whose output
/// adjoint arrives as a permuted view).
pub(crate) fn reads_views(op: &Op) -> bool {
    matches!(
        op,
        Op::Permute(_)
            | Op::Slice { .. }
            | Op::Concat { .. }
            | Op::Broadcast(_)
            | Op::Cast(_)
            | Op::Unary(_)
            | Op::Binary(_)
            | Op::Elementwise(_)
            | Op::Rope(_)
            | Op::Attention { .. }
            | Op::AttentionWithLse { .. }
            | Op::AttentionLse { .. }
            | Op::AttentionGrad { .. }
            | Op::RowDot
    )
}

/// `x`'s buffer read as `view` says, as a dense tensor when the view is
/// a contiguous run of the buffer in row-major order: a permute of a value
/// laid out in the permute's order, a permute that moves only axes of size
/// 1 (a decode step's `[B, kv, g, 1, d]` ↔ `[B, 1, kv, g, d]`), a slice of
/// leading rows. Strides of size-1 axes never step, so they are not
/// compared. A run that is not the whole buffer is a slice of the handle
/// (`offset_start`/`offset_end`) where its start is a multiple of
/// [`VIEW_ALIGN`] bytes. `None` otherwise.
fn dense_view(x: &DevTensor, view: &View) -> Option<DevTensor> {
    let numel: usize = view.shape.iter().product();
    let size = x.elem.size();
    let used = x.handle.size_in_used();
    let in_order = view
        .shape
        .iter()
        .zip(&view.strides)
        .zip(caramba_kernels::contiguous_strides(&view.shape))
        .all(|((&n, &s), c)| n == 1 || s == c);
    if x.transposed || !in_order || numel == 0 {
        // (An empty value's buffer is one element: whole, or nothing.)
        return (!x.transposed && in_order && view.offset == 0 && used == size as u64)
            .then(|| DevTensor::dense(x.handle.clone(), view.shape.clone(), x.dtype, x.elem));
    }
    let (start, bytes) = ((view.offset * size) as u64, (numel * size) as u64);
    // (WebGPU binds whole 4-byte words.)
    if start % VIEW_ALIGN != 0 || start + bytes > used || (bytes != used && bytes % 4 != 0) {
        return None;
    }
    let mut handle = x.handle.clone();
    if start != 0 || bytes != used {
        let base = handle.offset_start.unwrap_or(0);
        handle.offset_start = Some(base + start);
        handle.offset_end = Some(handle.size() - base - start - bytes);
    }
    Some(DevTensor::dense(
        handle,
        view.shape.clone(),
        x.dtype,
        x.elem,
    ))
}

/// Byte offsets of the dense sub-slices `dense_view` makes are multiples of
/// this: WebGPU's storage-binding offsets must be multiples of 256 on most
/// devices (`minStorageBufferOffsetAlignment`); CUDA's vector loads and
/// cuBLASLt want 16.
const VIEW_ALIGN: u64 = 256;

/// `x` permuted or sliced as `op` says, as a view of `x`'s buffer (no
/// kernel); dense where that view is the whole buffer in order.
pub(crate) fn lazy_view(op: &Op, x: &DevTensor) -> DevTensor {
    let src = view_of(x);
    let (shape, strides, offset) = match op {
        Op::Permute(perm) => (
            perm.iter().map(|&p| src.shape[p]).collect(),
            perm.iter().map(|&p| src.strides[p]).collect(),
            src.offset,
        ),
        &Op::Slice { axis, start, end } => {
            let mut shape = src.shape.clone();
            shape[axis] = end - start;
            (
                shape,
                src.strides.clone(),
                src.offset + start * src.strides[axis],
            )
        }
        _ => unreachable!("only permutes and slices are lazy views"),
    };
    let view = View {
        handle: x.handle.clone(),
        shape,
        strides,
        offset,
    };
    if let Some(dense) = dense_view(x, &view) {
        return dense;
    }
    let View {
        shape,
        strides,
        offset,
        ..
    } = view;
    DevTensor {
        handle: x.handle.clone(),
        shape,
        dtype: x.dtype,
        elem: x.elem,
        transposed: false,
        layout: Some((strides, offset)),
    }
}

/// The strides of view `t` reshaped to `shape` without a copy, when its
/// layout allows: each run of the new axes must cover a run of old axes
/// that is contiguous in the buffer (so size-1 axes come and go, and axes
/// merge or split within such a run, as a permuted `[B, T, kv, g, d]`
/// becomes `[B, T, kv·g, d]`); `None` otherwise (PyTorch's `view` rule).
fn reshaped_view(t: &DevTensor, shape: &[usize]) -> Option<Vec<usize>> {
    let (strides, _) = t.layout.as_ref()?;
    view_strides(&t.shape, strides, shape)
}

/// [`reshaped_view`] on shapes and strides.
fn view_strides(old: &[usize], strides: &[usize], new: &[usize]) -> Option<Vec<usize>> {
    if old.contains(&0) || new.contains(&0) {
        return None;
    }
    let mut out = vec![0; new.len()];
    // New axes are assigned from the last, one chunk of old axes at a time.
    let mut view_d = new.len();
    let mut base = strides.last().copied().unwrap_or(1);
    let (mut old_numel, mut new_numel) = (1usize, 1usize);
    for d in (0..old.len()).rev() {
        old_numel *= old[d];
        // A chunk ends where the next axis out is not laid out right
        // around this one (or at the first axis).
        let ends = d == 0 || (old[d - 1] != 1 && strides[d - 1] != old_numel * base);
        if ends {
            while view_d > 0 && (new_numel < old_numel || new[view_d - 1] == 1) {
                out[view_d - 1] = new_numel * base;
                new_numel *= new[view_d - 1];
                view_d -= 1;
            }
            if new_numel != old_numel {
                return None;
            }
            if d > 0 {
                base = strides[d - 1];
                old_numel = 1;
                new_numel = 1;
            }
        }
    }
    (view_d == 0).then_some(out)
}

/// `t` dense: itself when it is, its buffer's slice when the view is a
/// contiguous run of it (see `dense_view`), else a copy of its view.
pub(crate) fn materialized<R: Runtime>(client: &ComputeClient<R>, t: &DevTensor) -> DevTensor {
    materialized_with(client, t, None)
}

/// [`materialized`], the copy made in a buffer `recycled` gave back where
/// it has one of the size.
pub(crate) fn materialized_in<R: Runtime>(
    client: &ComputeClient<R>,
    t: &DevTensor,
    recycled: &Recycled,
) -> DevTensor {
    materialized_with(client, t, Some(recycled))
}

fn materialized_with<R: Runtime>(
    client: &ComputeClient<R>,
    t: &DevTensor,
    recycled: Option<&Recycled>,
) -> DevTensor {
    if t.layout.is_none() {
        return t.clone();
    }
    // A view that is a contiguous run of its buffer is read there.
    if let Some(dense) = dense_view(t, &view_of(t)) {
        return dense;
    }
    let bytes = t.numel().max(1) * t.elem.size();
    let handle = Recycled::or_empty(recycled, client, bytes);
    let out = DevTensor::dense(handle, t.shape.clone(), t.dtype, t.elem);
    copy::launch_copy(client, copy_elem(t), &view_of(t), &view_of(&out));
    out
}

/// A tensor's buffer type, for conversions.
fn storage(dtype: DType, elem: FloatElem) -> Storage {
    if dtype.is_float() {
        Storage::Float(elem)
    } else {
        Storage::I32
    }
}

/// Whether `perm` swaps the last two axes and keeps the others.
pub(crate) fn swaps_last_two(perm: &[usize]) -> bool {
    let r = perm.len();
    r >= 2
        && perm[r - 2] == r - 1
        && perm[r - 1] == r - 2
        && perm[..r - 2].iter().enumerate().all(|(i, &p)| i == p)
}

/// `(outer, axis, inner)` sizes of `shape` around `axis`.
fn split(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (
        shape[..axis].iter().product(),
        shape[axis],
        shape[axis + 1..].iter().product(),
    )
}

impl<R: Runtime> Ctx<'_, R> {
    fn err(&self, message: String) -> GpuError {
        GpuError::Op {
            at: at(self.node),
            message,
        }
    }

    /// The storage of this node's value, when it is a float.
    fn elem(&self) -> FloatElem {
        self.narrow.elem(self.node.ty.dtype)
    }

    /// The grid RMS norm rounds its normalized rows to: the node's dtype's
    /// (whatever its storage on this device).
    fn norm_grid(&self) -> rms_norm::Grid {
        match self.node.ty.dtype {
            DType::BF16 => rms_norm::Grid::Bf16,
            DType::F16 => rms_norm::Grid::F16,
            _ => rms_norm::Grid::Exact,
        }
    }

    /// A fresh dense buffer for this node's value.
    fn alloc(&self, shape: Vec<usize>) -> DevTensor {
        let n: usize = shape.iter().product();
        // Non-float tensors have `F32` as their elem: 4-byte elements too.
        let elem = self.elem();
        let handle = Recycled::or_empty(self.recycled, self.client, n.max(1) * elem.size());
        DevTensor::dense(handle, shape, self.node.ty.dtype, elem)
    }

    /// The tensor's view broadcast to `batch` leading axes, its last two
    /// axes kept (attention's operands).
    fn batch_view(t: &DevTensor, batch: &[usize]) -> View {
        let k = t.shape.len();
        let mut target = batch.to_vec();
        target.extend_from_slice(&t.shape[k - 2..]);
        Self::view(t).broadcast_to(&target)
    }

    /// The tensor as a strided view of its buffer.
    fn view(t: &DevTensor) -> View {
        view_of(t)
    }

    /// Launches the node's kernel on its operands; `shape` is the node's
    /// concrete output shape. A half-precision result that the device keeps
    /// widened to `f32` is rounded to its grid, as narrow storage would.
    pub fn apply(&self, xs: &[&DevTensor], shape: Vec<usize>) -> Result<DevTensor, GpuError> {
        let out = self.launch(xs, shape)?;
        let relabel = matches!(self.node.op, Op::Reduce { axis, .. } if xs[0].shape[axis] == 1);
        let exact = relabel
            || matches!(
                self.node.op,
                // Already rounded, or moving values that are.
                Op::Cast(_)
                    | Op::Constant(_)
                    | Op::Reshape(_)
                    | Op::Dropout { .. }
                    | Op::Permute(_)
                    | Op::Slice { .. }
                    | Op::Concat { .. }
                    | Op::Broadcast(_)
                    | Op::Gather
                    | Op::CausalMask
            );
        if exact {
            return Ok(out);
        }
        Ok(self.on_grid(out))
    }

    /// `out`, a value of this node's dtype, rounded to that dtype's grid
    /// where the device keeps the dtype widened to `f32` (as narrow
    /// storage would round it); `out` itself elsewhere.
    fn on_grid(&self, out: DevTensor) -> DevTensor {
        let dtype = self.node.ty.dtype;
        if !self.narrow.widens(dtype) {
            return out;
        }
        let to = if dtype == DType::BF16 {
            Narrow::Bf16
        } else {
            Narrow::F16
        };
        let rounded = self.alloc(out.shape.clone());
        cast::launch_round(self.client, to, &out.handle, &rounded.handle, out.numel());
        // The one launch that returns a view, a transposed batch-summed
        // product (`Ctx::transposed_sum`), covers its whole buffer from
        // offset 0: rounded in buffer order, it keeps its layout.
        debug_assert!(out.layout.as_ref().is_none_or(|(_, o)| *o == 0));
        DevTensor {
            layout: out.layout.clone(),
            ..rounded
        }
    }

    fn launch(&self, xs: &[&DevTensor], shape: Vec<usize>) -> Result<DevTensor, GpuError> {
        let c = self.client;
        let e = self.elem();
        match &self.node.op {
            Op::Input { .. } | Op::Param { .. } => {
                Err(self.err("inputs and parameters are bound, not applied".into()))
            }
            Op::Quantize(f) => {
                let x = xs[0];
                let n = *x.shape.last().unwrap_or(&1);
                let out = self.alloc(shape);
                quant::launch_quantize(
                    c,
                    x.elem,
                    format_code(Some(*f)),
                    &x.handle,
                    &out.handle,
                    x.numel() / n.max(1),
                    n,
                );
                Ok(out)
            }
            Op::Dequantize { format, .. } => {
                let n = *shape.last().unwrap_or(&1);
                let rows = shape.iter().product::<usize>() / n.max(1);
                let out = self.alloc(shape);
                quant::launch_dequantize(
                    c,
                    e,
                    format_code(Some(*format)),
                    &xs[0].handle,
                    &out.handle,
                    rows,
                    n,
                );
                Ok(out)
            }
            Op::KvAttention {
                causal,
                scale,
                parts,
                ..
            } => {
                let q = xs[0];
                let kv_shape = kv_attention::KvShape {
                    batch: q.shape[0],
                    heads: q.shape[1],
                    groups: q.shape[2],
                    t: q.shape[3],
                    s: xs[1].shape[1],
                };
                let cache = |i: usize| kv_attention::CachePart {
                    handle: xs[i + 1].handle.clone(),
                    format: format_code(parts[i].format),
                    elem: xs[i + 1].elem,
                    dim: parts[i].dim,
                };
                let keys: Vec<_> = (0..parts.len() - 1).map(cache).collect();
                let values = cache(parts.len() - 1);
                let out = self.alloc(shape);
                kv_attention::launch_kv_attention(
                    c,
                    e,
                    kv_shape,
                    &q.handle,
                    &keys,
                    &values,
                    &out.handle,
                    *causal,
                    scale.0 as f32,
                )
                .map_err(|e| GpuError::Unsupported {
                    at: at(self.node),
                    message: e.to_string(),
                })?;
                Ok(out)
            }
            Op::Constant(v) => {
                let out = self.alloc(shape);
                if self.node.ty.dtype == DType::I32 {
                    elementwise::launch_fill_i32(c, &out.handle, 1, v.0 as i32);
                } else {
                    elementwise::launch_fill_float(
                        c,
                        e,
                        &out.handle,
                        1,
                        constant_f32(v.0, self.node.ty.dtype),
                    );
                }
                Ok(out)
            }
            Op::Unary(u) => self.program(&[Instr::Input(0), Instr::Unary(unary(*u), 0)], xs, shape),
            Op::Binary(b) => self.program(
                &[
                    Instr::Input(0),
                    Instr::Input(1),
                    Instr::Binary(binary(*b), 0, 1),
                ],
                xs,
                shape,
            ),
            Op::Elementwise(p) => {
                let dt = self.node.ty.dtype;
                let prog: Vec<Instr> =
                    p.0.iter()
                        .map(|i| match *i {
                            ElemInstr::Input(k) => Instr::Input(k as usize),
                            ElemInstr::Const(v) => Instr::Const(constant_f32(v.0, dt).to_bits()),
                            ElemInstr::Unary(u, a) => Instr::Unary(unary(u), a as usize),
                            ElemInstr::Binary(b, x, y) => {
                                Instr::Binary(binary(b), x as usize, y as usize)
                            }
                        })
                        .collect();
                self.program(&prog, xs, shape)
            }
            Op::Cast(to) => {
                let x = xs[0];
                let from = storage(x.dtype, x.elem);
                let to_st = storage(*to, e);
                let n = x.numel();
                // A narrow target the device widens is rounded after the
                // conversion (`launch_round`); one it stores narrow is
                // rounded by the conversion itself.
                let round = self.narrow.widens(*to).then_some(if *to == DType::BF16 {
                    Narrow::Bf16
                } else {
                    Narrow::F16
                });
                let mut out = if from == to_st {
                    // Same storage: relabel (a lazy view stays one).
                    DevTensor {
                        dtype: *to,
                        elem: e,
                        ..x.clone()
                    }
                } else if x.is_dense() {
                    let out = self.alloc(shape.clone());
                    cast::launch_convert(c, from, to_st, &x.handle, &out.handle, n);
                    out
                } else {
                    // A permuted or sliced operand, read in place.
                    let out = self.alloc(shape.clone());
                    cast::launch_convert_view(c, from, to_st, &Self::view(x), &Self::view(&out));
                    out
                };
                if let Some(narrow) = round {
                    let src = materialized(c, &out);
                    let rounded = self.alloc(shape);
                    cast::launch_round(c, narrow, &src.handle, &rounded.handle, n);
                    out = rounded;
                }
                Ok(out)
            }
            Op::Dropout { .. } | Op::Reshape(_) | Op::After => {
                let x = xs[0];
                if x.numel() != shape.iter().product::<usize>() {
                    return Err(self.err(format!("cannot reshape {:?} to {shape:?}", x.shape)));
                }
                if let Some((_, offset)) = &x.layout {
                    // A view: kept when only size-1 axes change, else copied.
                    let offset = *offset;
                    if let Some(strides) = reshaped_view(x, &shape) {
                        return Ok(DevTensor {
                            shape,
                            dtype: self.node.ty.dtype,
                            layout: Some((strides, offset)),
                            ..x.clone()
                        });
                    }
                    let d = materialized(c, x);
                    return Ok(DevTensor::dense(
                        d.handle,
                        shape,
                        self.node.ty.dtype,
                        d.elem,
                    ));
                }
                Ok(DevTensor::dense(
                    x.handle.clone(),
                    shape,
                    self.node.ty.dtype,
                    x.elem,
                ))
            }
            // Over a size-1 axis (a batch already summed by its matmul):
            // every reduction is the identity (a view stays one).
            Op::Reduce { axis, .. } if xs[0].shape[*axis] == 1 => {
                let x = xs[0];
                Ok(DevTensor { shape, ..x.clone() })
            }
            Op::Reduce { op, axis } => {
                let x = xs[0];
                let (outer, len, inner) = split(&x.shape, *axis);
                let kind = match op {
                    ReduceOp::Sum => ReduceKind::Sum,
                    ReduceOp::Mean => ReduceKind::Mean,
                    ReduceOp::Max => ReduceKind::Max,
                };
                let out = self.alloc(shape);
                reduce::launch_reduce(c, e, kind, &x.handle, &out.handle, outer, len, inner);
                Ok(out)
            }
            Op::Softmax { axis } => {
                let x = xs[0];
                let (outer, len, inner) = split(&x.shape, *axis);
                let out = self.alloc(shape);
                reduce::launch_softmax(c, e, &x.handle, &out.handle, outer, len, inner);
                Ok(out)
            }
            Op::Permute(perm) => {
                let x = xs[0];
                let src = Self::view(x);
                let input = View {
                    handle: x.handle.clone(),
                    shape: shape.clone(),
                    strides: perm.iter().map(|&p| src.strides[p]).collect(),
                    offset: src.offset,
                };
                // A value laid out in this permute's order (attention's
                // output, `permuted_outputs`) comes out dense: a relabel.
                if let Some(dense) = dense_view(x, &input) {
                    return Ok(dense);
                }
                let out = self.alloc(shape);
                copy::launch_copy(c, copy_elem(x), &input, &Self::view(&out));
                Ok(out)
            }
            Op::Slice { axis, start, .. } => {
                let x = xs[0];
                let src = Self::view(x);
                let input = View {
                    handle: x.handle.clone(),
                    shape: shape.clone(),
                    offset: src.offset + start * src.strides[*axis],
                    strides: src.strides,
                };
                // Leading rows (a decode step's q, k and v columns of
                // their one row): the buffer's slice.
                if let Some(dense) = dense_view(x, &input) {
                    return Ok(dense);
                }
                let out = self.alloc(shape);
                copy::launch_copy(c, copy_elem(x), &input, &Self::view(&out));
                Ok(out)
            }
            Op::Concat { axis } => {
                let out = match self.dest {
                    Some(d) => d.clone(),
                    None => self.alloc(shape),
                };
                let dst = Self::view(&out);
                let mut at_axis = 0;
                for (i, x) in xs.iter().enumerate() {
                    if self.placed.get(i) == Some(&true) {
                        at_axis += x.shape[*axis];
                        continue;
                    }
                    let part = View {
                        handle: out.handle.clone(),
                        shape: x.shape.clone(),
                        strides: dst.strides.clone(),
                        offset: at_axis * dst.strides[*axis],
                    };
                    copy::launch_copy(c, copy_elem(x), &Self::view(x), &part);
                    at_axis += x.shape[*axis];
                }
                Ok(out)
            }
            Op::Gather => {
                let (table, ids) = (xs[0], xs[1]);
                if ids.dtype != DType::I32 {
                    return Err(GpuError::Unsupported {
                        at: at(self.node),
                        message: format!("gather indices of {} (i32 only)", ids.dtype),
                    });
                }
                let rows = table.shape[0];
                let row_len: usize = table.shape[1..].iter().product();
                let out = self.alloc(shape);
                gather::launch_gather(
                    c,
                    e,
                    &table.handle,
                    &ids.handle,
                    &out.handle,
                    rows,
                    row_len,
                    ids.numel(),
                );
                Ok(out)
            }
            Op::CausalMask => {
                let x = xs[0];
                let r = x.shape.len();
                let out = self.alloc(shape);
                gather::launch_causal_mask(
                    c,
                    e,
                    &x.handle,
                    &out.handle,
                    x.shape[r - 2],
                    x.shape[r - 1],
                    x.numel(),
                );
                Ok(out)
            }
            Op::Rope(spec) => {
                let (x, pos) = (xs[0], xs[1]);
                // A view whose last axis is not contiguous is copied first.
                let mut xv = Self::view(x);
                if xv.strides.last() != Some(&1) {
                    xv = Self::view(&materialized(c, x));
                }
                let (t, d) = rope::rope_dims(&xv).map_err(|e| self.err(e.to_string()))?;
                let table = self.rope_angles(spec, pos, t, d);
                let out = self.alloc(shape);
                rope::launch_rope_with(c, e, &xv, &table, &out.handle)
                    .map_err(|e| self.err(e.to_string()))?;
                Ok(out)
            }
            Op::CrossEntropy => {
                // Half-precision logits are read as they are; the loss is
                // f32 (`Op::CrossEntropy`).
                let (logits, targets) = (xs[0], xs[1]);
                let v = *logits.shape.last().expect("typed rank ≥ 1");
                let out = self.alloc(shape);
                norm::launch_cross_entropy(
                    c,
                    (logits.elem, &logits.handle),
                    &targets.handle,
                    (e, &out.handle),
                    targets.numel(),
                    v,
                );
                Ok(out)
            }
            Op::LinearCrossEntropy => self.linear_cross_entropy(xs, shape),
            Op::LinearCrossEntropyGrad { wrt } => self.linear_cross_entropy_grad(xs, *wrt, shape),
            Op::CrossEntropyGrad => {
                let (logits, targets, g) = (xs[0], xs[1], xs[2]);
                let v = *logits.shape.last().expect("typed rank ≥ 1");
                if self.in_place && logits.is_dense() {
                    // The gradient has the logits' type: it takes their
                    // buffer, so the two are never alive at once.
                    norm::launch_cross_entropy_grad_in_place(
                        c,
                        (logits.elem, &logits.handle),
                        &targets.handle,
                        (g.elem, &g.handle),
                        targets.numel(),
                        v,
                    );
                    return Ok(logits.clone());
                }
                let out = self.alloc(shape);
                norm::launch_cross_entropy_grad(
                    c,
                    (logits.elem, &logits.handle),
                    &targets.handle,
                    (g.elem, &g.handle),
                    &out.handle,
                    targets.numel(),
                    v,
                );
                Ok(out)
            }
            Op::RowDot => {
                // Both operands read through their views (strides and
                // offset), whatever their storage; the rows are f32, the
                // statistics dtype of every float the device stores.
                let (x, y) = (xs[0], xs[1]);
                if x.elem != y.elem {
                    return Err(self.err(format!(
                        "row_dot operands stored as {:?} and {:?}",
                        x.elem, y.elem
                    )));
                }
                let out = self.alloc(shape);
                debug_assert_eq!(out.elem, FloatElem::F32, "row_dot's rows are f32");
                row_dot::launch_row_dot(c, x.elem, &Self::view(x), &Self::view(y), &out.handle);
                Ok(out)
            }
            Op::RmsNorm { eps } => {
                let (x, w) = (xs[0], xs[1]);
                let d = *x.shape.last().expect("typed rank ≥ 1");
                let out = self.alloc(shape);
                rms_norm::launch_rms_norm(
                    c,
                    e,
                    self.norm_grid(),
                    &x.handle,
                    &w.handle,
                    &out.handle,
                    x.numel() / d.max(1),
                    d,
                    eps.0 as f32,
                );
                Ok(out)
            }
            Op::RmsNormMatMul { eps } => {
                self.rms_norm_matmul(xs[0], xs[1], xs[2], eps.0 as f32, shape)
            }
            Op::MatMulRope {
                eps,
                rope,
                head_dim,
                ranges,
            } => self.matmul_rope(xs, eps.map(|e| e.0 as f32), rope, *head_dim, ranges, shape),
            Op::RmsNormGrad { eps, wrt } => {
                let (x, w, dy) = (xs[0], xs[1], xs[2]);
                let d = *x.shape.last().expect("typed rank ≥ 1");
                let operands = rms_norm::NormGradOperands {
                    x: &x.handle,
                    w: &w.handle,
                    dy: &dy.handle,
                    rows: x.numel() / d.max(1),
                    d,
                    eps: eps.0 as f32,
                };
                let out = self.alloc(shape);
                // The residual stream's gradient added in, where the
                // executor folds the add that reads this one (`folded_adds`).
                let residual = self.second.map(|r| &r.handle);
                match wrt {
                    NormArg::X => {
                        rms_norm::launch_rms_norm_grad_x(c, e, &operands, residual, &out.handle)
                    }
                    NormArg::W => rms_norm::launch_rms_norm_grad_w(
                        c,
                        e,
                        self.norm_grid(),
                        &operands,
                        &out.handle,
                    ),
                }
                .map_err(|err| self.err(err.to_string()))?;
                Ok(out)
            }
            Op::Broadcast(_) => {
                let x = xs[0];
                let out = self.alloc(shape);
                let src = Self::view(x).broadcast_to(&out.shape);
                copy::launch_copy(c, copy_elem(x), &src, &Self::view(&out));
                Ok(out)
            }
            Op::ScatterAdd { size } => {
                let (ids, src) = (xs[0], xs[1]);
                let row_len: usize = shape[1..].iter().product();
                let out = self.alloc(shape);
                // The plan of which rows go where is built on the host.
                let n_ids = ids.numel();
                let ids_host: Vec<i32> = if n_ids == 0 {
                    Vec::new()
                } else {
                    let bytes = c
                        .read_one(ids.handle.clone())
                        .map_err(|e| self.err(format!("reading scatter_add's ids: {e:?}")))?;
                    i32::from_bytes(&bytes)[..n_ids].to_vec()
                };
                gather::launch_scatter_add(
                    c,
                    e,
                    &ids_host,
                    &src.handle,
                    &out.handle,
                    row_len,
                    *size,
                );
                Ok(out)
            }
            Op::OneHot { depth, .. } => {
                let ids = xs[0];
                let out = self.alloc(shape);
                gather::launch_one_hot(c, e, &ids.handle, &out.handle, ids.numel(), *depth);
                Ok(out)
            }
            Op::MatMul => match (self.sum_batch, self.second) {
                (true, _) => match self.matmul_summed(xs[0], xs[1])? {
                    Some(summed) => Ok(summed),
                    None => self.matmul(xs[0], xs[1], shape),
                },
                // The residual add that reads this product, folded in.
                (false, Some(r)) => self.matmul_added(xs[0], xs[1], r, shape),
                (false, None) => self.matmul(xs[0], xs[1], shape),
            },
            Op::Attention { causal, scale } | Op::AttentionWithLse { causal, scale } => {
                let batch = &shape[..shape.len() - 2];
                let bview = |t: &DevTensor| Self::batch_view(t, batch);
                let (q, k, v) = (bview(xs[0]), bview(xs[1]), bview(xs[2]));
                let (qe, scale) = (xs[0].elem, scale.0 as f32);
                if let Op::Attention { .. } = self.node.op {
                    // Stored as q is, in `dest`'s layout where the executor
                    // gives one (its reader's permuted order).
                    let out = match self.dest {
                        Some(d) => d.clone(),
                        None => self.alloc(shape),
                    };
                    let o = Self::view(&out);
                    attention::launch_attention(c, qe, &q, &k, &v, &o, *causal, scale);
                    return Ok(out);
                }
                if let (Some(values), Some(stats)) = (self.dest, self.second) {
                    // Taken apart (`SplitLse`): the values stored
                    // as q is, the log-sum-exp in its own f32 tensor. The
                    // slices that read them are bound to those; the value
                    // of this node is the statistics' buffer, which only
                    // those slices read.
                    let (o, l) = (Self::view(values), Self::view(stats));
                    debug_assert_eq!(values.elem, qe, "values stored as q is");
                    debug_assert_eq!(stats.elem, FloatElem::F32, "attention statistics are f32");
                    attention::launch_attention_with_lse(
                        c,
                        qe,
                        &q,
                        &k,
                        &v,
                        &o,
                        Some(&l),
                        *causal,
                        scale,
                    );
                    return Ok(stats.clone());
                }
                // The op's own layout: each row's values, then its
                // log-sum-exp, all f32 (the statistics dtype).
                let out = self.alloc(shape);
                debug_assert_eq!(out.elem, FloatElem::F32, "attention statistics are f32");
                let o = Self::view(&out);
                attention::launch_attention_with_lse(c, qe, &q, &k, &v, &o, None, *causal, scale);
                Ok(out)
            }
            Op::AttentionLse { causal, scale } => {
                let batch = &shape[..shape.len() - 2];
                let (q, k) = (
                    Self::batch_view(xs[0], batch),
                    Self::batch_view(xs[1], batch),
                );
                let out = self.alloc(shape);
                debug_assert_eq!(out.elem, FloatElem::F32, "attention statistics are f32");
                attention::launch_attention_lse(
                    c,
                    xs[0].elem,
                    &q,
                    &k,
                    &Self::view(&out),
                    *causal,
                    scale.0 as f32,
                );
                Ok(out)
            }
            Op::AttentionGrad { causal, scale, wrt } => {
                use attention_backward::KeyGrads;
                let batch = &shape[..shape.len() - 2];
                // lse and delta are f32 (the statistics dtype), the rest as
                // the result.
                debug_assert!(xs[4..].iter().all(|x| x.elem == FloatElem::F32));
                let v: Vec<View> = xs.iter().map(|x| Self::batch_view(x, batch)).collect();
                let operands = attention_backward::GradOperands {
                    q: &v[0],
                    k: &v[1],
                    v: &v[2],
                    dout: &v[3],
                    lse: &v[4],
                    delta: &v[5],
                };
                let out = self.alloc(shape);
                let (o, scale) = (Self::view(&out), scale.0 as f32);
                if let Some(sibling) = self.second {
                    // Both from one launch where the kernels allow.
                    let s = Self::view(sibling);
                    let (dq, dkv) = match wrt {
                        AttnArg::Q => (&o, &s),
                        _ => (&s, &o),
                    };
                    attention_backward::launch_attention_grads(
                        c, e, &operands, dq, dkv, *causal, scale, true,
                    );
                    return Ok(out);
                }
                let keys = |grads| {
                    attention_backward::launch_attention_dkv(
                        c, e, &operands, &o, *causal, scale, grads,
                    )
                };
                match wrt {
                    AttnArg::Q => {
                        attention_backward::launch_attention_dq(c, e, &operands, &o, *causal, scale)
                    }
                    AttnArg::K => keys(KeyGrads::K),
                    AttnArg::V => keys(KeyGrads::V),
                    AttnArg::KV => keys(KeyGrads::KV),
                }
                Ok(out)
            }
        }
    }

    /// Runs an elementwise program over operands broadcast to `shape`.
    fn program(
        &self,
        prog: &[Instr],
        xs: &[&DevTensor],
        shape: Vec<usize>,
    ) -> Result<DevTensor, GpuError> {
        let out = match self.dest {
            Some(d) => d.clone(),
            None => self.alloc(shape),
        };
        let inputs: Vec<View> = xs
            .iter()
            .map(|x| Self::view(x).broadcast_to(&out.shape))
            .collect();
        elementwise::launch_elementwise(self.client, out.elem, prog, &inputs, &Self::view(&out))
            .map_err(|e| self.err(e.to_string()))?;
        Ok(out)
    }

    /// `rms_norm{eps}(x, w) @ b` for a dense x and a matrix b (any view):
    /// for a decode step's few rows, one matrix-vector kernel that
    /// normalizes each row where it reads it; for more, the norm kernel
    /// into a scratch buffer and then the product (cuBLASLt's and cubek's
    /// GEMMs take no prologue), which is what the two ops cost unfused.
    fn rms_norm_matmul(
        &self,
        x: &DevTensor,
        w: &DevTensor,
        b: &DevTensor,
        eps: f32,
        shape: Vec<usize>,
    ) -> Result<DevTensor, GpuError> {
        let d = *x.shape.last().expect("typed rank ≥ 2");
        let rows = x.numel() / d.max(1);
        let vb = Self::view(b);
        if (1..=gemv::GEMV_MAX_ROWS).contains(&rows) && vb.offset == 0 {
            let out = self.alloc(shape);
            let n = *out.shape.last().expect("typed rank ≥ 2");
            gemv::launch_gemv_norm(
                self.client,
                out.elem,
                self.norm_grid(),
                &View::contiguous(x.handle.clone(), &[rows, d]),
                &View::contiguous(w.handle.clone(), &[d]),
                &vb,
                &View::contiguous(out.handle.clone(), &[rows, n]),
                eps,
            );
            return Ok(out);
        }
        let xn = self.alloc(x.shape.clone());
        rms_norm::launch_rms_norm(
            self.client,
            self.elem(),
            self.norm_grid(),
            &x.handle,
            &w.handle,
            &xn.handle,
            rows,
            d,
            eps,
        );
        let xn = self.on_grid(xn);
        let out = self.matmul(&xn, b, shape);
        if let Some(r) = self.recycled {
            // Kernels of one stream run in order: the product has read
            // the rows before a later kernel can write this buffer.
            r.give(xn);
        }
        out
    }

    /// RoPE's angles for `t` positions `pos` and head dim `d`: the run's
    /// shared table when the executor keyed this node's rotation
    /// (`RopeTables`), else a table of the launch's own.
    fn rope_angles(
        &self,
        spec: &caramba_ir::RopeSpec,
        pos: &DevTensor,
        t: usize,
        d: usize,
    ) -> rope::RopeTable {
        let c = self.client;
        let tabulate = || {
            let inv = match self.rope_freqs {
                Some(h) => h.clone(),
                None => {
                    let inv: Vec<f32> = spec.inv_freq(d).into_iter().map(|f| f as f32).collect();
                    c.create_from_slice(f32::as_bytes(&inv))
                }
            };
            rope::launch_rope_table(c, &pos.handle, &inv, t, d / 2, spec.inverse)
        };
        match self.rope_table {
            Some((tables, key)) => tables.get_or(key, t, tabulate),
            None => tabulate(),
        }
    }

    /// `matmul_rope` (operands x, the norm's weight with `eps`, b, pos): a
    /// few rows (a decode step) run one matrix-vector kernel that rotates
    /// each pair of columns where it sums them, when the ranges allow
    /// (`gemv::rope_slots`); otherwise the product (or the norm's fallback)
    /// runs as its op would, and RoPE rotates each range of its result in
    /// place.
    fn matmul_rope(
        &self,
        xs: &[&DevTensor],
        eps: Option<f32>,
        spec: &caramba_ir::RopeSpec,
        head_dim: usize,
        ranges: &[(usize, usize)],
        shape: Vec<usize>,
    ) -> Result<DevTensor, GpuError> {
        let c = self.client;
        let x = xs[0];
        let (w, b, pos) = match eps {
            Some(_) => (Some(xs[1]), xs[2], xs[3]),
            None => (None, xs[1], xs[2]),
        };
        let r = shape.len();
        let (t, n) = (shape[r - 2], shape[r - 1]);
        let k = *x.shape.last().expect("typed rank ≥ 2");
        let rows = x.numel() / k.max(1);
        let table = self.rope_angles(spec, pos, t, head_dim);
        let vb = Self::view(b);
        if (1..=gemv::GEMV_MAX_ROWS).contains(&rows) && vb.offset == 0 && !x.transposed {
            let uploaded;
            let slots = match self.rope_slots {
                Some(h) => Some(h),
                None => match gemv::rope_slots(n, head_dim, ranges) {
                    Some(v) => {
                        uploaded = c.create_from_slice(i32::as_bytes(&v));
                        Some(&uploaded)
                    }
                    None => None,
                },
            };
            if let Some(slots) = slots {
                let out = self.alloc(shape);
                let rb = vb.shape.len();
                let rhs = View {
                    shape: vec![k, n],
                    strides: vb.strides[rb - 2..].to_vec(),
                    ..vb
                };
                let wv = w.map(|w| View::contiguous(w.handle.clone(), &[k]));
                gemv::launch_gemv_rope(
                    c,
                    out.elem,
                    &View::contiguous(x.handle.clone(), &[rows, k]),
                    wv.as_ref()
                        .map(|wv| (wv, self.norm_grid(), eps.unwrap_or(0.0))),
                    &rhs,
                    &View::contiguous(out.handle.clone(), &[rows, n]),
                    &gemv::GemvRope {
                        table: &table,
                        slots,
                        grid: self.norm_grid(),
                    },
                );
                return Ok(out);
            }
        }
        let y = match (w, eps) {
            (Some(w), Some(eps)) => self.rms_norm_matmul(x, w, b, eps, shape.clone())?,
            _ => self.matmul(x, b, shape.clone())?,
        };
        // The product's result as its op rounds it, then rotated in place.
        let y = self.on_grid(y);
        let lead = caramba_kernels::contiguous_strides(&shape[..r - 1]);
        for &(s, e) in ranges {
            let mut vshape = shape[..r - 1].to_vec();
            vshape.extend([(e - s) / head_dim, head_dim]);
            let mut strides: Vec<usize> = lead.iter().map(|st| st * n).collect();
            strides.extend([head_dim, 1]);
            let view = View {
                handle: y.handle.clone(),
                shape: vshape,
                strides,
                offset: s,
            };
            rope::launch_rope_in_place(c, y.elem, &view, &table)
                .map_err(|err| self.err(err.to_string()))?;
        }
        Ok(y)
    }

    /// `a @ b + r`, the executor's folded add (`folded_adds`): `r` dense,
    /// of the product's type. A linear layer over a few rows (a decode
    /// step) adds `r` in the matrix-vector kernel's epilogue, after
    /// rounding the product as it would be stored; otherwise the product
    /// runs as its op would, then the add.
    fn matmul_added(
        &self,
        a: &DevTensor,
        b: &DevTensor,
        r: &DevTensor,
        shape: Vec<usize>,
    ) -> Result<DevTensor, GpuError> {
        let rank = shape.len();
        let n = shape[rank - 1];
        let rows = shape[..rank - 1].iter().product::<usize>();
        let k = *a.shape.last().expect("typed rank ≥ 2");
        let vb = Self::view(b);
        let rb = vb.shape.len();
        let linear = rb == 2 && vb.offset == 0 && !a.transposed && a.layout.is_none();
        if linear && (1..=gemv::GEMV_MAX_ROWS).contains(&rows) {
            let out = self.alloc(shape);
            gemv::launch_gemv_add(
                self.client,
                out.elem,
                &View::contiguous(a.handle.clone(), &[rows, k]),
                &vb,
                &View::contiguous(r.handle.clone(), &[rows, n]),
                &View::contiguous(out.handle.clone(), &[rows, n]),
            );
            return Ok(out);
        }
        let product = self.matmul(a, b, shape.clone())?;
        let add = [
            Instr::Input(0),
            Instr::Input(1),
            Instr::Binary(binary(BinaryOp::Add), 0, 1),
        ];
        let sum = self.program(&add, &[&product, r], shape)?;
        if let Some(recycled) = self.recycled {
            // Kernels of one stream run in order: the add has read the
            // product before a later kernel can write this buffer.
            recycled.give(product);
        }
        Ok(sum)
    }

    /// `a @ b` with broadcast batch axes, through cuBLASLt or cubek.
    fn matmul(
        &self,
        a: &DevTensor,
        b: &DevTensor,
        shape: Vec<usize>,
    ) -> Result<DevTensor, GpuError> {
        let r = shape.len();
        let out = self.alloc(shape);
        let (m, n) = (out.shape[r - 2], out.shape[r - 1]);
        let k = a.shape[a.shape.len() - 1];
        let rows: usize = out.shape[..r - 1].iter().product();
        let (va, vb) = (Self::view(a), Self::view(b));
        let b_batch: usize = b.shape[..b.shape.len() - 2].iter().product();
        if b_batch == 1 && !a.transposed && (rows > m || rows <= gemv::GEMV_MAX_ROWS) {
            // A shared right operand (a linear layer's weight): fold the
            // left operand's batch axes into its rows, one plain GEMM, or,
            // for a few rows (a decode step), a matrix-vector kernel.
            let lhs = View::contiguous(a.handle.clone(), &[rows, k]);
            let rb = vb.shape.len();
            let rhs = View {
                shape: vec![k, n],
                strides: vb.strides[rb - 2..].to_vec(),
                ..vb
            };
            let dst = View::contiguous(out.handle.clone(), &[rows, n]);
            if (1..=gemv::GEMV_MAX_ROWS).contains(&rows) && rhs.offset == 0 {
                gemv::launch_gemv(self.client, out.elem, &lhs, &rhs, &dst);
            } else {
                self.gemm(out.elem, &lhs, &rhs, &dst)?;
            }
            return Ok(out);
        }
        // cubek broadcasts a size-1 batch axis itself (stride 0); operands
        // only need the output's rank.
        let pad = |v: View| -> View {
            let extra = r - v.shape.len();
            let numel = v.numel().max(1);
            let mut shape = vec![1; extra];
            shape.extend_from_slice(&v.shape);
            let mut strides = vec![numel; extra];
            strides.extend_from_slice(&v.strides);
            View {
                shape,
                strides,
                ..v
            }
        };
        let (va, vb) = (pad(va), pad(vb));
        self.gemm(out.elem, &va, &vb, &Self::view(&out))?;
        Ok(out)
    }

    /// `Σ_b a_b·b_b` as one GEMM, `[1, K, N]`, where `a [B, K, T]` is the
    /// transposed view of a dense `[B, T, K]` and `b [B, T, N]` is dense:
    /// the batch joins the contraction, `x[B·T, K]ᵀ · dy[B·T, N]`, so no
    /// `[B, K, N]` partials are written and summed. `None` for other
    /// layouts (the caller then runs the batched product).
    fn matmul_summed(&self, a: &DevTensor, b: &DevTensor) -> Result<Option<DevTensor>, GpuError> {
        let (&[batch, k, t], &[b_batch, b_t, n]) = (&a.shape[..], &b.shape[..]) else {
            return Ok(None);
        };
        if !a.transposed || b.transposed || batch != b_batch || t != b_t {
            return Ok(None);
        }
        let rows = batch * t;
        let out = self.alloc(vec![1, k, n]);
        // `lhsᵀ·rhs` over the `B·T` rows of two dense `[rows, ·]` buffers.
        let rows_product = |lhs: &DevTensor, l: usize, rhs: &DevTensor, r: usize| {
            let lhs_t = View {
                handle: lhs.handle.clone(),
                shape: vec![l, rows],
                strides: vec![1, l],
                offset: 0,
            };
            let rhs = View::contiguous(rhs.handle.clone(), &[rows, r]);
            let dst = View::contiguous(out.handle.clone(), &[l, r]);
            self.gemm(out.elem, &lhs_t, &rhs, &dst)
        };
        if self.transposed_sum {
            // `Σ dyᵀ·x` into `[N, K]`, returned as its `[1, K, N]` view.
            rows_product(b, n, a, k)?;
            return Ok(Some(DevTensor {
                layout: Some((vec![k * n, 1, k], 0)),
                ..out
            }));
        }
        rows_product(a, k, b, n)?;
        Ok(Some(out))
    }

    /// One (batched) GEMM: cuBLASLt when the executor has it and it reads
    /// these layouts, else cubek. All three are stored as `e`.
    fn gemm(&self, e: FloatElem, lhs: &View, rhs: &View, out: &View) -> Result<(), GpuError> {
        if let Some(vendor) = self.vendor {
            let done = vendor
                .matmul(self.client, e, lhs, rhs, out, self.fast_matmul, false)
                .map_err(|e| self.err(e.to_string()))?;
            if done {
                return Ok(());
            }
        }
        matmul::launch_matmul(self.client, e, lhs, rhs, out, self.fast_matmul)
            .map_err(|e| self.err(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::view_strides;

    #[test]
    fn views_reshape_without_a_copy_where_the_layout_allows() {
        // Dense: any reshape.
        assert_eq!(
            view_strides(&[2, 3, 4], &[12, 4, 1], &[6, 4]),
            Some(vec![4, 1])
        );
        assert_eq!(view_strides(&[2, 3, 4], &[12, 4, 1], &[24]), Some(vec![1]));
        // [B, kv, g, T, d] permuted to [B, T, kv, g, d], heads merged.
        assert_eq!(
            view_strides(&[2, 5, 3, 2, 4], &[120, 4, 40, 20, 1], &[2, 5, 6, 4]),
            Some(vec![120, 4, 20, 1])
        );
        // ... but T and the heads do not merge.
        assert_eq!(
            view_strides(&[2, 5, 3, 2, 4], &[120, 4, 40, 20, 1], &[2, 30, 4]),
            None
        );
        // Columns 0..16 of [2, 5, 32]: split into heads, rows merged.
        assert_eq!(
            view_strides(&[2, 5, 16], &[160, 32, 1], &[2, 5, 4, 4]),
            Some(vec![160, 32, 4, 1])
        );
        assert_eq!(
            view_strides(&[2, 5, 16], &[160, 32, 1], &[10, 16]),
            Some(vec![32, 1])
        );
        assert_eq!(view_strides(&[2, 5, 16], &[160, 32, 1], &[160]), None);
        // Size-1 axes come and go.
        assert_eq!(
            view_strides(&[3, 4], &[8, 1], &[3, 1, 4]),
            Some(vec![8, 4, 1])
        );
        assert_eq!(
            view_strides(&[3, 1, 4], &[8, 0, 1], &[3, 4]),
            Some(vec![8, 1])
        );
        // A transpose does not flatten, but its axes split.
        assert_eq!(view_strides(&[3, 4], &[1, 3], &[12]), None);
        assert_eq!(
            view_strides(&[3, 4], &[1, 3], &[3, 2, 2]),
            Some(vec![1, 6, 3])
        );
    }
}
