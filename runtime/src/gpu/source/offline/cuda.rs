//! An H100 (`sm_90`, 32-lane planes) as cubecl-cuda 0.10 sees it, for
//! `--emit kernels --target cuda` on a machine without an NVIDIA GPU,
//! driver or toolkit (see [`super`] for the compile-only server).
//!
//! Its properties are those cubecl-cuda 0.10 reads from an H100, and it
//! compiles with cubecl-cpp's CUDA compiler (`cubecl::cuda::CudaCompiler`,
//! the one `CudaRuntime` uses) under the options cubecl-cuda sets for
//! compute capability 9.0.
//!
//! One thing differs from cubecl-cuda on purpose: cubecl-opt places a
//! kernel's shared memories in its dynamic shared buffer in hash order, so
//! their offsets change from process to process; [`OfflineCudaCompiler`]
//! places them in id order instead (one of the layouts cubecl can produce,
//! the same every time).
//!
//! Where it stops: the source is cubecl-cpp's text, unformatted (cubecl-cuda
//! pipes it through `clang-format` when one is installed; the text here does
//! not depend on the machine). No PTX is produced; NVRTC is never called.
//! `tests/kernels.rs` checks the text against a live client on an H100
//! when one is present.

use super::Described;
use caramba_kernels::cubecl::cuda::{
    CudaCompiler, CudaComputeKernel, CudaRuntime, CUDA_MAX_BINDINGS,
};
use caramba_kernels::cubecl::device::DeviceId;
use caramba_kernels::cubecl::ir::features::{
    AtomicUsage, MmaConfig, Plane, ScaledMmaConfig, Tma, TypeUsage,
};
use caramba_kernels::cubecl::ir::{
    BarrierLevel, DeviceProperties, ElemType, FloatKind, HardwareProperties,
    MemoryDeviceProperties, OpaqueType, Scope, SemanticType, StorageType, TargetProperties, Type,
    VectorSize,
};
use caramba_kernels::cubecl::prelude::*;
use caramba_kernels::cubecl::profile::TimingMethod;
use caramba_kernels::cubecl::zspace::{striding::has_pitched_row_major_strides, Shape, Strides};
use caramba_kernels::cubecl::{backtrace::BackTrace, CompilationError, Compiler};
use cubecl_cpp::cuda::{arch::CudaArchitecture, CudaDialect};
use cubecl_cpp::shared::{
    register_mma_features, register_scaled_mma_features, register_wmma_features,
    CompilationOptions, CppCompiler, CppSupportedFeatures, SharedMemory,
};
use cubecl_cpp::{register_supported_types, DialectWmmaCompiler};
use cubecl_opt::{Optimizer, SharedLiveness};
use cubecl_runtime::allocator::PitchedMemoryLayoutPolicy;
use cubecl_runtime::kernel::KernelDefinition;
use std::collections::BTreeMap;

/// The compile-only CUDA runtime: an H100.
pub type OfflineCudaRuntime = super::OfflineRuntime<H100>;

/// Its one device.
pub type OfflineCudaDevice = super::OfflineDevice<H100>;

/// The card described: compute capability 9.0 (H100).
const ARCH: u32 = 90;
/// An H100 SXM's streaming multiprocessors.
const SMS: u32 = 132;
/// `CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN` on compute
/// capability 9.0 (227 KiB). cubecl-cuda allocates a kernel's shared memory
/// dynamically and raises each kernel's limit to its need, so this, not the
/// 48 KiB of static shared memory, is the bound its kernels are chosen for.
const MAX_SHARED_BYTES: usize = 232_448;
/// The global memory of an H100 80GB HBM3 (as PyTorch reads it there).
const TOTAL_MEMORY: u64 = 85_017_493_504;
/// The row alignment cubecl-cuda uses (`cuMemAllocPitch`'s).
const MEM_ALIGNMENT: u64 = 512;

/// An H100 SXM 80GB, as cubecl-cuda 0.10 sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct H100;

impl Described for H100 {
    type Compiler = OfflineCudaCompiler;
    type Layout = PitchedMemoryLayoutPolicy;
    const NAME: &'static str = "cuda";
    const LANG: &'static str = "cpp";
    const ID: DeviceId = DeviceId {
        type_id: 0,
        index_id: 0,
    };
    const ALIGNMENT: usize = MEM_ALIGNMENT as usize;

    fn describe() -> (
        DeviceProperties,
        CompilationOptions,
        PitchedMemoryLayoutPolicy,
    ) {
        let (properties, options) = h100();
        (
            properties,
            options,
            PitchedMemoryLayoutPolicy::new(MEM_ALIGNMENT as usize),
        )
    }

    fn shared_bytes(kernel: &CudaComputeKernel) -> usize {
        kernel.shared_memory_size()
    }

    fn require_array_lengths() -> bool {
        true
    }

