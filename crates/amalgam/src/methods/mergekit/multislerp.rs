//! mergekit's `multislerp` (`merge_methods/multislerp.py`): the weighted spherical mean of N
//! models, or of their task vectors from a base (added back), each whole tensor one vector.
//!
//! With `w` the weights (divided by their sum with `normalize_weights`), `n_t = ‖v_t‖`,
//! `u_t = v_t / (n_t + eps)`, `m = Σ w_t u_t`: mergekit projects the `u_t` on the tangent space at
//! `m̂ = m/‖m‖`, averages them there and maps back (`m̂ cos‖τ‖ + τ sin‖τ‖/‖τ‖`, eps added to
//! `‖τ‖`), and scales by `Σ w_t n_t`. The weighted tangent average `τ = m − ⟨m, m̂⟩ m̂` is zero
//! up to rounding, so the result is `m̂ · Σ w_t n_t` to the rounding: the direction of the
//! weighted mean of the unit vectors, at the weighted mean norm. Computed here in that closed form
//! from the models' Gram matrix (one `Sums` pass), the tangent term included as mergekit's
//! formula gives it: streams. Where `‖m‖ < eps`: two models give `w_0 v_0 + w_1 v_1`, more are
//! an error (antipodal models), as mergekit, except where every vector is zero (a tensor that no
//! model changed from the base, an empty tensor): the result is then zero (the base), where
//! mergekit raises that error too. One model is returned as it is.

use crate::error::{Error, Result};
use crate::method::*;
use crate::real::Real;
use std::ops::Range;

/// The method's declaration.
pub static INFO: MethodInfo = MethodInfo {
    name: "multislerp",
    origins: &[Origin::Mergekit],
    formula: "[base +] normalize(sum_t w_t v_t / ‖v_t‖) * sum_t w_t ‖v_t‖, v_t = models[t] \
              [- base]",
    summary: "mergekit's Multi-SLERP: the weighted mean direction of N models (or of their task \
              vectors from a base, with_base) on the unit sphere, at their weighted mean norm; \
              each whole tensor one vector. A key a model lacks has no value here.",
    slots: &[Slot {
        name: "models",
        kind: SlotKind::Many,
        doc: "the models (after the base with with_base)",
    }],
    params: &[
        ParamInfo::per_model(
            "weights",
            1.0,
            "one weight per model (mergekit's weight); with with_base the first (the base's) is \
             not used",
        ),
        ParamInfo::flag("normalize_weights", true, "divide the weights by their sum"),
        ParamInfo::number_in(
            "eps",
            1e-8,
            Domain::NonNegative,
            "added to the norms (mergekit's eps)",
        ),
        ParamInfo::flag(
            "with_base",
            false,
            "the first of models is the base: the others' task vectors are interpolated and the \
             base added back (mergekit with a base_model)",
        ),
    ],
};

pub(crate) struct Multislerp {
    weights: Vec<f64>,
    normalize: bool,
    eps: f64,
    with_base: bool,
}

impl Multislerp {
    pub(crate) fn new(mut params: Params) -> Result<Self> {
        let weights = params.per_model("weights")?;
        let normalize = params.boolean("normalize_weights")?;
        let eps = params.number("eps")?;
        let with_base = params.boolean("with_base")?;
        params.finish()?;
        Ok(Multislerp {
            weights,
            normalize,
            eps,
            with_base,
        })
    }
}

impl<T: Real> Method<T> for Multislerp {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        OnMissing::all_or_absent(present)
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        let skip = usize::from(self.with_base);
        let mut w: Vec<f64> = ctx.present[skip..]
            .iter()
            .map(|&i| self.weights[i])
            .collect();
        if self.normalize {
            let sum: f64 = w.iter().sum();
            w.iter_mut().for_each(|x| *x /= sum);
        }
        Ok(Box::new(MultislerpKey {
            key: ctx.key.to_string(),
            w,
            eps: self.eps,
            with_base: self.with_base,
            coefficients: Vec::new(),
        }))
    }
}

