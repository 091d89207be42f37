//! Hand-computed small cases for every method, and properties of the linear family.

mod common;
use amalgam::io::dtype::OutputDtype;
use amalgam::method::ParamValue::{self, Bool, List, Number};
use amalgam::real::ComputeDtype;
use amalgam::{merge, MergeOptions, NoProgress};
use common::*;
use std::path::Path;

fn opts(out: &Path, compute: ComputeDtype) -> MergeOptions {
    let mut o = MergeOptions::new(out);
    o.output_dtype = OutputDtype::F32;
    o.compute_dtype = compute;
    o
}

/// Writes one model per vector (key "w", f32) and merges them with `method`.
fn run(
    inputs: &[&[f32]],
    method: &str,
    slots: Vec<Vec<usize>>,
    params: &[(&str, ParamValue)],
) -> Vec<Vec<f32>> {
    let mut results = Vec::new();
    for compute in [ComputeDtype::F32, ComputeDtype::F64] {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<_> = inputs
            .iter()
            .enumerate()
            .map(|(i, v)| {
                write_file(
                    &dir.path().join(format!("in{i}.safetensors")),
                    &[f32t("w", &[v.len()], v)],
                    true,
                )
            })
            .collect();
        let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
        let g = one_node(&refs, method, slots.clone(), params);
        let out = dir.path().join("out.safetensors");
        merge(&g, &opts(&out, compute), &NoProgress).unwrap();
        results.push(read_f32(&out, "w"));
    }
    results
}

fn check(results: Vec<Vec<f32>>, want: &[f32]) {
    for r in results {
        assert_close(&r, want, 1e-6);
    }
}

#[test]
fn weighted_sum_hand_computed() {
    let a = [1.0, 2.0, 4.0, -8.0];
    let b = [5.0, 6.0, 0.0, 8.0];
    // 0.75 a + 0.25 b
    check(
        run(
            &[&a, &b],
            "weighted_sum",
            vec![vec![0], vec![1]],
            &[("alpha", Number(0.25))],
        ),
        &[2.0, 3.0, 3.0, -4.0],
    );
    // Extrapolation: alpha = 2 gives 2b - a.
    check(
        run(
            &[&a, &b],
            "weighted_sum",
            vec![vec![0], vec![1]],
            &[("alpha", Number(2.0))],
        ),
        &[9.0, 10.0, -4.0, 24.0],
    );
}

#[test]
fn weighted_sum_alpha_0_and_1_are_exact() {
    // Values with full mantissas: any rounding in (1-α)a + αb would show.
    let a: Vec<f32> = (0..64)
        .map(|i| (i as f32 * 0.7312).sin() * 0.0213)
        .collect();
    let b: Vec<f32> = (0..64).map(|i| (i as f32 * 1.977).cos() * 3.1e-3).collect();
    for (alpha, want) in [(0.0, &a), (1.0, &b)] {
        for r in run(
            &[&a, &b],
            "weighted_sum",
            vec![vec![0], vec![1]],
            &[("alpha", Number(alpha))],
        ) {
            assert_eq!(
                r.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "alpha {alpha}"
            );
        }
    }
}

#[test]
fn soup_hand_computed() {
    check(
        run(
            &[&[1.0, 2.0, 3.0], &[3.0, 4.0, 5.0], &[5.0, 0.0, -2.0]],
            "soup",
            vec![vec![0, 1, 2]],
            &[],
        ),
        &[3.0, 2.0, 2.0],
    );
}

#[test]
fn soup_of_identical_models_is_that_model() {
    let a: Vec<f32> = (0..1000)
        .map(|i| ((i * 7919) % 1000) as f32 * 1.37e-4 - 0.07)
        .collect();
    for n in [1, 2, 3, 7] {
        let inputs: Vec<&[f32]> = (0..n).map(|_| a.as_slice()).collect();
        for r in run(&inputs, "soup", vec![(0..n).collect()], &[]) {
            assert_eq!(
                r.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "n = {n}"
            );
        }
    }
}

#[test]
fn linear_hand_computed_with_and_without_normalize() {
    let (a, b) = ([4.0, 8.0], [8.0, 0.0]);
    check(
        run(
            &[&a, &b],
            "linear",
            vec![vec![0, 1]],
            &[("weights", List(vec![1.0, 3.0]))],
        ),
        &[7.0, 2.0],
    );
    check(
        run(
            &[&a, &b],
            "linear",
            vec![vec![0, 1]],
            &[
                ("weights", List(vec![1.0, 3.0])),
                ("normalize", Bool(false)),
            ],
        ),
        &[28.0, 8.0],
    );
}

#[test]
fn add_difference_hand_computed() {
    check(
        run(
            &[&[1.0, 1.0], &[3.0, 5.0], &[1.0, 2.0]],
            "add_difference",
            vec![vec![0], vec![1], vec![2]],
            &[("alpha", Number(0.5))],
        ),
        &[2.0, 2.5],
    );
}

#[test]
fn subtract_hand_computed() {
    check(
        run(
            &[&[1.0, 1.5], &[3.0, -5.0]],
            "subtract",
            vec![vec![0], vec![1]],
            &[],
        ),
        &[-2.0, 6.5],
    );
}

#[test]
fn task_arithmetic_hand_computed() {
    // base + 2 * (1 * (m1 - base) + 0.5 * (m2 - base))
    check(
        run(
            &[&[1.0, 1.0, 1.0], &[2.0, 3.0, 1.0], &[0.0, 1.0, 5.0]],
            "task_arithmetic",
            vec![vec![0], vec![1, 2]],
            &[("weights", List(vec![1.0, 0.5])), ("lambda", Number(2.0))],
        ),
        &[2.0, 5.0, 5.0],
    );
}

#[test]
fn bad_parameters_are_rejected_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_file(
        &dir.path().join("a.safetensors"),
        &[f32t("w", &[1], &[1.0])],
        true,
    );
    let graph = |params: Vec<(&str, ParamValue)>| amalgam::Graph {
        models: vec![amalgam::recipe::graph::ModelInput {
            name: "a".into(),
            path: p.clone(),
        }],
        nodes: vec![amalgam::recipe::graph::Node {
            name: "n".into(),
            method: "linear",
            params: params
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            slots: vec![vec![amalgam::recipe::graph::Ref::Model(0)]],
        }],
        output: amalgam::recipe::graph::Ref::Node(0),
        fallback: None,
        components: Default::default(),
        repair: None,
    };
    let e = graph(vec![("weigths", Number(1.0))])
        .validate()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unknown parameter `weigths`") && e.contains("weights, normalize"),
        "{e}"
    );
    let e = graph(vec![("weights", List(vec![1.0, 2.0]))])
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.contains("2 values but there are 1 models"), "{e}");
    let e = graph(vec![("weights", List(vec![0.0]))])
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.contains("sum to 0"), "{e}");
    let e = graph(vec![("normalize", Number(1.0))])
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.contains("must be true or false"), "{e}");
}
