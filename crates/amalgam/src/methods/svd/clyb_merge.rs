//! `clyb_merge`, sd-optim's low-rank projection (spec §16.2): `a`'s difference from `c` without its
//! low-rank part, projected onto the column space of `b`'s difference, added to `b`:
//!
//! ```text
//! a' = A − C, b' = B − C                  (ab_only: a' = A, b' = B)
//! a' ← a' − b'·⟨a', b'⟩/(‖b'‖ + 1e-20)²   (use_perp)
//! Q_b: an orthonormal basis of b''s columns; q = max(min(m, n) / 16, 1), n_iter = min(max(⌊640/q⌋, 2), 64)
//! a'_hf = a' − U_q diag(σ_q) V_qᵀ          (the top q triplets of a', randomized as torch's svd_lowrank)
//! θ = B + α·(C + b' + Q_b Q_bᵀ a'_hf − B)  (ab_only: B + α·(b' + Q_b Q_bᵀ a'_hf − B))
//! ```
//!
//! Keys as sd-optim views them: `[out, rest]` for 4-D, `[rest, last]` otherwise (a vector is one
//! row, whose rank-1 part is itself: `θ = B`).

use super::shared::{computed_or, Source, WholeMatrix};
use super::spectrum::{polar, polar_bytes, randomized_svd, thin_svd, Factorization};
use crate::error::Result;
use crate::method::*;
use crate::real::Real;
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use std::ops::Range;

/// The method's declaration: its name, inputs, parameters and documentation.
pub static INFO: MethodInfo = MethodInfo {
    name: "clyb_merge",
    origins: &[Origin::SdOptim],
    formula: "b + alpha * (c + b' + Q_b Q_b^T (a' - lowrank_q(a')) - b), a' = a - c (minus its \
              component along b' with use_perp), b' = b - c, Q_b an orthonormal basis of b'",
    summary: "sd-optim's low-rank projection (clyb_merge): the high-frequency part of a's \
              difference from c, projected onto the column space of b's, added to b. Needs each \
              matrix whole.",
    slots: &[
        Slot {
            name: "a",
            kind: SlotKind::One,
            doc: "the model whose detail is projected",
        },
        Slot {
            name: "b",
            kind: SlotKind::One,
            doc: "the model projected onto (and added to)",
        },
        Slot {
            name: "c",
            kind: SlotKind::One,
            doc: "the reference both differences are taken from (unused with ab_only)",
        },
    ],
    params: &[
        ParamInfo::number("alpha", 1.0, "interpolation from b (0) to the merge (1)"),
        ParamInfo::flag(
            "use_perp",
            true,
            "take a' perpendicular to b' (as a whole tensor) first",
        ),
        ParamInfo::flag(
            "ab_only",
            false,
            "use a and b themselves, not their differences from c",
        ),
        ParamInfo::choice(
            "svd",
            &["randomized", "exact"],
            "randomized",
            "the low-rank part of a': `randomized` as torch's svd_lowrank (q columns, n_iter \
             power iterations; seeded by (seed, key) where sd-optim's is unseeded), `exact` its \
             exact top-q SVD",
        ),
    ],
};

pub(crate) struct ClybMerge {
    alpha: f64,
    use_perp: bool,
    ab_only: bool,
    randomized: bool,
}

impl ClybMerge {
    pub(crate) fn new(mut params: Params) -> Result<Self> {
        let alpha = params.number("alpha")?;
        let use_perp = params.boolean("use_perp")?;
        let ab_only = params.boolean("ab_only")?;
        let randomized = params.choice("svd")? == "randomized";
        params.finish()?;
        Ok(ClybMerge {
            alpha,
            use_perp,
            ab_only,
            randomized,
        })
    }
}

/// The `[rows, cols]` sd-optim views a key of `shape` as (`None` for a scalar or a vector).
fn view(shape: &[usize]) -> Option<(usize, usize)> {
    let numel: usize = shape.iter().product();
    match shape.len() {
        _ if numel == 0 => None,
        0 | 1 => None,
        4 => Some((shape[0], numel / shape[0])),
        _ => Some((numel / shape[shape.len() - 1], shape[shape.len() - 1])),
    }
}

/// The power iterations sd-optim gives a rank-`q` svd_lowrank: `min(max(⌊exp(ln(640/q))⌋, 2), 64)`,
/// with the rounding of its `exp(log(·))`.
fn iterations(q: usize) -> usize {
    ((640.0 / q as f64).ln().exp().floor() as usize).clamp(2, 64)
}

