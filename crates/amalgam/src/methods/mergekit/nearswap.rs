//! mergekit's `nearswap` (`merge_methods/nearswap.py`, the QuartetAnemoi recipe): element by
//! element, `w = clamp(t / max(|base − model|, 1e-6), 0, 1)`, `w·model + (1 − w)·base`: where the
//! two are within `t` the model's value is taken, elsewhere the base moves towards it by `t`.

use crate::error::Result;
use crate::method::*;
use crate::real::Real;

/// The method's declaration.
pub static INFO: MethodInfo = MethodInfo {
    name: "nearswap",
    origins: &[Origin::Mergekit],
    formula: "w * model + (1 - w) * base, w = clamp(t / max(|base - model|, 1e-6), 0, 1)",
    summary: "mergekit's NearSwap: takes the model's value where it is within t of the base's, \
              and moves the base by t towards it elsewhere. A key the base lacks has no value \
              here; one the model lacks is the base's.",
    slots: &[
        Slot {
            name: "base",
            kind: SlotKind::One,
            doc: "the model kept where the two differ",
        },
        Slot {
            name: "model",
            kind: SlotKind::One,
            doc: "the model swapped in where the two are near",
        },
    ],
    params: &[ParamInfo::number(
        "t",
        0.0001,
        "the distance within which the model's value is taken (mergekit requires it; 0.0001 is \
         the QuartetAnemoi recipe's)",
    )],
};

pub(crate) struct Nearswap {
    t: f64,
}

impl Pointwise for Nearswap {
    const INFO: &'static MethodInfo = &INFO;
    fn read(params: &mut Params) -> Result<Self> {
        Ok(Nearswap {
            t: params.number("t")?,
        })
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        OnMissing::first_or_absent(present)
    }
    fn merge<T: Real>(&self, args: &[&[T]], out: &mut [T]) {
        let (a, b) = (args[0], args[1]);
        let t = T::from_f64(self.t);
        let floor = T::from_f64(1e-6);
        for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
            let d = (a - b).abs();
            let w = t / if d < floor { floor } else { d };
            // torch's clamp(min = 0, max = 1).
            let w = if w < T::ZERO {
                T::ZERO
            } else if w > T::ONE {
                T::ONE
            } else {
                w
            };
            *o = w * b + (T::ONE - w) * a;
        }
    }
}
