//! DGMIZ and DGMIA (the AstolfoKarmix pipelines, spec §13): the DGMLA merge's task vector with its
//! spectrum shrunk by ISO-Z (DGMIZ, z = 0.8) or flattened (DGMIA, z = 0, ISO-C of the delta), added
//! back to the base:
//!
//! ```text
//! Δ = dgmla(base, models) − base;   θ = base + iso_z(Δ; z)   (matrix keys; θ = base + Δ otherwise)
//! ```
//!
//! One method, the same bytes as the recipe of its four nodes (`dgmla` → `subtract` → `iso_z` →
//! `add`): the pipeline's passes run first, then one more pass gathers its delta whole.

use super::shared::{exact_note, matrix_unit, Isotropic, FACTORIZATION, HIGH_DIM, MEAN};
use super::spectrum::matrix_shape;
use crate::error::Result;
use crate::method::PresetDefault::{Choice, Number};
use crate::method::*;
use crate::methods::delta::ties::{Pipeline, DGMI_PIPELINE, PIPELINE_PARAMS};
use crate::real::Real;
use std::ops::Range;

const FORMULA: &str = "base + iso_z(dgmla(base, models) - base; z): the merged delta's spectrum \
                       U diag(m + z (sigma - m)) V^T (matrix keys), the merged model (the others)";

/// The parameters: the pipeline's (DGMLA's defaults, mass election), then ISO-Z's.
const N: usize = PIPELINE_PARAMS + 4;

const fn params(z: f64) -> [ParamInfo; N] {
    let iso = [
        ParamInfo::number("z", 0.8, "ISO-Z: how much of the delta's spectral spread is kept (0: flat, ISO-C; 1: the DGMLA merge)")
            .with_default(Number(z)),
        HIGH_DIM.with_default(Choice("flatten")),
        MEAN,
        FACTORIZATION,
    ];
    let mut out = [DGMI_PIPELINE[0]; N];
    let mut i = 0;
    while i < N {
        out[i] = if i < PIPELINE_PARAMS {
            DGMI_PIPELINE[i]
        } else {
            iso[i - PIPELINE_PARAMS]
        };
        i += 1;
    }
    out
}

/// DGMIZ: ISO-Z with z = 0.8, as every published DGMIZ recipe.
pub static DGMIZ: MethodInfo = MethodInfo {
    name: "dgmiz",
    origins: &[Origin::Community],
    formula: FORMULA,
    summary: "DGMIZ (AstolfoKarmix, spec §13): the DGMLA merge's task vector with its spectrum \
              shrunk towards its mean by ISO-Z (z = 0.8, conv kernels flattened), added to the \
              base. Needs each matrix whole.",
    slots: Slot::BASE_AND_MODELS,
    params: &const { params(0.8) },
};

/// DGMIA: the same with ISO-C's flat spectrum (z = 0).
pub static DGMIA: MethodInfo = MethodInfo {
    name: "dgmia",
    origins: &[Origin::Community],
    formula: FORMULA,
    summary: "DGMIA (AstolfoKarmix, spec §13): the DGMLA merge's task vector with a flat \
              spectrum (ISO-C of the delta, z = 0), added to the base. Needs each matrix whole.",
    slots: Slot::BASE_AND_MODELS,
    params: &const { params(0.0) },
};

pub(crate) struct Dgmiz {
    pipeline: Pipeline,
    z: f64,
    iso: Isotropic,
}

impl Dgmiz {
    pub(crate) fn new(mut params: Params) -> Result<Self> {
        let info = params.info().expect("parameters bound to dgmiz or dgmia");
        let z = params.number("z")?;
        let iso = Isotropic::read(&mut params)?;
        // The pipeline reads the rest, and refuses what nobody read.
        let pipeline = Pipeline::build(info, params)?;
        Ok(Dgmiz { pipeline, z, iso })
    }
}

impl<T: Real> Method<T> for Dgmiz {
    fn info(&self) -> &'static MethodInfo {
        Method::<T>::info(&self.pipeline)
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        Method::<T>::on_missing(&self.pipeline, present)
    }
    fn notes(&self) -> Vec<String> {
        Method::<T>::notes(&self.pipeline)
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        Ok(Box::new(DgmizKey {
            inner: self.pipeline.begin_key(ctx)?,
            z: self.z,
            iso: self.iso,
            key: ctx.key.to_string(),
            matrix: matrix_shape(ctx.key, ctx.shape, self.iso.high_dim),
            delta: Vec::new(),
            exact: false,
        }))
    }
}

struct DgmizKey<T> {
    /// The pipeline's merge of this key.
    inner: Box<dyn KeyMerge<T>>,
    z: f64,
    iso: Isotropic,
    key: String,
    matrix: Option<(usize, usize)>,
    /// After the passes: `iso_z(Δ)`, row-major (matrix keys).
    delta: Vec<f64>,
    exact: bool,
}

/// The pipeline's merged delta `merge − base`, gathered whole in f64.
struct MergedDelta<'a, T> {
    inner: &'a dyn KeyMerge<T>,
    delta: Vec<f64>,
}

impl<T: Real> Pass<T> for MergedDelta<'_, T> {
    type Block = Vec<f64>;
    fn block_bytes(&self, len: usize) -> usize {
        len * 8
    }
    fn block(&self, range: Range<usize>, args: &[&[T]]) -> Vec<f64> {
        let mut merged = vec![T::ZERO; range.len()];
        self.inner.merge_chunk(range, args, &mut merged);
        merged
            .iter()
            .zip(args[0])
            .map(|(&x, &b)| (x - b).to_f64())
            .collect()
    }
    fn fold(&mut self, block: Vec<f64>) {
        self.delta.extend(block);
    }
}

impl<T: Real> KeyMerge<T> for DgmizKey<T> {
    fn stat_passes(&self) -> usize {
        self.inner.stat_passes() + usize::from(self.matrix.is_some())
    }
    fn unit(&self) -> Unit {
        let inner = self.inner.unit();
        match self.matrix {
            Some(_) => {
                let whole = matrix_unit(self.matrix, "the whole matrix of DGMIZ and its factors");
                Unit {
                    len: inner.len,
                    bytes: inner.bytes + whole.bytes,
                    what: whole.what,
                }
            }
            None => inner,
        }
    }
    fn notes(&self) -> Vec<String> {
        let mut notes = self.inner.notes();
        notes.extend(exact_note(self.exact));
        notes
    }
    fn run_passes(&mut self, passes: &mut Passes<T>) -> Result<()> {
        self.inner.run_passes(passes)?;
        let Some((rows, cols)) = self.matrix else {
            return Ok(());
        };
        let pass = MergedDelta {
            inner: &*self.inner,
            delta: Vec::new(),
        };
        let mut delta = passes.run(pass)?.delta;
        self.exact = self
            .iso
            .shrink(&mut delta, (rows, cols), self.z, &self.key)?;
        self.delta = delta;
        Ok(())
    }
    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        let base = args[0];
        if self.matrix.is_some() {
            for ((o, &b), &d) in out.iter_mut().zip(base).zip(&self.delta[range]) {
                *o = b + T::from_f64(d);
            }
            return;
        }
        // base + (merge − base), as the recipe's subtract and add nodes compute it.
        self.inner.merge_chunk(range, args, out);
        for (o, &b) in out.iter_mut().zip(base) {
            *o = b + (*o - b);
        }
    }
}
