//! DELLA: exact and histogram ranks, keep probabilities.

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
    let (blocks, spanned) = h.octave_tables();
    assert!((3..=6).contains(&blocks), "{blocks} octave tables");
    assert!(spanned > 80, "{spanned} octaves spanned");
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
