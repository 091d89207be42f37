//! Stored element types: which safetensors dtypes amalgam reads as floats, and the output dtypes.

use crate::real::Real;
use half::{bf16, f16};
use safetensors::Dtype;

/// A floating-point storage dtype amalgam can read and merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatDtype {
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// IEEE single precision.
    F32,
    /// IEEE double precision.
    F64,
    /// OCP FP8 E4M3 ("fn": no infinities, 0x7f/0xff are NaN), as PyTorch's `float8_e4m3fn`.
    F8E4M3,
    /// OCP FP8 E5M2, the top byte of an IEEE f16.
    F8E5M2,
    /// FP8 E4M3 "FNUZ" (Graphcore/AMD, PyTorch's `float8_e4m3fnuz`): exponent bias 8, no
    /// infinities, no negative zero, NaN only 0x80.
    F8E4M3Fnuz,
    /// FP8 E5M2 "FNUZ" (PyTorch's `float8_e5m2fnuz`): exponent bias 16, no infinities, no
    /// negative zero, NaN only 0x80.
    F8E5M2Fnuz,
}

impl FloatDtype {
    /// The float dtype for a safetensors dtype, or `None` for integer/bool/exotic dtypes.
    pub fn from_safetensors(d: Dtype) -> Option<Self> {
        Some(match d {
            Dtype::F16 => FloatDtype::F16,
            Dtype::BF16 => FloatDtype::BF16,
            Dtype::F32 => FloatDtype::F32,
            Dtype::F64 => FloatDtype::F64,
            Dtype::F8_E4M3 => FloatDtype::F8E4M3,
            Dtype::F8_E5M2 => FloatDtype::F8E5M2,
            Dtype::F8_E4M3FNUZ => FloatDtype::F8E4M3Fnuz,
            Dtype::F8_E5M2FNUZ => FloatDtype::F8E5M2Fnuz,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            FloatDtype::F8E4M3
            | FloatDtype::F8E5M2
            | FloatDtype::F8E4M3Fnuz
            | FloatDtype::F8E5M2Fnuz => 1,
            FloatDtype::F16 | FloatDtype::BF16 => 2,
            FloatDtype::F32 => 4,
            FloatDtype::F64 => 8,
        }
    }

    /// [`FloatDtype::decode`], and whether every value is finite: for f16, bf16, f32 and f64
    /// from the raw words (one vectorised max over the exponent bits, 16 values per
    /// instruction for f16), else from the decoded values.
    pub fn decode_checked<T: Real>(self, raw: &[u8], dst: &mut [T]) -> bool {
        use crate::io::non_finite::words_finite;
        let finite = match self {
            FloatDtype::F16 => words_finite(raw, 0x7fffu16, 0x7c00),
            FloatDtype::BF16 => words_finite(raw, 0x7fffu16, 0x7f80),
            FloatDtype::F32 => words_finite(raw, 0x7fff_ffffu32, 0x7f80_0000),
            // A finite f64 can overflow an f32.
            FloatDtype::F64 if T::DTYPE == crate::real::ComputeDtype::F64 => {
                words_finite(raw, 0x7fff_ffff_ffff_ffffu64, 0x7ff0_0000_0000_0000)
            }
            _ => None,
        };
        self.decode(raw, dst);
        finite.unwrap_or_else(|| crate::io::non_finite::all_finite(dst))
    }

    /// Decodes little-endian elements in `raw` (exactly `dst.len() * size()` bytes, any alignment
    /// handled by the caller's aligned buffer) into `dst`.
    pub fn decode<T: Real>(self, raw: &[u8], dst: &mut [T]) {
        debug_assert_eq!(raw.len(), dst.len() * self.size());
        match self {
            FloatDtype::F16 => T::from_f16_slice(bytemuck::cast_slice::<u8, f16>(raw), dst),
            FloatDtype::BF16 => T::from_bf16_slice(bytemuck::cast_slice::<u8, bf16>(raw), dst),
            FloatDtype::F32 => T::from_f32_slice(bytemuck::cast_slice::<u8, f32>(raw), dst),
            FloatDtype::F64 => T::from_f64_slice(bytemuck::cast_slice::<u8, f64>(raw), dst),
            FloatDtype::F8E4M3 => {
                let table = e4m3_table();
                for (d, &b) in dst.iter_mut().zip(raw) {
                    *d = T::from_f64(table[b as usize] as f64);
                }
            }
            FloatDtype::F8E5M2 => {
                for (d, &b) in dst.iter_mut().zip(raw) {
                    *d = T::from_f64(f16::from_bits((b as u16) << 8).to_f64());
                }
            }
            FloatDtype::F8E4M3Fnuz | FloatDtype::F8E5M2Fnuz => {
                let table = fnuz_table(self);
                for (d, &b) in dst.iter_mut().zip(raw) {
                    *d = T::from_f64(table[b as usize] as f64);
                }
            }
        }
    }
}

/// Decodes one FP8 E4M3FN byte.
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((b >> 3) & 0x0f) as i32;
    let mant = (b & 0x07) as f32;
    if exp == 0x0f && (b & 0x07) == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * mant / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + mant / 8.0) * 2f32.powi(exp - 7)
    }
}

