//! Tests of each op's reference semantics against hand-computed values and
//! direct formulas, and of the evaluator's binding checks.

use super::*;
use crate::op::{AttnArg, BinaryOp, NormArg, Op, ReduceOp, RopeSpec, Scalar, UnaryOp};
use crate::types::{DType, Dim, Shape, Sym, TensorType};
use crate::{shape, Graph, NodeId};
use std::collections::BTreeMap;
use std::sync::Arc;

fn ty(dtype: DType, shape: Shape) -> TensorType {
    TensorType::new(dtype, shape)
}

fn f32s(shape: &[usize], data: &[f32]) -> Tensor {
    Tensor::f32(shape.to_vec(), data.to_vec())
}

/// Deterministic, varied values in [-1, 1).
fn ramp(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 37 + seed * 101) % 97) as f32 / 48.5) - 1.0)
        .collect()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "lengths differ: {got:?} vs {want:?}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ok = g == w || (g - w).abs() <= tol * (1.0 + w.abs());
        assert!(
            ok,
            "element {i}: got {g}, want {w} (got {got:?}, want {want:?})"
        );
    }
}

/// Evaluates the graph's single output `y` with the given inputs.
fn run(g: &Graph, inputs: Vec<(&str, Tensor)>) -> Tensor {
    let mut b = Bindings::default();
    for (name, t) in inputs {
        b = b.input(name, t);
    }
    eval(g, &b)
        .expect("evaluation succeeds")
        .remove("y")
        .expect("output y")
}

/// `y = op(x)` for one input `x` of the given type.
fn one_op(op: Op, x_ty: TensorType) -> Graph {
    let mut g = Graph::new("t");
    let x = g.input("x", x_ty).unwrap();
    let y = g.add(op, &[x], "").unwrap();
    g.set_output("y", y);
    g
}

/// `y = op(a, b)` for two inputs.
fn two_op(op: Op, a_ty: TensorType, b_ty: TensorType) -> Graph {
    let mut g = Graph::new("t");
    let a = g.input("a", a_ty).unwrap();
    let b = g.input("b", b_ty).unwrap();
    let y = g.add(op, &[a, b], "").unwrap();
    g.set_output("y", y);
    g
}

#[test]
fn unary_ops_match_hand_values() {
    let x = [-2.0f32, 0.0, 1.0, 4.0];
    let cases: [(UnaryOp, [f32; 4]); 10] = [
        (UnaryOp::Neg, [2.0, 0.0, -1.0, -4.0]),
        (
            UnaryOp::Exp,
            [0.135_335_28, 1.0, std::f32::consts::E, 54.598_15],
        ),
        (
            UnaryOp::Log,
            [f32::NAN, f32::NEG_INFINITY, 0.0, 1.386_294_4],
        ),
        (UnaryOp::Sqrt, [f32::NAN, 0.0, 1.0, 2.0]),
        (UnaryOp::Rsqrt, [f32::NAN, f32::INFINITY, 1.0, 0.5]),
        (UnaryOp::Recip, [-0.5, f32::INFINITY, 1.0, 0.25]),
        (UnaryOp::Abs, [2.0, 0.0, 1.0, 4.0]),
        (
            UnaryOp::Sigmoid,
            [0.119_202_92, 0.5, 0.731_058_6, 0.982_013_8],
        ),
        (UnaryOp::Silu, [-0.238_405_84, 0.0, 0.731_058_6, 3.928_055]),
        (UnaryOp::Tanh, [-0.964_027_6, 0.0, 0.761_594_2, 0.999_329_3]),
    ];
    for (op, want) in cases {
        let g = one_op(Op::Unary(op), ty(DType::F32, shape![4]));
        let got = run(&g, vec![("x", f32s(&[4], &x))]);
        let got = got.as_f32().unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let ok =
                (g.is_nan() && w.is_nan()) || g == w || (g - w).abs() <= 1e-6 * (1.0 + w.abs());
            assert!(ok, "{op:?} element {i}: got {g}, want {w}");
        }
    }
}

#[test]
fn binary_ops_broadcast_like_numpy() {
    // [2, 3] + [3]: the row is added to each row.
    let g = two_op(
        Op::Binary(BinaryOp::Add),
        ty(DType::F32, shape![2, 3]),
        ty(DType::F32, shape![3]),
    );
    let y = run(
        &g,
        vec![
            ("a", f32s(&[2, 3], &[1., 2., 3., 4., 5., 6.])),
            ("b", f32s(&[3], &[10., 20., 30.])),
        ],
    );
    assert_eq!(y.shape(), &[2, 3]);
    assert_eq!(y.as_f32().unwrap(), &[11., 22., 33., 14., 25., 36.]);

    // [2, 1] * [1, 3]: an outer product.
    let g = two_op(
        Op::Binary(BinaryOp::Mul),
        ty(DType::F32, shape![2, 1]),
        ty(DType::F32, shape![1, 3]),
    );
    let y = run(
        &g,
        vec![
            ("a", f32s(&[2, 1], &[2., 3.])),
            ("b", f32s(&[1, 3], &[1., 10., 100.])),
        ],
    );
    assert_eq!(y.shape(), &[2, 3]);
    assert_eq!(y.as_f32().unwrap(), &[2., 20., 200., 3., 30., 300.]);

    // [3, 1, 2] - [2, 1]: both operands broadcast, ranks differ.
    let g = two_op(
        Op::Binary(BinaryOp::Sub),
        ty(DType::F32, shape![3, 1, 2]),
        ty(DType::F32, shape![2, 1]),
    );
    let a: Vec<f32> = (0..6).map(|i| i as f32 * 10.0).collect();
    let y = run(
        &g,
        vec![("a", f32s(&[3, 1, 2], &a)), ("b", f32s(&[2, 1], &[1., 2.]))],
    );
    assert_eq!(y.shape(), &[3, 2, 2]);
    assert_eq!(
        y.as_f32().unwrap(),
        &[-1., 9., -2., 8., 19., 29., 18., 28., 39., 49., 38., 48.]
    );

    // [2, 2] / scalar constant, and max with a broadcast row.
    let mut g = Graph::new("t");
    let x = g.input("x", ty(DType::F32, shape![2, 2])).unwrap();
    let four = g.constant(4.0, DType::F32, "");
    let q = g.add(Op::Binary(BinaryOp::Div), &[x, four], "").unwrap();
    let r = g.input("r", ty(DType::F32, shape![2])).unwrap();
    let y = g.add(Op::Binary(BinaryOp::Max), &[q, r], "").unwrap();
    g.set_output("y", y);
    let y = run(
        &g,
        vec![
            ("x", f32s(&[2, 2], &[1., 2., 8., -4.])),
            ("r", f32s(&[2], &[0.5, 0.0])),
        ],
    );
    assert_eq!(y.as_f32().unwrap(), &[0.5, 0.5, 2.0, 0.0]);

    // Integer arithmetic on i32.
    let g = two_op(
        Op::Binary(BinaryOp::Div),
        ty(DType::I32, shape![3]),
        ty(DType::I32, shape![1]),
    );
    let y = run(
        &g,
        vec![
            ("a", Tensor::i32(vec![3], vec![7, -7, 6])),
            ("b", Tensor::i32(vec![1], vec![2])),
        ],
    );
    assert_eq!(y.as_i32().unwrap(), &[3, -3, 3]);
}

#[test]
fn constants_and_casts() {
    let mut g = Graph::new("t");
    let c = g.constant(2.5, DType::F64, "");
    g.set_output("y", c);
    let y = run(&g, vec![]);
    assert_eq!(
        (y.dtype(), y.shape(), y.as_f64().unwrap()),
        (DType::F64, &[][..], &[2.5][..])
    );

    let g = one_op(Op::Cast(DType::I32), ty(DType::F32, shape![4]));
    let y = run(&g, vec![("x", f32s(&[4], &[-1.7, 1.7, 3.0, -0.2]))]);
    assert_eq!(y.as_i32().unwrap(), &[-1, 1, 3, 0]);

    let g = one_op(Op::Cast(DType::F64), ty(DType::I32, shape![2]));
    let y = run(&g, vec![("x", Tensor::i32(vec![2], vec![-3, 5]))]);
    assert_eq!(y.as_f64().unwrap(), &[-3.0, 5.0]);

    // bf16 keeps 8 significant bits: 1 + 2^-8 is a tie and goes to even
    // (1.0); 1 + 3·2^-8 is a tie that goes up to 1 + 2^-6.
    let g = one_op(Op::Cast(DType::BF16), ty(DType::F32, shape![3]));
    let y = run(
        &g,
        vec![(
            "x",
            f32s(&[3], &[1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -3.0]),
        )],
    );
    assert_eq!(y.dtype(), DType::BF16);
    assert_eq!(y.as_f32().unwrap(), &[1.0, 1.015_625, -3.0]);

    // f16: 11 significant bits, largest finite 65504, subnormal step 2^-24.
    let g = one_op(Op::Cast(DType::F16), ty(DType::F32, shape![5]));
    let y = run(
        &g,
        vec![(
            "x",
            f32s(&[5], &[1.0 + 1.0 / 2048.0, 65519.0, 65520.0, 1e-8, 6e-8]),
        )],
    );
    assert_eq!(
        y.as_f32().unwrap(),
        &[1.0, 65504.0, f32::INFINITY, 0.0, 5.960_464_5e-8]
    );
}

#[test]
fn half_precision_results_are_computed_in_f32_and_rounded_once() {
    // bf16 operands on the bf16 grid: 1 + 2^-7 and 2^-8. Their f32 sum
    // 1 + 3·2^-8 is a tie that rounds up to 1 + 2^-6; adding in bf16 twice
    // (or not rounding) would give another value.
    let t = ty(DType::BF16, shape![2]);
    let g = two_op(Op::Binary(BinaryOp::Add), t.clone(), t);
    let bf = |v: &[f32]| Tensor::new(DType::BF16, vec![2], Storage::F32(v.to_vec()));
    let y = run(
        &g,
        vec![
            ("a", bf(&[1.0 + 1.0 / 128.0, 3.0])),
            ("b", bf(&[1.0 / 256.0, 1.0 / 256.0])),
        ],
    );
    assert_eq!(y.dtype(), DType::BF16);
    // 3 + 2^-8 is below half a bf16 step (2^-6) above 3: back to 3.
    assert_eq!(y.as_f32().unwrap(), &[1.015_625, 3.0]);

    // A reduction sums in f32 and rounds the result: an f16 accumulator
    // would stall at 2048 (2048 + 1 rounds back to even), the f32 sum of
    // 4096 ones is 4096, which f16 holds exactly.
    let g = one_op(
        Op::Reduce {
            op: ReduceOp::Sum,
            axis: 0,
        },
        ty(DType::F16, shape![4096]),
    );
    let ones = Tensor::new(DType::F16, vec![4096], Storage::F32(vec![1.0; 4096]));
    let y = run(&g, vec![("x", ones)]);
    assert_eq!(y.as_f32().unwrap(), &[4096.0]);
}

