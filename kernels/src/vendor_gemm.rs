//! Vendor GEMMs: cuBLASLt on CUDA devices, for the matrix products that
//! cubek computes at about half of cuBLAS's speed in `f32` (measured on the
//! H100, BENCHMARKS.md). The issue's rule: where cubek is under 90% of
//! cuBLAS on the model's shapes, plain GEMMs go to cuBLASLt.
//!
//! cuBLASLt is loaded at run time (cudarc's dynamic loading, like NVRTC):
//! nothing from CUDA is needed to build, and a machine without
//! `libcublasLt.so` on the loader path runs every product through cubek.
//!
//! **Ordering with CubeCL's stream.** CubeCL 0.10 does not expose the CUDA
//! stream it launches on, so a cuBLASLt call cannot be enqueued on it, and
//! a CUDA event cannot be recorded there. The two streams are ordered
//! through device memory instead, with no host wait (a *handoff*): each
//! CubeCL stream has two 32-bit flags in a CubeCL buffer and a counter
//! `v`. For one product:
//!
//! ```text
//! CubeCL stream:  … producers … → signal (flags[0] = v) → spin until flags[1] ≥ v → consumers …
//! our stream:     wait until flags[0] ≥ v → cuBLASLt → flags[1] = v
//! ```
//!
//! Both waits are one-thread kernels polling the flag: CubeCL's is a
//! `#[cube]` kernel, ours is two hand-written PTX kernels (`HANDOFF_PTX`,
//! JIT-compiled by the driver once) launched on our stream. CUDA's stream
//! memory operations (`cuStreamWaitValue32`) would do our half without a
//! kernel, but the driver refuses them on CubeCL's buffers (memory-pool
//! allocations: `CUDA_ERROR_INVALID_VALUE` on the H100 here).
//!
//! The product starts once everything CubeCL queued before it is done, and
//! everything CubeCL queues after it (including kernels that reuse a
//! freed operand's memory) waits for it: the same order as one stream.
//! The spin kernel is one thread, so the product has the rest of the
//! device. The spin is launched only once the release write is queued, so
//! a failed product cannot leave it spinning. Comparisons are wrap-safe
//! (`(x − v) as i32 ≥ 0`), and each CubeCL stream has its own flags (CubeCL
//! gives each calling thread its own stream, and keeps it for the thread's
//! work even when that work runs on CubeCL's device thread), so concurrent
//! callers cannot satisfy each other's waits. `CARAMBA_VENDOR_SYNC=1`
//! restores the earlier protocol
//! (wait for the device on the host, run, wait for our stream), for
//! measurements: there the device idled while the host resolved buffers
//! and called cuBLASLt, 20–60 µs per small product on an H200
//! (`CARAMBA_VENDOR_TRACE=1` prints each call's phases to stderr). Decode
//! steps use the matrix-vector kernel (`gemv.rs`) and never come here.
//!
//! **Layouts.** Operands are row-major or column-major matrices (a view
//! whose row stride or column stride is 1), with batch axes that merge into
//! one strided batch; other batch axes are looped over on the host. A view
//! that is neither (a general strided window) is declined, and the caller
//! falls back to cubek. The row-major product `D = A·B` is computed as the
//! column-major `Dᵀ = Bᵀ·Aᵀ`, so no operand is copied.

use crate::{FloatElem, KernelError, View};
use cubecl::prelude::*;
use std::sync::Arc;

/// A vendor GEMM library bound to one device.
pub struct VendorGemm {
    #[cfg(feature = "cuda")]
    lt: cuda::Lt,
}

impl VendorGemm {
    /// cuBLASLt for `device` when it is a CUDA device and the library
    /// loads; `None` otherwise (wgpu devices; no `libcublasLt` found). One
    /// per device, shared (its handle, stream and workspace are made once).
    /// Call after the device's CubeCL client exists (it initializes CUDA).
    pub fn for_device<R: Runtime>(device: &R::Device) -> Option<Arc<VendorGemm>> {
        #[cfg(feature = "cuda")]
        {
            use std::collections::HashMap;
            use std::sync::{Mutex, OnceLock};
            type Registry = Mutex<HashMap<usize, Option<Arc<VendorGemm>>>>;
            static DEVICES: OnceLock<Registry> = OnceLock::new();
            let any: &dyn std::any::Any = device;
            let index = any.downcast_ref::<cubecl::cuda::CudaDevice>()?.index;
            let mut devices = DEVICES
                .get_or_init(Default::default)
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            devices
                .entry(index)
                .or_insert_with(|| cuda::Lt::new(index).map(|lt| Arc::new(VendorGemm { lt })))
                .clone()
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = device;
            None
        }
    }

