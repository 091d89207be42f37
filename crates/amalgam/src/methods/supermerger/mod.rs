//! supermerger's merge modes and calculation modes (hako-mikan/sd-webui-supermerger, commit
//! `0b1c491`, `scripts/mergers/mergers.py`), under amalgam names with supermerger's UI names as
//! aliases (issue #18). Each follows supermerger's formula and is checked against a transcription
//! of its code (`tests/supermerger_modes.rs`, fixtures made by `tools/supermerger_fixtures.py`).
//!
//! - [`sums`]: `triple_sum` ("Triple sum") and `sum_twice` ("sum Twice"), with torch's `lerp`;
//! - [`train_difference`]: "trainDifference" (`traindiff`);
//! - [`smooth_add`]: "smoothAdd" / "smoothAdd MT": the difference median- then Gaussian-filtered
//!   over the whole tensor (whole-tensor unit);
//! - [`extract`]: "extract" (`extract_super`), cosines along the last dimension (a row unit);
//! - [`tensor`]: "tensor" and "tensor2": slices of b swapped into a (`tensormerge`);
//! - [`scale`]: "self" and "plus random" (`add_noise`), which leave supermerger's `SELFKEYS`
//!   (`to_out`, `proj_out`, `norm`) unchanged;
//! - [`cosine`]: "cosineA" / "cosineB" (`precosine` + `cosine`): similarities min-max normalised
//!   over the whole model.
//!
//! supermerger's "Weight sum" and "Add difference" are `weighted_sum` and `add_difference`.
//! Block weights (MBW) are amalgam's per-block parameters: every number parameter here takes them.

pub mod cosine;
pub mod extract;
pub mod scale;
pub mod smooth_add;
pub mod sums;
pub mod tensor;
pub mod train_difference;

use crate::real::Real;

/// `torch.lerp(start, end, w)`: `start + w·(end − start)` for `|w| < 0.5`, else
/// `end − (end − start)·(1 − w)`.
#[inline]
pub(crate) fn torch_lerp<T: Real>(start: T, end: T, w: T) -> T {
    if w.abs() < T::from_f64(0.5) {
        start + w * (end - start)
    } else {
        end - (end - start) * (T::ONE - w)
    }
}

/// supermerger's `SELFKEYS`: keys "self" and "plus random" leave unchanged (a name containing
/// `to_out`, `proj_out` or `norm`).
pub(crate) fn is_self_key(key: &str) -> bool {
    ["to_out", "proj_out", "norm"]
        .iter()
        .any(|s| key.contains(s))
}
