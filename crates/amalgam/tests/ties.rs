//! The TIES / DARE / geometric-median family: hand-worked cases and sd-mecha reference values.

mod common;
use amalgam::dtype::OutputDtype;
use amalgam::method::ParamValue::{self, Bool, Number, Text};
use amalgam::real::ComputeDtype;
use amalgam::{merge, MergeOptions, NoProgress};
use common::*;
use std::path::{Path, PathBuf};

const A: [f32; 8] = [3.0, 4.0, 1.0, -2.0, 2.0, 1.0, -4.0, 3.0];
const B: [f32; 8] = [-1.0, 3.0, 4.0, 2.0, 4.0, 2.0, -3.0, 1.0];
const C: [f32; 8] = [-1.0, 2.0, 3.0, 4.0, 4.0, -3.0, 2.0, 1.0];

/// Writes a zero base and one model per row (key "w", shape [2, len/2]); merges with `method`
/// (base slot first) and returns the output of key "w" for f32 and f64 compute.
fn run_in(
    dir: &Path,
    models: &[&[f32]],
    method: &str,
    params: &[(&str, ParamValue)],
    opts: impl Fn(&mut MergeOptions),
) -> Vec<Vec<f32>> {
    let len = models[0].len();
    let shape = [2, len / 2];
    let mut paths: Vec<PathBuf> = vec![write_file(
        &dir.join("base.safetensors"),
        &[f32t("w", &shape, &vec![0.0; len])],
        true,
    )];
    for (i, m) in models.iter().enumerate() {
        paths.push(write_file(
            &dir.join(format!("m{i}.safetensors")),
            &[f32t("w", &shape, m)],
            true,
        ));
    }
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let g = one_node(
        &refs,
        method,
        vec![vec![0], (1..paths.len()).collect()],
        params,
    );
    let mut results = Vec::new();
    for compute in [ComputeDtype::F32, ComputeDtype::F64] {
        let out = dir.join(format!("out-{compute:?}.safetensors"));
        let _ = std::fs::remove_file(&out);
        let mut o = MergeOptions::new(&out);
        o.output_dtype = OutputDtype::F32;
        o.compute_dtype = compute;
        opts(&mut o);
        merge(&g, &o, &NoProgress).unwrap();
        results.push(read_f32(&out, "w"));
    }
    results
}

fn run(models: &[&[f32]], method: &str, params: &[(&str, ParamValue)]) -> Vec<Vec<f32>> {
    let dir = tempfile::tempdir().unwrap();
    run_in(dir.path(), models, method, params, |_| {})
}

fn check(results: Vec<Vec<f32>>, want: &[f32], tol: f32) {
    for r in results {
        assert_close(&r, want, tol);
    }
}

#[test]
fn ties_soup_matches_sd_mecha_ties_sum_count_vote() {
    // sd-mecha 1.1.x `ties_sum(A, B, C, k=0.5)` (count vote), computed in float64.
    check(
        run(&[&A, &B, &C], "ties_soup", &[("k", Number(0.5))]),
        &[3.0, 3.0, 3.5, 3.0, 3.333333, 0.0, -3.5, 3.0],
        1e-5,
    );
}

#[test]
fn mass_election_matches_sd_mecha_ties_sum_vote_sgn() {
    // sd-mecha `ties_sum(A, B, C, k=0.5, vote_sgn=True)`: the paper's mass election.
    check(
        run(&[&A, &B, &C], "ties", &[("k", Number(0.5))]),
        &[3.0, 3.0, 3.5, 3.0, 3.333333, -3.0, -3.5, 3.0],
        1e-5,
    );
    check(
        run(
            &[&A, &B, &C],
            "ties_soup",
            &[("k", Number(0.5)), ("election", Text("mass".into()))],
        ),
        &[3.0, 3.0, 3.5, 3.0, 3.333333, -3.0, -3.5, 3.0],
        1e-5,
    );
}

#[test]
fn trim_keeps_every_entry_equal_to_the_threshold() {
    // One model, |δ| = 1, 2, 2, 2, 3, 0.5: k = 0.6 → rank ⌊0.4·6⌋ = 2 → threshold = 2nd smallest
    // = 1: keeps 1 and above. k = 0.4 → rank 3 → threshold 2: keeps the three 2s and the 3.
    let d = [1.0, -2.0, 2.0, 2.0, 3.0, 0.5];
    check(
        run(&[&d], "ties_soup", &[("k", Number(0.6))]),
        &[1.0, -2.0, 2.0, 2.0, 3.0, 0.0],
        0.0,
    );
    check(
        run(&[&d], "ties_soup", &[("k", Number(0.4))]),
        &[0.0, -2.0, 2.0, 2.0, 3.0, 0.0],
        0.0,
    );
    // k = 0.01 → rank ⌊0.99·6⌋ = 5 → threshold 2: the ties at the threshold keep 4 entries.
    check(
        run(&[&d], "ties_soup", &[("k", Number(0.01))]),
        &[0.0, -2.0, 2.0, 2.0, 3.0, 0.0],
        0.0,
    );
}

