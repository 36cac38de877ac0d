//! caramba's runtime: the only crate that owns devices, buffers and loops.

pub mod backend;
pub mod checkpoint;
pub mod data;
pub mod gpu;
pub mod rng;
pub mod tokenizer;
pub mod train;
#[doc(hidden)]
pub use checkpoint::testing;
