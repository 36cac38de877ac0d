//! The tensor-core attention kernels (`caramba_kernels::attention_tc`)
//! compile to CUDA C++ offline (no GPU needed: the compile-only runtime
//! describes an H100): a bf16 graph's attention forward, its
//! log-sum-exp variant and both backward kernels use `mma.sync`
//! products on registers loaded with `ldmatrix`,
//! while the same graph in f32 keeps the scalar kernels. What the kernels
//! compute is checked against the CPU reference on a CUDA device by
//! `gpu_suite`'s `narrow_attention*` tests.
#![cfg(feature = "cuda")]

use caramba_ir::{AttnArg, DType, Dim, Graph, NodeId, Op, Scalar, Shape, TensorType};
use caramba_runtime::gpu::{kernel_sources, Target};

/// One graph with every attention kernel: `attention`,
/// `attention_with_lse` and the `q` and `kv` gradients, heads of `d` dims.
fn attention_graph(dtype: DType, d: usize) -> Graph {
    let mut g = Graph::new("attention_tc");
    let t = |last: usize| TensorType::new(dtype, Shape::new([2, 3, 80, last].map(Dim::Const)));
    let mut input = |name: &str, ty: TensorType| -> NodeId { g.input(name, ty).unwrap() };
    let (q, k, v, dout) = (
        input("q", t(d)),
        input("k", t(d)),
        input("v", t(d)),
        input("dout", t(d)),
    );
    let stats = TensorType::new(dtype.stats(), Shape::new([2, 3, 80, 1].map(Dim::Const)));
    let (lse, delta) = (input("lse", stats.clone()), input("delta", stats));
    let (causal, scale) = (true, Scalar(0.125));
    let a = g
        .add(Op::Attention { causal, scale }, &[q, k, v], "")
        .unwrap();
    let awl = g
        .add(Op::AttentionWithLse { causal, scale }, &[q, k, v], "")
        .unwrap();
    let grad = |wrt| Op::AttentionGrad { causal, scale, wrt };
    let dq = g
        .add(grad(AttnArg::Q), &[q, k, v, dout, lse, delta], "")
        .unwrap();
    let dkv = g
        .add(grad(AttnArg::KV), &[q, k, v, dout, lse, delta], "")
        .unwrap();
    for (name, n) in [("a", a), ("awl", awl), ("dq", dq), ("dkv", dkv)] {
        g.set_output(name, n);
    }
    g
}

fn titles_and_sources(g: &Graph) -> Vec<(String, String)> {
    kernel_sources(g, Target::Cuda)
        .expect("offline CUDA compilation")
        .into_iter()
        .map(|k| (k.title, k.source))
        .collect()
}

/// One test: the sources come from one process-wide compilation log.
#[test]
fn half_precision_attention_runs_on_tensor_cores_and_f32_does_not() {
    let kernels = titles_and_sources(&attention_graph(DType::F32, 64));
    assert!(kernels.iter().all(|(t, _)| !t.contains("_tc_kernel")));
    assert!(kernels.iter().any(|(t, _)| t.contains("attention_kernel")));

    // 64-dim heads, and 12-dim ones (DBA's), padded to 16 in shared memory.
    for d in [64, 12] {
        let kernels = titles_and_sources(&attention_graph(DType::BF16, d));
        for name in [
            "attention_tc_kernel",
            "attention_dq_tc_kernel",
            "attention_dkv_tc_kernel",
        ] {
            let (title, source) = kernels
                .iter()
                .find(|(title, _)| title.contains(name))
                .unwrap_or_else(|| {
                    let titles: Vec<&String> = kernels.iter().map(|(t, _)| t).collect();
                    panic!("d = {d}: no {name} among {titles:#?}")
                });
            // CARAMBA_DUMP_CU=<dir>: the sources, for `nvcc --resource-usage`
            // on a machine with the toolkit.
            if let Some(dir) = std::env::var_os("CARAMBA_DUMP_CU") {
                let path = std::path::Path::new(&dir).join(format!("{name}_{d}.cu"));
                std::fs::write(path, source).expect("write the kernel source");
            }
            for needle in ["mma.sync.aligned.m16n8k16", "ldmatrix.sync.aligned"] {
                assert!(
                    source.contains(needle),
                    "{title} has no {needle}:\n{source}"
                );
            }
        }
        let scalar = kernels
            .iter()
            .filter(|(t, _)| t.contains("attention_kernel"))
            .count();
        assert_eq!(
            scalar, 0,
            "d = {d}: bf16 attention fell back to the scalar kernel"
        );
    }
}