#[test]
fn elections_disjoint_mean_and_sign_ties() {
    // Four models, per element:
    //  0: +1 +1 −5 +2 → count + (3 vs 1), mass − (−1): count mean(1,1,2)=4/3, mass −5
    //  1: +1 −1 +2 −2 → count tie; mass tie (0) → 0; with sign_tie positive: mean(1,2) = 1.5
    //  2: 0 0 0 +4   → + : 4 (zeros never vote nor count)
    //  3: −1 −3 +1 0 → count −, mass −: mean(−1, −3) = −2
    let m = [
        [1.0, 1.0, 0.0, -1.0],
        [1.0, -1.0, 0.0, -3.0],
        [-5.0, 2.0, 0.0, 1.0],
        [2.0, -2.0, 4.0, 0.0],
    ];
    let models: Vec<&[f32]> = m.iter().map(|r| r.as_slice()).collect();
    check(
        run(&models, "ties_soup", &[]),
        &[4.0 / 3.0, 0.0, 4.0, -2.0],
        1e-6,
    );
    check(
        run(&models, "ties", &[("k", Number(1.0))]),
        &[-5.0, 0.0, 4.0, -2.0],
        1e-6,
    );
    check(
        run(
            &models,
            "ties_soup",
            &[("sign_tie", Text("positive".into()))],
        ),
        &[4.0 / 3.0, 1.5, 4.0, -2.0],
        1e-6,
    );
    // lambda scales the merged delta; fuse = mean divides by the number of models.
    check(
        run(&models, "ties_soup", &[("lambda", Number(0.5))]),
        &[2.0 / 3.0, 0.0, 2.0, -1.0],
        1e-6,
    );
    check(
        run(&models, "ties_soup", &[("fuse", Text("mean".into()))]),
        &[1.0, 0.0, 1.0, -1.0],
        1e-6,
    );
}