    fn max_cube_count() -> (u32, u32, u32) {
        CudaRuntime::max_cube_count()
    }

    fn can_read_tensor(shape: &Shape, strides: &Strides) -> bool {
        has_pitched_row_major_strides(shape, strides)
    }

    fn target_properties() -> TargetProperties {
        CudaRuntime::target_properties()
    }
}

/// `CudaCompiler` with the shared-memory layout fixed.
///
/// cubecl-cpp asks cubecl-opt's `SharedLiveness` where each shared memory
/// goes in the kernel's one dynamic shared buffer. That analysis places the
/// memories live in each block first-fit, in the iteration order of a std
/// `HashSet` (`allocate_slices`), which is seeded per process: the offsets
/// in `&dynamic_shared_mem[offset]`, and with them the buffer's size, change
/// from run to run. This compiler reruns the analysis on the same kernel
/// body and places the memories by the same first-fit rule in ascending id
/// order, then lists the declarations by id.
#[derive(Clone, Debug, Default)]
pub struct OfflineCudaCompiler(CudaCompiler);

impl Compiler for OfflineCudaCompiler {
    type Representation = CudaComputeKernel;
    type CompilationOptions = CompilationOptions;

    fn compile(
        &mut self,
        kernel: KernelDefinition,
        options: &CompilationOptions,
        mode: ExecutionMode,
        address_type: StorageType,
    ) -> Result<CudaComputeKernel, CompilationError> {
        let (body, cube_dim) = (kernel.body.clone(), kernel.cube_dim);
        let mut repr = self.0.compile(kernel, options, mode, address_type)?;
        place_shared(&mut repr.body.shared_memories, body, cube_dim)?;
        Ok(repr)
    }

    fn elem_size(&self, elem: ElemType) -> usize {
        self.0.elem_size(elem)
    }

    fn extension(&self) -> &'static str {
        self.0.extension()
    }
}

/// Sets the offset of each of `shared` (cubecl-cpp's declarations) to its
/// place in id order, and sorts them by id.
fn place_shared<D: cubecl_cpp::Dialect>(
    shared: &mut [SharedMemory<D>],
    body: Scope,
    cube_dim: CubeDim,
) -> Result<(), CompilationError> {
    if shared.is_empty() {
        return Ok(());
    }
    let mut opt = Optimizer::shared_only(body, cube_dim);
    let liveness = opt.analysis::<SharedLiveness>();
    // id → (offset, size in bytes)
    let mut placed: BTreeMap<u32, (usize, usize)> = BTreeMap::new();
    for block in opt.node_ids() {
        let live = liveness.at_block(block);
        let mut ids: Vec<u32> = live.iter().copied().collect();
        ids.sort_unstable();
        for id in ids {
            if placed.contains_key(&id) {
                continue;
            }
            let smem = liveness.shared_memories[&id];
            let mut taken: Vec<(usize, usize)> = placed
                .iter()
                .filter(|(other, _)| live.contains(other))
                .map(|(_, slot)| *slot)
                .collect();
            taken.sort_unstable();
            let offset = first_fit(&taken, smem.size(), smem.align());
            placed.insert(id, (offset, smem.size()));
        }
    }
    for s in shared.iter_mut() {
        let bytes = s.size();
        let (SharedMemory::Array { index, offset, .. } | SharedMemory::Value { index, offset, .. }) =
            s;
        match placed.get(index) {
            Some(&(o, size)) if size == bytes => *offset = o,
            _ => {
                return Err(CompilationError::Generic {
                    reason: format!(
                        "shared memory {index}: cubecl-opt's liveness analysis does not \
                         place it as cubecl-cpp declares it"
                    ),
                    backtrace: BackTrace::capture(),
                })
            }
        }
    }
    shared.sort_by_key(|s| match s {
        SharedMemory::Array { index, .. } | SharedMemory::Value { index, .. } => *index,
    });
    Ok(())
}

/// cubecl-opt's rule: the first gap between the live slices `taken`
/// (`(offset, size)`, by offset) that holds `size` bytes at `align`, else
/// the end of the last one.
fn first_fit(taken: &[(usize, usize)], size: usize, align: usize) -> usize {
    let Some(&(last, last_size)) = taken.last() else {
        return 0;
    };
    for pair in taken.windows(2) {
        let end = (pair[0].0 + pair[0].1).next_multiple_of(align);
        if pair[1].0.saturating_sub(end) >= size {
            return end;
        }
    }
    (last + last_size).next_multiple_of(align)
}

/// The supported (WMMA, MMA, scaled MMA) shapes of the tensor-core compiler
/// inside `CudaCompiler`, whichever cubecl-cuda was built with.
trait TensorCoreShapes {
    fn shapes(arch: &CudaArchitecture) -> (Vec<MmaConfig>, Vec<MmaConfig>, Vec<ScaledMmaConfig>);
}

