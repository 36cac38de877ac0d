//! Every rule proven on random graphs, and whole models optimized against
//! their unoptimized selves, all through the reference interpreter.

use super::*;
use caramba_ir::reference::{eval, Bindings, Tensor};
use caramba_ir::{
    AttnArg, BinaryOp, DType, Dim, Graph, NodeId, Op, ReduceOp, Scalar, Shape, Sym, TensorType,
    UnaryOp,
};
use std::collections::{BTreeMap, HashMap};

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
    fn bool(&mut self) -> bool {
        self.next() & 1 == 1
    }
    fn perm(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            p.swap(i, self.below(i + 1));
        }
        p
    }
}

fn ty(dtype: DType, dims: &[Dim]) -> TensorType {
    TensorType::new(dtype, Shape(dims.to_vec()))
}

fn c(n: usize) -> Dim {
    Dim::Const(n)
}

fn bin(g: &mut Graph, op: BinaryOp, a: NodeId, b: NodeId) -> NodeId {
    g.add(Op::Binary(op), &[a, b], "").unwrap()
}

/// A random value for every input and parameter of `g`, with `T` and `S`
/// bound to `t` and `s`. Integer inputs are positions `0..T` or token ids
/// below `vocab`.
fn bindings(
    g: &Graph,
    rng: &mut Rng,
    (t, s): (usize, usize),
    vocab: usize,
) -> (BTreeMap<String, Tensor>, BTreeMap<String, Tensor>) {
    let dims = |ty: &TensorType| -> Vec<usize> {
        ty.shape
            .dims()
            .iter()
            .map(|d| match d {
                Dim::Const(n) => *n,
                Dim::Sym(Sym::B) => 2,
                Dim::Sym(Sym::T) => t,
                Dim::Sym(Sym::S) => s,
                Dim::Sym(Sym::P) => s - t,
            })
            .collect()
    };
    let mut make = |ty: &TensorType, name: &str| -> Tensor {
        let shape = dims(ty);
        let n: usize = shape.iter().product();
        match ty.dtype {
            DType::I32 if name == "positions" => Tensor::i32(shape, (0..n as i32).collect()),
            DType::I32 => Tensor::i32(shape, (0..n).map(|_| rng.below(vocab) as i32).collect()),
            DType::F64 => Tensor::f64(shape, (0..n).map(|_| rng.unit()).collect()),
            _ => Tensor::f32(shape, (0..n).map(|_| rng.unit() as f32 * 0.5).collect()),
        }
    };
    let inputs = g
        .inputs()
        .map(|(n, id)| (n.to_string(), make(&g.node(id).ty, n)))
        .collect();
    let params = g
        .params()
        .map(|(n, id)| (n.to_string(), make(&g.node(id).ty, n)))
        .collect();
    (inputs, params)
}

fn run(
    g: &Graph,
    inputs: &BTreeMap<String, Tensor>,
    params: &BTreeMap<String, Tensor>,
) -> BTreeMap<String, Tensor> {
    let mut b = Bindings::new(params);
    for (n, t) in inputs {
        b = b.input(n, t.clone());
    }
    eval(g, &b).unwrap_or_else(|e| panic!("{e}\n{}", caramba_ir::to_text(g)))
}

/// Largest difference between the outputs of two graphs, relative to the
/// largest magnitude of the first.
fn compare(a: &Graph, b: &Graph, rng: &mut Rng, ts: (usize, usize), vocab: usize) -> f64 {
    let (inputs, params) = bindings(a, rng, ts, vocab);
    let (x, y) = (run(a, &inputs, &params), run(b, &inputs, &params));
    let mut worst: f64 = 0.0;
    for (name, t) in &x {
        let u = &y[name];
        assert_eq!(t.shape(), u.shape(), "output {name}");
        let scale =
            t.to_f64_vec().iter().fold(
                1.0f64,
                |m, v| if v.is_finite() { m.max(v.abs()) } else { m },
            );
        worst = worst.max(t.max_abs_diff(u) / scale);
    }
    worst
}

fn count(g: &Graph, pred: impl Fn(&Op) -> bool) -> usize {
    g.node_ids().filter(|&n| pred(&g.node(n).op)).count()
}

/// Optimizes with only `rules` (and no elementwise pass), checks the named
/// rule fired and nothing was rejected, and compares outputs.
fn prove(rule: &str, rules: &[&str], cases: usize, build: impl Fn(&mut Rng) -> Graph) {
    prove_with_vocab(rule, rules, cases, 1, build)
}

/// [`prove`] with integer inputs (token ids, targets) below `vocab`.
fn prove_with_vocab(
    rule: &str,
    rules: &[&str],
    cases: usize,
    vocab: usize,
    build: impl Fn(&mut Rng) -> Graph,
) {
    let mut rng = Rng::new(rule.len() as u64 * 7919);
    for case in 0..cases {
        let g = build(&mut rng);
        let opts = Options {
            only: Some(rules.iter().map(|s| s.to_string()).collect()),
            fuse_elementwise: false,
            ..Options::default()
        };
        let (h, rep) = optimize_with(&g, &opts).unwrap();
        assert!(rep.rejected.is_empty(), "{:?}", rep.rejected);
        assert!(
            rep.applied.get(rule).copied().unwrap_or(0) > 0,
            "case {case}: {rule} did not fire on\n{}",
            caramba_ir::to_text(&g)
        );
        let ts = (rng.range(1, 5), 0);
        let ts = (ts.0, ts.0 + rng.range(0, 3));
        let err = compare(&g, &h, &mut rng, ts, vocab);
        assert!(
            err < 1e-12,
            "case {case}: {rule} changed the value by {err}\nbefore:\n{}after:\n{}",
            caramba_ir::to_text(&g),
            caramba_ir::to_text(&h)
        );
    }
}

fn random_dims(rng: &mut Rng, rank: usize) -> Vec<Dim> {
    (0..rank).map(|_| c(rng.range(1, 4))).collect()
}

// ---------------------------------------------------------------- algebra

#[test]
fn permute_compose_is_sound() {
    prove("permute-compose", &["permute-compose"], 24, |rng| {
        let rank = rng.range(2, 4);
        let mut g = Graph::new("t");
        let x = g
            .input("x", ty(DType::F64, &random_dims(rng, rank)))
            .unwrap();
        let p = rng.perm(rank);
        let a = g.add(Op::Permute(p.clone()), &[x], "").unwrap();
        // Half the cases compose to the identity.
        let q = if rng.bool() {
            let mut inv = vec![0; rank];
            for (i, &pi) in p.iter().enumerate() {
                inv[pi] = i;
            }
            inv
        } else {
            rng.perm(rank)
        };
        let b = g.add(Op::Permute(q), &[a], "").unwrap();
        let y = g.add(Op::Unary(UnaryOp::Neg), &[b], "").unwrap();
        g.set_output("y", y);
        g
    });
}

#[test]
fn reduce_of_slice_is_sound() {
    prove("reduce-of-slice", &["reduce-of-slice"], 24, |rng| {
        let rank = rng.range(2, 5);
        let dims: Vec<usize> = (0..rank).map(|_| rng.range(1, 4)).collect();
        let mut g = Graph::new("t");
        let x = g
            .input(
                "x",
                ty(DType::F64, &dims.iter().map(|&d| c(d)).collect::<Vec<_>>()),
            )
            .unwrap();
        // Sliced along b, reduced along another axis a; a second slice of
        // the same x reduced along a (GQA's dk and dv) shares the reduction.
        // (`range` is inclusive.)
        let b = rng.range(0, rank - 1);
        let a = (b + rng.range(1, rank - 1)) % rank;
        let op = [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max][rng.range(0, 2)];
        let len = dims[b];
        let start = rng.range(0, len - 1);
        let end = rng.range(start + 1, len);
        let s1 = g
            .add(
                Op::Slice {
                    axis: b,
                    start,
                    end,
                },
                &[x],
                "",
            )
            .unwrap();
        let s2 = g
            .add(
                Op::Slice {
                    axis: b,
                    start: 0,
                    end: len,
                },
                &[x],
                "",
            )
            .unwrap();
        let r1 = g.add(Op::Reduce { op, axis: a }, &[s1], "").unwrap();
        let r2 = g.add(Op::Reduce { op, axis: a }, &[s2], "").unwrap();
        g.set_output("y1", r1);
        g.set_output("y2", r2);
        g
    });
}

#[test]
fn reduce_of_slice_keeps_a_slice_of_the_reduced_axis() {
    // Along the reduced axis itself the rule must not fire.
    let mut g = Graph::new("t");
    let x = g.input("x", ty(DType::F64, &[c(3), c(4)])).unwrap();
    let s = g
        .add(
            Op::Slice {
                axis: 1,
                start: 1,
                end: 3,
            },
            &[x],
            "",
        )
        .unwrap();
    let r = g
        .add(
            Op::Reduce {
                op: ReduceOp::Sum,
                axis: 1,
            },
            &[s],
            "",
        )
        .unwrap();
    g.set_output("y", r);
    let opts = Options {
        only: Some(vec!["reduce-of-slice".to_string()]),
        fuse_elementwise: false,
        ..Options::default()
    };
    let (_, rep) = optimize_with(&g, &opts).unwrap();
    assert_eq!(rep.applied.get("reduce-of-slice"), None);
}

#[test]
fn permute_identity_is_sound() {
    prove("permute-identity", &["permute-identity"], 8, |rng| {
        let rank = rng.range(1, 4);
        let mut g = Graph::new("t");
        let x = g
            .input("x", ty(DType::F64, &random_dims(rng, rank)))
            .unwrap();
        let a = g.add(Op::Permute((0..rank).collect()), &[x], "").unwrap();
        let y = g.add(Op::Unary(UnaryOp::Exp), &[a], "").unwrap();
        g.set_output("y", y);
        g
    });
}

#[test]
fn reshape_rules_are_sound() {
    prove("reshape-compose", &["reshape-compose"], 12, |rng| {
        let (a, b, d) = (rng.range(1, 4), rng.range(1, 4), rng.range(1, 4));
        let mut g = Graph::new("t");
        let x = g
            .input("x", ty(DType::F64, &[Dim::Sym(Sym::T), c(a), c(b), c(d)]))
            .unwrap();
        let r1 = g
            .add(
                Op::Reshape(Shape(vec![Dim::Sym(Sym::T), c(a * b), c(d)])),
                &[x],
                "",
            )
            .unwrap();
        let r2 = g
            .add(
                Op::Reshape(Shape(vec![Dim::Sym(Sym::T), c(a), c(b * d)])),
                &[r1],
                "",
            )
            .unwrap();
        g.set_output("y", r2);
        g
    });
    prove("reshape-identity", &["reshape-identity"], 6, |rng| {
        let dims = random_dims(rng, 3);
        let mut g = Graph::new("t");
        let x = g.input("x", ty(DType::F64, &dims)).unwrap();
        let r = g.add(Op::Reshape(Shape(dims)), &[x], "").unwrap();
        let y = g.add(Op::Unary(UnaryOp::Tanh), &[r], "").unwrap();
        g.set_output("y", y);
        g
    });
}

#[test]
fn unit_rules_are_sound() {
    for (rule, op, unit) in [
        ("mul-one", BinaryOp::Mul, 1.0),
        ("add-zero", BinaryOp::Add, 0.0),
    ] {
        prove(rule, &[rule], 8, |rng| {
            let mut g = Graph::new("t");
            let x = g.input("x", ty(DType::F64, &random_dims(rng, 2))).unwrap();
            let k = g.constant(unit, DType::F64, "");
            let y = if rng.bool() {
                bin(&mut g, op, x, k)
            } else {
                bin(&mut g, op, k, x)
            };
            let y = g.add(Op::Unary(UnaryOp::Sigmoid), &[y], "").unwrap();
            g.set_output("y", y);
            g
        });
    }
    // A unit that broadcasts to a larger shape must not be dropped.
    let mut g = Graph::new("t");
    let x = g.input("x", ty(DType::F64, &[c(3)])).unwrap();
    let one = g.input("one", ty(DType::F64, &[c(2), c(1)])).unwrap();
    let y = bin(&mut g, BinaryOp::Mul, x, one);
    g.set_output("y", y);
    let (h, _) = optimize(&g).unwrap();
    assert_eq!(
        h.node(h.output("y").unwrap()).ty.shape,
        Shape(vec![c(2), c(3)])
    );
}

// ---------------------------------------------------------------- precision

/// The loss of half-precision logits `x [T, a, V]` as lowering writes it,
/// and (when `grad`) the logits' gradient as autodiff writes it.
fn half_loss_graph(rng: &mut Rng, grad: bool) -> Graph {
    let h = [DType::BF16, DType::F16][rng.below(2)];
    let a = rng.range(1, 3);
    let mut g = Graph::new("t");
    let x = g
        .input("x", ty(h, &[Dim::Sym(Sym::T), c(a), c(CE_VOCAB)]))
        .unwrap();
    let t = g
        .input("targets", ty(DType::I32, &[Dim::Sym(Sym::T), c(a)]))
        .unwrap();
    let x32 = g.add(Op::Cast(DType::F32), &[x], "loss").unwrap();
    if grad {
        let dy = g
            .input("dy", ty(DType::F32, &[Dim::Sym(Sym::T), c(a)]))
            .unwrap();
        let d32 = g.add(Op::CrossEntropyGrad, &[x32, t, dy], "loss").unwrap();
        let d = g.add(Op::Cast(h), &[d32], "loss").unwrap();
        g.set_output("dx", d);
    } else {
        let y = g.add(Op::CrossEntropy, &[x32, t], "loss").unwrap();
        g.set_output("loss", y);
    }
    g
}

