//! The statistic passes of the pipeline, each its own block type: the rank histogram of DELLA's
//! estimated ranks, the digits of the trim threshold, the `l1` rescale's norms and the geometric
//! median's Gram matrix. The first pass of a key whose DELLA masks are cached also computes the
//! masks ([`PipelinePass`]).

use super::*;

/// A statistic of the pipeline over one block, given what the pass has computed for the block
/// anyway (DELLA's factors, shared draws).
pub(super) trait Stat<T: Real>: Send + Sync {
    type Block: Send + 'static;
    fn block_bytes(&self, key: &KeyPipeline<T>, len: usize) -> usize;
    fn block(
        &self,
        key: &KeyPipeline<T>,
        range: Range<usize>,
        args: &[&[T]],
        pre: Pre<T>,
    ) -> Self::Block;
    fn fold(&mut self, block: Self::Block);
}

/// The keep bits of one block, per model `ceil(len / 64)` words.
pub(super) struct KeepBits {
    start: usize,
    len: usize,
    words: Vec<u64>,
}

impl KeepBits {
    /// The bits of `factors` (per model `len` of them, nonzero = kept) of the block at `start`.
    fn of<T: Real>(start: usize, len: usize, factors: &[T]) -> KeepBits {
        let words = factors
            .chunks(len.max(1))
            .flat_map(|f| {
                f.chunks(64).map(|word| {
                    word.iter()
                        .enumerate()
                        .fold(0u64, |w, (i, &x)| w | (u64::from(x != T::ZERO) << i))
                })
            })
            .collect();
        KeepBits { start, len, words }
    }
    /// No bits set yet, for `n` models.
    fn zeroed(start: usize, len: usize, n: usize) -> KeepBits {
        let words = vec![0; n * len.div_ceil(64)];
        KeepBits { start, len, words }
    }
    /// Sets model `t`'s bits of the `len` values `d` at offset `at` of the block (a multiple
    /// of 64): a bit for each value that is not zero.
    fn set<T: Real>(&mut self, t: usize, at: usize, d: &[T]) {
        debug_assert_eq!(at % 64, 0);
        let first = t * self.len.div_ceil(64) + at / 64;
        for (w, word) in self.words[first..].iter_mut().zip(d.chunks(64)) {
            *w = word
                .iter()
                .enumerate()
                .fold(0u64, |w, (i, &x)| w | (u64::from(x != T::ZERO) << i));
        }
    }
    /// Sets the block's bits in the masks of the whole tensor (one per model).
    fn write(&self, masks: &mut [Vec<u64>]) {
        let per_model = self.len.div_ceil(64);
        if self.start % 64 == 0 {
            // Whole words (a block's last word has no bits past its end).
            let first = self.start / 64;
            for (m, words) in masks.iter_mut().zip(self.words.chunks(per_model.max(1))) {
                for (o, &w) in m[first..].iter_mut().zip(words) {
                    *o |= w;
                }
            }
            return;
        }
        for (m, words) in masks.iter_mut().zip(self.words.chunks(per_model.max(1))) {
            for (w, &bits) in words.iter().enumerate() {
                for i in 0..64.min(self.len - w * 64) {
                    let e = self.start + w * 64 + i;
                    m[e / 64] |= (bits >> i & 1) << (e % 64);
                }
            }
        }
    }
}

/// A pipeline statistic as an engine pass; with `masks`, it computes the DELLA keep masks too.
pub(super) struct PipelinePass<'a, T, S> {
    pub(super) key: &'a KeyPipeline<T>,
    pub(super) stat: S,
    /// Per model, the keep bits of every element (when this pass computes them).
    pub(super) masks: Option<Vec<Vec<u64>>>,
}

