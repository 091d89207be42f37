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
use super::geometric_median::{gram_of_rows, Weiszfeld};
use crate::error::{Error, Result};
use crate::method::*;
use crate::real::Real;
use crate::rng;
use rayon::prelude::*;
use std::ops::Range;

/// Which entries of the deltas are dropped at random before anything else.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Drop {
    None,
    /// DARE: every entry is dropped with probability `p`, independently.
    Dare {
        p: f64,
    },
    /// DELLA (MagPrune): entries dropped with probabilities linear in their magnitude rank.
    Della(Della),
}

impl Drop {
    /// The mean drop probability.
    fn p(&self) -> f64 {
        match *self {
            Drop::None => 0.0,
            Drop::Dare { p } => p,
            Drop::Della(d) => d.p,
        }
    }
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

/// The whole pipeline's configuration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    pub drop: Drop,
    /// Fraction of entries kept per model and tensor by magnitude (1 = no trim).
    pub k: f64,
    pub election: Election,
    pub sign_tie: SignTie,
    pub fuse: Fuse,
    pub rescale: Rescale,
    pub lambda: f64,
    /// Add the base itself as a zero-delta point (geometric median only, as the DGMLA recipe).
    pub base_point: bool,
    /// Multiply the fused result by the model-stock factor of the filtered deltas (cosines of
    /// adjacent models along the last dimension, one factor per row; sd-mecha's
    /// `ties_sum_extended` with `apply_stock = false`), with this `cos_eps`.
    pub stock: Option<f64>,
}

macro_rules! pipeline_info {
    ($name:literal, $summary:literal, $drop:literal, $p:literal, $k:literal, $election:literal, $fuse:literal, $rescale:literal) => {
        pipeline_info!($name, $summary, $drop, $p, "0.0", "tensor", $k, $election, $fuse, $rescale, "false")
    };
    ($name:literal, $summary:literal, $drop:literal, $p:literal, $della_eps:literal, $rank:literal, $k:literal, $election:literal, $fuse:literal, $rescale:literal, $base_point:literal) => {
        MethodInfo {
            name: $name,
            formula: "base + lambda * rescale(fuse(elect(trim(drop(models[t] - base)))))",
            summary: $summary,
            slots: &[
                Slot { name: "base", kind: SlotKind::One, doc: "the pre-trained model" },
                Slot { name: "models", kind: SlotKind::Many, doc: "the fine-tuned models" },
            ],
            params: &[
                ParamInfo { name: "drop", default: Some($drop), doc: "none | dare (uniform) | della (by magnitude rank)" },
                ParamInfo { name: "p", default: Some($p), doc: "mean drop probability of `dare` and `della`, in [0, 1)" },
                ParamInfo { name: "della_eps", default: Some($della_eps), doc: "della: total width of the keep-probability window, kept with 1 - p - della_eps/2 (smallest |delta|) to 1 - p + della_eps/2 (largest); negative drops large deltas more (sd-mecha's della_eps)" },
                ParamInfo { name: "epsilon", default: None, doc: "della: half width of the window instead (mergekit's epsilon); della_eps = 2 * epsilon" },
                ParamInfo { name: "rank", default: Some($rank), doc: "della: rank |delta| over the whole tensor (sd-mecha) | row (official DELLA, mergekit)" },
                ParamInfo { name: "ranks", default: Some("auto"), doc: "della, rank = tensor: auto (exact for tensors up to 65536 elements whose values for all models take at most 4 MiB, estimated from a histogram above) | exact (sorts each tensor of every model; needs the tensor of all models in a quarter of the memory budget) | histogram (estimated wherever auto would); estimates keep each entry within |della_eps| * (fullest 1/128-octave bin) / elements of its exact probability, reported per key" },
                ParamInfo { name: "k", default: Some($k), doc: "fraction kept by magnitude per model and tensor, (0, 1]; entries equal to the threshold are all kept" },
                ParamInfo { name: "election", default: Some($election), doc: "mass (sign of the sum) | count (sign of the sum of signs) | none" },
                ParamInfo { name: "sign_tie", default: Some("zero"), doc: "zero (keep the base) | positive" },
                ParamInfo { name: "fuse", default: Some($fuse), doc: "disjoint_mean | mean | sum | geometric_median" },
                ParamInfo { name: "rescale", default: Some($rescale), doc: "none | inverse_keep (the result divided by 1 - p) | per_element (kept entries divided by their keep probability before the vote) | l1 (each model's kept entries scaled back to its delta's L1 norm)" },
                ParamInfo { name: "lambda", default: Some("1.0"), doc: "scale of the merged delta" },
                ParamInfo { name: "base_point", default: Some($base_point), doc: "geometric median: add the base as a zero-delta point" },
                ParamInfo { name: "stock", default: Some("none"), doc: "none | adjacent_rows: multiply the fused result by the model-stock factor t = N cos / (1 + (N - 1) cos) of the filtered deltas, cos the mean over adjacent models along the last dimension (sd-mecha's ties_sum_extended with its inverted apply_stock = false)" },
                ParamInfo { name: "cos_eps", default: Some("1e-6"), doc: "stock: guard of the norms in the cosines" },
                ParamInfo { name: "eps", default: Some("1e-6"), doc: "geometric median: smallest distance" },
                ParamInfo { name: "maxiter", default: Some("100"), doc: "geometric median: most iterations" },
                ParamInfo { name: "ftol", default: Some("1e-20"), doc: "geometric median: relative objective change to stop at" },
            ],
        }
    };
}

pub static TIES: MethodInfo = pipeline_info!(
    "ties",
    "TIES-Merging (Yadav et al. 2023): trim to the top k, mass election, disjoint mean.",
    "none",
    "0.0",
    "0.2",
    "mass",
    "disjoint_mean",
    "none"
);
pub static TIES_SOUP: MethodInfo =
    pipeline_info!(
    "ties_soup",
    "TIES-SOUP (AstolfoMix): no trim, count election, disjoint mean: a soup of the majority side.",
    "none", "0.0", "1.0", "count", "disjoint_mean", "none"
);
pub static DARE: MethodInfo = pipeline_info!(
    "dare",
    "DARE (Yu et al. 2023) with task arithmetic: drop each delta entry with probability p, sum, rescale by 1/(1-p).",
    "dare", "0.1", "1.0", "none", "sum", "inverse_keep"
);
pub static DELLA: MethodInfo = pipeline_info!(
    "della",
    "DELLA (Deep et al. 2024, official code): drop by per-row magnitude rank (p = 0.3, window 0.28 = mergekit epsilon 0.14), rescale each kept entry by 1/q, mass election, disjoint mean.",
    "della", "0.3", "0.28", "row", "1.0", "mass", "disjoint_mean", "per_element", "false"
);
pub static TSD: MethodInfo =
    pipeline_info!(
    "tsd",
    "TSD, TIES-SOUP with DROP (AstolfoMix x101a): DARE p = 0.1 without rescale, then TIES-SOUP.",
    "dare", "0.1", "1.0", "count", "disjoint_mean", "none"
);
pub static TGMD: MethodInfo = pipeline_info!(
    "tgmd",
    "TGMD, TIES with geometric median and DROP (AstolfoMix x116a): DARE p = 0.1 without rescale, count election, geometric median of the filtered deltas.",
    "dare", "0.1", "1.0", "count", "geometric_median", "none"
);