const CE_VOCAB: usize = 7;

#[test]
fn widen_into_cross_entropy_is_sound() {
    prove_with_vocab(
        "widen-into-cross-entropy",
        &["widen-into-cross-entropy"],
        8,
        CE_VOCAB,
        |rng| {
            let g = half_loss_graph(rng, false);
            let (h, _) = optimize(&g).unwrap();
            assert_eq!(count(&h, |o| matches!(o, Op::Cast(_))), 0);
            g
        },
    );
}

#[test]
fn narrow_cross_entropy_grad_is_sound() {
    prove_with_vocab(
        "narrow-cross-entropy-grad",
        &["narrow-cross-entropy-grad"],
        8,
        CE_VOCAB,
        |rng| {
            let g = half_loss_graph(rng, true);
            let (h, _) = optimize(&g).unwrap();
            assert_eq!(count(&h, |o| matches!(o, Op::Cast(_))), 0);
            g
        },
    );
}

// ---------------------------------------------------------------- fusions

/// The lowered RMSNorm chain over `x [T, a, d]` with random operand orders.
fn rmsnorm_graph(rng: &mut Rng) -> Graph {
    let (a, d) = (rng.range(1, 3), rng.range(1, 6));
    let eps = [1e-5, 1e-6, 0.1][rng.below(3)];
    let mut g = Graph::new("t");
    let x = g
        .input("x", ty(DType::F64, &[Dim::Sym(Sym::T), c(a), c(d)]))
        .unwrap();
    let w = g.param("w", ty(DType::F64, &[c(d)]), "norm").unwrap();
    let sq = bin(&mut g, BinaryOp::Mul, x, x);
    let ms = g
        .add(
            Op::Reduce {
                op: ReduceOp::Mean,
                axis: 2,
            },
            &[sq],
            "norm",
        )
        .unwrap();
    let e = g.constant(eps, DType::F64, "norm");
    let v = if rng.bool() {
        bin(&mut g, BinaryOp::Add, ms, e)
    } else {
        bin(&mut g, BinaryOp::Add, e, ms)
    };
    let inv = g.add(Op::Unary(UnaryOp::Rsqrt), &[v], "norm").unwrap();
    let xn = if rng.bool() {
        bin(&mut g, BinaryOp::Mul, x, inv)
    } else {
        bin(&mut g, BinaryOp::Mul, inv, x)
    };
    let y = if rng.bool() {
        bin(&mut g, BinaryOp::Mul, xn, w)
    } else {
        bin(&mut g, BinaryOp::Mul, w, xn)
    };
    g.set_output("y", y);
    g
}

#[test]
fn fuse_rmsnorm_is_sound() {
    prove("fuse-rmsnorm", &["fuse-rmsnorm"], 16, |rng| {
        let g = rmsnorm_graph(rng);
        let (h, _) = optimize(&g).unwrap();
        assert_eq!(count(&h, |o| matches!(o, Op::RmsNorm { .. })), 1);
        g
    });
}

/// An RMSNorm read by a product with a matrix: the lowered chain
/// (f64) or an `rms_norm` node (f32, f16, bf16), then `matmul` with a
/// weight `[K, N]` or with the transpose of one `[N, K]`, as lowering
/// writes a linear layer.
fn norm_matmul_graph(rng: &mut Rng, dtype: DType) -> Graph {
    let mut g = if dtype == DType::F64 {
        rmsnorm_graph(rng)
    } else {
        let (a, d) = (rng.range(1, 3), rng.range(1, 6));
        let mut g = Graph::new("t");
        let x = g
            .input("x", ty(dtype, &[Dim::Sym(Sym::T), c(a), c(d)]))
            .unwrap();
        let w = g.param("w", ty(dtype, &[c(d)]), "norm").unwrap();
        let eps = Scalar([1e-5, 0.1][rng.below(2)]);
        let y = g.add(Op::RmsNorm { eps }, &[x, w], "norm").unwrap();
        g.set_output("y", y);
        g
    };
    let y = g.outputs()[0].1;
    let k = g
        .node(y)
        .ty
        .shape
        .last()
        .and_then(|d| d.as_const())
        .unwrap();
    let n = rng.range(1, 5);
    let b = if rng.bool() {
        g.param("proj", ty(dtype, &[c(k), c(n)]), "proj").unwrap()
    } else {
        let wt = g.param("proj", ty(dtype, &[c(n), c(k)]), "proj").unwrap();
        g.add(Op::Permute(vec![1, 0]), &[wt], "proj").unwrap()
    };
    let p = g.add(Op::MatMul, &[y, b], "proj").unwrap();
    g.set_output("y", p);
    g
}

#[test]
fn fuse_norm_matmul_is_sound() {
    for dtype in [DType::F64, DType::F32, DType::F16, DType::BF16] {
        let rules = ["fuse-rmsnorm", "fuse-norm-matmul"];
        prove("fuse-norm-matmul", &rules, 12, |rng| {
            let g = norm_matmul_graph(rng, dtype);
            let (h, _) = optimize(&g).unwrap();
            assert_eq!(count(&h, |o| matches!(o, Op::RmsNormMatMul { .. })), 1);
            assert_eq!(count(&h, |o| matches!(o, Op::RmsNorm { .. })), 0);
            g
        });
    }
}

/// A merged q/k/v projection as `merge-projections` leaves it, q and k
/// rotated: `p = matmul(x', b)` with `x'` the input or its RMSNorm, `q` and
/// `k` slices of `p` reshaped into heads and rotated at random positions,
/// `v` a slice left as it is; random dtype, ranks, head dims, section
/// order, weight layout and RoPE scaling.
fn rope_matmul_graph(rng: &mut Rng, dtype: DType, norm: bool) -> Graph {
    let mut g = Graph::new("t");
    let k = rng.range(1, 6);
    let mut dims = vec![Dim::Sym(Sym::T), c(k)];
    if rng.bool() {
        dims.insert(0, c(rng.range(1, 2)));
    }
    let x = g.input("x", ty(dtype, &dims)).unwrap();
    let pos = g.input("pos", ty(DType::I32, &[Dim::Sym(Sym::T)])).unwrap();
    let x = if norm {
        let w = g.param("w", ty(dtype, &[c(k)]), "norm").unwrap();
        g.add(Op::RmsNorm { eps: Scalar(1e-5) }, &[x, w], "norm")
            .unwrap()
    } else {
        x
    };
    let d = [2, 4, 8, 16][rng.below(4)];
    let (hq, hk, dv) = (rng.range(1, 3), rng.range(1, 2), rng.range(1, 5));
    // Sections in order q, k, v, or v first.
    let v_first = rng.bool();
    let at = if v_first { dv } else { 0 };
    let n = (hq + hk) * d + dv;
    let b = if rng.bool() {
        g.param("proj", ty(dtype, &[c(k), c(n)]), "proj").unwrap()
    } else {
        let wt = g.param("proj", ty(dtype, &[c(n), c(k)]), "proj").unwrap();
        g.add(Op::Permute(vec![1, 0]), &[wt], "proj").unwrap()
    };
    let p = g.add(Op::MatMul, &[x, b], "proj").unwrap();
    let r = dims.len();
    let spec = caramba_ir::RopeSpec {
        theta: Scalar([10000.0, 500000.0][rng.below(2)]),
        scaling: rng.bool().then_some(caramba_ir::RopeScaling::Linear {
            factor: Scalar(2.0),
        }),
        inverse: false,
    };
    let heads = |g: &mut Graph, name: &str, start: usize, h: usize| {
        let end = start + h * d;
        let s = g
            .add(
                Op::Slice {
                    axis: r - 1,
                    start,
                    end,
                },
                &[p],
                "attn",
            )
            .unwrap();
        let mut to = dims[..r - 1].to_vec();
        to.extend([c(h), c(d)]);
        let s = g.add(Op::Reshape(Shape(to)), &[s], "attn").unwrap();
        let y = g.add(Op::Rope(spec), &[s, pos], "attn").unwrap();
        g.set_output(name, y);
    };
    heads(&mut g, "q", at, hq);
    heads(&mut g, "k", at + hq * d, hk);
    let v_at = if v_first { 0 } else { (hq + hk) * d };
    let v = g
        .add(
            Op::Slice {
                axis: r - 1,
                start: v_at,
                end: v_at + dv,
            },
            &[p],
            "attn",
        )
        .unwrap();
    g.set_output("v", v);
    g
}

#[test]
fn fuse_rope_matmul_is_sound() {
    for dtype in [DType::F64, DType::F32, DType::F16, DType::BF16] {
        for norm in [false, true] {
            let rules = ["fuse-norm-matmul", "fuse-rope-matmul"];
            prove_with_vocab("fuse-rope-matmul", &rules, 8, 1000, |rng| {
                let g = rope_matmul_graph(rng, dtype, norm);
                let (h, _) = optimize(&g).unwrap();
                assert_eq!(count(&h, |o| matches!(o, Op::Rope(_))), 0);
                let fused = |o: &Op| matches!(o, Op::MatMulRope { eps, ranges, .. } if eps.is_some() == norm && ranges.len() == 1);
                assert_eq!(count(&h, fused), 1, "{}", caramba_ir::to_text(&h));
                g
            });
        }
    }
}

/// Where a rotated slice's unrotated columns are read too, or a rotation
/// is RoPE's gradient, the product keeps its ropes.
#[test]
fn fuse_rope_matmul_leaves_unrotated_readers_alone() {
    // Products with RoPE in their epilogues, and ropes left.
    let fused = |g: &Graph| {
        let f = rope_matmul::fuse(g).unwrap();
        (
            count(&f.graph, |o| matches!(o, Op::MatMulRope { .. })),
            count(&f.graph, |o| matches!(o, Op::Rope(_))),
        )
    };
    let mut rng = Rng::new(5);
    let base = rope_matmul_graph(&mut rng, DType::F32, false);
    assert_eq!(fused(&base), (1, 0));
    let find = |g: &Graph, pred: &dyn Fn(&Op) -> bool| {
        g.node_ids().find(|&n| pred(&g.node(n).op)).unwrap()
    };
    // The unrotated q (its reshape) an output too: k alone is fused.
    let mut g = base.clone();
    let reshape = find(&g, &|o| matches!(o, Op::Reshape(_)));
    g.set_output("raw", reshape);
    assert_eq!(fused(&g), (1, 1));
    // A slice overlapping the rotated columns, read as it is.
    let mut g = base.clone();
    let p = find(&g, &|o| matches!(o, Op::MatMul));
    let rank = g.node(p).ty.shape.rank();
    // The first column of a rotated slice (the one read by a reshape).
    let start = g
        .users(p)
        .into_iter()
        .find_map(|u| match g.node(u).op {
            Op::Slice { start, .. } if g.users(u).len() == 1 => Some(start),
            _ => None,
        })
        .unwrap();
    let all = g
        .add(
            Op::Slice {
                axis: rank - 1,
                start,
                end: start + 1,
            },
            &[p],
            "",
        )
        .unwrap();
    g.set_output("first", all);
    assert_eq!(fused(&g), (0, 2));
    // The product itself read whole.
    let mut g = base.clone();
    g.set_output("p", p);
    assert_eq!(fused(&g), (0, 2));
    // RoPE's gradient (the inverse rotation) is not an epilogue.
    let mut g = Graph::new("t");
    let x = g
        .input("x", ty(DType::F32, &[Dim::Sym(Sym::T), c(4)]))
        .unwrap();
    let pos = g.input("pos", ty(DType::I32, &[Dim::Sym(Sym::T)])).unwrap();
    let b = g.param("b", ty(DType::F32, &[c(4), c(8)]), "").unwrap();
    let p = g.add(Op::MatMul, &[x, b], "").unwrap();
    let s = g
        .add(
            Op::Slice {
                axis: 1,
                start: 0,
                end: 4,
            },
            &[p],
            "",
        )
        .unwrap();
    let s = g
        .add(
            Op::Reshape(Shape(vec![Dim::Sym(Sym::T), c(1), c(4)])),
            &[s],
            "",
        )
        .unwrap();
    let spec = caramba_ir::RopeSpec {
        theta: Scalar(10000.0),
        scaling: None,
        inverse: true,
    };
    let y = g.add(Op::Rope(spec), &[s, pos], "").unwrap();
    g.set_output("y", y);
    assert_eq!(fused(&g), (0, 1));
}

