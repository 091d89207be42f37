//! sd-mecha's masks: per-element strengths (its `param` merge space), meant as the `alpha` of an
//! add-difference (Supermerger's "train difference"). sd-mecha 1.1.8, `merge_methods/linear.py`:
//!
//! - `train_difference_mask`: `α · 1.8 · nan_to_num(|b − a| / (|b − a| + |b − c|))`;
//! - `add_opposite_mask`: `α · 2 · nan_to_num(|a − b| / (|a − b| + |a + b − 2c|))`;
//! - `add_strict_opposite_mask`: `τ = max(|a − c|, |b − c|)`,
//!   `α · max(0, nan_to_num((c − a)(b − c) / τ²)) · 2`.
//!
//! `nan_to_num` turns the 0/0 of equal inputs into 0 (the ratios are bounded, so no infinity
//! arises from finite inputs). Element-wise: streams. A key one input lacks has no value here.

use crate::error::Result;
use crate::method::*;
use crate::real::Real;

const SLOTS: &[Slot] = &[
    Slot {
        name: "a",
        kind: SlotKind::One,
        doc: "the first model",
    },
    Slot {
        name: "b",
        kind: SlotKind::One,
        doc: "the second model",
    },
    Slot {
        name: "c",
        kind: SlotKind::One,
        doc: "the model a and b are compared from",
    },
];

const ALPHA: &[ParamInfo] = &[ParamInfo::number("alpha", 1.0, "scale of the mask")];

/// `train_difference_mask`'s declaration.
pub static TRAIN_DIFFERENCE_MASK: MethodInfo = MethodInfo {
    name: "train_difference_mask",
    origins: &[Origin::SdMecha, Origin::Supermerger],
    formula: "alpha * 1.8 * |b - a| / (|b - a| + |b - c|), 0 where 0/0",
    summary: "sd-mecha's train-difference mask: per element, how far b moved from a relative to \
              how far it moved from c (a strength for an add-difference). All inputs need the key.",
    slots: SLOTS,
    params: ALPHA,
};

/// `add_opposite_mask`'s declaration.
pub static ADD_OPPOSITE_MASK: MethodInfo = MethodInfo {
    name: "add_opposite_mask",
    origins: &[Origin::SdMecha],
    formula: "alpha * 2 * |a - b| / (|a - b| + |a + b - 2c|), 0 where 0/0",
    summary: "sd-mecha's opposite mask: per element, how much a and b moved in opposite \
              directions from c. All inputs need the key.",
    slots: SLOTS,
    params: ALPHA,
};

/// `add_strict_opposite_mask`'s declaration.
pub static ADD_STRICT_OPPOSITE_MASK: MethodInfo = MethodInfo {
    name: "add_strict_opposite_mask",
    origins: &[Origin::SdMecha],
    formula: "alpha * 2 * max(0, (c - a)(b - c) / max(|a - c|, |b - c|)^2), 0 where 0/0",
    summary: "sd-mecha's strict opposite mask: per element, nonzero only where a and b moved \
              from c in opposite directions. All inputs need the key.",
    slots: SLOTS,
    params: ALPHA,
};

/// Which mask.
#[derive(Clone, Copy)]
enum Kind {
    TrainDifference,
    Opposite,
    StrictOpposite,
}

/// One of the masks, with its `alpha`.
pub(crate) struct Mask<const K: u8> {
    alpha: f64,
}

/// `train_difference_mask`.
pub(crate) type TrainDifferenceMask = Mask<0>;
/// `add_opposite_mask`.
pub(crate) type AddOppositeMask = Mask<1>;
/// `add_strict_opposite_mask`.
pub(crate) type AddStrictOppositeMask = Mask<2>;

impl<const K: u8> Mask<K> {
    const KIND: Kind = match K {
        0 => Kind::TrainDifference,
        1 => Kind::Opposite,
        _ => Kind::StrictOpposite,
    };
}

/// NaN → 0 (`torch.nan_to_num(x, nan=0)`; the ratios here are finite otherwise).
fn nan_to_zero<T: Real>(x: T) -> T {
    if x.partial_cmp(&x).is_none() {
        T::ZERO
    } else {
        x
    }
}

impl<const K: u8> Pointwise for Mask<K> {
    const INFO: &'static MethodInfo = match K {
        0 => &TRAIN_DIFFERENCE_MASK,
        1 => &ADD_OPPOSITE_MASK,
        _ => &ADD_STRICT_OPPOSITE_MASK,
    };
    fn read(params: &mut Params) -> Result<Self> {
        Ok(Mask {
            alpha: params.number("alpha")?,
        })
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        OnMissing::all_or_absent(present)
    }
    fn merge<T: Real>(&self, args: &[&[T]], out: &mut [T]) {
        let alpha = T::from_f64(self.alpha);
        let (two, k18) = (T::from_f64(2.0), T::from_f64(1.8));
        let (a, b, c) = (args[0], args[1], args[2]);
        for (((o, &a), &b), &c) in out.iter_mut().zip(a).zip(b).zip(c) {
            *o = match Self::KIND {
                Kind::TrainDifference => {
                    let (ba, bc) = ((b - a).abs(), (b - c).abs());
                    alpha * k18 * nan_to_zero(ba / (ba + bc))
                }
                Kind::Opposite => {
                    let ab = (a - b).abs();
                    let sum = (a + b - two * c).abs();
                    alpha * two * nan_to_zero(ab / (ab + sum))
                }
                Kind::StrictOpposite => {
                    let (ac, bc) = ((a - c).abs(), (b - c).abs());
                    let tau = if ac >= bc { ac } else { bc };
                    let r = nan_to_zero((c - a) * (b - c) / (tau * tau));
                    alpha * (if r > T::ZERO { r } else { T::ZERO }) * two
                }
            };
        }
    }
}
