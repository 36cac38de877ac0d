//! Gradient checks: every primitive's gradient rule against central finite
//! differences in f64 on the reference interpreter.

use caramba_ir::autodiff::{differentiate, grad_name};
use caramba_ir::reference::{eval, Bindings, Tensor};
use caramba_ir::*;
use std::collections::BTreeMap;

/// A small deterministic generator (no dependency).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }
    fn tensor(&mut self, shape: &[usize], lo: f64, hi: f64) -> Tensor {
        let n = shape.iter().product();
        Tensor::f64(
            shape.to_vec(),
            (0..n)
                .map(|_| lo + (hi - lo) * (self.next() + 1.0) / 2.0)
                .collect(),
        )
    }
}

fn ty(shape: &[usize]) -> TensorType {
    TensorType::new(DType::F64, Shape::new(shape.iter().map(|&d| Dim::Const(d))))
}

/// Builds `loss = Σ out · w` (w a fixed random tensor) and checks the
/// gradient of every parameter against finite differences.
fn check(
    name: &str,
    params: &[(&str, &[usize], f64, f64)],
    inputs: Vec<(&str, Tensor)>,
    build: impl Fn(&mut Graph) -> NodeId,
) {
    let mut rng = Lcg(name
        .bytes()
        .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64)));
    let mut g = Graph::new(name);
    let out = build(&mut g);
    let oshape: Vec<usize> = g
        .node(out)
        .ty
        .shape
        .dims()
        .iter()
        .map(|d| d.as_const().expect("tests use concrete shapes"))
        .collect();
    let w = g.input("loss_weight", ty(&oshape)).unwrap();
    let mut l = g.add(Op::Binary(BinaryOp::Mul), &[out, w], "loss").unwrap();
    for axis in 0..oshape.len() {
        l = g
            .add(
                Op::Reduce {
                    op: ReduceOp::Sum,
                    axis,
                },
                &[l],
                "loss",
            )
            .unwrap();
    }
    let l = g.add(Op::Reshape(Shape::scalar()), &[l], "loss").unwrap();
    g.set_output("loss", l);
    verify(&g).unwrap();

    let names: Vec<String> = params.iter().map(|p| p.0.to_string()).collect();
    let dg = differentiate(&g, "loss", &names).unwrap_or_else(|e| panic!("{name}: {e}"));
    verify(&dg).unwrap_or_else(|e| panic!("{name}: backward graph invalid: {e:?}"));

    let mut values: BTreeMap<String, Tensor> = params
        .iter()
        .map(|(n, s, lo, hi)| (n.to_string(), rng.tensor(s, *lo, *hi)))
        .collect();
    let weight = rng.tensor(&oshape, -1.0, 1.0);
    let run = |graph: &Graph, values: &BTreeMap<String, Tensor>| {
        let mut b = Bindings::new(values).input("loss_weight", weight.clone());
        for (n, t) in &inputs {
            b = b.input(n, t.clone());
        }
        eval(graph, &b).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let analytic = run(&dg, &values);
    let eps = 1e-6;
    for (pname, ..) in params {
        let grad = analytic[&grad_name(pname)].to_f64_vec();
        let base = values[*pname].clone();
        for k in 0..base.numel() {
            let mut at = |delta: f64| {
                let mut v = base.to_f64_vec();
                v[k] += delta;
                values.insert(pname.to_string(), Tensor::f64(base.shape().to_vec(), v));
                run(&g, &values)["loss"].to_f64_vec()[0]
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            let err = (numeric - grad[k]).abs();
            assert!(
                err <= 1e-6 * (1.0 + numeric.abs()),
                "{name}: d loss / d {pname}[{k}]: analytic {} vs numeric {numeric} (|Δ| {err:e})",
                grad[k]
            );
        }
        values.insert(pname.to_string(), base);
    }
}

fn p(g: &mut Graph, name: &str, shape: &[usize]) -> NodeId {
    g.param(name, ty(shape), name).unwrap()
}

#[test]
fn unary_ops() {
    use UnaryOp::*;
    for (op, lo, hi) in [
        (Neg, -2.0, 2.0),
        (Exp, -2.0, 2.0),
        (Log, 0.5, 3.0),
        (Sqrt, 0.5, 3.0),
        (Rsqrt, 0.5, 3.0),
        (Recip, 0.5, 3.0),
        (Abs, 0.2, 2.0),
        (Sigmoid, -3.0, 3.0),
        (Silu, -3.0, 3.0),
        (Tanh, -2.0, 2.0),
    ] {
        check(&format!("{op:?}"), &[("x", &[3, 4], lo, hi)], vec![], |g| {
            let x = p(g, "x", &[3, 4]);
            g.add(Op::Unary(op), &[x], "t").unwrap()
        });
    }
}

#[test]
fn binary_ops_with_broadcasting() {
    use BinaryOp::*;
    for op in [Add, Sub, Mul, Div] {
        check(
            &format!("{op:?}"),
            &[("a", &[2, 3, 4], 0.5, 2.0), ("b", &[3, 1], 0.5, 2.0)],
            vec![],
            |g| {
                let a = p(g, "a", &[2, 3, 4]);
                let b = p(g, "b", &[3, 1]);
                g.add(Op::Binary(op), &[a, b], "t").unwrap()
            },
        );
    }
    check("const-scale", &[("a", &[4], -1.0, 1.0)], vec![], |g| {
        let a = p(g, "a", &[4]);
        let c = g.constant(0.25, DType::F64, "t");
        g.add(Op::Binary(Mul), &[c, a], "t").unwrap()
    });
}

#[test]
fn matmul_batched_broadcast_and_transposed() {
    check(
        "matmul",
        &[("a", &[2, 2, 3, 4], -1.0, 1.0), ("w", &[5, 4], -1.0, 1.0)],
        vec![],
        |g| {
            let a = p(g, "a", &[2, 2, 3, 4]);
            let w = p(g, "w", &[5, 4]);
            let wt = g.add(Op::Permute(vec![1, 0]), &[w], "t").unwrap();
            g.add(Op::MatMul, &[a, wt], "t").unwrap()
        },
    );
    check(
        "matmul-bcast",
        &[
            ("q", &[2, 3, 2, 4], -1.0, 1.0),
            ("k", &[2, 1, 4, 5], -1.0, 1.0),
        ],
        vec![],
        |g| {
            let q = p(g, "q", &[2, 3, 2, 4]);
            let k = p(g, "k", &[2, 1, 4, 5]);
            g.add(Op::MatMul, &[q, k], "t").unwrap()
        },
    );
}

#[test]
fn layout_ops() {
    check(
        "reshape-permute",
        &[("x", &[2, 3, 4], -1.0, 1.0)],
        vec![],
        |g| {
            let x = p(g, "x", &[2, 3, 4]);
            let r = g.add(Op::Reshape(shape![2, 3, 2, 2]), &[x], "t").unwrap();
            g.add(Op::Permute(vec![2, 0, 3, 1]), &[r], "t").unwrap()
        },
    );
    check(
        "slice-concat",
        &[("x", &[2, 6], -1.0, 1.0), ("y", &[2, 2], -1.0, 1.0)],
        vec![],
        |g| {
            let x = p(g, "x", &[2, 6]);
            let y = p(g, "y", &[2, 2]);
            let a = g
                .add(
                    Op::Slice {
                        axis: 1,
                        start: 1,
                        end: 4,
                    },
                    &[x],
                    "t",
                )
                .unwrap();
            g.add(Op::Concat { axis: 1 }, &[y, a, y], "t").unwrap()
        },
    );
    check("broadcast", &[("x", &[3, 1], -1.0, 1.0)], vec![], |g| {
        let x = p(g, "x", &[3, 1]);
        g.add(Op::Broadcast(shape![2, 3, 4]), &[x], "t").unwrap()
    });
    // `after(x, a)` is x: its gradient is the identity's (the anchor, an
    // input here, takes none).
    check(
        "after",
        &[("x", &[2, 3], -1.0, 1.0)],
        vec![("a", Tensor::f64(vec![4], vec![0.5; 4]))],
        |g| {
            let x = p(g, "x", &[2, 3]);
            let a = g
                .input("a", TensorType::new(DType::F64, shape![4]))
                .unwrap();
            let later = g.add(Op::After, &[x, a], "t").unwrap();
            g.add(Op::Unary(UnaryOp::Exp), &[later], "t").unwrap()
        },
    );
}

#[test]
fn reductions_and_softmax() {
    for op in [ReduceOp::Sum, ReduceOp::Mean] {
        check(
            &format!("{op:?}"),
            &[("x", &[2, 3, 4], -1.0, 1.0)],
            vec![],
            |g| {
                let x = p(g, "x", &[2, 3, 4]);
                g.add(Op::Reduce { op, axis: 1 }, &[x], "t").unwrap()
            },
        );
    }
    check(
        "masked-softmax",
        &[("s", &[2, 3, 5], -2.0, 2.0)],
        vec![],
        |g| {
            let s = p(g, "s", &[2, 3, 5]);
            let m = g.add(Op::CausalMask, &[s], "t").unwrap();
            g.add(Op::Softmax { axis: 2 }, &[m], "t").unwrap()
        },
    );
}

#[test]
fn rope_gather_scatter_cross_entropy() {
    let pos = Tensor::i32(vec![3], vec![2, 5, 9]);
    check(
        "rope",
        &[("x", &[2, 3, 2, 4], -1.0, 1.0)],
        vec![("pos", pos)],
        |g| {
            let x = p(g, "x", &[2, 3, 2, 4]);
            let pos = g
                .input("pos", TensorType::new(DType::I32, shape![3]))
                .unwrap();
            g.add(
                Op::Rope(RopeSpec {
                    theta: Scalar(100.0),
                    scaling: None,
                    inverse: false,
                }),
                &[x, pos],
                "t",
            )
            .unwrap()
        },
    );
    let ids = Tensor::i32(vec![2, 3], vec![1, 0, 3, 3, 1, 2]);
    check(
        "gather",
        &[("table", &[4, 3], -1.0, 1.0)],
        vec![("ids", ids.clone())],
        |g| {
            let t = p(g, "table", &[4, 3]);
            let ids = g
                .input("ids", TensorType::new(DType::I32, shape![2, 3]))
                .unwrap();
            g.add(Op::Gather, &[t, ids], "t").unwrap()
        },
    );
    check(
        "scatter-add",
        &[("src", &[2, 3, 2], -1.0, 1.0)],
        vec![("ids", ids.clone())],
        |g| {
            let s = p(g, "src", &[2, 3, 2]);
            let ids = g
                .input("ids", TensorType::new(DType::I32, shape![2, 3]))
                .unwrap();
            g.add(Op::ScatterAdd { size: 5 }, &[ids, s], "t").unwrap()
        },
    );
    check(
        "cross-entropy",
        &[("logits", &[2, 3, 4], -2.0, 2.0)],
        vec![("ids", ids)],
        |g| {
            let l = p(g, "logits", &[2, 3, 4]);
            let ids = g
                .input("ids", TensorType::new(DType::I32, shape![2, 3]))
                .unwrap();
            g.add(Op::CrossEntropy, &[l, ids], "t").unwrap()
        },
    );
}

#[test]
fn frozen_parameters_get_no_backward_work() {
    let mut g = Graph::new("frozen");
    let a = p(&mut g, "a", &[3]);
    let b = p(&mut g, "b", &[3]);
    let eb = g
        .add(Op::Unary(UnaryOp::Exp), &[b], "frozen_branch")
        .unwrap();
    let y = g.add(Op::Binary(BinaryOp::Mul), &[a, eb], "t").unwrap();
    let s = g
        .add(
            Op::Reduce {
                op: ReduceOp::Sum,
                axis: 0,
            },
            &[y],
            "t",
        )
        .unwrap();
    let l = g.add(Op::Reshape(Shape::scalar()), &[s], "t").unwrap();
    g.set_output("loss", l);
    let dg = differentiate(&g, "loss", &["a".to_string()]).unwrap();
    assert!(dg.output("grad:b").is_none());
    // No backward node is scoped under the frozen branch.
    assert!(dg
        .node_ids()
        .all(|n| dg.node(n).scope != "frozen_branch/grad"));
}

/// The fused attention's rule (flash-style: `attention_lse`, then
/// `attention_grad` for q and for k and v together, sliced) against finite
/// differences: causal and not, queries
/// fewer than keys (a cached suffix), and GQA's key/value heads broadcast
/// over query groups (their gradients summed back over the groups).
#[test]
fn fused_attention() {
    for causal in [false, true] {
        for (qs, ks, vs) in [
            (&[2, 3, 4][..], &[2, 3, 4][..], &[2, 3, 5][..]),
            (&[2, 2, 3, 4][..], &[2, 1, 5, 4][..], &[2, 1, 5, 3][..]),
        ] {
            let name = format!("attention causal={causal} q{qs:?} k{ks:?}");
            check(
                &name,
                &[
                    ("q", qs, -1.5, 1.5),
                    ("k", ks, -1.5, 1.5),
                    ("v", vs, -1.0, 1.0),
                ],
                vec![],
                |g| {
                    let q = p(g, "q", qs);
                    let k = p(g, "k", ks);
                    let v = p(g, "v", vs);
                    g.add(
                        Op::Attention {
                            causal,
                            scale: Scalar(0.7),
                        },
                        &[q, k, v],
                        "attn",
                    )
                    .unwrap()
                },
            );
        }
    }
}

/// The fused RMSNorm's rule (`rms_norm_grad` for x and for w, the row
/// statistics recomputed from x) against finite differences, over a batch
/// of rows and a single row.
#[test]
fn fused_rms_norm() {
    for xs in [&[2, 3, 5][..], &[7][..]] {
        let d = *xs.last().unwrap();
        let name = format!("rms_norm x{xs:?}");
        check(
            &name,
            &[("x", xs, -1.5, 1.5), ("w", &[d], 0.5, 1.5)],
            vec![],
            |g| {
                let x = p(g, "x", xs);
                let w = p(g, "w", &[d]);
                g.add(Op::RmsNorm { eps: Scalar(1e-3) }, &[x, w], "norm")
                    .unwrap()
            },
        );
    }
}

/// Several slices of one node (a merged projection's outputs): disjoint
/// ones along one axis, with a gap, and overlapping ones. Disjoint slices'
/// adjoints are gathered into one concatenation (no adds of zero-padded
/// copies); overlapping ones are padded and summed.
#[test]
fn slices_of_one_node() {
    let slice = |g: &mut Graph, x: NodeId, axis: usize, start: usize, end: usize| {
        g.add(Op::Slice { axis, start, end }, &[x], "t").unwrap()
    };
    let mul = |g: &mut Graph, a: NodeId, b: NodeId| {
        g.add(Op::Binary(BinaryOp::Mul), &[a, b], "t").unwrap()
    };
    // Columns 0..2, 3..5 and 5..6 of 7 (column 2 and 6 unused), combined
    // nonlinearly so that each slice's adjoint differs.
    let disjoint = |g: &mut Graph| {
        let x = p(g, "x", &[3, 7]);
        let a = slice(g, x, 1, 0, 2);
        let b = slice(g, x, 1, 3, 5);
        let c = slice(g, x, 1, 5, 6);
        let ab = mul(g, a, b);
        let c = g.add(Op::Broadcast(shape![3, 2]), &[c], "t").unwrap();
        mul(g, ab, c)
    };
    check(
        "disjoint slices",
        &[("x", &[3, 7], -1.0, 1.0)],
        vec![],
        disjoint,
    );
    check(
        "overlapping slices",
        &[("x", &[3, 7], -1.0, 1.0)],
        vec![],
        |g| {
            let x = p(g, "x", &[3, 7]);
            let a = slice(g, x, 1, 0, 4);
            let b = slice(g, x, 1, 2, 6);
            mul(g, a, b)
        },
    );
    // The disjoint case's adjoint of x: one concat, no add.
    let mut g = Graph::new("shape");
    let y = disjoint(&mut g);
    let r = g.add(Op::Reshape(shape![6]), &[y], "t").unwrap();
    let l = g
        .add(
            Op::Reduce {
                op: ReduceOp::Sum,
                axis: 0,
            },
            &[r],
            "t",
        )
        .unwrap();
    let l = g.add(Op::Reshape(Shape::scalar()), &[l], "t").unwrap();
    g.set_output("loss", l);
    let dg = differentiate(&g, "loss", &["x".to_string()]).unwrap();
    let grad = dg.output(&grad_name("x")).unwrap();
    assert_eq!(dg.node(grad).op, Op::Concat { axis: 1 });
    assert_eq!(dg.operands(grad).len(), 5, "three slices and two gaps");
}

/// `row_dot` (each operand's gradient the other scaled by the row's
/// adjoint), over a batch of rows and a single row, with x and y distinct
/// and with both operands one node (`row_dot(x, x)`, `Σ x²`).
#[test]
fn row_dot() {
    for xs in [&[2, 3, 5][..], &[7][..]] {
        check(
            &format!("row_dot {xs:?}"),
            &[("x", xs, -1.5, 1.5), ("y", xs, -1.5, 1.5)],
            vec![],
            |g| {
                let x = p(g, "x", xs);
                let y = p(g, "y", xs);
                g.add(Op::RowDot, &[x, y], "dot").unwrap()
            },
        );
        check(
            &format!("row_dot square {xs:?}"),
            &[("x", xs, -1.5, 1.5)],
            vec![],
            |g| {
                let x = p(g, "x", xs);
                g.add(Op::RowDot, &[x, x], "dot").unwrap()
            },
        );
    }
}
