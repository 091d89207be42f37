//! DELLA's MagPrune drop (spec §6): each delta entry is kept with a probability that grows (or,
//! with a negative window, shrinks) linearly with the ordinal rank of its magnitude.
//!
//! Two variants, named by the unit the rank is taken over:
//! - `rank = tensor` (sd-mecha, the AstolfoMix DGMLA recipes): `r` = ordinal rank 1..P of |δ| over
//!   the whole flattened tensor, ties by position; `q = (1 − p) + ε·(r/P − (P + 1)/(2P))`.
//! - `rank = row` (official DELLA code, mergekit): the rank over each row of the `[rows, rest]`
//!   view; `q = (1 − p) + ε·((r − 1)/(n − 1) − 1/2)`.
//!
//! `ε` is the total width of the window in both (mergekit's `epsilon` is half of it). `q` is
//! clamped to [0, 1].
//!
//! Ranks are exact when a unit of all models fits the budget: each unit is sorted by
//! (|δ| bits, position), which is the ordinal rank with ties by position. A tensor too large for
//! that gets its ranks from a histogram of |δ| (see [`RankHistogram`]).

use crate::real::Real;

/// What the magnitude rank is taken over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rank {
    Tensor,
    Row,
}

/// How the ranks are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ranks {
    /// Exact when a unit of all models fits a quarter of the memory budget, else histogram.
    Auto,
    /// Always exact (an error when a unit does not fit).
    Exact,
    /// Always estimated from the histogram pass (`rank = tensor` only): faster, no sort.
    Histogram,
}

/// The MagPrune drop configuration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Della {
    /// Mean drop probability.
    pub p: f64,
    /// Total width of the keep-probability window (negative: large |δ| dropped more).
    pub eps: f64,
    pub rank: Rank,
    pub ranks: Ranks,
}

impl Della {
    /// The keep probability of the entry of rank `r` (1-based, ascending |δ|) among `n`.
    #[inline]
    pub fn keep(&self, r: f64, n: usize) -> f64 {
        let n_f = n as f64;
        let centred = match self.rank {
            Rank::Tensor => r / n_f - (n_f + 1.0) / (2.0 * n_f),
            Rank::Row if n > 1 => (r - 1.0) / (n_f - 1.0) - 0.5,
            Rank::Row => 0.0,
        };
        (1.0 - self.p + self.eps * centred).clamp(0.0, 1.0)
    }

    /// `(a, b)` with `keep(r, n) = clamp(a + b·r)` for whole-tensor ranks.
    pub fn tensor_affine(&self, n: usize) -> (f64, f64) {
        let n = n as f64;
        (
            1.0 - self.p - self.eps * (n + 1.0) / (2.0 * n),
            self.eps / n,
        )
    }

    /// The keep probabilities of the smallest and of the largest |δ| of a large unit.
    pub fn range(&self) -> (f64, f64) {
        let at = |c: f64| (1.0 - self.p + self.eps * c).clamp(0.0, 1.0);
        (at(-0.5), at(0.5))
    }

    /// The number of consecutive elements ranked together in a tensor of this shape.
    pub fn unit_len(&self, shape: &[usize]) -> usize {
        let numel: usize = shape.iter().product();
        match self.rank {
            Rank::Tensor => numel,
            Rank::Row if shape.len() >= 2 => shape[1..].iter().product(),
            Rank::Row => numel,
        }
    }
}

/// Reusable buffers of [`ordinal_ranks`].
#[derive(Default)]
pub struct RankScratch {
    keys: [Vec<u64>; 2],
    index: [Vec<u32>; 2],
}

/// Bits per pass of the radix sort.
const RADIX_BITS: u32 = 11;
/// Up to this many values are ranked with a comparison sort.
const SMALL_SORT: usize = 4096;

