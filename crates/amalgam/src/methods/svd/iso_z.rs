//! ISO-Z (the AstolfoMix author's spin-off of ISO-C, spec §13): the spectrum of a delta shrunk
//! towards its mean, `σ_i' = m + z·(σ_i − m)`: z = 0 is ISO-C's flat spectrum, z = 1 the delta
//! unchanged. Written in this cancelled form, a single singular value gives no NaN (the fork's
//! z-score divides by a variance that is then 0).

use super::shared::{computed_or, exact_note, matrix_unit, Isotropic, Source, WholeMatrix};
use super::shared::{FACTORIZATION, HIGH_DIM, MEAN};
use super::spectrum::matrix_shape;
use crate::error::Result;
use crate::method::*;
use crate::real::Real;
use std::ops::Range;

/// The method's declaration: its name, inputs, parameters and documentation.
pub static INFO: MethodInfo = MethodInfo {
    name: "iso_z",
    origins: &[Origin::Community],
    formula:
        "U diag(m + z * (sigma - m)) V^T, where U diag(sigma) V^T = delta and m = mean(sigma) \
              (matrix keys); delta (the others)",
    summary:
        "ISO-Z (AstolfoKarmix): shrinks the spectrum of a delta (e.g. a merged task vector, a \
              node's output) towards its mean; z = 0 is ISO-C's flat spectrum. Needs each matrix \
              whole.",
    slots: &[Slot {
        name: "delta",
        kind: SlotKind::One,
        doc: "the delta (a node's output, a subtract node)",
    }],
    params: &[
        ParamInfo::number(
            "z",
            0.8,
            "how much of the spectrum's spread is kept (0: flat, ISO-C; 1: unchanged; > 1 \
             exaggerates); the AstolfoKarmix DGMIZ recipes use 0.8",
        ),
        HIGH_DIM,
        MEAN,
        FACTORIZATION,
    ],
};

pub(crate) struct IsoZ {
    z: f64,
    iso: Isotropic,
}

impl IsoZ {
    pub(crate) fn new(mut params: Params) -> Result<Self> {
        let z = params.number("z")?;
        let iso = Isotropic::read(&mut params)?;
        params.finish()?;
        Ok(IsoZ { z, iso })
    }
}

impl<T: Real> Method<T> for IsoZ {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        keep_first(present)
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        Ok(Box::new(IsoZKey {
            z: self.z,
            iso: self.iso,
            key: ctx.key.to_string(),
            matrix: matrix_shape(ctx.key, ctx.shape, self.iso.high_dim),
            delta: Vec::new(),
            exact: false,
        }))
    }
}

struct IsoZKey {
    z: f64,
    iso: Isotropic,
    key: String,
    matrix: Option<(usize, usize)>,
    /// After the pass: the delta with its spectrum shrunk, row-major (matrix keys).
    delta: Vec<f64>,
    /// Whether `factorization = auto` fell back to an exact SVD (an ill-conditioned matrix).
    exact: bool,
}

impl<T: Real> KeyMerge<T> for IsoZKey {
    fn stat_passes(&self) -> usize {
        usize::from(self.matrix.is_some())
    }
    fn unit(&self) -> Unit {
        matrix_unit(self.matrix, "the whole matrix of ISO-Z and its factors")
    }
    fn run_passes(&mut self, passes: &mut Passes<T>) -> Result<()> {
        let Some((rows, cols)) = self.matrix else {
            return Ok(());
        };
        let mut delta = passes.run(WholeMatrix::new(Source::Arg(0)))?.sum;
        self.exact = self
            .iso
            .shrink(&mut delta, (rows, cols), self.z, &self.key)?;
        self.delta = delta;
        Ok(())
    }
    fn notes(&self) -> Vec<String> {
        exact_note(self.exact)
    }
    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        let computed = self.matrix.map(|_| &self.delta[range]);
        computed_or(computed, args[0], out)
    }
}
