//! supermerger's merge and calculation modes (`methods::supermerger`, issue #18) against a
//! transcription of supermerger's code (commit 0b1c491, `scripts/mergers/mergers.py`):
//! `tests/fixtures/supermerger_modes.json` holds inputs and the outputs computed in float64 by
//! `tools/supermerger_fixtures.py`. Each case is run under the name a supermerger user knows (the
//! alias) through a real merge of safetensors files in f64. Also hand-computed cases and the
//! distribution of `add_noise` (per-block values and the engine's part: `supermerger_engine.rs`).

mod common;
use amalgam::io::dtype::OutputDtype;
use amalgam::method::ParamValue::{self, Number};
use amalgam::method::SlotKind;
use amalgam::real::ComputeDtype;
use amalgam::{merge, Graph, MergeOptions, NoProgress};
use common::*;
use std::path::{Path, PathBuf};

/// A key of a test model: name, shape, values per input.
type Key = (String, Vec<usize>, Vec<Vec<f64>>);

/// Merges f64 models of the keys `keys` (name, shape, one value list per input) with `method`
/// (name or alias) in f64: one input per one-model slot, in order. Returns each key's output.
fn merge_keys(
    dir: &Path,
    keys: &[Key],
    method: &str,
    params: &[(&str, ParamValue)],
    seed: u64,
) -> Vec<Vec<f64>> {
    let n = keys[0].2.len();
    let paths: Vec<PathBuf> = (0..n)
        .map(|i| {
            let tensors: Vec<_> = keys
                .iter()
                .map(|(k, shape, vals)| f64t(k, shape, &vals[i]))
                .collect();
            write_file(&dir.join(format!("m{i}.safetensors")), &tensors, true)
        })
        .collect();
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let info = amalgam::methods::info(method).unwrap();
    let slots: Vec<Vec<usize>> = info
        .slots
        .iter()
        .enumerate()
        .map(|(i, s)| {
            assert_eq!(s.kind, SlotKind::One);
            vec![i]
        })
        .collect();
    let g: Graph = one_node(&refs, method, slots, params);
    let out = dir.join("out.safetensors");
    let _ = std::fs::remove_file(&out);
    let mut o = MergeOptions::new(&out);
    o.output_dtype = OutputDtype::F64;
    o.compute_dtype = ComputeDtype::F64;
    o.seed = seed;
    merge(&g, &o, &NoProgress).unwrap();
    keys.iter().map(|(k, _, _)| read_f64(&out, k)).collect()
}

/// One key "w"-like merge: `key` of `shape`.
fn merge_one(
    dir: &Path,
    key: &str,
    shape: &[usize],
    inputs: &[Vec<f64>],
    method: &str,
    params: &[(&str, ParamValue)],
) -> Vec<f64> {
    let keys = [(key.to_string(), shape.to_vec(), inputs.to_vec())];
    merge_keys(dir, &keys, method, params, 0).remove(0)
}

/// `got` agrees with `want` to 1e-12 of the tensor's largest value; returns the worst error
/// relative to it.
fn assert_agrees(got: &[f64], want: &[f64], what: &str) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-300);
    let mut worst = 0.0f64;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / scale;
        worst = worst.max(err);
        assert!(
            err <= 1e-12,
            "{what}: element {i}: amalgam {g}, supermerger {w}\n got {got:?}\nwant {want:?}"
        );
    }
    worst
}

fn numbers(v: &serde_json::Value) -> Vec<(String, f64)> {
    v.as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
        .collect()
}