pub static DGMLA: MethodInfo = pipeline_info!(
    "dgmla",
    "DGMLA (AstolfoMix x215a): DELLA drop by whole-tensor rank, p = 0.1, della_eps = -0.1, no rescale, count election, geometric median with the base as a zero-delta point.",
    "della", "0.1", "-0.1", "tensor", "1.0", "count", "geometric_median", "none", "true"
);

/// A configured pipeline, registered under one of the preset names.
pub struct Pipeline {
    info: &'static MethodInfo,
    config: Config,
}

impl Pipeline {
    fn build(info: &'static MethodInfo, mut params: Params) -> Result<Self> {
        let default = |name: &str| -> &'static str {
            info.params
                .iter()
                .find(|p| p.name == name)
                .and_then(|p| p.default)
                .expect("preset default")
        };
        let bad = |msg: String| Error::method(info.name, msg);
        let drop_kind = params.choice("drop", &["none", "dare", "della"], default("drop"))?;
        let p = params.number("p", default("p").parse().unwrap())?;
        if drop_kind != "none" && !(0.0..1.0).contains(&p) {
            return Err(bad(format!("`p` must be in [0, 1), got {p}")));
        }
        let epsilon = params.number("epsilon", f64::NAN)?;
        let della_eps = params.number("della_eps", f64::NAN)?;
        let eps = match (della_eps.is_nan(), epsilon.is_nan()) {
            (false, false) => {
                return Err(bad(
                    "give `della_eps` (total width) or `epsilon` (half width), not both".into(),
                ))
            }
            (true, false) => 2.0 * epsilon,
            (false, true) => della_eps,
            (true, true) => default("della_eps").parse().unwrap(),
        };
        let rank = match params.choice("rank", &["tensor", "row"], default("rank"))? {
            "row" => Rank::Row,
            _ => Rank::Tensor,
        };
        if drop_kind != "della" && !(della_eps.is_nan() && epsilon.is_nan()) {
            return Err(bad(
                "`della_eps` and `epsilon` only apply to `drop = \"della\"`".into(),
            ));
        }
        let ranks = match params.choice("ranks", &["auto", "exact", "histogram"], "auto")? {
            "exact" => Ranks::Exact,
            "histogram" => Ranks::Histogram,
            _ => Ranks::Auto,
        };
        if ranks == Ranks::Histogram && rank == Rank::Row {
            return Err(bad(
                "`ranks = \"histogram\"` estimates whole-tensor ranks: it needs `rank = \"tensor\"`"
                    .into(),
            ));
        }
        let drop = match drop_kind {
            "dare" => Drop::Dare { p },
            "della" => Drop::Della(Della {
                p,
                eps,
                rank,
                ranks,
            }),
            _ => Drop::None,
        };
        let k = params.number("k", default("k").parse().unwrap())?;
        if !(k > 0.0 && k <= 1.0) {
            return Err(bad(format!("`k` must be in (0, 1], got {k}")));
        }
        let election =
            match params.choice("election", &["mass", "count", "none"], default("election"))? {
                "mass" => Election::Mass,
                "count" => Election::Count,
                _ => Election::None,
            };
        let sign_tie = match params.choice("sign_tie", &["zero", "positive"], "zero")? {
            "positive" => SignTie::Positive,
            _ => SignTie::Zero,
        };
        let weiszfeld = Weiszfeld::from_params(&mut params)?;
        let fuse = match params.choice(
            "fuse",
            &["disjoint_mean", "mean", "sum", "geometric_median"],
            default("fuse"),
        )? {
            "disjoint_mean" => Fuse::DisjointMean,
            "mean" => Fuse::Mean,
            "sum" => Fuse::Sum,
            _ => Fuse::GeometricMedian(weiszfeld),
        };
        let rescale = match params.choice(
            "rescale",
            &["none", "inverse_keep", "per_element", "l1"],
            default("rescale"),
        )? {
            "inverse_keep" => Rescale::InverseKeep,
            "per_element" => Rescale::PerElement,
            "l1" => Rescale::L1,
            _ => Rescale::None,
        };
        if matches!(rescale, Rescale::InverseKeep | Rescale::PerElement) && drop == Drop::None {
            return Err(bad(format!(
                "`rescale = \"{}\"` needs a drop (`dare` or `della`)",
                if rescale == Rescale::PerElement {
                    "per_element"
                } else {
                    "inverse_keep"
                }
            )));
        }
        if fuse == Fuse::DisjointMean && election == Election::None {
            return Err(bad(
                "`fuse = \"disjoint_mean\"` needs an election (mass or count)".into(),
            ));
        }
        let lambda = params.number("lambda", 1.0)?;
        let base_point = params.boolean("base_point", default("base_point") == "true")?;
        let cos_eps = params.number_in("cos_eps", 1e-6, Domain::NonNegative)?;
        let stock = match params.choice("stock", &["none", "adjacent_rows"], "none")? {
            "adjacent_rows" => {
                if matches!(fuse, Fuse::GeometricMedian(_)) {
                    return Err(bad(
                        "`stock` applies to the mean fuses, not to `geometric_median`".into(),
                    ));
                }
                Some(cos_eps)
            }
            _ => None,
        };
        if base_point && !matches!(fuse, Fuse::GeometricMedian(_)) {
            return Err(bad(
                "`base_point` only applies to `fuse = \"geometric_median\"`".into(),
            ));
        }
        params.finish(info)?;
        Ok(Pipeline {
            info,
            config: Config {
                drop,
                k,
                election,
                sign_tie,
                fuse,
                rescale,
                lambda,
                base_point,
                stock,
            },
        })
    }

    pub fn ties(params: Params, _counts: &[usize]) -> Result<Self> {
        Self::build(&TIES, params)
    }
    pub fn ties_soup(params: Params, _counts: &[usize]) -> Result<Self> {
        Self::build(&TIES_SOUP, params)
    }
    pub fn dare(params: Params, _counts: &[usize]) -> Result<Self> {
        Self::build(&DARE, params)
    }
    pub fn tsd(params: Params, _counts: &[usize]) -> Result<Self> {
        Self::build(&TSD, params)
    }
    pub fn tgmd(params: Params, _counts: &[usize]) -> Result<Self> {
        Self::build(&TGMD, params)
    }
    pub fn della(params: Params, _counts: &[usize]) -> Result<Self> {
        Self::build(&DELLA, params)
    }
    pub fn dgmla(params: Params, _counts: &[usize]) -> Result<Self> {
        Self::build(&DGMLA, params)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The pipeline of preset `name` with `params`, or `None` when `name` is not one of them.
    pub fn named(name: &str, params: Params) -> Option<Result<Self>> {
        let info = [&TIES, &TIES_SOUP, &DARE, &DELLA, &TSD, &TGMD, &DGMLA]
            .into_iter()
            .find(|i| i.name == name)?;
        Some(Self::build(info, params))
    }
}

