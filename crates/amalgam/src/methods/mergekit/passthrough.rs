//! mergekit's `passthrough` (`merge_methods/passthrough.py`): its single input, times `scale`
//! when given. mergekit uses it for frankenmerges, whose layer slicing is its planner's (not a
//! method's); here it is the per-tensor method.

use crate::error::Result;
use crate::method::*;
use crate::real::Real;

/// The method's declaration.
pub static INFO: MethodInfo = MethodInfo {
    name: "passthrough",
    origins: &[Origin::Mergekit],
    formula: "a (times scale when given)",
    summary: "mergekit's passthrough: copies its single input, optionally scaled. A key a lacks \
              has no value here.",
    slots: &[Slot {
        name: "a",
        kind: SlotKind::One,
        doc: "the model copied",
    }],
    params: &[ParamInfo::optional(
        "scale",
        Domain::Any,
        "factor the input is multiplied by (mergekit's scale); not set: the input's bits",
    )],
};

pub(crate) struct Passthrough {
    scale: Option<f64>,
}

impl Pointwise for Passthrough {
    const INFO: &'static MethodInfo = &INFO;
    fn read(params: &mut Params) -> Result<Self> {
        Ok(Passthrough {
            scale: params.optional_number("scale")?,
        })
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        keep_first(present)
    }
    fn merge<T: Real>(&self, args: &[&[T]], out: &mut [T]) {
        match self.scale {
            None => out.copy_from_slice(&args[0][..out.len()]),
            Some(s) => {
                let s = T::from_f64(s);
                for (o, &a) in out.iter_mut().zip(args[0]) {
                    *o = a * s;
                }
            }
        }
    }
}
