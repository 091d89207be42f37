//! Add: `a + α·b` where `b` is a delta: a LoRA file (read as the delta it encodes), a `subtract`
//! node, a task vector (sd-mecha's registered `add_difference`). Keys `b` lacks keep `a`.

use crate::error::Result;
use crate::method::*;
use crate::real::Real;
use std::ops::Range;

/// The method's declaration: its name, inputs, parameters and documentation.
pub static INFO: MethodInfo = MethodInfo {
    name: "add",
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

impl Add {
    pub(crate) fn new(mut params: Params) -> Result<Self> {
        let alpha = params.number("alpha")?;
        params.finish()?;
        Ok(Add { alpha })
    }
}

impl<T: Real> Method<T> for Add {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        if present[0] {
            OnMissing::PassThrough(0)
        } else {
            OnMissing::Absent
        }
    }
    fn begin_key(&self, _ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        Ok(Box::new(Sum {
            alpha: T::from_f64(self.alpha),
        }))
    }
}

struct Sum<T> {
    alpha: T,
}

impl<T: Real> KeyMerge<T> for Sum<T> {
    fn merge_chunk(&self, _range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        for ((o, &a), &b) in out.iter_mut().zip(args[0]).zip(args[1]) {
            *o = a + self.alpha * b;
        }
    }
}
