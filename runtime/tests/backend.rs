//! `Backend`: parsing `--device`, `auto`, and running one graph on each
//! backend compiled in.

use caramba_ir::reference::{eval, Bindings, Tensor};
use caramba_ir::{shape, DType, Graph, Op, TensorType, UnaryOp};
use caramba_runtime::backend::{Backend, BackendError};

fn graph() -> Graph {
    let mut g = Graph::new("tanh");
    let x = g
        .input("x", TensorType::new(DType::F32, shape![2, 3]))
        .unwrap();
    let y = g.add(Op::Unary(UnaryOp::Tanh), &[x], "").unwrap();
    g.set_output("y", y);
    g
}

#[test]
fn parse_names_and_rejects_others() {
    assert_eq!(Backend::parse("cpu").unwrap(), Backend::Cpu);
    assert_eq!(Backend::parse("wgpu").unwrap(), Backend::Wgpu);
    assert_eq!(Backend::parse("cuda").unwrap(), Backend::Cuda);
    assert!(Backend::parse("auto").is_ok());
    let err = Backend::parse("tpu").unwrap_err();
    assert!(matches!(err, BackendError::Unknown(_)), "{err}");
}

#[test]
fn every_available_backend_matches_the_reference() {
    let g = graph();
    let b = Bindings::default().input(
        "x",
        Tensor::f32(vec![2, 3], vec![-2.0, -0.5, 0.0, 0.3, 1.0, 4.0]),
    );
    let want = eval(&g, &b).unwrap()["y"].to_f64_vec();
    for backend in [Backend::Cpu, Backend::Wgpu, Backend::Cuda, Backend::auto()] {
        if !backend.available() {
            eprintln!("SKIPPED: backend {backend} has no device in this build/machine");
            assert!(
                backend != Backend::Wgpu || std::env::var_os("CARAMBA_REQUIRE_GPU").is_none(),
                "CARAMBA_REQUIRE_GPU is set but wgpu has no device"
            );
            continue;
        }
        let got = backend.run(&g, &b).unwrap()["y"].to_f64_vec();
        for (w, g) in want.iter().zip(&got) {
            assert!((w - g).abs() < 1e-5, "{backend}: {w} vs {g}");
        }
    }
}

#[test]
fn a_backend_without_a_device_is_an_error_not_a_panic() {
    if Backend::Cuda.available() {
        return;
    }
    let g = graph();
    let b = Bindings::default().input("x", Tensor::f32(vec![2, 3], vec![0.0; 6]));
    assert!(Backend::Cuda.run(&g, &b).is_err());
}
