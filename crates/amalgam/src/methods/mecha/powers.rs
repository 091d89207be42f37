//! sd-mecha's methods through principal complex powers of real tensors (sd-mecha 1.1.8,
//! `merge_methods/linear.py`), the real part kept:
//!
//! - `geometric_sum`: `Re(a^(1−α) · b^α)`: a negative base has the argument π; a zero base gives
//!   0 (`cpow(0, y) = 0`), so the result is 0 where a or b is 0 (for 0 < α < 1);
//! - `multiply_quotient`: `ℓa = ln|a| − ln|c|`, `ℓb = ln|b| − ln|c|`, `τ = max(|ℓa|, |ℓb|)`,
//!   `α' = α · max(0, −nan_to_num(ℓa·ℓb / τ²))`, result `Re(a · (b/c)^α')`, and `a` where that
//!   is NaN. `α'` is 0 wherever a, b or c is 0 (the ratio is ±∞/∞ or 0/0 there), which leaves
//!   `a`; it is positive only where `|a|` and `|b|` lie on opposite sides of `|c|`.
//!
//! A complex power is `exp(y·ln r)·(cos yθ, sin yθ)` as `cpow` computes it; the real part of a
//! product `(x₁ + iy₁)(x₂ + iy₂)` is `x₁x₂ − y₁y₂`. Element-wise: streams.

use crate::error::Result;
use crate::method::*;
use crate::real::Real;

/// `geometric_sum`'s declaration.
pub static GEOMETRIC_SUM: MethodInfo = MethodInfo {
    name: "geometric_sum",
    origins: &[Origin::SdMecha],
    formula: "Re(a^(1 - alpha) * b^alpha), principal complex powers",
    summary: "sd-mecha's geometric interpolation of two models, element by element (a negative \
              value's power is complex; the real part is kept). A key one model lacks is taken \
              from a.",
    slots: &[
        Slot {
            name: "a",
            kind: SlotKind::One,
            doc: "the model at alpha = 0",
        },
        Slot {
            name: "b",
            kind: SlotKind::One,
            doc: "the model at alpha = 1",
        },
    ],
    params: &[ParamInfo::number(
        "alpha",
        0.5,
        "position between a (0) and b (1)",
    )],
};

/// `multiply_quotient`'s declaration.
pub static MULTIPLY_QUOTIENT: MethodInfo = MethodInfo {
    name: "multiply_quotient",
    origins: &[Origin::SdMecha],
    formula: "Re(a * (b / c)^alpha'), alpha' = alpha * max(0, -la * lb / max(|la|, |lb|)^2), \
              la = ln|a/c|, lb = ln|b/c|",
    summary:
        "sd-mecha's multiplicative add-difference: a times the ratio b / c to a power that is \
              positive only where a and b lie on opposite sides of c in log-magnitude; a where \
              that is undefined. A key b or c lacks is taken from a.",
    slots: &[
        Slot {
            name: "a",
            kind: SlotKind::One,
            doc: "the model the ratio multiplies",
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
    params: &[ParamInfo::number("alpha", 1.0, "strength of the ratio")],
};

/// The principal power `x^y` of a real `x` as a complex number `(re, im)`, as `cpow` computes it
/// (`exp(y·ln x)`), with `cpow(0, y) = 0`.
fn cpow(x: f64, y: f64) -> (f64, f64) {
    if x == 0.0 {
        return (0.0, 0.0);
    }
    let m = (y * x.abs().ln()).exp();
    if x > 0.0 {
        (m, 0.0)
    } else {
        let t = y * std::f64::consts::PI;
        (m * t.cos(), m * t.sin())
    }
}

pub(crate) struct GeometricSum {
    alpha: f64,
}

impl Pointwise for GeometricSum {
    const INFO: &'static MethodInfo = &GEOMETRIC_SUM;
    fn read(params: &mut Params) -> Result<Self> {
        Ok(GeometricSum {
            alpha: params.number("alpha")?,
        })
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        keep_first(present)
    }
    fn merge<T: Real>(&self, args: &[&[T]], out: &mut [T]) {
        let t = self.alpha;
        for ((o, &a), &b) in out.iter_mut().zip(args[0]).zip(args[1]) {
            let (x1, y1) = cpow(a.to_f64(), 1.0 - t);
            let (x2, y2) = cpow(b.to_f64(), t);
            *o = T::from_f64(x1 * x2 - y1 * y2);
        }
    }
}

pub(crate) struct MultiplyQuotient {
    alpha: f64,
}

impl Pointwise for MultiplyQuotient {
    const INFO: &'static MethodInfo = &MULTIPLY_QUOTIENT;
    fn read(params: &mut Params) -> Result<Self> {
        Ok(MultiplyQuotient {
            alpha: params.number("alpha")?,
        })
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        keep_first(present)
    }
    fn merge<T: Real>(&self, args: &[&[T]], out: &mut [T]) {
        for (((o, &a), &b), &c) in out.iter_mut().zip(args[0]).zip(args[1]).zip(args[2]) {
            let (a64, b, c) = (a.to_f64(), b.to_f64(), c.to_f64());
            let lc = c.abs().ln();
            let (la, lb) = (a64.abs().ln() - lc, b.abs().ln() - lc);
            let tau = la.abs().max(lb.abs());
            let r = la * lb / (tau * tau);
            let r = if r.is_nan() { 0.0 } else { r };
            let alpha = self.alpha * (-r).max(0.0);
            if alpha == 0.0 {
                // (b/c)^0 = 1 where b/c is finite; NaN (c = 0) also leaves a.
                *o = a;
                continue;
            }
            // b/c as complex division by (c, 0) computes it: b · (1/c).
            let (re, im) = cpow(b * (1.0 / c), alpha);
            let v = a64 * re - 0.0 * im;
            *o = if v.is_nan() || im.is_nan() {
                a
            } else {
                T::from_f64(v)
            };
        }
    }
}
