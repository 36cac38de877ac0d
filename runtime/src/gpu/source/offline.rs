//! Compile-only CubeCL runtimes: a device described by constants instead
//! of a driver, so that `--emit kernels` runs on a machine without that
//! device (or any GPU), and prints the same text on every machine.
//!
//! [`OfflineServer`] is CubeCL's `ComputeServer` with the execution taken
//! out. A launch defines the kernel against this runtime's client (whose
//! device properties are those the real runtime reads from the described
//! device), compiles it with the real runtime's compiler under the options
//! the real runtime sets for that device, checks the same launch limits
//! (cube size, units, shared memory), and writes the source to CubeCL's
//! compilation log as the real runtime does just before handing it to the
//! driver. Nothing runs and no memory is held: writes are dropped and every
//! read returns zeros, so only the host-side launch logic (which kernel,
//! which comptime values, which cube size) runs as it would on the device.
//! A compilation or limit error is kept and returned by the next `read` or
//! `sync`.
//!
//! What differs per device is a [`Described`] type:
//! - [`cuda::H100`]: an H100 (`sm_90`) as cubecl-cuda 0.10 sees it, with
//!   cubecl-cpp's CUDA compiler (the `cuda` feature);
//! - [`wgsl::Lavapipe`]: Mesa's lavapipe (llvmpipe, a CPU Vulkan driver)
//!   as cubecl-wgpu 0.10 sees it on an x86-64 machine with AVX2, with
//!   cubecl-wgpu's WGSL compiler (the `wgpu` feature).
//!
//! Each is checked against the live device where one is present, in
//! `tests/kernels.rs`: the CUDA text against an H100's client
//! (`offline_cuda_source_matches_the_device`), lavapipe's properties and
//! WGSL against the live adapter's (`offline_wgsl_source_matches_lavapipe`).

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "wgpu")]
pub mod wgsl;

use caramba_kernels::cubecl::device::{Device, DeviceId, DeviceService, ServerUtilitiesHandle};
use caramba_kernels::cubecl::ir::{DeviceProperties, TargetProperties};
use caramba_kernels::cubecl::prelude::*;
use caramba_kernels::cubecl::profile::ProfileDuration;
use caramba_kernels::cubecl::server::{
    Binding, ComputeServer, CopyDescriptor, KernelArguments, LaunchError, MemoryLayoutPolicy,
    ProfileError, ProfilingToken, ResourceLimitError, ServerCommunication, ServerError,
    ServerUtilities,
};
use caramba_kernels::cubecl::stream_id::StreamId;
use caramba_kernels::cubecl::zspace::{Shape, Strides};
use caramba_kernels::cubecl::{
    backtrace::BackTrace, bytes::Bytes, future::DynFut, Compiler, CubeTask, MemoryUsage,
};
use cubecl_runtime::kernel::DebugInformation;
use cubecl_runtime::logging::ServerLogger;
use cubecl_runtime::memory_management::{ManagedMemoryHandle, MemoryAllocationMode};
use cubecl_runtime::storage::{
    ComputeStorage, ManagedResource, StorageHandle, StorageId, StorageUtilization,
};
use cubecl_runtime::timestamp_profiler::TimestampProfiler;
use cubecl_runtime::validation::{validate_cube_dim, validate_units};
use std::collections::HashSet;
use std::fmt::Debug;
use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::Arc;

/// A device described by constants: what its real CubeCL runtime would
/// read from it, and the compiler that runtime uses.
pub trait Described:
    Clone + Copy + Debug + Default + PartialEq + Eq + Hash + Send + Sync + 'static
{
    /// The real runtime's compiler.
    type Compiler: Compiler + Default;
    /// The real runtime's buffer layout (it sets the strides of the tensors
    /// a launch sees, and with them some kernels' vector widths).
    type Layout: MemoryLayoutPolicy;
    /// `Runtime::name` of the real runtime.
    const NAME: &'static str;
    /// The language tag the real runtime logs with each kernel.
    const LANG: &'static str;
    /// This device's id, distinct from any real device's.
    const ID: DeviceId;
    /// The storage alignment of the real runtime's buffers.
    const ALIGNMENT: usize;

    /// The properties, compilation options and buffer layout the real
    /// runtime derives from the device.
    fn describe() -> (
        DeviceProperties,
        <Self::Compiler as Compiler>::CompilationOptions,
        Self::Layout,
    );

    /// The shared memory a compiled kernel declares, in bytes.
    fn shared_bytes(kernel: &<Self::Compiler as Compiler>::Representation) -> usize;

    /// The real runtime's answers to `Runtime`'s static questions.
    fn require_array_lengths() -> bool;
    fn max_cube_count() -> (u32, u32, u32);
    fn can_read_tensor(shape: &Shape, strides: &Strides) -> bool;
    fn target_properties() -> TargetProperties;
}

