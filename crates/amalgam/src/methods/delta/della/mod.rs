//! DELLA's MagPrune drop (spec §6): each delta entry is kept with a probability that grows (or,
//! with a negative window, shrinks) linearly with the ordinal rank of its magnitude.
//!
//! Two variants, named by the unit the rank is taken over:
//! - `rank = tensor` (sd-mecha, the AstolfoMix DGMLA recipes): `r` = ordinal rank 1..P of |δ| over
//!   the whole flattened tensor, ties by position; `q = (1 − p) + ε·(r/P − (P + 1)/(2P))`.
//! - `rank = row` (official DELLA code, mergekit): the rank over each row of the `[rows, rest]`
//!   view; `q = (1 − p) + ε·((r − 1)/(n − 1) − 1/2)`.
//!
//! `ε` is the total width of the window in both (mergekit's `epsilon` is half of it). `q` is
//! clamped to [0, 1].
//!
//! Ranks are exact when a unit of all models fits the budget: each unit is sorted by
//! (|δ| bits, position), which is the ordinal rank with ties by position. A tensor too large for
//! that gets its ranks from a histogram of |δ| (see [`RankHistogram`]).

mod exact;
mod histogram;
#[cfg(test)]
mod tests;

pub use exact::{ordinal_ranks, RankScratch};
pub use histogram::{key32, BlockCounts, RankHistogram};

use crate::real::Real;

/// What the magnitude rank is taken over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rank {
    /// Ranks over the whole tensor.
    Tensor,
    /// Ranks within each row (the last dimension).
    Row,
}

/// How the ranks are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ranks {
    /// Exact when a unit of all models fits a quarter of the memory budget, else histogram.
    Auto,
    /// Always exact (an error when a unit does not fit).
    Exact,
    /// Always estimated from the histogram pass (`rank = tensor` only): faster, no sort.
    Histogram,
}

/// The MagPrune drop configuration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Della {
    /// Mean drop probability.
    pub p: f64,
    /// Total width of the keep-probability window (negative: large |δ| dropped more).
    pub eps: f64,
    /// What the ranks are taken over.
    pub rank: Rank,
    /// How the ranks are computed (exact or estimated from a histogram).
    pub ranks: Ranks,
}

impl Della {
    /// The keep probability of the entry of rank `r` (1-based, ascending |δ|) among `n`.
    #[inline]
    pub fn keep(&self, r: f64, n: usize) -> f64 {
        let n_f = n as f64;
        let centred = match self.rank {
            Rank::Tensor => r / n_f - (n_f + 1.0) / (2.0 * n_f),
            Rank::Row if n > 1 => (r - 1.0) / (n_f - 1.0) - 0.5,
            Rank::Row => 0.0,
        };
        (1.0 - self.p + self.eps * centred).clamp(0.0, 1.0)
    }

    /// `(a, b)` with `keep(r, n) = clamp(a + b·r)` for whole-tensor ranks.
    pub fn tensor_affine(&self, n: usize) -> (f64, f64) {
        let n = n as f64;
        (
            1.0 - self.p - self.eps * (n + 1.0) / (2.0 * n),
            self.eps / n,
        )
    }

    /// The keep probabilities of the smallest and of the largest |δ| of a large unit.
    pub fn range(&self) -> (f64, f64) {
        let at = |c: f64| (1.0 - self.p + self.eps * c).clamp(0.0, 1.0);
        (at(-0.5), at(0.5))
    }

    /// The number of consecutive elements ranked together in a tensor of this shape.
    pub fn unit_len(&self, shape: &[usize]) -> usize {
        let numel: usize = shape.iter().product();
        match self.rank {
            Rank::Tensor => numel,
            Rank::Row if shape.len() >= 2 => shape[1..].iter().product(),
            Rank::Row => numel,
        }
    }
}
