//! The interpreter's value type: a dense, row-major tensor with a concrete
//! shape, and the element traits the ops are generic over.
//!
//! Storage is `f32`, `f64` or `i32`. A tensor whose logical dtype is `f16` or
//! `bf16` is stored as `f32`: values are widened on the way in and rounded to
//! the narrow format only where a `cast` asks for it.

use crate::types::DType;
use std::fmt;

/// The elements of a tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Storage {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I32(Vec<i32>),
}

impl Storage {
    pub fn len(&self) -> usize {
        match self {
            Storage::F32(v) => v.len(),
            Storage::F64(v) => v.len(),
            Storage::I32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A dense row-major tensor: logical dtype, concrete shape and elements.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    dtype: DType,
    shape: Vec<usize>,
    data: Storage,
}

/// The storage dtype a logical dtype computes in, or `None` when the
/// interpreter has no storage for it (`u32`, `bool`).
pub fn storage_dtype(dtype: DType) -> Option<DType> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => Some(DType::F32),
        DType::F64 => Some(DType::F64),
        DType::I32 => Some(DType::I32),
        DType::U32 | DType::Bool => None,
    }
}

impl Tensor {
    /// A tensor from its parts.
    ///
    /// # Panics
    ///
    /// Panics if the element count does not match the shape or the storage
    /// does not fit the dtype (see [`storage_dtype`]); both are caller bugs.
    pub fn new(dtype: DType, shape: Vec<usize>, data: Storage) -> Tensor {
        let numel: usize = shape.iter().product();
        assert_eq!(
            numel,
            data.len(),
            "shape {shape:?} holds {numel} elements but {} were given",
            data.len()
        );
        let fits = matches!(
            (storage_dtype(dtype), &data),
            (Some(DType::F32), Storage::F32(_))
                | (Some(DType::F64), Storage::F64(_))
                | (Some(DType::I32), Storage::I32(_))
        );
        assert!(fits, "{dtype} cannot be stored as {}", data_name(&data));
        Tensor { dtype, shape, data }
    }

    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        Tensor::new(DType::F32, shape, Storage::F32(data))
    }

    pub fn f64(shape: Vec<usize>, data: Vec<f64>) -> Tensor {
        Tensor::new(DType::F64, shape, Storage::F64(data))
    }

    pub fn i32(shape: Vec<usize>, data: Vec<i32>) -> Tensor {
        Tensor::new(DType::I32, shape, Storage::I32(data))
    }

    /// A tensor of logical dtype `dtype` (`f32`, `f16` or `bf16`) whose values
    /// were already widened to `f32`, e.g. `bf16` weights from a checkpoint.
    pub fn from_f32_as(dtype: DType, shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        Tensor::new(dtype, shape, Storage::F32(data))
    }

    /// A tensor of `value` everywhere, stored in `dtype`'s storage type.
    ///
    /// # Panics
    ///
    /// Panics for dtypes without storage (`u32`, `bool`).
    pub fn full(dtype: DType, shape: Vec<usize>, value: f64) -> Tensor {
        let n = shape.iter().product();
        let data = match storage_dtype(dtype) {
            Some(DType::F32) => Storage::F32(vec![value as f32; n]),
            Some(DType::F64) => Storage::F64(vec![value; n]),
            Some(DType::I32) => Storage::I32(vec![value as i32; n]),
            _ => panic!("no storage for {dtype}"),
        };
        Tensor::new(dtype, shape, data)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    pub fn storage(&self) -> &Storage {
        &self.data
    }

    pub fn into_storage(self) -> Storage {
        self.data
    }

    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            Storage::F32(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<&[f64]> {
        match &self.data {
            Storage::F64(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_i32(&self) -> Option<&[i32]> {
        match &self.data {
            Storage::I32(v) => Some(v),
            _ => None,
        }
    }

    /// The elements converted to `f32`.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.data {
            Storage::F32(v) => v.clone(),
            Storage::F64(v) => v.iter().map(|&x| x as f32).collect(),
            Storage::I32(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    /// The elements converted to `f64`.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match &self.data {
            Storage::F32(v) => v.iter().map(|&x| x as f64).collect(),
            Storage::F64(v) => v.clone(),
            Storage::I32(v) => v.iter().map(|&x| x as f64).collect(),
        }
    }

    /// The same elements under a new shape (and the same dtype).
    ///
    /// # Panics
    ///
    /// Panics if the element counts differ.
    pub fn reshaped(self, shape: Vec<usize>) -> Tensor {
        Tensor::new(self.dtype, shape, self.data)
    }

    /// The same storage relabelled with another logical dtype of that storage
    /// (e.g. `f32` data as `bf16`).
    ///
    /// # Panics
    ///
    /// Panics if `dtype` is stored differently.
    pub fn relabelled(self, dtype: DType) -> Tensor {
        Tensor::new(dtype, self.shape, self.data)
    }

    /// The largest absolute elementwise difference, compared in `f64`.
    /// Equal values count as 0 even when infinite (masked scores are -inf),
    /// two NaNs count as equal, and a NaN against a number counts as infinity.
    ///
    /// # Panics
    ///
    /// Panics if the shapes differ: comparing mis-shaped tensors is a bug in
    /// the comparison, not a large difference.
    pub fn max_abs_diff(&self, other: &Tensor) -> f64 {
        assert_eq!(
            self.shape, other.shape,
            "max_abs_diff of tensors of different shapes"
        );
        let (a, b) = (self.to_f64_vec(), other.to_f64_vec());
        a.iter()
            .zip(&b)
            .map(|(&x, &y)| {
                if x == y || (x.is_nan() && y.is_nan()) {
                    0.0
                } else if x.is_nan() || y.is_nan() {
                    f64::INFINITY
                } else {
                    (x - y).abs()
                }
            })
            .fold(0.0, f64::max)
    }
}

fn data_name(data: &Storage) -> &'static str {
    match data {
        Storage::F32(_) => "f32",
        Storage::F64(_) => "f64",
        Storage::I32(_) => "i32",
    }
}

impl fmt::Display for Tensor {
    /// `f32[2, 3]`: the type, not the elements.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype, ShapeFmt(&self.shape))
    }
}

/// Formats a concrete shape like the IR prints shapes: `[2, 3]`.
pub(crate) struct ShapeFmt<'a>(pub &'a [usize]);

