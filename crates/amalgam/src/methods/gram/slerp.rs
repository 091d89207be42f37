//! Spherical interpolation of two models, each whole tensor one vector (spec §1.5). Two
//! definitions are in use; `variant` picks one:
//!
//! - `sd_mecha`: `â = a/‖a‖`, `b̂ = b/‖b‖`, `ω = arccos clamp(⟨â, b̂⟩, −1, 1)`,
//!   `r = (sin((1−α)ω)·â + sin(αω)·b̂) / sin ω`, rescaled to the interpolated norm
//!   `(1−α)‖a‖ + α‖b‖`; where that is undefined (ω = 0, a zero norm) the plain `lerp(a, b, α)`.
//! - `mergekit`: the angle from the normalised tensors (normalised only when the norm exceeds
//!   1e-8); when `|cos ω| > 0.9995` the plain `lerp`; else `sin((1−α)ω)/sin ω · a + sin(αω)/sin ω · b`
//!   on the tensors as they are.
//!
//! Both are `c_a·a + c_b·b` with coefficients from the norms and the dot product: one statistic
//! pass, then one output pass.

use super::geometric_median::{GramCombination, GramKind};
use crate::error::{Error, Result};
use crate::method::*;
use crate::real::Real;

/// The method's declaration: its name, inputs, parameters and documentation.
pub static INFO: MethodInfo = MethodInfo {
    name: "slerp",
    origins: &[Origin::SdMecha, Origin::Mergekit],
    formula: "c_a * a + c_b * b, the spherical interpolation of a and b at alpha",
    summary: "Spherical interpolation of two models, each whole tensor one vector (sd-mecha or mergekit variant). A key one model lacks is taken from the other.",
    slots: &[
        Slot {
            name: "a",
            kind: SlotKind::One,
            doc: "the model at alpha = 0",
        },
        Slot {
            name: "b",
            kind: SlotKind::One,
            doc: "the model at alpha = 1",
        },
    ],
    params: &[
        ParamInfo::number("alpha", 0.5, "position between a (0) and b (1)"),
        ParamInfo::choice("variant", &["sd_mecha", "mergekit"], "sd_mecha", "sd_mecha (rescaled to the interpolated norm) | mergekit (coefficients on the tensors as they are, lerp when nearly parallel)"),
    ],
};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Variant {
    SdMecha,
    Mergekit,
}

pub(crate) struct Slerp {
    alpha: f64,
    variant: Variant,
}

impl Slerp {
    pub(crate) fn new(mut params: Params) -> Result<Self> {
        let alpha = params.number("alpha")?;
        if !alpha.is_finite() {
            return Err(Error::method(
                "slerp",
                format!("`alpha` must be finite, got {alpha}"),
            ));
        }
        let variant = match params.choice("variant")? {
            "mergekit" => Variant::Mergekit,
            _ => Variant::SdMecha,
        };
        params.finish()?;
        Ok(Slerp { alpha, variant })
    }
}

/// The coefficients `(c_a, c_b)` from `‖a‖²`, `‖b‖²` and `⟨a, b⟩`.
fn coefficients(variant: Variant, t: f64, aa: f64, bb: f64, ab: f64) -> [f64; 2] {
    let lerp = [1.0 - t, t];
    let (na, nb) = (aa.max(0.0).sqrt(), bb.max(0.0).sqrt());
    match variant {
        Variant::SdMecha => {
            let cos = (ab / (na * nb)).clamp(-1.0, 1.0);
            let omega = cos.acos();
            let s = omega.sin();
            let norm = (1.0 - t) * na + t * nb;
            let c = [
                ((1.0 - t) * omega).sin() / s * norm / na,
                (t * omega).sin() / s * norm / nb,
            ];
            if c.iter().all(|x| x.is_finite()) {
                c
            } else {
                lerp
            }
        }
        Variant::Mergekit => {
            let ua = if na > 1e-8 { na } else { 1.0 };
            let ub = if nb > 1e-8 { nb } else { 1.0 };
            let cos = ab / (ua * ub);
            if cos.abs() > 0.9995 || !cos.is_finite() {
                return lerp;
            }
            let omega = cos.acos();
            let s = omega.sin();
            [((1.0 - t) * omega).sin() / s, (t * omega).sin() / s]
        }
    }
}

impl<T: Real> Method<T> for Slerp {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        OnMissing::PassThrough(if present[0] { 0 } else { 1 })
    }
    fn begin_key(&self, _ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        let (variant, t) = (self.variant, self.alpha);
        Ok(Box::new(GramCombination::new(
            2,
            GramKind::Raw,
            move |g, _| coefficients(variant, t, g[0], g[3], g[1]).to_vec(),
        )))
    }
}
