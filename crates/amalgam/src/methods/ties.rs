//! The delta pipeline behind TIES, TIES-SOUP, DARE, TSD and TGMD (spec §2-§5, §8, §19.3):
//!
//! `δ_t = θ_t − θ_0` → drop (DARE mask) → trim (keep the fraction `k` of largest |δ_t|) →
//! elect a sign per element (`mass`: sign of Σ δ_t; `count`: sign of Σ sgn δ_t) → keep the entries
//! of the elected sign → fuse (disjoint mean | mean | sum | geometric median) → rescale →
//! `θ = θ_0 + λ · result`.
//!
//! Every stage is a named option; the presets (`ties`, `ties_soup`, `dare`, `tsd`, `tgmd`) differ
//! only in their defaults, so each can be tuned into any other.

use super::geometric_median::{add_gram, Weiszfeld};
use crate::error::{Error, Result};
use crate::method::*;
use crate::real::Real;
use crate::rng;
use std::ops::Range;

/// Which entries of the deltas are dropped at random before anything else.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Drop {
    None,
    /// DARE: every entry is dropped with probability `p`, independently.
    Dare {
        p: f64,
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
    None,
    /// `1 / (1 − p)` of the DARE drop, once on the result (sd-mecha's `rescale`).
    InverseKeep,
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
}