    /// The library's name, for logs and benchmark tables.
    pub fn name(&self) -> &'static str {
        "cuBLASLt"
    }

    /// `out = lhs @ rhs` for views of equal rank ≥ 2 (batch axes as
    /// `matmul::launch_matmul` takes them), all three stored as `elem`;
    /// `out` dense. Products accumulate in f32 (`CUBLAS_COMPUTE_32F`);
    /// `tf32` lets an f32 product use TF32 tensor cores. Returns `Ok(false)` without doing
    /// anything when the operands' layout is not one this library reads;
    /// the caller then uses cubek. With `accumulate`, `out += lhs @ rhs`
    /// (cuBLASLt's `β = 1`: the sum formed in f32 and rounded once to
    /// `elem`).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul<R: Runtime>(
        &self,
        client: &ComputeClient<R>,
        elem: FloatElem,
        lhs: &View,
        rhs: &View,
        out: &View,
        tf32: bool,
        accumulate: bool,
    ) -> Result<bool, KernelError> {
        let Some(plan) = Plan::new(lhs.into(), rhs.into(), out.into()) else {
            return Ok(false);
        };
        #[cfg(feature = "cuda")]
        {
            let any: &dyn std::any::Any = client;
            let Some(client) = any.downcast_ref::<ComputeClient<cubecl::cuda::CudaRuntime>>()
            else {
                return Ok(false);
            };
            let beta = if accumulate { 1.0 } else { 0.0 };
            self.lt
                .run(client, elem, &plan, lhs, rhs, out, tf32, beta)?;
            Ok(true)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (client, elem, plan, tf32, accumulate);
            Ok(false)
        }
    }
}

/// One operand matrix as cuBLAS reads it: `rows × cols` column-major with
/// leading dimension `ld`, used transposed or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Mat {
    rows: usize,
    cols: usize,
    ld: usize,
    trans: bool,
}

/// A product as column-major cuBLAS calls: `Dᵀ[n×m] = op(a)·op(b)` with
/// `a` from `rhs` and `b` from `lhs`, `batch` products `stride_*` apart,
/// repeated at each of `outer`'s element offsets `(lhs, rhs, out)`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Plan {
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    batch: usize,
    stride_a: usize,
    stride_b: usize,
    stride_d: usize,
    outer: Vec<(usize, usize, usize)>,
}

/// What a plan reads of a view: its geometry, not its buffer.
#[derive(Clone, Copy, Debug)]
struct Geom<'a> {
    shape: &'a [usize],
    strides: &'a [usize],
    offset: usize,
}

impl<'a> From<&'a View> for Geom<'a> {
    fn from(v: &'a View) -> Geom<'a> {
        Geom {
            shape: &v.shape,
            strides: &v.strides,
            offset: v.offset,
        }
    }
}

/// A `rows × cols` view's storage: row-major (`Some((true, ld))`, column
/// stride 1) or column-major (`Some((false, ld))`, row stride 1). Size-1
/// axes take whatever stride makes the view one of the two.
fn storage(rows: usize, cols: usize, sr: usize, sc: usize) -> Option<(bool, usize)> {
    if sc == 1 || cols == 1 {
        let ld = if rows == 1 { cols } else { sr };
        if ld >= cols.max(1) {
            return Some((true, ld));
        }
    }
    if sr == 1 || rows == 1 {
        let ld = if cols == 1 { rows } else { sc };
        if ld >= rows.max(1) {
            return Some((false, ld));
        }
    }
    None
}

