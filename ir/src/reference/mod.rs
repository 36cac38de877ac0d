//! The reference interpreter: executes any graph on the CPU with the plain
//! semantics of each op. It is the oracle every kernel and rewrite is tested
//! against.