impl<T: Real> Method<T> for Pipeline {
    fn info(&self) -> &'static MethodInfo {
        self.info
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        OnMissing::base_and_models(present)
    }
    fn notes(&self) -> Vec<String> {
        match self.config.drop {
            Drop::Della(d) => {
                let (small, large) = d.range();
                vec![format!(
                    "DELLA keeps the smallest |delta| of each {} with probability {small:.4} and the largest with {large:.4} (mean {:.4})",
                    if d.rank == Rank::Tensor { "tensor" } else { "row" },
                    1.0 - d.p
                )]
            }
            Drop::Dare { p } => vec![format!(
                "DARE keeps each delta entry with probability {:.4}",
                1.0 - p
            )],
            Drop::None => Vec::new(),
        }
    }
    fn begin_key(&self, ctx: &KeyCtx) -> Result<Box<dyn KeyMerge<T>>> {
        let n = ctx.present.len() - 1;
        let numel = ctx.numel();
        let trim_passes = if self.config.k < 1.0 && numel > 0 {
            T::KEY_BITS.div_ceil(DIGIT_BITS) as usize
        } else {
            0
        };
        // The rank (1-based, ascending |δ|) of the threshold: entries at or above it are kept.
        let rank = (((1.0 - self.config.k) * numel as f64).floor() as u64).max(1);
        let della = match self.config.drop {
            Drop::Della(d) => {
                let unit: usize = d.unit_len(ctx.shape).max(1);
                // The unit's inputs, their deltas and masks, and a sort buffer.
                let unit_bytes = (unit * ((2 * n + 2) * std::mem::size_of::<T>() + 16)) as u64;
                let fits = unit_bytes <= ctx.unit_budget;
                // Small: the tensor of every model fits a few MiB, whatever the number of models.
                // The choice depends on the tensor and the model count only, never on the budget
                // or the threads, so the output bytes do not either: a budget too small for an
                // exact ranking is an error below, not a silent switch to the histogram.
                let small = numel <= SMALL_TENSOR && unit_bytes <= SMALL_UNIT_BYTES;
                let exact = match d.ranks {
                    // Rows are always ranked exactly (they are short); whole tensors when they
                    // are small, else from a histogram (a sort per model costs ~30 times more).
                    Ranks::Auto => d.rank == Rank::Row || small,
                    Ranks::Exact => true,
                    // Sorting a small tensor costs less than a histogram's bins.
                    Ranks::Histogram => small,
                };
                if exact && !fits {
                    return Err(Error::method(
                        self.info.name,
                        format!(
                            "ranking {} of {unit} elements of {n} models exactly needs a memory budget of {}; raise it{}",
                            if d.rank == Rank::Row { "rows" } else { "tensors" },
                            crate::size::format_bytes(unit_bytes * 4),
                            if d.rank == Rank::Row { "" } else { " or use `ranks = \"histogram\"`" }
                        ),
                    ));
                }
                if !exact && numel > u32::MAX as usize {
                    return Err(Error::method(
                        self.info.name,
                        "tensors of more than 2^32 elements are not supported by DELLA".to_string(),
                    ));
                }
                Some(DellaKey {
                    config: d,
                    unit: if exact { unit } else { 1 },
                    exact,
                    hist: Vec::new(),
                    counting: std::sync::Mutex::new(Vec::new()),
                    bound: 0.0,
                    cache_masks: exact && self.config.rescale != Rescale::PerElement,
                    masks: Vec::new(),
                })
            }
            _ => None,
        };
        Ok(Box::new(KeyPipeline {
            della,
            stock_row: if self.config.stock.is_some() {
                ctx.shape.last().copied().unwrap_or(1).max(1)
            } else {
                0
            },
            numel,
            config: self.config,
            key: ctx.key.to_string(),
            seed: ctx.seed,
            streams: ctx.present[1..].iter().map(|&i| i as u32).collect(),
            trim_passes,
            // Only a trim has a selection state per model (every key's state exists from planning
            // on: without a trim it takes no memory per model).
            select: (0..if trim_passes > 0 { n } else { 0 })
                .map(|_| Select {
                    prefix: 0,
                    rank,
                    counts: Vec::new(),
                })
                .collect(),
            thresholds: Vec::new(),
            scales: Vec::new(),
            l1: Vec::new(),
            gram: Vec::new(),
            coefficients: Vec::new(),
        }))
    }
}

/// Bits of the |δ| key resolved per trim pass (a 2048-bin histogram per model).
const DIGIT_BITS: u32 = 11;

/// The state of the exact selection of one model's threshold, digit by digit from the top.
struct Select {
    /// The key bits resolved so far.
    prefix: u64,
    /// The rank still to find among the keys with that prefix.
    rank: u64,
    /// The histogram of the current pass (allocated while the key's statistics run: every key's
    /// state exists from planning on, so it must stay small until then).
    counts: Vec<u64>,
}

/// With `ranks = auto` or `histogram`, tensors up to this many elements are ranked exactly (a sort
/// of a small tensor costs less than a histogram's bins)...
const SMALL_TENSOR: usize = 1 << 16;
/// ... and when their unit of all models (inputs, deltas, masks, sort buffers) takes at most this
/// many bytes: with many models, small tensors too are ranked from the histogram, so that the
/// memory of a merge does not grow with the number of models.
const SMALL_UNIT_BYTES: u64 = 4 << 20;

/// The DELLA drop of one key.
struct DellaKey {
    config: Della,
    /// Elements ranked together when `exact` (a row or the tensor); 1 otherwise.
    unit: usize,
    /// Exact ordinal ranks per unit, or ranks estimated from a histogram pass.
    exact: bool,
    /// Per model, the histogram (estimated ranks only).
    hist: Vec<RankHistogram>,
    /// Per model, the histogram while its pass runs: the blocks add their counts here as they
    /// are computed (integer counts, so the order does not matter), rather than each block
    /// returning a table to absorb.
    counting: std::sync::Mutex<Vec<RankHistogram>>,
    /// The bound on the keep-probability error of the estimate.
    bound: f64,
    /// With exact ranks and statistic passes: the first pass computes the masks (one bit per
    /// element and model) and the later passes and the merge reuse them, instead of ranking
    /// again. Not with `per_element` rescale, which needs each entry's probability.
    cache_masks: bool,
    /// Per model, the keep bit of every element (once the first pass has run).
    masks: Vec<Vec<u64>>,
}

