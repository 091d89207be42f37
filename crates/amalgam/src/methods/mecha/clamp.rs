//! sd-mecha's `clamp` (1.1.8, `merge_methods/limiting.py`): a model limited, element by element,
//! to the range of other models.
//!
//! `hi = max(bounds)`, `lo = min(bounds)`. With `stiffness = s ≠ 0`: `μ = mean(bounds)`; going
//! through the bounds in order, `sp` (from `hi`) takes each bound `x` with `sp ≥ x ≥ μ` and `ln`
//! (from `lo`) each bound with `ln ≤ x ≤ μ` (the bounds nearest the mean from above and below);
//! then `hi ← (1 − s)·hi + s·sp`, `lo ← (1 − s)·lo + s·ln`. Result `min(max(a, lo), hi)`.
//! With two bounds the stiffness changes nothing. Element-wise: streams.

use crate::error::Result;
use crate::method::*;
use crate::real::Real;

/// The method's declaration.
pub static INFO: MethodInfo = MethodInfo {
    name: "clamp",
    origins: &[Origin::SdMecha],
    formula: "min(max(a, lo), hi), lo and hi the element-wise min and max of the bounds \
              (pulled towards their mean by stiffness)",
    summary: "sd-mecha's clamp: limits a, element by element, to the range of the bound models; \
              stiffness narrows the range towards the bounds nearest their mean. A key a lacks \
              has no value here; bounds lacking it are left out.",
    slots: &[
        Slot {
            name: "a",
            kind: SlotKind::One,
            doc: "the model to limit",
        },
        Slot {
            name: "bounds",
            kind: SlotKind::Many,
            doc: "the models whose range limits a",
        },
    ],
    params: &[ParamInfo::number(
        "stiffness",
        0.0,
        "0: the bounds' full range; 1: between the bounds nearest their mean",
    )],
};

pub(crate) struct Clamp {
    stiffness: f64,
}

impl Pointwise for Clamp {
    const INFO: &'static MethodInfo = &INFO;
    fn read(params: &mut Params) -> Result<Self> {
        Ok(Clamp {
            stiffness: params.number("stiffness")?,
        })
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        OnMissing::base_and_models(present)
    }
    fn merge<T: Real>(&self, args: &[&[T]], out: &mut [T]) {
        let (a, bounds) = (args[0], &args[1..]);
        let s = T::from_f64(self.stiffness);
        let n = T::from_f64(bounds.len() as f64);
        let max = |x: T, y: T| if y > x { y } else { x };
        let min = |x: T, y: T| if y < x { y } else { x };
        for (i, (o, &a)) in out.iter_mut().zip(a).enumerate() {
            let (mut hi, mut lo) = (bounds[0][i], bounds[0][i]);
            for b in &bounds[1..] {
                hi = max(hi, b[i]);
                lo = min(lo, b[i]);
            }
            if self.stiffness != 0.0 {
                let mut sum = T::ZERO;
                bounds.iter().for_each(|b| sum += b[i]);
                let mean = sum / n;
                let (mut sp, mut ln) = (hi, lo);
                for b in bounds {
                    let x = b[i];
                    if sp >= x && x >= mean {
                        sp = x;
                    }
                    if ln <= x && x <= mean {
                        ln = x;
                    }
                }
                hi = (T::ONE - s) * hi + s * sp;
                lo = (T::ONE - s) * lo + s * ln;
            }
            *o = min(max(a, lo), hi);
        }
    }
}
