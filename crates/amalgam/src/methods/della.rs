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
const LOW_MASK: u32 = (1 << LOW_BITS) - 1;

/// The 31 magnitude bits of `v` as an f32 (an order-preserving key).
#[inline]
pub fn key32<T: Real>(v: T) -> u32 {
    (v.to_f64().abs() as f32).to_bits() & 0x7fff_ffff
}

/// The counting slot of a key: two per bin, the others (`2·bin`) and the bin's lower edge
/// (`2·bin + 1`).
#[inline(always)]
fn slot(k: u32) -> u32 {
    ((k >> LOW_BITS) << 1) | u32::from(k & LOW_MASK == 0)
}

/// An estimate of the ordinal rank of |δ| within a tensor from one streamed pass.
///
/// It counts the entries per bin (1/128 of an octave of |δ|). The entries whose key is the bin's
/// lower edge (low bits all zero) are counted apart: they are exact ties, and the heaviest ones
/// for deltas of f16 or bf16 weights, which lie on a coarse grid (a delta of at most 8
/// significant bits is such a key). Ties are ordered by position, as the ordinal rank does: an
/// entry's place among them is interpolated from its position in the tensor, which is exact when
/// the ties are spread evenly over it. The other entries of a bin are placed by linear
/// interpolation of their key over the bin: that estimate is off by less than their count, so
/// the keep probability by less than `|ε|·count/P` for the fullest bin, the bound
/// [`RankHistogram::finish`] returns. (Bin 0, the exact zeros, is left out of the bound: a zero
/// delta is the same dropped or kept, and the zeros' count is exact, so the other entries' ranks
/// are not affected.) Counting is one table increment per entry and a lookup two table reads, with
/// no sort: the tables of the bins a tensor uses stay in the CPU caches.
///
/// Memory: 8 bytes per bin, for the octaves of |δ| that hold an entry only (a tensor's deltas
/// can span a hundred octaves with most of them empty), so the per-model tables of a tensor stay
/// a few tens of KiB.
pub struct RankHistogram {
    /// The octave (8 exponent bits of the key) of `octaves[0]`.
    first: usize,
    /// Per octave from `first` on: the index of its block in `table`, or `EMPTY`.
    octaves: Vec<u16>,
    /// Blocks of `BLOCK_WORDS`, one per octave holding entries. While absorbing: per bin, the
    /// count of its others and of its edge key. After `finish` (as f32 bits): per bin, the
    /// number of entries below it and the count of its edge key; then the number below the next
    /// octave, and 0.
    table: Vec<u32>,
    /// After `finish`: per octave, the number of entries below it; and the total.
    below: Vec<u32>,
    total: u32,
    /// After `finish`: `1 / (P − 1)`, a position's fraction of the tensor.
    per_position: f32,
}

/// Bins per octave.
const OCTAVE_BINS: usize = 1 << (BIN_BITS - 8);
/// Words of one octave's block: two per bin and two after.
const BLOCK_WORDS: usize = 2 * OCTAVE_BINS + 2;
const EMPTY: u16 = u16::MAX;

/// The counts of one block of one model's deltas: bin 0's two slots, and the slots of bins
/// `lo..lo + count.len() / 2`.
#[derive(Default)]
pub struct BlockCounts {
    zero: [u32; 2],
    lo: usize,
    count: Vec<u32>,
}

/// Tables a block is counted into, element `i` into table `i % LANES`: consecutive entries in the
/// same slot (frequent: the bins near the mode hold the most) then do not wait on each other's
/// increment.
const LANES: usize = 4;

/// Per-thread tables of [`RankHistogram::count_block`], reused: only the slots a block used are
/// reset after it.
struct Scratch {
    lanes: Vec<u32>,
    slots: Vec<u32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch {
        lanes: vec![0; LANES * 2 * BINS],
        slots: Vec::new(),
    });
}

impl RankHistogram {
    pub fn new() -> Self {
        RankHistogram {
            first: 0,
            octaves: Vec::new(),
            table: Vec::new(),
            below: Vec::new(),
            total: 0,
            per_position: 0.0,
        }
    }

