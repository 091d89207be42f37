//! sd-mecha 1.1.8's element-wise and per-tensor methods, under the names sd-mecha users know
//! (issue #18): each follows sd-mecha's formula to the rounding, its NaN handling and epsilons
//! included, and is checked against sd-mecha itself (`tests/mecha_methods.rs`, fixtures made by
//! `tools/sd_mecha_methods_fixtures.py`).
//!
//! - [`powers`]: `geometric_sum`, `multiply_quotient` (principal complex powers, real part);
//! - [`masks`]: `train_difference_mask`, `add_opposite_mask`, `add_strict_opposite_mask`
//!   (per-element strengths, sd-mecha's `param` space);
//! - [`clamp`]: `clamp` of a model between the element-wise extremes of others;
//! - [`perpendicular`]: `perpendicular_component` and `add_perpendicular` (one `Sums` pass
//!   for `⟨a, b⟩` and `‖a‖²`, then the output);
//! - [`cosine`]: `add_cosine_a`, `add_cosine_b` (cosines along dim 0: one `Sums` pass with
//!   sums per column, then the output).
//!
//! Transcendental functions (`ln`, `exp`, `cos`) are evaluated in f64 and rounded to the
//! compute type.

pub mod clamp;
pub mod cosine;
pub mod masks;
pub mod perpendicular;
pub mod powers;

use crate::method::OnMissing;

/// A key every argument must have: otherwise the node has no value for it.
pub(crate) fn all_or_absent(present: &[bool]) -> OnMissing {
    if present.iter().all(|&p| p) {
        OnMissing::MergePresent
    } else {
        OnMissing::Absent
    }
}
