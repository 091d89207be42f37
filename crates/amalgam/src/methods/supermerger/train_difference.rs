//! supermerger's "trainDifference" (`traindiff`): add-difference with a per-element strength,
//!
//! `a + 1.8·α · (b − c) · |b − a| / (|b − c| + |b − a|)`, 0 where `|b − c| + |b − a| = 0`,
//!
//! which is sd-mecha's `add_difference(a, b, c, alpha = train_difference_mask(a, b, c, α))`
//! (the mask's `a` and `b` swapped: `|b − a|` is symmetric). supermerger leaves a key whose b and
//! c are equal as a, which the formula gives too. Element-wise: streams. A key b or c lacks is
//! taken from a.

use crate::error::Result;
use crate::method::*;
use crate::real::Real;

/// The method's declaration.
pub static INFO: MethodInfo = MethodInfo {
    name: "train_difference",
    origins: &[Origin::Supermerger],
    formula: "a + 1.8 alpha (b - c) |b - a| / (|b - c| + |b - a|), 0 where 0/0",
    summary: "supermerger's trainDifference: b − c added to a where b is far from a relative to \
              how far it is from c (a 'trained' difference). A key b or c lacks is taken from a.",
    slots: &[
        Slot {
            name: "a",
            kind: SlotKind::One,
            doc: "the model the difference is trained into",
        },
        Slot {
            name: "b",
            kind: SlotKind::One,
            doc: "the fine-tune",
        },
        Slot {
            name: "c",
            kind: SlotKind::One,
            doc: "b's base",
        },
    ],
    params: &[ParamInfo::number(
        "alpha",
        0.5,
        "strength (supermerger's alpha; the 1.8 is supermerger's)",
    )],
};

pub(crate) struct TrainDifference {
    alpha: f64,
}

impl Pointwise for TrainDifference {
    const INFO: &'static MethodInfo = &INFO;
    fn read(params: &mut Params) -> Result<Self> {
        Ok(TrainDifference {
            alpha: params.number("alpha")?,
        })
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        keep_first(present)
    }
    fn merge<T: Real>(&self, args: &[&[T]], out: &mut [T]) {
        let strength = T::from_f64(self.alpha * 1.8);
        for (((o, &a), &b), &c) in out.iter_mut().zip(args[0]).zip(args[1]).zip(args[2]) {
            let (d0, d1) = ((b - c).abs(), (b - a).abs());
            let sum = d0 + d1;
            // sign(b − c)·|scale|·|b − c|, as supermerger.
            let scale = if sum != T::ZERO { d1 / sum } else { T::ZERO };
            let signed = if b > c {
                scale
            } else if b < c {
                T::ZERO - scale
            } else {
                T::ZERO
            };
            *o = a + signed * d0 * strength;
        }
    }
}
