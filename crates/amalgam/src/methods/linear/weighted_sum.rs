//! Weighted sum of two models: `θ = (1 − α)·A + α·B` (A1111 "weighted sum", spec §1.1).

use crate::error::Result;
use crate::method::*;
use crate::real::Real;
use std::ops::Range;

/// The method's declaration: its name, inputs, parameters and documentation.
pub static INFO: MethodInfo = MethodInfo {
    name: "weighted_sum",
    formula: "(1 - alpha) * a + alpha * b",
    summary: "Interpolates two models. alpha = 0 gives a, alpha = 1 gives b, exactly.",
    slots: &[
        Slot {
            name: "a",
            kind: SlotKind::One,
            doc: "first model",
        },
        Slot {
            name: "b",
            kind: SlotKind::One,
            doc: "second model",
        },
    ],
    params: &[ParamInfo::number(
        "alpha",
        0.5,
        "weight of b; values outside [0, 1] extrapolate",
    )],
};

pub(crate) struct WeightedSum {
    alpha: f64,
}

impl WeightedSum {
    pub(crate) fn new(mut params: Params) -> Result<Self> {
        let alpha = params.number("alpha")?;
        params.finish()?;
        Ok(WeightedSum { alpha })
    }
}

impl<T: Real> Method<T> for WeightedSum {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
    /// A key only one model has is taken from that model.
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        OnMissing::PassThrough(if present[0] { 0 } else { 1 })
    }
    fn begin_key(&self, _ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        Ok(Box::new(Lerp {
            wa: T::from_f64(1.0 - self.alpha),
            wb: T::from_f64(self.alpha),
        }))
    }
}

struct Lerp<T> {
    wa: T,
    wb: T,
}

impl<T: Real> KeyMerge<T> for Lerp<T> {
    fn merge_chunk(&self, _range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        let (a, b) = (args[0], args[1]);
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = self.wa * x + self.wb * y;
        }
    }
}