/// The ordinal ranks (1-based, ascending |v|, ties by position) of `values`, into `ranks`.
///
/// A least-significant-digit radix sort of the magnitude keys carrying the positions: it is
/// stable, so equal keys stay in position order, which is the ordinal tie-break. Digits that
/// every key shares are skipped.
pub fn ordinal_ranks<T: Real>(values: &[T], scratch: &mut RankScratch, ranks: &mut [u32]) {
    let n = values.len();
    debug_assert!(n <= u32::MAX as usize && ranks.len() == n);
    if n <= SMALL_SORT {
        // Few elements: a comparison sort of (key, position) costs less than the radix passes.
        let sort = &mut scratch.keys[0];
        if T::KEY_BITS <= 32 {
            sort.clear();
            sort.extend(
                values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (v.abs_key() << 32) | i as u64),
            );
            sort.sort_unstable();
            for (r, &k) in sort.iter().enumerate() {
                ranks[(k as u32) as usize] = r as u32 + 1;
            }
        } else {
            let mut wide: Vec<(u64, u32)> = values
                .iter()
                .enumerate()
                .map(|(i, v)| (v.abs_key(), i as u32))
                .collect();
            wide.sort_unstable();
            for (r, &(_, i)) in wide.iter().enumerate() {
                ranks[i as usize] = r as u32 + 1;
            }
        }
        return;
    }
    let [k0, k1] = &mut scratch.keys;
    let [i0, i1] = &mut scratch.index;
    k0.clear();
    k0.extend(values.iter().map(|v| v.abs_key()));
    i0.clear();
    i0.extend(0..n as u32);
    k1.resize(n, 0);
    i1.resize(n, 0);
    let (mut src_k, mut src_i, mut dst_k, mut dst_i) = (k0, i0, k1, i1);
    let buckets = 1usize << RADIX_BITS;
    let mask = (buckets - 1) as u64;
    let mut count = vec![0usize; buckets];
    let mut shift = 0;
    while shift < T::KEY_BITS {
        count.fill(0);
        for &k in src_k.iter() {
            count[((k >> shift) & mask) as usize] += 1;
        }
        if count.contains(&n) {
            shift += RADIX_BITS;
            continue;
        }
        let mut sum = 0;
        for c in count.iter_mut() {
            let here = *c;
            *c = sum;
            sum += here;
        }
        for (&k, &i) in src_k.iter().zip(src_i.iter()) {
            let d = ((k >> shift) & mask) as usize;
            dst_k[count[d]] = k;
            dst_i[count[d]] = i;
            count[d] += 1;
        }
        std::mem::swap(&mut src_k, &mut dst_k);
        std::mem::swap(&mut src_i, &mut dst_i);
        shift += RADIX_BITS;
    }
    for (r, &i) in src_i.iter().enumerate() {
        ranks[i as usize] = r as u32 + 1;
    }
}

/// Bits of the f32 magnitude that select a histogram bin: 8 exponent and 7 mantissa bits, so a
/// bin spans 1/128 of an octave.
const BIN_BITS: u32 = 15;
/// The rest of the 31 magnitude bits, within a bin.
const LOW_BITS: u32 = 31 - BIN_BITS;
const BINS: usize = 1 << BIN_BITS;

/// The 31 magnitude bits of `v` as an f32 (an order-preserving key).
#[inline]
pub fn key32<T: Real>(v: T) -> u32 {
    (v.to_f64().abs() as f32).to_bits() & 0x7fff_ffff
}

/// Sorts 31-bit keys: three passes of 11 bits, skipping a digit every key shares.
fn radix_sort_u32(keys: &mut Vec<u32>) {
    let n = keys.len();
    let mut other = vec![0u32; n];
    let mut count = [0usize; 1 << RADIX_BITS];
    let mask = (1u32 << RADIX_BITS) - 1;
    for shift in (0..32).step_by(RADIX_BITS as usize) {
        count.fill(0);
        for &k in keys.iter() {
            count[((k >> shift) & mask) as usize] += 1;
        }
        if count.contains(&n) {
            continue;
        }
        let mut sum = 0;
        for c in count.iter_mut() {
            let here = *c;
            *c = sum;
            sum += here;
        }
        for &k in keys.iter() {
            let d = ((k >> shift) & mask) as usize;
            other[count[d]] = k;
            count[d] += 1;
        }
        std::mem::swap(keys, &mut other);
    }
}

/// Distinct keys a bin counts exactly; a bin with more is summarised by its smallest and largest.
const EXACT_KEYS: usize = 16;

