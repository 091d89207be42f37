//! Dropout ("n-supermario", sd-mecha `dropout`): every model's delta entries are kept with
//! probability `1 − p`, independently; each element is the mean of the deltas kept there, divided
//! by `(1 − p)^rescale`:
//!
//! `θ = θ_0 + λ · Σ_t m_t δ_t / max(1, Σ_t m_t) / (1 − p)^rescale`, `m_t ~ Bernoulli(1 − p)`.
//!
//! Only sd-mecha's default `overlap = 1` (independent masks) is offered; its other overlap modes
//! are broken in sd-mecha itself. Masks come from amalgam's counter-based stream (see `rng`).

use crate::error::Result;
use crate::method::*;
use crate::real::Real;
use crate::rng;
use std::ops::Range;

/// The method's declaration: its name, inputs, parameters and documentation.
pub static INFO: MethodInfo = MethodInfo {
    name: "dropout",
    origins: &[Origin::SdMecha],
    formula: "base + lambda * sum_t m_t (models[t] - base) / max(1, sum_t m_t) / (1 - p)^rescale",
    summary: "Each model's delta entries kept with probability 1 - p, the kept ones averaged per element, rescaled (sd-mecha's n-supermario dropout).",
    slots: Slot::BASE_AND_MODELS,
    params: &[
        ParamInfo::number_in("p", 0.9, Domain::UnitInterval, "drop probability, in [0, 1] (sd-mecha's `probability`)"),
        ParamInfo::number("rescale", 1.0, "exponent of the 1 / (1 - p) rescale (0 = none; none either when p = 1)"),
        ParamInfo::number("lambda", 1.0, "scale of the merged delta (sd-mecha's wrapper `alpha`, 0.5 there)"),
    ],
};

pub(crate) struct Dropout {
    p: f64,
    scale: f64,
}

impl Dropout {
    pub(crate) fn new(mut params: Params) -> Result<Self> {
        let p = params.number("p")?;
        let rescale = params.number("rescale")?;
        let lambda = params.number("lambda")?;
        params.finish()?;
        let factor = (1.0 - p).powf(rescale);
        let factor = if p >= 1.0 || !factor.is_finite() || factor == 0.0 {
            1.0
        } else {
            factor
        };
        Ok(Dropout {
            p,
            scale: lambda / factor,
        })
    }
}

impl<T: Real> Method<T> for Dropout {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        OnMissing::base_and_models(present)
    }
    fn notes(&self) -> Vec<String> {
        vec![format!(
            "dropout keeps each delta entry with probability {:.4}",
            1.0 - self.p
        )]
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        Ok(Box::new(KeyDropout {
            key: ctx.key.to_string(),
            seed: ctx.seed,
            streams: ctx.present[1..].iter().map(|&i| i as u64).collect(),
            keep: rng::threshold(1.0 - self.p),
            scale: T::from_f64(self.scale),
        }))
    }
}

struct KeyDropout<T> {
    key: String,
    seed: u64,
    streams: Vec<u64>,
    keep: u32,
    scale: T,
}

impl<T: Real> KeyMerge<T> for KeyDropout<T> {
    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        let base = args[0];
        let len = range.len();
        let mut count = vec![T::ZERO; len];
        let mut draws = vec![0u16; len];
        out.fill(T::ZERO);
        for (x, &stream) in args[1..].iter().zip(&self.streams) {
            rng::draws(self.seed, &self.key, stream, range.start, &mut draws);
            for (((o, c), (&v, &b)), &d) in out
                .iter_mut()
                .zip(count.iter_mut())
                .zip(x.iter().zip(base))
                .zip(&draws)
            {
                let kept = (d as u32) < self.keep;
                *o += if kept { v - b } else { T::ZERO };
                *c += if kept { T::ONE } else { T::ZERO };
            }
        }
        for ((o, &c), &b) in out.iter_mut().zip(&count).zip(base) {
            let mean = if c > T::ONE { *o / c } else { *o };
            *o = b + self.scale * mean;
        }
    }
}