/// Grouped attention as lowering writes it: q `[B, kv, g, T, d]`, keys
/// `[B, S, kv, 1, d]` transposed to `[B, kv, 1, d, S]`, values
/// `[B, kv, 1, S, dv]`; random scale, mask and operand order.
fn attention_graph(rng: &mut Rng) -> Graph {
    let (kv, grp, d, dv) = (
        rng.range(1, 2),
        rng.range(1, 3),
        rng.range(1, 4),
        rng.range(1, 3),
    );
    let (b, t, s) = (Dim::Sym(Sym::B), Dim::Sym(Sym::T), Dim::Sym(Sym::S));
    let mut g = Graph::new("t");
    let q = g
        .input("q", ty(DType::F64, &[b, c(kv), c(grp), t, c(d)]))
        .unwrap();
    let k = g
        .input("k", ty(DType::F64, &[b, s, c(kv), c(1), c(d)]))
        .unwrap();
    let v = g
        .input("v", ty(DType::F64, &[b, c(kv), c(1), s, c(dv)]))
        .unwrap();
    let kt = g.add(Op::Permute(vec![0, 2, 3, 4, 1]), &[k], "").unwrap();
    let scores = g.add(Op::MatMul, &[q, kt], "attn").unwrap();
    let scores = match rng.below(3) {
        0 => scores,
        1 => {
            let k = g.constant(rng.unit() * 2.0, DType::F64, "attn");
            bin(&mut g, BinaryOp::Mul, scores, k)
        }
        _ => {
            let k = g.constant(rng.unit() * 2.0, DType::F64, "attn");
            bin(&mut g, BinaryOp::Mul, k, scores)
        }
    };
    let m = if rng.bool() {
        g.add(Op::CausalMask, &[scores], "attn").unwrap()
    } else {
        scores
    };
    let p = g.add(Op::Softmax { axis: 4 }, &[m], "attn").unwrap();
    let o = g.add(Op::MatMul, &[p, v], "attn").unwrap();
    g.set_output("o", o);
    g
}

#[test]
fn fuse_attention_is_sound() {
    prove(
        "fuse-attention",
        &["fuse-attention", "permute-compose", "permute-identity"],
        24,
        |rng| {
            let g = attention_graph(rng);
            let (h, _) = optimize(&g).unwrap();
            assert_eq!(count(&h, |o| matches!(o, Op::Attention { .. })), 1);
            assert_eq!(count(&h, |o| matches!(o, Op::Softmax { .. })), 0);
            g
        },
    );
}

/// One `attention_grad{kv}` is cheaper than the `k` and `v` gradients it
/// replaces (it recomputes the scores once), but dearer than either alone.
#[test]
fn kv_attention_grad_costs_less_than_k_and_v_apart() {
    let (b, t, s) = (Dim::Sym(Sym::B), Dim::Sym(Sym::T), Dim::Sym(Sym::S));
    let f = |dims: &[Dim]| ty(DType::F32, dims);
    let (q, k, v) = (
        f(&[b, c(8), c(4), t, c(64)]),
        f(&[b, c(8), c(1), s, c(64)]),
        f(&[b, c(8), c(1), s, c(64)]),
    );
    let (dout, row) = (f(&[b, c(8), c(4), t, c(64)]), f(&[b, c(8), c(4), t, c(1)]));
    let xs = [&q, &k, &v, &dout, &row, &row];
    let grad = |wrt| {
        let op = Op::AttentionGrad {
            causal: true,
            scale: Scalar(0.125),
            wrt,
        };
        let out = op.infer(&xs).unwrap();
        cost::op_cost(&op, &xs, &out)
    };
    let (gk, gv, gkv) = (grad(AttnArg::K), grad(AttnArg::V), grad(AttnArg::KV));
    assert!(gkv < gk + gv, "kv {gkv} vs k {gk} + v {gv}");
    assert!(gkv > gk.max(gv), "kv {gkv} vs k {gk}, v {gv}");
}

// ------------------------------------------------------ reuse-attention-lse

/// An attention and the log-sum-exps autodiff asks of it (twice, as its q
/// and kv gradients each do), over GQA-broadcast heads with `T ≤ S`, plus
/// what the pass must leave alone: an attention nothing asks the
/// log-sum-exp of (other values) and an `attention_lse` of another scale.
/// q, k and v are of `dtype`.
fn lse_graph(rng: &mut Rng, dtype: DType) -> Graph {
    let (kv, grp, d, dv) = (
        rng.range(1, 2),
        rng.range(1, 3),
        rng.range(1, 4),
        rng.range(1, 3),
    );
    let (b, t, s) = (Dim::Sym(Sym::B), Dim::Sym(Sym::T), Dim::Sym(Sym::S));
    let (causal, scale) = (rng.bool(), Scalar(rng.unit() * 2.0));
    let mut g = Graph::new("t");
    let q = g
        .input("q", ty(dtype, &[b, c(kv), c(grp), t, c(d)]))
        .unwrap();
    let k = g.input("k", ty(dtype, &[b, c(kv), c(1), s, c(d)])).unwrap();
    let v = g
        .input("v", ty(dtype, &[b, c(kv), c(1), s, c(dv)]))
        .unwrap();
    let y = g
        .add(Op::Attention { causal, scale }, &[q, k, v], "attn")
        .unwrap();
    let y = g.add(Op::Unary(UnaryOp::Neg), &[y], "attn").unwrap();
    g.set_output("y", y);
    for i in 0..2 {
        let lse = g
            .add(Op::AttentionLse { causal, scale }, &[q, k], "attn/grad")
            .unwrap();
        g.set_output(&format!("lse{i}"), lse);
    }
    let w = g
        .input("w", ty(dtype, &[b, c(kv), c(1), s, c(dv)]))
        .unwrap();
    let other = g
        .add(Op::Attention { causal, scale }, &[q, k, w], "other")
        .unwrap();
    g.set_output("other", other);
    let half = Scalar(scale.0 / 2.0);
    let lse = g
        .add(
            Op::AttentionLse {
                causal,
                scale: half,
            },
            &[q, k],
            "other",
        )
        .unwrap();
    g.set_output("other_lse", lse);
    g
}

/// The pass against the graph it rewrites, on random shapes, in f64 and
/// in half precision: one fused node serves the attention and both
/// log-sum-exps (for half-precision q the fused node is f32 and the
/// attention's slice is cast back, one cast), the rest is left as it was,
/// every output keeps its type and value, and `optimize` afterwards keeps
/// the fused node without bringing a second attention back.
#[test]
fn reuse_attention_lse_is_sound() {
    let mut rng = Rng::new(reuse_lse::NAME.len() as u64 * 7919);
    for case in 0..24 {
        let dtype = [DType::F64, DType::BF16, DType::F16][case % 3];
        let g = lse_graph(&mut rng, dtype);
        let h = reuse_attention_lse(&g).unwrap();
        caramba_ir::verify(&h).unwrap();
        let ops = |g: &Graph| {
            (
                count(g, |o| matches!(o, Op::AttentionWithLse { .. })),
                count(g, |o| matches!(o, Op::Attention { .. })),
                count(g, |o| matches!(o, Op::AttentionLse { .. })),
                count(g, |o| matches!(o, Op::Cast(_))),
            )
        };
        let casts = usize::from(dtype != DType::F64);
        assert_eq!(
            ops(&h),
            (1, 1, 1, casts),
            "case {case}:
{}",
            caramba_ir::to_text(&h)
        );
        for (name, id) in g.outputs() {
            let new = h.output(name).expect("outputs kept");
            assert_eq!(h.node(new).ty, g.node(*id).ty, "case {case}: output {name}");
        }
        let t = rng.range(1, 5);
        let ts = (t, t + rng.range(0, 3));
        let err = compare(&g, &h, &mut rng, ts, 1);
        assert!(
            err < 1e-12,
            "case {case}: {} changed the value by {err}
before:
{}after:
{}",
            reuse_lse::NAME,
            caramba_ir::to_text(&g),
            caramba_ir::to_text(&h)
        );
        let (o, _) = optimize(&h).unwrap();
        assert_eq!(
            ops(&o),
            (1, 1, 1, casts),
            "case {case}:
{}",
            caramba_ir::to_text(&o)
        );
        assert!(compare(&g, &o, &mut rng, ts, 1) < 1e-12);
    }
}

/// A log-sum-exp the values are computed from cannot come from the
/// attention over those values (the fused node would feed itself); the
/// pass leaves such a graph unchanged, and one without pairs too.
#[test]
fn reuse_attention_lse_leaves_a_cycle_alone() {
    let (causal, scale) = (true, Scalar(0.5));
    let mut g = Graph::new("t");
    let q = g.input("q", ty(DType::F64, &[c(2), c(3), c(4)])).unwrap();
    let k = g.input("k", ty(DType::F64, &[c(2), c(5), c(4)])).unwrap();
    let v0 = g.input("v", ty(DType::F64, &[c(2), c(5), c(3)])).unwrap();
    let lse = g
        .add(Op::AttentionLse { causal, scale }, &[q, k], "")
        .unwrap();
    let m = g
        .add(
            Op::Reduce {
                op: ReduceOp::Max,
                axis: 1,
            },
            &[lse],
            "",
        )
        .unwrap();
    let v = bin(&mut g, BinaryOp::Add, v0, m);
    let y = g
        .add(Op::Attention { causal, scale }, &[q, k, v], "")
        .unwrap();
    g.set_output("y", y);
    g.set_output("lse", lse);
    let h = reuse_attention_lse(&g).unwrap();
    assert_eq!(caramba_ir::to_text(&h), caramba_ir::to_text(&g));
    let plain = attention_graph(&mut Rng::new(3));
    let h = reuse_attention_lse(&plain).unwrap();
    assert_eq!(caramba_ir::to_text(&h), caramba_ir::to_text(&plain));
}

/// One `attention_with_lse` and its two slices cost less than the
/// attention and the `attention_lse` that recomputes the scores.
#[test]
fn attention_with_lse_costs_less_than_attention_and_its_lse() {
    let (b, t, s) = (Dim::Sym(Sym::B), Dim::Sym(Sym::T), Dim::Sym(Sym::S));
    let f = |dims: &[Dim]| ty(DType::F32, dims);
    let (q, k, v) = (
        f(&[b, c(3), c(3), t, c(64)]),
        f(&[b, c(3), c(1), s, c(64)]),
        f(&[b, c(3), c(1), s, c(64)]),
    );
    let (causal, scale) = (true, Scalar(0.125));
    let cost = |op: Op, xs: &[&TensorType]| {
        let out = op.infer(xs).unwrap();
        (cost::op_cost(&op, xs, &out), out)
    };
    let (apart, _) = cost(Op::Attention { causal, scale }, &[&q, &k, &v]);
    let (lse, _) = cost(Op::AttentionLse { causal, scale }, &[&q, &k]);
    let (fused, both) = cost(Op::AttentionWithLse { causal, scale }, &[&q, &k, &v]);
    let slice = |start, end| {
        cost(
            Op::Slice {
                axis: 4,
                start,
                end,
            },
            &[&both],
        )
        .0
    };
    let together = fused + slice(0, 64) + slice(64, 65);
    assert!(together < apart + lse, "{together} vs {apart} + {lse}");
    assert!(fused > apart, "fused {fused} vs attention {apart}");
}

/// DBA scores: two scaled score products added, then masked softmax and
/// values.
fn dba_graph(rng: &mut Rng) -> Graph {
    let (kv, grp) = (rng.range(1, 2), rng.range(1, 3));
    let (ds, dg, dv) = (rng.range(1, 3), rng.range(1, 3), rng.range(1, 3));
    let (b, t, s) = (Dim::Sym(Sym::B), Dim::Sym(Sym::T), Dim::Sym(Sym::S));
    let mut g = Graph::new("t");
    let side = |g: &mut Graph, name: &str, d: usize, rng: &mut Rng| {
        let q = g
            .input(
                &format!("q{name}"),
                ty(DType::F64, &[b, c(kv), c(grp), t, c(d)]),
            )
            .unwrap();
        let k = g
            .input(
                &format!("k{name}"),
                ty(DType::F64, &[b, s, c(kv), c(1), c(d)]),
            )
            .unwrap();
        let kt = g.add(Op::Permute(vec![0, 2, 3, 4, 1]), &[k], "").unwrap();
        let sc = g.add(Op::MatMul, &[q, kt], "attn").unwrap();
        if rng.below(4) == 0 {
            sc
        } else {
            let k = g.constant(rng.unit() * 2.0, DType::F64, "attn");
            bin(g, BinaryOp::Mul, sc, k)
        }
    };
    let a = side(&mut g, "s", ds, rng);
    let bb = side(&mut g, "g", dg, rng);
    let scores = bin(&mut g, BinaryOp::Add, a, bb);
    let m = if rng.bool() {
        g.add(Op::CausalMask, &[scores], "attn").unwrap()
    } else {
        scores
    };
    let v = g
        .input("v", ty(DType::F64, &[b, c(kv), c(1), s, c(dv)]))
        .unwrap();
    let p = g.add(Op::Softmax { axis: 4 }, &[m], "attn").unwrap();
    let o = g.add(Op::MatMul, &[p, v], "attn").unwrap();
    g.set_output("o", o);
    g
}

#[test]
fn merge_dba_scores_is_sound() {
    // Alone: the merged product replaces the sum of two products.
    prove(
        "merge-dba-scores",
        &["merge-dba-scores", "permute-compose", "permute-identity"],
        16,
        |rng| {
            let g = dba_graph(rng);
            let (h, _) = optimize_with(
                &g,
                &Options {
                    only: Some(vec!["merge-dba-scores".into()]),
                    fuse_elementwise: false,
                    ..Options::default()
                },
            )
            .unwrap();
            assert_eq!(
                count(&h, |o| *o == Op::MatMul),
                2,
                "{}",
                caramba_ir::to_text(&h)
            );
            g
        },
    );
    // With attention fusion: one attention of scale 1 over concatenations.
    prove("merge-dba-scores", &rule_names(), 16, |rng| {
        let g = dba_graph(rng);
        let (h, rep) = optimize(&g).unwrap();
        assert_eq!(count(&h, |o| matches!(o, Op::Attention { .. })), 1);
        let att = &rep
            .fused
            .iter()
            .find(|f| matches!(f.op, Op::Attention { .. }))
            .unwrap();
        assert!(matches!(att.op, Op::Attention { scale: Scalar(s), .. } if s == 1.0));
        assert_eq!(att.rules, ["merge-dba-scores", "fuse-attention"]);
        g
    });
}