/// An estimate of the ordinal rank of |δ| within a tensor from one streamed pass.
///
/// Per bin (1/128 octave) it counts the entries. While a bin holds at most 16 distinct keys (always
/// the case for deltas of f16 or bf16 weights, which lie on a coarse grid) it counts each key, so
/// the rank of every key is exact and only the order among exact ties is estimated, by
/// interpolating the entry's position in the tensor (what the ordinal rank gives on average). A
/// bin with more keys (continuous data, where ties are rare) keeps its smallest and largest key,
/// and the place of a key in it is interpolated linearly between them: that rank is off by less
/// than the bin's count, so the keep probability by less than `|ε|·count/P`, the bound
/// [`RankHistogram::finish`] returns.
pub struct RankHistogram {
    count: Vec<u32>,
    /// The smallest and largest key within the bin (its low bits).
    min: Vec<u16>,
    max: Vec<u16>,
    /// While absorbing: per bin, the index in `lists` of its (key, count) pairs in key order
    /// while it is counted exactly (`NONE` before its first entry).
    slot: Vec<u32>,
    lists: Vec<Vec<(u32, u32)>>,
    /// Bins with too many keys (a bit per bin).
    overflow: Vec<u64>,
    /// After `finish`, per bin counted by range: the rank is `coef[b][0] + coef[b][1]·low` for
    /// a key whose low bits are `low`.
    coef: Vec<[f32; 2]>,
    /// After `finish`: bin `b`'s exact keys are `keys[first[b]..first[b + 1]]`.
    first: Vec<u32>,
    /// Per exact key: (key, r0, r1): the rank is `r0 + r1·position`.
    keys: Vec<(u32, f32, f32)>,
}

const LOW_MASK: u32 = (1 << LOW_BITS) - 1;
const NONE: u32 = u32::MAX;

impl RankHistogram {
    pub fn new() -> Self {
        RankHistogram {
            count: vec![0; BINS],
            min: vec![u16::MAX; BINS],
            max: vec![0; BINS],
            slot: vec![NONE; BINS],
            lists: Vec::new(),
            overflow: vec![0; BINS / 64],
            coef: Vec::new(),
            first: Vec::new(),
            keys: Vec::new(),
        }
    }

    /// The statistics of one block of deltas, appended to `out` as exact integers: the number of
    /// occupied bins, then per bin `bin + count·2^15` and the number of distinct keys `m`; then
    /// `m` values `key + count·2^16` when `m ≤ 16`, else `min + max·2^16` (keys within the bin).
    pub fn block_stats<T: Real>(deltas: impl Iterator<Item = T>, out: &mut Vec<f64>) {
        let mut keys: Vec<u32> = deltas.map(key32).collect();
        radix_sort_u32(&mut keys);
        let header = out.len();
        out.push(0.0);
        let mut used = 0;
        let mut i = 0;
        while i < keys.len() {
            let bin = keys[i] >> LOW_BITS;
            let mut j = i;
            while j < keys.len() && keys[j] >> LOW_BITS == bin {
                j += 1;
            }
            let run = &keys[i..j];
            let mut distinct: Vec<(u32, u32)> = Vec::new();
            for &k in run {
                match distinct.last_mut() {
                    Some((key, c)) if *key == k => *c += 1,
                    _ => distinct.push((k, 1)),
                }
            }
            out.push(bin as f64 + run.len() as f64 * BINS as f64);
            out.push(distinct.len() as f64);
            let scale = (1u64 << LOW_BITS) as f64;
            if distinct.len() <= EXACT_KEYS {
                for (k, c) in distinct {
                    out.push((k & LOW_MASK) as f64 + c as f64 * scale);
                }
            } else {
                out.push(
                    (run[0] & LOW_MASK) as f64 + (run[run.len() - 1] & LOW_MASK) as f64 * scale,
                );
            }
            used += 1;
            i = j;
        }
        out[header] = used as f64;
    }

    fn overflowed(&self, bin: usize) -> bool {
        self.overflow[bin / 64] >> (bin % 64) & 1 == 1
    }

    fn set_overflow(&mut self, bin: usize) {
        if self.slot[bin] != NONE {
            self.lists[self.slot[bin] as usize] = Vec::new();
        }
        self.overflow[bin / 64] |= 1 << (bin % 64);
    }

