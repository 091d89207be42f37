//! `rotate` (sd-mecha, after supermerger#347): `a` turned towards `b` by the orthogonal
//! Procrustes rotation of their columns, as a fraction `t` (`alignment`) of the way:
//!
//! ```text
//! A, B: the keys as [out, rest] ([out·in, kh·kw] for kernels larger than 1×1), columns centred
//!       by c·(their mean row) (c = centralization)
//! Q = U Vᵀ, U Σ Vᵀ = AᵀB          (det Q = +1 when t is fractional)
//! A ← A + α·(B Qᵀ − A)            (α = alpha: towards b seen in a's frame)
//! θ = A·Qᵗ + μ_a + t·(μ_b − μ_a)
//! ```
//!
//! A fractional power of the rotation is `Qᵗ = cos(tΘ) + sin(tΘ)/sin(Θ)·K` with `S = (Q + Qᵀ)/2 =
//! cos Θ` (a symmetric eigendecomposition) and `K = (Q − Qᵀ)/2`: the real part of the principal
//! power `V diag(λᵗ) Vᴴ` sd-mecha takes from a complex eigendecomposition. Wide matrices (fewer
//! rows than columns) are rotated within the row space of `b` as sd-mecha does (`x ↦ x − xWWᵀ +
//! xUWᵀ` for `t = 1`); other powers follow the Stiefel geodesic from the frame `W` to `U`
//! (sd-mecha's: `Δ = Log_W(U)`, `L = Exp_W(Δ(t+1)/2)`, `R = Exp_W(Δ(1−t)/2)`, `x ↦ x − xRRᵀ +
//! xLRᵀ`; see [`super::stiefel`]). Vectors, and keys where `a` and `b` agree in f16, are
//! `a + α·(b − a)`.

use super::shared::{Source, WholeMatrix};
use super::spectrum::{polar, polar_bytes, thin_svd, Factorization};
use super::stiefel::{self, mm};
use crate::error::{Error, Result};
use crate::method::*;
use crate::real::Real;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::evd::{self_adjoint_evd, self_adjoint_evd_scratch, ComputeEigenvectors};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use std::ops::Range;

/// The method's declaration: its name, inputs, parameters and documentation.
pub static INFO: MethodInfo = MethodInfo {
    name: "rotate",
    origins: &[Origin::SdMecha],
    formula: "A Q^t + lerp(mu_a, mu_b, t), A = lerp(a - mu_a, (b - mu_b) Q^T, alpha), Q the \
              orthogonal Procrustes rotation of a's columns onto b's (keys of 2 or more \
              dimensions); lerp(a, b, alpha) (the others)",
    summary: "sd-mecha's rotate: aligns a to b by an orthogonal rotation of its columns \
              (orthogonal Procrustes), a fraction `alignment` of the way, optionally also moving \
              its non-rotational part towards b (`alpha`). Needs each matrix whole.",
    slots: &[
        Slot {
            name: "a",
            kind: SlotKind::One,
            doc: "the model rotated",
        },
        Slot {
            name: "b",
            kind: SlotKind::One,
            doc: "the model it is aligned to",
        },
    ],
    params: &[
        ParamInfo::number(
            "alignment",
            1.0,
            "t: the fraction of the rotation applied (0: none, 1: aligned to b; fractional \
             powers of the rotation in between; integers are its powers)",
        ),
        ParamInfo::number(
            "alpha",
            0.0,
            "how far a's non-rotational part moves towards b (0: kept; 1: b's, rotated)",
        ),
        ParamInfo::number(
            "centralization",
            1.0,
            "c: the columns are centred by c times their mean before the rotation is found, and \
             the means interpolated back by t afterwards",
        ),
        ParamInfo::number_in(
            "stiefel_eps",
            1e-8,
            Domain::Positive,
            "wide matrices, alignment other than -1, 0, 1: the Stiefel logarithm's iteration \
             stops when its residual's norm is at most this (sd-mecha's default)",
        ),
        ParamInfo::count(
            "stiefel_max_iters",
            100,
            "wide matrices: the most iterations of the Stiefel logarithm (sd-mecha's default; \
             a key that does not converge is noted)",
        ),
    ],
};

pub(crate) struct Rotate {
    t: f64,
    alpha: f64,
    c: f64,
    stiefel_eps: f64,
    stiefel_max_iters: usize,
}