#[test]
fn reductions_keep_the_axis() {
    let x = f32s(&[2, 3], &[1., 2., 3., 4., 5., 9.]);
    let cases = [
        (ReduceOp::Sum, 0, vec![1, 3], vec![5., 7., 12.]),
        (ReduceOp::Sum, 1, vec![2, 1], vec![6., 18.]),
        (ReduceOp::Mean, 1, vec![2, 1], vec![2., 6.]),
        (ReduceOp::Max, 0, vec![1, 3], vec![4., 5., 9.]),
        (ReduceOp::Max, 1, vec![2, 1], vec![3., 9.]),
    ];
    for (op, axis, shape, want) in cases {
        let g = one_op(Op::Reduce { op, axis }, ty(DType::F32, shape![2, 3]));
        let y = run(&g, vec![("x", x.clone())]);
        assert_eq!(y.shape(), &shape[..], "{op:?} axis {axis}");
        assert_eq!(y.as_f32().unwrap(), &want[..], "{op:?} axis {axis}");
    }
    // The middle axis of a rank-3 tensor.
    let g = one_op(
        Op::Reduce {
            op: ReduceOp::Sum,
            axis: 1,
        },
        ty(DType::F32, shape![2, 2, 2]),
    );
    let y = run(
        &g,
        vec![("x", f32s(&[2, 2, 2], &[1., 2., 3., 4., 5., 6., 7., 8.]))],
    );
    assert_eq!(
        (y.shape(), y.as_f32().unwrap()),
        (&[2, 1, 2][..], &[4., 6., 12., 14.][..])
    );
}

#[test]
fn softmax_is_normalized_and_stable() {
    let g = one_op(Op::Softmax { axis: 1 }, ty(DType::F32, shape![2, 2]));
    let y = run(
        &g,
        vec![("x", f32s(&[2, 2], &[0.0, 3f32.ln(), 1000.0, 1000.0]))],
    );
    assert_close(y.as_f32().unwrap(), &[0.25, 0.75, 0.5, 0.5], 1e-6);

    // Along axis 0, columns are normalized; -inf gets weight 0.
    let g = one_op(Op::Softmax { axis: 0 }, ty(DType::F32, shape![2, 2]));
    let y = run(
        &g,
        vec![(
            "x",
            f32s(&[2, 2], &[0.0, f32::NEG_INFINITY, 2f32.ln(), 5.0]),
        )],
    );
    assert_close(y.as_f32().unwrap(), &[1.0 / 3.0, 0.0, 2.0 / 3.0, 1.0], 1e-6);
}

/// `a @ b` for row-major `a [m, k]` and `b [k, n]`, by the definition.
fn naive_matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
        }
    }
    out
}

fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..cols)
        .flat_map(|j| (0..rows).map(move |i| x[i * cols + j]))
        .collect()
}

#[test]
fn matmul_matches_naive_loop() {
    for (m, k, n) in [(2, 3, 4), (1, 5, 1), (64, 96, 80)] {
        let g = two_op(
            Op::MatMul,
            ty(DType::F32, shape![m, k]),
            ty(DType::F32, shape![k, n]),
        );
        let (a, b) = (ramp(m * k, 1), ramp(k * n, 2));
        let y = run(&g, vec![("a", f32s(&[m, k], &a)), ("b", f32s(&[k, n], &b))]);
        assert_eq!(y.shape(), &[m, n]);
        assert_close(y.as_f32().unwrap(), &naive_matmul(&a, &b, m, k, n), 1e-5);
    }
    // By hand: [[1, 2], [3, 4]] @ [[5, 6], [7, 8]].
    let g = two_op(
        Op::MatMul,
        ty(DType::F32, shape![2, 2]),
        ty(DType::F32, shape![2, 2]),
    );
    let y = run(
        &g,
        vec![
            ("a", f32s(&[2, 2], &[1., 2., 3., 4.])),
            ("b", f32s(&[2, 2], &[5., 6., 7., 8.])),
        ],
    );
    assert_eq!(y.as_f32().unwrap(), &[19., 22., 43., 50.]);
}

#[test]
fn matmul_reads_permuted_operands() {
    // A linear layer: x [B, T, in] @ permute(W [out, in], [1, 0]), W a
    // parameter, plus a transposed left operand on the second matmul.
    let (t, din, dout) = (5, 6, 4);
    let mut g = Graph::new("linear");
    let x = g
        .input("x", ty(DType::F32, shape![Sym::B, Sym::T, din]))
        .unwrap();
    let w = g
        .param("w", ty(DType::F32, shape![dout, din]), "layer")
        .unwrap();
    let wt = g.add(Op::Permute(vec![1, 0]), &[w], "layer").unwrap();
    let y = g.add(Op::MatMul, &[x, wt], "layer").unwrap();
    // z = permute(y, [0, 2, 1]) @ y : [B, out, out].
    let yt = g.add(Op::Permute(vec![0, 2, 1]), &[y], "").unwrap();
    let z = g.add(Op::MatMul, &[yt, y], "").unwrap();
    g.set_output("y", y);
    g.set_output("z", z);

    let xs = ramp(2 * t * din, 3);
    let ws = ramp(dout * din, 4);
    let params: BTreeMap<String, Arc<Tensor>> =
        [("w".to_string(), Arc::new(f32s(&[dout, din], &ws)))].into();
    let b = Bindings::new(&params)
        .sym(Sym::B, 2)
        .input("x", f32s(&[2, t, din], &xs));
    let out = eval(&g, &b).unwrap();
    let wt_v = transpose(&ws, dout, din);
    for batch in 0..2 {
        let xb = &xs[batch * t * din..(batch + 1) * t * din];
        let yb = naive_matmul(xb, &wt_v, t, din, dout);
        let got_y = &out["y"].as_f32().unwrap()[batch * t * dout..(batch + 1) * t * dout];
        assert_close(got_y, &yb, 1e-5);
        let zb = naive_matmul(&transpose(&yb, t, dout), &yb, dout, t, dout);
        let got_z = &out["z"].as_f32().unwrap()[batch * dout * dout..(batch + 1) * dout * dout];
        assert_close(got_z, &zb, 1e-5);
    }
}

#[test]
fn matmul_broadcasts_batch_axes() {
    // Grouped-query attention scores: [B, kv, g, T, d] @ [B, kv, 1, d, S].
    let (b, kv, gr, t, d, s) = (2, 3, 2, 4, 5, 6);
    let g = two_op(
        Op::MatMul,
        ty(DType::F32, shape![b, kv, gr, t, d]),
        ty(DType::F32, shape![b, kv, 1, d, s]),
    );
    let (q, k) = (ramp(b * kv * gr * t * d, 5), ramp(b * kv * d * s, 6));
    let y = run(
        &g,
        vec![
            ("a", f32s(&[b, kv, gr, t, d], &q)),
            ("b", f32s(&[b, kv, 1, d, s], &k)),
        ],
    );
    assert_eq!(y.shape(), &[b, kv, gr, t, s]);
    let y = y.as_f32().unwrap();
    for bi in 0..b {
        for h in 0..kv {
            for gi in 0..gr {
                let qi = ((bi * kv + h) * gr + gi) * t * d;
                let ki = (bi * kv + h) * d * s;
                let yi = ((bi * kv + h) * gr + gi) * t * s;
                let want = naive_matmul(&q[qi..qi + t * d], &k[ki..ki + d * s], t, d, s);
                assert_close(&y[yi..yi + t * s], &want, 1e-5);
            }
        }
    }
    // A rank-2 right operand shared by a batch of left operands.
    let g = two_op(
        Op::MatMul,
        ty(DType::F32, shape![3, 2, 4]),
        ty(DType::F32, shape![4, 5]),
    );
    let (a, w) = (ramp(24, 7), ramp(20, 8));
    let y = run(
        &g,
        vec![("a", f32s(&[3, 2, 4], &a)), ("b", f32s(&[4, 5], &w))],
    );
    assert_close(y.as_f32().unwrap(), &naive_matmul(&a, &w, 6, 4, 5), 1e-5);
    // A rank-2 left operand against a batch of right operands.
    let g = two_op(
        Op::MatMul,
        ty(DType::F32, shape![2, 4]),
        ty(DType::F32, shape![3, 4, 5]),
    );
    let (a, w) = (ramp(8, 9), ramp(60, 10));
    let y = run(
        &g,
        vec![("a", f32s(&[2, 4], &a)), ("b", f32s(&[3, 4, 5], &w))],
    );
    let want: Vec<f32> = (0..3)
        .flat_map(|i| naive_matmul(&a, &w[i * 20..(i + 1) * 20], 2, 4, 5))
        .collect();
    assert_close(y.as_f32().unwrap(), &want, 1e-5);
}

#[test]
fn permute_feeding_matmul_and_another_op_is_materialized() {
    let mut g = Graph::new("t");
    let a = g.input("a", ty(DType::F32, shape![2, 3])).unwrap();
    let at = g.add(Op::Permute(vec![1, 0]), &[a], "").unwrap();
    let m = g.add(Op::MatMul, &[at, a], "").unwrap();
    g.set_output("y", m);
    g.set_output("at", at);
    let xs = [1., 2., 3., 4., 5., 6.];
    let out = eval(&g, &Bindings::default().input("a", f32s(&[2, 3], &xs))).unwrap();
    assert_eq!(out["at"].shape(), &[3, 2]);
    assert_eq!(out["at"].as_f32().unwrap(), &[1., 4., 2., 5., 3., 6.]);
    let want = naive_matmul(&transpose(&xs, 2, 3), &xs, 3, 2, 3);
    assert_close(out["y"].as_f32().unwrap(), &want, 1e-6);
}