#[test]
fn dare_keep_rate_is_binomial_and_rescale_is_exact() {
    let n = 40_000;
    let ones = vec![1.0f32; n];
    for (p, rescale, value) in [
        (0.3, "none", 1.0f32),
        (0.3, "inverse_keep", 1.0 / 0.7),
        (0.9, "inverse_keep", 10.0),
    ] {
        let r = run(
            &[&ones],
            "dare",
            &[("p", Number(p)), ("rescale", Text(rescale.into()))],
        );
        for out in r {
            let kept = out.iter().filter(|&&x| x != 0.0).count() as f64;
            let q = 1.0 - p;
            let sd = (n as f64 * q * (1.0 - q)).sqrt();
            assert!(
                (kept - n as f64 * q).abs() < 5.0 * sd,
                "p {p}: kept {kept} of {n}"
            );
            assert!(
                out.iter().all(|&x| x == 0.0 || (x - value).abs() < 1e-6),
                "p {p}"
            );
        }
    }
    // Different seeds give different masks; the same seed the same.
    let dir = tempfile::tempdir().unwrap();
    let a = run_in(dir.path(), &[&ones], "dare", &[], |o| o.seed = 1);
    let b = run_in(dir.path(), &[&ones], "dare", &[], |o| o.seed = 1);
    let c = run_in(dir.path(), &[&ones], "dare", &[], |o| o.seed = 2);
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn geometric_median_matches_sd_mecha() {
    // sd-mecha `geometric_median(A, B, C)` (eps 1e-6, maxiter 100, ftol 1e-20), float64.
    let points: Vec<Vec<f64>> = [A, B, C]
        .iter()
        .map(|m| m.iter().map(|&x| x as f64).collect())
        .collect();
    let got: Vec<f32> = merge_points(&points, "geometric_median", &[], None)
        .into_iter()
        .map(|x| x as f32)
        .collect();
    assert_close(
        &got,
        &[
            -0.275472, 3.007794, 3.283266, 1.622148, 3.637736, 0.952176, -2.314441, 1.362264,
        ],
        2e-6,
    );
}

#[test]
fn ties_with_geometric_median_fuse_matches_sd_mecha_apply_median() {
    // sd-mecha `ties_sum_extended(A, B, C, k=1, apply_median=True)`: count vote, sign filter,
    // then the geometric median of the filtered deltas.
    check(
        run(
            &[&A, &B, &C],
            "ties_soup",
            &[("fuse", Text("geometric_median".into()))],
        ),
        &[
            -0.844959, 2.973008, 3.352845, 2.053985, 3.689919, 1.480893, -2.608942, 1.310081,
        ],
        2e-5,
    );
}

/// Weiszfeld on N whole points kept in memory (the reference algorithm).
fn direct_weiszfeld(points: &[Vec<f64>], eps: f64, maxiter: usize, ftol: f64) -> Vec<f64> {
    let n = points.len();
    let p = points[0].len();
    let combine = |c: &[f64]| -> Vec<f64> {
        (0..p)
            .map(|i| (0..n).map(|t| c[t] * points[t][i]).sum())
            .collect()
    };
    let dist = |m: &[f64]| -> Vec<f64> {
        points
            .iter()
            .map(|x| {
                x.iter()
                    .zip(m)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f64>()
                    .sqrt()
            })
            .collect()
    };
    let mut m = combine(&vec![1.0 / n as f64; n]);
    let mut f = dist(&m).iter().sum::<f64>() / n as f64;
    for _ in 0..maxiter {
        let w: Vec<f64> = dist(&m).iter().map(|d| 1.0 / d.max(eps)).collect();
        let total: f64 = w.iter().sum();
        m = combine(&w.iter().map(|x| x / total).collect::<Vec<_>>());
        let f_new = dist(&m).iter().sum::<f64>() / n as f64;
        let done = (f - f_new).abs() <= ftol * f_new;
        f = f_new;
        if done {
            break;
        }
    }
    m
}

#[test]
fn weiszfeld_through_the_gram_matrix_equals_direct_weiszfeld() {
    // Points like fine-tunes: a shared base plus small individual deltas, one outlier.
    let p = 5000;
    let n = 6;
    let points: Vec<Vec<f64>> = (0..n)
        .map(|t| {
            (0..p)
                .map(|i| {
                    let base = ((i * 7919) % 997) as f64 * 2e-5 - 0.01;
                    let mut h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                        ^ (t as u64 + 1).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
                    h ^= h >> 29;
                    h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
                    h ^= h >> 32;
                    let own = ((h % 2001) as f64 - 1000.0) * 1e-6;
                    base + own + if t == n - 1 { 5e-3 } else { 0.0 }
                })
                .collect()
        })
        .collect();
    let got = merge_points(&points, "geometric_median", &[], Some(1));
    let want = direct_weiszfeld(&points, 1e-6, 100, 1e-20);
    let norm = want.iter().map(|x| x * x).sum::<f64>().sqrt();
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        .sqrt();
    assert!(err / norm < 1e-9, "relative error {}", err / norm);
}

#[test]
fn random_and_statistic_methods_are_byte_identical_across_threads_and_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let n = 70_001;
    let models: Vec<Vec<f32>> = (0..5)
        .map(|t| {
            (0..n)
                .map(|i| ((((i + 31 * t) * 2654435761usize) % 2001) as f32 - 1000.0) * 1e-5)
                .collect()
        })
        .collect();
    let refs: Vec<&[f32]> = models.iter().map(|m| m.as_slice()).collect();
    for (method, params) in [
        ("tsd", vec![]),
        ("tgmd", vec![("base_point", Bool(true))]),
        (
            "ties",
            vec![
                ("k", Number(0.3)),
                ("drop", Text("dare".into())),
                ("p", Number(0.2)),
            ],
        ),
    ] {
        let mut outputs = Vec::new();
        for (threads, chunk) in [(1, None), (2, None), (2, Some(16_384)), (1, Some(32_768))] {
            let sub = dir.path().join(format!("{method}-{threads}-{chunk:?}"));
            std::fs::create_dir_all(&sub).unwrap();
            let r = run_in(
                &sub,
                &refs.iter().map(|m| &m[..n - 1]).collect::<Vec<_>>(),
                method,
                &params,
                |o| {
                    o.threads = threads;
                    o.chunk_override = chunk;
                    o.seed = 114514;
                },
            );
            outputs.push(r);
        }
        for o in &outputs[1..] {
            assert!(
                o == &outputs[0],
                "{method}: output depends on threads or chunking"
            );
        }
    }
}

