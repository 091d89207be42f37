//! ISO-C, isotropic merging in common space (Marczak et al. 2025, spec §12):
//! `θ = θ_0 + α·σ̄·U Vᵀ` where `Σ_t τ_t = U diag(σ) Vᵀ` for matrix keys (the spectrum of the summed
//! task vectors flattened to its mean), and `θ = θ_0 + α·mean_t τ_t` for the others.

use super::shared::{base_plus_delta, exact_note, matrix_unit, Isotropic, Source, WholeMatrix};
use super::shared::{FACTORIZATION, HIGH_DIM, MEAN};
use super::spectrum::{matrix_shape, polar, spectrum_mean, Factorization};
use crate::error::Result;
use crate::method::*;
use crate::real::Real;
use std::ops::Range;

/// The method's declaration: its name, inputs, parameters and documentation.
pub static INFO: MethodInfo = MethodInfo {
    name: "iso_c",
    origins: &[Origin::Paper],
    formula: "base + alpha * mean(sigma) * U V^T, where U diag(sigma) V^T = sum_t (models[t] - base) \
              (matrix keys); base + alpha * mean_t (models[t] - base) (the others)",
    summary: "ISO-C (Marczak et al. 2025): the summed task vectors of each matrix with all their \
              singular values replaced by their mean, a flat spectrum. Needs each matrix whole (one \
              tensor in f64, whatever the number of models).",
    slots: Slot::BASE_AND_MODELS,
    params: PARAMS,
};

const PARAMS: &[ParamInfo] = &[
    ParamInfo::number(
        "alpha",
        1.0,
        "scale of the merged delta (the paper picks it in 0.1..3.0)",
    ),
    HIGH_DIM,
    MEAN,
    FACTORIZATION,
];

pub(crate) struct IsoC {
    alpha: f64,
    iso: Isotropic,
}

impl IsoC {
    pub(crate) fn new(mut params: Params) -> Result<Self> {
        let alpha = params.number("alpha")?;
        let iso = Isotropic::read(&mut params)?;
        params.finish()?;
        Ok(IsoC { alpha, iso })
    }
}

impl<T: Real> Method<T> for IsoC {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        OnMissing::base_and_models(present)
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        Ok(Box::new(IsoKey {
            alpha: self.alpha,
            iso: self.iso,
            key: ctx.key.to_string(),
            matrix: matrix_shape(ctx.key, ctx.shape, self.iso.high_dim),
            delta: Vec::new(),
            exact: false,
        }))
    }
}

struct IsoKey {
    alpha: f64,
    iso: Isotropic,
    key: String,
    /// `[rows, cols]` for a matrix key; `None` for the keys averaged.
    matrix: Option<(usize, usize)>,
    /// After the pass: `α·σ̄·U Vᵀ`, row-major (matrix keys).
    delta: Vec<f64>,
    /// Whether `factorization = auto` fell back to an exact SVD (an ill-conditioned matrix).
    exact: bool,
}

impl<T: Real> KeyMerge<T> for IsoKey {
    fn stat_passes(&self) -> usize {
        usize::from(self.matrix.is_some())
    }
    fn unit(&self) -> Unit {
        matrix_unit(self.matrix, "the whole matrix of ISO-C and its factors")
    }
    fn run_passes(&mut self, passes: &mut Passes<T>) -> Result<()> {
        let Some((rows, cols)) = self.matrix else {
            return Ok(());
        };
        let sum = passes.run(WholeMatrix::new(Source::Tasks))?.sum;
        let p = polar(&sum, rows, cols, self.iso.factorization, &self.key)?;
        drop(sum);
        self.exact = p.exact && self.iso.factorization == Factorization::Auto;
        let scale = self.alpha * spectrum_mean(&p.sigma, self.iso.mean);
        self.delta = p.factor;
        self.delta.iter_mut().for_each(|d| *d *= scale);
        Ok(())
    }
    fn notes(&self) -> Vec<String> {
        exact_note(self.exact)
    }
    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        base_plus_delta(
            self.matrix.map(|_| &self.delta[range]),
            self.alpha,
            args,
            out,
        )
    }
}