/// The compile-only runtime of device `D` (see the module documentation).
#[derive(Debug, Clone)]
pub struct OfflineRuntime<D: Described>(PhantomData<D>);

/// The one stand-in device of `D`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OfflineDevice<D: Described>(pub D);

impl<D: Described> Device for OfflineDevice<D> {
    fn from_id(_: DeviceId) -> Self {
        OfflineDevice(D::default())
    }

    fn to_id(&self) -> DeviceId {
        D::ID
    }
}

impl<D: Described> Runtime for OfflineRuntime<D> {
    type Compiler = D::Compiler;
    type Server = OfflineServer<D>;
    type Device = OfflineDevice<D>;

    fn client(device: &Self::Device) -> ComputeClient<Self> {
        ComputeClient::load(device)
    }

    fn name(_: &ComputeClient<Self>) -> &'static str {
        D::NAME
    }

    fn require_array_lengths() -> bool {
        D::require_array_lengths()
    }

    fn max_cube_count() -> (u32, u32, u32) {
        D::max_cube_count()
    }

    fn can_read_tensor(shape: &Shape, strides: &Strides) -> bool {
        D::can_read_tensor(shape, strides)
    }

    fn target_properties() -> TargetProperties {
        D::target_properties()
    }

    fn enumerate_devices(_: u16, _: &()) -> Vec<DeviceId> {
        vec![D::ID]
    }
}

/// Compiles what is launched and runs nothing.
#[derive(Debug)]
pub struct OfflineServer<D: Described> {
    utilities: Arc<ServerUtilities<Self>>,
    options: <D::Compiler as Compiler>::CompilationOptions,
    /// Kernels already compiled (with their execution mode), as the real
    /// runtimes keep their loaded modules and pipelines.
    compiled: HashSet<KernelId>,
    /// Errors not yet reported by a `read` or `sync`.
    errors: Vec<ServerError>,
    timestamps: TimestampProfiler,
}

impl<D: Described> DeviceService for OfflineServer<D> {
    fn init(_: DeviceId) -> Self {
        let (properties, options, layout) = D::describe();
        let utilities =
            ServerUtilities::new(properties, Arc::new(ServerLogger::default()), (), layout);
        OfflineServer {
            utilities: Arc::new(utilities),
            options,
            compiled: HashSet::new(),
            errors: Vec::new(),
            timestamps: TimestampProfiler::default(),
        }
    }

    fn utilities(&self) -> ServerUtilitiesHandle {
        self.utilities.clone() as ServerUtilitiesHandle
    }
}

impl<D: Described> OfflineServer<D> {
    /// What the real runtime does with a kernel before its driver sees it.
    fn compile(
        &mut self,
        kernel: Box<dyn CubeTask<D::Compiler>>,
        mode: ExecutionMode,
    ) -> Result<(), LaunchError> {
        let mut id = kernel.id();
        id.mode(mode);
        if self.compiled.contains(&id) {
            return Ok(());
        }
        let properties = &self.utilities.properties;
        validate_cube_dim(properties, &id)?;
        validate_units(properties, &id)?;
        let mut compiled = kernel.compile(
            &mut D::Compiler::default(),
            &self.options,
            mode,
            kernel.address_type(),
        )?;
        let shared = compiled.repr.as_ref().map_or(0, D::shared_bytes);
        let max = properties.hardware.max_shared_memory_size;
        if shared > max {
            return Err(ResourceLimitError::SharedMemory {
                requested: shared,
                max,
                backtrace: BackTrace::capture(),
            }
            .into());
        }
        compiled.debug_info = Some(DebugInformation::new(D::LANG, id.clone()));
        self.utilities.logger.log_compilation(&compiled);
        self.compiled.insert(id);
        Ok(())
    }

