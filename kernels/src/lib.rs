//! caramba's GPU kernels, written in CubeCL (`#[cube]`), one file per kernel
//! with its CPU reference and its test.
//!
//! This crate is empty on purpose until the fusion compiler lands (issue 4):
//! the workspace fixes its place now so that `compiler` and `runtime` are laid
//! out around it. Only `kernels` and `runtime` will depend on CubeCL.
