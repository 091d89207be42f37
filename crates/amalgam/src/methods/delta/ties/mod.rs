//! The delta pipeline behind TIES, TIES-SOUP, DARE, DELLA, TSD, TGMD and DGMLA (spec §2-§9,
//! §19.3):
//!
//! `δ_t = θ_t − θ_0` → drop (DARE or DELLA mask) → trim (keep the fraction `k` of largest |δ_t|) →
//! elect a sign per element (`mass`: sign of Σ δ_t; `count`: sign of Σ sgn δ_t) → keep the entries
//! of the elected sign → fuse (disjoint mean | mean | sum | geometric median) → rescale →
//! `θ = θ_0 + λ · result`.
//!
//! Every stage is a named option; the presets (`ties`, `ties_soup`, `dare`, `della`, `tsd`,
//! `tgmd`, `dgmla`) differ only in their defaults, so each can be tuned into any other.

use super::della::{
    key32, ordinal_ranks, BlockCounts, Della, Rank, RankHistogram, RankScratch, Ranks,
};
use crate::error::{Error, Result};
use crate::method::*;
use crate::methods::gram::geometric_median::{gram_of_rows, Weiszfeld};
use crate::real::Real;
use crate::rng;
use rayon::prelude::*;
use std::ops::Range;

mod drop;
mod key;
mod key_merge;
mod options;
mod pipeline;
mod points;
mod presets;
mod signed;
mod stats;

use drop::*;
use key::*;
pub use options::*;
pub use pipeline::Pipeline;
pub(crate) use points::merge_points;
pub use presets::*;
use signed::*;
use stats::*;