impl Plan {
    fn new(lhs: Geom, rhs: Geom, out: Geom) -> Option<Plan> {
        let r = out.shape.len();
        if r < 2 || lhs.shape.len() != r || rhs.shape.len() != r || out.shape.contains(&0) {
            return None;
        }
        let (m, n, k) = (out.shape[r - 2], out.shape[r - 1], lhs.shape[r - 1]);
        if k == 0 || [m, n, k].iter().any(|&d| d > i32::MAX as usize) {
            return None;
        }
        let (l_row, l_ld) = storage(m, k, lhs.strides[r - 2], lhs.strides[r - 1])?;
        let (r_row, r_ld) = storage(k, n, rhs.strides[r - 2], rhs.strides[r - 1])?;
        // Bᵀ [n×k]: a row-major rhs is that matrix column-major.
        let a = if r_row {
            Mat {
                rows: n,
                cols: k,
                ld: r_ld,
                trans: false,
            }
        } else {
            Mat {
                rows: k,
                cols: n,
                ld: r_ld,
                trans: true,
            }
        };
        // Aᵀ [k×m]: a row-major lhs is that matrix column-major.
        let b = if l_row {
            Mat {
                rows: k,
                cols: m,
                ld: l_ld,
                trans: false,
            }
        } else {
            Mat {
                rows: m,
                cols: k,
                ld: l_ld,
                trans: true,
            }
        };
        // Batch axes (size > 1) with each operand's stride (a size-1
        // operand axis broadcasts: stride 0), merged where contiguous.
        let mut axes: Vec<[usize; 4]> = Vec::new();
        for i in 0..r - 2 {
            let size = out.shape[i];
            if size == 1 {
                continue;
            }
            let st = |v: Geom| if v.shape[i] == 1 { 0 } else { v.strides[i] };
            let axis = [size, st(lhs), st(rhs), out.strides[i]];
            if let Some(last) = axes.last_mut() {
                let merges = (1..4).all(|j| last[j] == axis[j] * size);
                if merges {
                    *last = [last[0] * size, axis[1], axis[2], axis[3]];
                    continue;
                }
            }
            axes.push(axis);
        }
        // The innermost batch axis goes to cuBLAS when it broadcasts
        // nothing; the rest are host loops.
        let inner = match axes.last() {
            Some(&[size, sl, sr, sd]) if sl != 0 && sr != 0 => {
                axes.pop();
                (size, sr, sl, sd)
            }
            _ => (1, 0, 0, 0),
        };
        let mut outer = vec![(lhs.offset, rhs.offset, out.offset)];
        for &[size, sl, sr, sd] in &axes {
            outer = outer
                .iter()
                .flat_map(|&(l, rr, d)| {
                    (0..size).map(move |i| (l + i * sl, rr + i * sr, d + i * sd))
                })
                .collect();
        }
        Some(Plan {
            m,
            n,
            k,
            a,
            b,
            batch: inner.0,
            stride_a: inner.1,
            stride_b: inner.2,
            stride_d: inner.3,
            outer,
        })
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{Mat, Plan};
    use crate::{FloatElem, KernelError, View};
    use cubecl::cuda::CudaRuntime;
    use cubecl::prelude::*;
    use cudarc::cublaslt::{result as lt, sys};
    use cudarc::driver::{result as drv, sys as dsys};
    use std::collections::HashMap;
    use std::ffi::c_void;
    use std::sync::Mutex;

    /// cuBLASLt's workspace: 32 MiB, what NVIDIA suggests for Hopper.
    const WORKSPACE: usize = 32 << 20;

    /// What selects a cached descriptor set and algorithm.
    #[derive(Clone, Copy, PartialEq, Eq, Hash)]
    struct Key {
        a: Mat,
        b: Mat,
        m: usize,
        n: usize,
        batch: usize,
        strides: (usize, usize, usize),
        tf32: bool,
        elem: FloatElem,
        /// Bytes every operand pointer is a multiple of (at most 256), for
        /// the heuristic: offset views (host-looped batches) may be less
        /// aligned than a fresh buffer.
        align: u32,
    }

    /// Descriptors and the heuristic's algorithm for one `Key`, made once.
    struct Prepared {
        desc: sys::cublasLtMatmulDesc_t,
        la: sys::cublasLtMatrixLayout_t,
        lb: sys::cublasLtMatrixLayout_t,
        ld: sys::cublasLtMatrixLayout_t,
        algo: sys::cublasLtMatmulAlgo_t,
    }

    struct State {
        ctx: dsys::CUcontext,
        handle: sys::cublasLtHandle_t,
        stream: dsys::CUstream,
        workspace: dsys::CUdeviceptr,
        prepared: HashMap<Key, Prepared>,
        /// Each CubeCL stream's handoff flags (module documentation).
        flags: HashMap<cubecl::stream_id::StreamId, Flags>,
        /// Our stream's half of the handoff: the `wait` and `release`
        /// kernels of `HANDOFF_PTX` (`None`: the module did not load, and
        /// every product waits on the host).
        handoff: Option<(dsys::CUfunction, dsys::CUfunction)>,
    }

    /// Our stream's half of the handoff (module documentation): `wait`
    /// polls `*flag` until it reaches `v` (wrap-safe), `release` stores
    /// `v`. One thread each; volatile accesses go to L2, where CubeCL's
    /// atomic signal lands.
    const HANDOFF_PTX: &str = "
.version 7.0
.target sm_70
.address_size 64

.visible .entry caramba_wait(.param .u64 flag, .param .u32 v)
{
    .reg .u64 %rd<2>;
    .reg .u32 %r<3>;
    .reg .pred %p;
    ld.param.u64 %rd0, [flag];
    ld.param.u32 %r0, [v];
    cvta.to.global.u64 %rd1, %rd0;
POLL:
    ld.volatile.global.u32 %r1, [%rd1];
    sub.u32 %r2, %r1, %r0;
    setp.lt.s32 %p, %r2, 0;
    @%p bra POLL;
    ret;
}

.visible .entry caramba_release(.param .u64 flag, .param .u32 v)
{
    .reg .u64 %rd<2>;
    .reg .u32 %r<1>;
    ld.param.u64 %rd0, [flag];
    ld.param.u32 %r0, [v];
    cvta.to.global.u64 %rd1, %rd0;
    st.volatile.global.u32 [%rd1], %r0;
    ret;
}
";

    /// Loads `HANDOFF_PTX` into the current context.
    fn load_handoff() -> Option<(dsys::CUfunction, dsys::CUfunction)> {
        let src = std::ffi::CString::new(HANDOFF_PTX).ok()?;
        // SAFETY: a NUL-terminated PTX image; the module lives as long as
        // the process (the context's teardown frees it).
        let module = unsafe { drv::module::load_data(src.as_ptr() as *const c_void) }.ok()?;
        let f = |name: &str| unsafe {
            drv::module::get_function(module, std::ffi::CString::new(name).ok()?).ok()
        };
        Some((f("caramba_wait")?, f("caramba_release")?))
    }

    /// Launches one of the handoff kernels on `stream` for `flag` and `v`.
    fn launch_flag(
        f: dsys::CUfunction,
        stream: dsys::CUstream,
        flag: dsys::CUdeviceptr,
        v: u32,
    ) -> Result<(), cudarc::driver::DriverError> {
        let (mut flag, mut v) = (flag, v);
        let mut params = [
            &mut flag as *mut dsys::CUdeviceptr as *mut c_void,
            &mut v as *mut u32 as *mut c_void,
        ];
        // SAFETY: `f` takes (u64, u32), which `params` points to.
        unsafe { drv::launch_kernel(f, (1, 1, 1), (1, 1, 1), 0, stream, &mut params) }
    }

    /// One stream's handoff: `[signal, release]` as a CubeCL buffer (kept
    /// alive here, so its address stays put), that address, and the last
    /// value used.
    struct Flags {
        buffer: cubecl::server::Handle,
        ptr: dsys::CUdeviceptr,
        counter: u32,
    }

    impl Flags {
        /// A stream's zeroed flags, with both of CubeCL's handoff kernels
        /// compiled and loaded now, while nothing waits on the device (a
        /// module load may wait for it).
        fn new(client: &ComputeClient<CudaRuntime>) -> Result<Flags, KernelError> {
            let buffer = client.create_from_slice(u32::as_bytes(&[0, 0]));
            let ptr = client
                .get_resource(buffer.clone())
                .map_err(|e| err("flags", e))?
                .resource()
                .ptr;
            let (grid, dim) = (CubeCount::Static(1, 1, 1), CubeDim::new_1d(1));
            let arg = || unsafe { ArrayArg::from_raw_parts(buffer.clone(), 2) };
            unsafe {
                signal_kernel::launch_unchecked::<CudaRuntime>(client, grid.clone(), dim, arg(), 0);
                spin_kernel::launch_unchecked::<CudaRuntime>(client, grid, dim, arg(), 0);
            }
            cubecl::future::block_on(client.sync()).map_err(|e| err("wait", e))?;
            Ok(Flags {
                buffer,
                ptr,
                counter: 0,
            })
        }
    }

    /// `flags[0] = v`: everything queued before it on CubeCL's stream is done.
    #[cube(launch_unchecked)]
    fn signal_kernel(flags: &mut Array<Atomic<u32>>, v: u32) {
        flags[0].store(v);
    }

    /// Holds CubeCL's stream until `flags[1]` reaches `v` (wrap-safe).
    #[cube(launch_unchecked)]
    fn spin_kernel(flags: &mut Array<Atomic<u32>>, v: u32) {
        loop {
            let x = flags[1].load();
            if i32::cast_from(x - v) >= 0 {
                break;
            }
        }
    }

    /// Whether `CARAMBA_VENDOR_FLUSH=1` asks for a CubeCL flush (and its
    /// fence wait) after each product's signal.
    fn flush_per_product() -> bool {
        static FLUSH: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *FLUSH.get_or_init(|| std::env::var("CARAMBA_VENDOR_FLUSH").is_ok_and(|v| v == "1"))
    }

    /// Whether `CARAMBA_VENDOR_SYNC=1` asks for the host-waiting protocol.
    fn host_sync() -> bool {
        static SYNC: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *SYNC.get_or_init(|| std::env::var("CARAMBA_VENDOR_SYNC").is_ok_and(|v| v == "1"))
    }

    /// cuBLASLt bound to one device: handle, stream, workspace, and the
    /// prepared products. One mutex serializes its calls.
    pub(super) struct Lt(Mutex<State>);

    // SAFETY: the raw CUDA handles are used only under the mutex, with the
    // device's context made current on the calling thread first.
    unsafe impl Send for Lt {}
    unsafe impl Sync for Lt {}

    fn err(what: &str, e: impl std::fmt::Debug) -> KernelError {
        KernelError::Matmul(format!("cuBLASLt {what}: {e:?}"))
    }

    impl Lt {
        pub(super) fn new(index: usize) -> Option<Lt> {
            // SAFETY: a presence probe; loading has no other effect.
            if !unsafe { sys::is_culib_present() } {
                return None;
            }
            drv::init().ok()?;
            let device = drv::device::get(index as i32).ok()?;
            // SAFETY: `device` is valid; the primary context is the one
            // CubeCL retained for it, and stays retained for our lifetime.
            let ctx = unsafe { drv::primary_ctx::retain(device) }.ok()?;
            unsafe { drv::ctx::set_current(ctx) }.ok()?;
            let handle = lt::create_handle().ok()?;
            let stream = drv::stream::create(drv::stream::StreamKind::NonBlocking).ok()?;
            let workspace = unsafe { drv::malloc_sync(WORKSPACE) }.ok()?;
            Some(Lt(Mutex::new(State {
                ctx,
                handle,
                stream,
                workspace,
                prepared: HashMap::new(),
                flags: HashMap::new(),
                handoff: load_handoff(),
            })))
        }

        #[allow(clippy::too_many_arguments)]
        pub(super) fn run(
            &self,
            client: &ComputeClient<CudaRuntime>,
            elem: FloatElem,
            plan: &Plan,
            lhs: &View,
            rhs: &View,
            out: &View,
            tf32: bool,
            beta: f32,
        ) -> Result<(), KernelError> {
            // Resolve the buffers first (this may allocate them on
            // CubeCL's stream), then wait for everything queued there.
            let res = |v: &View| {
                client
                    .get_resource(v.handle.clone())
                    .map_err(|e| err("buffer", e))
            };
            static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            let trace = *TRACE.get_or_init(|| std::env::var_os("CARAMBA_VENDOR_TRACE").is_some());
            let sync = host_sync();
            let t0 = std::time::Instant::now();
            let (rl, rr, ro) = (res(lhs)?, res(rhs)?, res(out)?);
            let t1 = t0.elapsed();
            if sync {
                cubecl::future::block_on(client.sync()).map_err(|e| err("wait", e))?;
            }
            let t2 = t0.elapsed();
            let mut st = self.0.lock().unwrap_or_else(|p| p.into_inner());
            unsafe { drv::ctx::set_current(st.ctx) }.map_err(|e| err("context", e))?;
            let key = Key {
                a: plan.a,
                b: plan.b,
                m: plan.m,
                n: plan.n,
                batch: plan.batch,
                strides: (plan.stride_a, plan.stride_b, plan.stride_d),
                tf32: tf32 && elem == FloatElem::F32,
                elem,
                align: plan
                    .outer
                    .iter()
                    .flat_map(|&(l, r, d)| [l, r, d])
                    .fold(256u32, |a, off| {
                        let bytes = (off * elem.size()) as u32;
                        if bytes == 0 {
                            a
                        } else {
                            a.min(1 << bytes.trailing_zeros().min(8))
                        }
                    }),
            };
            if !st.prepared.contains_key(&key) {
                let p = prepare(st.handle, &key, plan.k)?;
                st.prepared.insert(key, p);
            }
            // The handoff's first half: our stream waits for CubeCL's.
            let handoff = if sync || st.handoff.is_none() {
                if !sync {
                    // No handoff kernels (the module did not load): wait on
                    // the host, as `CARAMBA_VENDOR_SYNC=1` does.
                    cubecl::future::block_on(client.sync()).map_err(|e| err("wait", e))?;
                }
                None
            } else {
                let stream = cubecl::stream_id::StreamId::current();
                let f = match st.flags.entry(stream) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => e.insert(Flags::new(client)?),
                };
                f.counter = f.counter.wrapping_add(1);
                let (v, ptr, buffer) = (f.counter, f.ptr, f.buffer.clone());
                let lookup = buffer.clone();
                let arg = move || unsafe { ArrayArg::from_raw_parts(buffer.clone(), 2) };
                unsafe {
                    signal_kernel::launch_unchecked::<CudaRuntime>(
                        client,
                        CubeCount::Static(1, 1, 1),
                        CubeDim::new_1d(1),
                        arg(),
                        v,
                    )
                };
                // The signal must be issued to CubeCL's stream before our
                // stream waits for it, or anything in CubeCL that waits for
                // the whole device (a module load, a synchronous free)
                // would wait for our waiting kernel, which would wait for a
                // signal still queued on the host. A caller that is not
                // CubeCL's device thread queued the launch on its channel:
                // one blocking round trip there (a buffer lookup) has it
                // issued; on the device thread (`ComputeClient::exclusive`)
                // the launch was issued inline. `client.flush()` did this
                // too, but it also waits for the device to reach the fence
                // of the flush before: a host wait per product that kept
                // the host from running more than one product ahead of the
                // device (BENCHMARKS, sixteenth session).
                // `CARAMBA_VENDOR_FLUSH=1` restores it, for A/B runs.
                if flush_per_product() {
                    client.flush().map_err(|e| err("flush", e))?;
                } else {
                    client.get_resource(lookup).map_err(|e| err("flush", e))?;
                }
                let (wait, _) = st.handoff.expect("checked above");
                launch_flag(wait, st.stream, ptr, v).map_err(|e| err("stream wait", e))?;
                Some((v, ptr, arg))
            };
            let p = &st.prepared[&key];
            let alpha = 1.0f32;
            let size = elem.size() as u64;
            let at = |base: u64, off: usize| (base + size * off as u64) as *mut c_void;
            let mut called = Ok(());
            for &(ol, or, od) in &plan.outer {
                let (b, a, d) = (
                    at(rl.resource().ptr, ol),
                    at(rr.resource().ptr, or),
                    at(ro.resource().ptr, od),
                );
                // SAFETY: the pointers are live device buffers (their
                // managed resources are held until this returns, and with
                // the handoff CubeCL reuses none of them before the
                // product is done) of the sizes the layouts describe; the
                // descriptors are valid.
                called = unsafe {
                    lt::matmul(
                        st.handle,
                        p.desc,
                        &alpha as *const f32 as *const c_void,
                        &beta as *const f32 as *const c_void,
                        a,
                        p.la,
                        b,
                        p.lb,
                        d,
                        p.ld,
                        d,
                        p.ld,
                        &p.algo,
                        st.workspace as *mut c_void,
                        WORKSPACE,
                        st.stream as _,
                    )
                }
                .map_err(|e| err("matmul", e));
                if called.is_err() {
                    break;
                }
            }
            let t3 = t0.elapsed();
            let waited = handoff.is_none();
            match handoff {
                // The second half: released even when a call failed, and
                // CubeCL's stream held only once the release is queued.
                Some((v, ptr, arg)) => {
                    let (_, release) = st.handoff.expect("checked above");
                    let released = launch_flag(release, st.stream, ptr + 4, v);
                    match released {
                        Ok(()) => unsafe {
                            spin_kernel::launch_unchecked::<CudaRuntime>(
                                client,
                                CubeCount::Static(1, 1, 1),
                                CubeDim::new_1d(1),
                                arg(),
                                v,
                            )
                        },
                        Err(e) => {
                            // Nothing holds CubeCL's stream: order by waiting.
                            let _ = unsafe { drv::stream::synchronize(st.stream) };
                            return Err(err("stream release", e));
                        }
                    }
                }
                None => {
                    unsafe { drv::stream::synchronize(st.stream) }.map_err(|e| err("wait", e))?
                }
            }
            called?;
            let t4 = t0.elapsed();
            drop((rl, rr, ro));
            if trace {
                eprintln!(
                    "vendor {}x{}x{} b{}: resources {:?} sync {:?} call {:?} {} {:?}",
                    plan.m,
                    plan.n,
                    plan.k,
                    plan.batch,
                    t1,
                    t2 - t1,
                    t3 - t2,
                    if waited { "wait" } else { "release" },
                    t4 - t3
                );
            }
            Ok(())
        }
    }