    /// Adds one model's part of a block's statistics (from `stats`); returns the numbers read.
    pub fn absorb(&mut self, stats: &[f64]) -> usize {
        let used = stats[0] as usize;
        let mut at = 1;
        let low = 1u64 << LOW_BITS;
        for _ in 0..used {
            let a = stats[at] as u64;
            let m = stats[at + 1] as usize;
            at += 2;
            let bin = (a % BINS as u64) as usize;
            self.count[bin] += (a / BINS as u64) as u32;
            let mut note = |k: u32| {
                self.min[bin] = self.min[bin].min(k as u16);
                self.max[bin] = self.max[bin].max(k as u16);
            };
            if m <= EXACT_KEYS {
                let pairs: Vec<(u32, u32)> = stats[at..at + m]
                    .iter()
                    .map(|&v| ((v as u64 % low) as u32, (v as u64 / low) as u32))
                    .collect();
                at += m;
                for &(k, _) in &pairs {
                    note(k);
                }
                if !self.overflowed(bin) {
                    if self.slot[bin] == NONE {
                        self.slot[bin] = self.lists.len() as u32;
                        self.lists.push(Vec::new());
                    }
                    let list = &mut self.lists[self.slot[bin] as usize];
                    for (k, c) in pairs {
                        match list.binary_search_by_key(&k, |e| e.0) {
                            Ok(i) => list[i].1 += c,
                            Err(i) => list.insert(i, (k, c)),
                        }
                    }
                    if list.len() > EXACT_KEYS {
                        self.set_overflow(bin);
                    }
                }
            } else {
                let v = stats[at] as u64;
                at += 1;
                note((v % low) as u32);
                note((v / low) as u32);
                self.set_overflow(bin);
            }
        }
        at
    }

    /// Ends the pass; returns the bound on the keep-probability error off exact ties, for a
    /// window of width `eps` over `n` entries.
    pub fn finish(&mut self, eps: f64, n: usize) -> f64 {
        let mut coef = vec![[0f32; 2]; BINS];
        let mut first = Vec::with_capacity(BINS + 1);
        let mut keys = Vec::new();
        let mut below = 0u64;
        let mut worst = 0u32;
        // Ties: the place among `c` equal keys interpolated in the position.
        let per_position = 1.0 / (n.max(2) - 1) as f64;
        for (b, coef) in coef.iter_mut().enumerate() {
            first.push(keys.len() as u32);
            let c = self.count[b];
            if c == 0 {
                continue;
            }
            let start = below as f64 + 1.0;
            if self.overflowed(b) {
                worst = worst.max(c - 1);
                let (lo, hi) = (self.min[b] as f64, self.max[b] as f64);
                let slope = if c > 1 && hi > lo {
                    (c - 1) as f64 / (hi - lo)
                } else {
                    0.0
                };
                *coef = [(start - slope * lo) as f32, slope as f32];
            } else {
                let mut cum = 0u64;
                for &(k, kc) in &self.lists[self.slot[b] as usize] {
                    let r0 = start + cum as f64;
                    keys.push((k, r0 as f32, ((kc - 1) as f64 * per_position) as f32));
                    cum += kc as u64;
                }
            }
            below += c as u64;
        }
        first.push(keys.len() as u32);
        self.slot = Vec::new();
        self.lists = Vec::new();
        self.count = Vec::new();
        self.min = Vec::new();
        self.max = Vec::new();
        self.coef = coef;
        self.first = first;
        self.keys = keys;
        eps.abs() * worst as f64 / n.max(1) as f64
    }

    /// The estimated rank (1-based) of the entry with key `k` at `position`.
    #[inline]
    pub fn rank(&self, k: u32, position: usize) -> f32 {
        let b = (k >> LOW_BITS) as usize;
        let low = k & LOW_MASK;
        let (s, e) = (self.first[b] as usize, self.first[b + 1] as usize);
        if s < e {
            // Exact key counts: the entries with smaller keys, then the place among the ties.
            let list = &self.keys[s..e];
            let i = list
                .iter()
                .position(|x| x.0 >= low)
                .unwrap_or(list.len() - 1);
            let (_, r0, r1) = list[i];
            r0 + r1 * position as f32
        } else {
            let [r0, r1] = self.coef[b];
            r0 + r1 * low as f32
        }
    }
}

impl Default for RankHistogram {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinal_ranks_break_ties_by_position() {
        let v = [0.5f32, -0.1, 0.0, 0.1, 0.5, -2.0, 0.0];
        let mut ranks = [0u32; 7];
        ordinal_ranks(&v, &mut RankScratch::default(), &mut ranks);
        // |v| ascending: 0.0 (pos 2), 0.0 (pos 6), 0.1 (pos 1), 0.1 (pos 3), 0.5 (0), 0.5 (4), 2.0.
        assert_eq!(ranks, [5, 3, 1, 4, 6, 7, 2]);
    }

