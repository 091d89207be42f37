//! Non-finite values (NaN, +Inf, -Inf): what a merge does when an input holds them, and how they
//! are found without a second read.
//!
//! Every tensor an input contributes is checked as it is decoded, a sub-chunk at a time in the
//! CPU cache (an `x - x == 0` test that vectorises, so it costs nothing measurable). A key where a
//! model's tensor holds a non-finite value is handled after the other keys, by the
//! [`NonFinite`] policy:
//!
//! - [`NonFinite::Omit`] (the default, as sd-mecha's): the model is left out of that key, as if it
//!   lacked the key (the key policy applies: the other models are merged, a fallback is taken),
//!   and the key is computed again. Only that key is read again.
//! - [`NonFinite::Error`]: the merge stops before the output is moved into place, naming file,
//!   key and count.
//! - [`NonFinite::Keep`]: the values are merged as they are.
//!
//! Whatever the policy, each model's non-finite values are reported per key, and so are the
//! non-finite values of the output (counted in the encoded output dtype, so an f16 overflow
//! counts too: [`crate::io::dtype::OutputDtype::count_non_finite`]).

use crate::real::Real;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

/// What a merge does with a model whose tensor for a key holds NaN or Inf.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NonFinite {
    /// Leave the model out of that key, as if it lacked the key, and report it.
    #[default]
    Omit,
    /// Stop the merge with an error naming file, key and count; nothing is written.
    Error,
    /// Merge the values as they are (and report them).
    Keep,
}

impl NonFinite {
    /// Every policy, in documentation order.
    pub const ALL: [NonFinite; 3] = [NonFinite::Omit, NonFinite::Error, NonFinite::Keep];

    /// The name users write (`omit`, `error`, `keep`).
    pub fn name(self) -> &'static str {
        match self {
            NonFinite::Omit => "omit",
            NonFinite::Error => "error",
            NonFinite::Keep => "keep",
        }
    }

    /// Whether decoded inputs are cleaned (non-finite values set to zero) once found: their key
    /// is computed again without them (or the merge stops), and the methods never see them.
    pub(crate) fn cleans(self) -> bool {
        self != NonFinite::Keep
    }
}

impl std::str::FromStr for NonFinite {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        NonFinite::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("`{s}` is not a non-finite policy (omit, error or keep)"))
    }
}

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether every value is finite.
#[allow(clippy::eq_op)] // `x - x` is the test
pub fn all_finite<T: Real>(xs: &[T]) -> bool {
    // `x - x` is 0 for finite x and NaN for NaN and ±Inf; the fold has no early exit, so it
    // vectorises, and blocks of 256 end the scan soon after a bad value.
    xs.chunks(256)
        .all(|c| c.iter().fold(true, |ok, &x| ok & (x - x == T::ZERO)))
}

/// The number of non-finite values.
#[allow(clippy::eq_op)]
pub fn count<T: Real>(xs: &[T]) -> u64 {
    xs.iter().filter(|&&x| x - x != T::ZERO).count() as u64
}

/// Sets every non-finite value to zero.
#[allow(clippy::eq_op)]
pub(crate) fn clean<T: Real>(xs: &mut [T]) {
    for x in xs {
        if *x - *x != T::ZERO {
            *x = T::ZERO;
        }
    }
}

/// Whether every little-endian word of `bytes` is a finite value: its bits without the sign
/// (`abs`) below the exponent mask (`exp`). `None` when `bytes` are not aligned to words.
pub(crate) fn words_finite<W>(bytes: &[u8], abs: W, exp: W) -> Option<bool>
where
    W: bytemuck::Pod + Ord + std::ops::BitAnd<Output = W>,
{
    if !cfg!(target_endian = "little") {
        return None;
    }
    let words = bytemuck::try_cast_slice::<u8, W>(bytes).ok()?;
    // A max without early exit vectorises; blocks end the scan soon after a bad value.
    Some(
        words
            .chunks(4096)
            .all(|c| c.iter().fold(W::zeroed(), |m, &w| m.max(w & abs)) < exp),
    )
}

/// One model's non-finite values in one key.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InputNonFinite {
    /// The key.
    pub key: String,
    /// The input, in input order.
    pub model: usize,
    /// How many of the tensor's values are NaN or ±Inf.
    pub count: u64,
    /// Whether the model was left out of the key ([`NonFinite::Omit`]); otherwise they were
    /// merged as they are (with [`NonFinite::Keep`], or when no other model has the key).
    pub omitted: bool,
}

/// The (planned key, model) pairs found non-finite while a merge runs.
#[derive(Default)]
pub(crate) struct Found {
    keys: Mutex<BTreeMap<usize, BTreeSet<usize>>>,
}

impl Found {
    pub(crate) fn add(&self, key: usize, models: impl IntoIterator<Item = usize>) {
        let mut k = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        k.entry(key).or_default().extend(models);
    }
    /// Everything found so far, in key order; the set is left empty.
    pub(crate) fn take(&self) -> BTreeMap<usize, BTreeSet<usize>> {
        std::mem::take(&mut *self.keys.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nan_and_both_infinities() {
        let mut v = vec![1.0f32; 1000];
        assert!(all_finite(&v));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            v[777] = bad;
            assert!(!all_finite(&v));
            assert_eq!(count(&v), 1);
        }
        v[3] = f32::MAX;
        v[4] = f32::MIN_POSITIVE / 4.0;
        assert_eq!(count(&v), 1, "the largest and subnormal values are finite");
        clean(&mut v);
        assert!(all_finite(&v));
        assert_eq!(v[777], 0.0);
        assert_eq!(v[3], f32::MAX);
    }

    #[test]
    fn parses_its_names() {
        for p in NonFinite::ALL {
            assert_eq!(p.name().parse::<NonFinite>(), Ok(p));
        }
        assert!("drop".parse::<NonFinite>().is_err());
        assert_eq!(NonFinite::default(), NonFinite::Omit);
    }
}