    /// cuBLAS's name of a storage type.
    fn data_type(elem: FloatElem) -> sys::cudaDataType {
        match elem {
            FloatElem::F32 => sys::cudaDataType::CUDA_R_32F,
            FloatElem::F16 => sys::cudaDataType::CUDA_R_16F,
            FloatElem::BF16 => sys::cudaDataType::CUDA_R_16BF,
        }
    }

    fn layout(
        elem: FloatElem,
        rows: usize,
        cols: usize,
        ld: usize,
        batch: usize,
        stride: usize,
    ) -> Result<sys::cublasLtMatrixLayout_t, KernelError> {
        let l = lt::create_matrix_layout(data_type(elem), rows as u64, cols as u64, ld as i64)
            .map_err(|e| err("layout", e))?;
        if batch > 1 {
            let count = batch as i32;
            let offset = stride as i64;
            // SAFETY: `l` is a valid layout; the buffers are the attribute
            // types cuBLASLt documents (int32 count, int64 offset).
            unsafe {
                lt::set_matrix_layout_attribute(
                    l,
                    sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                    &count as *const i32 as *const c_void,
                    4,
                )
                .and_then(|()| {
                    lt::set_matrix_layout_attribute(
                        l,
                        sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                        &offset as *const i64 as *const c_void,
                        8,
                    )
                })
            }
            .map_err(|e| err("layout", e))?;
        }
        Ok(l)
    }