impl Rotate {
    pub(crate) fn new(mut params: Params) -> Result<Self> {
        let t = params.number("alignment")?;
        let alpha = params.number("alpha")?;
        let c = params.number("centralization")?;
        let stiefel_eps = params.number("stiefel_eps")?;
        let stiefel_max_iters = params.count("stiefel_max_iters")?;
        params.finish()?;
        if stiefel_max_iters == 0 {
            return Err(Error::method(
                INFO.name,
                "parameter `stiefel_max_iters` must be at least 1",
            ));
        }
        Ok(Rotate {
            t,
            alpha,
            c,
            stiefel_eps,
            stiefel_max_iters,
        })
    }
}

fn close(x: f64, v: f64) -> bool {
    (x - v).abs() <= 1e-9 * v.abs().max(1.0)
}

/// What a key's output is.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// `a` (alignment 0 and alpha 0).
    A,
    /// `b` (alignment 1 and alpha 1).
    B,
    /// `a + α·(b − a)`.
    Lerp,
    /// The rotation of the `[rows, cols]` matrix.
    Rotate(usize, usize),
}

impl<T: Real> Method<T> for Rotate {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        OnMissing::first_or_absent(present)
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        let s = ctx.shape;
        let mode = if close(self.t, 0.0) && close(self.alpha, 0.0) {
            Mode::A
        } else if close(self.t, 1.0) && close(self.alpha, 1.0) {
            Mode::B
        } else if s.len() <= 1 || ctx.numel() == 0 {
            Mode::Lerp
        } else if s.len() == 4 && s[2] * s[3] != 1 {
            Mode::Rotate(s[0] * s[1], s[2] * s[3])
        } else {
            Mode::Rotate(s[0], s[1..].iter().product())
        };
        Ok(Box::new(RotateKey {
            t: self.t,
            alpha: self.alpha,
            c: self.c,
            stiefel_eps: self.stiefel_eps,
            stiefel_max_iters: self.stiefel_max_iters,
            mode,
            key: ctx.key.to_string(),
            out: Vec::new(),
            notes: Vec::new(),
        }))
    }
}

struct RotateKey {
    t: f64,
    alpha: f64,
    c: f64,
    stiefel_eps: f64,
    stiefel_max_iters: usize,
    mode: Mode,
    key: String,
    /// After the passes: the rotated matrix, row-major.
    out: Vec<f64>,
    notes: Vec<String>,
}

/// The columns' means of `m`, times `c`, taken off `m`.
fn centre(m: &mut Mat<f64>, c: f64) -> Vec<f64> {
    let rows = m.nrows() as f64;
    let mut mu = Vec::with_capacity(m.ncols());
    for j in 0..m.ncols() {
        let mean = c * m.col(j).iter().sum::<f64>() / rows;
        m.col_mut(j).iter_mut().for_each(|x| *x -= mean);
        mu.push(mean);
    }
    mu
}

/// `Qᵗ` for an orthogonal `Q` with `det Q = +1`: `cos(tΘ) + sin(tΘ)/sin(Θ)·K` where
/// `(Q + Qᵀ)/2 = cos Θ = V diag(c) Vᵀ` and `K = (Q − Qᵀ)/2` (on an eigenvalue −1 pair, `cos(πt)`,
/// the real part of the principal power).
fn fractional_power(q: &Mat<f64>, t: f64, key: &str) -> Result<Mat<f64>> {
    let n = q.nrows();
    let s = Mat::from_fn(n, n, |i, j| 0.5 * (q[(i, j)] + q[(j, i)]));
    let k = Mat::from_fn(n, n, |i, j| 0.5 * (q[(i, j)] - q[(j, i)]));
    let mut v = Mat::<f64>::zeros(n, n);
    let mut c = faer::diag::Diag::<f64>::zeros(n);
    let yes = ComputeEigenvectors::Yes;
    let mut mem = MemBuffer::new(self_adjoint_evd_scratch::<f64>(
        n,
        yes,
        Par::Seq,
        Default::default(),
    ));
    let stack = MemStack::new(&mut mem);
    self_adjoint_evd(
        s.as_ref(),
        c.as_mut(),
        Some(v.as_mut()),
        Par::Seq,
        stack,
        Default::default(),
    )
    .map_err(|e| {
        Error::Invalid(format!(
            "`{key}`: the eigendecomposition of its rotation failed: {e:?}"
        ))
    })?;
    // V diag(f) Vᵀ + V diag(g) Vᵀ K.
    let (mut vf, mut vg) = (v.clone(), v.clone());
    for i in 0..n {
        let theta = c[i].clamp(-1.0, 1.0).acos();
        let f = (t * theta).cos();
        let sin = theta.sin();
        let g = if sin > 1e-12 {
            (t * theta).sin() / sin
        } else if theta < 1.0 {
            t
        } else {
            0.0
        };
        vf.col_mut(i).iter_mut().for_each(|x| *x *= f);
        vg.col_mut(i).iter_mut().for_each(|x| *x *= g);
    }
    let mut out = mm(vf.as_ref(), v.transpose());
    let gs = mm(vg.as_ref(), v.transpose());
    matmul(
        out.as_mut(),
        Accum::Add,
        gs.as_ref(),
        k.as_ref(),
        1.0,
        Par::Seq,
    );
    Ok(out)
}