/// A random elementwise expression over same-shape inputs, a broadcast
/// vector and constants.
fn elementwise_graph(rng: &mut Rng) -> Graph {
    let (t, d) = (rng.range(1, 3), rng.range(1, 4));
    let mut g = Graph::new("t");
    let mut pool = vec![
        g.input("x", ty(DType::F64, &[c(t), c(d)])).unwrap(),
        g.input("y", ty(DType::F64, &[c(t), c(d)])).unwrap(),
        g.input("w", ty(DType::F64, &[c(d)])).unwrap(),
    ];
    let unary = [
        UnaryOp::Neg,
        UnaryOp::Abs,
        UnaryOp::Sigmoid,
        UnaryOp::Silu,
        UnaryOp::Tanh,
        UnaryOp::Exp,
    ];
    let binary = [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Max];
    for _ in 0..rng.range(2, 7) {
        let a = pool[rng.below(pool.len())];
        let n = match rng.below(3) {
            0 => g
                .add(Op::Unary(unary[rng.below(unary.len())]), &[a], "")
                .unwrap(),
            1 => {
                let k = g.constant(rng.unit(), DType::F64, "");
                bin(&mut g, binary[rng.below(binary.len())], a, k)
            }
            _ => {
                let b = pool[rng.below(pool.len())];
                bin(&mut g, binary[rng.below(binary.len())], a, b)
            }
        };
        pool.push(n);
    }
    // Every value made is an output or feeds one, so nothing is dead.
    let last = *pool.last().unwrap();
    let out = bin(&mut g, BinaryOp::Add, last, pool[0]);
    g.set_output("out", out);
    if rng.bool() {
        g.set_output("mid", pool[pool.len() - 2]);
    }
    g
}

#[test]
fn fuse_elementwise_is_sound() {
    let mut rng = Rng::new(17);
    let mut fused = 0;
    for case in 0..48 {
        let g = elementwise_graph(&mut rng);
        let opts = Options {
            only: Some(Vec::new()),
            ..Options::default()
        };
        let (h, rep) = optimize_with(&g, &opts).unwrap();
        fused += rep.applied.get("fuse-elementwise").copied().unwrap_or(0);
        let err = compare(&g, &h, &mut rng, (1, 1), 1);
        assert!(
            err < 1e-12,
            "case {case}: changed by {err}\nbefore:\n{}after:\n{}",
            caramba_ir::to_text(&g),
            caramba_ir::to_text(&h)
        );
    }
    assert!(fused > 20, "only {fused} fusions in 48 random graphs");
}

#[test]
fn swiglu_gate_fuses_into_one_kernel() {
    let mut g = Graph::new("t");
    let a = g.input("a", ty(DType::F32, &[c(2), c(8)])).unwrap();
    let b = g.input("b", ty(DType::F32, &[c(2), c(8)])).unwrap();
    let s = g.add(Op::Unary(UnaryOp::Silu), &[a], "mlp").unwrap();
    let h = g.add(Op::Binary(BinaryOp::Mul), &[s, b], "mlp").unwrap();
    g.set_output("h", h);
    let (o, rep) = optimize(&g).unwrap();
    assert_eq!(count(&o, |op| matches!(op, Op::Elementwise(_))), 1);
    assert_eq!(rep.fused[0].rules, ["fuse-elementwise"]);
    assert_eq!(
        caramba_ir::to_text(&o).lines().nth(3).unwrap().trim(),
        "%2 = elementwise {$0=in0; $1=silu($0); $2=in1; $3=mul($1, $2)} %0, %1 : f32[2, 8]  @ mlp"
    );
}

/// How many times the unary or binary `op` is computed in `g`: as a node of
/// its own or inside an `elementwise` program.
fn computed(g: &Graph, op: &Op) -> usize {
    g.node_ids()
        .map(|n| match &g.node(n).op {
            Op::Elementwise(p) => {
                p.0.iter()
                    .filter(|i| match (i, op) {
                        (caramba_ir::ElemInstr::Unary(u, _), Op::Unary(v)) => u == v,
                        (caramba_ir::ElemInstr::Binary(b, ..), Op::Binary(c)) => b == c,
                        _ => false,
                    })
                    .count()
            }
            o => usize::from(o == op),
        })
        .sum()
}

/// The program texts of the `elementwise` nodes of `g`, in topological order.
fn programs(g: &Graph) -> Vec<String> {
    g.topo_order()
        .into_iter()
        .filter_map(|n| match &g.node(n).op {
            Op::Elementwise(p) => Some(p.to_string()),
            _ => None,
        })
        .collect()
}

/// Optimizes `g` with the elementwise pass only, checks the result against
/// `g` on random values, and returns it with the pass's count.
fn fuse_only(g: &Graph) -> (Graph, usize) {
    let opts = Options {
        only: Some(Vec::new()),
        ..Options::default()
    };
    let (h, rep) = optimize_with(g, &opts).unwrap();
    let mut rng = Rng::new(5);
    for _ in 0..3 {
        let err = compare(g, &h, &mut rng, (1, 1), 1);
        assert!(
            err < 1e-12,
            "changed by {err}\nbefore:\n{}after:\n{}",
            caramba_ir::to_text(g),
            caramba_ir::to_text(&h)
        );
    }
    let applied = rep.applied.get("fuse-elementwise").copied().unwrap_or(0);
    (h, applied)
}

/// SwiGLU in a training graph: the forward's `silu(a)·b` and the backward's
/// `dy·silu(a)` both read `silu(a)`; it is recomputed in each product's
/// kernel instead of being a kernel of its own.
#[test]
fn a_unary_read_by_two_kernels_is_recomputed_in_each() {
    let mut g = Graph::new("t");
    let t = ty(DType::F64, &[c(3), c(8)]);
    let a = g.input("a", t.clone()).unwrap();
    let b = g.input("b", t.clone()).unwrap();
    let dy = g.input("dy", t).unwrap();
    let s = g.add(Op::Unary(UnaryOp::Silu), &[a], "mlp").unwrap();
    let h = bin(&mut g, BinaryOp::Mul, s, b);
    let db = bin(&mut g, BinaryOp::Mul, dy, s);
    g.set_output("h", h);
    g.set_output("db", db);
    let (o, applied) = fuse_only(&g);
    assert_eq!(count(&o, |op| matches!(op, Op::Elementwise(_))), 2);
    assert_eq!(
        count(&o, |op| matches!(op, Op::Unary(_) | Op::Binary(_))),
        0
    );
    assert_eq!(
        programs(&o),
        [
            "$0=in0; $1=silu($0); $2=in1; $3=mul($1, $2)",
            "$0=in0; $1=silu($0); $2=in1; $3=mul($2, $1)"
        ],
        "{}",
        caramba_ir::to_text(&o)
    );
    // Two kernels formed and one op recomputed.
    assert_eq!(applied, 3);
    // Both kernels read `a` where they read `silu(a)`.
    let reads = |n: NodeId| o.operands(n);
    let input = |name: &str| o.inputs().find(|(n, _)| *n == name).unwrap().1;
    let (ia, ib, idy) = (input("a"), input("b"), input("dy"));
    assert_eq!(reads(o.output("h").unwrap()), [ia, ib]);
    assert_eq!(reads(o.output("db").unwrap()), [ia, idy]);
}

/// A unary op rooting a group that reads one tensor (here with a scalar
/// folded in) is recomputed with its group; users in one kernel share one
/// copy.
#[test]
fn a_unary_chain_is_recomputed_once_per_kernel() {
    let mut g = Graph::new("t");
    let t = ty(DType::F64, &[c(2), c(4)]);
    let x = g.input("x", t.clone()).unwrap();
    let y = g.input("y", t).unwrap();
    let e = g.add(Op::Unary(UnaryOp::Neg), &[x], "").unwrap();
    let half = g.constant(0.5, DType::F64, "");
    let m = bin(&mut g, BinaryOp::Max, e, half);
    let s = g.add(Op::Unary(UnaryOp::Sigmoid), &[m], "").unwrap();
    // Two users of `s` in one kernel, one in another.
    let p = bin(&mut g, BinaryOp::Mul, s, y);
    let q = bin(&mut g, BinaryOp::Add, p, s);
    let r = bin(&mut g, BinaryOp::Sub, y, s);
    g.set_output("q", q);
    g.set_output("r", r);
    let (o, applied) = fuse_only(&g);
    assert_eq!(count(&o, |op| matches!(op, Op::Elementwise(_))), 2);
    assert_eq!(
        count(&o, |op| matches!(op, Op::Unary(_) | Op::Binary(_))),
        0
    );
    assert_eq!(computed(&o, &Op::Unary(UnaryOp::Sigmoid)), 2);
    assert_eq!(computed(&o, &Op::Unary(UnaryOp::Neg)), 2);
    assert_eq!(computed(&o, &Op::Binary(BinaryOp::Max)), 2);
    // Two kernels formed, three ops recomputed.
    assert_eq!(applied, 2 + 3);
    let f = elementwise::fuse(&g).unwrap();
    assert_eq!(f.recomputed, [e, m, s]);
    // Every node left in the graph is still mapped; recomputed ones are not.
    for (old, new) in &f.map {
        assert!(!f.recomputed.contains(old));
        let (was, is) = (g.node(*old).op.mnemonic(), f.graph.node(*new).op.mnemonic());
        assert!(was == is || is == "elementwise", "{was} → {is}");
    }
    assert_eq!(f.map.len(), f.graph.node_count());
}

/// What is not recomputed: a unary whose users are already in its kernel,
/// one read by a broadcasting product, by a cast or by a matmul, one that
/// is an output, and one whose kernel holds a binary op.
#[test]
fn a_unary_is_not_recomputed_where_it_saves_nothing() {
    let t = ty(DType::F64, &[c(2), c(4)]);
    type Build = fn(&mut Graph, NodeId, NodeId) -> Vec<(&'static str, NodeId)>;
    let cases: [(&str, Build); 6] = [
        ("users in its own kernel", |g, s, y| {
            // σ(x)·(1 − σ(x)): both users of σ(x) are in one kernel.
            let one = g.constant(1.0, DType::F64, "");
            let c = bin(g, BinaryOp::Sub, one, s);
            let o = bin(g, BinaryOp::Mul, s, c);
            vec![("o", bin(g, BinaryOp::Add, o, y))]
        }),
        ("a broadcasting user", |g, s, y| {
            let w = g.input("w", ty(DType::F64, &[c(3), c(2), c(4)])).unwrap();
            vec![
                ("o", bin(g, BinaryOp::Mul, s, y)),
                ("p", bin(g, BinaryOp::Mul, w, s)),
            ]
        }),
        ("a cast user", |g, s, y| {
            let h = g.add(Op::Cast(DType::F32), &[s], "").unwrap();
            vec![("o", bin(g, BinaryOp::Mul, s, y)), ("h", h)]
        }),
        ("a matmul user", |g, s, y| {
            let w = g.input("w", ty(DType::F64, &[c(4), c(4)])).unwrap();
            let m = g.add(Op::MatMul, &[s, w], "").unwrap();
            vec![("o", bin(g, BinaryOp::Mul, s, y)), ("m", m)]
        }),
        ("an output", |g, s, y| {
            vec![
                ("o", bin(g, BinaryOp::Mul, s, y)),
                ("p", bin(g, BinaryOp::Add, y, s)),
                ("s", s),
            ]
        }),
        ("a binary op in its kernel", |g, s, y| {
            // `s` stands for `x + y` here; `silu(x + y)` is one kernel
            // whose `add` would have to be stored in its place.
            let u = g.add(Op::Unary(UnaryOp::Silu), &[s], "").unwrap();
            vec![
                ("o", bin(g, BinaryOp::Mul, u, y)),
                ("p", bin(g, BinaryOp::Sub, y, u)),
            ]
        }),
    ];
    for (what, build) in cases {
        let mut g = Graph::new("t");
        let x = g.input("x", t.clone()).unwrap();
        let y = g.input("y", t.clone()).unwrap();
        let s = if what == "a binary op in its kernel" {
            bin(&mut g, BinaryOp::Add, x, y)
        } else {
            g.add(Op::Unary(UnaryOp::Sigmoid), &[x], "").unwrap()
        };
        for (name, n) in build(&mut g, s, y) {
            g.set_output(name, n);
        }
        let unary = |g: &Graph| {
            computed(g, &Op::Unary(UnaryOp::Sigmoid)) + computed(g, &Op::Unary(UnaryOp::Silu))
        };
        let (o, _) = fuse_only(&g);
        assert_eq!(
            (unary(&g), unary(&o)),
            (1, 1),
            "{what}: recomputed\n{}",
            caramba_ir::to_text(&o)
        );
        let f = elementwise::fuse(&g).unwrap();
        assert!(f.recomputed.is_empty(), "{what}: {:?}", f.recomputed);
    }
}

// ----------------------------------------------------------- whole models

fn manifests() -> Vec<(String, String)> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let mut out = Vec::new();
    for dir in ["presets", "tests/data/manifests/ok"] {
        let mut files: Vec<_> = std::fs::read_dir(format!("{root}/{dir}"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yml"))
            .collect();
        files.sort();
        for f in files {
            out.push((
                f.display().to_string(),
                std::fs::read_to_string(&f).unwrap(),
            ));
        }
    }
    assert!(
        out.len() >= 15,
        "presets and manifests found: {}",
        out.len()
    );
    out
}

/// Softmaxes whose result feeds a matmul directly: the attentions to fuse.
fn attention_sites(g: &Graph) -> usize {
    g.node_ids()
        .filter(|&n| matches!(g.node(n).op, Op::Softmax { .. }))
        .filter(|&n| g.users(n).iter().all(|&u| g.node(u).op == Op::MatMul))
        .count()
}

#[test]
fn every_model_optimizes_to_the_same_logits() {
    let mut rng = Rng::new(3);
    for (path, src) in manifests() {
        let compiled = crate::compile(&src).unwrap_or_else(|e| panic!("{path}: {e:?}"));
        let model = crate::reduced(&compiled.manifest.model);
        let lowered = crate::lower_model(&model, "m", DType::F32).unwrap();
        let g = &lowered.graph;
        let (h, rep) = optimize(g).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(rep.rejected.is_empty(), "{path}: {:?}", rep.rejected);
        caramba_ir::verify(&h).unwrap();
        let norms = lowered
            .layers
            .iter()
            .filter(|l| l.kind.starts_with("RMSNorm") || l.kind.starts_with("LayerNorm"))
            .count();
        // Each norm read by one (merged) product folds into it.
        assert_eq!(
            count(&h, |o| matches!(
                o,
                Op::RmsNorm { .. } | Op::RmsNormMatMul { .. } | Op::MatMulRope { eps: Some(_), .. }
            )),
            norms,
            "{path}: one rms_norm(_matmul) per RMSNorm layer, and per LayerNorm (of x − mean)"
        );
        let sites = attention_sites(g);
        assert_eq!(
            count(&h, |o| matches!(o, Op::Attention { .. })),
            sites,
            "{path}: one attention per attention layer (DBA included)"
        );
        assert_eq!(attention_sites(&h), 0, "{path}: unfused attention left");
        let err = compare(g, &h, &mut rng, (5, 5), model.embedder.vocab_size);
        assert!(
            err < 1e-4,
            "{path}: optimized logits differ by {err} (relative)"
        );
    }
}

#[test]
fn dba_layers_run_as_one_attention_over_concatenated_features() {
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../presets/dba.yml"))
        .unwrap();
    let c = crate::compile(&src).unwrap();
    let (h, rep) = optimize(&c.student.graph).unwrap();
    let att: Vec<_> = rep
        .fused
        .iter()
        .filter(|f| matches!(f.op, Op::Attention { .. }))
        .collect();
    assert_eq!(att.len(), 1);
    assert_eq!(att[0].rules, ["merge-dba-scores", "fuse-attention"]);
    let q = h.operands(att[0].node)[0];
    // sem 32 + geo 64 over 4 heads: 8 + 16 features per head.
    assert_eq!(h.node(q).ty.shape.last(), Some(c_dim(24)));
    assert!(rep.cost_after < rep.cost_before / 2.0, "{rep:?}");
}

fn c_dim(n: usize) -> Dim {
    Dim::Const(n)
}

#[test]
fn the_1b_preset_optimizes_quickly() {
    let src = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../presets/llama32_1b_dba.yml"
    ))
    .unwrap();
    let c = crate::compile(&src).unwrap();
    let (_, rep) = optimize(&c.student.graph).unwrap();
    assert_eq!(rep.stop, Stop::Saturated, "{rep:?}");
    assert_eq!(
        rep.fused
            .iter()
            .filter(|f| matches!(f.op, Op::Attention { .. }))
            .count(),
        16
    );
    // Debug builds are several times slower than the bench's release build.
    assert!(rep.elapsed.as_secs_f64() < 10.0, "{:?}", rep.elapsed);
}

