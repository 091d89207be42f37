//! The TIES / DARE / geometric-median family: hand-worked cases and sd-mecha reference values.

mod common;
use amalgam::io::dtype::OutputDtype;
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
    // Budgets: two that sort each DELLA tensor exactly, two that need the histogram pass.
    let exact = [
        (1, None, 1u64 << 30),
        (2, None, 64 << 20),
        (2, Some(16_384), 1 << 30),
    ];
    let histogram = [
        (1, None, 2u64 << 20),
        (2, None, 8 << 20),
        (2, Some(32_768), 4 << 20),
    ];
    let della = |rank: &str| {
        vec![
            ("drop", Text("della".into())),
            ("p", Number(0.3)),
            ("della_eps", Number(0.2)),
            ("rank", Text(rank.into())),
            ("k", Number(0.5)),
        ]
    };
    for (method, params, runs) in [
        ("tsd", vec![], &exact),
        ("tgmd", vec![("base_point", Bool(true))], &exact),
        (
            "ties",
            vec![
                ("k", Number(0.3)),
                ("drop", Text("dare".into())),
                ("p", Number(0.2)),
            ],
            &exact,
        ),
        ("dgmla", vec![], &exact),
        ("dgmla", vec![], &histogram),
        ("ties", della("tensor"), &exact),
        ("ties", della("tensor"), &histogram),
        ("della", vec![], &exact),
    ] {
        let mut outputs = Vec::new();
        for &(threads, chunk, budget) in runs.iter() {
            let sub = dir
                .path()
                .join(format!("{method}-{threads}-{chunk:?}-{budget}"));
            std::fs::create_dir_all(&sub).unwrap();
            let r = run_in(
                &sub,
                &refs.iter().map(|m| &m[..n - 1]).collect::<Vec<_>>(),
                method,
                &params,
                |o| {
                    o.threads = threads;
                    o.chunk_override = chunk;
                    o.memory_budget = budget;
                    o.seed = 114514;
                },
            );
            outputs.push(r);
        }
        for o in &outputs[1..] {
            assert!(
                o == &outputs[0],
                "{method} {params:?}: output depends on threads, chunking or budget"
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
        models: vec![amalgam::recipe::graph::ModelInput {
            name: "a".into(),
            path: p.clone(),
        }],
        nodes: vec![amalgam::recipe::graph::Node {
            name: "n".into(),
            method: amalgam::methods::canonical_name(method).unwrap(),
            params: params
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            slots: vec![
                vec![amalgam::recipe::graph::Ref::Model(0)],
                vec![amalgam::recipe::graph::Ref::Model(0)],
            ],
        }],
        output: amalgam::recipe::graph::Ref::Node(0),
        fallback: None,
        components: Default::default(),
        repair: None,
    };
    let err = |m: &str, p: Vec<(&str, ParamValue)>| graph(m, p).validate().unwrap_err().to_string();
    assert!(err("ties", vec![("election", Text("majority".into()))])
        .contains("expected one of: mass, count, none"));
    assert!(err("ties", vec![("k", Number(0.0))]).contains("(0, 1]"));
    assert!(err("dare", vec![("p", Number(1.0))]).contains("[0, 1)"));
    assert!(err("ties", vec![("rescale", Text("inverse_keep".into()))]).contains("needs a drop"));
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

/// The model `w` whose rows are `rows × cols` distinct magnitudes in a scrambled order (signs
/// alternate), and the rank of each entry within its row and within the tensor.
fn scrambled(rows: usize, cols: usize) -> (Vec<f32>, Vec<usize>, Vec<usize>) {
    let n = rows * cols;
    let pos = |i: usize| (i * 7919 + 13) % n; // a permutation (7919 is prime, n not a multiple)
    let mut v = vec![0.0f32; n];
    let mut tensor_rank = vec![0; n];
    for r in 0..n {
        let i = pos(r);
        v[i] = (1.0 + r as f32) * if i % 2 == 0 { 1e-4 } else { -1e-4 };
        tensor_rank[i] = r + 1;
    }
    let mut row_rank = vec![0; n];
    for row in 0..rows {
        let mut idx: Vec<usize> = (row * cols..(row + 1) * cols).collect();
        idx.sort_by(|&a, &b| v[a].abs().total_cmp(&v[b].abs()));
        for (r, &i) in idx.iter().enumerate() {
            row_rank[i] = r + 1;
        }
    }
    (v, tensor_rank, row_rank)
}

/// The keep rate per tenth of the ranks (`units` of `len` entries each).
fn keep_rate_by_decile(out: &[f32], rank: &[usize], len: usize) -> Vec<(f64, f64)> {
    let mut kept = [0f64; 10];
    let mut total = [0f64; 10];
    for (&x, &r) in out.iter().zip(rank) {
        let d = ((r - 1) * 10 / len).min(9);
        total[d] += 1.0;
        kept[d] += f64::from(u8::from(x != 0.0));
    }
    kept.iter().zip(&total).map(|(&k, &t)| (k / t, t)).collect()
}

#[test]
fn della_keep_probabilities_follow_the_rank_both_variants_and_signs() {
    let (rows, cols) = (2, 30_001);
    let (v, tensor_rank, row_rank) = scrambled(rows, cols);
    let n = rows * cols;
    for (rank, ranks, len) in [("tensor", &tensor_rank, n), ("row", &row_rank, cols)] {
        for eps in [0.8, -0.8] {
            let params = [
                ("drop", Text("della".into())),
                ("p", Number(0.5)),
                ("della_eps", Number(eps)),
                ("rank", Text(rank.into())),
            ];
            for out in run(&[&v], "dare", &params) {
                // The `dare` preset sums and rescales by 1 / (1 − p): kept entries are δ / 0.5.
                for (x, y) in out.iter().zip(&v) {
                    assert!(*x == 0.0 || (x - y / 0.5).abs() <= 1e-6 * y.abs().max(1e-4));
                }
                for (d, (rate, count)) in keep_rate_by_decile(&out, ranks, len).iter().enumerate() {
                    // The mean keep probability of the decile's ranks.
                    let centre = (d as f64 + 0.5) / 10.0 - 0.5;
                    let q = 0.5 + eps * centre;
                    let sd = (q * (1.0 - q) / count).sqrt();
                    assert!(
                        (rate - q).abs() < 5.0 * sd + 2e-3,
                        "{rank} eps {eps} decile {d}: kept {rate}, expected {q}"
                    );
                }
            }
        }
    }
}

#[test]
fn della_hand_worked_ranks_ties_and_per_element_rescale() {
    // p = 0.5, della_eps = 4 over P = 4 ranks: q = 0.5 + 4·(r/4 − 5/8) = −1, 0, 1, 2, clamped:
    // the two smallest |δ| are always dropped, the two largest always kept, whatever the draws.
    let della = |eps: f64, rank: &str| {
        vec![
            ("drop", Text("della".into())),
            ("p", Number(0.5)),
            ("della_eps", Number(eps)),
            ("rank", Text(rank.into())),
            ("k", Number(1.0)),
            ("election", Text("none".into())),
            ("fuse", Text("sum".into())),
        ]
    };
    // The model is laid out as [2, 2]; its |δ| are 0.2, 0.1, 0.2, 0.1.
    check(
        run(&[&[0.2, -0.1, 0.2, 0.1]], "ties", &della(4.0, "tensor")),
        &[0.2, 0.0, 0.2, 0.0],
        0.0,
    );
    // Exact ties are ranked by position: of four equal entries the last two are the largest.
    check(
        run(&[&[0.1, 0.1, 0.1, -0.1]], "ties", &della(4.0, "tensor")),
        &[0.0, 0.0, 0.1, -0.1],
        0.0,
    );
    // A negative window keeps the small ones instead.
    check(
        run(&[&[0.1, 0.1, 0.1, -0.1]], "ties", &della(-4.0, "tensor")),
        &[0.1, 0.1, 0.0, 0.0],
        0.0,
    );
    // Per row ([2, 4]): q = 0.5 + 4·((r − 1)/3 − 1/2) = −1.5, −0.17, 1.17, 2.5 per row.
    check(
        run(
            &[&[0.4, 0.3, 0.2, 0.1, -0.1, -0.1, 0.5, -0.2]],
            "ties",
            &della(4.0, "row"),
        ),
        &[0.4, 0.3, 0.0, 0.0, 0.0, 0.0, 0.5, -0.2],
        0.0,
    );
    // mergekit's `epsilon` is half the window: epsilon = 2 is della_eps = 4.
    let mut half = della(0.0, "row");
    half.retain(|(k, _)| *k != "della_eps");
    half.push(("epsilon", Number(2.0)));
    check(
        run(
            &[&[0.4, 0.3, 0.2, 0.1, -0.1, -0.1, 0.5, -0.2]],
            "ties",
            &half,
        ),
        &[0.4, 0.3, 0.0, 0.0, 0.0, 0.0, 0.5, -0.2],
        0.0,
    );
    // per_element: a kept entry is divided by its own q. p = 0.5, della_eps = 1 over P = 4:
    // q = 0.125, 0.375, 0.625, 0.875 for ranks 1..4.
    let d = [0.4f32, 0.1, 0.3, 0.2];
    let q = [0.875f32, 0.125, 0.625, 0.375];
    let mut params = della(1.0, "tensor");
    params.push(("rescale", Text("per_element".into())));
    let mut dropped = 0;
    for seed in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        for out in run_in(dir.path(), &[&d], "ties", &params, |o| o.seed = seed) {
            for i in 0..4 {
                if out[i] == 0.0 {
                    dropped += 1;
                } else {
                    assert!((out[i] - d[i] / q[i]).abs() < 1e-6, "{out:?}");
                }
            }
        }
    }
    assert!(dropped > 0);
}

#[test]
fn della_histogram_ranks_agree_with_exact_ranks() {
    // The same merge with exact ranks and (a tensor too big to sort cheaply, `ranks = "auto"`)
    // ranks from the histogram pass. With continuous magnitudes the keep decisions differ only where the keep probability
    // moved past the draw, on a fraction of entries within the bound.
    let (rows, cols) = (2, 40_001);
    let (v, _, _) = scrambled(rows, cols);
    let dir = tempfile::tempdir().unwrap();
    let mut outs = Vec::new();
    for ranks in ["exact", "auto"] {
        let params = [
            ("p", Number(0.1)),
            ("della_eps", Number(-0.1)),
            ("ranks", ParamValue::Text(ranks.into())),
        ];
        let out = dir.path().join(format!("{ranks}.safetensors"));
        let base = write_file(
            &dir.path().join("base.safetensors"),
            &[f32t("w", &[rows, cols], &vec![0.0; v.len()])],
            true,
        );
        let m = write_file(
            &dir.path().join("m.safetensors"),
            &[f32t("w", &[rows, cols], &v)],
            true,
        );
        let g = one_node(&[&base, &m], "dgmla", vec![vec![0], vec![1]], &params);
        let mut o = MergeOptions::new(&out);
        o.output_dtype = OutputDtype::F32;
        let report = merge(&g, &o, &NoProgress).unwrap();
        let histogram = report
            .key_notes
            .iter()
            .any(|(k, n)| k == "w" && n.contains("histogram"));
        assert_eq!(histogram, ranks == "auto", "{:?}", report.key_notes);
        assert!(report
            .notes
            .iter()
            .any(|n| n.contains("0.9500") && n.contains("0.8500")));
        outs.push(read_f32(&out, "w"));
    }
    let differ = outs[0]
        .iter()
        .zip(&outs[1])
        .filter(|(a, b)| (**a == 0.0) != (**b == 0.0))
        .count();
    assert!(
        differ as f64 <= 1e-3 * v.len() as f64,
        "{differ} decisions differ"
    );
}

#[test]
fn base_point_is_the_zero_delta_among_the_median_points() {
    // Base b and models m_t: with no election, the points are the deltas m_t − b and, with
    // base_point, the zero delta; the output is b + their geometric median.
    let p = 5000;
    let wave = |t: usize, i: usize| ((i * (7 + 3 * t)) % 101) as f64 / 100.0 - 0.5;
    let base: Vec<f64> = (0..p).map(|i| wave(9, i) * 0.1).collect();
    let models: Vec<Vec<f64>> = (0..3)
        .map(|t| {
            (0..p)
                .map(|i| base[i] + wave(t, i) * (1.0 + t as f64))
                .collect()
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let mut paths = vec![write_file(
        &dir.path().join("b.safetensors"),
        &[f64t("w", &[p], &base)],
        true,
    )];
    for (t, m) in models.iter().enumerate() {
        paths.push(write_file(
            &dir.path().join(format!("m{t}.safetensors")),
            &[f64t("w", &[p], m)],
            true,
        ));
    }
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let g = one_node(
        &refs,
        "ties",
        vec![vec![0], vec![1, 2, 3]],
        &[
            ("k", Number(1.0)),
            ("election", Text("none".into())),
            ("fuse", Text("geometric_median".into())),
            ("base_point", Bool(true)),
        ],
    );
    let out = dir.path().join("out.safetensors");
    let mut o = MergeOptions::new(&out);
    o.output_dtype = OutputDtype::F64;
    o.compute_dtype = ComputeDtype::F64;
    merge(&g, &o, &NoProgress).unwrap();
    let got = read_f64(&out, "w");
    let mut points: Vec<Vec<f64>> = models
        .iter()
        .map(|m| m.iter().zip(&base).map(|(x, b)| x - b).collect())
        .collect();
    points.push(vec![0.0; p]);
    let gm = direct_weiszfeld(&points, 1e-6, 100, 1e-20);
    for i in 0..p {
        let want = base[i] + gm[i];
        // (Through the Gram matrix: agreement to ~1e-9; appending the zero point after centring,
        // as before, was off by about 1 %.)
        assert!(
            (got[i] - want).abs() <= 1e-7 * want.abs().max(1e-3),
            "[{i}] {} vs {want}",
            got[i]
        );
    }
}

#[test]
fn dgmla_bytes_do_not_depend_on_budget_or_threads() {
    // Tensors on both sides of the exact/histogram line; every budget that can run the merge
    // gives the same bytes, and one too small to rank exactly is an error naming the budget
    // needed, never a silent switch to another ranking.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let shapes: [(&str, usize, usize); 3] =
        [("small", 16, 300), ("mid", 4, 16_000), ("big", 3, 40_001)];
    let mut paths = Vec::new();
    for m in 0..4 {
        let tensors: Vec<T> = shapes
            .iter()
            .map(|&(name, r, c)| {
                let (v, _, _) = scrambled(r, c);
                let v: Vec<f32> = v
                    .iter()
                    .map(|x| if m == 0 { 0.0 } else { x * (m as f32) })
                    .collect();
                f32t(name, &[r, c], &v)
            })
            .collect();
        paths.push(write_file(
            &d.join(format!("m{m}.safetensors")),
            &tensors,
            true,
        ));
    }
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let g = one_node(&refs, "dgmla", vec![vec![0], vec![1, 2, 3]], &[]);
    let mut outputs = Vec::new();
    for (budget, threads) in [(16u64 << 20, 1), (64 << 20, 2), (1 << 30, 1), (1 << 30, 2)] {
        let out = d.join(format!("{budget}-{threads}.safetensors"));
        let mut o = MergeOptions::new(&out);
        o.memory_budget = budget;
        o.threads = threads;
        merge(&g, &o, &NoProgress).unwrap();
        outputs.push(std::fs::read(&out).unwrap());
    }
    assert!(
        outputs.windows(2).all(|w| w[0] == w[1]),
        "bytes differ across budgets"
    );
    let mut o = MergeOptions::new(d.join("tiny.safetensors"));
    o.memory_budget = 1 << 20;
    let e = merge(&g, &o, &NoProgress)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("needs a memory budget of"), "{e}");
}