impl RotateKey {
    /// The rotation of a tall or square `a` (`rows ≥ cols`) towards `b`, both centred.
    fn tall(&self, a: &Mat<f64>, b: &Mat<f64>) -> Result<Mat<f64>> {
        let n = a.ncols();
        let m = mm(a.transpose(), b.as_ref());
        let flat: Vec<f64> = (0..n * n).map(|e| m[(e / n, e % n)]).collect();
        let (mut u, _, v) = thin_svd(&flat, n, n, &self.key)?;
        let integer = close(self.t, self.t.round());
        let mut q = mm(u.as_ref(), v.transpose());
        if !integer && q.determinant() < 0.0 {
            // det Q = +1: U's last column negated, Q − 2·u_n v_nᵀ.
            u.col_mut(n - 1).iter_mut().for_each(|x| *x = -*x);
            q = mm(u.as_ref(), v.transpose());
        }
        let mut a = a.clone();
        if self.alpha != 0.0 {
            let bq = mm(b.as_ref(), q.transpose());
            a = Mat::from_fn(a.nrows(), n, |i, j| {
                a[(i, j)] + self.alpha * (bq[(i, j)] - a[(i, j)])
            });
        }
        Ok(if integer {
            let steps = self.t.round() as i64;
            let step = if steps < 0 {
                q.transpose().to_owned()
            } else {
                q
            };
            for _ in 0..steps.unsigned_abs() {
                a = mm(a.as_ref(), step.as_ref());
            }
            a
        } else {
            mm(
                a.as_ref(),
                fractional_power(&q, self.t, &self.key)?.as_ref(),
            )
        })
    }

    /// The rotation of a wide `a` (`rows < cols`) within `b`'s row space: `x ↦ x − xWWᵀ + xUWᵀ`
    /// (`t = 1`) or `x ↦ x − xUUᵀ + xWUᵀ` (`t = −1`), `U Σ Vᵀ = AᵀR_bᵀ`, `W = Q_b V`; other `t`
    /// along the Stiefel geodesic from `W` to `U`.
    fn wide(&mut self, a: &Mat<f64>, b: &Mat<f64>) -> Result<Mat<f64>> {
        let (rows, cols) = (a.nrows(), a.ncols());
        // Bᵀ = Q_b R_b with Q_b orthonormal (its polar factor: any such factorization gives the
        // same operator).
        let bt: Vec<f64> = (0..cols * rows).map(|e| b[(e % rows, e / rows)]).collect();
        let qb = polar(&bt, cols, rows, Factorization::Auto, &self.key)?.factor;
        let qb = MatRef::from_row_major_slice(&qb, cols, rows).to_owned();
        let rb = mm(qb.transpose(), b.transpose());
        let m = mm(a.transpose(), rb.transpose());
        let flat: Vec<f64> = (0..cols * rows).map(|e| m[(e / rows, e % rows)]).collect();
        let (u, _, v) = thin_svd(&flat, cols, rows, &self.key)?;
        let w = mm(qb.as_ref(), v.as_ref());
        // x ↦ x − x P Pᵀ + x R Pᵀ = x + x (R − P) Pᵀ.
        let apply = |x: &Mat<f64>, p: &Mat<f64>, r: &Mat<f64>| -> Mat<f64> {
            let mut out = x.clone();
            let d = Mat::from_fn(r.nrows(), r.ncols(), |i, j| r[(i, j)] - p[(i, j)]);
            let xd = mm(x.as_ref(), d.as_ref());
            matmul(
                out.as_mut(),
                Accum::Add,
                xd.as_ref(),
                p.transpose(),
                1.0,
                Par::Seq,
            );
            out
        };
        let mut a = a.clone();
        if self.alpha != 0.0 {
            let back = apply(b, &u, &w);
            a = Mat::from_fn(rows, cols, |i, j| {
                a[(i, j)] + self.alpha * (back[(i, j)] - a[(i, j)])
            });
        }
        Ok(if close(self.t, 0.0) {
            a
        } else if close(self.t, 1.0) {
            apply(&a, &w, &u)
        } else if close(self.t, -1.0) {
            apply(&a, &u, &w)
        } else {
            let (log, converged) = stiefel::log(
                w.as_ref(),
                u.as_ref(),
                self.stiefel_eps,
                self.stiefel_max_iters,
                &self.key,
            )?;
            if !converged {
                self.notes.push(format!(
                    "rotate: the Stiefel logarithm did not reach stiefel_eps = {} in {} iterations",
                    self.stiefel_eps, self.stiefel_max_iters
                ));
            }
            let scaled = |f: f64| Mat::from_fn(log.nrows(), log.ncols(), |i, j| f * log[(i, j)]);
            let l = stiefel::exp(w.as_ref(), scaled((self.t + 1.0) / 2.0).as_ref(), &self.key)?;
            let r = stiefel::exp(w.as_ref(), scaled((1.0 - self.t) / 2.0).as_ref(), &self.key)?;
            apply(&a, &r, &l)
        })
    }
}

