//! Differential tests of the SVD family against the references in `tests/fixtures/svd.json`
//! (made offline by `tools/svd_fixtures.py`; CI does not need Python): numpy written from the spec
//! for `iso_c`, `iso_z` and `iso_cts` (`iso_cts` also checked there against the official
//! iso-merging code), sd-mecha 1.1.8 itself for `truncate_rank` and `rotate`, numpy rewritten
//! from sd-optim's published code for `clyb_merge`. Every case is merged in f64 from
//! real safetensors files, with both factorizations where the method has the choice.

mod common;
use amalgam::io::dtype::OutputDtype;
use amalgam::method::ParamValue::{self, Number, Text};
use amalgam::real::ComputeDtype;
use amalgam::{merge, MergeOptions, NoProgress};
use common::*;

fn fixtures() -> Value {
    json_fixture("svd.json")
}

fn tensor(v: &Value) -> (Vec<usize>, Vec<f64>) {
    json_tensor(v)
}
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The case's inputs in slot order, with the slots they fill.
fn inputs(case: &Value) -> (Vec<&Value>, Vec<Vec<usize>>) {
    let i = &case["inputs"];
    if let Some(models) = i["models"].as_array() {
        let mut all = vec![&i["base"]];
        all.extend(models.iter());
        let n = all.len();
        return (all, vec![vec![0], (1..n).collect()]);
    }
    if !i["c"].is_null() {
        return (
            vec![&i["a"], &i["b"], &i["c"]],
            vec![vec![0], vec![1], vec![2]],
        );
    }
    if !i["b"].is_null() {
        return (vec![&i["a"], &i["b"]], vec![vec![0], vec![1]]);
    }
    let one = if i["delta"].is_null() {
        &i["a"]
    } else {
        &i["delta"]
    };
    (vec![one], vec![vec![0]])
}

/// Runs the case (its inputs written as key `w`) with extra parameters; the output's `w`.
fn run(dir: &Path, case: &Value, extra: &[(&str, ParamValue)]) -> Vec<f64> {
    try_run(dir, case, extra).unwrap()
}

fn try_run(dir: &Path, case: &Value, extra: &[(&str, ParamValue)]) -> amalgam::Result<Vec<f64>> {
    let (tensors, slots) = inputs(case);
    let paths: Vec<PathBuf> = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let (shape, values) = tensor(t);
            write_file(
                &dir.join(format!("in{i}.safetensors")),
                &[f64t("w", &shape, &values)],
                true,
            )
        })
        .collect();
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let mut params: Vec<(&str, ParamValue)> = case["params"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            let value = match v {
                Value::String(s) => Text(s.clone()),
                Value::Bool(b) => ParamValue::Bool(*b),
                x => Number(x.as_f64().unwrap()),
            };
            (k.as_str(), value)
        })
        .collect();
    params.extend(extra.iter().cloned());
    let g = one_node(&refs, case["method"].as_str().unwrap(), slots, &params);
    let out = dir.join("out.safetensors");
    let _ = std::fs::remove_file(&out);
    let mut o = MergeOptions::new(&out);
    o.output_dtype = OutputDtype::F64;
    o.compute_dtype = ComputeDtype::F64;
    merge(&g, &o, &NoProgress)?;
    Ok(read_f64(&out, "w"))
}

