//! One key's pipeline state: masks, thresholds, ranks and their blocks.

use super::*;

/// Bits of the |δ| key resolved per trim pass (a 2048-bin histogram per model).
pub(super) const DIGIT_BITS: u32 = 11;

/// The state of the exact selection of one model's threshold, digit by digit from the top.
pub(super) struct Select {
    /// The key bits resolved so far.
    pub(super) prefix: u64,
    /// The rank still to find among the keys with that prefix.
    pub(super) rank: u64,
}

/// With `ranks = auto` or `histogram`, tensors up to this many elements are ranked exactly (a sort
/// of a small tensor costs less than a histogram's bins)...
pub(super) const SMALL_TENSOR: usize = 1 << 16;
/// ... and when their unit of all models (inputs, deltas, masks, sort buffers) takes at most this
/// many bytes: with many models, small tensors too are ranked from the histogram, so that the
/// memory of a merge does not grow with the number of models.
pub(super) const SMALL_UNIT_BYTES: u64 = 4 << 20;

/// The DELLA drop of one key.
pub(super) struct DellaKey {
    pub(super) config: Della,
    /// Elements ranked together when `exact` (a row or the tensor); 1 otherwise.
    pub(super) unit: usize,
    /// The working memory of one unit when ranked exactly: its inputs, deltas, masks and a
    /// sort buffer.
    pub(super) unit_bytes: u64,
    /// Exact ordinal ranks per unit, or ranks estimated from a histogram pass.
    pub(super) exact: bool,
    /// Per model, the histogram (estimated ranks only).
    pub(super) hist: Vec<RankHistogram>,
    /// The bound on the keep-probability error of the estimate.
    pub(super) bound: f64,
    /// With exact ranks and statistic passes: the first pass computes the masks (one bit per
    /// element and model) and the later passes and the merge reuse them, instead of ranking
    /// again. Not with `per_element` rescale, which needs each entry's probability.
    pub(super) cache_masks: bool,
    /// Per model, the keep bit of every element (once the first pass has run).
    pub(super) masks: Vec<Vec<u64>>,
}

pub(super) struct KeyPipeline<T> {
    pub(super) della: Option<DellaKey>,
    /// With `stock`: the row length (the last dimension); 0 otherwise.
    pub(super) stock_row: usize,
    pub(super) numel: usize,
    pub(super) config: Config,
    pub(super) key: String,
    pub(super) seed: u64,
    /// The random stream of each present model (its position among the node's arguments).
    pub(super) streams: Vec<u32>,
    pub(super) trim_passes: usize,
    pub(super) select: Vec<Select>,
    /// Per model, the smallest |δ| key that is kept (0 keeps everything; empty without a trim).
    pub(super) thresholds: Vec<u64>,
    /// Per model, the factor its kept entries are scaled by (`l1`; empty = 1).
    pub(super) scales: Vec<T>,
    /// Per model, its weight (empty: all 1).
    pub(super) weights: Vec<T>,
    /// Per model, its coefficient in the geometric median.
    pub(super) coefficients: Vec<T>,
    /// With `stock = positive_pairs`, after the Gram pass: the fraction of positive cosines.
    pub(super) pair_factor: T,
    /// Per model, one bit per element: whether drop, trim and election kept its delta (kept by
    /// the Gram pass when the inputs are held, so that the output applies the bits instead of
    /// drawing, ranking and electing again); empty otherwise.
    pub(super) filtered: Vec<Vec<u64>>,
}

/// What a pass already has for a block, which the stages use instead of computing it again:
/// DELLA's exact keep factors (per model, the block's length each), or the random draws (per
/// model, the block's length each: a sweep's points draw the same).
#[derive(Clone, Copy)]
pub(super) struct Pre<'a, T> {
    pub(super) factors: Option<&'a [T]>,
    pub(super) draws: Option<&'a [u16]>,
}

impl<T> Pre<'_, T> {
    /// Nothing computed yet.
    pub(super) const NONE: Self = Pre {
        factors: None,
        draws: None,
    };
}

/// Elements processed together: every stage runs over one block of all models at a time, model
/// by model, in loops the compiler vectorises.
pub(super) const W: usize = 256;

/// Elements of the filtered deltas a Gram matrix product takes at once (a multiple of `W`).
pub(super) const GRAM_SPAN: usize = 8 * W;

/// How far [`KeyPipeline::blocks`] takes the deltas.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Stage {
    /// After the drop only (what the trim threshold is selected from).
    Dropped,
    /// After drop and trim (what the `l1` rescale measures).
    Trimmed,
    /// After drop, trim, the `l1` scale and the weights; the election is left to the caller.
    Kept,
    /// After drop, trim, election and sign filter.
    Filtered,
}

