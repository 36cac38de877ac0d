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
    /// Vector operand `j` at the unit's own vector: an operand that is
    /// dense and of the output's shape. `launch_elementwise` rewrites each
    /// `Input` into this or one of the next two.
    InputDense(usize),
    /// Vector operand `j` at the output's position broadcast into it,
    /// from element offset `o`, by the strides at `layout[at..]`: its last
    /// axis is contiguous and its other strides and `o` divide by the
    /// vector.
    InputRow(usize, usize, usize),
    /// Scalar operand `j` from element offset `o` by the strides at
    /// `layout[at..]`, one value for the whole vector: its last axis is
    /// broadcast (stride 0).
    InputSplat(usize, usize, usize),
    Const(u32),
    Unary(Unary, usize),
    Binary(Binary, usize, usize),
}

/// The element offset of element `pos`, counted densely in the shape
/// `layout[0..rank]` (the output's, which may itself be a strided slot of
/// a larger buffer), by the strides `layout[at..at + rank]` (an operand's,
/// broadcast to that shape, or the output's); shapes and strides count
/// elements whatever the vector types (see [`crate::scalars`]).
#[cube]
pub(crate) fn layout_offset(
    layout: &Sequence<usize>,
    pos: usize,
    #[comptime] rank: usize,
    #[comptime] at: usize,
) -> usize {
    let mut off = 0;
    let mut rest = pos;
    #[unroll]
    for i in 0..rank {
        let d = comptime!(rank - 1 - i);
        let n = *layout.index(d);
        off += (rest % n) * *layout.index(comptime!(at + d));
        rest /= n;
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

/// One unit computes `nv` consecutive outputs (one vector, inside one row
/// of the last axis): the operands' vectors are loaded first, then the
/// program runs once per lane in `f32`, and the vector is stored once:
/// densely, or, when `out_strided`, by the output's strides (at
/// `layout[out_at..]`) from element `out_offset` (a slot of a larger
/// buffer, such as one operand's part of a concatenation). `layout` starts
/// with the output's shape (`rank` scalars), then the strided operands'
/// strides (see [`crate::scalars`]).
///
/// With `pairs`, a unit computes two vectors, `pos` and `pos + ⌈units/2⌉`
/// (each pass over the output coalesced), all their operands loaded before
/// either is computed: twice the bytes in flight a unit and half the
/// units' fixed work, which large `f32` tensors need to come near the
/// copy's bandwidth (see `launch_elementwise`).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn elementwise_kernel<F: Float, N: Size>(
    vectors: &Sequence<Array<Vector<F, N>>>,
    scalars: &Sequence<Array<F>>,
    out: &mut Array<Vector<F, N>>,
    layout: &Sequence<usize>,
    units: usize,
    #[comptime] prog: Sequence<Instr>,
    #[comptime] nv: usize,
    #[comptime] rank: usize,
    #[comptime] out_strided: bool,
    #[comptime] out_offset: usize,
    #[comptime] out_at: usize,
    #[comptime] pairs: bool,
) {
    if pairs {
        let half = units.div_ceil(2);
        let pos = linear_pos();
        if pos >= half {
            terminate!();
        }
        // The second vector of the last unit of an odd count is past the
        // end: it loads the first one's again and stores nothing.
        let second = pos + half;
        let mut other = pos;
        if second < units {
            other = second;
        }
        let a = load_operands::<F, N>(
            vectors,
            scalars,
            layout,
            pos,
            comptime!(prog.clone()),
            nv,
            rank,
        );
        let b = load_operands::<F, N>(
            vectors,
            scalars,
            layout,
            other,
            comptime!(prog.clone()),
            nv,
            rank,
        );
        let ra = run_program::<F, N>(&a, comptime!(prog.clone()), nv);
        store::<F, N>(
            out,
            layout,
            pos,
            ra,
            nv,
            rank,
            out_strided,
            out_offset,
            out_at,
        );
        let rb = run_program::<F, N>(&b, comptime!(prog.clone()), nv);
        if second < units {
            store::<F, N>(
                out,
                layout,
                second,
                rb,
                nv,
                rank,
                out_strided,
                out_offset,
                out_at,
            );
        }
    } else {
        let pos = linear_pos();
        if pos >= units {
            terminate!();
        }
        let loaded = load_operands::<F, N>(
            vectors,
            scalars,
            layout,
            pos,
            comptime!(prog.clone()),
            nv,
            rank,
        );
        let result = run_program::<F, N>(&loaded, comptime!(prog.clone()), nv);
        store::<F, N>(
            out,
            layout,
            pos,
            result,
            nv,
            rank,
            out_strided,
            out_offset,
            out_at,
        );
    }
}

/// Each instruction's operand vector at vector `pos` of the output (a zero
/// for the instructions that read none, unused).
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_operands<F: Float, N: Size>(
    vectors: &Sequence<Array<Vector<F, N>>>,
    scalars: &Sequence<Array<F>>,
    layout: &Sequence<usize>,
    pos: usize,
    #[comptime] prog: Sequence<Instr>,
    #[comptime] nv: usize,
    #[comptime] rank: usize,
) -> Sequence<Vector<F, N>> {
    let mut loaded = Sequence::<Vector<F, N>>::new();
    #[unroll]
    for i in 0..prog.len() {
        let ins = comptime! { *prog.index(i) };
        let v = match ins {
            Instr::InputDense(k) => vectors.index(k)[pos],
            Instr::InputRow(k, o, at) => {
                let t = vectors.index(k);
                t[(o + layout_offset(layout, pos * nv, rank, at)) / nv]
            }
            Instr::InputSplat(k, o, at) => {
                let t = scalars.index(k);
                Vector::<F, N>::new(t[o + layout_offset(layout, pos * nv, rank, at)])
            }
            _ => Vector::<F, N>::new(F::new(0.0)),
        };
        loaded.push(v);
    }
    loaded
}

/// The program over one vector of loaded operands, lane by lane in `f32`,
/// rounded once to the storage type.
#[cube]
fn run_program<F: Float, N: Size>(
    loaded: &Sequence<Vector<F, N>>,
    #[comptime] prog: Sequence<Instr>,
    #[comptime] nv: usize,
) -> Vector<F, N> {
    let mut result = Vector::<F, N>::empty();
    #[unroll]
    for lane in 0..nv {
        // One register per instruction; comptime indices, so no dynamic access.
        let mut vals = Sequence::<f32>::new();
        #[unroll]
        for i in 0..prog.len() {
            let ins = comptime! { *prog.index(i) };
            let v = match ins {
                // Rewritten by the launch.
                Instr::Input(_) => f32::new(0.0),
                Instr::InputDense(_) | Instr::InputRow(_, _, _) | Instr::InputSplat(_, _, _) => {
                    f32::cast_from(loaded.index(i)[lane])
                }
                Instr::Const(bits) => f32::new(comptime! { f32::from_bits(bits) }),
                Instr::Unary(op, a) => apply_unary::<f32>(*vals.index(a), op),
                Instr::Binary(op, a, b) => apply_binary::<f32>(*vals.index(a), *vals.index(b), op),
            };
            vals.push(v);
        }
        result[lane] = F::cast_from(*vals.index(comptime! { prog.len() - 1 }));
    }
    result
}

/// Vector `pos` of the output stored: densely or by its strides.
#[cube]
#[allow(clippy::too_many_arguments)]
fn store<F: Float, N: Size>(
    out: &mut Array<Vector<F, N>>,
    layout: &Sequence<usize>,
    pos: usize,
    result: Vector<F, N>,
    #[comptime] nv: usize,
    #[comptime] rank: usize,
    #[comptime] out_strided: bool,
    #[comptime] out_offset: usize,
    #[comptime] out_at: usize,
) {
    if out_strided {
        out[(out_offset + layout_offset(layout, pos * nv, rank, out_at)) / nv] = result;
    } else {
        out[pos] = result;
    }
}

/// How a launch of `nv`-element vectors reads an operand (see [`Instr`]),
/// or `None` where that width cannot.
fn operand_read(v: &View, out: &View, nv: usize) -> Option<Read> {
    let r = out.shape.len();
    if v.is_contiguous() && v.shape == out.shape {
        return Some(Read::Dense);
    }
    let last = if r == 0 { 1 } else { v.strides[r - 1] };
    if nv > 1 && last == 0 {
        return Some(Read::Splat);
    }
    (nv == 1 || v.aligned_to(nv)).then_some(Read::Row)
}

/// How an operand is read (see [`Instr`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Read {
    Dense,
    Row,
    Splat,
}