/// Runs every case of `method` but those named in `skip` (with each of `variants` added to its
/// parameters) and compares
/// with the reference: `|x − e| ≤ 1e-9·max(1, gain)·max(1, max|e|)`, the gain being how much the
/// output moves for a nudge of the inputs (measured by the fixture script).
fn check(method: &str, variants: &[&[(&str, ParamValue)]], skip: &[&str]) {
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let mut ran = 0;
    for case in f["cases"].as_array().unwrap() {
        if case["method"] != method || skip.contains(&case["name"].as_str().unwrap()) {
            continue;
        }
        let name = case["name"].as_str().unwrap();
        let (_, want) = tensor(&case["expected"]);
        let gain = case["diagnostics"]["perturbation_gain"]
            .as_f64()
            .unwrap_or(1.0);
        let scale = want.iter().fold(1f64, |m, x| m.max(x.abs()));
        let tol = 1e-9 * gain.max(1.0) * scale;
        for extra in variants {
            let got = run(dir.path(), case, extra);
            assert_eq!(got.len(), want.len(), "{name}");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= tol,
                    "{name} {extra:?}: element {i}: {g} vs {w} (tolerance {tol:e})"
                );
            }
        }
        ran += 1;
    }
    assert!(ran >= 4, "{method}: only {ran} cases in the fixtures");
}

fn factorizations() -> [Vec<(&'static str, ParamValue)>; 2] {
    [
        vec![("factorization", Text("auto".into()))],
        vec![("factorization", Text("svd".into()))],
    ]
}

#[test]
fn iso_c_equals_the_numpy_reference() {
    let [auto, svd] = factorizations();
    check("iso_c", &[&auto, &svd], &[]);
}

#[test]
fn iso_z_equals_the_numpy_reference() {
    let [auto, svd] = factorizations();
    check("iso_z", &[&auto, &svd], &[]);
}

#[test]
fn iso_cts_equals_the_reference() {
    check("iso_cts", &[&[]], &[]);
}

#[test]
fn truncate_rank_equals_sd_mecha() {
    check("truncate_rank", &[&[]], &[]);
}

#[test]
fn rotate_equals_sd_mecha() {
    // Wide matrices' fractional powers included: sd-mecha's Stiefel geodesic.
    check("rotate", &[&[]], &[]);
    let f = fixtures();
    let stiefel = f["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["requires_stiefel"] == true)
        .count();
    assert!(stiefel >= 5, "{stiefel} Stiefel cases");
}

/// The geodesic is continuous at its ends: alignments just inside 0 and 1 give `a` and sd-mecha's
/// closed form at 1 (`x − xWWᵀ + xUWᵀ`), on a wide case.
#[test]
fn rotate_wide_geodesic_meets_its_ends() {
    let f = fixtures();
    let case = f["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "rotate/wide_6x20_align0.7_alpha0_c0_stiefel")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let at = |t: f64| run(dir.path(), case, &[("alignment", Number(t))]);
    let (_, a) = tensor(&case["inputs"]["a"]);
    let scale = a.iter().fold(1f64, |m, x| m.max(x.abs()));
    for (got, want, what) in [
        (at(1e-7), a.clone(), "t → 0"),
        (at(1.0 - 1e-7), at(1.0), "t → 1"),
        (at(-1.0 + 1e-7), at(-1.0), "t → −1"),
    ] {
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * scale, "{what}: {g} vs {w}");
        }
    }
}

#[test]
fn clyb_merge_equals_the_sd_optim_rewrite() {
    check("clyb_merge", &[&[]], &[]);
}

/// sd-optim's default, the randomized low-rank part (64 power iterations for q = 1), agrees with
/// the exact one where the spectrum has a gap after σ_q (the q = 1 cases; in the q = 2 case σ_2
/// and σ_3 are too close for q columns without oversampling, as in torch's svd_lowrank).
#[test]
fn clyb_merge_randomized_is_close_to_exact() {
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let mut ran = 0;
    for case in f["cases"].as_array().unwrap() {
        if case["method"] != "clyb_merge" || case["name"] == "clyb_merge/tall_48x40_q2" {
            continue;
        }
        let mut case = case.clone();
        case["params"]["svd"] = Value::String("randomized".into());
        let got = run(dir.path(), &case, &[]);
        let (_, want) = tensor(&case["expected"]);
        let scale = want.iter().fold(1f64, |m, x| m.max(x.abs()));
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-6 * scale,
                "{}: {g} vs {w}",
                case["name"]
            );
        }
        ran += 1;
    }
    assert!(ran >= 4);
}