    /// Counts one block of deltas into `out`.
    pub fn count_block<T: Real>(deltas: impl Iterator<Item = T>, out: &mut BlockCounts) {
        SCRATCH.with(|c| {
            let Scratch { lanes, slots } = &mut *c.borrow_mut();
            slots.clear();
            slots.extend(deltas.map(|v| slot(key32(v))));
            out.count.clear();
            out.zero = [0, 0];
            out.lo = 0;
            if slots.is_empty() {
                return;
            }
            // The range of slots other than bin 0's: bin 0's two slots wrap to the top when 2 is
            // taken off. Eight lanes at a time, so that the loop vectorises.
            let (mut low, mut high) = ([u32::MAX; 8], [0u32; 8]);
            let mut eights = slots.chunks_exact(8);
            for c in &mut eights {
                for j in 0..8 {
                    low[j] = low[j].min(c[j].wrapping_sub(2));
                    high[j] = high[j].max(c[j]);
                }
            }
            for &s in eights.remainder() {
                low[0] = low[0].min(s.wrapping_sub(2));
                high[0] = high[0].max(s);
            }
            let lo = match low.iter().min().copied().unwrap_or(u32::MAX) {
                m if m >= u32::MAX - 1 => u32::MAX, // bin 0 only
                m => m + 2,
            };
            let hi = high.iter().max().copied().unwrap_or(0);
            let (t01, t23) = lanes.split_at_mut(4 * BINS);
            let (t0, t1) = t01.split_at_mut(2 * BINS);
            let (t2, t3) = t23.split_at_mut(2 * BINS);
            let mut quads = slots.chunks_exact(LANES);
            for q in &mut quads {
                t0[q[0] as usize] += 1;
                t1[q[1] as usize] += 1;
                t2[q[2] as usize] += 1;
                t3[q[3] as usize] += 1;
            }
            for &s in quads.remainder() {
                t0[s as usize] += 1;
            }
            let sum = |s: usize| t0[s] + t1[s] + t2[s] + t3[s];
            out.zero = [sum(0), sum(1)];
            // Whole bins: from the first used bin's first slot to the last used bin's edge.
            let range = if lo <= hi {
                let (lo, hi) = ((lo & !1) as usize, (hi | 1) as usize);
                out.lo = lo / 2;
                out.count.extend((lo..=hi).map(sum));
                lo..hi + 1
            } else {
                0..0
            };
            // Reset bin 0 and the slots used above it.
            for t in [&mut *t0, &mut *t1, &mut *t2, &mut *t3] {
                t[..2].fill(0);
                t[range.clone()].fill(0);
            }
        })
    }

    /// The block of octave `o`, made (zeroed) if it has none yet.
    fn block(&mut self, o: usize) -> &mut [u32] {
        if self.octaves.is_empty() {
            self.first = o;
        }
        if o < self.first {
            let mut grown = vec![EMPTY; self.first - o];
            grown.append(&mut self.octaves);
            self.octaves = grown;
            self.first = o;
        }
        if o - self.first >= self.octaves.len() {
            self.octaves.resize(o - self.first + 1, EMPTY);
        }
        let at = o - self.first;
        if self.octaves[at] == EMPTY {
            self.octaves[at] = (self.table.len() / BLOCK_WORDS) as u16;
            self.table.resize(self.table.len() + BLOCK_WORDS, 0);
        }
        let b = self.octaves[at] as usize * BLOCK_WORDS;
        &mut self.table[b..b + BLOCK_WORDS]
    }

    /// Adds the counts of one block.
    pub fn absorb(&mut self, block: &BlockCounts) {
        if block.zero != [0, 0] {
            let z = self.block(0);
            z[0] += block.zero[0];
            z[1] += block.zero[1];
        }
        // The block's slots, octave by octave; octaves without an entry are not held.
        let (mut bin, end) = (block.lo, block.lo + block.count.len() / 2);
        while bin < end {
            let o = bin / OCTAVE_BINS;
            let stop = ((o + 1) * OCTAVE_BINS).min(end);
            let slots = &block.count[2 * (bin - block.lo)..2 * (stop - block.lo)];
            if slots.iter().any(|&c| c > 0) {
                let at = 2 * (bin % OCTAVE_BINS);
                let b = self.block(o);
                for (c, &x) in b[at..at + slots.len()].iter_mut().zip(slots) {
                    *c += x;
                }
            }
            bin = stop;
        }
    }

    /// Ends the pass; returns the bound on the keep-probability error off exact ties, for a
    /// window of width `eps` over `n` entries.
    pub fn finish(&mut self, eps: f64, n: usize) -> f64 {
        let mut below = 0u64;
        let mut worst = 0u32;
        self.below = Vec::with_capacity(self.octaves.len());
        for (i, &ix) in self.octaves.iter().enumerate() {
            self.below.push(below as u32);
            if ix == EMPTY {
                continue;
            }
            let b = &mut self.table[ix as usize * BLOCK_WORDS..(ix as usize + 1) * BLOCK_WORDS];
            // Stored as f32 bits for the lookups (exact up to 2^24 entries).
            let f = |x: u64| (x as f32).to_bits();
            for bin in 0..OCTAVE_BINS {
                let (rest, edge) = (b[2 * bin], b[2 * bin + 1]);
                (b[2 * bin], b[2 * bin + 1]) = (f(below), f(edge as u64));
                // Bin 0 (zeros and values below 2^-126) is left out of the bound.
                if self.first + i > 0 || bin > 0 {
                    worst = worst.max(rest.max(1) - 1);
                }
                below += (rest + edge) as u64;
            }
            b[2 * OCTAVE_BINS] = f(below);
        }
        self.total = below as u32;
        self.per_position = (1.0 / (n.max(2) - 1) as f64) as f32;
        eps.abs() * worst as f64 / n.max(1) as f64
    }

