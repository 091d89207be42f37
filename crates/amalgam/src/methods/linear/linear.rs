//! Weighted linear combination of N models (mergekit `linear`, spec §1.1):
//! `θ = Σ w_t θ_t / Σ w_t` with `normalize = true`, `θ = Σ w_t θ_t` without.

use crate::error::{Error, Result};
use crate::method::*;
use crate::real::Real;
use std::ops::Range;

/// The method's declaration: its name, inputs, parameters and documentation.
pub static INFO: MethodInfo = MethodInfo {
    name: "linear",
    origins: &[Origin::Mergekit, Origin::SdMecha],
    formula: "sum_t weights[t] * models[t]  (divided by sum_t weights[t] when normalize)",
    summary: "Weighted sum of N models. A model lacking a key is left out of that key; with \
              normalize the weights of the models present are renormalised.",
    slots: &[Slot {
        name: "models",
        kind: SlotKind::Many,
        doc: "the models to combine",
    }],
    params: &[
        ParamInfo::per_model(
            "weights",
            1.0,
            "one weight per model (a list), or one number for all",
        ),
        ParamInfo::flag(
            "normalize",
            true,
            "divide by the sum of the weights (must not be 0)",
        ),
    ],
};

pub(crate) struct Linear {
    weights: Vec<f64>,
    normalize: bool,
}

impl Linear {
    pub(crate) fn new(mut params: Params) -> Result<Self> {
        let weights = params.per_model("weights")?;
        let normalize = params.boolean("normalize")?;
        params.finish()?;
        if normalize && weights.iter().sum::<f64>().abs() < 1e-8 {
            return Err(Error::method(
                INFO.name,
                "the weights sum to 0, so they cannot be normalised (set normalize = false)",
            ));
        }
        Ok(Linear { weights, normalize })
    }
}

impl<T: Real> Method<T> for Linear {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
    fn on_missing(&self, _present: &[bool]) -> OnMissing {
        OnMissing::MergePresent
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        let w: Vec<f64> = ctx.present.iter().map(|&i| self.weights[i]).collect();
        let scale = if self.normalize {
            let total: f64 = w.iter().sum();
            if total.abs() < 1e-8 {
                return Err(Error::method(
                    INFO.name,
                    format!(
                        "key `{}`: the weights of the models that have it sum to 0",
                        ctx.key
                    ),
                ));
            }
            1.0 / total
        } else {
            1.0
        };
        Ok(Box::new(WeightedTotal {
            weights: w.iter().map(|&x| T::from_f64(x * scale)).collect(),
        }))
    }
}

/// `out = Σ_t weights[t] · args[t]`, summed in model order.
pub(crate) struct WeightedTotal<T> {
    pub(crate) weights: Vec<T>,
}

impl<T: Real> KeyMerge<T> for WeightedTotal<T> {
    fn merge_chunk(&self, _range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        let w0 = self.weights[0];
        for (o, &x) in out.iter_mut().zip(args[0].iter()) {
            *o = w0 * x;
        }
        for (x, &w) in args.iter().zip(&self.weights).skip(1) {
            for (o, &v) in out.iter_mut().zip(x.iter()) {
                *o += w * v;
            }
        }
    }
}
