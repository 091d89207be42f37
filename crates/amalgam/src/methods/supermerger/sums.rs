//! supermerger's three-model merge modes (`smerge`, calcmode "normal", with its default
//! `uselerp`), torch's `lerp` included:
//!
//! - "Triple sum": `lerp(a, lerp(b, c, β/(α+β)), α+β)`, which is `(1−α−β)·a + α·b + β·c`; when
//!   `α + β = 0`, that sum written out (so `a + α·(b − c)`);
//! - "sum Twice": `lerp(lerp(a, b, α), c, β)`, a weighted sum of a and b, then of that and c.
//!
//! Element-wise: streams. A key b or c lacks is taken from a (supermerger skips it).

use super::torch_lerp;
use crate::error::Result;
use crate::method::*;
use crate::real::Real;

const SLOTS: &[Slot] = &[
    Slot {
        name: "a",
        kind: SlotKind::One,
        doc: "model A",
    },
    Slot {
        name: "b",
        kind: SlotKind::One,
        doc: "model B",
    },
    Slot {
        name: "c",
        kind: SlotKind::One,
        doc: "model C",
    },
];

const PARAMS: &[ParamInfo] = &[
    ParamInfo::number("alpha", 0.5, "weight of b (supermerger's alpha)"),
    ParamInfo::number("beta", 0.25, "weight of c (supermerger's beta)"),
];

/// `triple_sum`'s declaration.
pub static TRIPLE_SUM: MethodInfo = MethodInfo {
    name: "triple_sum",
    origins: &[Origin::Supermerger],
    formula:
        "lerp(a, lerp(b, c, beta/(alpha+beta)), alpha+beta) = (1-alpha-beta) a + alpha b + beta c",
    summary: "supermerger's Triple sum: a weighted sum of three models. A key b or c lacks is \
              taken from a.",
    slots: SLOTS,
    params: PARAMS,
};

/// `sum_twice`'s declaration.
pub static SUM_TWICE: MethodInfo = MethodInfo {
    name: "sum_twice",
    origins: &[Origin::Supermerger],
    formula: "lerp(lerp(a, b, alpha), c, beta)",
    summary: "supermerger's sum Twice: a weighted sum of a and b, then of that and c. A key b or \
              c lacks is taken from a.",
    slots: SLOTS,
    params: PARAMS,
};

/// `triple_sum` (`TWICE = false`) or `sum_twice` (`TWICE = true`).
pub(crate) struct Sums<const TWICE: bool> {
    alpha: f64,
    beta: f64,
}

/// `triple_sum`.
pub(crate) type TripleSum = Sums<false>;
/// `sum_twice`.
pub(crate) type SumTwice = Sums<true>;

impl<const TWICE: bool> Pointwise for Sums<TWICE> {
    const INFO: &'static MethodInfo = if TWICE { &SUM_TWICE } else { &TRIPLE_SUM };
    fn read(params: &mut Params) -> Result<Self> {
        Ok(Sums {
            alpha: params.number("alpha")?,
            beta: params.number("beta")?,
        })
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        keep_first(present)
    }
    fn merge<T: Real>(&self, args: &[&[T]], out: &mut [T]) {
        let (a, b, c) = (args[0], args[1], args[2]);
        let (alpha, beta) = (T::from_f64(self.alpha), T::from_f64(self.beta));
        let it = out.iter_mut().zip(a).zip(b).zip(c);
        if TWICE {
            for (((o, &a), &b), &c) in it {
                *o = torch_lerp(torch_lerp(a, b, alpha), c, beta);
            }
        } else if self.alpha + self.beta != 0.0 {
            let inner = T::from_f64(self.beta / (self.alpha + self.beta));
            let outer = T::from_f64(self.alpha + self.beta);
            for (((o, &a), &b), &c) in it {
                *o = torch_lerp(a, torch_lerp(b, c, inner), outer);
            }
        } else {
            let wa = T::from_f64(1.0 - self.alpha - self.beta);
            for (((o, &a), &b), &c) in it {
                *o = wa * a + alpha * b + beta * c;
            }
        }
    }
}