    /// The estimated rank (1-based) of the entry with key `k` at `position` in the tensor.
    #[inline(always)]
    pub fn rank(&self, k: u32, position: usize) -> f32 {
        let bin = (k >> LOW_BITS) as usize;
        let octave = bin / OCTAVE_BINS;
        let at = octave.wrapping_sub(self.first);
        let ix = self.octaves.get(at).copied().unwrap_or(EMPTY);
        if ix == EMPTY {
            // An octave without entries (none, for the deltas the histogram was made of): the
            // rank after those below it.
            let below = match self.below.get(at) {
                Some(&b) => b,
                None if octave < self.first => 0,
                None => self.total,
            };
            return below as f32 + 1.0;
        }
        let b = ix as usize * BLOCK_WORDS + 2 * (bin % OCTAVE_BINS);
        let [below, edge, next] = [b, b + 1, b + 2].map(|i| f32::from_bits(self.table[i]));
        let low = (k & LOW_MASK) as i32;
        // The edge key's ties in position order; the others spread over low bits 1..=LOW_MASK.
        let tie =
            below + 1.0 + (edge - 1.0).max(0.0) * (position as i64 as f32 * self.per_position);
        let rest = next - below - edge;
        let spread = (rest - 1.0).max(0.0) * (1.0 / (LOW_MASK - 1) as f32);
        let other = below + 1.0 + edge + spread * (low - 1).max(0) as f32;
        if low == 0 {
            tie
        } else {
            other
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

    /// Estimated ranks against exact ones: the keep-probability bound at ε = 0.1, and the largest
    /// error of a rank relative to `n`, off exact ties and on them (zeros left out: their order
    /// does not matter).
    fn rank_errors(v: &[f32]) -> (f64, f64, f64) {
        let n = v.len();
        let mut exact = vec![0u32; n];
        ordinal_ranks(v, &mut RankScratch::default(), &mut exact);
        let mut h = RankHistogram::new();
        let mut counts = BlockCounts::default();
        for block in v.chunks(16384) {
            RankHistogram::count_block(block.iter().copied(), &mut counts);
            h.absorb(&counts);
        }
        let bound = h.finish(0.1, n);
        let mut seen = std::collections::HashMap::new();
        for &x in v {
            *seen.entry(x.abs().to_bits()).or_insert(0) += 1;
        }
        let (mut off_ties, mut on_ties) = (0f64, 0f64);
        for (i, &x) in v.iter().enumerate() {
            if x == 0.0 {
                continue;
            }
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
        // Within a bin the keys are spread evenly: the estimate is far better than the bound.
        assert!(off_ties * 0.1 < bound / 10.0, "worst {off_ties}");
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
        assert!(off_ties * 0.1 <= bound, "{off_ties} > {bound}");
        assert!(bound <= 1e-3, "bound {bound}");
        // Ties spread over the tensor: interpolating the position is close.
        assert!(on_ties < 5e-3, "ties {on_ties}");
    }

    #[test]
    fn histogram_of_values_spanning_many_octaves_keeps_only_used_octaves() {
        // Deltas in three clusters 40 octaves apart (2^-60, 2^-20, 2^20), the rest empty.
        let v: Vec<f32> = (0..60_000)
            .map(|i| {
                let scale = [2f32.powi(-60), 2f32.powi(-20), 2f32.powi(20)][i % 3];
                let x = scale * (1.0 + spread(i).abs() * 900.0);
                if i % 2 == 0 {
                    x
                } else {
                    -x
                }
            })
            .collect();
        let (bound, off_ties, _) = rank_errors(&v);
        assert!(bound <= 1e-3, "bound {bound}");
        assert!(off_ties * 0.1 <= bound, "{off_ties} > {bound}");
        // Only the octaves holding deltas have tables: each cluster spans at most two octaves.
        let mut h = RankHistogram::new();
        let mut counts = BlockCounts::default();
        for block in v.chunks(16384) {
            RankHistogram::count_block(block.iter().copied(), &mut counts);
            h.absorb(&counts);
        }
        let blocks = h.table.len() / BLOCK_WORDS;
        assert!((3..=6).contains(&blocks), "{blocks} octave tables");
        assert!(h.octaves.len() > 80, "{} octaves spanned", h.octaves.len());
        h.finish(0.1, v.len());
        // A key in an empty octave between the clusters ranks after the lowest cluster.
        let between = key32(2f32.powi(-40));
        assert_eq!(h.rank(between, 0), 20_001.0);
        // Below and above every delta: first and after the last.
        assert_eq!(h.rank(key32(2f32.powi(-100)), 0), 1.0);
        assert_eq!(h.rank(key32(2f32.powi(100)), 0), 60_001.0);
    }

    #[test]
    fn histogram_of_an_empty_or_all_zero_tensor() {
        let mut h = RankHistogram::new();
        let mut counts = BlockCounts::default();
        RankHistogram::count_block(std::iter::empty::<f32>(), &mut counts);
        h.absorb(&counts);
        RankHistogram::count_block([0f32; 5].into_iter(), &mut counts);
        h.absorb(&counts);
        assert_eq!(h.finish(0.1, 5), 0.0);
        // Five tied zeros: ranks 1..=5 in position order.
        let ranks: Vec<f32> = (0..5).map(|i| h.rank(0, i)).collect();
        assert_eq!(ranks, [1.0, 2.0, 3.0, 4.0, 5.0]);
    }
}
