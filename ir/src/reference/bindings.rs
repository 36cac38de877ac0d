//! What a graph is evaluated against: the values of the symbols `B`, `T` and
//! `S`, the per-call inputs by name, and the parameters, which are borrowed
//! so that one loaded model serves many calls without copies.

use super::tensor::Tensor;
use crate::types::Sym;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Named parameters the interpreter can borrow. `Sync`, so one loaded model
/// can serve evaluations on several threads.
pub trait ParamSource: Sync {
    fn get(&self, name: &str) -> Option<&Tensor>;
}

impl ParamSource for BTreeMap<String, Tensor> {
    fn get(&self, name: &str) -> Option<&Tensor> {
        BTreeMap::get(self, name)
    }
}

impl ParamSource for HashMap<String, Tensor> {
    fn get(&self, name: &str) -> Option<&Tensor> {
        HashMap::get(self, name)
    }
}

impl ParamSource for BTreeMap<String, Arc<Tensor>> {
    fn get(&self, name: &str) -> Option<&Tensor> {
        BTreeMap::get(self, name).map(|t| &**t)
    }
}

impl ParamSource for HashMap<String, Arc<Tensor>> {
    fn get(&self, name: &str) -> Option<&Tensor> {
        HashMap::get(self, name).map(|t| &**t)
    }
}

/// A source with no parameters, for graphs that take none.
pub struct NoParams;

impl ParamSource for NoParams {
    fn get(&self, _: &str) -> Option<&Tensor> {
        None
    }
}

/// Values of the symbolic dimensions. An unset symbol is inferred from the
/// first input or parameter whose declared shape uses it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SymValues {
    pub b: Option<usize>,
    pub t: Option<usize>,
    pub s: Option<usize>,
    pub p: Option<usize>,
}

impl SymValues {
    pub fn get(&self, sym: Sym) -> Option<usize> {
        match sym {
            Sym::B => self.b,
            Sym::T => self.t,
            // The attended positions are the cached ones plus the new ones.
            Sym::S => self.s.or(match (self.p, self.t) {
                (Some(p), Some(t)) => Some(p + t),
                _ => None,
            }),
            Sym::P => self.p,
        }
    }

    pub fn set(&mut self, sym: Sym, value: usize) {
        match sym {
            Sym::B => self.b = Some(value),
            Sym::T => self.t = Some(value),
            Sym::S => self.s = Some(value),
            Sym::P => self.p = Some(value),
        }
    }
}

/// Everything one evaluation reads.
pub struct Bindings<'p> {
    pub syms: SymValues,
    pub inputs: BTreeMap<String, Tensor>,
    pub params: &'p dyn ParamSource,
}

impl Default for Bindings<'_> {
    fn default() -> Self {
        Bindings::new(&NoParams)
    }
}

impl<'p> Bindings<'p> {
    /// Bindings that read parameters from `params`, with no inputs yet.
    pub fn new(params: &'p dyn ParamSource) -> Bindings<'p> {
        Bindings {
            syms: SymValues::default(),
            inputs: BTreeMap::new(),
            params,
        }
    }

    /// Sets a symbol's value.
    pub fn sym(mut self, sym: Sym, value: usize) -> Self {
        self.syms.set(sym, value);
        self
    }

    /// Binds a per-call input.
    pub fn input(mut self, name: &str, value: Tensor) -> Self {
        self.inputs.insert(name.to_string(), value);
        self
    }
}
