//! `truncate_rank` beyond the sd-mecha fixtures: the randomized SVD recovers a matrix of the rank
//! asked exactly and is seeded (same bytes for a seed whatever the threads, other bytes for
//! another seed); `ratio` picks the rank per matrix.

mod common;
use amalgam::io::dtype::OutputDtype;
use amalgam::method::ParamValue::{self, Number, Text};
use amalgam::real::ComputeDtype;
use amalgam::{merge, MergeOptions, NoProgress};
use common::*;
use std::path::Path;

/// Runs `truncate_rank` on one f64 tensor `w` of `shape`; returns the output's `w`.
fn truncate(
    dir: &Path,
    shape: &[usize],
    a: &[f64],
    params: &[(&str, ParamValue)],
    seed: u64,
    threads: usize,
) -> Vec<f64> {
    let input = write_file(&dir.join("a.safetensors"), &[f64t("w", shape, a)], true);
    let g = one_node(&[&input], "truncate_rank", vec![vec![0]], params);
    let out = dir.join("out.safetensors");
    let _ = std::fs::remove_file(&out);
    let mut o = MergeOptions::new(&out);
    o.output_dtype = OutputDtype::F64;
    o.compute_dtype = ComputeDtype::F64;
    o.seed = seed;
    o.threads = threads;
    merge(&g, &o, &NoProgress).unwrap();
    read_f64(&out, "w")
}

fn values(seed: u64, n: usize) -> Vec<f64> {
    lcg_values(seed, n)
}

/// `Σ_i u_i v_iᵀ` of `rank` random outer products: a `rows × cols` matrix of that rank.
fn of_rank(rows: usize, cols: usize, rank: usize) -> Vec<f64> {
    let (u, v) = (values(1, rows * rank), values(2, cols * rank));
    (0..rows * cols)
        .map(|e| {
            let (i, j) = (e / cols, e % cols);
            (0..rank).map(|k| u[i * rank + k] * v[j * rank + k]).sum()
        })
        .collect()
}

fn randomized(rank: f64) -> Vec<(&'static str, ParamValue)> {
    vec![("rank", Number(rank)), ("svd", Text("randomized".into()))]
}

#[test]
fn randomized_svd_recovers_a_matrix_of_the_rank_asked() {
    let dir = tempfile::tempdir().unwrap();
    let (rows, cols) = (60, 40);
    let a = of_rank(rows, cols, 3);
    for params in [randomized(3.0), vec![("rank", Number(3.0))]] {
        let got = truncate(dir.path(), &[rows, cols], &a, &params, 1, 0);
        let scale = a.iter().fold(0f64, |m, x| m.max(x.abs()));
        for (g, w) in got.iter().zip(&a) {
            assert!((g - w).abs() <= 1e-10 * scale, "{params:?}: {g} vs {w}");
        }
    }
    // Rank 2 of a rank-3 matrix: randomized and exact agree (a wide gap after σ_2).
    let exact = truncate(
        dir.path(),
        &[rows, cols],
        &a,
        &[("rank", Number(2.0))],
        1,
        0,
    );
    let approx = truncate(dir.path(), &[rows, cols], &a, &randomized(2.0), 1, 0);
    for (g, w) in approx.iter().zip(&exact) {
        assert!((g - w).abs() <= 1e-9, "{g} vs {w}");
    }
}

#[test]
fn randomized_svd_is_seeded() {
    let dir = tempfile::tempdir().unwrap();
    let shape = [8, 3, 3, 3];
    let a = values(9, 8 * 27);
    let one = truncate(dir.path(), &shape, &a, &randomized(4.0), 7, 1);
    let two = truncate(dir.path(), &shape, &a, &randomized(4.0), 7, 2);
    assert_eq!(one, two);
    let other = truncate(dir.path(), &shape, &a, &randomized(4.0), 8, 1);
    assert_ne!(one, other);
    // The exact SVD does not depend on the seed.
    let e7 = truncate(dir.path(), &shape, &a, &[("rank", Number(4.0))], 7, 1);
    let e8 = truncate(dir.path(), &shape, &a, &[("rank", Number(4.0))], 8, 1);
    assert_eq!(e7, e8);
}

#[test]
fn ratio_picks_the_rank_of_each_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let (rows, cols) = (12, 10);
    let a = of_rank(rows, cols, 6);
    // round(0.25 · 10) = round(2.5) = 2 (half to even, as sd-mecha's Python round).
    let by_ratio = truncate(
        dir.path(),
        &[rows, cols],
        &a,
        &[("ratio", Number(0.25))],
        0,
        0,
    );
    let by_rank = truncate(
        dir.path(),
        &[rows, cols],
        &a,
        &[("rank", Number(2.0))],
        0,
        0,
    );
    assert_eq!(by_ratio, by_rank);
    // The whole rank returns the matrix as it is; vectors pass through.
    let whole = truncate(
        dir.path(),
        &[rows, cols],
        &a,
        &[("ratio", Number(1.0))],
        0,
        0,
    );
    assert_eq!(whole, a);
    let v = values(3, 7);
    assert_eq!(
        truncate(dir.path(), &[7], &v, &[("rank", Number(1.0))], 0, 0),
        v
    );
}