#[test]
fn half_precision_models_fuse_attention_and_agree() {
    let mut rng = Rng::new(11);
    for name in ["dba.yml", "llama_block.yml"] {
        let path = format!("{}/../presets/{name}", env!("CARGO_MANIFEST_DIR"));
        let c = crate::compile(&std::fs::read_to_string(path).unwrap()).unwrap();
        let model = crate::reduced(&c.manifest.model);
        for dtype in [DType::F16, DType::BF16] {
            let lowered = crate::lower_model(&model, "m", dtype).unwrap();
            let g = lowered.graph;
            let (h, rep) = optimize(&g).unwrap();
            assert!(rep.rejected.is_empty(), "{:?}", rep.rejected);
            assert_eq!(
                count(&h, |o| matches!(o, Op::Attention { .. })),
                attention_sites(&g)
            );
            // Norms widen to f32 and narrow before the weight, which is a
            // half `rms_norm`'s definition: one per RMSNorm layer (a half
            // LayerNorm normalizes its centred f32 row: not fused).
            let norms = lowered
                .layers
                .iter()
                .filter(|l| l.kind.starts_with("RMSNorm"))
                .count();
            assert!(norms > 0, "{name}");
            let folded = count(&h, folds_a_norm);
            assert!(
                folded > 0,
                "{name} {dtype}: no norm folded into its product"
            );
            assert_eq!(
                count(&h, |o| matches!(o, Op::RmsNorm { .. })) + folded,
                norms
            );
            let err = compare(&g, &h, &mut rng, (4, 4), model.embedder.vocab_size);
            assert!(err < 3e-2, "{name} {dtype}: differs by {err}");
        }
    }
}

// ------------------------------------------------------------- KV caches

/// Runs a cached graph on `ids` (batch 1) after `past` cached positions.
fn run_cached(
    g: &Graph,
    params: &BTreeMap<String, Tensor>,
    ids: &[i32],
    start: usize,
    past: &BTreeMap<String, Tensor>,
) -> BTreeMap<String, Tensor> {
    let t = ids.len();
    let mut b = Bindings::new(params)
        .input("input_ids", Tensor::i32(vec![1, t], ids.to_vec()))
        .input(
            "positions",
            Tensor::i32(vec![t], (start as i32..(start + t) as i32).collect()),
        );
    for (name, v) in past {
        b = b.input(&format!("past.{name}"), v.clone());
    }
    eval(g, &b).unwrap_or_else(|e| panic!("{e}"))
}

/// Cached graphs — prefill into an empty cache, then one decode step — give
/// the uncached logits (exactly, up to rounding, for an fp32 cache), and the
/// optimized cached graph, whose attentions all read the caches directly
/// through `dequantize-in-attention`, gives the unoptimized one's.
#[test]
fn cached_models_match_uncached_and_fuse_dequantization() {
    use crate::{lower_model_cached, CacheFormat as F, KvCacheSpec};
    use caramba_ir::QuantFormat::{Nf4, Q4, Q8};
    let llama = crate::hf::llama_model(&crate::hf::LlamaDims {
        vocab_size: 61,
        hidden_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        intermediate_size: 96,
        rope_theta: 10000.0,
        rope_scaling: None,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: false,
    });
    let dba_src =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../presets/dba.yml"))
            .unwrap()
            .replace("n_kv_heads: 2", "n_kv_heads: 4");
    let dba = crate::compile(&dba_src).unwrap().manifest.model;
    let uniform = KvCacheSpec::uniform;
    let mixed = KvCacheSpec {
        k: F::Quant(Q8),
        k_sem: F::Quant(Q8),
        k_geo: F::Quant(Q4),
        v: F::Quant(Nf4),
    };
    let mut rng = Rng::new(11);
    for (name, model) in [("llama", llama), ("dba", dba)] {
        let plain = crate::lower_model(&model, "m", DType::F32).unwrap().graph;
        let (_, params) = bindings(&plain, &mut rng, (1, 1), 1);
        let vocab = model.embedder.vocab_size;
        let ids: Vec<i32> = (0..6).map(|_| rng.below(vocab) as i32).collect();
        let full = run_cached(&plain, &params, &ids, 0, &BTreeMap::new())["logits"].clone();
        let full = full.to_f32_vec();
        for spec in [
            uniform(F::Fp32),
            uniform(F::Fp16),
            uniform(F::Quant(Q8)),
            uniform(F::Quant(Q4)),
            uniform(F::Quant(Nf4)),
            mixed,
        ] {
            let what = format!("{name} {spec:?}");
            let lowered = lower_model_cached(&model, "m", DType::F32, spec).unwrap();
            let g = &lowered.graph;
            caramba_ir::verify(g).unwrap();
            let (h, rep) = optimize(g).unwrap();
            assert!(rep.rejected.is_empty(), "{what}: {:?}", rep.rejected);
            let layers = attention_sites(&plain);
            assert_eq!(
                count(&h, |o| matches!(o, Op::KvAttention { .. })),
                layers,
                "{what}"
            );
            assert_eq!(
                count(&h, |o| matches!(o, Op::Dequantize { .. })),
                0,
                "{what}"
            );
            let empty: BTreeMap<String, Tensor> = lowered
                .cache
                .iter()
                .map(|e| {
                    let t = match e.dtype {
                        DType::I32 => Tensor::i32(vec![1, 0, e.width], vec![]),
                        d => Tensor::from_f32_as(d, vec![1, 0, e.width], vec![]),
                    };
                    (e.name.clone(), t)
                })
                .collect();
            let pre = run_cached(g, &params, &ids[..5], 0, &empty);
            let past: BTreeMap<String, Tensor> = lowered
                .cache
                .iter()
                .map(|e| (e.name.clone(), pre[&format!("present.{}", e.name)].clone()))
                .collect();
            assert_eq!(past.values().next().unwrap().shape()[1], 5, "{what}");
            let step = run_cached(g, &params, &ids[5..], 5, &past);
            let fused = run_cached(&h, &params, &ids[5..], 5, &past);
            let (a, b) = (step["logits"].to_f32_vec(), fused["logits"].to_f32_vec());
            let diff = a
                .iter()
                .zip(&b)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(diff < 1e-4, "{what}: optimized decode differs by {diff}");
            // Against the uncached model: the prefill's logits and the step's.
            let mut got = pre["logits"].to_f32_vec();
            got.extend(&a);
            let scale = full.iter().fold(0f32, |m, x| m.max(x.abs()));
            let diff = got
                .iter()
                .zip(&full)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
                / scale;
            // Relative bounds: rounding for fp32; each format's error through
            // random weights with peaked attention (seen: fp16 4e-4, q8 1e-2,
            // 4-bit formats 0.12–0.26).
            let bound = match spec {
                s if s == uniform(F::Fp32) => 1e-6,
                s if s == uniform(F::Fp16) => 2e-3,
                s if s == uniform(F::Quant(Q8)) => 3e-2,
                _ => 0.5,
            };
            assert!(
                diff < bound,
                "{what}: cached logits differ from uncached by {diff} (relative)"
            );
        }
    }
}

/// One or two key paths and the values, each cached in a random format
/// (an fp32 cache as its append), viewed as heads, through masked softmax.
fn kv_cache_graph(rng: &mut Rng) -> Graph {
    use caramba_ir::QuantFormat;
    let kv = rng.range(1, 2);
    let grp = rng.range(1, 2);
    let (b, t, s, p) = (
        Dim::Sym(Sym::B),
        Dim::Sym(Sym::T),
        Dim::Sym(Sym::S),
        Dim::Sym(Sym::P),
    );
    let mut g = Graph::new("t");
    let path = |g: &mut Graph, name: &str, d: usize, rng: &mut Rng| -> NodeId {
        let w = kv * d;
        let dense = match rng.below(4) {
            0 => {
                let past = g
                    .input(&format!("past_{name}"), ty(DType::F64, &[b, p, c(w)]))
                    .unwrap();
                let new = g
                    .input(&format!("new_{name}"), ty(DType::F64, &[b, t, c(w)]))
                    .unwrap();
                g.add(Op::Concat { axis: 1 }, &[past, new], "").unwrap()
            }
            k => {
                let f = [QuantFormat::Q8, QuantFormat::Q4, QuantFormat::Nf4][k - 1];
                let raw = g.input(name, ty(DType::F64, &[b, s, c(w)])).unwrap();
                let q = g.add(Op::Quantize(f), &[raw], "").unwrap();
                let dq = Op::Dequantize {
                    format: f,
                    dtype: DType::F64,
                };
                g.add(dq, &[q], "").unwrap()
            }
        };
        let r = g
            .add(
                Op::Reshape(Shape::new([b, s, c(kv), c(1), c(d)])),
                &[dense],
                "",
            )
            .unwrap();
        g.add(Op::Permute(vec![0, 2, 3, 1, 4]), &[r], "").unwrap()
    };
    let d1 = 32 / kv * rng.range(1, 2);
    let mut keys = vec![path(&mut g, "k1", d1, rng)];
    let mut dk = d1;
    if rng.bool() {
        let d2 = 32 / kv;
        keys.push(path(&mut g, "k2", d2, rng));
        dk += d2;
    }
    let v = path(&mut g, "v", 32 / kv, rng);
    let k = if keys.len() == 1 {
        keys[0]
    } else {
        g.add(Op::Concat { axis: 4 }, &keys, "").unwrap()
    };
    let q = g
        .input("q", ty(DType::F64, &[b, c(kv), c(grp), t, c(dk)]))
        .unwrap();
    let kt = g.add(Op::Permute(vec![0, 1, 2, 4, 3]), &[k], "").unwrap();
    let scores = g.add(Op::MatMul, &[q, kt], "attn").unwrap();
    let m = if rng.bool() {
        g.add(Op::CausalMask, &[scores], "attn").unwrap()
    } else {
        scores
    };
    let pr = g.add(Op::Softmax { axis: 4 }, &[m], "attn").unwrap();
    let o = g.add(Op::MatMul, &[pr, v], "attn").unwrap();
    g.set_output("o", o);
    g
}

