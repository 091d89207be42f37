//! The compute element type: `f32` or `f64` accumulation, chosen by the user.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

/// The precision merges accumulate in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    /// Single precision.
    F32,
    /// Double precision.
    F64,
}

impl ComputeDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            ComputeDtype::F32 => 4,
            ComputeDtype::F64 => 8,
        }
    }
    /// The name users write (`f32`, `f64`).
    pub fn name(self) -> &'static str {
        match self {
            ComputeDtype::F32 => "f32",
            ComputeDtype::F64 => "f64",
        }
    }
}

impl std::str::FromStr for ComputeDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(ComputeDtype::F32),
            "f64" | "float64" => Ok(ComputeDtype::F64),
            _ => Err(format!("unknown compute dtype `{s}` (expected f32 or f64)")),
        }
    }
}

/// A real number type the engine computes in. Implemented for `f32` and `f64`.
///
/// Methods are written once, generically over `Real`, and never use fused multiply-add, so the
/// output bytes are the same on every CPU.
pub trait Real:
    Copy
    + Send
    + Sync
    + Debug
    + Default
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + 'static
{
    /// Zero.
    const ZERO: Self;
    /// One.
    const ONE: Self;
    /// Which compute dtype this is.
    const DTYPE: ComputeDtype;
    /// Bits of the key that orders non-negative values (32 for f32, 64 for f64).
    const KEY_BITS: u32;
    /// An unsigned key with the order of `|self|` (the bit pattern of the absolute value).
    fn abs_key(self) -> u64;
    /// From an f64 (rounded to nearest).
    fn from_f64(v: f64) -> Self;
    /// To an f64 (exact).
    fn to_f64(self) -> f64;
    /// The absolute value.
    fn abs(self) -> Self;
    /// The square root.
    fn sqrt(self) -> Self;

    /// Decodes f16 values.
    fn from_f16_slice(src: &[f16], dst: &mut [Self]);
    /// Decodes bf16 values.
    fn from_bf16_slice(src: &[bf16], dst: &mut [Self]);
    /// Decodes f32 values.
    fn from_f32_slice(src: &[f32], dst: &mut [Self]);
    /// Decodes f64 values (rounded to nearest).
    fn from_f64_slice(src: &[f64], dst: &mut [Self]);
    /// Encodes as f16 (round to nearest even).
    fn to_f16_slice(src: &[Self], dst: &mut [f16]);
    /// Encodes as bf16 (round to nearest even).
    fn to_bf16_slice(src: &[Self], dst: &mut [bf16]);
    /// Encodes as f32.
    fn to_f32_slice(src: &[Self], dst: &mut [f32]);
    /// Encodes as f64.
    fn to_f64_slice(src: &[Self], dst: &mut [f64]);
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const DTYPE: ComputeDtype = ComputeDtype::F32;
    const KEY_BITS: u32 = 32;
    #[inline(always)]
    fn abs_key(self) -> u64 {
        self.abs().to_bits() as u64
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn abs(self) -> Self {
        f32::abs(self)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn from_f16_slice(src: &[f16], dst: &mut [Self]) {
        crate::io::simd::f16_to_f32(src, dst)
    }
    fn from_bf16_slice(src: &[bf16], dst: &mut [Self]) {
        // bf16 is the top half of an f32: a shift is exact and vectorises.
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
    }
    fn from_f32_slice(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src)
    }
    fn from_f64_slice(src: &[f64], dst: &mut [Self]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = *s as f32;
        }
    }
    fn to_f16_slice(src: &[Self], dst: &mut [f16]) {
        crate::io::simd::f32_to_f16(src, dst)
    }
    fn to_bf16_slice(src: &[Self], dst: &mut [bf16]) {
        dst.convert_from_f32_slice(src)
    }
    fn to_f32_slice(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
    fn to_f64_slice(src: &[Self], dst: &mut [f64]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = *s as f64;
        }
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const DTYPE: ComputeDtype = ComputeDtype::F64;
    const KEY_BITS: u32 = 64;
    #[inline(always)]
    fn abs_key(self) -> u64 {
        self.abs().to_bits()
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn abs(self) -> Self {
        f64::abs(self)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn from_f16_slice(src: &[f16], dst: &mut [Self]) {
        // Through f32 (exact: every f16 is an f32), in blocks that stay in L1.
        let mut tmp = [0f32; 256];
        for (s, d) in src.chunks(256).zip(dst.chunks_mut(256)) {
            crate::io::simd::f16_to_f32(s, &mut tmp[..s.len()]);
            for (o, &x) in d.iter_mut().zip(&tmp[..s.len()]) {
                *o = x as f64;
            }
        }
    }
    fn from_bf16_slice(src: &[bf16], dst: &mut [Self]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16) as f64;
        }
    }
    fn from_f32_slice(src: &[f32], dst: &mut [Self]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = *s as f64;
        }
    }
    fn from_f64_slice(src: &[f64], dst: &mut [Self]) {
        dst.copy_from_slice(src)
    }
    fn to_f16_slice(src: &[Self], dst: &mut [f16]) {
        dst.convert_from_f64_slice(src)
    }
    fn to_bf16_slice(src: &[Self], dst: &mut [bf16]) {
        dst.convert_from_f64_slice(src)
    }
    fn to_f32_slice(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = *s as f32;
        }
    }
    fn to_f64_slice(src: &[Self], dst: &mut [f64]) {
        dst.copy_from_slice(src)
    }
}