#[test]
fn layout_ops_move_elements() {
    let x: Vec<f32> = (0..24).map(|i| i as f32).collect();
    let x3 = || vec![("x", f32s(&[2, 3, 4], &x))];
    let t3 = || ty(DType::F32, shape![2, 3, 4]);

    let y = run(&one_op(Op::Reshape(shape![4, 6]), t3()), x3());
    assert_eq!((y.shape(), y.as_f32().unwrap()), (&[4, 6][..], &x[..]));

    // Output (i, j, k) is input (j, k, i) for perm [2, 0, 1].
    let y = run(&one_op(Op::Permute(vec![2, 0, 1]), t3()), x3());
    assert_eq!(y.shape(), &[4, 2, 3]);
    let want: Vec<f32> = (0..4)
        .flat_map(|i| (0..2).flat_map(move |j| (0..3).map(move |k| (j * 12 + k * 4 + i) as f32)))
        .collect();
    assert_eq!(y.as_f32().unwrap(), &want[..]);

    let y = run(
        &one_op(
            Op::Slice {
                axis: 1,
                start: 1,
                end: 3,
            },
            t3(),
        ),
        x3(),
    );
    assert_eq!(y.shape(), &[2, 2, 4]);
    assert_eq!(
        y.as_f32().unwrap(),
        &[4., 5., 6., 7., 8., 9., 10., 11., 16., 17., 18., 19., 20., 21., 22., 23.]
    );

    let mut g = Graph::new("t");
    let a = g.input("a", ty(DType::F32, shape![2, 1])).unwrap();
    let b = g.input("b", ty(DType::F32, shape![2, 2])).unwrap();
    let y = g.add(Op::Concat { axis: 1 }, &[a, b, a], "").unwrap();
    g.set_output("y", y);
    let y = run(
        &g,
        vec![
            ("a", f32s(&[2, 1], &[0., 9.])),
            ("b", f32s(&[2, 2], &[1., 2., 3., 4.])),
        ],
    );
    assert_eq!(y.shape(), &[2, 4]);
    assert_eq!(y.as_f32().unwrap(), &[0., 1., 2., 0., 9., 3., 4., 9.]);
}

#[test]
fn gather_indexes_rows_and_rejects_bad_ids() {
    let g = two_op(
        Op::Gather,
        ty(DType::F32, shape![3, 2]),
        ty(DType::I32, shape![Sym::B, Sym::T]),
    );
    let table = f32s(&[3, 2], &[0., 1., 10., 11., 20., 21.]);
    let y = run(
        &g,
        vec![
            ("a", table.clone()),
            ("b", Tensor::i32(vec![2, 2], vec![2, 0, 1, 1])),
        ],
    );
    assert_eq!(y.shape(), &[2, 2, 2]);
    assert_eq!(y.as_f32().unwrap(), &[20., 21., 0., 1., 10., 11., 10., 11.]);

    let b = Bindings::default()
        .input("a", table)
        .input("b", Tensor::i32(vec![1, 2], vec![0, 3]));
    let err = eval(&g, &b).unwrap_err();
    assert_eq!(
        err.to_string(),
        "gather: index 3 out of range for a table of 3 rows"
    );
}

#[test]
fn causal_mask_with_a_cache() {
    // T = 2 new queries over S = 4 keys: query i sits at position 2 + i.
    let g = one_op(Op::CausalMask, ty(DType::F32, shape![Sym::T, Sym::S]));
    let y = run(&g, vec![("x", f32s(&[2, 4], &[1.; 8]))]);
    let ninf = f32::NEG_INFINITY;
    assert_eq!(y.as_f32().unwrap(), &[1., 1., 1., ninf, 1., 1., 1., 1.]);

    // T = S = 3, batched over a leading axis: the plain lower triangle.
    let g = one_op(Op::CausalMask, ty(DType::F32, shape![2, 3, 3]));
    let y = run(&g, vec![("x", f32s(&[2, 3, 3], &[2.; 18]))]);
    let tri = [2., ninf, ninf, 2., 2., ninf, 2., 2., 2.];
    assert_eq!(&y.as_f32().unwrap()[..9], &tri);
    assert_eq!(&y.as_f32().unwrap()[9..], &tri);
}

/// Rope by its definition, in f64, with the frequencies written out.
fn rope_direct(x: &[f64], t: usize, h: usize, d: usize, pos: &[i32], theta: f64) -> Vec<f64> {
    let mut out = x.to_vec();
    for (ti, &p) in pos.iter().enumerate().take(t) {
        for hi in 0..h {
            let base = (ti * h + hi) * d;
            for i in 0..d / 2 {
                let a = p as f64 / theta.powf(2.0 * i as f64 / d as f64);
                let (x1, x2) = (x[base + i], x[base + i + d / 2]);
                out[base + i] = x1 * a.cos() - x2 * a.sin();
                out[base + i + d / 2] = x2 * a.cos() + x1 * a.sin();
            }
        }
    }
    out
}

#[test]
fn rope_matches_the_formula() {
    let (t, h, d) = (3, 2, 8);
    let spec = RopeSpec {
        theta: Scalar(10000.0),
        scaling: None,
        inverse: false,
    };
    let pos = vec![0, 5, 7];
    let x: Vec<f32> = ramp(t * h * d, 11);
    let want = rope_direct(
        &x.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        t,
        h,
        d,
        &pos,
        10000.0,
    );

    let x_ty = |dt| ty(dt, shape![1, Sym::T, h, d]);
    let p_ty = ty(DType::I32, shape![Sym::T]);
    let g = two_op(Op::Rope(spec), x_ty(DType::F64), p_ty.clone());
    let x64 = Tensor::f64(vec![1, t, h, d], x.iter().map(|&v| v as f64).collect());
    let y = run(
        &g,
        vec![("a", x64), ("b", Tensor::i32(vec![t], pos.clone()))],
    );
    let err = y
        .to_f64_vec()
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(err < 1e-12, "f64 rope off by {err}");
    // Position 0 is the identity.
    assert_eq!(
        &y.to_f64_vec()[..h * d],
        &x.iter().map(|&v| v as f64).collect::<Vec<_>>()[..h * d]
    );

    let g = two_op(Op::Rope(spec), x_ty(DType::F32), p_ty);
    let y = run(
        &g,
        vec![
            ("a", f32s(&[1, t, h, d], &x)),
            ("b", Tensor::i32(vec![t], pos)),
        ],
    );
    let want32: Vec<f32> = want.iter().map(|&v| v as f32).collect();
    assert_close(y.as_f32().unwrap(), &want32, 1e-5);
}

#[test]
fn inverse_rope_rotates_back() {
    let (t, h, d) = (3, 2, 8);
    let forward = RopeSpec {
        theta: Scalar(10000.0),
        scaling: None,
        inverse: false,
    };
    let inverse = RopeSpec {
        inverse: true,
        ..forward
    };
    let pos = vec![0, 5, 7];
    let x: Vec<f64> = ramp(t * h * d, 13).iter().map(|&v| v as f64).collect();
    let x_ty = ty(DType::F64, shape![1, Sym::T, h, d]);
    let p_ty = ty(DType::I32, shape![Sym::T]);
    let apply = |spec: RopeSpec, x: &[f64]| {
        let g = two_op(Op::Rope(spec), x_ty.clone(), p_ty.clone());
        run(
            &g,
            vec![
                ("a", Tensor::f64(vec![1, t, h, d], x.to_vec())),
                ("b", Tensor::i32(vec![t], pos.clone())),
            ],
        )
        .to_f64_vec()
    };
    // The definition at angle −a is the definition at position −p.
    let neg: Vec<i32> = pos.iter().map(|p| -p).collect();
    let want = rope_direct(&x, t, h, d, &neg, 10000.0);
    let got = apply(inverse, &x);
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(err < 1e-12, "inverse rope off by {err}");
    // And it undoes the forward rotation.
    let back = apply(inverse, &apply(forward, &x));
    let err = back
        .iter()
        .zip(&x)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(err < 1e-12, "rope then inverse rope off by {err}");
}

/// `y = sum(silu(x @ w) * x @ w, axis 1)` as a small mixed graph.
fn mlp_graph(dtype: DType) -> Graph {
    let mut g = Graph::new("mlp");
    let x = g.input("x", ty(dtype, shape![2, 3])).unwrap();
    let w = g.param("w", ty(dtype, shape![3, 3]), "").unwrap();
    let h = g.add(Op::MatMul, &[x, w], "").unwrap();
    let s = g.add(Op::Unary(UnaryOp::Silu), &[h], "").unwrap();
    let p = g.add(Op::Binary(BinaryOp::Mul), &[s, h], "").unwrap();
    let y = g
        .add(
            Op::Reduce {
                op: ReduceOp::Sum,
                axis: 1,
            },
            &[p],
            "",
        )
        .unwrap();
    g.set_output("y", y);
    g
}

#[test]
fn f64_path_agrees_with_f32_and_by_hand() {
    let xs = [1.0, -1.0, 0.5, 0.0, 2.0, -0.5];
    let ws = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
    let p64: BTreeMap<String, Tensor> = [("w".into(), Tensor::f64(vec![3, 3], ws.to_vec()))].into();
    let b = Bindings::new(&p64).input("x", Tensor::f64(vec![2, 3], xs.to_vec()));
    let y64 = eval(&mlp_graph(DType::F64), &b)
        .unwrap()
        .remove("y")
        .unwrap();
    assert_eq!((y64.dtype(), y64.shape()), (DType::F64, &[2, 1][..]));
    // With w = I, each row is sum of v² σ(v).
    let f = |v: f64| v * v / (1.0 + (-v).exp());
    let want = [f(1.0) + f(-1.0) + f(0.5), f(0.0) + f(2.0) + f(-0.5)];
    let got = y64.as_f64().unwrap();
    assert!(
        (got[0] - want[0]).abs() < 1e-14 && (got[1] - want[1]).abs() < 1e-14,
        "{got:?} vs {want:?}"
    );

    let p32: BTreeMap<String, Tensor> = [(
        "w".into(),
        Tensor::f32(vec![3, 3], ws.iter().map(|&v| v as f32).collect()),
    )]
    .into();
    let b = Bindings::new(&p32).input(
        "x",
        Tensor::f32(vec![2, 3], xs.iter().map(|&v| v as f32).collect()),
    );
    let y32 = eval(&mlp_graph(DType::F32), &b)
        .unwrap()
        .remove("y")
        .unwrap();
    assert!(y32.max_abs_diff(&y64) < 1e-6);
}