/// The 64 bits of `bits` from bit `e` on (zeros past the end).
#[inline]
pub(super) fn bits_at(bits: &[u64], e: usize) -> u64 {
    let (w, s) = (e / 64, e % 64);
    let low = bits.get(w).copied().unwrap_or(0);
    if s == 0 {
        low
    } else {
        low >> s | bits.get(w + 1).copied().unwrap_or(0) << (64 - s)
    }
}

#[inline(always)]
pub(super) fn sign<T: Real>(v: T) -> T {
    if v > T::ZERO {
        T::ONE
    } else if v < T::ZERO {
        -T::ONE
    } else {
        T::ZERO
    }
}

impl<T: Real> KeyPipeline<T> {
    pub(super) fn histogram_passes(&self) -> usize {
        usize::from(self.della.as_ref().is_some_and(|d| !d.exact))
    }

    /// The resolved prefix of each selection of the trim threshold.
    pub(super) fn prefixes(&self) -> Vec<u64> {
        self.select.iter().map(|s| s.prefix).collect()
    }

    /// Takes the next digit of each model's trim threshold from the digit's histogram (per model
    /// `2^DIGIT_BITS` counts); after the last digit, the thresholds are known.
    pub(super) fn resolve_digit(&mut self, digit: usize, counts: &[u64]) {
        for (s, counts) in self.select.iter_mut().zip(counts.chunks(1 << DIGIT_BITS)) {
            let mut below = 0u64;
            let mut next = 0u64;
            for (d, &c) in counts.iter().enumerate() {
                if below + c >= s.rank {
                    next = d as u64;
                    break;
                }
                below += c;
            }
            s.rank -= below;
            s.prefix = (s.prefix << DIGIT_BITS) | next;
            if digit + 1 == self.trim_passes {
                // All digits resolved: the prefix is the threshold key (the top padding bits
                // above the key width are zero).
                self.thresholds.push(s.prefix);
            }
        }
    }

    /// The bits of trim pass `pass`'s digit: (shift, already-resolved high bits' shift).
    pub(super) fn digit_shift(pass: usize) -> (u32, u32) {
        let top = T::KEY_BITS.div_ceil(DIGIT_BITS) * DIGIT_BITS;
        let shift = top - DIGIT_BITS * (pass as u32 + 1);
        (shift, shift + DIGIT_BITS)
    }

