//! A configured pipeline: its parameters, and what it does per key.

use super::*;

/// A configured pipeline, registered under one of the preset names.
pub struct Pipeline {
    info: &'static MethodInfo,
    config: Config,
    /// Per fine-tune, its weight (empty when every weight is 1).
    weights: Vec<f64>,
}

impl Pipeline {
    pub(crate) fn build(info: &'static MethodInfo, mut params: Params) -> Result<Self> {
        let bad = |msg: String| Error::method(info.name, msg);
        let weights = params.per_model("weights")?;
        let weights = if weights.iter().all(|&w| w == 1.0) {
            Vec::new()
        } else {
            weights
        };
        let drop_kind = params.choice("drop")?;
        let density = params.optional_number("density")?;
        let p_given = params.is_given("p");
        let k_given = params.is_given("k");
        let mut p = params.number("p")?;
        let mut k = params.number("k")?;
        if let Some(density) = density {
            match (drop_kind, p_given, k_given) {
                ("none", _, true) | (_, true, _) => {
                    return Err(bad(format!(
                        "give `density` (mergekit's keep fraction) or `{}`, not both",
                        if drop_kind == "none" { "k" } else { "p" }
                    )))
                }
                ("none", _, _) => k = density,
                _ => p = 1.0 - density,
            }
        }
        let della_eps_given = params.is_given("della_eps");
        let della_eps = params.number("della_eps")?;
        let epsilon = params.optional_number("epsilon")?;
        let eps = match (della_eps_given, epsilon) {
            (true, Some(_)) => {
                return Err(bad(
                    "give `della_eps` (total width) or `epsilon` (half width), not both".into(),
                ))
            }
            (false, Some(epsilon)) => 2.0 * epsilon,
            _ => della_eps,
        };
        let rank = match params.choice("rank")? {
            "row" => Rank::Row,
            _ => Rank::Tensor,
        };
        if drop_kind != "della" && (della_eps_given || epsilon.is_some()) {
            return Err(bad(
                "`della_eps` and `epsilon` only apply to `drop = \"della\"`".into(),
            ));
        }
        let strict = params.choice("della_bounds")? == "strict";
        let ranks = match params.choice("ranks")? {
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
        if strict && drop_kind == "della" && p > 0.0 {
            let (small, large) = (1.0 - p - eps / 2.0, 1.0 - p + eps / 2.0);
            if small.min(large) <= 0.0 || small.max(large) >= 1.0 {
                return Err(bad(format!(
                    "`della_bounds = \"strict\"` needs the keep probabilities within (0, 1): \
                     1 - p -/+ della_eps/2 are {small} and {large} (mergekit: density +/- epsilon)"
                )));
            }
        }
        let drop = match drop_kind {
            "dare" => Drop::Dare { p },
            // mergekit: density 1 (p = 0) turns DELLA off.
            "della" if strict && p <= 0.0 => Drop::None,
            "della" => Drop::Della(Della {
                p,
                eps,
                rank,
                ranks,
            }),
            _ => Drop::None,
        };
        let gamma_given = params.is_given("gamma");
        let gamma = params.number("gamma")?;
        let trim = match params.choice("trim")? {
            "top_k" => Trim::TopK,
            "outliers" => Trim::Outliers { gamma },
            _ => Trim::Threshold,
        };
        if gamma_given && !matches!(trim, Trim::Outliers { .. }) {
            return Err(bad(
                "`gamma` and `trim = \"outliers\"` only apply together".into()
            ));
        }
        // int8_mask changes nothing here (see its declaration).
        params.boolean("int8_mask")?;
        let election = match params.choice("election")? {
            "mass" => Election::Mass,
            "count" => Election::Count,
            _ => Election::None,
        };
        let sign_tie = match params.choice("sign_tie")? {
            "positive" => SignTie::Positive,
            _ => SignTie::Zero,
        };
        let min_agreement = params.number("min_agreement")?;
        let agreement = match params.choice("agreement")? {
            "elected" => AgreementCount::Elected,
            _ => AgreementCount::Participating,
        };
        let agreement = (min_agreement > 0.0).then_some(Agreement {
            min: min_agreement,
            count: agreement,
        });
        if agreement.is_some() && election == Election::None {
            return Err(bad(
                "`min_agreement` needs an election (mass or count)".into()
            ));
        }
        let weiszfeld = Weiszfeld::from_params(&mut params)?;
        let normalize = params
            .is_given("normalize")
            .then(|| params.boolean("normalize"))
            .transpose()?;
        let fuse_given = params.is_given("fuse");
        let declared_fuse = params.choice("fuse")?;
        if normalize.is_some() && fuse_given {
            return Err(bad(
                "give `normalize` (mergekit's name) or `fuse`, not both".into(),
            ));
        }
        if normalize.is_some() && declared_fuse == "geometric_median" {
            return Err(bad(
                "`normalize` (mergekit's) and the mean and sum fuses only apply together, not \
                 with `fuse = \"geometric_median\"`"
                    .into(),
            ));
        }
        if normalize.is_some() && declared_fuse == "mean" && election != Election::None {
            return Err(bad(
                "`normalize` (mergekit's) and an election only apply with `disjoint_mean` or \
                 `sum`, not with this preset's `fuse = \"mean\"`"
                    .into(),
            ));
        }
        let fuse = match normalize {
            Some(true) if election == Election::None => "mean",
            Some(true) => "disjoint_mean",
            Some(false) => "sum",
            None => declared_fuse,
        };
        let fuse = match fuse {
            "disjoint_mean" => Fuse::DisjointMean,
            "mean" => Fuse::Mean,
            "sum" => Fuse::Sum,
            _ => Fuse::GeometricMedian(weiszfeld),
        };
        let rescale = match params.choice("rescale")? {
            "inverse_keep" => Rescale::InverseKeep,
            "per_element" => Rescale::PerElement,
            // Nothing dropped or trimmed: the norms are the same (mergekit returns the delta
            // untouched), so no scale that rounding could make differ from 1.
            "l1" if k >= 1.0 && (drop == Drop::None || drop == Drop::Dare { p: 0.0 }) => {
                Rescale::None
            }
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
        // The shrink of every filtered delta scales the fused result alike (every fuse is
        // linear or, the geometric median, equivariant under scaling).
        let lambda = params.number("lambda")? * (1.0 - params.number("weight_decay")?);
        let base_point = params.boolean("base_point")?;
        let cos_eps = params.number("cos_eps")?;
        let stock = match params.choice("stock")? {
            "adjacent_rows" => {
                if matches!(fuse, Fuse::GeometricMedian(_)) {
                    return Err(bad(
                        "`stock` applies to the mean fuses, not to `geometric_median`".into(),
                    ));
                }
                Stock::AdjacentRows(cos_eps)
            }
            "positive_pairs" => {
                if matches!(fuse, Fuse::GeometricMedian(_)) {
                    return Err(bad(
                        "`stock` applies to the mean fuses, not to `geometric_median`".into(),
                    ));
                }
                Stock::PositivePairs
            }
            _ => Stock::None,
        };
        if matches!(fuse, Fuse::GeometricMedian(_)) && !weights.is_empty() {
            return Err(bad(
                "`weights` apply to the mean and sum fuses, not to `geometric_median`".into(),
            ));
        }
        if base_point && !matches!(fuse, Fuse::GeometricMedian(_)) {
            return Err(bad(
                "`base_point` only applies to `fuse = \"geometric_median\"`".into(),
            ));
        }
        params.finish()?;
        Ok(Pipeline {
            info,
            weights,
            config: Config {
                drop,
                k,
                trim,
                election,
                sign_tie,
                agreement,
                fuse,
                rescale,
                lambda,
                base_point,
                stock,
            },
        })
    }

    /// The pipeline of the preset its parameters were bound to by the registry.
    pub fn new(params: Params) -> Result<Self> {
        let info = params.info().expect("parameters bound to a preset");
        Self::build(info, params)
    }

    /// The pipeline's stages as configured.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether every fine-tune's weight is 1.
    pub fn unit_weights(&self) -> bool {
        self.weights.is_empty()
    }

    /// The pipeline of preset `name` with `params`, or `None` when `name` is not one of them.
    pub fn named(name: &str, params: Params) -> Option<Result<Self>> {
        let info = [
            &TIES,
            &TIES_SOUP,
            &DARE,
            &DELLA,
            &TSD,
            &TGMD,
            &DGMLA,
            &DARE_TIES,
            &DARE_LINEAR,
            &DELLA_LINEAR,
            &BREADCRUMBS,
            &BREADCRUMBS_TIES,
        ]
        .into_iter()
        .find(|i| i.name == name)?;
        Some(Self::build(info, params.bind(info, &[])))
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
        // The 1-based ranks (ascending |δ|) of the trim's thresholds: entries from the first to
        // the second (or the largest) are kept; `None`: nothing is kept.
        let trim = self.config.k < 1.0 && numel > 0;
        let (n_f, k) = (numel as f64, self.config.k);
        let ranks: Option<(u64, Option<u64>)> = match self.config.trim {
            Trim::Threshold => Some((((1.0 - k) * n_f).floor() as u64).max(1)).map(|r| (r, None)),
            Trim::TopK if k <= 0.0 => None,
            Trim::TopK => Some((
                (numel as u64).saturating_sub(((k * n_f).floor() as u64).max(1)) + 1,
                None,
            )),
            Trim::Outliers { gamma } => {
                let target = (k * n_f).floor() as u64;
                let top = (gamma * n_f).floor() as u64;
                let bottom = (numel as u64).saturating_sub(target + top);
                (target > 0).then_some((bottom + 1, Some(bottom + target)))
            }
        };
        let trim_passes = if trim && ranks.is_some() {
            T::KEY_BITS.div_ceil(DIGIT_BITS) as usize
        } else {
            0
        };
        // A trim that keeps nothing: thresholds no key reaches.
        let thresholds = if trim && ranks.is_none() {
            vec![u64::MAX; n]
        } else {
            Vec::new()
        };
        let select = match ranks {
            Some((low, high)) if trim_passes > 0 => (0..n)
                .map(|_| Select {
                    prefix: 0,
                    rank: low,
                })
                .chain(high.into_iter().flat_map(|high| {
                    (0..n).map(move |_| Select {
                        prefix: 0,
                        rank: high,
                    })
                }))
                .collect(),
            _ => Vec::new(),
        };
        let della = match self.config.drop {
            Drop::Della(d) => {
                let unit: usize = d.unit_len(ctx.shape).max(1);
                // The unit's inputs, their deltas and masks, and a sort buffer.
                let unit_bytes = (unit * ((2 * n + 2) * std::mem::size_of::<T>() + 16)) as u64;
                // Small: the tensor of every model fits a few MiB, whatever the number of models.
                // The choice depends on the tensor and the model count only, never on the budget
                // or the threads, so the output bytes do not either: a budget too small for an
                // exact ranking is an error of the engine (see `unit`), not a silent switch to
                // the histogram.
                let small = numel <= SMALL_TENSOR && unit_bytes <= SMALL_UNIT_BYTES;
                let exact = match d.ranks {
                    // Rows are always ranked exactly (they are short); whole tensors when they
                    // are small, else from a histogram (a sort per model costs ~30 times more).
                    Ranks::Auto => d.rank == Rank::Row || small,
                    Ranks::Exact => true,
                    // Sorting a small tensor costs less than a histogram's bins.
                    Ranks::Histogram => small,
                };
                if !exact && numel > u32::MAX as usize {
                    return Err(Error::method(
                        self.info.name,
                        "tensors of more than 2^32 elements are not supported by DELLA".to_string(),
                    ));
                }
                Some(DellaKey {
                    config: d,
                    unit: if exact { unit } else { 1 },
                    unit_bytes: if exact { unit_bytes } else { 0 },
                    exact,
                    hist: Vec::new(),
                    bound: 0.0,
                    cache_masks: exact && self.config.rescale != Rescale::PerElement,
                    masks: Vec::new(),
                })
            }
            _ => None,
        };
        Ok(Box::new(KeyPipeline {
            della,
            stock_row: if matches!(self.config.stock, Stock::AdjacentRows(_)) {
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
            // on: without a trim it takes no memory per model); `outliers` has two.
            select,
            thresholds,
            weights: if self.weights.is_empty() {
                Vec::new()
            } else {
                ctx.present[1..]
                    .iter()
                    .map(|&i| T::from_f64(self.weights[i - 1]))
                    .collect()
            },
            scales: Vec::new(),
            coefficients: Vec::new(),
            pair_factor: T::ONE,
            filtered: Vec::new(),
        }))
    }
}