impl<T: Real, S: Stat<T>> PipelinePass<'_, T, S> {
    /// The block's statistics, with what the pass has computed for every point already.
    pub(super) fn block_with(
        &self,
        range: Range<usize>,
        args: &[&[T]],
        shared: Shared,
    ) -> (Option<KeepBits>, S::Block) {
        let draws = shared.draws;
        match (&self.masks, &self.key.della) {
            (Some(_), Some(d)) => {
                let factors = self.key.della_factors(d, &range, args, shared.ranks);
                let bits = KeepBits::of(range.start, range.len(), &factors);
                let pre = Pre {
                    factors: Some(&factors),
                    draws,
                };
                (Some(bits), self.stat.block(self.key, range, args, pre))
            }
            _ => {
                let pre = Pre {
                    factors: None,
                    draws,
                };
                (None, self.stat.block(self.key, range, args, pre))
            }
        }
    }
}

/// What a joint pass computes once for all the points of a key, per block: the draws of
/// DARE and of DELLA with estimated ranks, the exact ranks and draws of DELLA's masks.
#[derive(Clone, Copy, Default)]
pub(super) struct Shared<'a> {
    pub(super) draws: Option<&'a [u16]>,
    pub(super) ranks: Option<&'a ExactRanks>,
}

impl<T: Real, S: Stat<T>> Pass<T> for PipelinePass<'_, T, S> {
    type Block = (Option<KeepBits>, S::Block);
    fn block_bytes(&self, len: usize) -> usize {
        let bits = if self.masks.is_some() {
            self.key.streams.len() * len.div_ceil(64) * 8
        } else {
            0
        };
        bits + self.stat.block_bytes(self.key, len)
    }
    fn block(&self, range: Range<usize>, args: &[&[T]]) -> Self::Block {
        self.block_with(range, args, Shared::default())
    }
    fn fold(&mut self, (bits, block): Self::Block) {
        if let (Some(bits), Some(masks)) = (bits, self.masks.as_mut()) {
            bits.write(masks);
        }
        self.stat.fold(block);
    }
}

/// The histogram of |δ| per model, for DELLA ranks of tensors too large to sort.
pub(super) struct RankCounts {
    pub(super) hist: Vec<RankHistogram>,
}

impl<T: Real> Stat<T> for RankCounts {
    type Block = Vec<BlockCounts>;
    fn block_bytes(&self, key: &KeyPipeline<T>, _len: usize) -> usize {
        // At most every slot of the table, per model.
        key.streams.len() * BlockCounts::MAX_BYTES
    }
    fn block(
        &self,
        _: &KeyPipeline<T>,
        _range: Range<usize>,
        args: &[&[T]],
        _: Pre<T>,
    ) -> Vec<BlockCounts> {
        args[1..]
            .iter()
            .map(|x| {
                let mut counts = BlockCounts::default();
                RankHistogram::count_block(
                    x.iter().zip(args[0]).map(|(&a, &b)| a - b),
                    &mut counts,
                );
                counts
            })
            .collect()
    }
    fn fold(&mut self, block: Vec<BlockCounts>) {
        for (h, c) in self.hist.iter_mut().zip(&block) {
            h.absorb(c);
        }
    }
}

/// The histogram of the next digit of |δ| among the keys matching each model's prefix (one
/// digit of the exact trim threshold), for each of several selections of the same deltas (the
/// points of a sweep whose drops are the same, each distinct selection once).
pub(super) struct TrimDigits {
    pub(super) digit: usize,
    /// Per selection, the resolved prefix of each model's threshold (twice the models with
    /// `outliers`: the second n for the upper bound).
    pub(super) prefixes: Vec<Vec<u64>>,
    /// Per selection, `2^DIGIT_BITS` counts per prefix.
    pub(super) counts: Vec<Vec<u64>>,
}

impl TrimDigits {
    pub(super) fn new(digit: usize, prefixes: Vec<Vec<u64>>) -> Self {
        let counts = prefixes
            .iter()
            .map(|p| vec![0; p.len() << DIGIT_BITS])
            .collect();
        TrimDigits {
            digit,
            prefixes,
            counts,
        }
    }
}