fn e4m3_table() -> &'static [f32; 256] {
    static TABLE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|i| e4m3_to_f32(i as u8)))
}

/// Decodes one FP8 E4M3FNUZ byte: `(-1)^s · 2^(e-8) · (1 + m/8)`, subnormals `(-1)^s · 2^-7 ·
/// m/8` (the smallest 2^-10), the largest 0x7f = 240, 0x80 (the would-be negative zero) NaN.
pub fn e4m3fnuz_to_f32(b: u8) -> f32 {
    fnuz_to_f32(b, 3, 8)
}

/// Decodes one FP8 E5M2FNUZ byte: `(-1)^s · 2^(e-16) · (1 + m/4)`, subnormals `(-1)^s · 2^-15 ·
/// m/4` (the smallest 2^-17), the largest 0x7f = 57344, 0x80 NaN.
pub fn e5m2fnuz_to_f32(b: u8) -> f32 {
    fnuz_to_f32(b, 2, 16)
}

/// An FP8 FNUZ byte with `mant` mantissa bits (the rest exponent) and exponent `bias`.
fn fnuz_to_f32(b: u8, mant: u32, bias: i32) -> f32 {
    if b == 0x80 {
        return f32::NAN;
    }
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((b & 0x7f) >> mant) as i32;
    let m = (b & ((1 << mant) - 1)) as f32 / (1u32 << mant) as f32;
    if exp == 0 {
        sign * m * 2f32.powi(1 - bias)
    } else {
        sign * (1.0 + m) * 2f32.powi(exp - bias)
    }
}

fn fnuz_table(d: FloatDtype) -> &'static [f32; 256] {
    static E4M3: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    static E5M2: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    if d == FloatDtype::F8E4M3Fnuz {
        E4M3.get_or_init(|| std::array::from_fn(|i| e4m3fnuz_to_f32(i as u8)))
    } else {
        E5M2.get_or_init(|| std::array::from_fn(|i| e5m2fnuz_to_f32(i as u8)))
    }
}

/// Why amalgam refuses to merge tensors of a float dtype it does not decode, or `None` for any
/// other dtype (decoded floats, and integers and bools, which are copied).
///
/// - `F8_E8M0` is the OCP MX block scale (2^(e-127), 0xff NaN): each value scales a block of
///   another tensor's FP4/FP6/FP8 elements, so merging the scales alone (or copying one model's
///   scales beside merged blocks) gives wrong weights.
/// - `F4` (MXFP4 E2M1) and `F6_E2M3`/`F6_E3M2` (MXFP6) are packed several to a byte; the
///   safetensors format does not define the order of the values within a byte, and they too are
///   meaningless without their E8M0 scales.
pub fn unsupported_float(d: Dtype) -> Option<&'static str> {
    match d {
        Dtype::F8_E8M0 => Some(
            "an OCP MX block scale (2^(e-127)), meaningful only with the block data it scales; dequantize the model first",
        ),
        Dtype::F4 => Some(
            "packed MXFP4 (two values a byte, in an order the safetensors format does not define) that needs its block scales; dequantize the model first",
        ),
        Dtype::F6_E2M3 | Dtype::F6_E3M2 => Some(
            "packed MXFP6 (four values in three bytes, in an order the safetensors format does not define) that needs its block scales; dequantize the model first",
        ),
        _ => None,
    }
}

/// The dtype merged tensors are written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputDtype {
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// IEEE single precision.
    F32,
    /// IEEE double precision.
    F64,
}