impl<M: DialectWmmaCompiler<CudaDialect<M>>> TensorCoreShapes for CppCompiler<CudaDialect<M>> {
    fn shapes(arch: &CudaArchitecture) -> (Vec<MmaConfig>, Vec<MmaConfig>, Vec<ScaledMmaConfig>) {
        (
            M::supported_wmma_combinations(arch),
            M::supported_mma_combinations(arch),
            M::supported_scaled_mma_combinations(arch),
        )
    }
}

/// The device properties and compilation options cubecl-cuda 0.10's
/// `CudaServer::init` (`runtime.rs`) derives from an H100: its branches for
/// compute capability ≥ 6.0, 7.0, 7.5, 8.0, 8.9 and 9.0, with the driver's
/// answers written in.
fn h100() -> (DeviceProperties, CompilationOptions) {
    let arch = CudaArchitecture { version: ARCH };
    let (wmma, mma, scaled_mma) = <CudaCompiler as TensorCoreShapes>::shapes(&arch);
    let options = CompilationOptions {
        warp_size: 32,
        supports_features: CppSupportedFeatures {
            fast_math: true,
            grid_constants: true,
            // cubecl-cuda sets this when its CUDA bindings are 12.8 or newer;
            // without a toolkit at build time they are the newest cudarc knows.
            fast_tanh: true,
            clusters: true,
            elect_sync: true,
        },
    };
    let hardware = HardwareProperties {
        load_width: 128,
        plane_size_min: 32,
        plane_size_max: 32,
        max_bindings: CUDA_MAX_BINDINGS,
        max_shared_memory_size: MAX_SHARED_BYTES,
        max_cube_count: (i32::MAX as u32, u16::MAX as u32, u16::MAX as u32),
        max_units_per_cube: 1024,
        max_cube_dim: (1024, 1024, 64),
        num_streaming_multiprocessors: Some(SMS),
        num_tensor_cores: Some(4),
        min_tensor_cores_dim: (!wmma.is_empty()).then_some(8),
        num_cpu_cores: None,
        max_vector_size: VectorSize::MAX,
    };
    let memory = MemoryDeviceProperties {
        max_page_size: TOTAL_MEMORY / 4,
        alignment: MEM_ALIGNMENT,
    };
    let mut p = DeviceProperties::new(Default::default(), memory, hardware, TimingMethod::System);
    register_supported_types(&mut p);
    p.register_type_usage(ElemType::Float(FloatKind::TF32), TypeUsage::Conversion);
    let atomic = |kind| Type::new(StorageType::Atomic(ElemType::Float(kind)));
    let add_load_store = || AtomicUsage::Add | AtomicUsage::LoadStore;
    // ≥ 6.0
    p.register_atomic_type_usage(atomic(FloatKind::F64), add_load_store());
    // ≥ 7.0
    p.register_atomic_type_usage(atomic(FloatKind::F16), add_load_store());
    p.register_atomic_type_usage(atomic(FloatKind::F16).with_vector_size(2), add_load_store());
    p.register_semantic_type(SemanticType::Pipeline);
    p.register_type_usage(OpaqueType::Barrier(BarrierLevel::Unit), TypeUsage::Buffer);
    p.register_type_usage(OpaqueType::Barrier(BarrierLevel::Cube), TypeUsage::Buffer);
    p.features.plane.insert(Plane::Sync);
    // ≥ 7.5
    for kind in [FloatKind::F16, FloatKind::BF16] {
        p.features
            .matmul
            .ldmatrix
            .insert(ElemType::Float(kind).into());
    }
    // ≥ 8.0
    p.features.copy_async = true;
    // ≥ 8.9
    for kind in [FloatKind::E4M3, FloatKind::E5M2] {
        p.register_type_usage(
            ElemType::Float(kind),
            TypeUsage::Conversion | TypeUsage::Buffer,
        );
    }
    // ≥ 9.0
    p.features.tma.insert(Tma::Base);
    p.register_semantic_type(SemanticType::TensorMap);
    p.features.cube_cluster = true;
    for kind in [FloatKind::F16, FloatKind::BF16] {
        p.features
            .matmul
            .stmatrix
            .insert(ElemType::Float(kind).into());
    }
    for width in [2, 4] {
        p.register_atomic_type_usage(
            atomic(FloatKind::F32).with_vector_size(width),
            add_load_store(),
        );
    }
    // Every architecture.
    p.features.memory_reinterpret = true;
    p.features.alignment = true;
    p.features.plane.insert(Plane::Ops);
    p.features.plane.insert(Plane::NonUniformControlFlow);
    register_wmma_features(wmma, &mut p);
    register_mma_features(mma, &mut p);
    register_scaled_mma_features(scaled_mma, &mut p);
    (p, options)
}