/// Whether `a` and `b` are equal in f16 (torch's `allclose` of the halves: `|a − b| ≤ 1e-8 +
/// 1e-5·|b|`), where sd-mecha interpolates instead of rotating.
fn close_in_f16(a: &[f64], b: &[f64]) -> bool {
    let h = |x: f64| half::f16::from_f64(x).to_f64();
    a.iter()
        .zip(b)
        .all(|(&x, &y)| (h(x) - h(y)).abs() <= 1e-8 + 1e-5 * h(y).abs())
}

impl<T: Real> KeyMerge<T> for RotateKey {
    fn stat_passes(&self) -> usize {
        if matches!(self.mode, Mode::Rotate(..)) {
            2
        } else {
            0
        }
    }
    fn unit(&self) -> Unit {
        match self.mode {
            Mode::Rotate(rows, cols) => {
                // A wide matrix's Stiefel geodesic: a dozen (p + k)² matrices, p + k ≤ 2·rows.
                let geodesic = if rows < cols { 12 * 4 * rows * rows } else { 0 };
                Unit {
                    len: 1,
                    bytes: 2 * polar_bytes(rows, cols) + 8 * (8 * cols * cols + geodesic) as u64,
                    what: "the whole matrices of rotate and their rotation",
                }
            }
            _ => Unit::ELEMENT,
        }
    }
    fn notes(&self) -> Vec<String> {
        self.notes.clone()
    }
    fn run_passes(&mut self, passes: &mut Passes<T>) -> Result<()> {
        let Mode::Rotate(rows, cols) = self.mode else {
            return Ok(());
        };
        let a = passes.run(WholeMatrix::new(Source::Arg(0)))?.sum;
        let b = passes.run(WholeMatrix::new(Source::Arg(1)))?.sum;
        if close_in_f16(&a, &b) {
            self.mode = Mode::Lerp;
            return Ok(());
        }
        let mut a = MatRef::from_row_major_slice(&a, rows, cols).to_owned();
        let mut b = MatRef::from_row_major_slice(&b, rows, cols).to_owned();
        let (mu_a, mu_b) = (centre(&mut a, self.c), centre(&mut b, self.c));
        let rotated = if rows >= cols {
            self.tall(&a, &b)?
        } else {
            self.wide(&a, &b)?
        };
        self.out = (0..rows * cols)
            .map(|e| {
                let j = e % cols;
                rotated[(e / cols, j)] + mu_a[j] + self.t * (mu_b[j] - mu_a[j])
            })
            .collect();
        Ok(())
    }
    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        match self.mode {
            Mode::A => out.copy_from_slice(&args[0][..out.len()]),
            Mode::B => out.copy_from_slice(&args[1][..out.len()]),
            Mode::Lerp => {
                let alpha = T::from_f64(self.alpha);
                for ((o, &a), &b) in out.iter_mut().zip(args[0]).zip(args[1]) {
                    *o = a + alpha * (b - a);
                }
            }
            Mode::Rotate(..) => {
                for (o, &v) in out.iter_mut().zip(&self.out[range]) {
                    *o = T::from_f64(v);
                }
            }
        }
    }
}