impl<T: Real> Stat<T> for TrimDigits {
    type Block = Vec<Vec<u32>>;
    fn block_bytes(&self, _: &KeyPipeline<T>, _len: usize) -> usize {
        self.counts.iter().map(Vec::len).sum::<usize>() * 4
    }
    fn block(
        &self,
        key: &KeyPipeline<T>,
        range: Range<usize>,
        args: &[&[T]],
        pre: Pre<T>,
    ) -> Vec<Vec<u32>> {
        let n = key.streams.len();
        let (shift, high) = KeyPipeline::<T>::digit_shift(self.digit);
        let bins = 1usize << DIGIT_BITS;
        let digit_of = |k: u64| ((k >> shift) as usize) & (bins - 1);
        let mut h: Vec<Vec<u32>> = self.counts.iter().map(|c| vec![0u32; c.len()]).collect();
        // The first digit: every key counts (no prefix yet), the same histogram for every
        // selection of a model, counted once into four tables, element `i` into table `i % 4`
        // (consecutive keys in one bin, the usual case, then do not wait on each other's
        // increment).
        // A small block is counted into one table (clearing four would cost more).
        let lanes_n = if range.len() >= 1 << 14 { 4 } else { 1 };
        let mut lanes = if self.digit == 0 {
            vec![0u32; n * lanes_n * bins]
        } else {
            Vec::new()
        };
        let mut keys = [0u64; W];
        key.blocks(Stage::Dropped, &range, args, pre, |_, len, d| {
            for t in 0..n {
                let keys = &mut keys[..len];
                for (k, v) in keys.iter_mut().zip(&d[t * W..t * W + len]) {
                    *k = v.abs_key();
                }
                if self.digit == 0 {
                    let lanes = &mut lanes[t * lanes_n * bins..(t + 1) * lanes_n * bins];
                    for (i, &k) in keys.iter().enumerate() {
                        lanes[(i % lanes_n) * bins + digit_of(k)] += 1;
                    }
                    continue;
                }
                // Later digits: the keys of each selection's prefix (few) found 64 at a time
                // by a comparison that vectorises, then counted one by one.
                for (prefixes, h) in self.prefixes.iter().zip(h.iter_mut()) {
                    for j in (t..prefixes.len()).step_by(n) {
                        let prefix = prefixes[j];
                        let ht = &mut h[j * bins..(j + 1) * bins];
                        for (c, chunk) in keys.chunks(64).enumerate() {
                            let mut hits = chunk
                                .iter()
                                .enumerate()
                                .fold(0u64, |m, (i, &k)| m | (u64::from(k >> high == prefix) << i));
                            while hits != 0 {
                                let i = hits.trailing_zeros() as usize;
                                hits &= hits - 1;
                                ht[digit_of(keys[c * 64 + i])] += 1;
                            }
                        }
                    }
                }
            }
        });
        if self.digit == 0 {
            for (prefixes, h) in self.prefixes.iter().zip(h.iter_mut()) {
                for j in 0..prefixes.len() {
                    let t = j % n;
                    let lanes = &lanes[t * lanes_n * bins..(t + 1) * lanes_n * bins];
                    for (b, o) in h[j * bins..(j + 1) * bins].iter_mut().enumerate() {
                        *o = (0..lanes_n).map(|l| lanes[l * bins + b]).sum();
                    }
                }
            }
        }
        h
    }
    fn fold(&mut self, block: Vec<Vec<u32>>) {
        for (c, b) in self.counts.iter_mut().zip(block) {
            for (c, x) in c.iter_mut().zip(b) {
                *c += u64::from(x);
            }
        }
    }
}

/// Per model: Σ|δ| of the whole delta and of the entries kept by drop and trim (the `l1`
/// rescale).
pub(super) struct L1Sums {
    /// Per model `[full, kept]`.
    pub(super) sums: Vec<f64>,
}