macro_rules! pipeline_info {
    ($name:literal, $summary:literal, $drop:literal, $p:literal, $k:literal, $election:literal, $fuse:literal, $rescale:literal) => {
        MethodInfo {
            name: $name,
            formula: "base + lambda * rescale(fuse(elect(trim(drop(models[t] - base)))))",
            summary: $summary,
            slots: &[
                Slot { name: "base", kind: SlotKind::One, doc: "the pre-trained model" },
                Slot { name: "models", kind: SlotKind::Many, doc: "the fine-tuned models" },
            ],
            params: &[
                ParamInfo { name: "drop", default: Some($drop), doc: "none | dare" },
                ParamInfo { name: "p", default: Some($p), doc: "drop probability of `dare`, in [0, 1)" },
                ParamInfo { name: "k", default: Some($k), doc: "fraction kept by magnitude per model and tensor, (0, 1]; entries equal to the threshold are all kept" },
                ParamInfo { name: "election", default: Some($election), doc: "mass (sign of the sum) | count (sign of the sum of signs) | none" },
                ParamInfo { name: "sign_tie", default: Some("zero"), doc: "zero (keep the base) | positive" },
                ParamInfo { name: "fuse", default: Some($fuse), doc: "disjoint_mean | mean | sum | geometric_median" },
                ParamInfo { name: "rescale", default: Some($rescale), doc: "none | inverse_keep (divide by 1 - p)" },
                ParamInfo { name: "lambda", default: Some("1.0"), doc: "scale of the merged delta" },
                ParamInfo { name: "base_point", default: Some("false"), doc: "geometric median: add the base as a zero-delta point" },
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

/// A configured pipeline, registered under one of the preset names.
pub struct Pipeline {
    info: &'static MethodInfo,
    config: Config,
}

impl Pipeline {
    fn build(info: &'static MethodInfo, mut params: Params) -> Result<Self> {
        let default = |name: &str| {
            info.params
                .iter()
                .find(|p| p.name == name)
                .and_then(|p| p.default)
                .expect("preset default")
        };
        let static_default = |name: &str| -> &'static str {
            info.params
                .iter()
                .find(|p| p.name == name)
                .and_then(|p| p.default)
                .expect("preset default")
        };
        let bad = |msg: String| Error::method(info.name, msg);
        let drop_kind = params.choice("drop", &["none", "dare"], static_default("drop"))?;
        let p = params.number("p", default("p").parse().unwrap())?;
        let drop = match drop_kind {
            "dare" => {
                if !(0.0..1.0).contains(&p) {
                    return Err(bad(format!("`p` must be in [0, 1), got {p}")));
                }
                Drop::Dare { p }
            }
            _ => Drop::None,
        };
        let k = params.number("k", default("k").parse().unwrap())?;
        if !(k > 0.0 && k <= 1.0) {
            return Err(bad(format!("`k` must be in (0, 1], got {k}")));
        }
        let election = match params.choice(
            "election",
            &["mass", "count", "none"],
            static_default("election"),
        )? {
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
            static_default("fuse"),
        )? {
            "disjoint_mean" => Fuse::DisjointMean,
            "mean" => Fuse::Mean,
            "sum" => Fuse::Sum,
            _ => Fuse::GeometricMedian(weiszfeld),
        };
        let rescale = match params.choice(
            "rescale",
            &["none", "inverse_keep"],
            static_default("rescale"),
        )? {
            "inverse_keep" => Rescale::InverseKeep,
            _ => Rescale::None,
        };
        if rescale == Rescale::InverseKeep && drop == Drop::None {
            return Err(bad(
                "`rescale = \"inverse_keep\"` needs `drop = \"dare\"`".into()
            ));
        }
        if fuse == Fuse::DisjointMean && election == Election::None {
            return Err(bad(
                "`fuse = \"disjoint_mean\"` needs an election (mass or count)".into(),
            ));
        }
        let lambda = params.number("lambda", 1.0)?;
        let base_point = params.boolean("base_point", false)?;
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

    pub fn config(&self) -> &Config {
        &self.config
    }
}

impl<T: Real> Method<T> for Pipeline {
    fn info(&self) -> &'static MethodInfo {
        self.info
    }
    fn on_missing(&self, present: &[bool]) -> OnMissing {
        if !present[0] {
            OnMissing::Absent
        } else if present[1..].iter().any(|&p| p) {
            OnMissing::MergePresent
        } else {
            OnMissing::PassThrough(0)
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
        Ok(Box::new(KeyPipeline {
            config: self.config,
            key: ctx.key.to_string(),
            seed: ctx.seed,
            streams: ctx.present[1..].iter().map(|&i| i as u64).collect(),
            trim_passes,
            select: (0..n)
                .map(|_| Select {
                    prefix: 0,
                    rank,
                    counts: vec![0; 1 << DIGIT_BITS],
                })
                .collect(),
            thresholds: vec![0; n],
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
    counts: Vec<u64>,
}

struct KeyPipeline<T> {
    config: Config,
    key: String,
    seed: u64,
    /// The random stream of each present model (its position among the node's arguments).
    streams: Vec<u64>,
    trim_passes: usize,
    select: Vec<Select>,
    /// Per model, the smallest |δ| key that is kept (0 keeps everything).
    thresholds: Vec<u64>,
    gram: Vec<f64>,
    coefficients: Vec<T>,
}

impl<T: Real> KeyPipeline<T> {
    /// The bits of pass `pass`'s digit: (shift, already-resolved high bits' shift).
    fn digit_shift(pass: usize) -> (u32, u32) {
        let top = T::KEY_BITS.div_ceil(DIGIT_BITS) * DIGIT_BITS;
        let shift = top - DIGIT_BITS * (pass as u32 + 1);
        (shift, shift + DIGIT_BITS)
    }

    /// The dropped deltas of the present models on `range` (`args[0]` is the base).
    fn dropped(&self, range: &Range<usize>, args: &[&[T]]) -> Vec<Vec<T>> {
        let base = args[0];
        let mut words = vec![0u32; range.len()];
        args[1..]
            .iter()
            .zip(&self.streams)
            .map(|(x, &stream)| {
                let mut d: Vec<T> = x.iter().zip(base).map(|(&v, &b)| v - b).collect();
                if let Drop::Dare { p } = self.config.drop {
                    rng::words(self.seed, &self.key, stream, range.start, &mut words);
                    let keep = rng::threshold(1.0 - p);
                    for (v, &w) in d.iter_mut().zip(&words) {
                        if (w as u64) >= keep {
                            *v = T::ZERO;
                        }
                    }
                }
                d
            })
            .collect()
    }

    /// The deltas after drop, trim and the sign filter; also the elected sign per element.
    fn filtered(&self, range: &Range<usize>, args: &[&[T]]) -> (Vec<Vec<T>>, Vec<i8>) {
        let mut d = self.dropped(range, args);
        for (dt, &thr) in d.iter_mut().zip(&self.thresholds) {
            if thr > 0 {
                for v in dt.iter_mut() {
                    if v.abs_key() < thr {
                        *v = T::ZERO;
                    }
                }
            }
        }
        let len = range.len();
        let sign = |v: T| -> i8 {
            if v > T::ZERO {
                1
            } else if v < T::ZERO {
                -1
            } else {
                0
            }
        };
        let mut gamma = vec![0i8; len];
        if self.config.election != Election::None {
            for (i, g) in gamma.iter_mut().enumerate() {
                let s = match self.config.election {
                    Election::Mass => {
                        let mut total = T::ZERO;
                        for dt in &d {
                            total += dt[i];
                        }
                        sign(total)
                    }
                    _ => {
                        let mut votes = 0i64;
                        for dt in &d {
                            votes += sign(dt[i]) as i64;
                        }
                        votes.signum() as i8
                    }
                };
                *g = if s == 0 && self.config.sign_tie == SignTie::Positive {
                    1
                } else {
                    s
                };
            }
            for dt in d.iter_mut() {
                for (v, &g) in dt.iter_mut().zip(&gamma) {
                    if sign(*v) != g {
                        *v = T::ZERO;
                    }
                }
            }
        }
        (d, gamma)
    }
}

impl<T: Real> KeyMerge<T> for KeyPipeline<T> {
    fn stat_passes(&self) -> usize {
        self.trim_passes + usize::from(matches!(self.config.fuse, Fuse::GeometricMedian(_)))
    }

    fn stat_block(&self, pass: usize, range: Range<usize>, args: &[&[T]]) -> Vec<f64> {
        if pass < self.trim_passes {
            // Histogram of the next digit of |δ| among the keys matching each model's prefix.
            let (shift, high) = Self::digit_shift(pass);
            let mask = (1u64 << DIGIT_BITS) - 1;
            let d = self.dropped(&range, args);
            let mut h = vec![0f64; d.len() << DIGIT_BITS];
            for (t, dt) in d.iter().enumerate() {
                let prefix = self.select[t].prefix;
                for v in dt {
                    let key = v.abs_key();
                    if high >= 64 || key >> high == prefix {
                        h[(t << DIGIT_BITS) + ((key >> shift) & mask) as usize] += 1.0;
                    }
                }
            }
            h
        } else {
            let (f, _) = self.filtered(&range, args);
            let points: Vec<&[T]> = f.iter().map(|v| v.as_slice()).collect();
            let mut g = vec![0.0; points.len() * points.len()];
            add_gram(&points, &mut g);
            g
        }
    }

    fn absorb_block(&mut self, pass: usize, _block: usize, stats: Vec<f64>) {
        if pass < self.trim_passes {
            for (t, s) in self.select.iter_mut().enumerate() {
                let h = &stats[t << DIGIT_BITS..(t + 1) << DIGIT_BITS];
                for (c, &x) in s.counts.iter_mut().zip(h) {
                    *c += x as u64;
                }
            }
        } else {
            if self.gram.is_empty() {
                self.gram = vec![0.0; stats.len()];
            }
            for (a, b) in self.gram.iter_mut().zip(stats) {
                *a += b;
            }
        }
    }

    fn finish_pass(&mut self, pass: usize) -> Result<()> {
        if pass < self.trim_passes {
            for (t, s) in self.select.iter_mut().enumerate() {
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
                s.counts.iter_mut().for_each(|c| *c = 0);
                if pass + 1 == self.trim_passes {
                    // All digits resolved: the prefix is the threshold key (the top padding bits
                    // above the key width are zero).
                    self.thresholds[t] = s.prefix;
                }
            }
        } else if let Fuse::GeometricMedian(w) = self.config.fuse {
            let n = self.streams.len();
            let (gram, points) = if self.config.base_point {
                // The base is the zero delta: a zero row and column.
                let m = n + 1;
                let mut g = vec![0.0; m * m];
                for s in 0..n {
                    for t in 0..n {
                        g[s * m + t] = self.gram[s * n + t];
                    }
                }
                (g, m)
            } else {
                (self.gram.clone(), n)
            };
            self.coefficients = w
                .coefficients(&gram, points)
                .into_iter()
                .take(n)
                .map(T::from_f64)
                .collect();
        }
        Ok(())
    }

    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        let (f, gamma) = self.filtered(&range, args);
        let n = f.len();
        match self.config.fuse {
            Fuse::DisjointMean => {
                for (i, o) in out.iter_mut().enumerate() {
                    let mut total = T::ZERO;
                    let mut count = 0usize;
                    for ft in &f {
                        if ft[i] != T::ZERO {
                            total += ft[i];
                            count += 1;
                        }
                    }
                    *o = if gamma[i] == 0 || count == 0 {
                        T::ZERO
                    } else {
                        total / T::from_f64(count as f64)
                    };
                }
            }
            Fuse::Mean | Fuse::Sum => {
                out.fill(T::ZERO);
                for ft in &f {
                    for (o, &v) in out.iter_mut().zip(ft) {
                        *o += v;
                    }
                }
                if self.config.fuse == Fuse::Mean {
                    let inv = T::ONE / T::from_f64(n as f64);
                    out.iter_mut().for_each(|o| *o *= inv);
                }
            }
            Fuse::GeometricMedian(_) => {
                out.fill(T::ZERO);
                for (ft, &c) in f.iter().zip(&self.coefficients) {
                    for (o, &v) in out.iter_mut().zip(ft) {
                        *o += c * v;
                    }
                }
            }
        }
        let scale = match (self.config.rescale, self.config.drop) {
            (Rescale::InverseKeep, Drop::Dare { p }) => self.config.lambda / (1.0 - p),
            _ => self.config.lambda,
        };
        let scale = T::from_f64(scale);
        for (o, &b) in out.iter_mut().zip(args[0]) {
            *o = b + scale * *o;
        }
    }
}
