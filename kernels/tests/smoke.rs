//! A launch-level check that the elementwise interpreter runs on the wgpu
//! device (lavapipe in CI); the op-by-op conformance suite is in
//! `runtime/tests/gpu_suite.rs`.

#[cfg(feature = "wgpu")]
#[test]
fn elementwise_program_broadcasts() {
    use caramba_kernels::cubecl::prelude::*;
    use caramba_kernels::cubecl::wgpu::{WgpuDevice, WgpuRuntime};
    use caramba_kernels::elementwise::{launch_elementwise, Binary, Instr, Unary};
    use caramba_kernels::View;
    if !caramba_kernels::wgpu_available() {
        assert!(
            std::env::var_os("CARAMBA_REQUIRE_GPU").is_none(),
            "CARAMBA_REQUIRE_GPU is set but no wgpu adapter exists"
        );
        eprintln!("SKIPPED: no wgpu adapter");
        return;
    }
    let client = WgpuRuntime::client(&WgpuDevice::DefaultDevice);
    let a: Vec<f32> = (0..6).map(|i| i as f32).collect(); // (2, 3)
    let b: Vec<f32> = vec![10.0, 20.0, 30.0]; // (3)
    let ha = client.create_from_slice(f32::as_bytes(&a));
    let hb = client.create_from_slice(f32::as_bytes(&b));
    let ho = client.empty(6 * 4);
    let out = View::contiguous(ho.clone(), &[2, 3]);
    let prog = [
        Instr::Input(0),
        Instr::Input(1),
        Instr::Binary(Binary::Add, 0, 1),
        Instr::Const(2.0f32.to_bits()),
        Instr::Binary(Binary::Mul, 2, 3),
        Instr::Unary(Unary::Neg, 4),
    ];
    let va = View::contiguous(ha, &[2, 3]).broadcast_to(&[2, 3]);
    let vb = View::contiguous(hb, &[3]).broadcast_to(&[2, 3]);
    launch_elementwise(
        &client,
        caramba_kernels::FloatElem::F32,
        &prog,
        &[va, vb],
        &out,
    )
    .unwrap();
    let got = f32::from_bytes(&client.read_one(ho).unwrap()).to_vec();
    let want: Vec<f32> = (0..6).map(|i| -2.0 * (i as f32 + b[i % 3])).collect();
    assert_eq!(got, want);
}
