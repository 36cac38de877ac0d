//! Element types, dimensions and shapes.
//!
//! Model dimensions are concrete; the batch, sequence and context (cached keys)
//! dimensions stay symbolic until a plan is bound to real inputs.

use std::fmt;

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    F16,
    BF16,
    F64,
    I32,
    U32,
    Bool,
}

impl DType {
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16 | DType::F64)
    }

    pub fn is_int(self) -> bool {
        matches!(self, DType::I32 | DType::U32)
    }

    /// The dtype row statistics over values of this dtype are kept in:
    /// `f32` for the half-precision types, the dtype itself otherwise.
    /// Attention's log-sum-exp and its backward's `delta` are such
    /// statistics (`Op::AttentionLse`): the backward subtracts `delta` from
    /// values close to it, which would amplify a half-precision rounding
    /// (FlashAttention keeps both in f32 too).
    pub fn stats(self) -> DType {
        match self {
            DType::F16 | DType::BF16 => DType::F32,
            dtype => dtype,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 => 8,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Bool => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F64 => "f64",
            DType::I32 => "i32",
            DType::U32 => "u32",
            DType::Bool => "bool",
        }
    }

    /// Parses the names used in manifests and the text form
    /// (`f32`, `float32`, `fp16`, `bfloat16`, ...).
    pub fn parse(s: &str) -> Option<DType> {
        Some(match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" | "float" => DType::F32,
            "f16" | "float16" | "fp16" | "half" => DType::F16,
            "bf16" | "bfloat16" => DType::BF16,
            "f64" | "float64" | "fp64" | "double" => DType::F64,
            "i32" | "int32" => DType::I32,
            "u32" | "uint32" => DType::U32,
            "bool" => DType::Bool,
            _ => return None,
        })
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A symbolic dimension, bound when a plan runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Sym {
    /// Batch size.
    B,
    /// Number of new positions in this call (the prompt, or 1 when decoding).
    T,
    /// Number of key positions attended to: cached positions plus `T`.
    S,
    /// Number of cached positions before this call (`S = P + T`).
    P,
}

impl fmt::Display for Sym {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Sym::B => "B",
            Sym::T => "T",
            Sym::S => "S",
            Sym::P => "P",
        })
    }
}

/// One dimension of a shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dim {
    Const(usize),
    Sym(Sym),
}

impl Dim {
    pub fn as_const(self) -> Option<usize> {
        match self {
            Dim::Const(n) => Some(n),
            Dim::Sym(_) => None,
        }
    }
}

impl From<usize> for Dim {
    fn from(n: usize) -> Dim {
        Dim::Const(n)
    }
}

impl From<Sym> for Dim {
    fn from(s: Sym) -> Dim {
        Dim::Sym(s)
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Const(n) => write!(f, "{n}"),
            Dim::Sym(s) => write!(f, "{s}"),
        }
    }
}

/// A shape: one [`Dim`] per axis, outermost first.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Shape(pub Vec<Dim>);

impl Shape {
    pub fn new(dims: impl IntoIterator<Item = Dim>) -> Shape {
        Shape(dims.into_iter().collect())
    }

    pub fn scalar() -> Shape {
        Shape(Vec::new())
    }

    pub fn rank(&self) -> usize {
        self.0.len()
    }

    pub fn dims(&self) -> &[Dim] {
        &self.0
    }

    /// The axis counted from the end when `axis` is given as `rank - k`.
    pub fn last(&self) -> Option<Dim> {
        self.0.last().copied()
    }

    /// Number of elements when every dimension is concrete.
    pub fn numel(&self) -> Option<usize> {
        self.0.iter().map(|d| d.as_const()).product()
    }

    /// Product of the concrete dimensions and the multiset of symbolic ones,
    /// used to compare reshapes: `(B, T, 8, 64)` and `(B, T, 512)` agree.
    pub fn factored(&self) -> (usize, Vec<Sym>) {
        let mut n = 1usize;
        let mut syms = Vec::new();
        for d in &self.0 {
            match d {
                Dim::Const(c) => n *= c,
                Dim::Sym(s) => syms.push(*s),
            }
        }
        syms.sort();
        (n, syms)
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_dims(f, &self.0)
    }
}

/// Writes dimensions the way the text form prints shapes: `[B, T, 512]`.
pub(crate) fn write_dims<D: fmt::Display>(f: &mut fmt::Formatter<'_>, dims: &[D]) -> fmt::Result {
    f.write_str("[")?;
    for (i, d) in dims.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{d}")?;
    }
    f.write_str("]")
}

/// Builds a [`Shape`] from dims: `shape![Sym::B, Sym::T, 512]`.
#[macro_export]
macro_rules! shape {
    ($($d:expr),* $(,)?) => {
        $crate::Shape(vec![$($crate::Dim::from($d)),*])
    };
}

/// The type of a node's value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Shape,
}

impl TensorType {
    pub fn new(dtype: DType, shape: Shape) -> TensorType {
        TensorType { dtype, shape }
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype, self.shape)
    }
}
