//! Subtract: `δ = A − B`, e.g. a task vector to feed another node (sd-mecha `subtract`).

use crate::error::Result;
use crate::method::*;
use crate::real::Real;

/// The method's declaration: its name, inputs, parameters and documentation.
pub static INFO: MethodInfo = MethodInfo {
    name: "subtract",
    origins: &[Origin::SdMecha],
    formula: "a - b",
    summary:
        "The difference of two models (a delta). A key either lacks is left to the key policy.",
    slots: &[
        Slot {
            name: "a",
            kind: SlotKind::One,
            doc: "minuend",
        },
        Slot {
            name: "b",
            kind: SlotKind::One,
            doc: "subtrahend",
        },
    ],
    params: &[],
};

pub(crate) struct Subtract;

impl Pointwise for Subtract {
    const INFO: &'static MethodInfo = &INFO;
    fn read(_params: &mut Params) -> Result<Self> {
        Ok(Subtract)
    }
    fn on_missing(&self, _present: &[bool]) -> OnMissing {
        OnMissing::Absent
    }
    fn merge<T: Real>(&self, args: &[&[T]], out: &mut [T]) {
        for ((o, &a), &b) in out.iter_mut().zip(args[0]).zip(args[1]) {
            *o = a - b;
        }
    }
}