/// Runs `prog` over `inputs` (views already broadcast to `out`'s shape)
/// into `out`: a dense buffer, or a strided view whose last axis is
/// contiguous (a slot of a larger buffer); `elem` is the storage of the
/// inputs and `out`.
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
    let r = out.shape.len();
    let out_dense = out.is_contiguous();
    if !out_dense && (r == 0 || out.strides[r - 1] != 1) {
        return Err(KernelError::Unsupported(format!(
            "an elementwise output with strides {:?}: its last axis must be contiguous",
            out.strides
        )));
    }
    // The widest vector (up to 16 bytes) that stays inside rows of the
    // last axis and reads every operand.
    let last = out.shape.last().copied().unwrap_or(1);
    let operand = |k: usize| {
        inputs.get(k).ok_or_else(|| {
            KernelError::Unsupported(format!("the program reads operand {k} of {}", inputs.len()))
        })
    };
    for ins in prog {
        if let Instr::Input(k) = *ins {
            operand(k)?;
        }
    }
    let nv = client
        .io_optimized_vector_sizes(elem.size())
        .find(|&nv| {
            last.is_multiple_of(nv)
                && (out_dense || out.aligned_to(nv))
                && prog.iter().all(|ins| match *ins {
                    Instr::Input(k) => operand_read(&inputs[k], out, nv).is_some(),
                    _ => true,
                })
        })
        .unwrap_or(1);
    // Operands split between the vector and the scalar sequences; the
    // layout scalars: the output's shape, then each strided operand's
    // strides, then (when strided) the output's.
    let (mut vectors, mut scalars): (Vec<&View>, Vec<&View>) = (Vec::new(), Vec::new());
    let mut layout: Vec<usize> = out.shape.clone();
    let mut slot: Vec<Option<Instr>> = vec![None; inputs.len()];
    let mut seq = Sequence::new();
    for ins in prog {
        seq.push(match *ins {
            Instr::Input(k) => *slot[k].get_or_insert_with(|| {
                let v = &inputs[k];
                let read = operand_read(v, out, nv).expect("the width reads it");
                let list = if read == Read::Splat {
                    &mut scalars
                } else {
                    &mut vectors
                };
                list.push(v);
                let j = list.len() - 1;
                let at = layout.len();
                if read != Read::Dense {
                    layout.extend(&v.strides);
                }
                match read {
                    Read::Dense => Instr::InputDense(j),
                    Read::Row => Instr::InputRow(j, v.offset, at),
                    Read::Splat => Instr::InputSplat(j, v.offset, at),
                }
            }),
            other => other,
        });
    }
    let out_at = layout.len();
    if !out_dense {
        layout.extend(&out.strides);
    }
    let units = n / nv;
    let pairs = pairs(elem, units);
    let grid_units = if pairs { units.div_ceil(2) } else { units };
    with_float!(elem, F => unsafe {
        let mut vector_args = SequenceArg::new();
        for v in &vectors {
            vector_args.push(v.array::<R>());
        }
        let mut scalar_args = SequenceArg::new();
        for v in &scalars {
            scalar_args.push(v.array::<R>());
        }
        elementwise_kernel::launch_unchecked::<F, R>(
            client,
            grid_1d(grid_units, ELEM_BLOCK),
            CubeDim::new_1d(ELEM_BLOCK),
            nv,
            vector_args,
            scalar_args,
            out.array::<R>(),
            crate::scalars(&layout),
            units,
            seq,
            nv,
            r,
            !out_dense,
            out.offset,
            out_at,
            pairs,
        );
    });
    Ok(())
}

/// Whether a launch of `units` vectors of `elem` computes two a unit (see
/// `elementwise_kernel`): for 4-byte storage from `PAIRS_FROM` vectors
/// (16 MiB of output), where one vector a unit leaves `f32` SwiGLU and
/// adds at 82–85% of the H200's copy bandwidth against 95–98% for `bf16`,
/// whose units carry the same bytes for half as many units (BENCHMARKS,
/// thirty-first session). `CARAMBA_ELEM_PAIRS=0` never pairs, `=all`
/// pairs every storage from that size (for A/B runs).
fn pairs(elem: FloatElem, units: usize) -> bool {
    const PAIRS_FROM: usize = 1 << 20;
    static MODE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let mode = MODE.get_or_init(|| std::env::var("CARAMBA_ELEM_PAIRS").ok());
    units >= PAIRS_FROM
        && match mode.as_deref() {
            Some("0") => false,
            Some("all") => true,
            _ => elem.size() >= 4,
        }
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
