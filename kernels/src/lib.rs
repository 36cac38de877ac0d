//! caramba's GPU kernels, written in CubeCL (`#[cube]`), one file per kernel
//! family. Each file holds the `#[cube]` kernel and a host-side `launch_*`
//! function that takes device handles, shapes and strides; the runtime's
//! `GpuExecutor` maps IR ops onto these launches. The conformance tests
//! (every op against the reference interpreter, on every backend) live in
//! `runtime/tests/gpu_suite.rs`. Only `kernels` and `runtime` depend on
//! CubeCL.
//!
//! Conventions: a float tensor is stored on the device as `f32`, `f16` or
//! `bf16` ([`FloatElem`], chosen per launch: every public `launch_*` that
//! takes float data has an `elem` argument naming the storage of its float
//! tensors) and computed in `f32` whatever its storage: kernels widen each
//! element as they load it, keep accumulators, shared memory, running
//! statistics and scalars (`eps`, `scale`) in `f32`, and round once, to
//! nearest even, as they store. With `f32` storage the widening and
//! rounding are no-ops, so the generated code is what it was before narrow
//! storage (kernels call their storage type parameter `F`, as when it was
//! the compute type, so even the generated kernels' names are unchanged). Pure data movement (strided copy, gather, fill) moves the
//! stored elements as they are. A device that cannot hold a narrow type
//! (`FloatElem::supported`) may keep such a tensor widened to `f32`, its
//! values rounded to the narrow grid (`cast::launch_round`), as the
//! reference interpreter does. Attention's row statistics (the
//! log-sum-exp its forward writes, with the output beside it, and the
//! backward's lse and delta) are `f32` whatever `elem` is, as the IR types
//! them. Optimizer state and master weights (`optim`) are `f32` only;
//! cuBLASLt's GEMMs (`vendor_gemm`) take `f32`, `f16` and `bf16` operands and
//! accumulate in `f32`. Integer tensors are `i32`. Buffers are dense and
//! row-major; a view (`View`)
//! adds strides and an element offset so that permute, slice, broadcast and
//! concat are strided copies.

pub mod attention;
pub mod attention_backward;
pub mod attention_tc;
pub mod cast;
pub mod copy;
pub mod elementwise;
pub mod gather;
pub mod gemv;
pub mod kv_attention;
pub mod kv_decode_mma;
pub mod matmul;
pub mod norm;
pub mod optim;
pub mod quant;
pub mod reduce;
pub mod rms_norm;
pub mod rope;
pub mod row_dot;
pub mod vendor_gemm;

pub use cubecl;
pub use half;

use cubecl::prelude::*;
use cubecl::server::Handle;

/// How a float tensor is stored on the device. Kernels read and write the
/// storage type and compute in `f32` whatever it is (accumulators, shared
/// memory and registers are `f32`); a narrow store rounds to nearest, ties
/// to even, as a cast does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FloatElem {
    F32,
    F16,
    BF16,
}

impl FloatElem {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            FloatElem::F32 => 4,
            FloatElem::F16 | FloatElem::BF16 => 2,
        }
    }

    /// Whether `client`'s device can hold buffers of this type and convert
    /// it to and from `f32` in kernels.
    pub fn supported<R: Runtime>(self, client: &ComputeClient<R>) -> bool {
        let ty = match self {
            FloatElem::F32 => return true,
            FloatElem::F16 => half::f16::as_type_native_unchecked(),
            FloatElem::BF16 => half::bf16::as_type_native_unchecked(),
        };
        client.properties().supports_type(ty)
    }
}

/// The storage of a tensor on the device, as far as a conversion cares: a
/// float type or `i32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Storage {
    Float(FloatElem),
    I32,
}

/// Runs `$body` with the type alias `$E` naming `$elem`'s storage type
/// (`f32`, `half::f16` or `half::bf16`): the one place a launch chooses its
/// kernel's instantiation.
#[macro_export]
macro_rules! with_float {
    ($elem:expr, $E:ident => $body:expr) => {
        match $elem {
            $crate::FloatElem::F32 => {
                type $E = f32;
                $body
            }
            $crate::FloatElem::F16 => {
                type $E = $crate::half::f16;
                $body
            }
            $crate::FloatElem::BF16 => {
                type $E = $crate::half::bf16;
                $body
            }
        }
    };
}

/// Threads per cube for the row kernels (reduce, softmax, norms, attention).
pub const ROW_BLOCK: u32 = 128;
/// Threads per cube for the one-thread-per-element kernels.
pub const ELEM_BLOCK: u32 = 256;

/// A strided window onto a device buffer: `shape`, `strides` and a starting
/// `offset`, all in elements.
#[derive(Clone, Debug)]
pub struct View {
    pub handle: Handle,
    pub shape: Vec<usize>,
    pub strides: Vec<usize>,
    pub offset: usize,
}

impl View {
    /// A dense row-major view of a whole buffer.
    pub fn contiguous(handle: Handle, shape: &[usize]) -> View {
        View {
            handle,
            strides: contiguous_strides(shape),
            shape: shape.to_vec(),
            offset: 0,
        }
    }