#[test]
fn mis_shaped_bindings_are_errors() {
    let g = mlp_graph(DType::F32);
    let w: BTreeMap<String, Tensor> = [("w".into(), f32s(&[3, 3], &[0.; 9]))].into();
    let err = eval(&g, &Bindings::new(&w).input("x", f32s(&[2, 4], &[0.; 8]))).unwrap_err();
    assert_eq!(
        err,
        EvalError::Mismatch {
            what: "input",
            name: "x".into(),
            expected: "f32[2, 3]".into(),
            found: "f32[2, 4]".into()
        }
    );
    assert_eq!(
        err.to_string(),
        "input \"x\": expected f32[2, 3], found f32[2, 4]"
    );

    let bad_w: BTreeMap<String, Tensor> =
        [("w".into(), Tensor::f64(vec![3, 3], vec![0.; 9]))].into();
    let err = eval(
        &g,
        &Bindings::new(&bad_w).input("x", f32s(&[2, 3], &[0.; 6])),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "parameter \"w\": expected f32[3, 3], found f64[3, 3]"
    );

    let err = eval(&g, &Bindings::default().input("x", f32s(&[2, 3], &[0.; 6]))).unwrap_err();
    assert_eq!(err, EvalError::MissingParam { name: "w".into() });

    // Symbols: bound explicitly, the expected shape shows their values.
    let g = one_op(
        Op::Unary(UnaryOp::Neg),
        ty(DType::F32, shape![Sym::B, Sym::T]),
    );
    let b = Bindings::default()
        .sym(Sym::B, 2)
        .sym(Sym::T, 3)
        .input("x", f32s(&[2, 2], &[0.; 4]));
    assert_eq!(
        eval(&g, &b).unwrap_err().to_string(),
        "input \"x\": expected f32[2, 3], found f32[2, 2]"
    );
}

#[test]
fn symbols_are_inferred_from_inputs() {
    // ids [B, T] bind B and T; positions [T] must then agree.
    let mut g = Graph::new("t");
    let ids = g
        .input("ids", ty(DType::I32, shape![Sym::B, Sym::T]))
        .unwrap();
    let pos = g.input("pos", ty(DType::I32, shape![Sym::T])).unwrap();
    let y = g.add(Op::Binary(BinaryOp::Add), &[ids, pos], "").unwrap();
    g.set_output("y", y);
    let ids_v = Tensor::i32(vec![2, 3], vec![1, 2, 3, 4, 5, 6]);
    let y = run(
        &g,
        vec![
            ("ids", ids_v.clone()),
            ("pos", Tensor::i32(vec![3], vec![10, 20, 30])),
        ],
    );
    assert_eq!(y.as_i32().unwrap(), &[11, 22, 33, 14, 25, 36]);

    let b = Bindings::default()
        .input("ids", ids_v)
        .input("pos", Tensor::i32(vec![2], vec![0, 1]));
    assert_eq!(
        eval(&g, &b).unwrap_err().to_string(),
        "input \"pos\": expected i32[3], found i32[2]"
    );
}

#[test]
fn observer_sees_every_live_node() {
    let mut g = Graph::new("t");
    let x = g.input("x", ty(DType::F32, shape![2, 3])).unwrap();
    let w = g.param("w", ty(DType::F32, shape![4, 3]), "lin").unwrap();
    let wt = g.add(Op::Permute(vec![1, 0]), &[w], "lin").unwrap();
    let y = g.add(Op::MatMul, &[x, wt], "lin").unwrap();
    let r = g.add(Op::Reshape(shape![8]), &[y], "").unwrap();
    let d = g.add(Op::Dropout { p: Scalar(0.1) }, &[r], "").unwrap();
    let _dead = g.add(Op::Unary(UnaryOp::Exp), &[x], "").unwrap();
    g.set_output("y", d);
    let ws = ramp(12, 3);
    let params: BTreeMap<String, Tensor> = [("w".into(), f32s(&[4, 3], &ws))].into();
    let b = Bindings::new(&params).input("x", f32s(&[2, 3], &[1., 0., 0., 0., 1., 0.]));
    let mut seen: Vec<(NodeId, Vec<usize>)> = Vec::new();
    let out = eval_observed(&g, &b, |id, _, t| seen.push((id, t.shape().to_vec()))).unwrap();
    assert_eq!(
        seen,
        vec![
            (x, vec![2, 3]),
            (w, vec![4, 3]),
            (wt, vec![3, 4]),
            (y, vec![2, 4]),
            (r, vec![8]),
            (d, vec![8])
        ]
    );
    // The rows of x are unit vectors, so y[i, o] = W[o, i].
    let want: Vec<f32> = (0..4)
        .map(|o| ws[o * 3])
        .chain((0..4).map(|o| ws[o * 3 + 1]))
        .collect();
    assert_eq!(out["y"].as_f32().unwrap(), &want[..]);
}

#[test]
fn eval_op_applies_one_node() {
    let mut g = Graph::new("t");
    let a = g.input("a", ty(DType::F32, shape![Sym::T, 2])).unwrap();
    let s = g.add(Op::Softmax { axis: 1 }, &[a], "blk").unwrap();
    let syms = SymValues {
        t: Some(1),
        ..SymValues::default()
    };
    let y = eval_op(g.node(s), &[&f32s(&[1, 2], &[0.0, 0.0])], &syms).unwrap();
    assert_eq!(y.as_f32().unwrap(), &[0.5, 0.5]);
    let err = eval_op(
        g.node(s),
        &[&f32s(&[1, 2], &[0.0, 0.0])],
        &SymValues::default(),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "symbol T is not bound and no input or parameter determines it (needed at softmax @ blk)"
    );
}

#[test]
fn max_abs_diff_treats_equal_infinities_as_equal() {
    let a = f32s(&[3], &[f32::NEG_INFINITY, 1.0, f32::NAN]);
    let b = f32s(&[3], &[f32::NEG_INFINITY, 1.5, f32::NAN]);
    assert_eq!(a.max_abs_diff(&b), 0.5);
    assert_eq!(
        a.max_abs_diff(&f32s(&[3], &[0.0, 1.0, f32::NAN])),
        f64::INFINITY
    );
}

/// A Llama decoder shaped like SmolLM2-135M, built from primitives, with
/// weights from a fixed generator.
fn llama_graph(layers: usize, vocab: usize) -> (Graph, BTreeMap<String, Tensor>) {
    let (hidden, heads, kv, hd, inter) = (576, 9, 3, 64, 1536);
    let f = DType::F32;
    let mut g = Graph::new("llama");
    let mut params = BTreeMap::new();
    let mut seed = 1u64;
    let mut param = |g: &mut Graph, name: &str, shape: Vec<usize>| {
        let n: usize = shape.iter().product();
        let data = (0..n)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
            })
            .collect();
        params.insert(name.to_string(), Tensor::f32(shape.clone(), data));
        g.param(
            name,
            ty(f, Shape::new(shape.into_iter().map(Dim::Const))),
            "",
        )
        .unwrap()
    };
    let op = |g: &mut Graph, op: Op, xs: &[NodeId]| g.add(op, xs, "").unwrap();
    let bin = |g: &mut Graph, b: BinaryOp, x: NodeId, y: NodeId| {
        g.add(Op::Binary(b), &[x, y], "").unwrap()
    };
    let linear = |g: &mut Graph, x: NodeId, w: NodeId| {
        let wt = g.add(Op::Permute(vec![1, 0]), &[w], "").unwrap();
        g.add(Op::MatMul, &[x, wt], "").unwrap()
    };
    let norm = |g: &mut Graph, x: NodeId, w: NodeId| {
        let sq = g.add(Op::Binary(BinaryOp::Mul), &[x, x], "").unwrap();
        let ms = g
            .add(
                Op::Reduce {
                    op: ReduceOp::Mean,
                    axis: 2,
                },
                &[sq],
                "",
            )
            .unwrap();
        let eps = g.constant(1e-5, DType::F32, "");
        let ms = g.add(Op::Binary(BinaryOp::Add), &[ms, eps], "").unwrap();
        let r = g.add(Op::Unary(UnaryOp::Rsqrt), &[ms], "").unwrap();
        let xn = g.add(Op::Binary(BinaryOp::Mul), &[x, r], "").unwrap();
        g.add(Op::Binary(BinaryOp::Mul), &[xn, w], "").unwrap()
    };
    let (b, t) = (Dim::Sym(Sym::B), Dim::Sym(Sym::T));
    let ids = g
        .input("input_ids", ty(DType::I32, shape![Sym::B, Sym::T]))
        .unwrap();
    let pos = g
        .input("positions", ty(DType::I32, shape![Sym::T]))
        .unwrap();
    let embed = param(&mut g, "model.embed_tokens.weight", vec![vocab, hidden]);
    let mut x = op(&mut g, Op::Gather, &[embed, ids]);
    let rope = Op::Rope(RopeSpec {
        theta: Scalar(100000.0),
        scaling: None,
        inverse: false,
    });
    let sh = |dims: Vec<Dim>| Shape::new(dims);
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        let w_in = param(&mut g, &format!("{p}.input_layernorm.weight"), vec![hidden]);
        let h = norm(&mut g, x, w_in);
        let wq = param(
            &mut g,
            &format!("{p}.self_attn.q_proj.weight"),
            vec![heads * hd, hidden],
        );
        let wk = param(
            &mut g,
            &format!("{p}.self_attn.k_proj.weight"),
            vec![kv * hd, hidden],
        );
        let wv = param(
            &mut g,
            &format!("{p}.self_attn.v_proj.weight"),
            vec![kv * hd, hidden],
        );
        let wo = param(
            &mut g,
            &format!("{p}.self_attn.o_proj.weight"),
            vec![hidden, heads * hd],
        );
        let q = linear(&mut g, h, wq);
        let q = op(
            &mut g,
            Op::Reshape(sh(vec![b, t, heads.into(), hd.into()])),
            &[q],
        );
        let q = op(&mut g, rope.clone(), &[q, pos]);
        let q = op(&mut g, Op::Permute(vec![0, 2, 1, 3]), &[q]);
        let q = op(
            &mut g,
            Op::Reshape(sh(vec![b, kv.into(), (heads / kv).into(), t, hd.into()])),
            &[q],
        );
        let k = linear(&mut g, h, wk);
        let k = op(
            &mut g,
            Op::Reshape(sh(vec![b, t, kv.into(), hd.into()])),
            &[k],
        );
        let k = op(&mut g, rope.clone(), &[k, pos]);
        let k = op(&mut g, Op::Permute(vec![0, 2, 1, 3]), &[k]);
        let k = op(
            &mut g,
            Op::Reshape(sh(vec![b, kv.into(), 1.into(), t, hd.into()])),
            &[k],
        );
        let kt = op(&mut g, Op::Permute(vec![0, 1, 2, 4, 3]), &[k]);
        let v = linear(&mut g, h, wv);
        let v = op(
            &mut g,
            Op::Reshape(sh(vec![b, t, kv.into(), hd.into()])),
            &[v],
        );
        let v = op(&mut g, Op::Permute(vec![0, 2, 1, 3]), &[v]);
        let v = op(
            &mut g,
            Op::Reshape(sh(vec![b, kv.into(), 1.into(), t, hd.into()])),
            &[v],
        );
        let s = op(&mut g, Op::MatMul, &[q, kt]);
        let scale = g.constant(1.0 / (hd as f64).sqrt(), DType::F32, "");
        let s = bin(&mut g, BinaryOp::Mul, s, scale);
        let s = op(&mut g, Op::CausalMask, &[s]);
        let a = op(&mut g, Op::Softmax { axis: 4 }, &[s]);
        let o = op(&mut g, Op::MatMul, &[a, v]);
        let o = op(
            &mut g,
            Op::Reshape(sh(vec![b, heads.into(), t, hd.into()])),
            &[o],
        );
        let o = op(&mut g, Op::Permute(vec![0, 2, 1, 3]), &[o]);
        let o = op(&mut g, Op::Reshape(sh(vec![b, t, hidden.into()])), &[o]);
        let o = linear(&mut g, o, wo);
        x = bin(&mut g, BinaryOp::Add, x, o);
        let w_post = param(
            &mut g,
            &format!("{p}.post_attention_layernorm.weight"),
            vec![hidden],
        );
        let h = norm(&mut g, x, w_post);
        let wg = param(
            &mut g,
            &format!("{p}.mlp.gate_proj.weight"),
            vec![inter, hidden],
        );
        let wu = param(
            &mut g,
            &format!("{p}.mlp.up_proj.weight"),
            vec![inter, hidden],
        );
        let wd = param(
            &mut g,
            &format!("{p}.mlp.down_proj.weight"),
            vec![hidden, inter],
        );
        let gate = linear(&mut g, h, wg);
        let gate = op(&mut g, Op::Unary(UnaryOp::Silu), &[gate]);
        let up = linear(&mut g, h, wu);
        let m = bin(&mut g, BinaryOp::Mul, gate, up);
        let m = linear(&mut g, m, wd);
        x = bin(&mut g, BinaryOp::Add, x, m);
    }
    let w_norm = param(&mut g, "model.norm.weight", vec![hidden]);
    let h = norm(&mut g, x, w_norm);
    let logits = linear(&mut g, h, embed);
    g.set_output("logits", logits);
    crate::verify(&g).expect("the test model verifies");
    (g, params)
}