    #[test]
    fn keep_probabilities_follow_the_two_conventions() {
        let t = Della {
            p: 0.1,
            eps: -0.1,
            rank: Rank::Tensor,
            ranks: Ranks::Auto,
        };
        // P = 4: r/P − (P+1)/(2P) = −0.375, −0.125, 0.125, 0.375.
        let q: Vec<f64> = (1..=4).map(|r| t.keep(r as f64, 4)).collect();
        for (a, b) in q.iter().zip([0.9375, 0.9125, 0.8875, 0.8625]) {
            assert!((a - b).abs() < 1e-12, "{q:?}");
        }
        let r = Della {
            p: 0.3,
            eps: 0.28,
            rank: Rank::Row,
            ranks: Ranks::Auto,
        };
        // (r − 1)/(n − 1) − 1/2 over n = 3: −0.5, 0, 0.5 → 0.56, 0.7, 0.84 (mergekit's
        // density 0.7 ± epsilon 0.14).
        let q: Vec<f64> = (1..=3).map(|x| r.keep(x as f64, 3)).collect();
        for (a, b) in q.iter().zip([0.56, 0.7, 0.84]) {
            assert!((a - b).abs() < 1e-12, "{q:?}");
        }
        assert_eq!(r.keep(1.0, 1), 0.7);
        // Clamped to [0, 1].
        let wide = Della {
            p: 0.1,
            eps: 0.5,
            rank: Rank::Row,
            ranks: Ranks::Auto,
        };
        assert_eq!(wide.keep(3.0, 3), 1.0);
        assert_eq!(wide.range(), (0.65, 1.0));
    }

    /// Estimated ranks against exact ones: the keep-probability bound at ε = 0.1, and the error
    /// of each rank relative to `n`, off exact ties and on them.
    fn rank_errors(v: &[f32]) -> (f64, f64, f64) {
        let n = v.len();
        let mut exact = vec![0u32; n];
        ordinal_ranks(v, &mut RankScratch::default(), &mut exact);
        let mut h = RankHistogram::new();
        let mut stats = Vec::new();
        for block in v.chunks(16384) {
            stats.clear();
            RankHistogram::block_stats(block.iter().copied(), &mut stats);
            assert_eq!(h.absorb(&stats), stats.len());
        }
        let bound = h.finish(0.1, n);
        let mut seen = std::collections::HashMap::new();
        for &x in v {
            *seen.entry(x.abs().to_bits()).or_insert(0) += 1;
        }
        let (mut off_ties, mut on_ties) = (0f64, 0f64);
        for (i, &x) in v.iter().enumerate() {
            let err = (h.rank(key32(x), i) as f64 - exact[i] as f64).abs() / n as f64;
            if seen[&x.abs().to_bits()] > 1 {
                on_ties = on_ties.max(err);
            } else {
                off_ties = off_ties.max(err);
            }
        }
        (bound, off_ties, on_ties)
    }

    fn spread(i: usize) -> f32 {
        (((i as u64 * 2_654_435_761) % 1_000_003) as f32 / 1_000_003.0 - 0.5) * 1e-3
    }

    #[test]
    fn histogram_ranks_of_continuous_data_are_within_the_bound() {
        let v: Vec<f32> = (0..200_000).map(spread).collect();
        let (bound, off_ties, _) = rank_errors(&v);
        // Uniform magnitudes are the densest at the top of the range (0.8 % of them in a bin);
        // at ε = 0.1 the keep probability is still within 1e-3.
        assert!(bound <= 1e-3, "bound {bound}");
        assert!(off_ties * 0.1 <= bound, "{off_ties} > {bound}");
    }

    #[test]
    fn histogram_ranks_of_grid_data_are_exact_up_to_tie_order() {
        // Deltas of f16 weights: differences on a coarse grid, heavy exact ties, and zeros.
        let v: Vec<f32> = (0..200_000)
            .map(|i| {
                let a = half::f16::from_f32(0.05 + spread(i) * 20.0);
                let b = half::f16::from_f32(0.05 + spread(i * 7 + 3) * 20.0);
                if i % 9 == 0 {
                    0.0
                } else {
                    a.to_f32() - b.to_f32()
                }
            })
            .collect();
        let (bound, off_ties, on_ties) = rank_errors(&v);
        assert_eq!(bound, 0.0, "every bin is counted exactly");
        assert_eq!(off_ties, 0.0);
        // Ties spread over the tensor: interpolating the position is close.
        assert!(on_ties < 5e-3, "ties {on_ties}");
    }
}
