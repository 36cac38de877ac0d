//! caramba's typed dataflow IR.
//!
//! A model is a [`Graph`] of primitive [`Op`]s over typed tensors: concrete
//! model dimensions, symbolic batch (`B`), sequence (`T`) and context (`S`)
//! dimensions. Parameters are named inputs using Hugging Face Llama names.
//! This crate knows nothing of YAML, e-graphs or devices.

pub mod autodiff;
pub mod graph;
pub mod op;
pub mod quant;
pub mod schedule;
pub mod text;
pub mod types;
pub mod verify;

pub use graph::{Graph, IrError, Node, NodeId};
pub use op::{
    broadcast, Arity, AttnArg, BinaryOp, ElemInstr, ElemProgram, KvPart, NormArg, Op, ReduceOp,
    RopeScaling, RopeSpec, Scalar, UnaryOp,
};
pub use quant::QuantFormat;
pub use text::to_text;
pub use types::{DType, Dim, Shape, Sym, TensorType};
pub use verify::verify;
pub mod reference;
