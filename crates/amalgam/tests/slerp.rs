//! SLERP, both variants, on hand-computed cases.

mod common;
use amalgam::dtype::OutputDtype;
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
