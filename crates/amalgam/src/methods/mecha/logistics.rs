//! sd-mecha's plumbing methods (1.1.8, `merge_methods/logistics.py`) that are nodes here:
//!
//! - `fallback(a, default)`: each key from a where a has it, else from default (sd-mecha maps
//!   every key either has). Both present: a.
//!
//! The others are not nodes (see [`REFUSED`](crate::methods::REFUSED) for why): `stack` makes a
//! tensor with an extra dimension that only sd-mecha's own methods read, `pick_component` is a
//! recipe's component routing here. `exchange_ema` and `balance_attention` read other keys than
//! the one they write: they are whole-model methods ([`structural`](crate::methods::structural)).

use crate::error::Result;
use crate::method::*;
use crate::real::Real;
use std::ops::Range;

/// `fallback`'s declaration.
pub static FALLBACK: MethodInfo = MethodInfo {
    name: "fallback",
    origins: &[Origin::SdMecha],
    formula: "a where a has the key, else default",
    summary: "sd-mecha's fallback: each key from a, or from default where a lacks it (a key \
              either has is in the result). Where both have it, default is read and not used.",
    slots: &[
        Slot {
            name: "a",
            kind: SlotKind::One,
            doc: "the model whose keys are taken first",
        },
        Slot {
            name: "default",
            kind: SlotKind::One,
            doc: "the model giving the keys a lacks",
        },
    ],
    params: &[],
};

pub(crate) struct Fallback;

impl Fallback {
    pub(crate) fn new(params: Params) -> Result<Self> {
        params.finish()?;
        Ok(Fallback)
    }
}

impl<T: Real> Method<T> for Fallback {
    fn info(&self) -> &'static MethodInfo {
        &FALLBACK
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        if present[0] {
            OnMissing::PassThrough(0)
        } else {
            OnMissing::PassThrough(1)
        }
    }
    fn begin_key(&self, _ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        Ok(Box::new(First))
    }
}

struct First;

impl<T: Real> KeyMerge<T> for First {
    fn merge_chunk(&self, _range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        out.copy_from_slice(&args[0][..out.len()]);
    }
}
