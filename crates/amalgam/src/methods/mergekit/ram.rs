//! mergekit's Reinforced Agent Merging (`merge_methods/ram.py`, arXiv 2601.13572). Per element,
//! the task vectors `τ_t = θ_t − θ_0` with `|τ_t| > epsilon` are active; `c` counts them.
//!
//! - `ram`: `θ_0 + Σ_t active_t · τ_t · ([c = 1] + [c > 1] / c)`: a delta only one model has is
//!   kept whole, shared ones are averaged over the models that have them. Element-wise.
//! - `ramplus_tl` (tensor-local RAM+): per model and tensor, `ρ_t = shared_t / max(unique_t,
//!   epsilon)` (counts of its active elements shared with others and its own), `λ_t = 1 + r ·
//!   clamp(ρ_t, 0, alpha)`, and its unique deltas are multiplied by `λ_t`; `ρ_t` and `λ_t` are
//!   computed in f32, as mergekit's integer counts make them. One `Sums` pass counts them:
//!   streams.

use crate::error::Result;
use crate::method::*;
use crate::real::Real;
use std::ops::Range;

const EPSILON: ParamInfo = ParamInfo::number_in(
    "epsilon",
    1e-5,
    Domain::NonNegative,
    "a delta counts as active where |delta| > epsilon",
);

/// `ram`'s declaration.
pub static RAM: MethodInfo = MethodInfo {
    name: "ram",
    origins: &[Origin::Mergekit],
    formula: "base + sum_t active_t * (models[t] - base) * ([c = 1] + [c > 1] / c), \
              active_t = |models[t] - base| > epsilon, c = sum_t active_t",
    summary: "mergekit's Reinforced Agent Merging: a delta only one model has is kept whole, \
              deltas several models have are averaged over them. A fine-tune lacking a key is \
              left out of it; a key the base lacks is left to the key policy.",
    slots: Slot::BASE_AND_MODELS,
    params: &[EPSILON],
};

/// `ramplus_tl`'s declaration.
pub static RAMPLUS_TL: MethodInfo = MethodInfo {
    name: "ramplus_tl",
    origins: &[Origin::Mergekit],
    formula: "ram with model t's unique deltas times 1 + r * clamp(shared_t / max(unique_t, \
              epsilon), 0, alpha), counts per tensor",
    summary: "mergekit's tensor-local RAM+: RAM whose unique deltas are boosted per model by the \
              share of its active elements that overlap others (counted per tensor). A \
              fine-tune lacking a key is left out of it; a key the base lacks is left to the key \
              policy.",
    slots: Slot::BASE_AND_MODELS,
    params: &[
        ParamInfo::number("r", 0.1, "strength of the boost of the unique deltas"),
        ParamInfo::number("alpha", 0.2, "upper clamp of the shared / unique ratio"),
        EPSILON,
    ],
};

/// Whether `τ = x − b` is active, as a 0/1 factor.
#[inline(always)]
fn active<T: Real>(tau: T, eps: T) -> bool {
    tau.abs() > eps
}

pub(crate) struct Ram {
    epsilon: f64,
    /// `(r, alpha)` for `ramplus_tl`.
    plus: Option<(f64, f64)>,
}

impl Ram {
    pub(crate) fn new(mut params: Params) -> Result<Self> {
        let epsilon = params.number("epsilon")?;
        params.finish()?;
        Ok(Ram {
            epsilon,
            plus: None,
        })
    }
    pub(crate) fn plus(mut params: Params) -> Result<Self> {
        let r = params.number("r")?;
        let alpha = params.number("alpha")?;
        let epsilon = params.number("epsilon")?;
        params.finish()?;
        Ok(Ram {
            epsilon,
            plus: Some((r, alpha)),
        })
    }
}

impl<T: Real> Method<T> for Ram {
    fn info(&self) -> &'static MethodInfo {
        if self.plus.is_some() {
            &RAMPLUS_TL
        } else {
            &RAM
        }
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        OnMissing::base_and_models(present)
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        Ok(Box::new(RamKey {
            epsilon: self.epsilon,
            plus: self.plus,
            n: ctx.present.len() - 1,
            boost: Vec::new(),
        }))
    }
}

struct RamKey<T> {
    epsilon: f64,
    plus: Option<(f64, f64)>,
    n: usize,
    /// `ramplus_tl`: per model, the factor of its unique deltas (empty: 1).
    boost: Vec<T>,
}

impl<T: Real> KeyMerge<T> for RamKey<T> {
    fn stat_passes(&self) -> usize {
        usize::from(self.plus.is_some())
    }
    fn run_passes(&mut self, passes: &mut Passes<T>) -> Result<()> {
        let Some((r, alpha)) = self.plus else {
            return Ok(());
        };
        let (n, eps) = (self.n, T::from_f64(self.epsilon));
        // Per model: [shared, unique] counts of its active elements.
        let sums = passes.run(Sums::new(
            2 * n,
            move |range: Range<usize>, args: &[&[T]]| {
                let mut counts = vec![0.0; 2 * n];
                for i in 0..range.len() {
                    let b = args[0][i];
                    let c = args[1..].iter().filter(|x| active(x[i] - b, eps)).count();
                    for (t, x) in args[1..].iter().enumerate() {
                        if active(x[i] - b, eps) {
                            counts[2 * t + usize::from(c == 1)] += 1.0;
                        }
                    }
                }
                counts
            },
        ))?;
        self.boost = sums
            .total
            .chunks(2)
            .map(|c| {
                // mergekit's counts are integer tensors, so ρ and λ are float32 (torch's default
                // dtype) whatever the tensor's: computed in f32 here too.
                let rho = c[0] as f32 / (c[1] as f32).max(self.epsilon as f32);
                let lambda = 1.0f32 + r as f32 * rho.clamp(0.0, alpha as f32);
                T::from_f64(f64::from(lambda))
            })
            .collect();
        Ok(())
    }
    fn merge_chunk(&self, _range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        let eps = T::from_f64(self.epsilon);
        let (base, models) = (args[0], &args[1..]);
        // A block of elements at a time, model by model (loops that vectorise): first each
        // element's count of active deltas, then its sum in model order, each active delta
        // whole (times its boost) where it is the only one, else divided by the count.
        const W: usize = 256;
        let (mut count, mut sum) = ([T::ZERO; W], [T::ZERO; W]);
        for at in (0..out.len()).step_by(W) {
            let len = W.min(out.len() - at);
            let b = &base[at..at + len];
            let (count, sum) = (&mut count[..len], &mut sum[..len]);
            count.fill(T::ZERO);
            sum.fill(T::ZERO);
            for x in models {
                for ((c, &x), &b) in count.iter_mut().zip(&x[at..at + len]).zip(b) {
                    *c += if active(x - b, eps) { T::ONE } else { T::ZERO };
                }
            }
            for (t, x) in models.iter().enumerate() {
                let boost = self.boost.get(t).copied().unwrap_or(T::ONE);
                for (((s, &c), &x), &b) in sum.iter_mut().zip(&*count).zip(&x[at..at + len]).zip(b)
                {
                    let tau = x - b;
                    // A select, not a product: an inactive delta adds nothing, even a NaN.
                    *s += if !active(tau, eps) {
                        T::ZERO
                    } else if c == T::ONE {
                        tau * boost
                    } else {
                        tau / c
                    };
                }
            }
            for ((o, &s), &b) in out[at..at + len].iter_mut().zip(&*sum).zip(b) {
                *o = b + s;
            }
        }
    }
}