struct KeyPipeline<T> {
    della: Option<DellaKey>,
    /// With `stock`: the row length (the last dimension); 0 otherwise.
    stock_row: usize,
    numel: usize,
    config: Config,
    key: String,
    seed: u64,
    /// The random stream of each present model (its position among the node's arguments).
    streams: Vec<u32>,
    trim_passes: usize,
    select: Vec<Select>,
    /// Per model, the smallest |δ| key that is kept (0 keeps everything; empty without a trim).
    thresholds: Vec<u64>,
    /// Per model, the factor its kept entries are scaled by (`l1`; empty = 1).
    scales: Vec<T>,
    /// The `l1` pass's sums: per model, Σ|δ| and Σ|kept δ|.
    l1: Vec<f64>,
    gram: Vec<f64>,
    coefficients: Vec<T>,
}

/// Elements processed together: every stage runs over one block of all models at a time, model
/// by model, in loops the compiler vectorises.
const W: usize = 256;

/// Elements of the filtered deltas a Gram matrix product takes at once (a multiple of `W`).
const GRAM_SPAN: usize = 8 * W;

/// How far [`KeyPipeline::blocks`] takes the deltas.
#[derive(Clone, Copy, PartialEq)]
enum Stage {
    /// After the drop only (what the trim threshold is selected from).
    Dropped,
    /// After drop, trim and the `l1` scale; the election is left to the caller.
    Kept,
    /// After drop, trim, election and sign filter.
    Filtered,
}

#[inline(always)]
fn sign<T: Real>(v: T) -> T {
    if v > T::ZERO {
        T::ONE
    } else if v < T::ZERO {
        -T::ONE
    } else {
        T::ZERO
    }
}

/// What a statistic pass computes.
#[derive(Clone, Copy, PartialEq)]
enum Pass {
    /// The histogram of |δ| per model, for DELLA ranks too large to sort.
    Histogram,
    /// One digit of the trim threshold.
    Trim(usize),
    /// The L1 norms of the `l1` rescale.
    L1,
    /// The Gram matrix of the filtered deltas, for the geometric median.
    Gram,
}

impl<T: Real> KeyPipeline<T> {
    fn histogram_passes(&self) -> usize {
        usize::from(self.della.as_ref().is_some_and(|d| !d.exact))
    }

    fn pass(&self, pass: usize) -> Pass {
        let h = self.histogram_passes();
        if pass < h {
            Pass::Histogram
        } else if pass < h + self.trim_passes {
            Pass::Trim(pass - h)
        } else if self.config.rescale == Rescale::L1 && pass == h + self.trim_passes {
            Pass::L1
        } else {
            Pass::Gram
        }
    }

    /// The bits of trim pass `pass`'s digit: (shift, already-resolved high bits' shift).
    fn digit_shift(pass: usize) -> (u32, u32) {
        let top = T::KEY_BITS.div_ceil(DIGIT_BITS) * DIGIT_BITS;
        let shift = top - DIGIT_BITS * (pass as u32 + 1);
        (shift, shift + DIGIT_BITS)
    }

    /// The DELLA factors of `range` with exact ranks: per model `t`, at `[t * len..(t + 1) * len]`,
    /// 0 for a dropped entry, else 1 (or `1 / q` with `per_element`). `range` spans whole units.
    fn della_factors(&self, d: &DellaKey, range: &Range<usize>, args: &[&[T]]) -> Vec<T> {
        let len = range.len();
        let mut factors = vec![T::ZERO; self.streams.len() * len];
        if len == 0 {
            return factors;
        }
        if !d.masks.is_empty() {
            for (f, bits) in factors.chunks_mut(len).zip(&d.masks) {
                for (i, f) in f.iter_mut().enumerate() {
                    let e = range.start + i;
                    *f = if bits[e / 64] >> (e % 64) & 1 == 1 {
                        T::ONE
                    } else {
                        T::ZERO
                    };
                }
            }
            return factors;
        }
        let per_element = self.config.rescale == Rescale::PerElement;
        type Buffers<T> = (RankScratch, Vec<T>, Vec<u32>, Vec<u16>);
        let buffers = || -> Buffers<T> {
            (
                RankScratch::default(),
                vec![T::ZERO; d.unit],
                vec![0u32; d.unit],
                vec![0u16; d.unit],
            )
        };
        let rank_model = |(sort, deltas, ranks, words): &mut Buffers<T>,
                          factors: &mut [T],
                          x: &[T],
                          stream| {
            for u in (0..len).step_by(d.unit) {
                let unit = u..u + d.unit;
                for ((o, &a), &b) in deltas
                    .iter_mut()
                    .zip(&x[unit.clone()])
                    .zip(&args[0][unit.clone()])
                {
                    *o = a - b;
                }
                ordinal_ranks(deltas, sort, ranks);
                rng::draws(self.seed, &self.key, stream, range.start + u, words);
                for ((f, &r), &w) in factors[unit].iter_mut().zip(ranks.iter()).zip(words.iter()) {
                    let q = d.config.keep(r as f64, d.unit);
                    *f = if (w as u32) < rng::threshold(q) {
                        if per_element {
                            T::from_f64(1.0 / q)
                        } else {
                            T::ONE
                        }
                    } else {
                        T::ZERO
                    };
                }
            }
        };
        let parallel = factors.len() >= 1 << 16;
        let work = factors.chunks_mut(len).zip(&args[1..]).zip(&self.streams);
        if parallel {
            // Large units: the models are ranked in parallel, a sort buffer per worker.
            work.par_bridge()
                .for_each_init(buffers, |b, ((f, x), &stream)| {
                    rank_model(b, f, x, stream.into())
                });
        } else {
            let mut b = buffers();
            work.for_each(|((f, x), &stream)| rank_model(&mut b, f, x, stream.into()));
        }
        factors
    }

    /// With `stock`: the model-stock factor of each row of `range` (empty otherwise), from the
    /// cosines of adjacent models' filtered deltas along the row, as PyTorch's
    /// `CosineSimilarity(dim=-1, eps)`: `x·y / (max(‖x‖, eps) · max(‖y‖, eps))`.
    fn stock_factors(&self, range: &Range<usize>, args: &[&[T]]) -> Vec<T> {
        let Some(eps) = self.config.stock else {
            return Vec::new();
        };
        let n = self.streams.len();
        let row = self.stock_row;
        let rows = range.len() / row;
        if n < 2 {
            return vec![T::ONE; rows];
        }
        let mut dots = vec![0f64; rows * (n - 1)];
        let mut norms = vec![0f64; rows * n];
        self.blocks(Stage::Filtered, range, args, None, |at, len, d, _| {
            for t in 0..n {
                for i in 0..len {
                    let r = (at + i) / row;
                    let v = d[t * W + i].to_f64();
                    norms[r * n + t] += v * v;
                    if t + 1 < n {
                        dots[r * (n - 1) + t] += v * d[(t + 1) * W + i].to_f64();
                    }
                }
            }
        });
        let nf = n as f64;
        (0..rows)
            .map(|r| {
                let mean = (0..n - 1)
                    .map(|t| {
                        let (a, b) = (norms[r * n + t].sqrt(), norms[r * n + t + 1].sqrt());
                        (dots[r * (n - 1) + t] / (a.max(eps) * b.max(eps))).clamp(-1.0, 1.0)
                    })
                    .sum::<f64>()
                    / (nf - 1.0);
                T::from_f64(nf * mean / (1.0 + (nf - 1.0) * mean))
            })
            .collect()
    }

