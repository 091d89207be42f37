//! The engine's interface for one key: statistic passes and the merge of a chunk.

use super::*;

impl<T: Real> KeyPipeline<T> {
    /// Runs `stat` as a pass; the first pass of a key whose DELLA masks are cached computes and
    /// keeps them.
    fn run_stat<S: Stat<T>>(&mut self, passes: &mut Passes<T>, stat: S) -> Result<S> {
        let PipelinePass { stat, masks, .. } = passes.run(PipelinePass {
            key: &*self,
            stat,
            masks: self.mask_buffers(),
        })?;
        if let Some(masks) = masks {
            self.della.as_mut().expect("DELLA").masks = masks;
        }
        Ok(stat)
    }

    /// Buffers for the DELLA keep masks when its next pass is to compute them (cached masks
    /// not computed yet).
    pub(super) fn mask_buffers(&self) -> Option<Vec<Vec<u64>>> {
        let words = self.numel.div_ceil(64);
        self.della
            .as_ref()
            .filter(|d| d.cache_masks && d.masks.is_empty())
            .map(|_| vec![vec![0u64; words]; self.streams.len()])
    }

    /// Takes the rank histograms of its deltas (the DELLA histogram pass).
    pub(super) fn take_histograms(&mut self, mut hist: Vec<RankHistogram>) {
        let (numel, d) = (self.numel, self.della.as_mut().expect("DELLA"));
        d.bound = hist
            .iter_mut()
            .map(|h| h.finish(d.config.eps, numel))
            .fold(0.0, f64::max);
        d.hist = hist;
    }

    /// Takes the `l1` rescale's sums: each model's factor.
    pub(super) fn take_l1_sums(&mut self, sums: &[f64]) {
        self.scales = sums
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

    /// The Gram pass's statistic, keeping the filtered deltas' bits when they fit `allowance`.
    pub(super) fn gram_stat(&self, allowance: u64) -> GramOf {
        let words = self.numel.div_ceil(64);
        // The output reads the bits back for the geometric median only.
        let filtered = (self.keeps_filtered(allowance)
            && matches!(self.config.fuse, Fuse::GeometricMedian(_)))
        .then(|| vec![vec![0u64; words]; self.streams.len()]);
        GramOf {
            gram: Vec::new(),
            filtered,
        }
    }

    /// Takes the Gram matrix of the filtered deltas: the geometric median's coefficients, or
    /// the positive pairs' factor (a cosine is positive where the dot product is).
    pub(super) fn take_gram(&mut self, GramOf { gram, filtered }: GramOf) {
        let n = self.streams.len();
        let Fuse::GeometricMedian(w) = self.config.fuse else {
            debug_assert_eq!(self.config.stock, Stock::PositivePairs);
            let positive = gram.iter().take(n * n).filter(|&&g| g > 0.0).count();
            self.pair_factor = T::from_f64(positive as f64 / (n * n).max(1) as f64);
            return;
        };
        self.filtered = filtered.unwrap_or_default();
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

impl<T: Real> KeyMerge<T> for KeyPipeline<T> {
    fn stat_passes(&self) -> usize {
        self.histogram_passes()
            + self.trim_passes
            + usize::from(self.config.rescale == Rescale::L1)
            + usize::from(self.config.gram_pass())
    }

    fn unit(&self) -> Unit {
        // DELLA units (rows of `[rows, rest]`, or the tensor) are whole rows of the last
        // dimension too.
        let (della, bytes, what) = match &self.della {
            Some(d) if d.unit > 1 => (
                d.unit,
                d.unit_bytes,
                match d.config.rank {
                    Rank::Row => "DELLA's exact ranks of a row",
                    Rank::Tensor => {
                        "DELLA's exact ranks of the tensor (or use `ranks = \"histogram\"`)"
                    }
                },
            ),
            _ => (1, 0, "a row"),
        };
        Unit {
            len: della.max(self.stock_row),
            bytes,
            what,
        }
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

    fn run_passes(&mut self, passes: &mut Passes<T>) -> Result<()> {
        let n = self.streams.len();
        if self.histogram_passes() > 0 {
            let hist = (0..n).map(|_| RankHistogram::new()).collect();
            let hist = self.run_stat(passes, RankCounts { hist })?.hist;
            self.take_histograms(hist);
        }
        for digit in 0..self.trim_passes {
            let stat = TrimDigits::new(digit, vec![self.prefixes()]);
            let counts = self.run_stat(passes, stat)?.counts;
            self.resolve_digit(digit, &counts[0]);
        }
        if self.config.rescale == Rescale::L1 {
            let sums = self.run_stat(passes, L1Sums { sums: Vec::new() })?.sums;
            self.take_l1_sums(&sums);
        }
        if self.config.gram_pass() {
            let stat = self.gram_stat(passes.allowance());
            let gram = self.run_stat(passes, stat)?;
            self.take_gram(gram);
        }
        Ok(())
    }

    fn merge_chunk(&self, range: Range<usize>, args: &[&[T]], out: &mut [T]) {
        let n = self.streams.len();
        let scale = match (self.config.rescale, self.config.drop) {
            (Rescale::InverseKeep, drop) => self.config.lambda / (1.0 - drop.p()),
            _ => self.config.lambda,
        };
        let scale = T::from_f64(scale) * self.pair_factor;
        // `mean` divides by the weights' sum (n unweighted; 1 where it is about 0, as mergekit).
        let total_weight = if self.weights.is_empty() {
            n as f64
        } else {
            self.weights.iter().map(|w| w.to_f64()).sum::<f64>()
        };
        let inv_n = T::ONE
            / T::from_f64(if total_weight.abs() < 1e-8 {
                1.0
            } else {
                total_weight
            });
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
            && self.weights.is_empty()
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
        self.blocks(stage, &range, args, Pre::NONE, |at, len, d| {
            let o = &mut out[at..at + len];
            o.fill(T::ZERO);
            match self.config.fuse {
                _ if voting && stage == Stage::Kept => {
                    // The election and the fuse in one sweep over the models: the sums and counts
                    // of the positive and of the negative entries decide both.
                    let mass = self.config.election == Election::Mass;
                    sums.clear(len);
                    for t in 0..n {
                        let w = self.weights.get(t).copied().unwrap_or(T::ONE);
                        sums.add(&d[t * W..t * W + len], w, mass);
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
