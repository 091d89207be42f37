//! Add difference: `θ = A + α·(B − C)` (A1111 "add difference", sd-mecha `add_difference`, spec §1.3).

use crate::error::Result;
use crate::method::*;
use crate::real::Real;

/// The method's declaration: its name, inputs, parameters and documentation.
pub static INFO: MethodInfo = MethodInfo {
    name: "add_difference",
    origins: &[Origin::SdMecha, Origin::Supermerger],
    formula: "a + alpha * (b - c)",
    summary: "Adds the difference between b and c to a. A key a lacks is left to the key policy; \
              a key b or c lacks is taken from a unchanged.",
    slots: &[
        Slot {
            name: "a",
            kind: SlotKind::One,
            doc: "the model the difference is added to",
        },
        Slot {
            name: "b",
            kind: SlotKind::One,
            doc: "the model with the trait",
        },
        Slot {
            name: "c",
            kind: SlotKind::One,
            doc: "the model b was trained from",
        },
    ],
    params: &[ParamInfo::number(
        "alpha",
        1.0,
        "strength of the difference",
    )],
};

pub(crate) struct AddDifference {
    alpha: f64,
}

impl Pointwise for AddDifference {
    const INFO: &'static MethodInfo = &INFO;
    fn read(params: &mut Params) -> Result<Self> {
        Ok(AddDifference {
            alpha: params.number("alpha")?,
        })
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        keep_first(present)
    }
    fn merge<T: Real>(&self, args: &[&[T]], out: &mut [T]) {
        let alpha = T::from_f64(self.alpha);
        let (a, b, c) = (args[0], args[1], args[2]);
        for (((o, &a), &b), &c) in out.iter_mut().zip(a).zip(b).zip(c) {
            *o = a + alpha * (b - c);
        }
    }
}
