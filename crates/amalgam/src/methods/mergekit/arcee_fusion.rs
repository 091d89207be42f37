//! mergekit's `arcee_fusion` (`merge_methods/arcee_fusion.py`): the model's deltas from the base
//! where they matter most. Importance `imp = |model − base| · KL_row`, `KL_row = Σ p log(p/q)`
//! along the last dimension with `p = softmax(model) + 1e-8`, `q = softmax(base) + 1e-8` (one
//! value per row, a vector being one row); threshold `median + 1.5·(q3 − q1)` of `imp`, the
//! quantiles taken as `sorted[⌊q·(n − 1)⌋]`; `θ = base + (model − base)·[imp ≥ threshold]`.
//!
//! The quantiles need the whole tensor: each key is merged whole (both tensors in memory).
//! mergekit takes them from a random sample of 10^6 elements (with replacement) when a tensor has
//! more; here they are always exact, so on such tensors amalgam's threshold is the one mergekit's
//! sample estimates.

use crate::error::Result;
use crate::method::*;
use crate::real::Real;
use std::ops::Range;

/// The method's declaration.
pub static INFO: MethodInfo = MethodInfo {
    name: "arcee_fusion",
    origins: &[Origin::Mergekit],
    formula: "base + (model - base) * [imp >= median + 1.5 IQR of imp], imp = |model - base| * \
              KL(softmax(model) || softmax(base)) per row",
    summary: "mergekit's Arcee Fusion: keeps the model's deltas whose importance (size times the \
              row's softmax KL divergence) is an upper outlier (above median + 1.5 IQR). Each key \
              is merged whole. A key the base lacks has no value here; one the model lacks is \
              the base's.",
    slots: &[
        Slot {
            name: "base",
            kind: SlotKind::One,
            doc: "the model the deltas are added to",
        },
        Slot {
            name: "model",
            kind: SlotKind::One,
            doc: "the model whose important deltas are taken",
        },
    ],
    params: &[],
};

pub(crate) struct ArceeFusion;

impl ArceeFusion {
    pub(crate) fn new(params: Params) -> Result<Self> {
        params.finish()?;
        Ok(ArceeFusion)
    }
}

impl<T: Real> Method<T> for ArceeFusion {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        OnMissing::first_or_absent(present)
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        let numel = ctx.numel();
        Ok(Box::new(FusionKey {
            numel,
            row: ctx.shape.last().copied().unwrap_or(1).max(1),
        }))
    }
}

struct FusionKey {
    numel: usize,
    /// The length of a row of the last dimension (the softmax's).
    row: usize,
}

/// `Σ p log(p/q)`, `p`, `q` the softmaxes of `x`, `y` plus 1e-8.
fn kl(x: &[f64], y: &[f64]) -> f64 {
    let softmax = |v: &[f64]| -> Vec<f64> {
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = v.iter().map(|a| (a - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        e.iter().map(|a| a / sum + 1e-8).collect()
    };
    let (p, q) = (softmax(x), softmax(y));
    p.iter().zip(&q).map(|(p, q)| p * (p / q).ln()).sum()
}

impl<T: Real> KeyMerge<T> for FusionKey {
    fn unit(&self) -> Unit {
        Unit {
            len: self.numel.max(1),
            bytes: (self.numel * (2 * std::mem::size_of::<T>() + 48)) as u64,
            what: "arcee_fusion's quantiles (the whole tensor of both models)",
        }
    }
    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        let len = range.len();
        let (base, model) = (args[0], args[1]);
        let b: Vec<f64> = base[..len].iter().map(|v| v.to_f64()).collect();
        let m: Vec<f64> = model[..len].iter().map(|v| v.to_f64()).collect();
        let mut imp = vec![0.0; len];
        for r in (0..len).step_by(self.row) {
            let rows = r..(r + self.row).min(len);
            let k = kl(&m[rows.clone()], &b[rows.clone()]);
            for i in rows {
                imp[i] = (m[i] - b[i]).abs() * k;
            }
        }
        let mut sorted = imp.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| sorted[(q * (len - 1) as f64) as usize];
        let threshold = at(0.5) + 1.5 * (at(0.75) - at(0.25));
        for (i, o) in out.iter_mut().enumerate() {
            *o = if imp[i] >= threshold {
                base[i] + (model[i] - base[i])
            } else {
                base[i]
            };
        }
    }
}
