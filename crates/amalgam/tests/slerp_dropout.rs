//! SLERP (both variants) and dropout, on hand-computed cases.

mod common;
use amalgam::io::dtype::OutputDtype;
use amalgam::method::ParamValue::{self, Number, Text};
use amalgam::real::ComputeDtype;
use amalgam::{merge, MergeOptions, NoProgress};
use common::*;
use std::path::Path;

fn slerp(a: &[f64], b: &[f64], params: &[(&str, ParamValue)]) -> Vec<f64> {
    let dir = tempfile::tempdir().unwrap();
    let pa = write_file(
        &dir.path().join("a.safetensors"),
        &[f64t("w", &[a.len()], a)],
        true,
    );
    let pb = write_file(
        &dir.path().join("b.safetensors"),
        &[f64t("w", &[b.len()], b)],
        true,
    );
    let refs: Vec<&Path> = vec![&pa, &pb];
    let g = one_node(&refs, "slerp", vec![vec![0], vec![1]], params);
    let out = dir.path().join("out.safetensors");
    let mut o = MergeOptions::new(&out);
    o.output_dtype = OutputDtype::F64;
    o.compute_dtype = ComputeDtype::F64;
    merge(&g, &o, &NoProgress).unwrap();
    read_f64(&out, "w")
}

fn close(got: &[f64], want: &[f64]) {
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}");
    }
}

#[test]
fn slerp_of_orthogonal_and_parallel_tensors() {
    let h = std::f64::consts::FRAC_1_SQRT_2;
    // a = (1, 0), b = (0, 2), α = 0.5: ω = π/2.
    // sd-mecha: (sin(π/4)·â + sin(π/4)·b̂)/sin(π/2), rescaled to 0.5·1 + 0.5·2 = 1.5.
    close(&slerp(&[1.0, 0.0], &[0.0, 2.0], &[]), &[1.5 * h, 1.5 * h]);
    // mergekit: sin(π/4)·a + sin(π/4)·b on the tensors as they are.
    let mk = [("variant", Text("mergekit".into()))];
    close(&slerp(&[1.0, 0.0], &[0.0, 2.0], &mk), &[h, 2.0 * h]);
    // Parallel tensors: both are the plain lerp.
    close(
        &slerp(&[1.0, 1.0], &[2.0, 2.0], &[("alpha", Number(0.25))]),
        &[1.25, 1.25],
    );
    close(
        &slerp(
            &[1.0, 1.0],
            &[2.0, 2.0],
            &[("alpha", Number(0.25)), mk[0].clone()],
        ),
        &[1.25, 1.25],
    );
    // The ends are the inputs, exactly.
    let (a, b) = ([0.3, -0.2, 0.9], [0.1, 0.5, -0.4]);
    assert_eq!(slerp(&a, &b, &[("alpha", Number(0.0))]), a);
    assert_eq!(slerp(&a, &b, &[("alpha", Number(1.0))]), b);
    // A zero tensor: lerp (sd-mecha's NaN fallback).
    close(&slerp(&[0.0, 0.0], &[2.0, 4.0], &[]), &[1.0, 2.0]);
}

fn dropout(models: &[&[f64]], params: &[(&str, ParamValue)]) -> Vec<f64> {
    let dir = tempfile::tempdir().unwrap();
    let n = models[0].len();
    let mut paths = vec![write_file(
        &dir.path().join("b.safetensors"),
        &[f64t("w", &[n], &vec![0.0; n])],
        true,
    )];
    for (t, m) in models.iter().enumerate() {
        paths.push(write_file(
            &dir.path().join(format!("m{t}.safetensors")),
            &[f64t("w", &[n], m)],
            true,
        ));
    }
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let g = one_node(
        &refs,
        "dropout",
        vec![vec![0], (1..paths.len()).collect()],
        params,
    );
    let out = dir.path().join("out.safetensors");
    let mut o = MergeOptions::new(&out);
    o.output_dtype = OutputDtype::F64;
    o.compute_dtype = ComputeDtype::F64;
    merge(&g, &o, &NoProgress).unwrap();
    read_f64(&out, "w")
}

#[test]
fn dropout_averages_the_kept_deltas_and_rescales() {
    // p = 0 keeps everything: the mean of the deltas.
    let (a, b) = ([1.0, 2.0, -3.0], [3.0, 0.0, 1.0]);
    assert_eq!(dropout(&[&a, &b], &[("p", Number(0.0))]), [2.0, 1.0, -1.0]);
    // Three models with delta 1 everywhere, p = 0.5: an element is 1 / 0.5 where any model kept
    // it, 0 where none did (probability 0.5³).
    let n = 40_000;
    let ones = vec![1.0; n];
    let out = dropout(&[&ones, &ones, &ones], &[("p", Number(0.5))]);
    assert!(out.iter().all(|&x| x == 0.0 || x == 2.0), "values");
    let zeros = out.iter().filter(|&&x| x == 0.0).count() as f64;
    let q = 0.125;
    let sd = (n as f64 * q * (1.0 - q)).sqrt();
    assert!(
        (zeros - n as f64 * q).abs() < 5.0 * sd,
        "{zeros} elements dropped by all three"
    );
    // rescale = 0: no rescale; lambda scales the delta.
    let out = dropout(
        &[&ones],
        &[
            ("p", Number(0.5)),
            ("rescale", Number(0.0)),
            ("lambda", Number(0.5)),
        ],
    );
    assert!(out.iter().all(|&x| x == 0.0 || x == 0.5));
}
