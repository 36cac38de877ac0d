//! The reference interpreter: executes any graph on the CPU with the plain
//! semantics of each op. It is the oracle every kernel and rewrite is tested
//! against, and the `--device cpu` backend.
//!
//! ```
//! use caramba_ir::reference::{eval, Bindings, Tensor};
//! use caramba_ir::{shape, BinaryOp, DType, Graph, Op, TensorType};
//!
//! let mut g = Graph::new("double");
//! let x = g.input("x", TensorType::new(DType::F32, shape![3])).unwrap();
//! let two = g.constant(2.0, DType::F32, "");
//! let y = g.add(Op::Binary(BinaryOp::Mul), &[x, two], "").unwrap();
//! g.set_output("y", y);
//! let b = Bindings::default().input("x", Tensor::f32(vec![3], vec![1.0, 2.0, 3.0]));
//! let out = eval(&g, &b).unwrap();
//! assert_eq!(out["y"].as_f32().unwrap(), &[2.0, 4.0, 6.0]);
//! ```

mod bindings;
mod eval;
pub mod ops;
mod tensor;
#[cfg(test)]
mod tests;

pub use bindings::{Bindings, NoParams, ParamSource, SymValues};
pub use eval::{
    check_binding, check_value, concrete, eval, eval_observed, eval_op, live_order, EvalError,
};
pub use tensor::{round_bf16, round_f16, storage_dtype, Elem, Float, Storage, Tensor};