struct MultislerpKey<T> {
    key: String,
    /// The (normalised) weights of the interpolated models.
    w: Vec<f64>,
    eps: f64,
    with_base: bool,
    /// Per interpolated model, its factor in the output.
    coefficients: Vec<T>,
}

impl<T: Real> MultislerpKey<T> {
    /// Model `t`'s vector at element `i`.
    #[inline(always)]
    fn v(&self, args: &[&[T]], t: usize, i: usize) -> T {
        if self.with_base {
            args[t + 1][i] - args[0][i]
        } else {
            args[t][i]
        }
    }
}

impl<T: Real> KeyMerge<T> for MultislerpKey<T> {
    fn stat_passes(&self) -> usize {
        usize::from(self.w.len() > 1)
    }
    fn run_passes(&mut self, passes: &mut Passes<T>) -> Result<()> {
        let n = self.w.len();
        if n < 2 {
            return Ok(());
        }
        let with_base = self.with_base;
        let gram = passes
            .run(Sums::new(
                n * n,
                move |range: Range<usize>, args: &[&[T]]| {
                    let v = |t: usize, i: usize| {
                        if with_base {
                            (args[t + 1][i] - args[0][i]).to_f64()
                        } else {
                            args[t][i].to_f64()
                        }
                    };
                    let mut g = vec![0.0; n * n];
                    for i in 0..range.len() {
                        for a in 0..n {
                            let x = v(a, i);
                            for b in a..n {
                                g[a * n + b] += x * v(b, i);
                            }
                        }
                    }
                    g
                },
            ))?
            .total;
        let g = |a: usize, b: usize| gram[a.min(b) * n + a.max(b)];
        let (w, eps) = (&self.w, self.eps);
        let norms: Vec<f64> = (0..n).map(|t| g(t, t).sqrt()).collect();
        // m = Σ a_t v_t.
        let a: Vec<f64> = (0..n).map(|t| w[t] / (norms[t] + eps)).collect();
        let m2: f64 = (0..n)
            .flat_map(|s| (0..n).map(move |t| (s, t)))
            .map(|(s, t)| a[s] * a[t] * g(s, t))
            .sum();
        let mn = m2.max(0.0).sqrt();
        if norms.iter().all(|&x| x == 0.0) {
            // Every vector zero (frozen weights' task vectors, empty tensors): zero, where
            // mergekit raises its antipodal error.
            self.coefficients = vec![T::ZERO; n];
            return Ok(());
        }
        if mn < eps {
            if n == 2 {
                self.coefficients = w.iter().map(|&x| T::from_f64(x)).collect();
                return Ok(());
            }
            return Err(Error::method(
                "multislerp",
                format!(
                    "key `{}`: the weighted sum of the models' directions is zero (antipodal \
                     models whose weights balance out); try other weights",
                    self.key
                ),
            ));
        }
        // ⟨u_t, m̂⟩ and the tangent average τ = m − s m̂ = (1 − s/‖m‖) m, s = Σ w_t ⟨u_t, m̂⟩.
        let s: f64 = (0..n)
            .map(|t| {
                let dot: f64 = (0..n).map(|j| a[j] * g(t, j)).sum();
                w[t] * dot / (norms[t] + eps) / mn
            })
            .sum();
        let tau = (1.0 - s / mn).abs() * mn + eps;
        let kappa = tau.cos() / mn + (1.0 - s / mn) * tau.sin() / tau;
        let avg_norm: f64 = (0..n).map(|t| norms[t] * w[t]).sum();
        self.coefficients = a
            .iter()
            .map(|&at| T::from_f64(avg_norm * kappa * at))
            .collect();
        Ok(())
    }
    fn merge_chunk(&self, _range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        let skip = usize::from(self.with_base);
        if self.w.len() == 1 {
            // mergekit returns the one model as it is.
            out.copy_from_slice(&args[skip][..out.len()]);
            return;
        }
        for (i, o) in out.iter_mut().enumerate() {
            let mut v = T::ZERO;
            for (t, &c) in self.coefficients.iter().enumerate() {
                v += c * self.v(args, t, i);
            }
            *o = if self.with_base { args[0][i] + v } else { v };
        }
    }
}
