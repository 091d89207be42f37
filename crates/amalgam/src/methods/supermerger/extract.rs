//! supermerger's "extract" (`extract_super(A, B, C, α, β, γ)`): the features of two
//! fine-tunes' deltas from a common base that are alike (β = 0) or unlike (β = 1). With
//! `x = b − a`, `y = c − a` and, per row along the last dimension (the whole tensor for a
//! vector), `s = clamp(cos(x, y), −1, 1)` (torch's `cosine_similarity`: `Σxy / (max(‖x‖, 1e-8) ·
//! max(‖y‖, 1e-8))`) and `d = ((s + 1)/2)^γ`:
//!
//! `a + lerp(x, y, α) · lerp(d, 1 − d, β)` (torch's `lerp`).
//!
//! One row at a time (a row unit: the sums and the output of a row in one chunk): streams. A
//! 0-d key is a (supermerger's cosine fails on it); a key b or c lacks is taken from a.

use super::torch_lerp;
use crate::error::Result;
use crate::method::*;
use crate::real::Real;
use std::ops::Range;

/// The method's declaration.
pub static INFO: MethodInfo = MethodInfo {
    name: "extract_features",
    origins: &[Origin::Supermerger],
    formula: "a + lerp(b - a, c - a, alpha) * lerp(d, 1 - d, beta), d = ((cos(b - a, c - a) + 1) \
              / 2)^gamma per row along the last dimension",
    summary: "supermerger's extract: of two fine-tunes b and c of a, the features that are alike \
              (beta = 0) or unlike (beta = 1), from b (alpha = 0) or c (alpha = 1).",
    slots: &[
        Slot {
            name: "a",
            kind: SlotKind::One,
            doc: "the common base",
        },
        Slot {
            name: "b",
            kind: SlotKind::One,
            doc: "the first fine-tune",
        },
        Slot {
            name: "c",
            kind: SlotKind::One,
            doc: "the second fine-tune",
        },
    ],
    params: &[
        ParamInfo::number_in(
            "alpha",
            0.5,
            Domain::UnitInterval,
            "features of b (0) or c (1), in [0, 1]",
        ),
        ParamInfo::number_in(
            "beta",
            0.25,
            Domain::UnitInterval,
            "alike features (0) or unlike (1), in [0, 1]",
        ),
        ParamInfo::number_in(
            "gamma",
            0.3,
            Domain::NonNegative,
            "selectivity (supermerger's option(gamma)): high values count only very similar \
             rows as alike",
        ),
    ],
};

pub(crate) struct Extract {
    alpha: f64,
    beta: f64,
    gamma: f64,
}

impl Extract {
    pub(crate) fn new(mut params: Params) -> Result<Self> {
        let alpha = params.number("alpha")?;
        let beta = params.number("beta")?;
        let gamma = params.number("gamma")?;
        params.finish()?;
        Ok(Extract { alpha, beta, gamma })
    }
}

impl<T: Real> Method<T> for Extract {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        keep_first(present)
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        Ok(Box::new(ExtractKey {
            alpha: self.alpha,
            beta: self.beta,
            gamma: self.gamma,
            row: ctx.shape.last().copied().filter(|&n| n > 0),
        }))
    }
}

struct ExtractKey {
    alpha: f64,
    beta: f64,
    gamma: f64,
    /// The last dimension's length; `None` for a 0-d (or empty) key, passed through.
    row: Option<usize>,
}

impl<T: Real> KeyMerge<T> for ExtractKey {
    fn unit(&self) -> Unit {
        match self.row {
            Some(len) => Unit {
                len,
                bytes: 3 * 8 * len as u64,
                what: "extract's row along the last dimension",
            },
            None => Unit::ELEMENT,
        }
    }
    fn merge_chunk(&self, _range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        let Some(len) = self.row else {
            out.copy_from_slice(&args[0][..out.len()]);
            return;
        };
        let (alpha, beta) = (T::from_f64(self.alpha), T::from_f64(self.beta));
        let rows = out
            .chunks_mut(len)
            .zip(args[0].chunks(len))
            .zip(args[1].chunks(len).zip(args[2].chunks(len)));
        for ((o, a), (b, c)) in rows {
            let (mut xx, mut yy, mut xy) = (0.0, 0.0, 0.0);
            for ((&a, &b), &c) in a.iter().zip(b).zip(c) {
                let (x, y) = ((b - a).to_f64(), (c - a).to_f64());
                xx += x * x;
                yy += y * y;
                xy += x * y;
            }
            let cos = (xy / (xx.sqrt().max(1e-8) * yy.sqrt().max(1e-8))).clamp(-1.0, 1.0);
            let d = T::from_f64(((cos + 1.0) / 2.0).powf(self.gamma));
            let m = torch_lerp(d, T::ONE - d, beta);
            for (((o, &a), &b), &c) in o.iter_mut().zip(a).zip(b).zip(c) {
                *o = a + torch_lerp(b - a, c - a, alpha) * m;
            }
        }
    }
}
