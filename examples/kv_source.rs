//! The CUDA source of the `kv_attention` kernels for one decode step over a
//! q8 (or float) KV cache, generated offline (no GPU): the decode kernel,
//! then the combine of its partials.
//!
//! ```text
//! cargo build --release --features cuda --example kv_source
//! target/release/examples/kv_source q8 128 > kv_decode.cu.txt
//! ```
//!
//! The first argument is the caches' format (`q8`, `q4`, `nf4` or `f32`),
//! the second the head dim. The shape is the benchmark's (`gpu_bench`
//! case `kvdecode`): 32 query heads over 8 kv heads, one new token.

use caramba_ir::*;

fn main() {
    let mut args = std::env::args().skip(1);
    let format = match args.next().as_deref() {
        None | Some("q8") => Some(QuantFormat::Q8),
        Some("q4") => Some(QuantFormat::Q4),
        Some("nf4") => Some(QuantFormat::Nf4),
        Some("f32") => None,
        Some(other) => {
            eprintln!("error: unknown cache format `{other}` (q8, q4, nf4 or f32)");
            std::process::exit(2);
        }
    };
    let hd: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(128);
    let (kv, groups, s) = (8usize, 4usize, 512usize);
    let ty =
        |s: &[usize]| TensorType::new(DType::F32, Shape::new(s.iter().map(|&d| Dim::Const(d))));
    let mut g = Graph::new("kv_decode");
    let q = g
        .param("q", ty(&[1, kv, groups, 1, hd]), "q")
        .expect("a fresh name");
    let mut xs = vec![q];
    for name in ["k", "v"] {
        let raw = g
            .param(name, ty(&[1, s, kv * hd]), name)
            .expect("a fresh name");
        xs.push(match format {
            Some(f) => g.add(Op::Quantize(f), &[raw], "").expect("quantize types"),
            None => raw,
        });
    }
    let part = KvPart { format, dim: hd };
    let op = Op::KvAttention {
        causal: true,
        scale: Scalar(1.0 / (hd as f64).sqrt()),
        heads: kv,
        parts: vec![part, part],
    };
    let y = g.add(op, &xs, "attn").expect("kv_attention types");
    g.set_output("out", y);
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
