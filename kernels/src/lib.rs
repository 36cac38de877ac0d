//! caramba's GPU kernels, written in CubeCL (`#[cube]`), one file per kernel
//! with its CPU reference and its test. Only `kernels` and `runtime` depend
//! on CubeCL.