#[test]
fn llama_logits_are_causal() {
    // The logits at a position depend only on the tokens up to it, so a
    // prefix of the prompt gives the same logits for that prefix. This
    // exercises gather, norms, rope, the lazy transposes and the mask together.
    let (g, params) = llama_graph(2, 64);
    let ids = vec![5, 17, 3, 42, 8, 61];
    let logits = |n: usize| {
        let b = Bindings::new(&params)
            .input("input_ids", Tensor::i32(vec![1, n], ids[..n].to_vec()))
            .input("positions", Tensor::i32(vec![n], (0..n as i32).collect()));
        eval(&g, &b).unwrap().remove("logits").unwrap()
    };
    let (full, prefix) = (logits(6), logits(4));
    let head = Tensor::f32(vec![1, 4, 64], full.as_f32().unwrap()[..4 * 64].to_vec());
    assert!(
        head.max_abs_diff(&prefix) < 1e-5,
        "{}",
        head.max_abs_diff(&prefix)
    );
    // The last positions do see the earlier ones: changing token 0 moves them.
    let mut other = ids.clone();
    other[0] = 6;
    let b = Bindings::new(&params)
        .input("input_ids", Tensor::i32(vec![1, 6], other))
        .input("positions", Tensor::i32(vec![6], (0..6).collect()));
    let moved = eval(&g, &b).unwrap().remove("logits").unwrap();
    assert!(moved.max_abs_diff(&full) > 1e-4);
}

// ------------------------------------------------------------- fused ops

