//! A configured pipeline: its parameters, and what it does per key.

use super::*;

/// A configured pipeline, registered under one of the preset names.
pub struct Pipeline {
    info: &'static MethodInfo,
    config: Config,
}

impl Pipeline {
    pub(crate) fn build(info: &'static MethodInfo, mut params: Params) -> Result<Self> {
        let bad = |msg: String| Error::method(info.name, msg);
        let drop_kind = params.choice("drop")?;
        let p = params.number("p")?;
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
        let k = params.number("k")?;
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
        let fuse = match params.choice("fuse")? {
            "disjoint_mean" => Fuse::DisjointMean,
            "mean" => Fuse::Mean,
            "sum" => Fuse::Sum,
            _ => Fuse::GeometricMedian(weiszfeld),
        };
        let rescale = match params.choice("rescale")? {
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
                Some(cos_eps)
            }
            _ => None,
        };
        if base_point && !matches!(fuse, Fuse::GeometricMedian(_)) {
            return Err(bad(
                "`base_point` only applies to `fuse = \"geometric_median\"`".into(),
            ));
        }
        params.finish()?;
        Ok(Pipeline {
            info,
            config: Config {
                drop,
                k,
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

    /// The pipeline of preset `name` with `params`, or `None` when `name` is not one of them.
    pub fn named(name: &str, params: Params) -> Option<Result<Self>> {
        let info = [&TIES, &TIES_SOUP, &DARE, &DELLA, &TSD, &TGMD, &DGMLA]
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
                .map(|_| Select { prefix: 0, rank })
                .collect(),
            thresholds: Vec::new(),
            scales: Vec::new(),
            coefficients: Vec::new(),
            filtered: Vec::new(),
        }))
    }
}