    /// With `stock`: the model-stock factor of each row of `range` (empty otherwise), from the
    /// cosines of adjacent models' filtered deltas along the row, as PyTorch's
    /// `CosineSimilarity(dim=-1, eps)`: `x·y / (max(‖x‖, eps) · max(‖y‖, eps))`.
    pub(super) fn stock_factors(&self, range: &Range<usize>, args: &[&[T]]) -> Vec<T> {
        let Stock::AdjacentRows(eps) = self.config.stock else {
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
        self.blocks(Stage::Filtered, range, args, Pre::NONE, |at, len, d| {
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

    /// Whether the filtered deltas' bits are worth keeping from the Gram pass, and fit in
    /// `allowance` bytes: their values are then `δ · scale` where a bit is set (no per-element
    /// factor).
    pub(super) fn keeps_filtered(&self, allowance: u64) -> bool {
        let bytes = (self.streams.len() * self.numel.div_ceil(64) * 8) as u64;
        self.config.rescale != Rescale::PerElement
            && (self.config.drop != Drop::None
                || self.config.election != Election::None
                || self.trim_passes > 0)
            && bytes <= allowance
    }

    /// Runs the pipeline up to `stage` over `range` (`args[0]` is the base), a block of `W`
    /// elements at a time, calling `sink(offset, len, deltas)` per block: `deltas` holds model
    /// `t`'s values at `[t * W..t * W + len]`.
    pub(super) fn blocks(
        &self,
        stage: Stage,
        range: &Range<usize>,
        args: &[&[T]],
        pre: Pre<T>,
        mut sink: impl FnMut(usize, usize, &[T]),
    ) {
        let base = args[0];
        let models = &args[1..];
        let n = models.len();
        let mut d = vec![T::ZERO; n * W];
        if stage == Stage::Filtered && !self.filtered.is_empty() {
            // The bits the Gram pass kept: `δ · scale` where set, as the stages compute it.
            let total = range.len();
            for at in (0..total).step_by(W) {
                let len = W.min(total - at);
                let b = &base[at..at + len];
                for t in 0..n {
                    let dt = &mut d[t * W..t * W + len];
                    for ((o, &x), &bb) in dt.iter_mut().zip(&models[t][at..at + len]).zip(b) {
                        *o = x - bb;
                    }
                    if let Some(&scale) = self.scales.get(t) {
                        dt.iter_mut().for_each(|o| *o *= scale);
                    }
                    if let Some(&w) = self.weights.get(t) {
                        dt.iter_mut().for_each(|o| *o *= w);
                    }
                    // A select, not a product: a value the stages set to zero stays zero even
                    // if it was not finite (the bit of one they multiplied by zero is set).
                    let bits = &self.filtered[t];
                    for (c, chunk) in dt.chunks_mut(64).enumerate() {
                        let word = bits_at(bits, range.start + at + c * 64);
                        for (i, o) in chunk.iter_mut().enumerate() {
                            *o = if word >> i & 1 == 1 { *o } else { T::ZERO };
                        }
                    }
                }
                sink(at, len, &d);
            }
            return;
        }
        let mut gamma = [T::ZERO; W];
        let mut words = vec![0u16; W];
        let per_element = self.config.rescale == Rescale::PerElement;
        let mut streams: Vec<rng::Stream> = if self.draws_randomly() && pre.draws.is_none() {
            self.streams
                .iter()
                .map(|&m| rng::Stream::new(self.seed, &self.key, m.into(), range.start))
                .collect()
        } else {
            Vec::new()
        };
        let (dare_keep, dare_scale) = match self.config.drop {
            Drop::Dare { p } => (
                rng::threshold(1.0 - p),
                T::from_f64(if per_element { 1.0 / (1.0 - p) } else { 1.0 }),
            ),
            _ => (1 << 16, T::ONE),
        };
        let computed;
        let della_exact = match (&self.della, pre.factors) {
            (_, Some(f)) => Some(f),
            (Some(dk), None) if dk.exact => {
                computed = self.della_factors(dk, range, args, None);
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
                } else if self.draws_randomly() {
                    match pre.draws {
                        Some(draws) => words[..len]
                            .copy_from_slice(&draws[t * total + at..t * total + at + len]),
                        None => streams[t].fill(&mut words[..len]),
                    }
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
                // `outliers`: the largest key kept too.
                let upper = self.thresholds.get(n + t).copied();
                if stage != Stage::Dropped {
                    if let Some(up) = upper {
                        for o in dt.iter_mut() {
                            let key = o.abs_key();
                            *o *= if key >= thr && key <= up {
                                T::ONE
                            } else {
                                T::ZERO
                            };
                        }
                    } else if thr > 0 {
                        for o in dt.iter_mut() {
                            *o *= if o.abs_key() >= thr { T::ONE } else { T::ZERO };
                        }
                    }
                }
                if stage != Stage::Dropped && stage != Stage::Trimmed {
                    if let Some(&scale) = self.scales.get(t) {
                        dt.iter_mut().for_each(|o| *o *= scale);
                    }
                    if let Some(&w) = self.weights.get(t) {
                        dt.iter_mut().for_each(|o| *o *= w);
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
                if let Some(agreement) = self.config.agreement {
                    // No sign where too few models count (the element keeps the base).
                    let (inv_n, min) = (T::ONE / T::from_f64(n as f64), T::from_f64(agreement.min));
                    for (i, e) in g.iter_mut().enumerate() {
                        let counted = (0..n)
                            .filter(|&t| {
                                let v = d[t * W + i];
                                match agreement.count {
                                    AgreementCount::Participating => v != T::ZERO,
                                    AgreementCount::Elected => v != T::ZERO && sign(v) == *e,
                                }
                            })
                            .count();
                        if T::from_f64(counted as f64) * inv_n < min {
                            *e = T::ZERO;
                        }
                    }
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
            sink(at, len, &d);
            at += len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::bits_at;

    #[test]
    fn bits_at_reads_across_words_and_past_the_end() {
        let bits = [0x8000_0000_0000_0001u64, 0b1011];
        assert_eq!(bits_at(&bits, 0), bits[0]);
        assert_eq!(bits_at(&bits, 64), 0b1011);
        // Bit 63 of word 0 then word 1's bits.
        assert_eq!(bits_at(&bits, 63), 1 | 0b1011 << 1);
        assert_eq!(bits_at(&bits, 65), 0b101);
        assert_eq!(bits_at(&bits, 128), 0);
        assert_eq!(bits_at(&bits, 1000), 0);
    }
}
