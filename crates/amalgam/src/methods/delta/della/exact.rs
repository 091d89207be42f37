//! Exact ordinal ranks of magnitudes: a stable radix sort of the magnitude keys.

use super::*;

/// Reusable buffers of [`ordinal_ranks`].
#[derive(Default)]
pub struct RankScratch {
    keys: [Vec<u64>; 2],
    index: [Vec<u32>; 2],
}

/// Bits per pass of the radix sort.
pub(super) const RADIX_BITS: u32 = 11;
/// Up to this many values are ranked with a comparison sort.
pub(super) const SMALL_SORT: usize = 4096;

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