#[test]
fn dequantize_in_attention_is_sound() {
    prove(
        "dequantize-in-attention",
        &[
            "dequantize-in-attention",
            "fuse-attention",
            "permute-compose",
            "permute-identity",
        ],
        24,
        |rng| {
            let g = kv_cache_graph(rng);
            let (h, _) = optimize(&g).unwrap();
            assert_eq!(count(&h, |o| matches!(o, Op::KvAttention { .. })), 1);
            assert_eq!(count(&h, |o| matches!(o, Op::Dequantize { .. })), 0);
            g
        },
    );
}

// ---------------------------------------------------- merge-projections

/// `merge-projections` on the presets that have attention: q, k and v
/// become one product and SwiGLU's gate and up another (two and one fewer
/// products a layer), in f32 and in mixed precision (weights read through
/// casts), and the outputs agree with the unmerged graph's.
#[test]
fn merge_projections_stacks_sibling_weights_and_agrees() {
    let mut rng = Rng::new(23);
    for name in ["llama_block.yml", "dba.yml"] {
        let path = format!("{}/../presets/{name}", env!("CARGO_MANIFEST_DIR"));
        let c = crate::compile(&std::fs::read_to_string(path).unwrap()).unwrap();
        let model = crate::reduced(&c.manifest.model);
        for precision in [
            crate::Precision::uniform(DType::F32),
            crate::Precision::mixed(DType::BF16),
        ] {
            let g = crate::lower_model_with(&model, "m", precision, None)
                .unwrap()
                .graph;
            let h = super::merge_projections(&g).unwrap();
            caramba_ir::verify(&h).unwrap();
            let products = |g: &Graph| count(g, |o| *o == Op::MatMul);
            let stacked = count(&h, |o| *o == Op::Concat { axis: 0 });
            assert!(stacked > 0, "{name}: nothing merged");
            assert!(products(&h) < products(&g), "{name}");
            // Each stack of n weights saves n − 1 products.
            let saved: usize = h
                .node_ids()
                .filter(|&n| h.node(n).op == Op::Concat { axis: 0 })
                .map(|n| h.operands(n).len() - 1)
                .sum();
            assert_eq!(products(&g) - products(&h), saved, "{name}");
            // The same dot products, but the reference's GEMM tiles its sums
            // by the output's width: f32 rounding differences, which bf16
            // activations can round one step apart.
            let tol = if precision.compute == DType::F32 {
                1e-5
            } else {
                3e-2
            };
            let err = compare(&g, &h, &mut rng, (3, 5), model.embedder.vocab_size);
            assert!(err <= tol, "{name} {precision:?}: differs by {err}");
        }
    }
}

// ---------------------------------------------------------------- row dot

/// `sum_last(mul(·, ·))` of two operands of one random type and shape, as
/// attention's backward writes `delta`: for f16/bf16 operands each widened
/// to f32 first, for f32/f64 ones read as they are; the product's operands
/// in random order, and sometimes a widened copy with another user.
fn row_dot_graph(rng: &mut Rng) -> Graph {
    let dtype = [DType::BF16, DType::F16, DType::F32, DType::F64][rng.below(4)];
    let rank = rng.range(1, 4);
    let mut dims = random_dims(rng, rank);
    if rank > 1 && rng.bool() {
        dims[0] = Dim::Sym(Sym::T);
    }
    dims[rank - 1] = c(rng.range(1, 9));
    let mut g = Graph::new("t");
    let x = g.input("x", ty(dtype, &dims)).unwrap();
    let y = g.input("y", ty(dtype, &dims)).unwrap();
    let (mut a, mut b) = (x, y);
    if dtype.stats() != dtype {
        a = g.add(Op::Cast(dtype.stats()), &[x], "").unwrap();
        b = g.add(Op::Cast(dtype.stats()), &[y], "").unwrap();
        if rng.bool() {
            g.set_output("widened", a);
        }
    }
    if rng.bool() {
        std::mem::swap(&mut a, &mut b);
    }
    let p = bin(&mut g, BinaryOp::Mul, a, b);
    let sum = Op::Reduce {
        op: ReduceOp::Sum,
        axis: rank - 1,
    };
    let s = g.add(sum, &[p], "").unwrap();
    g.set_output("delta", s);
    g
}

#[test]
fn row_dot_is_sound() {
    prove("row-dot", &["row-dot"], 24, |rng| {
        let g = row_dot_graph(rng);
        let (h, _) = optimize(&g).unwrap();
        assert_eq!(
            count(&h, |o| *o == Op::RowDot),
            1,
            "{}",
            caramba_ir::to_text(&h)
        );
        g
    });
}

#[test]
fn row_dot_leaves_half_products_and_broadcasts_alone() {
    // A product computed in half precision rounds: not a row_dot.
    let mut g = Graph::new("t");
    let x = g.input("x", ty(DType::BF16, &[c(3), c(8)])).unwrap();
    let y = g.input("y", ty(DType::BF16, &[c(3), c(8)])).unwrap();
    let p = bin(&mut g, BinaryOp::Mul, x, y);
    let sum = |axis| Op::Reduce {
        op: ReduceOp::Sum,
        axis,
    };
    let s = g.add(sum(1), &[p], "").unwrap();
    g.set_output("half", s);
    // A broadcast operand, and a sum over another axis.
    let u = g.input("u", ty(DType::F32, &[c(3), c(8)])).unwrap();
    let v = g.input("v", ty(DType::F32, &[c(1), c(8)])).unwrap();
    let p = bin(&mut g, BinaryOp::Mul, u, v);
    let s = g.add(sum(1), &[p], "").unwrap();
    g.set_output("broadcast", s);
    let w = g.input("w", ty(DType::F32, &[c(3), c(8)])).unwrap();
    let p = bin(&mut g, BinaryOp::Mul, u, w);
    let s = g.add(sum(0), &[p], "").unwrap();
    g.set_output("columns", s);
    let (h, rep) = optimize(&g).unwrap();
    assert!(rep.rejected.is_empty(), "{:?}", rep.rejected);
    assert_eq!(count(&h, |o| *o == Op::RowDot), 0);
}

#[test]
fn row_dot_costs_less_than_its_decomposition() {
    let t = |d| ty(d, &[Dim::Sym(Sym::B), c(3), c(3), Dim::Sym(Sym::T), c(64)]);
    for d in [DType::BF16, DType::F32] {
        let mut g = Graph::new("t");
        let x = g.input("x", t(d)).unwrap();
        let y = g.input("y", t(d)).unwrap();
        let (mut a, mut b) = (x, y);
        if d != DType::F32 {
            a = g.add(Op::Cast(DType::F32), &[x], "").unwrap();
            b = g.add(Op::Cast(DType::F32), &[y], "").unwrap();
        }
        let p = bin(&mut g, BinaryOp::Mul, a, b);
        let sum = Op::Reduce {
            op: ReduceOp::Sum,
            axis: 4,
        };
        let s = g.add(sum, &[p], "").unwrap();
        g.set_output("delta", s);
        let mut f = Graph::new("t");
        let x = f.input("x", t(d)).unwrap();
        let y = f.input("y", t(d)).unwrap();
        let s = f.add(Op::RowDot, &[x, y], "").unwrap();
        f.set_output("delta", s);
        // Half operands: 4 bytes an element read instead of 28 (two casts,
        // the product, the sum); f32: 8 instead of 16.
        let (before, after) = (cost::graph_cost(&g), cost::graph_cost(&f));
        let gain = if d == DType::F32 { 1.8 } else { 5.0 };
        assert!(after * gain < before, "{d}: {after} vs {before}");
    }
}

/// A half-precision Llama's training graph: each attention's backward gets
/// its `delta` from one `row_dot` of the output's adjoint and the output,
/// with no widened copies, product or sum of them left.
#[test]
fn half_training_graphs_sum_attention_delta_in_one_row_dot() {
    let path = format!("{}/../presets/llama_block.yml", env!("CARGO_MANIFEST_DIR"));
    let c = crate::compile(&std::fs::read_to_string(path).unwrap()).unwrap();
    let model = crate::reduced(&c.manifest.model);
    for dtype in [DType::BF16, DType::F32] {
        let mut forward = crate::lower_model(&model, "m", dtype).unwrap().graph;
        caramba_ir::autodiff::add_next_token_loss(&mut forward, "logits").unwrap();
        let names: Vec<String> = forward.params().map(|(n, _)| n.to_string()).collect();
        let g = differentiate_for_training(&forward, "loss", &names).unwrap();
        let (h, rep) = optimize(&g).unwrap();
        assert!(rep.rejected.is_empty(), "{:?}", rep.rejected);
        let grads: Vec<NodeId> = h
            .node_ids()
            .filter(|&n| matches!(h.node(n).op, Op::AttentionGrad { .. }))
            .collect();
        assert!(!grads.is_empty());
        for n in grads {
            let delta = h.operands(n)[5];
            assert_eq!(
                h.node(delta).op,
                Op::RowDot,
                "{dtype}: delta is {}",
                h.node(delta).op.mnemonic()
            );
            let dot = h.operands(delta);
            assert!(
                dot.iter().all(|&o| h.node(o).ty.dtype == dtype),
                "{dtype}: row_dot reads widened copies"
            );
        }
        assert!(rep.applied.get("row-dot").copied().unwrap_or(0) > 0);
        assert!(rep
            .fused
            .iter()
            .any(|f| f.op == Op::RowDot && f.rules == ["row-dot"]));
    }
}

/// Every norm of a deep model folds into its product: as an e-graph rule,
/// extraction lost the fold in the last five blocks of the 16-layer
/// preset, where tree costs outgrow f64's spacing (`norm_matmul.rs`).
#[test]
fn every_norm_of_the_1b_preset_folds_into_its_product() {
    let src = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../presets/llama32_1b_dba.yml"
    ))
    .unwrap();
    let c = crate::compile(&src).unwrap();
    let (h, rep) = optimize(&c.student.graph).unwrap();
    // Two per block and the final norm before the LM head.
    assert_eq!(count(&h, folds_a_norm), 33);
    assert_eq!(count(&h, |o| matches!(o, Op::RmsNorm { .. })), 0);
    assert_eq!(rep.applied.get("fuse-norm-matmul"), Some(&33));
    let folded = rep
        .fused
        .iter()
        .find(|f| matches!(f.op, Op::RmsNormMatMul { .. }))
        .unwrap();
    assert_eq!(folded.rules, ["fuse-rmsnorm", "fuse-norm-matmul"]);
    // Each block's q/k/v product rotates its geometric q and k in its
    // epilogue, as one range.
    assert_eq!(rep.applied.get("fuse-rope-matmul"), Some(&16));
    let rotated = rep
        .fused
        .iter()
        .filter(
            |f| matches!(&f.op, Op::MatMulRope { eps: Some(_), ranges, .. } if ranges.len() == 1),
        )
        .count();
    assert_eq!(rotated, 16);
    assert_eq!(count(&h, |o| matches!(o, Op::Rope(_))), 0);
    let epilogue = rep
        .fused
        .iter()
        .find(|f| matches!(f.op, Op::MatMulRope { .. }))
        .unwrap();
    assert_eq!(
        epilogue.rules,
        ["fuse-rmsnorm", "fuse-norm-matmul", "fuse-rope-matmul"]
    );
}

/// A norm folded into the product that reads it: `rms_norm_matmul`, or
/// that with RoPE in its epilogue.
fn folds_a_norm(o: &Op) -> bool {
    matches!(
        o,
        Op::RmsNormMatMul { .. } | Op::MatMulRope { eps: Some(_), .. }
    )
}

/// Every manifest's model, plain and over q8 and f16 caches, at full size:
/// extraction settles as a DAG (no fallback to tree costs), in about one
/// visit a class.
#[test]
fn every_model_extracts_as_a_dag() {
    for (path, src) in manifests() {
        let c = crate::compile(&src).unwrap();
        let mut graphs = vec![c.student.graph.clone()];
        for format in [
            crate::CacheFormat::Quant(caramba_ir::QuantFormat::Q8),
            crate::CacheFormat::Fp16,
        ] {
            let spec = crate::KvCacheSpec::uniform(format);
            if let Ok(l) = crate::lower_model_cached(&c.manifest.model, "m", DType::F32, spec) {
                graphs.push(l.graph);
            }
        }
        for g in &graphs {
            let (_, rep) = optimize(g).unwrap();
            let Extraction::Dag { visits } = rep.extraction else {
                panic!("{path}: extraction fell back to tree costs");
            };
            assert!(
                visits <= 2 * rep.egraph_classes,
                "{path}: {visits} visits of {} classes",
                rep.egraph_classes
            );
        }
    }
}

/// SmolLM2's 30 layers over an f16 cache: every layer's attention reads the
/// cache in place (`dequantize-in-attention`, its f16 branch). Tree costs took it at 14 of
/// the 30: past the middle of the model, operand costs counted once per
/// path reach 1e20 and more, where f64 cannot see what the rule saves.
#[test]
fn every_layer_of_a_deep_cached_model_reads_its_cache_in_attention() {
    let src = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../presets/smollm2_135m_dba.yml"
    ))
    .unwrap();
    let c = crate::compile(&src).unwrap();
    let spec = crate::KvCacheSpec::uniform(crate::CacheFormat::Fp16);
    let l = crate::lower_model_cached(&c.manifest.model, "m", DType::F32, spec).unwrap();
    let (h, rep) = optimize(&l.graph).unwrap();
    assert!(matches!(rep.extraction, Extraction::Dag { .. }));
    assert_eq!(count(&h, |o| matches!(o, Op::KvAttention { .. })), 30);
    assert_eq!(count(&h, |o| matches!(o, Op::Attention { .. })), 0);
}

