//! Reading and writing tensors: lazy safetensors input with strict validation ([`input`]),
//! incremental output (`output`) under the rules for every file written ([`dest`]), the
//! stored dtypes and their conversions ([`dtype`], `simd`), and the policy for non-finite
//! input values ([`non_finite`]).

pub mod dest;
pub mod dtype;
pub mod input;
pub mod non_finite;
pub(crate) mod output;
pub(crate) mod simd;