    fn prepare(
        handle: sys::cublasLtHandle_t,
        key: &Key,
        k: usize,
    ) -> Result<Prepared, KernelError> {
        let compute = if key.tf32 {
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        let desc = lt::create_matmul_desc(compute, sys::cudaDataType::CUDA_R_32F)
            .map_err(|e| err("descriptor", e))?;
        // `cublasOperation_t` (an int32): CUBLAS_OP_N = 0, CUBLAS_OP_T = 1.
        let op = |t: bool| -> i32 { i32::from(t) };
        for (attr, t) in [
            (
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                key.a.trans,
            ),
            (
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                key.b.trans,
            ),
        ] {
            let v = op(t);
            // SAFETY: a valid descriptor and a cublasOperation_t value.
            unsafe {
                lt::set_matmul_desc_attribute(desc, attr, &v as *const i32 as *const c_void, 4)
            }
            .map_err(|e| err("descriptor", e))?;
        }
        let (sa, sb, sd) = key.strides;
        let e = key.elem;
        let la = layout(e, key.a.rows, key.a.cols, key.a.ld, key.batch, sa)?;
        let lb = layout(e, key.b.rows, key.b.cols, key.b.ld, key.batch, sb)?;
        let ld = layout(e, key.n, key.m, key.n, key.batch, sd)?;
        let pref = lt::create_matmul_pref().map_err(|e| err("preference", e))?;
        let ws = super::cuda::WORKSPACE as u64;
        let align = key.align;
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        // SAFETY: valid preference handle; the attributes are a uint64 and
        // uint32s, as cuBLASLt documents them.
        let heuristic = unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                8,
            )
            .and_then(|()| {
                [
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                ]
                .into_iter()
                .try_for_each(|attr| {
                    lt::set_matmul_pref_attribute(
                        pref,
                        attr,
                        &align as *const u32 as *const c_void,
                        4,
                    )
                })
            })
            .and_then(|()| lt::get_matmul_algo_heuristic(handle, desc, la, lb, ld, ld, pref))
        };
        unsafe {
            let _ = lt::destroy_matmul_pref(pref);
        }
        let heuristic = heuristic.map_err(|e| {
            err(
                &format!(
                    "no algorithm for {}×{}×{k} (batch {})",
                    key.m, key.n, key.batch
                ),
                e,
            )
        })?;
        Ok(Prepared {
            desc,
            la,
            lb,
            ld,
            algo: heuristic.algo,
        })
    }

    impl Drop for Lt {
        fn drop(&mut self) {
            let st = self.0.get_mut().unwrap_or_else(|p| p.into_inner());
            // SAFETY: every handle below was created by this struct and is
            // destroyed once, with the context current.
            unsafe {
                let _ = drv::ctx::set_current(st.ctx);
                for (_, p) in st.prepared.drain() {
                    let _ = lt::destroy_matmul_desc(p.desc);
                    for l in [p.la, p.lb, p.ld] {
                        let _ = lt::destroy_matrix_layout(l);
                    }
                }
                let _ = drv::free_sync(st.workspace);
                let _ = drv::stream::destroy(st.stream);
                let _ = lt::destroy_handle(st.handle);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(shape: &'a [usize], strides: &'a [usize], offset: usize) -> Geom<'a> {
        Geom {
            shape,
            strides,
            offset,
        }
    }

    #[test]
    fn plans_row_and_column_major_operands_without_copies() {
        // x [6, 4] @ Wᵀ where W is [5, 4] row-major: rhs strides (1, 4).
        let p = Plan::new(
            view(&[6, 4], &[4, 1], 0),
            view(&[4, 5], &[1, 4], 0),
            view(&[6, 5], &[5, 1], 0),
        )
        .unwrap();
        assert_eq!((p.m, p.n, p.k, p.batch), (6, 5, 4, 1));
        assert_eq!(
            p.a,
            Mat {
                rows: 4,
                cols: 5,
                ld: 4,
                trans: true
            }
        );
        assert_eq!(
            p.b,
            Mat {
                rows: 4,
                cols: 6,
                ld: 4,
                trans: false
            }
        );
        assert_eq!(p.outer, vec![(0, 0, 0)]);
    }

    #[test]
    fn merges_contiguous_batch_axes_and_loops_over_broadcast_ones() {
        // q [2, 3, 4, 8] @ kᵀ [2, 3, 8, 4]: two batch axes merge into 6.
        let p = Plan::new(
            view(&[2, 3, 4, 8], &[96, 32, 8, 1], 0),
            view(&[2, 3, 8, 4], &[96, 32, 1, 8], 0),
            view(&[2, 3, 4, 4], &[48, 16, 4, 1], 0),
        )
        .unwrap();
        assert_eq!(
            (p.batch, p.stride_a, p.stride_b, p.stride_d),
            (6, 32, 32, 16)
        );
        assert_eq!(p.outer.len(), 1);
        // GQA: rhs [2, 1, 8, 4] broadcast over 3 groups: the group axis
        // cannot be a cuBLAS batch (stride 0), so the host loops over 2·3.
        let p = Plan::new(
            view(&[2, 3, 4, 8], &[96, 32, 8, 1], 0),
            view(&[2, 1, 8, 4], &[32, 32, 4, 1], 0),
            view(&[2, 3, 4, 4], &[48, 16, 4, 1], 0),
        )
        .unwrap();
        assert_eq!(p.batch, 1);
        assert_eq!(p.outer.len(), 6);
        assert_eq!(p.outer[4], (96 + 32, 32, 48 + 16));
    }

    #[test]
    fn declines_general_strided_views() {
        assert!(Plan::new(
            view(&[4, 4], &[8, 2], 0),
            view(&[4, 4], &[4, 1], 0),
            view(&[4, 4], &[4, 1], 0),
        )
        .is_none());
    }
}
