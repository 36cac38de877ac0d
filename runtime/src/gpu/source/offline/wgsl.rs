//! Mesa's lavapipe (llvmpipe, a Vulkan driver that runs on the CPU) as
//! cubecl-wgpu 0.10 sees it, for `--emit kernels --target wgsl` on a
//! machine with no wgpu adapter at all (see [`super`] for the compile-only
//! server).
//!
//! It compiles with cubecl-wgpu's WGSL compiler (the one `WgpuRuntime`
//! uses without the `spirv` feature), under the options and with the
//! properties `create_server` and `register_wgsl_features` derive from
//! lavapipe's limits and features. The text so no longer depends on the
//! machine's adapter: a discrete GPU (subgroup operations, other limits)
//! or another lavapipe (llvmpipe's subgroup size is the CPU's vector width,
//! 8 lanes of f32 with AVX2, 16 with AVX-512) would make other choices.
//! `offline_wgsl_source_matches_lavapipe` (`tests/kernels.rs`) checks these
//! properties, and the text, against the live adapter where lavapipe is
//! present.

use super::Described;
use caramba_kernels::cubecl::device::DeviceId;
use caramba_kernels::cubecl::ir::features::{AtomicUsage, TypeUsage};
use caramba_kernels::cubecl::ir::{
    AddressType, DeviceProperties, ElemType, FloatKind, HardwareProperties, IntKind,
    MemoryDeviceProperties, StorageType, TargetProperties, Type, UIntKind,
};
use caramba_kernels::cubecl::prelude::*;
use caramba_kernels::cubecl::profile::TimingMethod;
use caramba_kernels::cubecl::wgpu::{WgpuRuntime, WgslCompiler};
use caramba_kernels::cubecl::zspace::{Shape, Strides};
use caramba_kernels::cubecl::{Compiler, WgpuCompilationOptions};
use cubecl_runtime::allocator::ContiguousMemoryLayoutPolicy;

/// The compile-only WGSL runtime: lavapipe.
pub type OfflineWgslRuntime = super::OfflineRuntime<Lavapipe>;

/// Its one device.
pub type OfflineWgslDevice = super::OfflineDevice<Lavapipe>;

/// `maxStorageBufferBindingSize`: 128 MiB.
const MAX_BUFFER_BYTES: u64 = 1 << 27;
/// `minUniformBufferOffsetAlignment`, the alignment cubecl-wgpu gives its
/// buffers.
const ALIGNMENT: u64 = 32;
/// llvmpipe's subgroup size: 8 f32 lanes (AVX2).
const PLANE: u32 = 8;

/// Lavapipe on an x86-64 CPU with AVX2, as cubecl-wgpu 0.10 sees it
/// (Mesa 22.3, Debian 12's `mesa-vulkan-drivers`: Vulkan 1.3, llvmpipe).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Lavapipe;

impl Described for Lavapipe {
    type Compiler = WgslCompiler;
    type Layout = ContiguousMemoryLayoutPolicy;
    const NAME: &'static str = "wgpu<wgsl>";
    const LANG: &'static str = "wgsl";
    /// wgpu's CPU adapters take type id 3; 0x0ff1 keeps this one apart.
    const ID: DeviceId = DeviceId {
        type_id: 0x0ff1,
        index_id: 0,
    };
    const ALIGNMENT: usize = ALIGNMENT as usize;

    fn describe() -> (
        DeviceProperties,
        WgpuCompilationOptions,
        ContiguousMemoryLayoutPolicy,
    ) {
        let properties = lavapipe();
        let options = WgpuCompilationOptions {
            supports_u64: properties.supports_type(ElemType::UInt(UIntKind::U64)),
            ..Default::default()
        };
        let layout = ContiguousMemoryLayoutPolicy::new(ALIGNMENT as usize);
        (properties, options, layout)
    }

    fn shared_bytes(kernel: &<WgslCompiler as Compiler>::Representation) -> usize {
        kernel.shared_memory_bytes()
    }

    fn require_array_lengths() -> bool {
        WgpuRuntime::require_array_lengths()
    }

    fn max_cube_count() -> (u32, u32, u32) {
        WgpuRuntime::max_cube_count()
    }

    fn can_read_tensor(shape: &Shape, strides: &Strides) -> bool {
        WgpuRuntime::can_read_tensor(shape, strides)
    }

    fn target_properties() -> TargetProperties {
        WgpuRuntime::target_properties()
    }
}

/// The properties cubecl-wgpu 0.10's `create_server` derives from
/// lavapipe's limits, and its `register_types` from lavapipe's features
/// (`SHADER_INT64`, `SHADER_F64`, `SHADER_F16`, `SHADER_FLOAT32_ATOMIC`,
/// `TIMESTAMP_QUERY`; `SUBGROUP` is listed but not used on a CPU adapter,
/// so no plane operations).
pub fn lavapipe() -> DeviceProperties {
    let hardware = HardwareProperties {
        load_width: 128,
        plane_size_min: PLANE,
        plane_size_max: PLANE,
        // `maxStorageBuffersPerShaderStage` less the one wgpu keeps.
        max_bindings: 31,
        // `maxComputeWorkgroupStorageSize`.
        max_shared_memory_size: 32_768,
        max_cube_count: (65_535, 65_535, 65_535),
        max_units_per_cube: 1024,
        max_cube_dim: (1024, 1024, 1024),
        num_streaming_multiprocessors: None,
        num_tensor_cores: None,
        min_tensor_cores_dim: None,
        num_cpu_cores: None,
        max_vector_size: 4,
    };
    let memory = MemoryDeviceProperties {
        max_page_size: MAX_BUFFER_BYTES,
        alignment: ALIGNMENT,
    };
    let mut p = DeviceProperties::new(Default::default(), memory, hardware, TimingMethod::Device);
    p.register_address_type(AddressType::U32);
    for ty in [
        ElemType::UInt(UIntKind::U32),
        ElemType::Int(IntKind::I32),
        ElemType::Float(FloatKind::F32),
        ElemType::Float(FloatKind::Flex32),
        ElemType::Bool,
        ElemType::Int(IntKind::I64),
        ElemType::UInt(UIntKind::U64),
        ElemType::Float(FloatKind::F64),
        ElemType::Float(FloatKind::F16),
    ] {
        p.register_type_usage(ty, TypeUsage::all());
    }
    for ty in [
        ElemType::Int(IntKind::I32),
        ElemType::UInt(UIntKind::U32),
        ElemType::Float(FloatKind::F32),
    ] {
        p.register_atomic_type_usage(
            Type::new(StorageType::Atomic(ty)),
            AtomicUsage::LoadStore | AtomicUsage::Add,
        );
    }
    p
}