/// `y = attention{causal, scale}(q, k, v)` against a direct loop in f64 and
/// against the primitive decomposition the op's doc comment gives.
#[test]
fn attention_matches_a_direct_loop_and_its_decomposition() {
    let (h, t, s, d, dv) = (2usize, 3usize, 5usize, 4usize, 3usize);
    let q = f32s(&[1, h, t, d], &ramp(h * t * d, 1));
    let k = f32s(&[1, h, s, d], &ramp(h * s * d, 2));
    let v = f32s(&[1, h, s, dv], &ramp(h * s * dv, 3));
    for causal in [false, true] {
        let scale = 0.7;
        let mut g = Graph::new("t");
        let qi = g.input("q", ty(DType::F32, shape![1, h, t, d])).unwrap();
        let ki = g.input("k", ty(DType::F32, shape![1, h, s, d])).unwrap();
        let vi = g.input("v", ty(DType::F32, shape![1, h, s, dv])).unwrap();
        let fused = g
            .add(
                Op::Attention {
                    causal,
                    scale: Scalar(scale),
                },
                &[qi, ki, vi],
                "",
            )
            .unwrap();
        let kt = g.add(Op::Permute(vec![0, 1, 3, 2]), &[ki], "").unwrap();
        let sc = g.add(Op::MatMul, &[qi, kt], "").unwrap();
        let c = g.constant(scale, DType::F32, "");
        let mut sc = g.add(Op::Binary(BinaryOp::Mul), &[sc, c], "").unwrap();
        if causal {
            sc = g.add(Op::CausalMask, &[sc], "").unwrap();
        }
        let p = g.add(Op::Softmax { axis: 3 }, &[sc], "").unwrap();
        let prim = g.add(Op::MatMul, &[p, vi], "").unwrap();
        g.set_output("fused", fused);
        g.set_output("prim", prim);
        let b = Bindings::default()
            .input("q", q.clone())
            .input("k", k.clone())
            .input("v", v.clone());
        let out = eval(&g, &b).unwrap();
        let (qf, kf, vf) = (q.to_f64_vec(), k.to_f64_vec(), v.to_f64_vec());
        let mut want = Vec::new();
        for hh in 0..h {
            for i in 0..t {
                let mut sc: Vec<f64> = (0..s)
                    .map(|j| {
                        let dot: f64 = (0..d)
                            .map(|x| qf[(hh * t + i) * d + x] * kf[(hh * s + j) * d + x])
                            .sum();
                        if causal && j > i + (s - t) {
                            f64::NEG_INFINITY
                        } else {
                            dot * scale
                        }
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                sc.iter_mut().for_each(|x| *x = (*x - m).exp());
                let z: f64 = sc.iter().sum();
                for y in 0..dv {
                    let o: f64 = (0..s).map(|j| sc[j] / z * vf[(hh * s + j) * dv + y]).sum();
                    want.push(o as f32);
                }
            }
        }
        assert_close(out["fused"].as_f32().unwrap(), &want, 1e-5);
        assert_close(out["prim"].as_f32().unwrap(), &want, 1e-5);
    }
}

/// `attention_with_lse` against its decomposition
/// (`concat{last}(attention, attention_lse)`) and against a direct loop in
/// f64 for both parts: GQA's keys and values broadcast over the query
/// groups, fewer queries than keys, causal and not.
#[test]
fn attention_with_lse_matches_a_direct_loop_and_its_decomposition() {
    let (kv, grp, t, s, d, dv) = (2usize, 2usize, 3usize, 5usize, 4usize, 3usize);
    let q = f32s(&[1, kv, grp, t, d], &ramp(kv * grp * t * d, 1));
    let k = f32s(&[1, kv, 1, s, d], &ramp(kv * s * d, 2));
    let v = f32s(&[1, kv, 1, s, dv], &ramp(kv * s * dv, 3));
    for causal in [false, true] {
        let scale = Scalar(0.7);
        let mut g = Graph::new("t");
        let qi = g
            .input("q", ty(DType::F32, shape![1, kv, grp, t, d]))
            .unwrap();
        let ki = g
            .input("k", ty(DType::F32, shape![1, kv, 1, s, d]))
            .unwrap();
        let vi = g
            .input("v", ty(DType::F32, shape![1, kv, 1, s, dv]))
            .unwrap();
        let fused = g
            .add(Op::AttentionWithLse { causal, scale }, &[qi, ki, vi], "")
            .unwrap();
        assert_eq!(g.node(fused).ty.shape, shape![1, kv, grp, t, dv + 1]);
        let out = g
            .add(Op::Attention { causal, scale }, &[qi, ki, vi], "")
            .unwrap();
        let lse = g
            .add(Op::AttentionLse { causal, scale }, &[qi, ki], "")
            .unwrap();
        let parts = g.add(Op::Concat { axis: 4 }, &[out, lse], "").unwrap();
        g.set_output("fused", fused);
        g.set_output("parts", parts);
        let b = Bindings::default()
            .input("q", q.clone())
            .input("k", k.clone())
            .input("v", v.clone());
        let got = eval(&g, &b).unwrap();
        let (qf, kf, vf) = (q.to_f64_vec(), k.to_f64_vec(), v.to_f64_vec());
        let mut want = Vec::new();
        for h in 0..kv {
            for row in 0..grp * t {
                let i = row % t;
                let sc: Vec<f64> = (0..s)
                    .map(|j| {
                        let dot: f64 = (0..d)
                            .map(|x| qf[(h * grp * t + row) * d + x] * kf[(h * s + j) * d + x])
                            .sum();
                        if causal && j > i + (s - t) {
                            f64::NEG_INFINITY
                        } else {
                            dot * scale.0
                        }
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for y in 0..dv {
                    let o: f64 = (0..s).map(|j| e[j] / z * vf[(h * s + j) * dv + y]).sum();
                    want.push(o as f32);
                }
                want.push((m + z.ln()) as f32);
            }
        }
        assert_close(got["fused"].as_f32().unwrap(), &want, 1e-5);
        assert_close(got["parts"].as_f32().unwrap(), &want, 1e-5);
    }
}

/// Attention's statistics are typed in `DType::stats`: `f32` for
/// half-precision q (so never rounded to q's dtype), q's dtype otherwise;
/// `attention_grad` takes its `lse` and `delta` in that dtype only.
#[test]
fn attention_statistics_are_f32_for_half_precision() {
    let (t, s, d, dv) = (3usize, 5usize, 4usize, 3usize);
    let (causal, scale) = (true, Scalar(0.7));
    for (dtype, stats) in [
        (DType::BF16, DType::F32),
        (DType::F16, DType::F32),
        (DType::F32, DType::F32),
        (DType::F64, DType::F64),
    ] {
        let mut g = Graph::new("t");
        let q = g.input("q", ty(dtype, shape![2, t, d])).unwrap();
        let k = g.input("k", ty(dtype, shape![2, s, d])).unwrap();
        let v = g.input("v", ty(dtype, shape![2, s, dv])).unwrap();
        let y = g
            .add(Op::Attention { causal, scale }, &[q, k, v], "")
            .unwrap();
        let lse = g
            .add(Op::AttentionLse { causal, scale }, &[q, k], "")
            .unwrap();
        let both = g
            .add(Op::AttentionWithLse { causal, scale }, &[q, k, v], "")
            .unwrap();
        assert_eq!(g.node(y).ty, ty(dtype, shape![2, t, dv]));
        assert_eq!(g.node(lse).ty, ty(stats, shape![2, t, 1]));
        assert_eq!(g.node(both).ty, ty(stats, shape![2, t, dv + 1]));
        let grad = Op::AttentionGrad {
            causal,
            scale,
            wrt: AttnArg::Q,
        };
        let ok = g.add(grad.clone(), &[q, k, v, y, lse, lse], "").unwrap();
        assert_eq!(g.node(ok).ty, ty(dtype, shape![2, t, d]));
        if stats != dtype {
            // Statistics rounded to q's dtype are refused.
            let narrow = g.add(Op::Cast(dtype), &[lse], "").unwrap();
            let err = g
                .add(grad.clone(), &[q, k, v, y, narrow, lse], "")
                .unwrap_err();
            assert_eq!(
                err.message,
                format!(
                    "attention_grad needs lse f32[2, {t}, 1] (attention's statistics are f32 \
                     for {dtype} q), got {dtype}[2, {t}, 1]"
                )
            );
            let err = g.add(grad, &[q, k, v, y, lse, narrow], "").unwrap_err();
            assert!(err.message.contains("needs delta f32"), "{}", err.message);
        }
    }
}

/// For bf16 q the reference computes `attention_with_lse` in f32 and does
/// not round it: its attention part cast to bf16 is exactly `attention`
/// (rounded once), its log-sum-exp part exactly `attention_lse`, and the
/// part itself is off the bf16 grid.
#[test]
fn half_precision_attention_with_lse_is_unrounded_f32() {
    let (t, s, d, dv) = (3usize, 5usize, 4usize, 3usize);
    let bf = |shape: &[usize], seed| {
        let n = shape.iter().product();
        let v = ramp(n, seed).into_iter().map(round_bf16).collect();
        Tensor::new(DType::BF16, shape.to_vec(), Storage::F32(v))
    };
    for causal in [false, true] {
        let scale = Scalar(0.7);
        let mut g = Graph::new("t");
        let bt = |dims: Shape| ty(DType::BF16, dims);
        let q = g.input("q", bt(shape![2, t, d])).unwrap();
        let k = g.input("k", bt(shape![2, s, d])).unwrap();
        let v = g.input("v", bt(shape![2, s, dv])).unwrap();
        let both = g
            .add(Op::AttentionWithLse { causal, scale }, &[q, k, v], "")
            .unwrap();
        let part = |g: &mut Graph, start, end| {
            let op = Op::Slice {
                axis: 2,
                start,
                end,
            };
            g.add(op, &[both], "").unwrap()
        };
        let out = part(&mut g, 0, dv);
        let out_bf16 = g.add(Op::Cast(DType::BF16), &[out], "").unwrap();
        let lse_part = part(&mut g, dv, dv + 1);
        let y = g
            .add(Op::Attention { causal, scale }, &[q, k, v], "")
            .unwrap();
        let lse = g
            .add(Op::AttentionLse { causal, scale }, &[q, k], "")
            .unwrap();
        for (name, id) in [
            ("out", out),
            ("out_bf16", out_bf16),
            ("lse_part", lse_part),
            ("y", y),
            ("lse", lse),
        ] {
            g.set_output(name, id);
        }
        let b = Bindings::default()
            .input("q", bf(&[2, t, d], 1))
            .input("k", bf(&[2, s, d], 2))
            .input("v", bf(&[2, s, dv], 3));
        let got = eval(&g, &b).unwrap();
        assert_eq!(got["out"].dtype(), DType::F32);
        assert_eq!(got["out_bf16"], got["y"]);
        assert_eq!(got["lse_part"], got["lse"]);
        let unrounded = |t: &Tensor| t.as_f32().unwrap().iter().any(|&x| round_bf16(x) != x);
        assert!(unrounded(&got["out"]), "{:?}", got["out"]);
        assert!(unrounded(&got["lse"]), "{:?}", got["lse"]);
    }
}

/// Autodiff's attention rule in bf16: the log-sum-exp it recomputes and
/// `delta` are f32, `delta` summed from the widened adjoint and output,
/// and the gradients agree with the f32 graph's on the same values.
#[test]
fn half_precision_attention_backward_keeps_f32_statistics() {
    use crate::autodiff::{differentiate, grad_name};
    let (t, s, d, dv) = (4usize, 6usize, 8usize, 4usize);
    let graph = |dtype: DType| {
        let mut g = Graph::new("t");
        let q = g.param("q", ty(dtype, shape![2, t, d]), "").unwrap();
        let k = g.param("k", ty(dtype, shape![2, s, d]), "").unwrap();
        let v = g.param("v", ty(dtype, shape![2, s, dv]), "").unwrap();
        let w = g.input("w", ty(dtype, shape![2, t, dv])).unwrap();
        let y = g
            .add(
                Op::Attention {
                    causal: true,
                    scale: Scalar(0.5),
                },
                &[q, k, v],
                "attn",
            )
            .unwrap();
        let mut l = g.add(Op::Binary(BinaryOp::Mul), &[y, w], "").unwrap();
        for axis in 0..3 {
            let op = Op::Reduce {
                op: ReduceOp::Sum,
                axis,
            };
            l = g.add(op, &[l], "").unwrap();
        }
        let l = g.add(Op::Reshape(Shape::scalar()), &[l], "").unwrap();
        g.set_output("loss", l);
        let names = ["q", "k", "v"].map(String::from);
        differentiate(&g, "loss", &names).unwrap()
    };
    let dg = graph(DType::BF16);
    let mut grads = 0;
    for id in dg.node_ids() {
        match dg.node(id).op {
            Op::AttentionLse { .. } => assert_eq!(dg.node(id).ty.dtype, DType::F32),
            Op::AttentionGrad { .. } => {
                grads += 1;
                let xs = dg.operands(id);
                let delta = dg.node(xs[5]);
                assert_eq!(delta.ty.dtype, DType::F32);
                // delta = sum(mul(cast(dout), cast(out))).
                let prod = dg.operands(xs[5])[0];
                for x in dg.operands(prod) {
                    assert_eq!(dg.node(x).op, Op::Cast(DType::F32));
                }
            }
            _ => {}
        }
    }
    assert_eq!(grads, 2, "q's gradient and k's and v's together");
    let on_grid = |shape: &[usize], seed| {
        let n = shape.iter().product();
        let v: Vec<f32> = ramp(n, seed).into_iter().map(round_bf16).collect();
        Tensor::f32(shape.to_vec(), v)
    };
    let params: BTreeMap<String, Tensor> = [
        ("q", on_grid(&[2, t, d], 1)),
        ("k", on_grid(&[2, s, d], 2)),
        ("v", on_grid(&[2, s, dv], 3)),
    ]
    .into_iter()
    .map(|(n, t)| (n.to_string(), t))
    .collect();
    let w = on_grid(&[2, t, dv], 4);
    let run = |g: &Graph| eval(g, &Bindings::new(&params).input("w", w.clone())).unwrap();
    let (half, full) = (run(&dg), run(&graph(DType::F32)));
    for name in ["q", "k", "v"] {
        let (a, b) = (
            half[&grad_name(name)].to_f64_vec(),
            full[&grad_name(name)].to_f64_vec(),
        );
        let err: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f64>();
        let norm: f64 = b.iter().map(|y| y * y).sum::<f64>();
        assert!(
            err.sqrt() <= 2e-2 * norm.sqrt(),
            "grad {name}: relative error {}",
            (err / norm).sqrt()
        );
    }
}

#[test]
fn rms_norm_matches_the_formula_and_the_primitives() {
    let (rows, d) = (3usize, 5usize);
    let x = f32s(&[rows, d], &ramp(rows * d, 4));
    let w = f32s(&[d], &ramp(d, 5));
    let eps = 1e-5;
    let mut g = Graph::new("t");
    let xi = g.input("x", ty(DType::F32, shape![rows, d])).unwrap();
    let wi = g.input("w", ty(DType::F32, shape![d])).unwrap();
    let fused = g
        .add(Op::RmsNorm { eps: Scalar(eps) }, &[xi, wi], "")
        .unwrap();
    let sq = g.add(Op::Binary(BinaryOp::Mul), &[xi, xi], "").unwrap();
    let ms = g
        .add(
            Op::Reduce {
                op: ReduceOp::Mean,
                axis: 1,
            },
            &[sq],
            "",
        )
        .unwrap();
    let e = g.constant(eps, DType::F32, "");
    let v = g.add(Op::Binary(BinaryOp::Add), &[ms, e], "").unwrap();
    let inv = g.add(Op::Unary(UnaryOp::Rsqrt), &[v], "").unwrap();
    let xn = g.add(Op::Binary(BinaryOp::Mul), &[xi, inv], "").unwrap();
    let prim = g.add(Op::Binary(BinaryOp::Mul), &[xn, wi], "").unwrap();
    g.set_output("fused", fused);
    g.set_output("prim", prim);
    let out = eval(
        &g,
        &Bindings::default()
            .input("x", x.clone())
            .input("w", w.clone()),
    )
    .unwrap();
    let (xf, wf) = (x.to_f64_vec(), w.to_f64_vec());
    let want: Vec<f32> = xf
        .chunks(d)
        .flat_map(|r| {
            let inv = 1.0 / (r.iter().map(|v| v * v).sum::<f64>() / d as f64 + eps).sqrt();
            r.iter()
                .zip(&wf)
                .map(move |(v, g)| (v * inv * g) as f32)
                .collect::<Vec<_>>()
        })
        .collect();
    assert_close(out["fused"].as_f32().unwrap(), &want, 1e-6);
    assert_close(out["prim"].as_f32().unwrap(), &want, 1e-6);
}

/// A half-precision `rms_norm` is the chain lowering writes for bf16 and
/// f16 models (widen, normalize in f32, narrow, times `w`), value for value;
/// its gradients are the f64 formula's, rounded once.
#[test]
fn half_rms_norm_is_the_lowered_chain_and_its_gradient_the_formula() {
    use crate::reference::tensor::{round_bf16, round_f16};
    let (rows, d) = (4usize, 24usize);
    let eps = 1e-5;
    for (dt, round) in [
        (DType::BF16, round_bf16 as fn(f32) -> f32),
        (DType::F16, round_f16),
    ] {
        let on_grid = |v: Vec<f32>| v.into_iter().map(round).collect::<Vec<_>>();
        let xv = on_grid(ramp(rows * d, 4).iter().map(|v| v * 3.0).collect());
        let wv = on_grid(ramp(d, 5).iter().map(|v| 1.0 + v / 2.0).collect());
        let gv = on_grid(ramp(rows * d, 6));
        let mut g = Graph::new("t");
        let xi = g.input("x", ty(dt, shape![rows, d])).unwrap();
        let wi = g.input("w", ty(dt, shape![d])).unwrap();
        let gi = g.input("dy", ty(dt, shape![rows, d])).unwrap();
        let e = Scalar(eps);
        let fused = g.add(Op::RmsNorm { eps: e }, &[xi, wi], "").unwrap();
        let x32 = g.add(Op::Cast(DType::F32), &[xi], "").unwrap();
        let sq = g.add(Op::Binary(BinaryOp::Mul), &[x32, x32], "").unwrap();
        let mean = Op::Reduce {
            op: ReduceOp::Mean,
            axis: 1,
        };
        let ms = g.add(mean, &[sq], "").unwrap();
        let c = g.constant(eps, DType::F32, "");
        let v = g.add(Op::Binary(BinaryOp::Add), &[ms, c], "").unwrap();
        let inv = g.add(Op::Unary(UnaryOp::Rsqrt), &[v], "").unwrap();
        let xn = g.add(Op::Binary(BinaryOp::Mul), &[x32, inv], "").unwrap();
        let xn = g.add(Op::Cast(dt), &[xn], "").unwrap();
        let prim = g.add(Op::Binary(BinaryOp::Mul), &[xn, wi], "").unwrap();
        g.set_output("fused", fused);
        g.set_output("prim", prim);
        for (name, wrt) in [("dx", NormArg::X), ("dw", NormArg::W)] {
            let n = g
                .add(Op::RmsNormGrad { eps: e, wrt }, &[xi, wi, gi], "")
                .unwrap();
            g.set_output(name, n);
        }
        let half = |shape: Vec<usize>, v: &[f32]| Tensor::from_f32_as(dt, shape, v.to_vec());
        let out = eval(
            &g,
            &Bindings::default()
                .input("x", half(vec![rows, d], &xv))
                .input("w", half(vec![d], &wv))
                .input("dy", half(vec![rows, d], &gv)),
        )
        .unwrap();
        assert_eq!(
            out["fused"].as_f32().unwrap(),
            out["prim"].as_f32().unwrap(),
            "{dt}"
        );
        // The gradients in f64, then rounded once to the grid.
        let (mut dx, mut dw) = (Vec::new(), vec![0.0f64; d]);
        for (xr, gr) in xv.chunks(d).zip(gv.chunks(d)) {
            let x: Vec<f64> = xr.iter().map(|&v| v as f64).collect();
            let r = 1.0 / (x.iter().map(|v| v * v).sum::<f64>() / d as f64 + eps).sqrt();
            let t: f64 = (0..d).map(|j| gr[j] as f64 * wv[j] as f64 * x[j]).sum();
            for j in 0..d {
                let gj = gr[j] as f64 * wv[j] as f64;
                dx.push(round((r * gj - x[j] * r * r * r * t / d as f64) as f32));
                dw[j] += gr[j] as f64 * round((x[j] * r) as f32) as f64;
            }
        }
        let dw: Vec<f32> = dw.into_iter().map(|v| round(v as f32)).collect();
        let ulp = if dt == DType::BF16 {
            1.0 / 128.0
        } else {
            1.0 / 1024.0
        };
        for (name, want) in [("dx", &dx), ("dw", &dw)] {
            let got = out[name].as_f32().unwrap();
            for (a, b) in got.iter().zip(want.iter()) {
                assert!(
                    (a - b).abs() <= ulp * b.abs().max(1e-3),
                    "{dt} {name}: {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn cross_entropy_matches_hand_values() {
    let mut g = Graph::new("t");
    let l = g.input("logits", ty(DType::F32, shape![2, 3])).unwrap();
    let t = g.input("targets", ty(DType::I32, shape![2])).unwrap();
    let y = g.add(Op::CrossEntropy, &[l, t], "").unwrap();
    g.set_output("y", y);
    let logits = f32s(&[2, 3], &[1.0, 2.0, 3.0, 0.0, 0.0, 0.0]);
    let got = run(
        &g,
        vec![
            ("logits", logits.clone()),
            ("targets", Tensor::i32(vec![2], vec![2, 0])),
        ],
    );
    // log(e + e² + e³) − 3 and log 3 − 0.
    assert_close(got.as_f32().unwrap(), &[0.407_605_96, 1.098_612_3], 1e-6);
    let b = Bindings::default()
        .input("logits", logits)
        .input("targets", Tensor::i32(vec![2], vec![3, 0]));
    let err = eval(&g, &b).unwrap_err().to_string();
    assert!(err.contains("target 3 is outside 0..3"), "{err}");
}

#[test]
fn cross_entropy_grad_is_softmax_minus_one_hot_times_g() {
    let (rows, v) = (3, 5);
    let mut g = Graph::new("t");
    let l = g.input("logits", ty(DType::F64, shape![rows, v])).unwrap();
    let t = g.input("targets", ty(DType::I32, shape![rows])).unwrap();
    let gy = g.input("g", ty(DType::F64, shape![rows])).unwrap();
    let fused = g.add(Op::CrossEntropyGrad, &[l, t, gy], "").unwrap();
    g.set_output("fused", fused);
    // The decomposition autodiff used to emit.
    let p = g.add(Op::Softmax { axis: 1 }, &[l], "").unwrap();
    let one_hot = Op::OneHot {
        depth: v,
        dtype: DType::F64,
    };
    let hot = g.add(one_hot, &[t], "").unwrap();
    let d = g.add(Op::Binary(BinaryOp::Sub), &[p, hot], "").unwrap();
    let g1 = g.add(Op::Reshape(shape![rows, 1]), &[gy], "").unwrap();
    let prim = g.add(Op::Binary(BinaryOp::Mul), &[d, g1], "").unwrap();
    g.set_output("prim", prim);
    let logits: Vec<f64> = ramp(rows * v, 17).iter().map(|&x| 3.0 * x as f64).collect();
    let b = Bindings::default()
        .input("logits", Tensor::f64(vec![rows, v], logits))
        .input("targets", Tensor::i32(vec![rows], vec![4, 0, 2]))
        .input("g", Tensor::f64(vec![rows], vec![0.5, -1.0, 2.0]));
    let out = eval(&g, &b).unwrap();
    let (f, p) = (out["fused"].to_f64_vec(), out["prim"].to_f64_vec());
    let err = f
        .iter()
        .zip(&p)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(err < 1e-12, "fused cross-entropy gradient off by {err}");
    // Each row sums to zero (softmax sums to one, minus one hot).
    for row in f.chunks(v) {
        assert!(row.iter().sum::<f64>().abs() < 1e-12);
    }
    // The loss adjoint must match the rows.
    let mut bad = Graph::new("t");
    let l = bad
        .input("logits", ty(DType::F64, shape![rows, v]))
        .unwrap();
    let t = bad.input("targets", ty(DType::I32, shape![rows])).unwrap();
    let gy = bad.input("g", ty(DType::F64, shape![rows, 1])).unwrap();
    let err = bad.add(Op::CrossEntropyGrad, &[l, t, gy], "").unwrap_err();
    assert!(err.to_string().contains("loss adjoint"), "{err}");
}

#[test]
fn elementwise_programs_match_their_primitives() {
    use crate::op::{ElemInstr, ElemProgram};
    // silu(a) · w + 0.5, with w [4] broadcast over a [2, 4].
    let prog = ElemProgram(vec![
        ElemInstr::Input(0),
        ElemInstr::Unary(UnaryOp::Silu, 0),
        ElemInstr::Input(1),
        ElemInstr::Binary(BinaryOp::Mul, 1, 2),
        ElemInstr::Const(Scalar(0.5)),
        ElemInstr::Binary(BinaryOp::Add, 3, 4),
    ]);
    let mut g = Graph::new("t");
    let a = g.input("a", ty(DType::F32, shape![2, 4])).unwrap();
    let w = g.input("w", ty(DType::F32, shape![4])).unwrap();
    let fused = g.add(Op::Elementwise(prog), &[a, w], "").unwrap();
    let s = g.add(Op::Unary(UnaryOp::Silu), &[a], "").unwrap();
    let m = g.add(Op::Binary(BinaryOp::Mul), &[s, w], "").unwrap();
    let c = g.constant(0.5, DType::F32, "");
    let prim = g.add(Op::Binary(BinaryOp::Add), &[m, c], "").unwrap();
    g.set_output("fused", fused);
    g.set_output("prim", prim);
    let av = ramp(8, 6);
    let wv = ramp(4, 7);
    let out = eval(
        &g,
        &Bindings::default()
            .input("a", f32s(&[2, 4], &av))
            .input("w", f32s(&[4], &wv)),
    )
    .unwrap();
    let want: Vec<f32> = (0..8)
        .map(|i| {
            let x = av[i] as f64;
            (x / (1.0 + (-x).exp()) * wv[i % 4] as f64 + 0.5) as f32
        })
        .collect();
    assert_close(out["fused"].as_f32().unwrap(), &want, 1e-6);
    assert_close(out["prim"].as_f32().unwrap(), &want, 1e-6);

    // A result that reads only the smaller operand is broadcast to the
    // operands' common shape.
    let prog = ElemProgram(vec![ElemInstr::Input(1), ElemInstr::Unary(UnaryOp::Neg, 0)]);
    let g = two_op(
        Op::Elementwise(prog),
        ty(DType::F32, shape![2, 4]),
        ty(DType::F32, shape![4]),
    );
    let got = run(&g, vec![("a", f32s(&[2, 4], &av)), ("b", f32s(&[4], &wv))]);
    assert_eq!(got.shape(), &[2, 4]);
    let want: Vec<f32> = (0..8).map(|i| -wv[i % 4]).collect();
    assert_close(got.as_f32().unwrap(), &want, 0.0);
}

// ------------------------------------------------------- KV-cache storage

/// `dequantize(quantize(x))` through the evaluator is `crate::quant`'s row
/// round trip, and stays within each format's error bound.
#[test]
fn quantize_round_trips_through_the_evaluator() {
    use crate::quant::QuantFormat;
    let x = f32s(&[2, 3, 64], &ramp(2 * 3 * 64, 9));
    for f in [QuantFormat::Q8, QuantFormat::Q4, QuantFormat::Nf4] {
        let mut g = Graph::new("t");
        let xi = g.input("x", ty(DType::F32, shape![2, 3, 64])).unwrap();
        let q = g.add(Op::Quantize(f), &[xi], "").unwrap();
        assert_eq!(
            g.node(q).ty,
            ty(DType::I32, shape![2, 3, f.words(64).unwrap()])
        );
        let y = g
            .add(
                Op::Dequantize {
                    format: f,
                    dtype: DType::F32,
                },
                &[q],
                "",
            )
            .unwrap();
        g.set_output("y", y);
        let got = run(&g, vec![("x", x.clone())]);
        assert_eq!(got.shape(), &[2, 3, 64]);
        let mut want = Vec::new();
        for row in x.as_f32().unwrap().chunks(64) {
            let mut w = vec![0; f.words(64).unwrap()];
            f.quantize_row(row, &mut w);
            let mut r = vec![0.0; 64];
            f.dequantize_row(&w, &mut r);
            want.extend(r);
        }
        assert_eq!(got.as_f32().unwrap(), &want[..], "{f}");
        let tol = match f {
            QuantFormat::Q8 => 1.0 / 254.0,
            _ => 0.16,
        };
        assert_close(got.as_f32().unwrap(), x.as_f32().unwrap(), tol);
    }
    // Rows that are not whole blocks are a type error.
    let mut g = Graph::new("t");
    let xi = g.input("x", ty(DType::F32, shape![2, 48])).unwrap();
    let e = g.add(Op::Quantize(QuantFormat::Q8), &[xi], "").unwrap_err();
    assert!(e.message.contains("multiple of 32"), "{}", e.message);
}

/// Appending new positions `T` to `P` cached ones gives the `S` attended
/// ones; `S` is then known from `P` and `T`.
#[test]
fn concat_of_cached_and_new_positions_is_s() {
    let mut g = Graph::new("t");
    let past = g
        .input(
            "past",
            ty(DType::F32, Shape::new([Dim::Sym(Sym::P), Dim::Const(2)])),
        )
        .unwrap();
    let new = g
        .input(
            "new",
            ty(DType::F32, Shape::new([Dim::Sym(Sym::T), Dim::Const(2)])),
        )
        .unwrap();
    let all = g.add(Op::Concat { axis: 0 }, &[past, new], "").unwrap();
    assert_eq!(
        g.node(all).ty.shape,
        Shape::new([Dim::Sym(Sym::S), Dim::Const(2)])
    );
    assert!(g.add(Op::Concat { axis: 0 }, &[new, past], "").is_err());
    g.set_output("y", all);
    let got = run(
        &g,
        vec![
            ("past", f32s(&[3, 2], &[1., 2., 3., 4., 5., 6.])),
            ("new", f32s(&[1, 2], &[7., 8.])),
        ],
    );
    assert_eq!(got.shape(), &[4, 2]);
    // An empty cache (P = 0) is a plain prefill.
    let got = run(
        &g,
        vec![
            ("past", f32s(&[0, 2], &[])),
            ("new", f32s(&[1, 2], &[7., 8.])),
        ],
    );
    assert_eq!(got.as_f32().unwrap(), &[7., 8.]);
}

/// `kv_attention` over a float key part, a q8 key part and q4 values equals
/// its decomposition: dequantize, view as heads, concatenate the keys,
/// attention.
#[test]
fn kv_attention_matches_its_decomposition() {
    use crate::op::KvPart;
    use crate::quant::QuantFormat;
    let (b, kv, g_, t, s) = (1usize, 2usize, 2usize, 2usize, 5usize);
    let (d0, d1, dv) = (16usize, 32usize, 16usize);
    let parts = vec![
        KvPart {
            format: None,
            dim: d0,
        },
        KvPart {
            format: Some(QuantFormat::Q8),
            dim: d1,
        },
        KvPart {
            format: Some(QuantFormat::Q4),
            dim: dv,
        },
    ];
    let mut g = Graph::new("t");
    let q = g
        .input("q", ty(DType::F32, shape![b, kv, g_, t, d0 + d1]))
        .unwrap();
    let mut caches = Vec::new();
    let mut views = Vec::new();
    let mut bind = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        let raw = g
            .input(&format!("raw{i}"), ty(DType::F32, shape![b, s, kv * p.dim]))
            .unwrap();
        bind.push((
            format!("raw{i}"),
            f32s(&[b, s, kv * p.dim], &ramp(b * s * kv * p.dim, 20 + i)),
        ));
        let (cache, dense) = match p.format {
            None => (raw, raw),
            Some(f) => {
                let c = g.add(Op::Quantize(f), &[raw], "").unwrap();
                let dq = Op::Dequantize {
                    format: f,
                    dtype: DType::F32,
                };
                (c, g.add(dq, &[c], "").unwrap())
            }
        };
        caches.push(cache);
        let r = g
            .add(Op::Reshape(shape![b, s, kv, 1, p.dim]), &[dense], "")
            .unwrap();
        views.push(g.add(Op::Permute(vec![0, 2, 3, 1, 4]), &[r], "").unwrap());
    }
    let k = g.add(Op::Concat { axis: 4 }, &views[..2], "").unwrap();
    for causal in [false, true] {
        let mut xs = vec![q];
        xs.extend(&caches);
        let fused = g
            .add(
                Op::KvAttention {
                    causal,
                    scale: Scalar(0.3),
                    heads: kv,
                    parts: parts.clone(),
                },
                &xs,
                "",
            )
            .unwrap();
        let prim = g
            .add(
                Op::Attention {
                    causal,
                    scale: Scalar(0.3),
                },
                &[q, k, views[2]],
                "",
            )
            .unwrap();
        g.set_output(&format!("fused{causal}"), fused);
        g.set_output(&format!("prim{causal}"), prim);
    }
    let mut bnd = Bindings::default().input(
        "q",
        f32s(
            &[b, kv, g_, t, d0 + d1],
            &ramp(b * kv * g_ * t * (d0 + d1), 7),
        ),
    );
    for (n, v) in bind {
        bnd = bnd.input(&n, v);
    }
    let out = eval(&g, &bnd).unwrap();
    for causal in [false, true] {
        let f = &out[&format!("fused{causal}")];
        assert_eq!(f.shape(), &[b, kv, g_, t, dv]);
        assert_close(
            f.as_f32().unwrap(),
            out[&format!("prim{causal}")].as_f32().unwrap(),
            1e-6,
        );
    }
    // A part whose cache has the wrong width is a type error.
    let bad = g.add(
        Op::KvAttention {
            causal: true,
            scale: Scalar(1.0),
            heads: kv,
            parts: vec![parts[0], parts[0]],
        },
        &[q, caches[0], caches[1]],
        "",
    );
    assert!(bad.is_err());
}

#[test]
fn row_dot_matches_hand_values() {
    // f32: `Σ x·y` per row, `[2, 3] → [2, 1]`.
    let mut g = Graph::new("t");
    let x = g.input("x", ty(DType::F32, shape![2, 3])).unwrap();
    let w = g.input("w", ty(DType::F32, shape![2, 3])).unwrap();
    let y = g.add(Op::RowDot, &[x, w], "").unwrap();
    assert_eq!(g.node(y).ty, ty(DType::F32, shape![2, 1]));
    g.set_output("y", y);
    let got = run(
        &g,
        vec![
            ("x", f32s(&[2, 3], &[1.0, 2.0, 3.0, -1.0, 0.5, 4.0])),
            ("w", f32s(&[2, 3], &[4.0, 5.0, 6.0, 2.0, -2.0, 0.25])),
        ],
    );
    // 4 + 10 + 18 and −2 − 1 + 1.
    assert_eq!(got.shape(), &[2, 1]);
    assert_close(got.as_f32().unwrap(), &[32.0, -2.0], 0.0);

    // bf16: the operands widened exactly, each product and the sum in f32,
    // the f32 result never rounded to bf16. (1 + 2⁻⁷)² = 1 + 2⁻⁶ + 2⁻¹⁴
    // needs 15 significant bits and 256 + 1 needs 9; bf16 keeps 8.
    let mut g = Graph::new("t");
    let x = g.input("x", ty(DType::BF16, shape![2, 2])).unwrap();
    let w = g.input("w", ty(DType::BF16, shape![2, 2])).unwrap();
    let y = g.add(Op::RowDot, &[x, w], "").unwrap();
    assert_eq!(g.node(y).ty, ty(DType::F32, shape![2, 1]));
    g.set_output("y", y);
    let a = 1.0 + 2f32.powi(-7);
    let got = run(
        &g,
        vec![
            ("x", f32s(&[2, 2], &[a, 3.0, 256.0, 1.0])),
            ("w", f32s(&[2, 2], &[a, 1.0, 1.0, 1.0])),
        ],
    );
    assert_eq!(got.dtype(), DType::F32);
    assert_close(got.as_f32().unwrap(), &[a * a + 3.0, 257.0], 0.0);
    assert_ne!(
        round_bf16(a * a + 3.0),
        a * a + 3.0,
        "the test needs f32 sums"
    );
}

#[test]
fn row_dot_type_rule() {
    let t = |d, s| TensorType::new(d, s);
    let f16 = t(DType::F16, shape![2, 4]);
    assert_eq!(
        Op::RowDot.infer(&[&f16, &f16]).unwrap(),
        t(DType::F32, shape![2, 1])
    );
    let f64_ = t(DType::F64, shape![4]);
    assert_eq!(
        Op::RowDot.infer(&[&f64_, &f64_]).unwrap(),
        t(DType::F64, shape![1])
    );
    let other = t(DType::F16, shape![1, 4]);
    let err = Op::RowDot.infer(&[&f16, &other]).unwrap_err();
    assert!(err.contains("no broadcasting"), "{err}");
    let bf = t(DType::BF16, shape![2, 4]);
    assert!(Op::RowDot.infer(&[&f16, &bf]).is_err());
    let ints = t(DType::I32, shape![2, 4]);
    assert!(Op::RowDot.infer(&[&ints, &ints]).is_err());
}