impl<T: Real> Stat<T> for L1Sums {
    type Block = Vec<f64>;
    fn block_bytes(&self, key: &KeyPipeline<T>, _len: usize) -> usize {
        2 * key.streams.len() * 8
    }
    fn block(
        &self,
        key: &KeyPipeline<T>,
        range: Range<usize>,
        args: &[&[T]],
        pre: Pre<T>,
    ) -> Vec<f64> {
        let n = key.streams.len();
        let mut sums = vec![0f64; 2 * n];
        for (t, x) in args[1..].iter().enumerate() {
            sums[2 * t] = x
                .iter()
                .zip(args[0])
                .map(|(&v, &b)| (v - b).abs().to_f64())
                .sum();
        }
        key.blocks(Stage::Trimmed, &range, args, pre, |_, len, d| {
            for t in 0..n {
                sums[2 * t + 1] += d[t * W..t * W + len]
                    .iter()
                    .map(|v| v.abs().to_f64())
                    .sum::<f64>();
            }
        });
        sums
    }
    fn fold(&mut self, block: Vec<f64>) {
        accumulate(&mut self.sums, block)
    }
}

/// The Gram matrix of the filtered deltas (with `base_point`, and the zero delta): centred on
/// their mean for the geometric median (which needs their distances only), as they are for
/// the positive pairs' factor (which needs the signs of their products); with `filtered`, it
/// also keeps the filtered deltas' bits.
pub(super) struct GramOf {
    pub(super) gram: Vec<f64>,
    /// Per model, the bit of every element whose filtered delta is not zero (when kept).
    pub(super) filtered: Option<Vec<Vec<u64>>>,
}

impl<T: Real> Stat<T> for GramOf {
    type Block = (Vec<f64>, Option<KeepBits>);
    fn block_bytes(&self, key: &KeyPipeline<T>, len: usize) -> usize {
        let n = key.streams.len();
        let bits = if self.filtered.is_some() {
            n * len.div_ceil(64) * 8
        } else {
            0
        };
        (n + usize::from(key.config.base_point)).pow(2) * 8 + bits
    }
    fn block(
        &self,
        key: &KeyPipeline<T>,
        range: Range<usize>,
        args: &[&[T]],
        pre: Pre<T>,
    ) -> Self::Block {
        let n = key.streams.len();
        let mut bits = self
            .filtered
            .as_ref()
            .map(|_| KeepBits::zeroed(range.start, range.len(), n));
        // The filtered deltas, one row per model, `GRAM_SPAN` elements at a time, then a
        // matrix product per span: the buffer does not grow with the block (a whole
        // tensor, for units ranked exactly). The rows are centred on the per-element mean
        // as they are filled (distances do not change, and centred points keep the
        // products' rounding small next to the distances).
        // With `base_point`, a last row for the base as a zero delta; it enters the mean
        // like every other point.
        let points = n + usize::from(key.config.base_point);
        // Fewer elements per span for many points: the rows take about as much memory
        // as 9 points' (a power of two of at least `W` elements).
        let fit = (GRAM_SPAN * 9 / points).max(W);
        let span = (1usize << fit.ilog2()).min(GRAM_SPAN).min(range.len());
        let mut rows = vec![0f64; points * span];
        let mut g = vec![0.0; points * points];
        let mut mean = [0f64; W];
        let inv = 1.0 / points as f64;
        let centred = matches!(key.config.fuse, Fuse::GeometricMedian(_));
        let mut filled = 0;
        key.blocks(Stage::Filtered, &range, args, pre, |at, len, d| {
            debug_assert_eq!(at % span, filled);
            if let Some(bits) = bits.as_mut() {
                for t in 0..n {
                    bits.set(t, at, &d[t * W..t * W + len]);
                }
            }
            let mean = &mut mean[..len];
            mean.fill(0.0);
            if centred {
                for t in 0..n {
                    for (m, &v) in mean.iter_mut().zip(&d[t * W..t * W + len]) {
                        *m += v.to_f64();
                    }
                }
                mean.iter_mut().for_each(|m| *m *= inv);
            }
            for t in 0..points {
                let row = &mut rows[t * span + filled..t * span + filled + len];
                if t < n {
                    for ((o, &v), &m) in row.iter_mut().zip(&d[t * W..t * W + len]).zip(&*mean) {
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
        (g, bits)
    }
    fn fold(&mut self, (block, bits): Self::Block) {
        if let (Some(bits), Some(filtered)) = (bits, self.filtered.as_mut()) {
            bits.write(filtered);
        }
        accumulate(&mut self.gram, block)
    }
}