    /// Whether statistic pass `pass` computes the masks that the later passes reuse.
    fn computes_masks(&self, pass: usize) -> bool {
        pass == 0 && self.della.as_ref().is_some_and(|d| d.cache_masks)
    }

    /// Runs the pipeline up to `stage` over `range` (`args[0]` is the base), a block of `W`
    /// elements at a time, calling `sink(offset, len, deltas, gamma)` per block: `deltas` holds
    /// model `t`'s values at `[t * W..t * W + len]`, `gamma` the elected signs (Filtered only).
    fn blocks(
        &self,
        stage: Stage,
        range: &Range<usize>,
        args: &[&[T]],
        factors: Option<&[T]>,
        mut sink: impl FnMut(usize, usize, &[T], &[T]),
    ) {
        let base = args[0];
        let models = &args[1..];
        let n = models.len();
        let mut d = vec![T::ZERO; n * W];
        let mut gamma = [T::ZERO; W];
        let mut words = vec![0u16; W];
        let per_element = self.config.rescale == Rescale::PerElement;
        let mut streams: Vec<rng::Stream> = match &self.config.drop {
            Drop::None => Vec::new(),
            Drop::Della(_) if self.della.as_ref().is_some_and(|d| d.exact) => Vec::new(),
            _ => self
                .streams
                .iter()
                .map(|&m| rng::Stream::new(self.seed, &self.key, m.into(), range.start))
                .collect(),
        };
        let (dare_keep, dare_scale) = match self.config.drop {
            Drop::Dare { p } => (
                rng::threshold(1.0 - p),
                T::from_f64(if per_element { 1.0 / (1.0 - p) } else { 1.0 }),
            ),
            _ => (1 << 16, T::ONE),
        };
        let computed;
        let della_exact = match (&self.della, factors) {
            (_, Some(f)) => Some(f),
            (Some(dk), None) if dk.exact => {
                computed = self.della_factors(dk, range, args);
                Some(computed.as_slice())
            }
            _ => None,
        };
        let total = range.len();
        let mut at = 0;
        while at < total {
            let len = W.min(total - at);
            let b = &base[at..at + len];
            for t in 0..n {
                let dt = &mut d[t * W..t * W + len];
                for ((o, &x), &bb) in dt.iter_mut().zip(&models[t][at..at + len]).zip(b) {
                    *o = x - bb;
                }
                if let Some(f) = della_exact {
                    for (o, &f) in dt.iter_mut().zip(&f[t * total + at..t * total + at + len]) {
                        *o *= f;
                    }
                } else if let Some(stream) = streams.get_mut(t) {
                    stream.fill(&mut words[..len]);
                    match (&self.config.drop, &self.della) {
                        (Drop::Della(cfg), Some(dk)) => {
                            // Ranks estimated from the histogram.
                            let h = &dk.hist[t];
                            let (qa, qb) = cfg.tensor_affine(self.numel);
                            let (qa, qb) = (qa as f32, qb as f32);
                            // Element `i` of the block is at `start + i` in the tensor.
                            let start = range.start + at;
                            let keep = |o: T, w: u16, i: usize| {
                                let q = (qa + qb * h.rank(key32(o), start + i)).clamp(0.0, 1.0);
                                ((w as f32) < q * 65_536.0, q)
                            };
                            if per_element {
                                for (i, (o, &w)) in dt.iter_mut().zip(&words[..len]).enumerate() {
                                    let (kept, q) = keep(*o, w, i);
                                    *o *= if kept {
                                        T::from_f64(1.0 / q as f64)
                                    } else {
                                        T::ZERO
                                    };
                                }
                            } else {
                                // A draw below every keep probability keeps the entry and one
                                // above all of them drops it, whatever its rank: only the draws
                                // within the window (a fraction |ε| of them) need the rank.
                                let (small, large) = cfg.range();
                                let lo = (small.min(large) * 65_536.0) as f32;
                                let hi = (small.max(large) * 65_536.0) as f32;
                                let w = &words[..len];
                                for (o, &w) in dt.iter_mut().zip(w) {
                                    *o *= if (w as f32) < lo { T::ONE } else { T::ZERO };
                                }
                                // The open draws, 32 at a time as the bits of a word (the
                                // comparisons vectorise), then visited bit by bit.
                                for (c, w32) in w.chunks(32).enumerate() {
                                    let mut open =
                                        w32.iter().enumerate().fold(0u32, |m, (j, &w)| {
                                            let wf = w as f32;
                                            m | (u32::from(wf >= lo && wf < hi) << j)
                                        });
                                    while open != 0 {
                                        let i = c * 32 + open.trailing_zeros() as usize;
                                        open &= open - 1;
                                        let delta = models[t][at + i] - b[i];
                                        dt[i] = if keep(delta, w[i], i).0 {
                                            delta
                                        } else {
                                            T::ZERO
                                        };
                                    }
                                }
                            }
                        }
                        _ => {
                            for (o, &w) in dt.iter_mut().zip(&words[..len]) {
                                *o *= if (w as u32) < dare_keep {
                                    dare_scale
                                } else {
                                    T::ZERO
                                };
                            }
                        }
                    }
                }
                let thr = self.thresholds.get(t).copied().unwrap_or(0);
                if stage != Stage::Dropped && thr > 0 {
                    for o in dt.iter_mut() {
                        *o *= if o.abs_key() >= thr { T::ONE } else { T::ZERO };
                    }
                }
                if stage != Stage::Dropped {
                    if let Some(&scale) = self.scales.get(t) {
                        dt.iter_mut().for_each(|o| *o *= scale);
                    }
                }
            }
            let g = &mut gamma[..len];
            if stage == Stage::Filtered && self.config.election != Election::None {
                g.fill(T::ZERO);
                for t in 0..n {
                    let dt = &d[t * W..t * W + len];
                    match self.config.election {
                        Election::Mass => g.iter_mut().zip(dt).for_each(|(s, &v)| *s += v),
                        _ => g.iter_mut().zip(dt).for_each(|(s, &v)| *s += sign(v)),
                    }
                }
                let positive_tie = self.config.sign_tie == SignTie::Positive;
                for s in g.iter_mut() {
                    let e = sign(*s);
                    *s = if e == T::ZERO && positive_tie {
                        T::ONE
                    } else {
                        e
                    };
                }
                for t in 0..n {
                    let dt = &mut d[t * W..t * W + len];
                    // Multiplying by 1 or 0 instead of a conditional store, which the compiler
                    // turns into a masked store, very slow on some CPUs.
                    for (o, &e) in dt.iter_mut().zip(g.iter()) {
                        *o *= if sign(*o) == e { T::ONE } else { T::ZERO };
                    }
                }
            }
            sink(at, len, &d, g);
            at += len;
        }
    }
}