    fn take_error(&mut self) -> Result<(), ServerError> {
        match self.errors.len() {
            0 => Ok(()),
            1 => Err(self.errors.remove(0)),
            _ => Err(ServerError::ServerUnhealthy {
                errors: std::mem::take(&mut self.errors),
                backtrace: BackTrace::capture(),
            }),
        }
    }
}

impl<D: Described> ServerCommunication for OfflineServer<D> {
    const SERVER_COMM_ENABLED: bool = false;
}

impl<D: Described> ComputeServer for OfflineServer<D> {
    type Kernel = Box<dyn CubeTask<D::Compiler>>;
    type Info = ();
    type MemoryLayoutPolicy = D::Layout;
    type Storage = NoStorage<D>;

    fn initialize_memory(&mut self, _: ManagedMemoryHandle, _: u64, _: StreamId) {}

    fn logger(&self) -> Arc<ServerLogger> {
        self.utilities.logger.clone()
    }

    fn utilities(&self) -> Arc<ServerUtilities<Self>> {
        self.utilities.clone()
    }

    fn read(
        &mut self,
        descriptors: Vec<CopyDescriptor>,
        _: StreamId,
    ) -> DynFut<Result<Vec<Bytes>, ServerError>> {
        let result = self.take_error().map(|()| {
            descriptors
                .iter()
                .map(|d| {
                    let n = d.shape.iter().product::<usize>() * d.elem_size;
                    Bytes::from_bytes_vec(vec![0; n])
                })
                .collect()
        });
        Box::pin(async move { result })
    }

    fn write(&mut self, _: Vec<(CopyDescriptor, Bytes)>, _: StreamId) {}

    fn sync(&mut self, _: StreamId) -> DynFut<Result<(), ServerError>> {
        let result = self.take_error();
        Box::pin(async move { result })
    }

    fn get_resource(
        &mut self,
        binding: Binding,
        _: StreamId,
    ) -> Result<ManagedResource<()>, ServerError> {
        Ok(ManagedResource::new(binding.memory, ()))
    }

    unsafe fn launch(
        &mut self,
        kernel: Self::Kernel,
        _: CubeCount,
        _: KernelArguments,
        mode: ExecutionMode,
        _: StreamId,
    ) {
        if let Err(e) = self.compile(kernel, mode) {
            self.errors.push(e.into());
        }
    }

    fn flush(&mut self, _: StreamId) -> Result<(), ServerError> {
        Ok(())
    }

    fn memory_usage(&mut self, _: StreamId) -> Result<MemoryUsage, ServerError> {
        Ok(MemoryUsage {
            number_allocs: 0,
            bytes_in_use: 0,
            bytes_padding: 0,
            bytes_reserved: 0,
        })
    }

    fn memory_cleanup(&mut self, _: StreamId) {}

    fn start_profile(&mut self, _: StreamId) -> Result<ProfilingToken, ServerError> {
        Ok(self.timestamps.start())
    }

    fn end_profile(
        &mut self,
        _: StreamId,
        token: ProfilingToken,
    ) -> Result<ProfileDuration, ProfileError> {
        self.timestamps.stop(token)
    }

    fn allocation_mode(&mut self, _: MemoryAllocationMode, _: StreamId) {}
}

/// Storage that holds nothing: the server never touches buffer contents.
#[derive(Debug, Default)]
pub struct NoStorage<D>(PhantomData<D>);

impl<D: Described> ComputeStorage for NoStorage<D> {
    type Resource = ();

    fn alignment(&self) -> usize {
        D::ALIGNMENT
    }

    fn get(&mut self, _: &StorageHandle) {}

    fn alloc(
        &mut self,
        size: u64,
    ) -> Result<StorageHandle, caramba_kernels::cubecl::server::IoError> {
        Ok(StorageHandle::new(
            StorageId::new(),
            StorageUtilization { offset: 0, size },
        ))
    }

    fn dealloc(&mut self, _: StorageId) {}

    fn flush(&mut self) {}
}
