//! The CUDA source of the tensor-core attention kernels (forward, `dq`,
//! `dk‖dv`) for bf16 heads of a given width, generated offline (no GPU):
//!
//! ```text
//! cargo build --release --features cuda --example attention_source
//! target/release/examples/attention_source 64 > attention64.cu.txt
//! ```
//!
//! `caramba compile --emit kernels` shows a manifest's forward kernels; the
//! backward's appear only in training graphs. Comparing this output before
//! and after a change to `kernels/src/attention_tc.rs` (with the generated
//! variable numbers masked, `sed -E 's/l_(mut_)?[0-9]+/l_N/g'`) shows
//! whether a refactor changed the kernels at all, where no GPU is at hand.

use caramba_ir::*;

fn main() {
    let hd: usize = std::env::args()
        .nth(1)
        .map_or(64, |s| s.parse().unwrap_or(64));
    let ty =
        |d: DType, s: &[usize]| TensorType::new(d, Shape::new(s.iter().map(|&d| Dim::Const(d))));
    let x = [1usize, 2, 256, hd];
    let stat = [1usize, 2, 256, 1];
    let mut g = Graph::new("attention");
    let mut param = |name: &str, t: TensorType| g.param(name, t, name).expect("a fresh name");
    let q = param("q", ty(DType::BF16, &x));
    let k = param("k", ty(DType::BF16, &x));
    let v = param("v", ty(DType::BF16, &x));
    let dout = param("dout", ty(DType::BF16, &x));
    let lse = param("lse", ty(DType::F32, &stat));
    let delta = param("delta", ty(DType::F32, &stat));
    let scale = Scalar(1.0 / (hd as f64).sqrt());
    let a = g
        .add(
            Op::Attention {
                causal: true,
                scale,
            },
            &[q, k, v],
            "attn",
        )
        .expect("attention types");
    g.set_output("out", a);
    for (name, wrt) in [("dq", AttnArg::Q), ("dkv", AttnArg::KV)] {
        let grad = Op::AttentionGrad {
            causal: true,
            scale,
            wrt,
        };
        let x = g
            .add(grad, &[q, k, v, dout, lse, delta], name)
            .expect("attention_grad types");
        g.set_output(name, x);
    }
    match caramba_runtime::gpu::kernel_sources(&g, caramba_runtime::gpu::Target::Cuda) {
        Ok(kernels) => {
            for k in kernels {
                println!("// === {}\n{}", k.title, k.source);
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
