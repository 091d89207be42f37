//! Uniform soup: `θ = (1/N) Σ θ_t` (sd-mecha `n_average`, spec §1.2).
//!
//! Evaluated as the running mean `m_t = m_{t−1} + (θ_t − m_{t−1}) / t`, in model order, as sd-mecha
//! does: a soup of identical models is that model bit for bit.

use crate::error::Result;
use crate::method::*;
use crate::real::Real;
use std::ops::Range;

/// The method's declaration: its name, inputs, parameters and documentation.
pub static INFO: MethodInfo = MethodInfo {
    name: "soup",
    origins: &[Origin::Paper, Origin::SdMecha],
    formula: "(1/N) * sum_t models[t]",
    summary: "Uniform average of N models (aliases: n_average, uniform_soup, average). A model \
              lacking a key is left out of that key's average.",
    slots: &[Slot {
        name: "models",
        kind: SlotKind::Many,
        doc: "the models to average",
    }],
    params: &[],
};

pub(crate) struct Soup;

impl Soup {
    pub(crate) fn new(params: Params) -> Result<Self> {
        params.finish()?;
        Ok(Soup)
    }
}

impl<T: Real> Method<T> for Soup {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
    fn on_missing(&self, _present: &[bool]) -> OnMissing {
        OnMissing::MergePresent
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        Ok(Box::new(RunningMean {
            inv_count: (1..=ctx.present.len())
                .map(|t| T::ONE / T::from_f64(t as f64))
                .collect(),
        }))
    }
}

struct RunningMean<T> {
    /// `1/t` for t = 1..=N.
    inv_count: Vec<T>,
}

impl<T: Real> KeyMerge<T> for RunningMean<T> {
    fn merge_chunk(&self, _range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        out.copy_from_slice(args[0]);
        for (x, &inv) in args.iter().zip(&self.inv_count).skip(1) {
            for (m, &v) in out.iter_mut().zip(x.iter()) {
                *m += (v - *m) * inv;
            }
        }
    }
}
