//! Stored element types: which safetensors dtypes amalgam reads as floats, and the output dtypes.

use crate::real::Real;
use half::{bf16, f16};
use safetensors::Dtype;

/// A floating-point storage dtype amalgam can read and merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatDtype {
    F16,
    BF16,
    F32,
    F64,
    /// OCP FP8 E4M3 ("fn": no infinities, 0x7f/0xff are NaN), as PyTorch's `float8_e4m3fn`.
    F8E4M3,
    /// OCP FP8 E5M2, the top byte of an IEEE f16.
    F8E5M2,
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
            _ => return None,
        })
    }

    pub fn size(self) -> usize {
        match self {
            FloatDtype::F8E4M3 | FloatDtype::F8E5M2 => 1,
            FloatDtype::F16 | FloatDtype::BF16 => 2,
            FloatDtype::F32 => 4,
            FloatDtype::F64 => 8,
        }
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

/// The dtype merged tensors are written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputDtype {
    F16,
    BF16,
    F32,
    F64,
}

impl OutputDtype {
    pub fn size(self) -> usize {
        match self {
            OutputDtype::F16 | OutputDtype::BF16 => 2,
            OutputDtype::F32 => 4,
            OutputDtype::F64 => 8,
        }
    }
    pub fn safetensors(self) -> Dtype {
        match self {
            OutputDtype::F16 => Dtype::F16,
            OutputDtype::BF16 => Dtype::BF16,
            OutputDtype::F32 => Dtype::F32,
            OutputDtype::F64 => Dtype::F64,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            OutputDtype::F16 => "f16",
            OutputDtype::BF16 => "bf16",
            OutputDtype::F32 => "f32",
            OutputDtype::F64 => "f64",
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