impl fmt::Display for ShapeFmt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        crate::types::write_dims(f, self.0)
    }
}

/// An element type with storage: `f32`, `f64` or `i32`.
pub trait Elem: Copy + Send + Sync + 'static {
    /// Wraps a vector of this type as storage.
    fn wrap(v: Vec<Self>) -> Storage;
    /// The elements, if the storage holds this type.
    fn slice(s: &Storage) -> Option<&[Self]>;
}

impl Elem for i32 {
    fn wrap(v: Vec<Self>) -> Storage {
        Storage::I32(v)
    }
    fn slice(s: &Storage) -> Option<&[Self]> {
        match s {
            Storage::I32(v) => Some(v),
            _ => None,
        }
    }
}

/// A float element type the interpreter computes in: `f32` or `f64`.
pub trait Float:
    Elem
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn abs(self) -> Self;
    fn tanh(self) -> Self;
    fn sin(self) -> Self;
    fn cos(self) -> Self;
    /// The larger of two values; NaN wins, so it propagates like `torch.maximum`.
    fn max_nan(self, other: Self) -> Self;
}

macro_rules! impl_float {
    ($t:ty, $variant:ident) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            fn sin(self) -> Self {
                <$t>::sin(self)
            }
            fn cos(self) -> Self {
                <$t>::cos(self)
            }
            fn max_nan(self, other: Self) -> Self {
                if self.is_nan() || other.is_nan() {
                    <$t>::NAN
                } else if other > self {
                    other
                } else {
                    self
                }
            }
        }

        impl Elem for $t {
            fn wrap(v: Vec<Self>) -> Storage {
                Storage::$variant(v)
            }
            fn slice(s: &Storage) -> Option<&[Self]> {
                match s {
                    Storage::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}

impl_float!(f32, F32);
impl_float!(f64, F64);

/// Rounds an `f32` to the nearest `bf16` (ties to even), kept as `f32`.
pub fn round_bf16(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let bits = x.to_bits();
    let lsb = (bits >> 16) & 1;
    let rounded = bits.wrapping_add(0x7fff + lsb) & 0xffff_0000;
    f32::from_bits(rounded)
}

/// Rounds an `f32` to the nearest `f16` (ties to even, overflow to
/// infinity, subnormals kept), kept as `f32`.
pub fn round_f16(x: f32) -> f32 {
    const MAX: f32 = 65504.0;
    // Half-way between MAX and the next step (2^16) rounds to infinity.
    const OVERFLOW: f32 = 65520.0;
    if !x.is_finite() {
        return x;
    }
    let a = x.abs();
    if a >= OVERFLOW {
        return f32::INFINITY.copysign(x);
    }
    if a < 6.103_515_6e-5 {
        // Subnormal range: a fixed step of 2^-24.
        let scale = 16_777_216.0f32;
        return ((x * scale).round_ties_even() / scale).copysign(x);
    }
    // Normal range: keep 10 of f32's 23 mantissa bits.
    let bits = x.to_bits();
    let lsb = (bits >> 13) & 1;
    let r = f32::from_bits(bits.wrapping_add(0x0fff + lsb) & !0x1fff);
    if r.abs() > MAX {
        f32::INFINITY.copysign(x)
    } else {
        r
    }
}
