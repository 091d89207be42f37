//! Ranks of a tensor too large to sort, from a histogram of its magnitudes (1/128-octave bins).

use super::*;

/// Bits of the f32 magnitude that select a histogram bin: 8 exponent and 7 mantissa bits, so a
/// bin spans 1/128 of an octave.
pub(super) const BIN_BITS: u32 = 15;
/// The rest of the 31 magnitude bits, within a bin.
pub(super) const LOW_BITS: u32 = 31 - BIN_BITS;
pub(super) const BINS: usize = 1 << BIN_BITS;
pub(super) const LOW_MASK: u32 = (1 << LOW_BITS) - 1;

/// The 31 magnitude bits of `v` as an f32 (an order-preserving key).
#[inline]
pub fn key32<T: Real>(v: T) -> u32 {
    (v.to_f64().abs() as f32).to_bits() & 0x7fff_ffff
}

/// The counting slot of a key: two per bin, the others (`2·bin`) and the bin's lower edge
/// (`2·bin + 1`).
#[inline(always)]
pub(super) fn slot(k: u32) -> u32 {
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
#[derive(Clone)]
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
pub(super) const OCTAVE_BINS: usize = 1 << (BIN_BITS - 8);
/// Words of one octave's block: two per bin and two after.
pub(super) const BLOCK_WORDS: usize = 2 * OCTAVE_BINS + 2;
pub(super) const EMPTY: u16 = u16::MAX;

/// The counts of one block of one model's deltas: bin 0's two slots, and the slots of bins
/// `lo..lo + count.len() / 2`.
#[derive(Default)]
pub struct BlockCounts {
    zero: [u32; 2],
    lo: usize,
    count: Vec<u32>,
}

impl BlockCounts {
    /// The most bytes one block's counts take (every slot of the table).
    pub const MAX_BYTES: usize = std::mem::size_of::<BlockCounts>() + 2 * BINS * 4;
}

/// Tables a block is counted into, element `i` into table `i % LANES`: consecutive entries in the
/// same slot (frequent: the bins near the mode hold the most) then do not wait on each other's
/// increment.
pub(super) const LANES: usize = 4;

/// Per-thread tables of [`RankHistogram::count_block`], reused: only the slots a block used are
/// reset after it.
pub(super) struct Scratch {
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
    /// The octave tables held and the octaves spanned (for tests of the sparse layout).
    #[cfg(test)]
    pub(super) fn octave_tables(&self) -> (usize, usize) {
        (self.table.len() / BLOCK_WORDS, self.octaves.len())
    }

    /// An empty histogram.
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
