//! Elementwise kernels: one program interpreter for unary ops, binary ops
//! with NumPy broadcasting, fused elementwise programs and the constant fill.
//!
//! The program is comptime data: every instruction is expanded while the
//! kernel is traced, so each distinct program compiles to its own unrolled,
//! straight-line kernel with no interpretation left at run time. Operands
//! arrive as strided views already broadcast to the output shape (stride 0
//! on broadcast axes), so one kernel serves every broadcasting pattern.
//! Operands and the output share one storage type (`elem`); every value is
//! widened to `f32` as it is loaded, constants and intermediates are `f32`,
//! and the result is rounded once, as it is stored.
//! Where it stops: float operands only (`i32` binaries are not supported).

use crate::{grid_1d, linear_pos, with_float, FloatElem, KernelError, View, ELEM_BLOCK};
use cubecl::prelude::*;

/// A unary op of the program. This mirrors `caramba_ir::UnaryOp` as a
/// `CubeType` (comptime data), because `kernels` knows nothing of the IR;
/// `runtime/src/gpu/ops.rs` maps one onto the other with an exhaustive match,
/// so a new IR op cannot be forgotten here.
#[derive(CubeType, Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Unary {
    Neg,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Recip,
    Abs,
    Sigmoid,
    Silu,
    Tanh,
}

/// A binary op of the program.
#[derive(CubeType, Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Binary {
    Add,
    Sub,
    Mul,
    Div,
    Max,
}

/// One instruction: reads operands (`Input`) or earlier instructions by
/// index; the last instruction is the result. Constants are `f32` bits.
#[derive(CubeType, Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Instr {
    Input(usize),
    /// An operand that is dense and of the output's shape: read at the
    /// output's index, no stride arithmetic. `launch_elementwise` rewrites
    /// `Input` to this where it applies.
    InputDense(usize),
    Const(u32),
    Unary(Unary, usize),
    Binary(Binary, usize, usize),
}

/// The element offset of output element `pos` in an operand broadcast to
/// the output's shape (`out` is dense).
#[cube]
pub(crate) fn broadcast_offset<F: Float>(t: &Tensor<F>, out: &Tensor<F>, pos: usize) -> usize {
    let mut off = 0;
    for d in 0..out.rank() {
        let coord = (pos / out.stride(d)) % out.shape(d);
        off += coord * t.stride(d);
    }
    off
}

#[cube]
fn apply_unary<F: Float>(x: F, #[comptime] op: Unary) -> F {
    match op {
        Unary::Neg => -x,
        Unary::Exp => x.exp(),
        Unary::Log => x.ln(),
        Unary::Sqrt => x.sqrt(),
        Unary::Rsqrt => F::new(1.0) / x.sqrt(),
        Unary::Recip => F::new(1.0) / x,
        Unary::Abs => x.abs(),
        Unary::Sigmoid => F::new(1.0) / (F::new(1.0) + (-x).exp()),
        Unary::Silu => x / (F::new(1.0) + (-x).exp()),
        Unary::Tanh => x.tanh(),
    }
}

// `a != a` is the NaN test (no `is_nan` on generic cube floats).
#[allow(clippy::eq_op)]
#[cube]
fn apply_binary<F: Float>(a: F, b: F, #[comptime] op: Binary) -> F {
    match op {
        Binary::Add => a + b,
        Binary::Sub => a - b,
        Binary::Mul => a * b,
        Binary::Div => a / b,
        Binary::Max => {
            // NaN-propagating, like the reference (no NaN literal: WGSL
            // rejects non-finite constants).
            let mut r = a.max(b);
            if a != a {
                r = a;
            }
            if b != b {
                r = b;
            }
            r
        }
    }
}

