//! Task arithmetic (Ilharco et al. 2022; mergekit `task_arithmetic`, spec §1.4):
//! `θ = θ_0 + λ · Σ_t w_t (θ_t − θ_0)`, no normalisation.

use crate::error::Result;
use crate::method::*;
use crate::real::Real;
use std::ops::Range;

/// The method's declaration: its name, inputs, parameters and documentation.
pub static INFO: MethodInfo = MethodInfo {
    name: "task_arithmetic",
    origins: &[Origin::Paper, Origin::Mergekit],
    formula: "base + lambda * sum_t weights[t] * (models[t] - base)",
    summary: "Adds the weighted task vectors of N fine-tunes to their base. A fine-tune lacking a \
              key is left out of it; a key the base lacks is left to the key policy.",
    slots: Slot::BASE_AND_MODELS,
    params: &[
        ParamInfo::per_model(
            "weights",
            1.0,
            "one weight per fine-tune (a list), or one number for all",
        ),
        ParamInfo::number(
            "lambda",
            1.0,
            "global scale of the summed task vectors (negative forgets)",
        ),
    ],
};

pub(crate) struct TaskArithmetic {
    weights: Vec<f64>,
    lambda: f64,
}

impl TaskArithmetic {
    pub(crate) fn new(mut params: Params) -> Result<Self> {
        let weights = params.per_model("weights")?;
        let lambda = params.number("lambda")?;
        params.finish()?;
        Ok(TaskArithmetic { weights, lambda })
    }
}

impl<T: Real> Method<T> for TaskArithmetic {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        OnMissing::base_and_models(present)
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        // present[0] is the base (index 0); the rest index fine-tunes as 1 + t.
        Ok(Box::new(AddTaskVectors {
            weights: ctx.present[1..]
                .iter()
                .map(|&i| T::from_f64(self.weights[i - 1]))
                .collect(),
            lambda: T::from_f64(self.lambda),
        }))
    }
}

struct AddTaskVectors<T> {
    weights: Vec<T>,
    lambda: T,
}

impl<T: Real> KeyMerge<T> for AddTaskVectors<T> {
    fn merge_chunk(&self, _range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        let base = args[0];
        out.fill(T::ZERO);
        for (x, &w) in args[1..].iter().zip(&self.weights) {
            for ((o, &v), &b) in out.iter_mut().zip(x.iter()).zip(base) {
                *o += w * (v - b);
            }
        }
        for (o, &b) in out.iter_mut().zip(base) {
            *o = b + self.lambda * *o;
        }
    }
}