impl<T: Real> KeyMerge<T> for KeyPipeline<T> {
    fn stat_passes(&self) -> usize {
        self.histogram_passes()
            + self.trim_passes
            + usize::from(self.config.rescale == Rescale::L1)
            + usize::from(matches!(self.config.fuse, Fuse::GeometricMedian(_)))
    }

    fn unit(&self) -> usize {
        // DELLA units (rows of `[rows, rest]`, or the tensor) are whole rows of the last
        // dimension too.
        let della = self.della.as_ref().map_or(1, |d| d.unit);
        della.max(self.stock_row)
    }

    fn notes(&self) -> Vec<String> {
        match &self.della {
            Some(d) if !d.exact => vec![format!(
                "DELLA ranks estimated from a histogram ({}); keep-probability error <= {:.1e}",
                if d.config.ranks == Ranks::Histogram {
                    "ranks = histogram"
                } else {
                    "ranks = auto, a tensor of more than 65536 elements or over 4 MiB for all models"
                },
                d.bound
            )],
            _ => Vec::new(),
        }
    }

    fn stat_block(&self, pass: usize, range: Range<usize>, args: &[&[T]]) -> Vec<f64> {
        if self.computes_masks(pass) {
            // The block's keep bits, then the pass's own statistics.
            let d = self.della.as_ref().expect("DELLA");
            let factors = self.della_factors(d, &range, args);
            let mut out = vec![range.start as f64, range.len() as f64];
            for f in factors.chunks(range.len().max(1)) {
                for word in f.chunks(64) {
                    let bits = word
                        .iter()
                        .enumerate()
                        .fold(0u64, |w, (i, &x)| w | (u64::from(x != T::ZERO) << i));
                    out.push(f64::from_bits(bits));
                }
            }
            out.extend(self.pass_stats(pass, range, args, Some(&factors)));
            out
        } else {
            self.pass_stats(pass, range, args, None)
        }
    }

    fn absorb_block(&mut self, pass: usize, block: usize, stats: Vec<f64>) {
        if self.computes_masks(pass) {
            let (start, len) = (stats[0] as usize, stats[1] as usize);
            let n = self.streams.len();
            let numel = self.numel;
            let d = self.della.as_mut().expect("DELLA");
            if d.masks.is_empty() {
                d.masks = vec![vec![0u64; numel.div_ceil(64)]; n];
            }
            let words = len.div_ceil(64);
            for (t, m) in d.masks.iter_mut().enumerate() {
                for w in 0..words {
                    let bits = stats[2 + t * words + w].to_bits();
                    for i in 0..64.min(len - w * 64) {
                        let e = start + w * 64 + i;
                        m[e / 64] |= (bits >> i & 1) << (e % 64);
                    }
                }
            }
            let rest = stats[2 + n * words..].to_vec();
            self.absorb_stats(pass, block, rest);
        } else {
            self.absorb_stats(pass, block, stats);
        }
    }

    fn finish_pass(&mut self, pass: usize) -> Result<()> {
        match self.pass(pass) {
            Pass::Histogram => {
                let numel = self.numel;
                let d = self.della.as_mut().expect("histogram pass of DELLA");
                d.hist = std::mem::take(d.counting.get_mut().expect("histogram lock"));
                d.bound = d
                    .hist
                    .iter_mut()
                    .map(|h| h.finish(d.config.eps, numel))
                    .fold(0.0, f64::max);
            }
            Pass::Trim(trim) => {
                for s in self.select.iter_mut() {
                    let mut below = 0u64;
                    let mut digit = 0u64;
                    for (dgt, &c) in s.counts.iter().enumerate() {
                        if below + c >= s.rank {
                            digit = dgt as u64;
                            break;
                        }
                        below += c;
                    }
                    s.rank -= below;
                    s.prefix = (s.prefix << DIGIT_BITS) | digit;
                    s.counts = Vec::new();
                    if trim + 1 == self.trim_passes {
                        // All digits resolved: the prefix is the threshold key (the top padding
                        // bits above the key width are zero).
                        self.thresholds.push(s.prefix);
                    }
                }
            }
            Pass::L1 => {
                let l1 = std::mem::take(&mut self.l1);
                self.scales = l1
                    .chunks(2)
                    .map(|s| {
                        let (full, kept) = (s[0], s[1]);
                        T::from_f64(if full < 1e-7 || kept < 1e-7 {
                            1.0
                        } else {
                            full / kept
                        })
                    })
                    .collect();
            }
            Pass::Gram => {
                if let Fuse::GeometricMedian(w) = self.config.fuse {
                    let gram = std::mem::take(&mut self.gram);
                    let n = self.streams.len();
                    // With `base_point` the Gram matrix has the zero delta as its last point.
                    let points = n + usize::from(self.config.base_point);
                    self.coefficients = w
                        .coefficients(&gram, points)
                        .into_iter()
                        .take(n)
                        .map(T::from_f64)
                        .collect();
                }
            }
        }
        Ok(())
    }

    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        let n = self.streams.len();
        let scale = match (self.config.rescale, self.config.drop) {
            (Rescale::InverseKeep, drop) => self.config.lambda / (1.0 - drop.p()),
            _ => self.config.lambda,
        };
        let scale = T::from_f64(scale);
        let inv_n = T::ONE / T::from_f64(n as f64);
        let voting = self.config.election != Election::None;
        let stage = match self.config.fuse {
            Fuse::GeometricMedian(_) => Stage::Filtered,
            _ => Stage::Kept,
        };
        let stock = self.stock_factors(&range, args);
        // Without drop, trim or scale the deltas are the inputs' differences: they are summed
        // straight from the inputs, without the block buffer.
        let plain = self.config.drop == Drop::None
            && self.thresholds.iter().all(|&t| t == 0)
            && self.scales.is_empty()
            && voting
            && stage == Stage::Kept;
        let mut sums = Signed::<T>::new();
        // `base + scale · result`, the result times the model-stock factor of its row if any.
        let fuse_after = |at: usize, len: usize, o: &mut [T]| {
            if stock.is_empty() {
                for (s, &b) in o.iter_mut().zip(&args[0][at..at + len]) {
                    *s = b + scale * *s;
                }
            } else {
                let row = self.stock_row;
                for (i, (s, &b)) in o.iter_mut().zip(&args[0][at..at + len]).enumerate() {
                    let v = stock[(at + i) / row] * *s;
                    // sd-mecha turns a non-finite result into 0 (the base).
                    *s = b + scale * if v.to_f64().is_finite() { v } else { T::ZERO };
                }
            }
        };
        let fuse = |at: usize, len: usize, o: &mut [T], sums: &Signed<T>| {
            if voting && stage == Stage::Kept {
                sums.fuse(len, self.config, inv_n, o);
            }
            fuse_after(at, len, o);
        };
        if plain {
            let mass = self.config.election == Election::Mass;
            for at in (0..range.len()).step_by(W) {
                let len = W.min(range.len() - at);
                sums.add_inputs(args[0], &args[1..], at, len, mass);
                fuse(at, len, &mut out[at..at + len], &sums);
            }
            return;
        }
        self.blocks(stage, &range, args, None, |at, len, d, _| {
            let o = &mut out[at..at + len];
            o.fill(T::ZERO);
            match self.config.fuse {
                _ if voting && stage == Stage::Kept => {
                    // The election and the fuse in one sweep over the models: the sums and counts
                    // of the positive and of the negative entries decide both.
                    let mass = self.config.election == Election::Mass;
                    sums.clear(len);
                    for t in 0..n {
                        sums.add(&d[t * W..t * W + len], mass);
                    }
                }
                Fuse::Mean | Fuse::Sum | Fuse::DisjointMean => {
                    // No election: every entry counts (`disjoint_mean` needs one).
                    for t in 0..n {
                        for (s, &v) in o.iter_mut().zip(&d[t * W..t * W + len]) {
                            *s += v;
                        }
                    }
                    if self.config.fuse == Fuse::Mean {
                        o.iter_mut().for_each(|s| *s *= inv_n);
                    }
                }
                Fuse::GeometricMedian(_) => {
                    for t in 0..n {
                        let c = self.coefficients[t];
                        for (s, &v) in o.iter_mut().zip(&d[t * W..t * W + len]) {
                            *s += c * v;
                        }
                    }
                }
            }
            fuse(at, len, o, &sums);
        });
    }
}