#[cube(launch_unchecked)]
fn elementwise_kernel<F: Float>(
    inputs: &Sequence<Tensor<F>>,
    out: &mut Tensor<F>,
    #[comptime] prog: Sequence<Instr>,
) {
    let pos = linear_pos();
    if pos >= out.len() {
        terminate!();
    }
    // One register per instruction; comptime indices, so no dynamic access.
    let mut vals = Sequence::<f32>::new();
    #[unroll]
    for i in 0..prog.len() {
        let ins = comptime! { *prog.index(i) };
        let v = match ins {
            Instr::Input(k) => {
                let t = inputs.index(k);
                f32::cast_from(t[broadcast_offset::<F>(t, out, pos)])
            }
            Instr::InputDense(k) => f32::cast_from(inputs.index(k)[pos]),
            Instr::Const(bits) => f32::new(comptime! { f32::from_bits(bits) }),
            Instr::Unary(op, a) => apply_unary::<f32>(*vals.index(a), op),
            Instr::Binary(op, a, b) => apply_binary::<f32>(*vals.index(a), *vals.index(b), op),
        };
        vals.push(v);
    }
    out[pos] = F::cast_from(*vals.index(comptime! { prog.len() - 1 }));
}

/// Runs `prog` over `inputs` (views already broadcast to `out_shape`) into
/// the dense `out` buffer; `elem` is the storage of the inputs and `out`.
pub fn launch_elementwise<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    prog: &[Instr],
    inputs: &[View],
    out: &View,
) -> Result<(), KernelError> {
    if prog.is_empty() {
        return Err(KernelError::Unsupported("empty elementwise program".into()));
    }
    let n = out.numel();
    if n == 0 {
        return Ok(());
    }
    let mut seq = Sequence::new();
    for ins in prog {
        seq.push(match *ins {
            Instr::Input(k)
                if inputs
                    .get(k)
                    .is_some_and(|v| v.is_contiguous() && v.shape == out.shape) =>
            {
                Instr::InputDense(k)
            }
            other => other,
        });
    }
    with_float!(elem, F => unsafe {
        let mut args = SequenceArg::<R, Tensor<F>>::new();
        // A program must read at least one operand for the kernel's
        // signature; constants-only programs read the output's own buffer,
        // unused.
        for v in inputs {
            args.push(v.arg::<R>());
        }
        if inputs.is_empty() {
            args.push(out.arg::<R>());
        }
        elementwise_kernel::launch_unchecked::<F, R>(
            client,
            grid_1d(n, ELEM_BLOCK),
            CubeDim::new_1d(ELEM_BLOCK),
            args,
            out.arg::<R>(),
            seq,
        );
    });
    Ok(())
}

/// `value` converted to the storage type `F` (a no-op where `V` is `F`).
#[cube(launch_unchecked)]
fn fill_kernel<F: Numeric + CubeElement, V: Numeric + CubeElement>(out: &mut Array<F>, value: V) {
    let pos = linear_pos();
    if pos < out.len() {
        out[pos] = F::cast_from(value);
    }
}

/// Fills `n` float elements of `out`, stored as `elem`, with `value`
/// (rounded to `elem`).
pub fn launch_fill_float<R: Runtime>(
    client: &ComputeClient<R>,
    elem: FloatElem,
    out: &cubecl::server::Handle,
    n: usize,
    value: f32,
) {
    if n == 0 {
        return;
    }
    with_float!(elem, F => unsafe {
        fill_kernel::launch_unchecked::<F, f32, R>(
            client,
            grid_1d(n, ELEM_BLOCK),
            CubeDim::new_1d(ELEM_BLOCK),
            ArrayArg::from_raw_parts(out.clone(), n),
            value,
        );
    });
}

/// Fills `n` `i32` elements of `out` with `value`.
pub fn launch_fill_i32<R: Runtime>(
    client: &ComputeClient<R>,
    out: &cubecl::server::Handle,
    n: usize,
    value: i32,
) {
    if n == 0 {
        return;
    }
    unsafe {
        fill_kernel::launch_unchecked::<i32, i32, R>(
            client,
            grid_1d(n, ELEM_BLOCK),
            CubeDim::new_1d(ELEM_BLOCK),
            ArrayArg::from_raw_parts(out.clone(), n),
            value,
        );
    }
}