impl OutputDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            OutputDtype::F16 | OutputDtype::BF16 => 2,
            OutputDtype::F32 => 4,
            OutputDtype::F64 => 8,
        }
    }
    /// The safetensors dtype written.
    pub fn safetensors(self) -> Dtype {
        match self {
            OutputDtype::F16 => Dtype::F16,
            OutputDtype::BF16 => Dtype::BF16,
            OutputDtype::F32 => Dtype::F32,
            OutputDtype::F64 => Dtype::F64,
        }
    }
    /// The name users write (`f16`, `bf16`, `f32`, `f64`).
    pub fn name(self) -> &'static str {
        match self {
            OutputDtype::F16 => "f16",
            OutputDtype::BF16 => "bf16",
            OutputDtype::F32 => "f32",
            OutputDtype::F64 => "f64",
        }
    }
    /// The number of NaN and Inf values in `bytes`, little-endian values of this dtype.
    pub fn count_non_finite(self, bytes: &[u8]) -> u64 {
        // A value is NaN or ±Inf when its exponent bits are all ones, i.e. when its bits without the
        // sign are at least the exponent mask. The common case (none) is one vectorised max over
        // the words; only then are they counted.
        fn count<W: bytemuck::Pod + Ord + std::ops::BitAnd<Output = W>>(
            bytes: &[u8],
            abs: W,
            exp: W,
            from_le: impl Fn(&[u8]) -> W,
        ) -> u64 {
            if crate::io::non_finite::words_finite(bytes, abs, exp) == Some(true) {
                return 0;
            }
            let size = std::mem::size_of::<W>();
            bytes
                .chunks_exact(size)
                .filter(|b| from_le(b) & abs >= exp)
                .count() as u64
        }
        match self {
            OutputDtype::F16 => count(bytes, 0x7fffu16, 0x7c00, |b| {
                u16::from_le_bytes([b[0], b[1]])
            }),
            OutputDtype::BF16 => count(bytes, 0x7fffu16, 0x7f80, |b| {
                u16::from_le_bytes([b[0], b[1]])
            }),
            OutputDtype::F32 => count(bytes, 0x7fff_ffffu32, 0x7f80_0000, |b| {
                u32::from_le_bytes(b.try_into().unwrap())
            }),
            OutputDtype::F64 => count(
                bytes,
                0x7fff_ffff_ffff_ffffu64,
                0x7ff0_0000_0000_0000,
                |b| u64::from_le_bytes(b.try_into().unwrap()),
            ),
        }
    }

    /// Encodes `src` into little-endian bytes; `dst.len() == src.len() * size()`.
    pub fn encode<T: Real>(self, src: &[T], dst: &mut [u8]) {
        debug_assert_eq!(dst.len(), src.len() * self.size());
        match self {
            OutputDtype::F16 => T::to_f16_slice(src, bytemuck::cast_slice_mut::<u8, f16>(dst)),
            OutputDtype::BF16 => T::to_bf16_slice(src, bytemuck::cast_slice_mut::<u8, bf16>(dst)),
            OutputDtype::F32 => T::to_f32_slice(src, bytemuck::cast_slice_mut::<u8, f32>(dst)),
            OutputDtype::F64 => T::to_f64_slice(src, bytemuck::cast_slice_mut::<u8, f64>(dst)),
        }
    }
}

impl std::str::FromStr for OutputDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f16" | "fp16" | "float16" => Ok(OutputDtype::F16),
            "bf16" | "bfloat16" => Ok(OutputDtype::BF16),
            "f32" | "fp32" | "float32" => Ok(OutputDtype::F32),
            "f64" | "fp64" | "float64" => Ok(OutputDtype::F64),
            _ => Err(format!(
                "unknown output dtype `{s}` (expected f16, bf16, f32 or f64)"
            )),
        }
    }
}

/// Safetensors' spelling of a dtype, as written in headers.
pub fn dtype_name(d: Dtype) -> String {
    format!("{d:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_encoded_values_including_overflow() {
        let src = [1.0f32, f32::NAN, 70000.0, -f32::INFINITY, 65504.0];
        for (dtype, expected) in [
            (OutputDtype::F16, 3), // 70000 overflows f16
            (OutputDtype::BF16, 2),
            (OutputDtype::F32, 2),
            (OutputDtype::F64, 2),
        ] {
            // Aligned words (the fast path) and unaligned bytes.
            let n = src.len() * dtype.size();
            let mut words = vec![0u64; n.div_ceil(8) + 1];
            let aligned = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..n];
            dtype.encode(&src, aligned);
            assert_eq!(dtype.count_non_finite(aligned), expected, "{dtype:?}");
            let mut bytes = vec![0u8; n + 1];
            bytes[1..].copy_from_slice(aligned);
            assert_eq!(dtype.count_non_finite(&bytes[1..]), expected, "{dtype:?}");
            let finite = vec![0u8; n];
            assert_eq!(dtype.count_non_finite(&finite), 0);
        }
    }
}