#[test]
fn pipeline_options_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_file(
        &dir.path().join("a.safetensors"),
        &[f32t("w", &[1], &[1.0])],
        true,
    );
    let graph = |method: &str, params: Vec<(&str, ParamValue)>| amalgam::Graph {
        models: vec![amalgam::graph::ModelInput {
            name: "a".into(),
            path: p.clone(),
        }],
        nodes: vec![amalgam::graph::Node {
            name: "n".into(),
            method: amalgam::methods::canonical_name(method).unwrap(),
            params: params
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            slots: vec![
                vec![amalgam::graph::Ref::Model(0)],
                vec![amalgam::graph::Ref::Model(0)],
            ],
        }],
        output: amalgam::graph::Ref::Node(0),
        fallback: None,
    };
    let err = |m: &str, p: Vec<(&str, ParamValue)>| graph(m, p).validate().unwrap_err().to_string();
    assert!(err("ties", vec![("election", Text("majority".into()))])
        .contains("expected one of: mass, count, none"));
    assert!(err("ties", vec![("k", Number(0.0))]).contains("(0, 1]"));
    assert!(err("dare", vec![("p", Number(1.0))]).contains("[0, 1)"));
    assert!(err("ties", vec![("rescale", Text("inverse_keep".into()))]).contains("needs `drop"));
    assert!(err("ties", vec![("election", Text("none".into()))]).contains("needs an election"));
    assert!(err("ties", vec![("base_point", Bool(true))]).contains("only applies"));
    assert!(err("ties", vec![("vote_sgn", Bool(true))]).contains("unknown parameter `vote_sgn`"));
}

#[test]
fn model_stock_sd_mecha_variant_matches_sd_mecha() {
    // sd-mecha `model_stock(A, B, C)`: adjacent pairs, cosines along the last dimension.
    check(
        run(
            &[&A, &B, &C],
            "model_stock",
            &[
                ("pairs", Text("adjacent".into())),
                ("unit", Text("row".into())),
            ],
        ),
        &[
            0.272727, 2.454545, 2.181818, 1.090909, 2.5, 0.0, -1.25, 1.25,
        ],
        2e-6,
    );
}

#[test]
fn model_stock_t_for_known_cosines() {
    // Two task vectors per case (base 0): cos 0 → t = 0 (the base); cos 1 → t = 1 (the mean);
    // cos 1/√2 → t = 2c / (1 + c).
    let c: f32 = std::f32::consts::FRAC_1_SQRT_2;
    let t = 2.0 * c / (1.0 + c);
    for (x, y, want) in [
        ([1.0, 0.0], [0.0, 1.0], [0.0, 0.0]),
        ([1.0, 0.0], [3.0, 0.0], [2.0, 0.0]),
        ([1.0, 1.0], [1.0, 0.0], [t, 0.5 * t]),
    ] {
        check(run(&[&x, &y], "model_stock", &[]), &want, 1e-6);
    }
    // Three vectors, all pairs: cosines 0, 0, 1/√2... here e1, e2, e1+e2: cos = 0, 1/√2, 1/√2.
    let mean_cos = (0.0 + 2.0 * c) / 3.0;
    let t3 = 3.0 * mean_cos / (1.0 + 2.0 * mean_cos);
    check(
        run(&[&[1.0, 0.0], &[0.0, 1.0], &[1.0, 1.0]], "model_stock", &[]),
        &[t3 * 2.0 / 3.0, t3 * 2.0 / 3.0],
        1e-6,
    );
}

/// Writes one f64 file per point (key "w") and merges them with `method` (f64 in and out).
fn merge_points(
    points: &[Vec<f64>],
    method: &str,
    params: &[(&str, ParamValue)],
    chunk: Option<usize>,
) -> Vec<f64> {
    let dir = tempfile::tempdir().unwrap();
    let p = points[0].len();
    let paths: Vec<PathBuf> = points
        .iter()
        .enumerate()
        .map(|(t, x)| {
            write_file(
                &dir.path().join(format!("p{t}.safetensors")),
                &[f64t("w", &[p], x)],
                true,
            )
        })
        .collect();
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let g = one_node(&refs, method, vec![(0..points.len()).collect()], params);
    let out = dir.path().join("out.safetensors");
    let mut o = MergeOptions::new(&out);
    o.output_dtype = OutputDtype::F64;
    o.compute_dtype = ComputeDtype::F64;
    o.chunk_override = chunk;
    merge(&g, &o, &NoProgress).unwrap();
    read_f64(&out, "w")
}