/// A preset's teacher (standard attention) as `caramba run` trains it in
/// `dtype`: the loss only, differentiated for every parameter, optimized.
fn preset_training_graph(file: &str, dtype: DType) -> (Graph, OptimizeReport) {
    let path = format!("{}/../presets/{file}", env!("CARGO_MANIFEST_DIR"));
    let c = crate::compile(&std::fs::read_to_string(path).unwrap()).unwrap();
    let model = crate::teacher_of(&c.manifest.model);
    let mut forward = crate::lower_model(&model, "m", dtype).unwrap().graph;
    caramba_ir::autodiff::add_next_token_loss(&mut forward, "logits").unwrap();
    forward.remove_output("logits");
    let names: Vec<String> = forward.params().map(|(n, _)| n.to_string()).collect();
    let g = differentiate_for_training(&forward, "loss", &names).unwrap();
    optimize(&g).unwrap()
}

/// The 16-layer 1B teacher's f32 training graph (GQA attention): every
/// attention backward takes its `delta` from one `row_dot`, and no
/// reduction reads a slice (`reduce-of-slice`: GQA's `dk‖dv` summed over
/// query groups once, then sliced). Under tree costs neither rule was
/// extracted at this depth: `row_dot` at none of the 16 layers, and the
/// 16 `sum(slice(dk‖dv))` pairs stayed (the shared sum counted once per
/// slice).
#[test]
fn deep_training_graphs_take_row_dot_and_reduce_of_slice_at_every_layer() {
    let (h, rep) = preset_training_graph("llama32_1b_dba.yml", DType::F32);
    assert!(matches!(rep.extraction, Extraction::Dag { .. }));
    let grads: Vec<NodeId> = h
        .node_ids()
        .filter(|&n| matches!(h.node(n).op, Op::AttentionGrad { .. }))
        .collect();
    assert!(grads.len() >= 16);
    for n in grads {
        let delta = h.operands(n)[5];
        assert_eq!(h.node(delta).op, Op::RowDot, "{}", h.node(n).scope);
    }
    let of_slices = h
        .node_ids()
        .filter(|&n| matches!(h.node(n).op, Op::Reduce { .. }))
        .filter(|&n| matches!(h.node(h.operands(n)[0]).op, Op::Slice { .. }))
        .count();
    assert_eq!(of_slices, 0);
}

/// `fold-weights` on every manifest's optimized model at test size: the
/// folded graph gives the optimized graph's outputs exactly (its values are
/// the reference's), reads no parameter only the folded values read, and
/// holds no more parameter values than the original. Models with merged
/// projections fold their stacked weights.
#[test]
fn folded_weights_give_the_same_outputs_and_hold_each_weight_once() {
    let mut rng = Rng::new(41);
    let values = |ps: &BTreeMap<String, Tensor>| -> usize {
        ps.values()
            .map(|t| t.shape().iter().product::<usize>())
            .sum()
    };
    for (path, src) in manifests() {
        let c = crate::compile(&src).unwrap();
        let model = crate::reduced(&c.manifest.model);
        let g = crate::lower_model(&model, "m", DType::F32).unwrap().graph;
        let (h, _) = optimize(&g).unwrap();
        let (inputs, params) = bindings(&h, &mut rng, (5, 5), model.embedder.vocab_size);
        let f = fold_weights(&h, &params).unwrap_or_else(|e| panic!("{path}: {e}"));
        caramba_ir::verify(&f.graph).unwrap();
        let merged = count(&h, |o| matches!(o, Op::Concat { .. })) > 0
            && count(&g, |o| matches!(o, Op::Concat { .. })) == 0;
        if merged {
            assert!(!f.folded.is_empty(), "{path}: nothing folded");
        }
        assert!(
            values(&f.params) <= values(&params),
            "{path}: more parameter values: {} > {}; folded {:?}",
            values(&f.params),
            values(&params),
            f.folded
                .iter()
                .map(|n| (n, f.params[n].shape().to_vec()))
                .collect::<Vec<_>>()
        );
        let read: Vec<&str> = f.graph.params().map(|(n, _)| n).collect();
        assert_eq!(
            read,
            f.params.keys().map(String::as_str).collect::<Vec<_>>(),
            "{path}: parameters bound and read"
        );
        let (x, y) = (run(&h, &inputs, &params), run(&f.graph, &inputs, &f.params));
        for (name, t) in &x {
            assert_eq!(t.max_abs_diff(&y[name]), 0.0, "{path}: output {name}");
        }
    }
}

/// A tied embedding is read by the gather as it is and by the LM head
/// transposed: the transpose is not folded into a second copy.
#[test]
fn a_tied_embedding_is_not_copied() {
    let mut dims = crate::hf::LlamaDims {
        vocab_size: 64,
        hidden_size: 16,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: 8,
        intermediate_size: 32,
        rope_theta: 10000.0,
        rope_scaling: None,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: true,
    };
    for tie in [true, false] {
        dims.tie_word_embeddings = tie;
        let spec = crate::hf::llama_model(&dims);
        let g = crate::lower_model(&spec, "m", DType::F32).unwrap().graph;
        let (h, _) = optimize(&g).unwrap();
        let (_, params) = bindings(&h, &mut Rng::new(5), (3, 3), 64);
        let f = fold_weights(&h, &params).unwrap();
        assert!(f.params.contains_key("model.embed_tokens.weight"));
        assert!(
            f.folded
                .iter()
                .all(|n| !n.contains("embed") && !n.contains("lm_head")),
            "tie {tie}: {:?}",
            f.folded
        );
        // q/k/v and gate/up of the one layer.
        assert_eq!(f.folded.len(), 2, "tie {tie}: {:?}", f.folded);
    }
}

/// Every rule and pass `rule_names` lists has a property test: a test
/// named `…_is_sound` or `…_are_sound` in this file that names it.
#[test]
fn every_rule_has_a_property_test() {
    let src = include_str!("tests.rs");
    let sound: Vec<&str> = src
        .split("#[test]\nfn ")
        .skip(1)
        .filter(|t| {
            let name = t.split('(').next().unwrap_or("");
            name.ends_with("_is_sound") || name.ends_with("_are_sound")
        })
        .collect();
    for rule in rule_names() {
        let quoted = format!("\"{rule}\"");
        assert!(
            sound.iter().any(|t| t.contains(&quoted)),
            "{rule} has no property test (a `…_is_sound` test naming it)"
        );
    }
}

/// Saturation stopped by each limit still gives a graph that verifies and
/// computes the same outputs (extraction takes what the e-graph holds).
#[test]
fn every_saturation_limit_stops_with_an_equivalent_graph() {
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../presets/dba.yml"))
        .unwrap();
    let c = crate::compile(&src).unwrap();
    let model = crate::reduced(&c.manifest.model);
    let g = crate::lower_model(&model, "m", DType::F32).unwrap().graph;
    let mut rng = Rng::new(77);
    let cases = [
        (
            Limits {
                max_nodes: 1,
                ..Limits::default()
            },
            Stop::NodeLimit,
        ),
        (
            Limits {
                max_iterations: 1,
                ..Limits::default()
            },
            Stop::IterationLimit,
        ),
        (
            Limits {
                max_time: std::time::Duration::ZERO,
                ..Limits::default()
            },
            Stop::TimeLimit,
        ),
    ];
    for (limits, stop) in cases {
        let opts = Options {
            limits,
            ..Options::default()
        };
        let (h, rep) = optimize_with(&g, &opts).unwrap();
        assert_eq!(rep.stop, stop);
        caramba_ir::verify(&h).unwrap();
        let err = compare(&g, &h, &mut rng, (5, 5), model.embedder.vocab_size);
        assert!(err < 1e-4, "{stop:?}: outputs differ by {err}");
    }
}

/// A graph written out from its outputs, depth first with operands in
/// order, numbered in that order: equal for graphs that differ only in
/// their node ids.
fn canonical(g: &Graph) -> Vec<String> {
    let mut num: HashMap<NodeId, usize> = HashMap::new();
    let mut lines = Vec::new();
    for (name, out) in g.outputs() {
        let mut stack = vec![(*out, false)];
        while let Some((n, expanded)) = stack.pop() {
            if num.contains_key(&n) {
                continue;
            }
            if !expanded {
                stack.push((n, true));
                for o in g.operands(n).into_iter().rev() {
                    stack.push((o, false));
                }
                continue;
            }
            let node = g.node(n);
            let ops: Vec<String> = g
                .operands(n)
                .iter()
                .map(|o| format!("%{}", num[o]))
                .collect();
            lines.push(format!(
                "{:?} ({}) : {} @ {}",
                node.op,
                ops.join(", "),
                node.ty,
                node.scope
            ));
            num.insert(n, num.len());
        }
        lines.push(format!("output {name} = %{}", num[out]));
    }
    lines
}

/// Layer reuse (`layers.rs`) gives the graph that saturating the whole
/// model gives: every manifest's model (plain and over q8 and fp16 caches),
/// and a deep training graph (forward and backward layers), at full size.
/// The same graph means the same node order too, which the executor
/// follows. The rule counts agree; the e-graphs built are smaller.
#[test]
fn every_model_optimizes_alike_by_layers() {
    let whole = Options {
        reuse_layers: false,
        ..Options::default()
    };
    let mut graphs: Vec<(String, Graph)> = Vec::new();
    for (path, src) in manifests() {
        let c = crate::compile(&src).unwrap();
        graphs.push((path.clone(), c.student.graph.clone()));
        for format in [
            crate::CacheFormat::Quant(caramba_ir::QuantFormat::Q8),
            crate::CacheFormat::Fp16,
        ] {
            let spec = crate::KvCacheSpec::uniform(format);
            if let Ok(l) = crate::lower_model_cached(&c.manifest.model, "m", DType::F32, spec) {
                graphs.push((format!("{path} ({format:?} cache)"), l.graph));
            }
        }
    }
    let path = format!(
        "{}/../presets/llama32_1b_dba.yml",
        env!("CARGO_MANIFEST_DIR")
    );
    let c = crate::compile(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut forward = crate::lower_model(&c.manifest.model, "m", DType::F32)
        .unwrap()
        .graph;
    caramba_ir::autodiff::add_next_token_loss(&mut forward, "logits").unwrap();
    forward.remove_output("logits");
    let names: Vec<String> = forward.params().map(|(n, _)| n.to_string()).collect();
    let train = differentiate_for_training(&forward, "loss", &names).unwrap();
    graphs.push((format!("{path} (training)"), train));
    let mut reused = 0;
    for (what, g) in &graphs {
        let (a, ra) = optimize_with(g, &whole).unwrap();
        let (b, rb) = optimize(g).unwrap();
        assert_eq!(canonical(&a), canonical(&b), "{what}");
        assert_eq!(
            caramba_ir::to_text(&a),
            caramba_ir::to_text(&b),
            "{what}: node order"
        );
        assert_eq!(ra.applied, rb.applied, "{what}");
        assert_eq!(ra.fused, rb.fused, "{what}");
        assert!(ra.layers.is_none());
        if let Some(l) = &rb.layers {
            reused += 1;
            assert!(l.classes < l.layers, "{what}: {l:?}");
            assert!(rb.egraph_nodes < ra.egraph_nodes, "{what}");
        }
    }
    assert!(reused >= 10, "only {reused} graphs had identical layers");
}

#[test]
fn a_layer_is_the_first_numeric_segment_of_its_scope() {
    use super::layers::layer_of;
    assert_eq!(
        layer_of("model.layers.3.self_attn"),
        Some(("model.layers", 3))
    );
    assert_eq!(
        layer_of("model.layers.12.mlp/grad"),
        Some(("model.layers", 12))
    );
    assert_eq!(layer_of("model.layers.3/grad"), Some(("model.layers", 3)));
    assert_eq!(layer_of("blocks.0"), Some(("blocks", 0)));
    assert_eq!(layer_of("model.norm"), None);
    assert_eq!(layer_of("lm_head"), None);
    assert_eq!(layer_of(""), None);
}

/// Three layers, the third unlike the first two: two classes, and the
/// graph made from them computes what the input graph does, with each
/// layer reading its own weights.
#[test]
fn unlike_layers_form_classes_of_their_own() {
    let mut g = Graph::new("stack");
    let ty = TensorType::new(
        DType::F32,
        Shape::new(vec![Dim::Sym(Sym::T), Dim::Const(8)]),
    );
    let mut h = g.input("x", ty).unwrap();
    for (k, kind) in [(0, BinaryOp::Add), (1, BinaryOp::Add), (2, BinaryOp::Sub)] {
        let scope = format!("m.layers.{k}");
        let w = g
            .param(
                &format!("{scope}.weight"),
                TensorType::new(DType::F32, Shape::new(vec![Dim::Const(8)])),
                &scope,
            )
            .unwrap();
        let one = g.constant(1.0, DType::F32, &scope);
        let s = g.add(Op::Binary(BinaryOp::Mul), &[h, w], &scope).unwrap();
        let s = g.add(Op::Binary(BinaryOp::Mul), &[s, one], &scope).unwrap();
        h = g.add(Op::Binary(kind), &[s, h], &scope).unwrap();
    }
    g.set_output("y", h);
    let (opt, rep) = optimize(&g).unwrap();
    assert_eq!(
        rep.layers,
        Some(super::layers::Reuse {
            layers: 3,
            classes: 2
        })
    );
    let whole = Options {
        reuse_layers: false,
        ..Options::default()
    };
    let (a, _) = optimize_with(&g, &whole).unwrap();
    assert_eq!(canonical(&a), canonical(&opt));
    let mut names: Vec<&str> = opt.params().map(|(n, _)| n).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "m.layers.0.weight",
            "m.layers.1.weight",
            "m.layers.2.weight"
        ]
    );
    let mut rng = Rng::new(5);
    let err = compare(&g, &opt, &mut rng, (4, 4), 8);
    assert!(err < 1e-6, "outputs differ by {err}");
}

