//! The statistics of one block for each pass, and how they are absorbed.

use super::*;

impl<T: Real> KeyPipeline<T> {
    /// The statistics of pass `pass` for one block; `factors` are the DELLA factors when the
    /// caller has computed them already.
    pub(super) fn pass_stats(
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

    pub(super) fn absorb_stats(&mut self, pass: usize, _block: usize, stats: Vec<f64>) {
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