#[test]
fn every_mode_agrees_with_supermerger() {
    let fx = json_fixture("supermerger_modes.json");
    assert_eq!(
        fx["supermerger_commit"],
        "0b1c4915a6ede98ce3528b4f097361842a641d1d"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let mut worst = 0.0f64;
    for (n, case) in fx["cases"].as_array().unwrap().iter().enumerate() {
        let method = case["method"].as_str().unwrap();
        let key = case["key"].as_str().unwrap();
        let inputs: Vec<(Vec<usize>, Vec<f64>)> = case["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(json_tensor)
            .collect();
        let params = numbers(&case["params"]);
        let params: Vec<(&str, ParamValue)> = params
            .iter()
            .map(|(k, v)| (k.as_str(), Number(*v)))
            .collect();
        let (shape, want) = json_tensor(&case["output"]);
        let values: Vec<Vec<f64>> = inputs.into_iter().map(|(_, v)| v).collect();
        let got = merge_one(dir.path(), key, &shape, &values, method, &params);
        let what = format!("case {n}: {method} {:?} {shape:?}", case["params"]);
        worst = worst.max(assert_agrees(&got, &want, &what));
        seen.insert(method.to_string());
    }
    for m in [
        "Weight sum",
        "Add difference",
        "Triple sum",
        "sum Twice",
        "trainDifference",
        "smoothAdd",
        "smoothAdd MT",
        "extract",
        "tensor",
        "tensor2",
        "self",
    ] {
        assert!(seen.contains(m), "no fixture for {m}");
    }
    eprintln!("worst error relative to each tensor's largest value: {worst:e}");
}

/// The cosine modes over models of several keys: with the model-wide range computed by the
/// engine, and with supermerger's range given as `sim_min`/`sim_max`.
#[test]
fn cosine_modes_agree_with_supermerger_over_whole_models() {
    let fx = json_fixture("supermerger_modes.json");
    let dir = tempfile::tempdir().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for model in fx["models"].as_array().unwrap() {
        let method = model["method"].as_str().unwrap();
        let alpha = model["params"]["alpha"].as_f64().unwrap();
        let (lo, hi) = (
            model["sim_min"].as_f64().unwrap(),
            model["sim_max"].as_f64().unwrap(),
        );
        let mut keys = Vec::new();
        let mut wants = Vec::new();
        for k in model["keys"].as_array().unwrap() {
            let ins: Vec<(Vec<usize>, Vec<f64>)> = k["inputs"]
                .as_array()
                .unwrap()
                .iter()
                .map(json_tensor)
                .collect();
            let shape = ins[0].0.clone();
            keys.push((
                k["key"].as_str().unwrap().to_string(),
                shape,
                ins.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
            ));
            wants.push(json_tensor(&k["output"]).1);
        }
        for given in [true, false] {
            let mut params = vec![("alpha", Number(alpha))];
            if given {
                params.push(("sim_min", Number(lo)));
                params.push(("sim_max", Number(hi)));
            }
            let got = merge_keys(dir.path(), &keys, method, &params, 0);
            for ((k, _, _), (g, w)) in keys.iter().zip(got.iter().zip(&wants)) {
                assert_agrees(
                    g,
                    w,
                    &format!("{method} alpha {alpha} (range given: {given}) {k}"),
                );
            }
        }
        seen.insert(method.to_string());
    }
    assert!(seen.contains("cosineA") && seen.contains("cosineB"));
}

#[test]
fn hand_computed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let k = "model.diffusion_model.input_blocks.4.0.in_layers.2.weight";
    let run = |method: &str, key: &str, inputs: &[Vec<f64>], params: &[(&str, ParamValue)]| {
        merge_one(d, key, &[inputs[0].len()], inputs, method, params)
    };
    let abc = [vec![10.0, 1.0], vec![20.0, 3.0], vec![40.0, 2.0]];
    // (1 − α − β)·a + α·b + β·c: 0.5·10 + 0.2·20 + 0.3·40 = 21.
    let t = run(
        "triple_sum",
        k,
        &abc,
        &[("alpha", Number(0.2)), ("beta", Number(0.3))],
    );
    assert_agrees(&t, &[21.0, 0.5 + 0.6 + 0.6], "triple_sum");
    // α + β = 0: a + α·(b − c).
    let t = run(
        "Triple sum",
        k,
        &abc,
        &[("alpha", Number(0.5)), ("beta", Number(-0.5))],
    );
    assert_agrees(&t, &[0.0, 1.5], "triple_sum, alpha + beta = 0");
    // lerp(lerp(10, 20, ½), 40, ½) = 27.5.
    let t = run(
        "sum_twice",
        k,
        &abc,
        &[("alpha", Number(0.5)), ("beta", Number(0.5))],
    );
    assert_agrees(&t, &[27.5, 2.0], "sum_twice");
    // trainDifference: a = 1, b = 3, c = 2: 1 + 1.8·½·(3 − 2)·2/(1 + 2) = 1.6; b = c gives a.
    let t = run(
        "train_difference",
        k,
        &[
            vec![1.0, 1.0, 5.0],
            vec![3.0, 0.0, 2.0],
            vec![2.0, 2.0, 2.0],
        ],
        &[("alpha", Number(0.5))],
    );
    assert_agrees(
        &t,
        &[1.6, 1.0 - 0.9 * 2.0 * 1.0 / 3.0, 5.0],
        "train_difference",
    );
    // smoothAdd: the median removes a lone spike; a constant difference passes both filters.
    let a = vec![1.0; 5];
    let t = run(
        "smooth_add",
        k,
        &[a.clone(), vec![0.0, 0.0, 10.0, 0.0, 0.0], vec![0.0; 5]],
        &[("alpha", Number(1.0))],
    );
    assert_agrees(&t, &a, "smooth_add, spike");
    let t = run(
        "smoothAdd",
        k,
        &[a.clone(), vec![3.0; 5], vec![1.0; 5]],
        &[("alpha", Number(0.5))],
    );
    assert_agrees(&t, &[2.0; 5], "smooth_add, constant");
    // tensor: rows [int(4·0.25), int(4·0.75)) = [1, 3) of b; α + β > 1: b, rows [1, 2) of a.
    let ab = [vec![1.0, 2.0, 3.0, 4.0], vec![5.0, 6.0, 7.0, 8.0]];
    let t = run(
        "tensor",
        k,
        &ab,
        &[("alpha", Number(0.5)), ("beta", Number(0.25))],
    );
    assert_eq!(t, [1.0, 6.0, 7.0, 4.0]);
    let t = run(
        "tensor_swap",
        k,
        &ab,
        &[("alpha", Number(0.8)), ("beta", Number(0.6))],
    );
    assert_eq!(t, [5.0, 2.0, 7.0, 8.0]);
    // self: α·a, except SELFKEYS and α = 0.
    let x = [vec![1.0, -2.0]];
    assert_eq!(run("self", k, &x, &[("alpha", Number(2.0))]), [2.0, -4.0]);
    assert_eq!(run("scale", k, &x, &[("alpha", Number(0.0))]), [1.0, -2.0]);
    let p = "model.diffusion_model.input_blocks.1.1.proj_out.weight";
    assert_eq!(run("scale", p, &x, &[("alpha", Number(2.0))]), [1.0, -2.0]);
    let n = "cond_stage_model.transformer.text_model.final_layer_norm.weight";
    assert_eq!(run("scale", n, &x, &[("alpha", Number(2.0))]), [1.0, -2.0]);
    let no_skip = [
        ("alpha", Number(2.0)),
        ("skip_selfkeys", ParamValue::Bool(false)),
    ];
    assert_eq!(run("scale", p, &x, &no_skip), [2.0, -4.0]);
    // extract: b − a and c − a along one direction (cos 1, d = 1): alike, so β = 0 keeps
    // lerp(b − a, c − a, α) and β = 1 nothing; opposite directions (cos −1, d = 0) the reverse.
    let same = [vec![1.0, 1.0], vec![2.0, 3.0], vec![3.0, 5.0]];
    let e = |ins: &[Vec<f64>], beta: f64| {
        let ps = [
            ("alpha", Number(0.5)),
            ("beta", Number(beta)),
            ("gamma", Number(2.0)),
        ];
        run("extract", k, ins, &ps)
    };
    assert_agrees(&e(&same, 0.0), &[2.5, 4.0], "extract, alike, beta 0");
    assert_agrees(&e(&same, 1.0), &[1.0, 1.0], "extract, alike, beta 1");
    let opposite = [vec![1.0, 1.0], vec![2.0, 3.0], vec![-1.0, -3.0]];
    assert_agrees(&e(&opposite, 0.0), &[1.0, 1.0], "extract, unlike, beta 0");
    assert_agrees(&e(&opposite, 1.0), &[0.5, 0.0], "extract, unlike, beta 1");
}

/// With the range [0, 1] (no normalisation), cosineB is sd-mecha's add_cosine_b: a check of both
/// against each other on the fixture's models.
#[test]
fn cosine_b_without_normalisation_is_sd_mecha_add_cosine_b() {
    let dir = tempfile::tempdir().unwrap();
    let shape = [4usize, 6];
    let a = lcg_values(1, 24);
    let b: Vec<f64> = a
        .iter()
        .zip(lcg_values(2, 24))
        .map(|(x, y)| x + 0.3 * y)
        .collect();
    let k = "model.diffusion_model.input_blocks.1.1.proj_in.weight";
    for alpha in [0.0, 0.3, 0.8] {
        let sm = merge_one(
            dir.path(),
            k,
            &shape,
            &[a.clone(), b.clone()],
            "cosineB",
            &[
                ("alpha", Number(alpha)),
                ("sim_min", Number(0.0)),
                ("sim_max", Number(1.0)),
            ],
        );
        let mecha = merge_one(
            dir.path(),
            k,
            &shape,
            &[a.clone(), b.clone()],
            "add_cosine_b",
            &[("alpha", Number(alpha))],
        );
        assert_agrees(&sm, &mecha, &format!("alpha {alpha}"));
        assert!(sm.iter().zip(&a).any(|(x, y)| x != y), "alpha {alpha}: a");
    }
}

/// plus random: `a + α·z` with `z` standard normal (supermerger's `randn_like`), seeded by the
/// run's seed; SELFKEYS unchanged.
#[test]
fn add_noise_is_gaussian_of_sd_alpha_and_seeded() {
    let dir = tempfile::tempdir().unwrap();
    let n = 200_000;
    let a = lcg_values(3, n);
    let keys: Vec<Key> = vec![
        (
            "model.diffusion_model.input_blocks.1.0.in_layers.2.weight".into(),
            vec![400, 500],
            vec![a.clone()],
        ),
        (
            "model.diffusion_model.input_blocks.1.1.proj_out.weight".into(),
            vec![4],
            vec![vec![1.0, 2.0, 3.0, 4.0]],
        ),
    ];
    let alpha = 0.25;
    let params = [("alpha", Number(alpha))];
    let run = |seed| merge_keys(dir.path(), &keys, "plus random", &params, seed);
    let first = run(7);
    assert_eq!(first[1], [1.0, 2.0, 3.0, 4.0], "proj_out is a SELFKEY");
    let z: Vec<f64> = first[0]
        .iter()
        .zip(&a)
        .map(|(o, x)| (o - x) / alpha)
        .collect();
    let nf = n as f64;
    let mean = z.iter().sum::<f64>() / nf;
    let var = z.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / nf;
    let kurt = z.iter().map(|x| (x - mean).powi(4)).sum::<f64>() / nf / var / var;
    assert!(mean.abs() < 5.0 / nf.sqrt(), "mean {mean}");
    assert!(
        (var - 1.0).abs() < 5.0 * (2.0 / nf).sqrt(),
        "variance {var}"
    );
    assert!(
        (kurt - 3.0).abs() < 5.0 * (24.0 / nf).sqrt(),
        "kurtosis {kurt}"
    );
    // The normal's quantiles: P(z < −1.96) = 0.025, P(z < 0) = ½, P(z < 1) = 0.8413.
    for (q, p) in [(-1.959_964, 0.025), (0.0, 0.5), (1.0, 0.841_345)] {
        let f = z.iter().filter(|&&x| x < q).count() as f64 / nf;
        assert!(
            (f - p).abs() < 5.0 * (p * (1.0 - p) / nf).sqrt(),
            "P(z < {q}) = {f}"
        );
    }
    assert_eq!(run(7)[0], first[0], "the same seed, the same noise");
    assert_ne!(run(8)[0], first[0], "another seed, other noise");
}

/// trainDifference is sd-mecha's `add_difference` with `train_difference_mask` as its alpha:
/// `a + mask·(b − c)`, the mask merged by amalgam's sd-mecha method from the same inputs.
#[test]
fn train_difference_is_add_difference_by_the_sd_mecha_mask() {
    let dir = tempfile::tempdir().unwrap();
    let k = "model.diffusion_model.input_blocks.4.0.in_layers.2.weight";
    let mut ins: Vec<Vec<f64>> = (0..3).map(|i| lcg_values(20 + i, 30)).collect();
    ins[1][3] = ins[2][3]; // b = c
    ins[0][4] = ins[1][4]; // a = b
    for alpha in [0.5, 1.3] {
        let td = merge_one(
            dir.path(),
            k,
            &[5, 6],
            &ins,
            "trainDifference",
            &[("alpha", Number(alpha))],
        );
        let mask = merge_one(
            dir.path(),
            k,
            &[5, 6],
            &ins,
            "train_difference_mask",
            &[("alpha", Number(alpha))],
        );
        let want: Vec<f64> = (0..30)
            .map(|i| ins[0][i] + mask[i] * (ins[1][i] - ins[2][i]))
            .collect();
        assert_agrees(&td, &want, &format!("alpha {alpha}"));
        assert_eq!(td[3], ins[0][3]);
    }
}
