//! `truncate_rank` (sd-mecha): the best rank-r approximation of each matrix,
//! `A = U diag(σ) Vᵀ → U_r diag(σ_r) V_rᵀ`, keys of two or more dimensions as `[out, rest]`,
//! the others unchanged. The truncated SVD is exact, or randomized (Halko et al.) with a seeded
//! test matrix.

use super::shared::{computed_or, Source, WholeMatrix};
use super::spectrum::{polar_bytes, randomized_svd, thin_svd};
use crate::error::Result;
use crate::method::*;
use crate::real::Real;
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, Par};
use std::ops::Range;

/// The method's declaration: its name, inputs, parameters and documentation.
pub static INFO: MethodInfo = MethodInfo {
    name: "truncate_rank",
    origins: &[Origin::SdMecha],
    formula: "U_r diag(sigma_r) V_r^T, the top r singular triplets of a as [out, rest] (keys of \
              2 or more dimensions); a (the others)",
    summary: "sd-mecha's truncate_rank: each matrix's best rank-r approximation, r from `rank` \
              or `ratio` of min(rows, cols). Needs each matrix whole.",
    slots: &[Slot {
        name: "a",
        kind: SlotKind::One,
        doc: "the model (or delta) to truncate",
    }],
    params: &[
        ParamInfo::count(
            "rank",
            8,
            "singular values kept (clamped to min(rows, cols); 0 gives zeros), as sd-mecha",
        ),
        ParamInfo::optional(
            "ratio",
            Domain::UnitInterval,
            "instead of `rank`: round(ratio * min(rows, cols)) per matrix (sd-mecha's \
             get_rank_from_ratio)",
        ),
        ParamInfo::choice(
            "svd",
            &["exact", "randomized"],
            "exact",
            "`exact`: a full thin SVD; `randomized`: Halko's range finder with a test matrix \
             seeded by (seed, key) and `power_iterations` (sd-mecha's default \
             use_approximate_basis, there unseeded)",
        ),
        ParamInfo::count(
            "power_iterations",
            2,
            "power iterations of the randomized range finder (sd-mecha's approximate_basis_iters)",
        ),
    ],
};

/// Extra columns of the randomized range finder's test matrix beyond the rank.
const OVERSAMPLING: usize = 10;

pub(crate) struct TruncateRank {
    rank: Option<usize>,
    ratio: Option<f64>,
    randomized: bool,
    power_iterations: usize,
}

impl TruncateRank {
    pub(crate) fn new(mut params: Params) -> Result<Self> {
        let ratio = params.optional_number("ratio")?;
        let rank = params.count("rank")?;
        let randomized = params.choice("svd")? == "randomized";
        let power_iterations = params.count("power_iterations")?;
        params.finish()?;
        Ok(TruncateRank {
            rank: ratio.is_none().then_some(rank),
            ratio,
            randomized,
            power_iterations,
        })
    }
}

impl<T: Real> Method<T> for TruncateRank {
    fn info(&self) -> &'static MethodInfo {
        &INFO
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        keep_first(present)
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        let matrix = (ctx.shape.len() >= 2 && ctx.numel() > 0)
            .then(|| (ctx.shape[0], ctx.shape[1..].iter().product::<usize>()));
        // The rank kept, when it is not the whole matrix.
        let rank = matrix.and_then(|(m, n)| {
            let full = m.min(n);
            let r = match (self.rank, self.ratio) {
                (Some(r), _) => r,
                (None, Some(f)) => (full as f64 * f).round_ties_even() as usize,
                (None, None) => full,
            };
            (r < full).then_some(r)
        });
        Ok(Box::new(TruncateKey {
            matrix: matrix.filter(|_| rank.is_some()),
            rank: rank.unwrap_or(0),
            randomized: self.randomized.then_some((ctx.seed, self.power_iterations)),
            key: ctx.key.to_string(),
            low_rank: Vec::new(),
        }))
    }
}

struct TruncateKey {
    /// `[rows, cols]` of a matrix whose rank is cut; `None` for the keys passed through.
    matrix: Option<(usize, usize)>,
    rank: usize,
    /// The seed and power iterations of a randomized SVD.
    randomized: Option<(u64, usize)>,
    key: String,
    /// After the pass: `U_r diag(σ_r) V_rᵀ`, row-major.
    low_rank: Vec<f64>,
}

impl<T: Real> KeyMerge<T> for TruncateKey {
    fn stat_passes(&self) -> usize {
        usize::from(self.matrix.is_some())
    }
    fn unit(&self) -> Unit {
        match self.matrix {
            Some((rows, cols)) => Unit {
                len: 1,
                bytes: polar_bytes(rows, cols),
                what: "the whole matrix of truncate_rank and its SVD",
            },
            None => Unit::ELEMENT,
        }
    }
    fn run_passes(&mut self, passes: &mut Passes<T>) -> Result<()> {
        let Some((rows, cols)) = self.matrix else {
            return Ok(());
        };
        let a = passes.run(WholeMatrix::new(Source::Arg(0)))?.sum;
        let r = self.rank;
        if r == 0 {
            self.low_rank = vec![0.0; rows * cols];
            return Ok(());
        }
        let (u, sigma, v) = match self.randomized {
            Some(how) => randomized_svd(&a, (rows, cols), r + OVERSAMPLING, how, &self.key)?,
            _ => thin_svd(&a, rows, cols, &self.key)?,
        };
        drop(a);
        // U_r diag(σ_r) V_rᵀ.
        let mut us = u.subcols(0, r).to_owned();
        for (j, &s) in sigma[..r].iter().enumerate() {
            us.col_mut(j).iter_mut().for_each(|x| *x *= s);
        }
        let mut out = vec![0.0; rows * cols];
        let dst = MatMut::from_row_major_slice_mut(&mut out, rows, cols);
        let vr = v.subcols(0, r);
        matmul(
            dst,
            Accum::Replace,
            us.as_ref(),
            vr.transpose(),
            1.0,
            Par::Seq,
        );
        self.low_rank = out;
        Ok(())
    }
    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        let computed = self.matrix.map(|_| &self.low_rank[range]);
        computed_or(computed, args[0], out)
    }
}