#[test]
fn karcher_of_orthogonal_directions() {
    // e1 and 3·e2: the spherical mean of the directions is (e1 + e2)/√2, scaled by the mean norm 2.
    let got = merge_points(
        &[vec![1.0, 0.0], vec![0.0, 3.0]],
        "karcher",
        &[("max_iter", Number(100.0))],
        None,
    );
    let want = 2.0 * std::f64::consts::FRAC_1_SQRT_2;
    assert!(
        (got[0] - want).abs() < 1e-9 && (got[1] - want).abs() < 1e-9,
        "{got:?}"
    );
    // Identical directions: the mean norm along that direction.
    let got = merge_points(&[vec![1.0, 2.0], vec![3.0, 6.0]], "karcher", &[], None);
    assert!(
        (got[0] - 2.0).abs() < 1e-12 && (got[1] - 4.0).abs() < 1e-12,
        "{got:?}"
    );
}

/// mergekit's Karcher mean on whole vectors kept in memory (spec §11).
fn direct_karcher(x: &[Vec<f64>], max_iter: usize, tol: f64) -> Vec<f64> {
    let dotp = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(p, q)| p * q).sum::<f64>();
    let n = x.len();
    let norms: Vec<f64> = x.iter().map(|v| dotp(v, v).sqrt()).collect();
    let units: Vec<Vec<f64>> = x
        .iter()
        .zip(&norms)
        .filter(|(_, &n)| n > tol)
        .map(|(v, &n)| v.iter().map(|a| a / n).collect())
        .collect();
    let a = 1.0 / units.len() as f64;
    let p = x[0].len();
    let mut u: Vec<f64> = (0..p)
        .map(|i| units.iter().map(|v| a * v[i]).sum())
        .collect();
    let l = dotp(&u, &u).sqrt();
    u.iter_mut().for_each(|v| *v /= l);
    for _ in 0..max_iter {
        let mut t = vec![0.0; p];
        for v in &units {
            let c = dotp(&u, v).clamp(-1.0, 1.0);
            let phi = c.acos();
            if phi >= tol {
                let k = a * phi / phi.sin();
                for i in 0..p {
                    t[i] += k * (v[i] - c * u[i]);
                }
            }
        }
        let step = dotp(&t, &t).sqrt();
        if step < tol {
            break;
        }
        for i in 0..p {
            u[i] = step.cos() * u[i] + step.sin() * t[i] / step;
        }
        let l = dotp(&u, &u).sqrt();
        u.iter_mut().for_each(|v| *v /= l);
    }
    let scale = norms.iter().sum::<f64>() / n as f64;
    u.iter().map(|v| v * scale).collect()
}

#[test]
fn karcher_through_the_gram_matrix_equals_direct_karcher() {
    let p = 3000;
    let points: Vec<Vec<f64>> = (0..5)
        .map(|t| {
            (0..p)
                .map(|i| {
                    let mut h = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                        ^ (t as u64 + 7).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
                    h ^= h >> 31;
                    h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
                    h ^= h >> 29;
                    ((h % 20001) as f64 - 10000.0) * 1e-6 + if i % 3 == 0 { 0.01 } else { 0.0 }
                })
                .collect()
        })
        .collect();
    let got = merge_points(&points, "karcher", &[], None);
    let want = direct_karcher(&points, 10, 1e-5);
    let norm = want.iter().map(|x| x * x).sum::<f64>().sqrt();
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        .sqrt();
    assert!(err / norm < 1e-9, "relative error {}", err / norm);
}

#[test]
fn per_element_and_l1_rescale() {
    // per_element: every kept entry divided by 1 − p before the vote.
    let ones = vec![1.0f32; 20_000];
    for out in run(
        &[&ones],
        "dare",
        &[("p", Number(0.3)), ("rescale", Text("per_element".into()))],
    ) {
        assert!(out
            .iter()
            .all(|&x| x == 0.0 || (x - 1.0 / 0.7).abs() < 1e-6));
        assert!(out.contains(&0.0));
    }
    // l1: the trim keeps -2, 2, 2, 3 (|δ| sum 9) of a delta whose |δ| sums to 10.5, so the kept
    // entries are scaled by 10.5 / 9.
    let d = [1.0, -2.0, 2.0, 2.0, 3.0, 0.5];
    let s = 10.5f32 / 9.0;
    check(
        run(
            &[&d],
            "ties_soup",
            &[("k", Number(0.5)), ("rescale", Text("l1".into()))],
        ),
        &[0.0, -2.0 * s, 2.0 * s, 2.0 * s, 3.0 * s, 0.0],
        1e-6,
    );
    // With nothing dropped or trimmed the factor is 1.
    check(
        run(&[&d], "ties_soup", &[("rescale", Text("l1".into()))]),
        &d,
        0.0,
    );
}
