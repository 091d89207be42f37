//! supermerger's one-model calculation modes:
//!
//! - "self" (`scale`): `α·a`;
//! - "plus random" (`add_noise`): `a + α·z`, `z` standard normal per element (supermerger's
//!   `torch.randn_like`; here from amalgam's counter-based stream of (seed, key), so the same in
//!   distribution, reproducible by seed, and independent of chunks and threads).
//!
//! As in supermerger, both leave a key unchanged where `α = 0` or (with `skip_selfkeys`, the
//! default) where its name contains `to_out`, `proj_out` or `norm` (supermerger's `SELFKEYS`:
//! attention outputs and norms, which these modes would break). Element-wise: streams.

use super::is_self_key;
use crate::error::Result;
use crate::method::*;
use crate::real::Real;
use crate::rng;
use std::ops::Range;

const SLOTS: &[Slot] = &[Slot {
    name: "a",
    kind: SlotKind::One,
    doc: "the model",
}];

const SKIP: ParamInfo = ParamInfo::flag(
    "skip_selfkeys",
    true,
    "leave keys whose name contains to_out, proj_out or norm unchanged (supermerger's SELFKEYS)",
);

/// `scale`'s declaration.
pub static SCALE: MethodInfo = MethodInfo {
    name: "scale",
    origins: &[Origin::Supermerger],
    formula: "alpha * a (a where alpha = 0 or, with skip_selfkeys, on to_out/proj_out/norm keys)",
    summary: "supermerger's self: every weight multiplied by alpha, except attention outputs and \
              norms.",
    slots: SLOTS,
    params: &[ParamInfo::number("alpha", 0.5, "the factor"), SKIP],
};

/// `add_noise`'s declaration.
pub static ADD_NOISE: MethodInfo = MethodInfo {
    name: "add_noise",
    origins: &[Origin::Supermerger],
    formula: "a + alpha * N(0, 1) per element (a where alpha = 0 or, with skip_selfkeys, on \
              to_out/proj_out/norm keys)",
    summary:
        "supermerger's plus random: Gaussian noise of standard deviation alpha added to every \
              weight, except attention outputs and norms; seeded.",
    slots: SLOTS,
    params: &[
        ParamInfo::number("alpha", 0.5, "the noise's standard deviation"),
        SKIP,
    ],
};

/// `scale` (`NOISE = false`) or `add_noise` (`NOISE = true`).
pub(crate) struct Scale<const NOISE: bool> {
    alpha: f64,
    skip_selfkeys: bool,
}

impl<const NOISE: bool> Scale<NOISE> {
    pub(crate) fn new(mut params: Params) -> Result<Self> {
        let alpha = params.number("alpha")?;
        let skip_selfkeys = params.boolean("skip_selfkeys")?;
        params.finish()?;
        Ok(Scale {
            alpha,
            skip_selfkeys,
        })
    }
}

impl<T: Real, const NOISE: bool> Method<T> for Scale<NOISE> {
    fn info(&self) -> &'static MethodInfo {
        if NOISE {
            &ADD_NOISE
        } else {
            &SCALE
        }
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        keep_first(present)
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        let unchanged = self.alpha == 0.0 || (self.skip_selfkeys && is_self_key(ctx.key));
        Ok(Box::new(ScaleKey::<NOISE> {
            alpha: (!unchanged).then_some(self.alpha),
            key: ctx.key.to_string(),
            seed: ctx.seed,
        }))
    }
}

struct ScaleKey<const NOISE: bool> {
    /// `None`: the key is left unchanged.
    alpha: Option<f64>,
    key: String,
    seed: u64,
}

impl<T: Real, const NOISE: bool> KeyMerge<T> for ScaleKey<NOISE> {
    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        let a = args[0];
        let Some(alpha) = self.alpha else {
            out.copy_from_slice(&a[..out.len()]);
            return;
        };
        if NOISE {
            let mut z = vec![0.0; out.len()];
            rng::normals(self.seed, &self.key, 0, range.start, &mut z);
            for ((o, &x), &z) in out.iter_mut().zip(a).zip(&z) {
                *o = x + T::from_f64(z) * T::from_f64(alpha);
            }
        } else {
            let alpha = T::from_f64(alpha);
            for (o, &x) in out.iter_mut().zip(a) {
                *o = x * alpha;
            }
        }
    }
}
