//! sd-mecha's orthogonal projections (1.1.8, `merge_methods/linear.py` and `wrappers.py`), each
//! whole tensor one vector:
//!
//! - `perpendicular_component(a, b)`: `b − a · Σ (a/‖a‖)(b/‖a‖)`, the part of b orthogonal to a;
//!   zeros where that is NaN anywhere (a zero `a`, a NaN input);
//! - `add_perpendicular(a, b, c)`: sd-mecha's wrapper `a + α · perpendicular_component(a − c,
//!   b − c)`: the part of b's difference from c that is orthogonal to a's, added to a.
//!
//! One `Sums` pass for `‖x‖²` and `⟨x, y⟩`, then an output pass: streams, memory independent of
//! the tensor's size.

use crate::error::Result;
use crate::method::*;
use crate::real::Real;
use std::ops::Range;

/// `perpendicular_component`'s declaration.
pub static PERPENDICULAR_COMPONENT: MethodInfo = MethodInfo {
    name: "perpendicular_component",
    origins: &[Origin::SdMecha],
    formula: "b - a * <a, b> / |a|^2, 0 where undefined",
    summary: "sd-mecha's perpendicular component: the part of b orthogonal to a, each whole \
              tensor one vector (zeros where a is zero). A key a or b lacks is taken from a.",
    slots: &[
        Slot {
            name: "a",
            kind: SlotKind::One,
            doc: "the direction projected out",
        },
        Slot {
            name: "b",
            kind: SlotKind::One,
            doc: "the tensor projected",
        },
    ],
    params: &[],
};

/// `add_perpendicular`'s declaration.
pub static ADD_PERPENDICULAR: MethodInfo = MethodInfo {
    name: "add_perpendicular",
    origins: &[Origin::SdMecha],
    formula: "a + alpha * perp(a - c, b - c), perp(x, y) = y - x * <x, y> / |x|^2",
    summary: "sd-mecha's add_perpendicular: adds to a the part of b's difference from c that is \
              orthogonal to a's difference from c (each whole tensor one vector). A key b or c \
              lacks is taken from a.",
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
            doc: "the model a and b were trained from",
        },
    ],
    params: &[ParamInfo::number(
        "alpha",
        1.0,
        "strength of the perpendicular difference",
    )],
};

/// `perpendicular_component` (`add = None`) or `add_perpendicular` (`add = Some(alpha)`).
pub(crate) struct Perpendicular {
    add: Option<f64>,
}

impl Perpendicular {
    pub(crate) fn component(params: Params) -> Result<Self> {
        params.finish()?;
        Ok(Perpendicular { add: None })
    }
    pub(crate) fn add(mut params: Params) -> Result<Self> {
        let alpha = params.number("alpha")?;
        params.finish()?;
        Ok(Perpendicular { add: Some(alpha) })
    }
}

impl<T: Real> Method<T> for Perpendicular {
    fn info(&self) -> &'static MethodInfo {
        match self.add {
            None => &PERPENDICULAR_COMPONENT,
            Some(_) => &ADD_PERPENDICULAR,
        }
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        keep_first(present)
    }
    fn begin_key(&self, _ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        Ok(Box::new(PerpKey {
            add: self.add.map(T::from_f64),
            coefficient: None,
        }))
    }
}

struct PerpKey<T> {
    add: Option<T>,
    /// `⟨x, y⟩ / ‖x‖²`, or `None` where the projection is NaN (the output is then zeros).
    coefficient: Option<T>,
}

/// The projected pair `(x, y)` at element `i`: `(a, b)`, or `(a − c, b − c)` with `add`.
fn pair<T: Real>(add: bool, args: &[&[T]], i: usize) -> (T, T) {
    if add {
        (args[0][i] - args[2][i], args[1][i] - args[2][i])
    } else {
        (args[0][i], args[1][i])
    }
}

impl<T: Real> KeyMerge<T> for PerpKey<T> {
    fn stat_passes(&self) -> usize {
        1
    }
    fn run_passes(&mut self, passes: &mut Passes<T>) -> Result<()> {
        let add = self.add.is_some();
        let sums = passes.run(Sums::new(2, move |range: Range<usize>, args: &[&[T]]| {
            let (mut xx, mut xy) = (0.0, 0.0);
            for (x, y) in (0..range.len()).map(|i| pair(add, args, i)) {
                let (x, y) = (x.to_f64(), y.to_f64());
                xx += x * x;
                xy += x * y;
            }
            vec![xx, xy]
        }))?;
        // sd-mecha sums (x/‖x‖)(y/‖x‖): the same as ⟨x, y⟩/‖x‖² up to rounding.
        let k = sums.total[1] / sums.total[0];
        self.coefficient = k.is_finite().then(|| T::from_f64(k));
        Ok(())
    }
    fn merge_chunk(&self, _range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        for (i, o) in out.iter_mut().enumerate() {
            let perp = match self.coefficient {
                Some(k) => {
                    let (x, y) = pair(self.add.is_some(), args, i);
                    y - x * k
                }
                None => T::ZERO,
            };
            *o = match self.add {
                None => perp,
                Some(alpha) => args[0][i] + perp * alpha,
            };
        }
    }
}