/// `last-position` on every preset and example at test size, batch 2: the
/// last-position graph's logits are the last rows of the whole graph's (to
/// f32's rounding: the reference's GEMM blocks one row differently from
/// seven), and its head and, in the Llamas, the last layer's MLP and output
/// projection run on one row.
#[test]
fn the_last_position_gives_the_last_row() {
    let mut rng = Rng::new(29);
    let mut checked = 0;
    for (path, src) in manifests() {
        let c = crate::compile(&src).unwrap();
        let model = crate::reduced(&c.manifest.model);
        let g = crate::lower_model(&model, "m", DType::F32).unwrap().graph;
        let h = crate::last_position(&g, "logits")
            .unwrap()
            .unwrap_or_else(|| panic!("{path}: no last-position graph"));
        caramba_ir::verify(&h).unwrap();
        let one_row = h
            .node_ids()
            .filter(|&n| {
                h.node(n).op == Op::MatMul
                    && h.node(n).ty.shape.dims().get(1) == Some(&Dim::Const(1))
            })
            .count();
        let llama = path.ends_with("tiny.yml") || path.ends_with("smollm2_135m_dba.yml");
        assert!(one_row >= if llama { 5 } else { 1 }, "{path}: {one_row}");
        let (t, vocab) = (7, model.embedder.vocab_size);
        let (mut inputs, params) = bindings(&g, &mut rng, (t, t), vocab);
        let whole = run(&g, &inputs, &params)["logits"].to_f64_vec();
        inputs.insert(
            crate::LAST_POSITION.to_string(),
            Tensor::i32(vec![1], vec![t as i32 - 1]),
        );
        let last = run(&h, &inputs, &params)["logits"].to_f64_vec();
        assert_eq!(last.len(), 2 * vocab, "{path}");
        let scale = whole.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        for s in 0..2 {
            let row = &whole[(s * t + t - 1) * vocab..(s * t + t) * vocab];
            let err = row
                .iter()
                .zip(&last[s * vocab..(s + 1) * vocab])
                .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
            assert!(err <= 1e-6 * scale, "{path}, sequence {s}: {err}");
        }
        checked += 1;
    }
    assert!(checked >= 10);
}

// ------------------------------------------------ linear cross-entropy

/// A language model's head and loss as lowering and `add_next_token_loss`
/// write them: `x = gather(E, ids)` `[B, T, K]` from an embedding `E [V,
/// K]`, `logits = matmul(x, w)` with `w` a `[K, V]` parameter or, tied,
/// `permute(E)`, the loss the mean of `cross_entropy` (of the widened
/// logits for f16/bf16), `logits` not an output. Also the vocabulary.
fn head_loss_graph(rng: &mut Rng, dtype: DType, tied: bool) -> (Graph, usize) {
    let (k, v) = (rng.range(1, 6), rng.range(2, 9));
    let mut g = Graph::new("t");
    let ids = g
        .input(
            "input_ids",
            ty(DType::I32, &[Dim::Sym(Sym::B), Dim::Sym(Sym::T)]),
        )
        .unwrap();
    let e = g.param("embed", ty(dtype, &[c(v), c(k)]), "embed").unwrap();
    let x = g.add(Op::Gather, &[e, ids], "embed").unwrap();
    let w = if tied {
        g.add(Op::Permute(vec![1, 0]), &[e], "head").unwrap()
    } else {
        g.param("head", ty(dtype, &[c(k), c(v)]), "head").unwrap()
    };
    let logits = g.add(Op::MatMul, &[x, w], "head").unwrap();
    g.set_output("logits", logits);
    caramba_ir::autodiff::add_next_token_loss(&mut g, "logits").unwrap();
    g.remove_output("logits");
    (g, v)
}

/// `fuse-linear-cross-entropy` keeps the loss, and autodiff of the fused
/// op (`linear_cross_entropy_grad` for x and for w) keeps the gradients:
/// exact for the loss (the op's decomposition, the widening cast dropped
/// as `cross_entropy` widens exactly), the gradients to the format's
/// rounding (the unfused `dw` rounds each batch's product before the
/// sum; the fused op rounds the sum over every row once).
#[test]
fn fuse_linear_cross_entropy_is_sound() {
    assert_eq!(linear_ce::NAME, "fuse-linear-cross-entropy");
    let mut rng = Rng::new(25);
    for dtype in [DType::F64, DType::F32, DType::F16, DType::BF16] {
        for case in 0..8 {
            let (g, v) = head_loss_graph(&mut rng, dtype, case % 2 == 0);
            let (h, n) = linear_ce::fuse(&g).unwrap();
            caramba_ir::verify(&h).unwrap();
            assert_eq!(n, 1, "{dtype} case {case}:\n{}", caramba_ir::to_text(&g));
            assert_eq!(count(&h, |o| *o == Op::LinearCrossEntropy), 1);
            assert_eq!(
                count(&h, |o| matches!(
                    o,
                    Op::CrossEntropy | Op::MatMul | Op::Cast(_)
                )),
                0,
                "{}",
                caramba_ir::to_text(&h)
            );
            let t = rng.range(1, 5);
            let err = compare(&g, &h, &mut rng, (t, t), v);
            assert!(err < 1e-12, "{dtype} case {case}: the loss moved by {err}");
            let names: Vec<String> = g.params().map(|(n, _)| n.to_string()).collect();
            let dg = caramba_ir::autodiff::differentiate(&g, "loss", &names).unwrap();
            let dh = caramba_ir::autodiff::differentiate(&h, "loss", &names).unwrap();
            assert_eq!(
                count(&dh, |o| matches!(o, Op::LinearCrossEntropyGrad { .. })),
                2
            );
            let err = compare(&dg, &dh, &mut rng, (t, t), v);
            let tol = match dtype {
                DType::F64 => 1e-12,
                DType::F32 => 1e-5,
                _ => 2e-2,
            };
            assert!(err < tol, "{dtype} case {case}: a gradient moved by {err}");
        }
    }
}

/// Logits that are stored anyway are not fused: kept as an output, or
/// read by another op too.
#[test]
fn fuse_linear_cross_entropy_leaves_stored_logits_alone() {
    let mut rng = Rng::new(3);
    let (g, _) = head_loss_graph(&mut rng, DType::F32, false);
    let logits = g.node_ids().find(|&n| g.node(n).op == Op::MatMul).unwrap();
    let mut kept = g.clone();
    kept.set_output("logits", logits);
    assert_eq!(linear_ce::fuse(&kept).unwrap().1, 0);
    let mut read = g.clone();
    let y = read.add(Op::Unary(UnaryOp::Exp), &[logits], "").unwrap();
    read.set_output("probs", y);
    assert_eq!(linear_ce::fuse(&read).unwrap().1, 0);
    // The same graph without the second reader fuses.
    assert_eq!(linear_ce::fuse(&g).unwrap().1, 1);
}

/// The optimized bf16 training graphs of SmolLM2 and the 1B shape: the
/// head and loss are one op with both gradients, and the executor's order
/// (`schedule::memory_order`) keeps less alive than id order, where every
/// weight gradient ran after the whole backward and each layer's
/// activations and output gradients waited for it (the peak was the end
/// of the backward; now it is its start).
#[test]
fn training_graphs_fuse_their_loss_and_run_in_a_frugal_order() {
    use caramba_ir::schedule::{memory_order, modelled_peak};
    for (file, least) in [("smollm2_135m_dba.yml", 0.08), ("llama32_1b_dba.yml", 0.06)] {
        let (h, _) = preset_training_graph(file, DType::BF16);
        assert_eq!(count(&h, |o| *o == Op::LinearCrossEntropy), 1, "{file}");
        assert_eq!(
            count(&h, |o| matches!(o, Op::LinearCrossEntropyGrad { .. })),
            2,
            "{file}"
        );
        assert_eq!(count(&h, |o| *o == Op::CrossEntropyGrad), 0, "{file}");
        let by_id = caramba_ir::reference::live_order(&h).unwrap();
        let order = memory_order(&h);
        let (before, after) = (modelled_peak(&h, &by_id), modelled_peak(&h, &order));
        assert_peak_falls(file, before, after, least);
    }
}

/// Asserts that the modelled peak `after` is at least the fraction `least`
/// below `before` (bytes), printing both in GiB.
fn assert_peak_falls(what: &str, before: f64, after: f64, least: f64) {
    let gib = |b: f64| b / (1u64 << 30) as f64;
    eprintln!(
        "{what}: modelled peak {:.2} → {:.2} GiB",
        gib(before),
        gib(after)
    );
    assert!(
        after < (1.0 - least) * before,
        "{what}: {:.2} → {:.2} GiB",
        gib(before),
        gib(after)
    );
}

/// A preset's optimized training graph at reduced dimensions (the CPU
/// reference runs it in moments).
fn reduced_training_graph(file: &str, dtype: DType, student: bool) -> Graph {
    let path = format!("{}/../presets/{file}", env!("CARGO_MANIFEST_DIR"));
    let c = crate::compile(&std::fs::read_to_string(path).unwrap()).unwrap();
    let model = if student {
        c.manifest.model.clone()
    } else {
        crate::teacher_of(&c.manifest.model)
    };
    let model = crate::reduced(&model);
    let mut forward = crate::lower_model(&model, "m", dtype).unwrap().graph;
    caramba_ir::autodiff::add_next_token_loss(&mut forward, "logits").unwrap();
    forward.remove_output("logits");
    let names: Vec<String> = forward.params().map(|(n, _)| n.to_string()).collect();
    let g = differentiate_for_training(&forward, "loss", &names).unwrap();
    optimize(&g).unwrap().0
}

/// `recompute-layers` on the presets' training graphs (reduced, f32 and
/// bf16; Llama and DBA students, a tied and an untied head): every layer recomputed,
/// the loss and every gradient bit for bit the same (copies of the same
/// ops over the same values), and in the memory order no copy runs before
/// the loss, that is in the forward, where it would save nothing. A model
/// of one block and no nested topology (`dba.yml`) has no layers to
/// recompute and is left as it is.
#[test]
fn recompute_layers_is_sound() {
    use caramba_ir::schedule::memory_order;
    let mut rng = Rng::new(91);
    for (file, student, layers) in [
        ("tiny.yml", false, 2),
        ("dba.yml", true, 0),
        ("smollm2_135m_dba.yml", false, 30),
        ("smollm2_135m_dba.yml", true, 30),
        ("llama32_1b_dba.yml", false, 16),
    ] {
        for dtype in [DType::F32, DType::BF16] {
            let g = reduced_training_graph(file, dtype, student);
            let (h, n) = recompute::recompute_layers(&g, "loss").unwrap();
            assert_eq!(recompute::NAME, "recompute-layers");
            assert_eq!(n, layers, "{file} {dtype}: layers recomputed");
            if layers == 0 {
                assert_eq!(caramba_ir::to_text(&h), caramba_ir::to_text(&g));
                continue;
            }
            assert!(count(&h, |o| *o == Op::After) >= layers, "{file}");
            assert_eq!(compare(&g, &h, &mut rng, (5, 5), 64), 0.0, "{file} {dtype}");
            let order = memory_order(&h);
            let loss = h.output("loss").unwrap();
            let at = order.iter().position(|&n| n == loss).unwrap();
            let copies: Vec<usize> = order
                .iter()
                .enumerate()
                .filter(|(_, &n)| h.node(n).scope.ends_with("/recompute"))
                .map(|(i, _)| i)
                .collect();
            assert!(!copies.is_empty(), "{file} {dtype}");
            assert!(
                copies.iter().all(|&i| i > at),
                "{file} {dtype}: a copy runs in the forward"
            );
        }
    }
}

/// Recomputing the layers of the presets' full-size training graphs (bf16)
/// lowers the step's modelled peak in the memory order (the run order of
/// GPUs): the saved activations of every layer are no longer alive at the
/// start of the backward, only each layer's input and one layer's copies.
#[test]
fn recomputed_layers_lower_the_modelled_peak() {
    use caramba_ir::schedule::{memory_order, modelled_peak};
    for (file, least) in [("smollm2_135m_dba.yml", 0.6), ("llama32_1b_dba.yml", 0.6)] {
        let (g, _) = preset_training_graph(file, DType::BF16);
        let start = std::time::Instant::now();
        let (h, n) = recompute::recompute_layers(&g, "loss").unwrap();
        let took = start.elapsed();
        let (before, after) = (
            modelled_peak(&g, &memory_order(&g)),
            modelled_peak(&h, &memory_order(&h)),
        );
        let what = format!(
            "{file}: {n} layers in {took:?}, {} → {} nodes",
            g.node_count(),
            h.node_count()
        );
        assert_peak_falls(&what, before, after, least);
    }
}
