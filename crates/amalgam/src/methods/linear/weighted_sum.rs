//! Weighted sum of two models: `θ = (1 − α)·A + α·B` (A1111 "weighted sum", spec §1.1).

use crate::error::Result;
use crate::method::*;
use crate::real::Real;

/// The method's declaration: its name, inputs, parameters and documentation.
pub static INFO: MethodInfo = MethodInfo {
    name: "weighted_sum",
    origins: &[Origin::SdMecha, Origin::Supermerger],
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

impl Pointwise for WeightedSum {
    const INFO: &'static MethodInfo = &INFO;
    fn read(params: &mut Params) -> Result<Self> {
        Ok(WeightedSum {
            alpha: params.number("alpha")?,
        })
    }
    /// A key only one model has is taken from that model.
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        OnMissing::PassThrough(if present[0] { 0 } else { 1 })
    }
    fn merge<T: Real>(&self, args: &[&[T]], out: &mut [T]) {
        let (wa, wb) = (T::from_f64(1.0 - self.alpha), T::from_f64(self.alpha));
        for ((o, &x), &y) in out.iter_mut().zip(args[0]).zip(args[1]) {
            *o = wa * x + wb * y;
        }
    }
}
