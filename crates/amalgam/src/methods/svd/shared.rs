//! What the SVD family shares: the parameters saying which keys are matrices and how their
//! spectrum is taken, the statistic pass that gathers a key's matrix whole, and its memory unit.

use super::spectrum::GRAM_MIN_RATIO;
use super::spectrum::{polar, polar_bytes, spectrum_mean, Factorization, HighDim, SpectrumMean};
use crate::error::Result;
use crate::method::*;
use crate::real::Real;
use std::ops::Range;

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

/// Which matrix a [`WholeMatrix`] pass gathers from a key's arguments.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Source {
    /// `Σ_t τ_t = Σ_t (x_t − x_0)`: the task vectors of the arguments after the base.
    Tasks,
    /// `τ_t = x_t − x_0` of one argument after the base (`t` from 0).
    Task(usize),
    /// Argument `i` itself (a delta, a model).
    Arg(usize),
}

/// A key's matrix in f64, block by block, folded into the whole tensor (one tensor whatever the
/// number of arguments).
pub(crate) struct WholeMatrix {
    source: Source,
    /// After the pass: the matrix, row-major.
    pub(crate) sum: Vec<f64>,
}

impl WholeMatrix {
    pub(crate) fn new(source: Source) -> Self {
        WholeMatrix {
            source,
            sum: Vec::new(),
        }
    }
}

impl<T: Real> Pass<T> for WholeMatrix {
    type Block = Vec<f64>;
    fn block_bytes(&self, len: usize) -> usize {
        len * 8
    }
    fn block(&self, _range: Range<usize>, args: &[&[T]]) -> Vec<f64> {
        let base = args[0];
        let tasks = match self.source {
            Source::Arg(i) => return args[i].iter().map(|v| v.to_f64()).collect(),
            Source::Task(t) => &args[1 + t..2 + t],
            Source::Tasks => &args[1..],
        };
        let mut s = vec![0f64; base.len()];
        for x in tasks {
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

impl Isotropic {
    /// ISO-Z of the row-major `rows × cols` matrix `delta`, in place:
    /// `U diag(m + z(σ − m)) Vᵀ = (1 − z)·m·U Vᵀ + z·Δ` (the polar factor and the mean of the
    /// spectrum suffice). Returns whether `factorization = auto` fell back to an exact SVD.
    pub(crate) fn shrink(
        &self,
        delta: &mut [f64],
        (rows, cols): (usize, usize),
        z: f64,
        key: &str,
    ) -> Result<bool> {
        let p = polar(delta, rows, cols, self.factorization, key)?;
        let flat = (1.0 - z) * spectrum_mean(&p.sigma, self.mean);
        for (d, &f) in delta.iter_mut().zip(&p.factor) {
            *d = flat * f + z * *d;
        }
        Ok(p.exact && self.factorization == Factorization::Auto)
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

/// The output of ISO-C and ISO-CTS for elements `range`: `base + delta` where the matrix's merged
/// delta was computed (`delta`, already scaled), else `base + α·mean_t τ_t` of the arguments
/// (base, then the models).
pub(crate) fn base_plus_delta<T: Real>(
    delta: Option<&[f64]>,
    alpha: f64,
    args: &[&[T]],
    out: &mut [T],
) {
    let base = args[0];
    if let Some(delta) = delta {
        for ((o, &b), &d) in out.iter_mut().zip(base).zip(delta) {
            *o = b + T::from_f64(d);
        }
        return;
    }
    let scale = T::from_f64(alpha / (args.len() - 1).max(1) as f64);
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

/// The output of a key computed whole (`Some`: its values at `range`) or passed through
/// (`None`: `pass`, an argument's chunk).
pub(crate) fn computed_or<T: Real>(computed: Option<&[f64]>, pass: &[T], out: &mut [T]) {
    match computed {
        Some(values) => {
            for (o, &v) in out.iter_mut().zip(values) {
                *o = T::from_f64(v);
            }
        }
        None => out.copy_from_slice(&pass[..out.len()]),
    }
}
