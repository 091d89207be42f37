//! The engine's interface for one key: statistic passes and the merge of a chunk.

use super::*;

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