/// Per element of a block, what an election and a sign-filtered fuse need: the sums and counts of
/// the positive and of the negative entries, and (for `mass`) the sum of all of them in model
/// order.
struct Signed<T> {
    pos: [T; W],
    neg: [T; W],
    npos: [T; W],
    nneg: [T; W],
    total: [T; W],
}

impl<T: Real> Signed<T> {
    fn new() -> Self {
        Signed {
            pos: [T::ZERO; W],
            neg: [T::ZERO; W],
            npos: [T::ZERO; W],
            nneg: [T::ZERO; W],
            total: [T::ZERO; W],
        }
    }

    fn clear(&mut self, len: usize) {
        for a in [
            &mut self.pos,
            &mut self.neg,
            &mut self.npos,
            &mut self.nneg,
            &mut self.total,
        ] {
            a[..len].fill(T::ZERO);
        }
    }

    /// Adds one model's deltas `v`.
    #[inline(always)]
    fn add(&mut self, v: &[T], mass: bool) {
        self.add_with(v.len(), mass, |i| v[i]);
    }

    /// Adds the `len` deltas `delta(i)`.
    #[inline(always)]
    fn add_with(&mut self, len: usize, mass: bool, delta: impl Fn(usize) -> T) {
        let (pos, neg) = (&mut self.pos[..len], &mut self.neg[..len]);
        let (npos, nneg) = (&mut self.npos[..len], &mut self.nneg[..len]);
        let total = &mut self.total[..len];
        for i in 0..len {
            let acc = (
                &mut pos[i],
                &mut neg[i],
                &mut npos[i],
                &mut nneg[i],
                &mut total[i],
            );
            add_one(delta(i), mass, acc);
        }
    }

    /// Elects the sign of each element and fuses the entries of that sign into `o`.
    #[inline(always)]
    fn fuse(&self, len: usize, config: Config, inv_n: T, o: &mut [T]) {
        let o = &mut o[..len];
        for (i, o) in o.iter_mut().enumerate() {
            let sums = [
                self.pos[i],
                self.neg[i],
                self.npos[i],
                self.nneg[i],
                self.total[i],
            ];
            *o = fuse_one(sums, config, inv_n);
        }
    }
}

/// Adds one delta `v` to the sums and counts of its sign `(pos, neg, npos, nneg, total)`.
#[inline(always)]
fn add_one<T: Real>(
    v: T,
    mass: bool,
    (pos, neg, npos, nneg, total): (&mut T, &mut T, &mut T, &mut T, &mut T),
) {
    let (p, m) = (v > T::ZERO, v < T::ZERO);
    // Selects rather than branches, so that the loop vectorises.
    *pos += if p { v } else { T::ZERO };
    *npos += if p { T::ONE } else { T::ZERO };
    *neg += if m { v } else { T::ZERO };
    *nneg += if m { T::ONE } else { T::ZERO };
    if mass {
        *total += v;
    }
}

/// The elected sign's fused value from the sums and counts `[pos, neg, npos, nneg, total]`.
#[inline(always)]
fn fuse_one<T: Real>([pos, neg, npos, nneg, total]: [T; 5], config: Config, inv_n: T) -> T {
    let positive_tie = config.sign_tie == SignTie::Positive;
    let mass = config.election == Election::Mass;
    // 0/1 factors rather than selects or branches: the elected sign of random data is
    // unpredictable, and the compiler turns selects of loads into branches.
    let one = |c: bool| if c { T::ONE } else { T::ZERO };
    let vote = if mass { total } else { npos - nneg };
    let up = one(vote > T::ZERO || (positive_tie && vote == T::ZERO));
    let down = one(vote < T::ZERO);
    let sum = up * pos + down * neg;
    let count = up * npos + down * nneg;
    match config.fuse {
        // No entry of the elected sign: the sum is 0 too.
        Fuse::DisjointMean => sum / (count + one(count == T::ZERO)),
        Fuse::Mean => sum * inv_n,
        _ => sum,
    }
}

/// Elements of a run whose sums and counts [`Signed::add_inputs`] holds in registers.
const LANES: usize = 8;

