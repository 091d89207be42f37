//! ISO-CTS, isotropic merging in common and task-specific subspaces (Marczak et al. 2025, spec
//! §12). For a matrix key with `r = min(rows, cols)` singular values and `N` task vectors:
//!
//! ```text
//! k = ⌊r·f⌋;  s_tot = round((r − k)/N)·N  (half to even);  k = r − s_tot;  s = s_tot/N
//! Σ_t τ_t = U diag(σ) Vᵀ                               → its top k: U_k, σ_k, V_k
//! τ_t − U_k U_kᵀ τ_t = U_t diag(σ_t) V_tᵀ, each t     → its top s: U_t,s, σ_t,s, V_t,s
//! U = polar([U_1,s … U_N,s  U_k]),  V = polar([V_1,s … V_N,s  V_k])
//! θ = θ_0 + α·mean(σ_1,s … σ_N,s σ_k)·U Vᵀ
//! ```
//!
//! and `θ_0 + α·mean_t τ_t` for the other keys. The residual SVDs are taken one task at a time
//! (one statistic pass each, from the held inputs), so memory holds one task vector and the kept
//! bases, whatever N.

use super::shared::{base_plus_delta, matrix_unit, Source, WholeMatrix, HIGH_DIM};
use super::spectrum::{matrix_shape, polar, polar_bytes, thin_svd, Factorization, HighDim};
use crate::error::Result;
use crate::method::*;
use crate::real::Real;
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use std::ops::Range;

/// The method's declaration: its name, inputs, parameters and documentation.
pub static INFO: MethodInfo = MethodInfo {
    name: "iso_cts",
    origins: &[Origin::Paper],
    formula: "base + alpha * mean(sigma') * U' V'^T, U' and V' the polar factors of the top-k \
              singular vectors of sum_t (models[t] - base) joined with the top-s of each task \
              vector's residual off them (matrix keys); base + alpha * mean_t (models[t] - base) \
              (the others)",
    summary: "ISO-CTS (Marczak et al. 2025): ISO-C's flat spectrum over a common subspace (a \
              fraction f of the rank) plus a task-specific one per model. Needs each matrix \
              whole; N + 1 SVDs per matrix, one task vector held at a time.",
    slots: Slot::BASE_AND_MODELS,
    params: &[
        ParamInfo::number(
            "alpha",
            1.0,
            "scale of the merged delta (the paper picks it in 0.1..3.0)",
        ),
        ParamInfo::number_in(
            "common_space_fraction",
            0.8,
            Domain::UnitInterval,
            "the fraction f of the rank given to the common subspace (the paper's config: 0.8)",
        ),
        HIGH_DIM,
    ],
};

pub(crate) struct IsoCts {
    alpha: f64,
    fraction: f64,
    high_dim: HighDim,
}

impl IsoCts {
    pub(crate) fn new(mut params: Params) -> Result<Self> {
        let alpha = params.number("alpha")?;
        let fraction = params.number("common_space_fraction")?;
        let high_dim = match params.choice("high_dim")? {
            "flatten" => HighDim::Flatten,
            _ => HighDim::Vector,
        };
        params.finish()?;
        Ok(IsoCts {
            alpha,
            fraction,
            high_dim,
        })
    }
}

/// The common rank `k` and the per-task rank `s` for `r` singular values and `n` tasks, as the
/// official code computes them (Python's `round`, half to even). Where it would make `k`
/// negative (tiny matrices, many tasks), `s` is the largest that fits: `⌊r/n⌋`.
pub(crate) fn ranks(r: usize, n: usize, fraction: f64) -> (usize, usize) {
    let n = n.max(1);
    let k = (r as f64 * fraction).floor() as usize;
    let s_tot = ((r - k.min(r)) as f64 / n as f64).round_ties_even() as usize * n;
    if s_tot > r {
        let s = r / n;
        return (r - s * n, s);
    }
    (r - s_tot, s_tot / n)
}

impl<T: Real> Method<T> for IsoCts {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        OnMissing::base_and_models(present)
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        let tasks = ctx.present.len().saturating_sub(1);
        let matrix = matrix_shape(ctx.key, ctx.shape, self.high_dim);
        let (k, s) = matrix.map_or((0, 0), |(m, n)| ranks(m.min(n), tasks, self.fraction));
        Ok(Box::new(CtsKey {
            alpha: self.alpha,
            key: ctx.key.to_string(),
            matrix,
            tasks,
            k,
            s,
            delta: Vec::new(),
        }))
    }
}

struct CtsKey {
    alpha: f64,
    key: String,
    matrix: Option<(usize, usize)>,
    tasks: usize,
    /// The common rank and the rank kept per task.
    k: usize,
    s: usize,
    /// After the passes: `α·σ̄·U Vᵀ`, row-major (matrix keys).
    delta: Vec<f64>,
}

