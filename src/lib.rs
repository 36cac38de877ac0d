//! The `caramba` command line as a library, so integration tests drive the
//! same code the binary runs.

pub mod cli;
pub mod commands;
pub mod device_memory;
pub mod model;
pub mod progress;
pub mod train;
