//! ISO-C, isotropic merging in common space (Marczak et al. 2025, spec §12):
//! `θ = θ_0 + α·σ̄·U Vᵀ` where `Σ_t τ_t = U diag(σ) Vᵀ` for matrix keys (the spectrum of the summed
//! task vectors flattened to its mean), and `θ = θ_0 + α·mean_t τ_t` for the others.

use super::spectrum::{matrix_shape, polar, polar_bytes, spectrum_mean};
use super::spectrum::{Factorization, HighDim, SpectrumMean, GRAM_MIN_RATIO};
use crate::error::Result;
use crate::method::*;
use crate::real::Real;
use std::ops::Range;

/// The method's declaration: its name, inputs, parameters and documentation.
pub static INFO: MethodInfo = MethodInfo {
    name: "iso_c",
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

/// `high_dim`, declared once for the SVD family.
pub(crate) const HIGH_DIM: ParamInfo = ParamInfo::choice(
    "high_dim",
    &["vector", "flatten"],
    "vector",
    "keys of more than 2 dimensions: `vector` treats them as 1-D keys (the paper); `flatten` as \
     the matrix [out, rest] (the fork's `apply_high_dim`)",
);

/// `mean`, declared once for the SVD family.
pub(crate) const MEAN: ParamInfo = ParamInfo::choice(
    "mean",
    &["arithmetic", "geometric"],
    "arithmetic",
    "the mean of the singular values: `geometric` is the fork's `apply_exp` (0 when a singular \
     value is 0)",
);

/// `factorization`, declared once for the SVD family.
pub(crate) const FACTORIZATION: ParamInfo = ParamInfo::choice(
    "factorization",
    &["auto", "svd"],
    "auto",
    "how the singular values and U V^T are computed: `auto` from the eigendecomposition of the \
     smaller Gram matrix (A^T A or A A^T) in f64 when sigma_min >= 1e-4 sigma_max (agrees with \
     the SVD to about 1e-8 relative, several times faster), else an exact SVD; `svd` an exact \
     SVD for every matrix",
);

/// How a key's spectrum is taken: which keys are matrices, which mean, how it is computed (shared by ISO-C and
/// ISO-Z).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Isotropic {
    pub(crate) high_dim: HighDim,
    pub(crate) mean: SpectrumMean,
    pub(crate) factorization: Factorization,
}

impl Isotropic {
    /// Reads `high_dim` and `mean`.
    pub(crate) fn read(params: &mut Params) -> Result<Self> {
        let high_dim = match params.choice("high_dim")? {
            "flatten" => HighDim::Flatten,
            _ => HighDim::Vector,
        };
        let mean = match params.choice("mean")? {
            "geometric" => SpectrumMean::Geometric,
            _ => SpectrumMean::Arithmetic,
        };
        let factorization = match params.choice("factorization")? {
            "svd" => Factorization::Svd,
            _ => Factorization::Auto,
        };
        Ok(Isotropic {
            high_dim,
            mean,
            factorization,
        })
    }
}

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

/// A key's matrix in f64, block by block, folded into the whole tensor: `Σ_t τ_t` of the
/// arguments after the base (`tasks`), or the one argument itself.
pub(crate) struct WholeMatrix {
    pub(crate) tasks: bool,
    pub(crate) sum: Vec<f64>,
}

impl<T: Real> Pass<T> for WholeMatrix {
    type Block = Vec<f64>;
    fn block_bytes(&self, len: usize) -> usize {
        len * 8
    }
    fn block(&self, _range: Range<usize>, args: &[&[T]]) -> Vec<f64> {
        if !self.tasks {
            return args[0].iter().map(|v| v.to_f64()).collect();
        }
        let base = args[0];
        let mut s = vec![0f64; base.len()];
        for x in &args[1..] {
            for ((o, &v), &b) in s.iter_mut().zip(x.iter()).zip(base) {
                *o += (v - b).to_f64();
            }
        }
        s
    }
    fn fold(&mut self, block: Vec<f64>) {
        self.sum.extend(block);
    }
}

/// The note of a key whose matrix `factorization = auto` computed by an exact SVD.
pub(crate) fn exact_note(exact: bool) -> Vec<String> {
    if exact {
        vec![format!(
            "sigma_min < {GRAM_MIN_RATIO:e} sigma_max (ill-conditioned or rank-deficient): exact SVD"
        )]
    } else {
        Vec::new()
    }
}

/// The unit of a key whose matrix is taken whole (`what` names the method), or element by element.
pub(crate) fn matrix_unit(matrix: Option<(usize, usize)>, what: &'static str) -> Unit {
    match matrix {
        // Any chunks: the whole matrix is the pass's own (folded block by block).
        Some((rows, cols)) => Unit {
            len: 1,
            bytes: polar_bytes(rows, cols),
            what,
        },
        None => Unit::ELEMENT,
    }
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
        let pass = WholeMatrix {
            tasks: true,
            sum: Vec::new(),
        };
        let sum = passes.run(pass)?.sum;
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
        let base = args[0];
        if self.matrix.is_some() {
            for ((o, &b), &d) in out.iter_mut().zip(base).zip(&self.delta[range]) {
                *o = b + T::from_f64(d);
            }
            return;
        }
        // The mean of the task vectors.
        let scale = T::from_f64(self.alpha / (args.len() - 1).max(1) as f64);
        out.fill(T::ZERO);
        for x in &args[1..] {
            for ((o, &v), &b) in out.iter_mut().zip(x.iter()).zip(base) {
                *o += v - b;
            }
        }
        for (o, &b) in out.iter_mut().zip(base) {
            *o = b + scale * *o;
        }
    }
}