/// Columns `cols` of `from` appended to `to` (column-major, `rows` long each).
fn take_columns(to: &mut Vec<f64>, from: &Mat<f64>, cols: Range<usize>) {
    for j in cols {
        to.extend(from.col(j).iter().copied());
    }
}

/// The polar factor of the `rows × cols` column-major matrix `x`, row-major.
fn orthonormalised(x: &[f64], rows: usize, cols: usize, key: &str) -> Result<Vec<f64>> {
    // Column-major `rows × cols` is row-major `cols × rows`: its polar factor, transposed back.
    let p = polar(x, cols, rows, Factorization::Auto, key)?.factor;
    let mut out = vec![0.0; rows * cols];
    for (j, col) in p.chunks_exact(rows).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            out[i * cols + j] = v;
        }
    }
    Ok(out)
}

impl<T: Real> KeyMerge<T> for CtsKey {
    fn stat_passes(&self) -> usize {
        match self.matrix {
            Some(_) if self.s > 0 => 1 + self.tasks,
            Some(_) => 1,
            None => 0,
        }
    }
    fn unit(&self) -> Unit {
        let Some((rows, cols)) = self.matrix else {
            return Unit::ELEMENT;
        };
        let r = rows.min(cols);
        let mut unit = matrix_unit(self.matrix, "the whole matrix of ISO-CTS and its factors");
        // A task vector and the kept bases besides the matrix and one SVD.
        unit.bytes = polar_bytes(rows, cols) + (8 * (rows * cols + 3 * (rows + cols) * r)) as u64;
        unit
    }
    fn run_passes(&mut self, passes: &mut Passes<T>) -> Result<()> {
        let Some((rows, cols)) = self.matrix else {
            return Ok(());
        };
        let (k, s) = (self.k, self.s);
        let sum = passes.run(WholeMatrix::new(Source::Tasks))?.sum;
        let (u, sigma, v) = thin_svd(&sum, rows, cols, &self.key)?;
        drop(sum);
        // The bases, column-major: each task's top s, then the common top k.
        let (mut us, mut vs, mut spectrum) = (Vec::new(), Vec::new(), Vec::new());
        let uk = u.subcols(0, k);
        if s > 0 {
            for t in 0..self.tasks {
                let mut tau = passes.run(WholeMatrix::new(Source::Task(t)))?.sum;
                // τ − U_k (U_kᵀ τ).
                let mut proj = Mat::<f64>::zeros(k, cols);
                let tau_ref = MatRef::from_row_major_slice(&tau, rows, cols);
                matmul(
                    proj.as_mut(),
                    Accum::Replace,
                    uk.transpose(),
                    tau_ref,
                    1.0,
                    Par::Seq,
                );
                let tau_mut = faer::MatMut::from_row_major_slice_mut(&mut tau, rows, cols);
                matmul(tau_mut, Accum::Add, uk, proj.as_ref(), -1.0, Par::Seq);
                let (ut, st, vt) = thin_svd(&tau, rows, cols, &self.key)?;
                take_columns(&mut us, &ut, 0..s);
                take_columns(&mut vs, &vt, 0..s);
                spectrum.extend_from_slice(&st[..s]);
            }
        }
        take_columns(&mut us, &u, 0..k);
        take_columns(&mut vs, &v, 0..k);
        spectrum.extend_from_slice(&sigma[..k]);
        let r = spectrum.len();
        let mean = spectrum.iter().sum::<f64>() / r.max(1) as f64;
        let u = orthonormalised(&us, rows, r, &self.key)?;
        let v = orthonormalised(&vs, cols, r, &self.key)?;
        // α·σ̄·U Vᵀ.
        let mut delta = vec![0.0; rows * cols];
        let dst = faer::MatMut::from_row_major_slice_mut(&mut delta, rows, cols);
        let u = MatRef::from_row_major_slice(&u, rows, r);
        let v = MatRef::from_row_major_slice(&v, cols, r);
        matmul(
            dst,
            Accum::Replace,
            u,
            v.transpose(),
            self.alpha * mean,
            Par::Seq,
        );
        self.delta = delta;
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::ranks;

    /// The official code's k and s, half-to-even rounding included.
    #[test]
    fn ranks_as_the_official_code() {
        assert_eq!(ranks(10, 3, 0.8), (7, 1));
        assert_eq!(ranks(16, 4, 0.5), (8, 2));
        assert_eq!(ranks(10, 2, 0.5), (6, 2)); // round(2.5) = 2
        assert_eq!(ranks(320, 216, 0.8), (320, 0)); // round(64/216) = 0
        assert_eq!(ranks(3, 2, 0.0), (1, 1)); // the official code would make k = -1
    }
}
