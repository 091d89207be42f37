//! Add: `a + α·b` where `b` is a delta: a LoRA file (read as the delta it encodes), a `subtract`
//! node, a task vector (sd-mecha's registered `add_difference`). Keys `b` lacks keep `a`.

use crate::error::Result;
use crate::method::*;
use crate::real::Real;

/// The method's declaration: its name, inputs, parameters and documentation.
pub static INFO: MethodInfo = MethodInfo {
    name: "add",
    origins: &[Origin::SdMecha],
    formula: "a + alpha * b",
    summary: "Adds a delta to a model, e.g. bakes a LoRA at a strength. Keys the delta lacks keep a's values.",
    slots: &[
        Slot {
            name: "a",
            kind: SlotKind::One,
            doc: "the model",
        },
        Slot {
            name: "b",
            kind: SlotKind::One,
            doc: "the delta (a LoRA file, a subtract node)",
        },
    ],
    params: &[ParamInfo::number("alpha", 1.0, "strength of the delta")],
};

pub(crate) struct Add {
    alpha: f64,
}

impl Pointwise for Add {
    const INFO: &'static MethodInfo = &INFO;
    fn read(params: &mut Params) -> Result<Self> {
        Ok(Add {
            alpha: params.number("alpha")?,
        })
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        keep_first(present)
    }
    fn merge<T: Real>(&self, args: &[&[T]], out: &mut [T]) {
        let alpha = T::from_f64(self.alpha);
        for ((o, &a), &b) in out.iter_mut().zip(args[0]).zip(args[1]) {
            *o = a + alpha * b;
        }
    }
}