impl<T: Real> Method<T> for ClybMerge {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        if present[1] {
            OnMissing::PassThrough(1)
        } else {
            OnMissing::Absent
        }
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        Ok(Box::new(ClybKey {
            alpha: self.alpha,
            use_perp: self.use_perp,
            ab_only: self.ab_only,
            randomized: self.randomized.then_some(ctx.seed),
            matrix: view(ctx.shape),
            key: ctx.key.to_string(),
            out: Vec::new(),
        }))
    }
}

struct ClybKey {
    alpha: f64,
    use_perp: bool,
    ab_only: bool,
    randomized: Option<u64>,
    matrix: Option<(usize, usize)>,
    key: String,
    /// After the passes: the output, row-major.
    out: Vec<f64>,
}

impl ClybKey {
    /// `a' − (its top q triplets)`, `a'` row-major `rows × cols`.
    fn high_frequency(&self, a: &[f64], rows: usize, cols: usize) -> Result<Vec<f64>> {
        let q = (rows.min(cols) / 16).max(1);
        let (u, sigma, v) = match self.randomized {
            Some(seed) => randomized_svd(a, (rows, cols), q, (seed, iterations(q)), &self.key)?,
            None => thin_svd(a, rows, cols, &self.key)?,
        };
        let mut us = u.subcols(0, q).to_owned();
        for (j, &s) in sigma[..q].iter().enumerate() {
            us.col_mut(j).iter_mut().for_each(|x| *x *= s);
        }
        let mut hf = a.to_vec();
        let dst = faer::MatMut::from_row_major_slice_mut(&mut hf, rows, cols);
        matmul(
            dst,
            Accum::Add,
            us.as_ref(),
            v.subcols(0, q).transpose(),
            -1.0,
            Par::Seq,
        );
        Ok(hf)
    }
}

impl<T: Real> KeyMerge<T> for ClybKey {
    fn stat_passes(&self) -> usize {
        match self.matrix {
            Some(_) if self.ab_only => 2,
            Some(_) => 3,
            None => 0,
        }
    }
    fn unit(&self) -> Unit {
        match self.matrix {
            Some((rows, cols)) => Unit {
                len: 1,
                bytes: 3 * polar_bytes(rows, cols),
                what: "the whole matrices of clyb_merge and their factors",
            },
            None => Unit::ELEMENT,
        }
    }
    fn run_passes(&mut self, passes: &mut Passes<T>) -> Result<()> {
        let Some((rows, cols)) = self.matrix else {
            return Ok(());
        };
        let mut a = passes.run(WholeMatrix::new(Source::Arg(0)))?.sum;
        let b = passes.run(WholeMatrix::new(Source::Arg(1)))?.sum;
        let c = if self.ab_only {
            vec![0.0; b.len()]
        } else {
            passes.run(WholeMatrix::new(Source::Arg(2)))?.sum
        };
        let mut bd: Vec<f64> = b.iter().zip(&c).map(|(x, y)| x - y).collect();
        a.iter_mut().zip(&c).for_each(|(x, y)| *x -= y);
        if self.use_perp {
            let norm = bd.iter().map(|x| x * x).sum::<f64>().sqrt() + 1e-20;
            let dot: f64 = bd
                .iter()
                .zip(&a)
                .map(|(y, x)| (y / norm) * (x / norm))
                .sum();
            a.iter_mut().zip(&bd).for_each(|(x, y)| *x -= y * dot);
        }
        let hf = self.high_frequency(&a, rows, cols)?;
        drop(a);
        // Q_b Q_bᵀ a'_hf, Q_b an orthonormal basis of b''s columns: its polar factor when b' is
        // tall (QR's Q spans the same columns), the identity when it is wide or square (QR's Q
        // is then square).
        let hf_ref = MatRef::from_row_major_slice(&hf, rows, cols);
        let projected = if rows > cols {
            let qb = polar(&bd, rows, cols, Factorization::Auto, &self.key)?.factor;
            let qb = MatRef::from_row_major_slice(&qb, rows, cols);
            let mut t = Mat::<f64>::zeros(cols, cols);
            matmul(
                t.as_mut(),
                Accum::Replace,
                qb.transpose(),
                hf_ref,
                1.0,
                Par::Seq,
            );
            let mut p = Mat::<f64>::zeros(rows, cols);
            matmul(p.as_mut(), Accum::Replace, qb, t.as_ref(), 1.0, Par::Seq);
            p
        } else {
            hf_ref.to_owned()
        };
        // B + α·(C + b' + P a'_hf − B).
        for (i, d) in bd.iter_mut().enumerate() {
            let target = c[i] + *d + projected[(i / cols, i % cols)];
            *d = b[i] + self.alpha * (target - b[i]);
        }
        self.out = bd;
        Ok(())
    }
    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        let computed = self.matrix.map(|_| &self.out[range]);
        computed_or(computed, args[1], out)
    }
}