    /// This view broadcast (NumPy rules, aligned from the last axis) to
    /// `out`: missing and size-1 axes get stride 0.
    pub fn broadcast_to(&self, out: &[usize]) -> View {
        let r = out.len();
        let k = self.shape.len();
        let mut strides = vec![0; r];
        for (i, s) in strides.iter_mut().enumerate() {
            if let Some(j) = (i + k).checked_sub(r) {
                if self.shape[j] != 1 || out[i] == 1 {
                    *s = self.strides[j];
                }
            }
        }
        View {
            handle: self.handle.clone(),
            shape: out.to_vec(),
            strides,
            offset: self.offset,
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the view reads as vectors of `nv` elements: its last axis
    /// contiguous, its offset and other strides multiples of `nv`.
    pub fn aligned_to(&self, nv: usize) -> bool {
        let r = self.shape.len();
        r > 0
            && self.strides[r - 1] == 1
            && self.offset.is_multiple_of(nv)
            && self.strides[..r - 1].iter().all(|s| s.is_multiple_of(nv))
    }

    pub fn is_contiguous(&self) -> bool {
        self.offset == 0 && self.strides == contiguous_strides(&self.shape)
    }

    /// The view as a kernel tensor argument (rank ≥ 1: a scalar is `[1]`).
    ///
    /// # Safety
    ///
    /// The strides and shape must stay inside the buffer.
    pub(crate) unsafe fn arg<R: Runtime>(&self) -> TensorArg<R> {
        let (shape, strides) = if self.shape.is_empty() {
            (vec![1], vec![1])
        } else {
            (self.shape.clone(), self.strides.clone())
        };
        unsafe { TensorArg::from_raw_parts(self.handle.clone(), strides.into(), shape.into()) }
    }

    /// Elements from the start of the buffer to one past the view's last
    /// element (0 for an empty view).
    pub fn extent(&self) -> usize {
        if self.numel() == 0 {
            return 0;
        }
        let last: usize = self
            .shape
            .iter()
            .zip(&self.strides)
            .map(|(n, s)| (n - 1) * s)
            .sum();
        self.offset + last + 1
    }

    /// The view's buffer as a kernel array, to be indexed through its
    /// shape and strides passed as scalars ([`scalars`]).
    ///
    /// # Safety
    ///
    /// The strides and shape must stay inside the buffer.
    pub(crate) unsafe fn array<R: Runtime>(&self) -> ArrayArg<R> {
        unsafe { ArrayArg::from_raw_parts(self.handle.clone(), self.extent().max(1)) }
    }
}

/// `values` (shapes, strides) as a kernel's scalar arguments.
///
/// A `Tensor` argument's shape and strides are launch metadata that CubeCL
/// uploads to the device before every launch (a staging copy and two pool
/// allocations on the host, a copy on the stream); scalars travel in the
/// launch's own parameters. The kernels that read views through strides
/// therefore take arrays and these sequences, indexed at comptime
/// positions (their lengths are comptime).
pub(crate) fn scalars<R: Runtime>(values: &[usize]) -> SequenceArg<R, usize> {
    values.iter().copied().collect()
}

/// Row-major strides of `shape`.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// A 1-D launch grid for `n` units of `block` threads, folded into two
/// dimensions so that large tensors stay under the per-axis cube limit.
pub(crate) fn grid_1d(n: usize, block: u32) -> CubeCount {
    let cubes = n.div_ceil(block as usize).max(1) as u32;
    if cubes <= 65535 {
        CubeCount::Static(cubes, 1, 1)
    } else {
        let y = cubes.div_ceil(65535);
        CubeCount::Static(65535, y, 1)
    }
}

/// The linear unit index for a grid made by [`grid_1d`].
#[cube]
pub(crate) fn linear_pos() -> usize {
    let cube = CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize;
    cube * CUBE_DIM_X as usize + UNIT_POS_X as usize
}

/// The linear cube index for a grid made by [`grid_1d`] with `block = 1`.
#[cube]
pub(crate) fn linear_cube() -> usize {
    CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize
}

/// Why a launch could not be made.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{0}")]
    Unsupported(String),
    #[error("matmul setup failed: {0}")]
    Matmul(String),
}

/// Whether wgpu finds any adapter at all (a CPU one such as lavapipe
/// included). Creating a client without one panics inside CubeCL.
#[cfg(feature = "wgpu")]
pub fn wgpu_available() -> bool {
    !wgpu_adapters().is_empty()
}

/// The wgpu adapters CubeCL can use: `(name, is_cpu)`. CubeCL's default
/// device asks only its platform's graphics API (Vulkan on Linux, Metal on
/// macOS), so adapters of other APIs (e.g. OpenGL) do not count.
#[cfg(feature = "wgpu")]
pub fn wgpu_adapters() -> Vec<(String, bool)> {
    use cubecl::wgpu::{AutoGraphicsApi, GraphicsApi};
    let backends = wgpu::Backends::from(AutoGraphicsApi::backend());
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends,
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    cubecl::future::block_on(instance.enumerate_adapters(backends))
        .into_iter()
        .map(|a| {
            let info = a.get_info();
            (info.name, info.device_type == wgpu::DeviceType::Cpu)
        })
        .collect()
}

/// Whether a CUDA device can be opened. cubecl's CUDA runtime loads the
/// driver at run time and panics when it is missing, so the probe runs
/// under `catch_unwind` with the panic message silenced.
#[cfg(feature = "cuda")]
pub fn cuda_available() -> bool {
    use cubecl::cuda::{CudaDevice, CudaRuntime};
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let ok = std::panic::catch_unwind(|| {
        let _ = CudaRuntime::client(&CudaDevice { index: 0 });
    })
    .is_ok();
    std::panic::set_hook(hook);
    ok
}