impl<T: Real> Signed<T> {
    /// Sets the sums and counts of the deltas `x_t − base` of every model, elements
    /// `at..at + len` (`len ≤ W`), straight from the inputs: `LANES` elements at a time, held in
    /// registers while every model is added, so each input element is loaded once and each sum
    /// stored once. Adds in model order like [`Signed::add`], to the same bits.
    fn add_inputs(&mut self, base: &[T], models: &[&[T]], at: usize, len: usize, mass: bool) {
        let main = len / LANES * LANES;
        for i in (0..main).step_by(LANES) {
            let b: &[T; LANES] = base[at + i..at + i + LANES].try_into().expect("a run");
            let mut acc = [[T::ZERO; LANES]; 5];
            for x in models {
                let x: &[T; LANES] = x[at + i..at + i + LANES].try_into().expect("a run");
                let [pos, neg, npos, nneg, total] = &mut acc;
                for j in 0..LANES {
                    let sums = (
                        &mut pos[j],
                        &mut neg[j],
                        &mut npos[j],
                        &mut nneg[j],
                        &mut total[j],
                    );
                    add_one(x[j] - b[j], mass, sums);
                }
            }
            let run = i..i + LANES;
            self.pos[run.clone()].copy_from_slice(&acc[0]);
            self.neg[run.clone()].copy_from_slice(&acc[1]);
            self.npos[run.clone()].copy_from_slice(&acc[2]);
            self.nneg[run.clone()].copy_from_slice(&acc[3]);
            self.total[run].copy_from_slice(&acc[4]);
        }
        for j in main..len {
            let mut acc = [T::ZERO; 5];
            for x in models {
                let [pos, neg, npos, nneg, total] = &mut acc;
                add_one(
                    x[at + j] - base[at + j],
                    mass,
                    (pos, neg, npos, nneg, total),
                );
            }
            let [pos, neg, npos, nneg, total] = acc;
            (self.pos[j], self.neg[j], self.npos[j], self.nneg[j]) = (pos, neg, npos, nneg);
            self.total[j] = total;
        }
    }
}

impl<T: Real> KeyPipeline<T> {
    /// The statistics of pass `pass` for one block; `factors` are the DELLA factors when the
    /// caller has computed them already.
    fn pass_stats(
        &self,
        pass: usize,
        range: Range<usize>,
        args: &[&[T]],
        factors: Option<&[T]>,
    ) -> Vec<f64> {
        let n = self.streams.len();
        match self.pass(pass) {
            Pass::Histogram => {
                let d = self.della.as_ref().expect("histogram pass of DELLA");
                let mut counts = BlockCounts::default();
                for (t, x) in args[1..].iter().enumerate() {
                    let deltas = x.iter().zip(args[0]).map(|(&a, &b)| a - b);
                    RankHistogram::count_block(deltas, &mut counts);
                    let mut hist = d.counting.lock().expect("histogram lock");
                    if hist.is_empty() {
                        hist.extend((0..n).map(|_| RankHistogram::new()));
                    }
                    hist[t].absorb(&counts);
                }
                Vec::new()
            }
            Pass::Trim(trim) => {
                // Histogram of the next digit of |δ| among the keys matching each model's prefix.
                let (shift, high) = Self::digit_shift(trim);
                let mask = (1u64 << DIGIT_BITS) - 1;
                let mut h = vec![0f64; n << DIGIT_BITS];
                self.blocks(Stage::Dropped, &range, args, factors, |_, len, d, _| {
                    for t in 0..n {
                        let prefix = self.select[t].prefix;
                        let ht = &mut h[t << DIGIT_BITS..(t + 1) << DIGIT_BITS];
                        for v in &d[t * W..t * W + len] {
                            let key = v.abs_key();
                            if high >= 64 || key >> high == prefix {
                                ht[((key >> shift) & mask) as usize] += 1.0;
                            }
                        }
                    }
                });
                h
            }
            Pass::L1 => {
                // Per model: Σ|δ| of the whole delta and of the entries kept by drop and trim.
                let mut sums = vec![0f64; 2 * n];
                for (t, x) in args[1..].iter().enumerate() {
                    sums[2 * t] = x
                        .iter()
                        .zip(args[0])
                        .map(|(&v, &b)| (v - b).abs().to_f64())
                        .sum();
                }
                self.blocks(Stage::Kept, &range, args, factors, |_, len, d, _| {
                    for t in 0..n {
                        sums[2 * t + 1] += d[t * W..t * W + len]
                            .iter()
                            .map(|v| v.abs().to_f64())
                            .sum::<f64>();
                    }
                });
                sums
            }
            Pass::Gram => {
                // The filtered deltas, one row per model, `GRAM_SPAN` elements at a time, then a
                // matrix product per span: the buffer does not grow with the block (a whole
                // tensor, for units ranked exactly). The rows are centred on the per-element mean
                // as they are filled (distances do not change, and centred points keep the
                // products' rounding small next to the distances).
                // With `base_point`, a last row for the base as a zero delta; it enters the mean
                // like every other point.
                let points = n + usize::from(self.config.base_point);
                // Fewer elements per span for many points: the rows take about as much memory
                // as 9 points' (a power of two of at least `W` elements).
                let fit = (GRAM_SPAN * 9 / points).max(W);
                let span = (1usize << fit.ilog2()).min(GRAM_SPAN).min(range.len());
                let mut rows = vec![0f64; points * span];
                let mut g = vec![0.0; points * points];
                let mut mean = [0f64; W];
                let inv = 1.0 / points as f64;
                let mut filled = 0;
                self.blocks(Stage::Filtered, &range, args, factors, |at, len, d, _| {
                    debug_assert_eq!(at % span, filled);
                    let mean = &mut mean[..len];
                    mean.fill(0.0);
                    for t in 0..n {
                        for (m, &v) in mean.iter_mut().zip(&d[t * W..t * W + len]) {
                            *m += v.to_f64();
                        }
                    }
                    mean.iter_mut().for_each(|m| *m *= inv);
                    for t in 0..points {
                        let row = &mut rows[t * span + filled..t * span + filled + len];
                        if t < n {
                            for ((o, &v), &m) in
                                row.iter_mut().zip(&d[t * W..t * W + len]).zip(&*mean)
                            {
                                *o = v.to_f64() - m;
                            }
                        } else {
                            for (o, &m) in row.iter_mut().zip(&*mean) {
                                *o = 0.0 - m;
                            }
                        }
                    }
                    filled += len;
                    if filled == span || at + len == range.len() {
                        if filled < span {
                            // The last, shorter span: its rows packed to its length.
                            for t in 1..points {
                                rows.copy_within(t * span..t * span + filled, t * filled);
                            }
                        }
                        gram_of_rows(&rows[..points * filled], points, filled, &mut g);
                        filled = 0;
                    }
                });
                g
            }
        }
    }

    fn absorb_stats(&mut self, pass: usize, _block: usize, stats: Vec<f64>) {
        match self.pass(pass) {
            // The blocks have added their counts already.
            Pass::Histogram => {}
            Pass::Trim(_) => {
                for (t, s) in self.select.iter_mut().enumerate() {
                    if s.counts.is_empty() {
                        s.counts = vec![0; 1 << DIGIT_BITS];
                    }
                    let h = &stats[t << DIGIT_BITS..(t + 1) << DIGIT_BITS];
                    for (c, &x) in s.counts.iter_mut().zip(h) {
                        *c += x as u64;
                    }
                }
            }
            Pass::L1 => accumulate(&mut self.l1, stats),
            Pass::Gram => accumulate(&mut self.gram, stats),
        }
    }
}
