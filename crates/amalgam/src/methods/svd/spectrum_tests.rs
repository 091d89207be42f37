//! `polar`: the Gram eigendecomposition against the exact SVD, and when `auto` falls back to it.

use super::*;

/// A deterministic pseudo-random matrix (a 64-bit LCG's top bits, uniform in [-1, 1)).
fn random(rows: usize, cols: usize, seed: u64) -> Vec<f64> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..rows * cols)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        })
        .collect()
}

/// `‖a − b‖_F / ‖b‖_F`.
fn relative(a: &[f64], b: &[f64]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let n: f64 = b.iter().map(|y| y * y).sum();
    (d / n).sqrt()
}

fn sorted(mut s: Vec<f64>) -> Vec<f64> {
    s.sort_by(|a, b| b.total_cmp(a));
    s
}

/// `auto` agrees with the exact SVD on well-conditioned tall, wide and square matrices.
#[test]
fn gram_agrees_with_the_svd() {
    for (rows, cols, seed) in [(40, 40, 1), (90, 30, 2), (25, 70, 3), (1, 9, 4), (9, 1, 5)] {
        let a = random(rows, cols, seed);
        let g = polar(&a, rows, cols, Factorization::Auto, "k").unwrap();
        let s = polar(&a, rows, cols, Factorization::Svd, "k").unwrap();
        assert!(!g.exact && s.exact, "{rows}x{cols}");
        let err = relative(&g.factor, &s.factor);
        assert!(err < 1e-9, "{rows}x{cols}: U V^T differs by {err:e}");
        for (x, y) in sorted(g.sigma).iter().zip(sorted(s.sigma)) {
            assert!((x - y).abs() <= 1e-9 * y, "{rows}x{cols}: sigma {x} vs {y}");
        }
    }
}

/// The factor is orthogonal: `P Pᵀ = I` (wide) or `Pᵀ P = I` (tall).
#[test]
fn gram_factor_is_orthogonal() {
    let (rows, cols) = (30, 12);
    let a = random(rows, cols, 7);
    let p = polar(&a, rows, cols, Factorization::Auto, "k").unwrap();
    assert!(!p.exact);
    for i in 0..cols {
        for j in 0..cols {
            let dot: f64 = (0..rows)
                .map(|r| p.factor[r * cols + i] * p.factor[r * cols + j])
                .sum();
            let want = if i == j { 1.0 } else { 0.0 };
            assert!((dot - want).abs() < 1e-12, "({i}, {j}): {dot}");
        }
    }
}

/// Rank-deficient and ill-conditioned matrices go to the exact SVD; the zero matrix gives 0.
#[test]
fn auto_falls_back_when_ill_conditioned() {
    // Rank 1: an outer product.
    let (u, v) = (random(8, 1, 11), random(1, 6, 12));
    let rank1: Vec<f64> = (0..48).map(|i| u[i / 6] * v[i % 6]).collect();
    let p = polar(&rank1, 8, 6, Factorization::Auto, "k").unwrap();
    assert!(p.exact);
    // Columns scaled so that sigma_min / sigma_max is about 1e-6.
    let mut a = random(10, 4, 13);
    for r in 0..10 {
        a[r * 4 + 3] *= 1e-6;
    }
    let p = polar(&a, 10, 4, Factorization::Auto, "k").unwrap();
    assert!(p.exact);
    let s = polar(&a, 10, 4, Factorization::Svd, "k").unwrap();
    assert_eq!(p.factor, s.factor);
    // Zero.
    let p = polar(&[0.0; 12], 3, 4, Factorization::Auto, "k").unwrap();
    assert!(p.factor.iter().all(|&x| x == 0.0) && p.sigma.iter().all(|&s| s == 0.0));
}
