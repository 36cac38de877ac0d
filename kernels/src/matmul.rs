//! Batched matrix products through cubek's matmul (no GEMM of our own).
//!
//! `a (batch…, M, K) @ b (batch…, K, N)` with leading axes broadcast as in
//! NumPy. Operands are given as views of equal rank (the caller pads
//! missing leading axes with size 1); a size-1 batch axis against a larger
//! output axis is broadcast by cubek itself. Operands may be strided
//! (e.g. a transposed `b`): cubek copies a layout it cannot read into a
//! contiguous buffer first.
//!
//! Strategy: with `fast` set, or for half-precision operands, cubek's
//! tensor-core routine (CMMA; for `f32` operands this may compute in TF32
//! on NVIDIA cards) is tried first; then the exact per-unit routine, then
//! the naive one. For f32 without `fast`, only the exact routines run.
//!
//! Operands and output are stored as the launch's `elem`; for `f16` and
//! `bf16` cubek accumulates in `f32` (`MatmulElems::from_globals` makes the
//! accumulator `f32` for a half output, and every routine widens the
//! operands to the accumulator's type before multiplying) and rounds once
//! at the store.

use crate::{FloatElem, KernelError, View};
use cubecl::prelude::*;
use cubek::matmul::definition::{MatmulElems, MatmulGlobalElems, MatmulSetupError};
use cubek::matmul::launch::Strategy;
use cubek::std::InputBinding;

fn binding<R: Runtime>(v: &View) -> TensorBinding<R> {
    assert_eq!(v.offset, 0, "cubek matmul operands start at element 0");
    unsafe {
        TensorBinding::from_raw_parts(
            v.handle.clone(),
            v.strides.clone().into(),
            v.shape.clone().into(),
        )
    }
}

/// `out = lhs @ rhs` for views of equal rank ≥ 2, all stored as `elem`;
/// `out` is dense.
pub fn launch_matmul<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    lhs: &View,
    rhs: &View,
    out: &View,
    fast: bool,
) -> Result<(), KernelError> {
    if out.numel() == 0 {
        return Ok(());
    }
    let ty = match elem {
        FloatElem::F32 => f32::as_type_native_unchecked(),
        FloatElem::F16 => half::f16::as_type_native_unchecked(),
        FloatElem::BF16 => half::bf16::as_type_native_unchecked(),
    }
    .storage_type();
    let globals = MatmulGlobalElems {
        lhs: ty,
        rhs: ty,
        out: ty,
    };
    let mut strategies = Vec::new();
    // Half-precision operands go to tensor cores whatever `fast` says:
    // their products are exact in the f32 accumulator, so nothing is lost
    // (TF32 is the inexact case, for f32 operands).
    if fast || elem != FloatElem::F32 {
        strategies.push(Strategy::SimpleCyclicCmma(Default::default()));
    }
    strategies.push(Strategy::SimpleUnit(Default::default()));
    strategies.push(Strategy::Naive);
    let mut last: Option<MatmulSetupError> = None;
    for strategy in strategies {
        let mut dtypes = MatmulElems::from_globals(&globals);
        let result = cubek::matmul::launch::launch_ref::<R>(
            &strategy,
            client,
            InputBinding::new(binding::<R>(lhs), ty),
            InputBinding::new(binding::<R>(rhs), ty),
            binding::<R>(out),
            &mut dtypes,
        );
        match result {
            Ok(()) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(KernelError::Matmul(format!(
        "{:?} @ {:?}: {:?}",
        lhs.shape, rhs.shape, last
    )))
}
