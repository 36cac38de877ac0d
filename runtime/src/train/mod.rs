//! The parts of training that do not depend on autodiff: optimizers over
//! named f32 parameters, gradient clipping and accumulation, learning-rate
//! schedules, resumable training checkpoints, and run artifacts (the run
//! folder, `metrics.jsonl`, console output).
//!
//! Parameters and gradients are both a [`Params`] map from Hugging Face
//! parameter name to tensor; a gradient has its parameter's shape. The
//! training loop itself (forward, backward, batches) lives elsewhere and uses
//! these pieces in this order each optimizer step:
//!
//! ```text
//! grads = accumulate micro-batches  →  clip_grad_norm  →  lr = schedule.lr_at(step)
//!       →  optimizer.step(params, grads, lr)  →  metrics / checkpoint
//! ```

mod artifacts;
mod checkpoint;
mod console;
mod error;
mod grad;
pub(crate) mod optim;
mod schedule;

use std::collections::BTreeMap;

use caramba_ir::reference::{Storage, Tensor};

pub use self::artifacts::{utc_timestamp, MetricsRecord, MetricsWriter, RunDir};
pub use self::checkpoint::{
    load_checkpoint, model_fingerprint, param_shapes, Checkpointer, LoadedCheckpoint, SaveRequest,
    TrainState,
};
pub use self::console::{Console, TrainProgress};
pub use self::error::TrainError;
pub use self::grad::{clip_factor, clip_grad_norm, global_grad_norm, scale_grads, GradAccumulator};
pub use self::optim::{is_embedding, Optimizer, OptimizerConfig, OptimizerKind};
pub use self::schedule::{LrSchedule, ScheduleKind};

/// Named tensors: model parameters, or gradients keyed like them.
pub type Params = BTreeMap<String, Tensor>;

/// Runs `f` over a tensor's f32 elements in place.
///
/// `Tensor` has no mutable view, so the storage is moved out and back in
/// (no copy of the elements). The tensor keeps its logical dtype.
///
/// # Panics
/// If the tensor is not stored as f32: training updates f32 (or f32-stored
/// f16/bf16) parameters only.
pub(crate) fn with_f32_mut<R>(
    tensor: &mut Tensor,
    name: &str,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    let taken = std::mem::replace(tensor, Tensor::f32(vec![0], Vec::new()));
    let (dtype, shape) = (taken.dtype(), taken.shape().to_vec());
    let Storage::F32(mut data) = taken.into_storage() else {
        panic!("`{name}` is not stored as f32; training updates f32 tensors only")
    };
    let out = f(&mut data);
    *tensor = Tensor::new(dtype, shape, Storage::F32(data));
    out
}

/// A tensor's f32 elements, or a panic naming it.
pub(crate) fn f32_data<'a>(tensor: &'a Tensor, name: &str) -> &'a [f32] {
    tensor.as_f32().unwrap_or_else(|| {
        panic!("`{name}` is not stored as f32; training handles f32 tensors only")
    })
}
