//! The pipeline's stages as named options.

use super::*;

/// Which entries of the deltas are dropped at random before anything else.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Drop {
    /// No drop.
    None,
    /// DARE: every entry is dropped with probability `p`, independently.
    Dare {
        /// The drop probability.
        p: f64,
    },
    /// DELLA (MagPrune): entries dropped with probabilities linear in their magnitude rank.
    Della(Della),
}

impl Drop {
    /// The mean drop probability.
    pub(super) fn p(&self) -> f64 {
        match *self {
            Drop::None => 0.0,
            Drop::Dare { p } => p,
            Drop::Della(d) => d.p,
        }
    }
}

/// Which entries the trim keeps, by the magnitude of each model's (dropped) delta; `k` is the
/// fraction kept.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Trim {
    /// Every |δ| at or above the `max(1, floor((1 − k)·n))`-th smallest (the TIES code,
    /// sd-mecha).
    Threshold,
    /// The `max(1, floor(k·n))` largest |δ| (mergekit's `magnitude`); `k = 0` keeps nothing.
    TopK,
    /// Model Breadcrumbs as mergekit: the `floor(gamma·n)` largest |δ| are dropped, then the
    /// smallest, so that `floor(k·n)` stay (fewer large ones dropped when `k + gamma > 1`).
    Outliers {
        /// The fraction of the largest |δ| dropped.
        gamma: f64,
    },
}

/// How the sign of each element is elected.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Election {
    /// Sign of the sum of the deltas (the TIES paper).
    Mass,
    /// Sign of the sum of the signs, a majority vote (TIES-SOUP).
    Count,
    /// No election: every entry is kept.
    None,
}

/// How the kept entries are combined.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fuse {
    /// Mean over the entries of the elected sign (zeros excluded).
    DisjointMean,
    /// Mean over all models (filtered-out entries count as 0).
    Mean,
    /// Sum over all models.
    Sum,
    /// Geometric median of the filtered deltas, each whole tensor one point.
    GeometricMedian(Weiszfeld),
}

/// The factor the fused result is divided by.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rescale {
    /// No rescale.
    None,
    /// `1 / (1 − p)` of the drop, once on the result (sd-mecha's `rescale`).
    InverseKeep,
    /// Every kept entry divided by its keep probability before the vote: `1 − p` for DARE (the
    /// DARE paper), its own `q_i` for DELLA (the DELLA paper).
    PerElement,
    /// Each model's kept entries scaled so their L1 norm equals that of its whole delta
    /// (current mergekit); models whose norms are below 1e-7 are left as they are.
    L1,
}

/// The result where the election ties (as many + as −, or a zero sum).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SignTie {
    /// Output 0: the element keeps the base value (sd-mecha).
    Zero,
    /// Treat the tie as + (mergekit).
    Positive,
}

/// The agreement an element's election needs (sd-optim's `min_agreement`): where fewer than
/// `min · N` models count, no sign is elected and the element keeps the base.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Agreement {
    /// The minimum fraction of the models present.
    pub min: f64,
    /// Which models count.
    pub count: AgreementCount,
}

/// Which models count towards an election's agreement.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AgreementCount {
    /// Those with a nonzero entry after drop and trim (sd-optim's code: the fraction taking part).
    Participating,
    /// Those whose entry has the elected sign (the fraction agreeing, as sd-optim's wiki words it).
    Elected,
}

/// The whole pipeline's configuration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    /// The random drop.
    pub drop: Drop,
    /// Fraction of entries kept per model and tensor by magnitude (1 = no trim).
    pub k: f64,
    /// Which entries the trim keeps.
    pub trim: Trim,
    /// How the sign of each entry is elected.
    pub election: Election,
    /// The sign of a tied election.
    pub sign_tie: SignTie,
    /// The agreement an election needs, if any.
    pub agreement: Option<Agreement>,
    /// How the entries of the elected sign are combined.
    pub fuse: Fuse,
    /// The factor the fused result is divided by.
    pub rescale: Rescale,
    /// The factor of the fused delta added to the base.
    pub lambda: f64,
    /// Add the base itself as a zero-delta point (geometric median only, as the DGMLA recipe).
    pub base_point: bool,
    /// A model-stock factor the fused result is multiplied by, if any.
    pub stock: Stock,
}

impl Config {
    /// Whether a pass computes the Gram matrix of the filtered deltas (the geometric median's
    /// coefficients, or the positive pairs' factor).
    pub fn gram_pass(&self) -> bool {
        matches!(self.fuse, Fuse::GeometricMedian(_)) || self.stock == Stock::PositivePairs
    }
}

/// The model-stock factor the fused result is multiplied by.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Stock {
    /// None.
    None,
    /// `t = N cos / (1 + (N − 1) cos)` per row, `cos` the mean cosine of adjacent models' filtered
    /// deltas along the last dimension, with this `cos_eps` (sd-mecha's `ties_sum_extended`
    /// with `apply_stock = false`).
    AdjacentRows(f64),
    /// The fraction of the `N²` ordered pairs of filtered deltas (whole tensors, each model with
    /// itself included) whose cosine is positive (sd-optim's `ties_sum_extended` with
    /// `apply_stock > 0`).
    PositivePairs,
}
