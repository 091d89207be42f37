//! More of sd-mecha 1.1.8's methods against sd-mecha itself: `tensor_sum`, `top_k_tensor_sum`,
//! `copy_region`, `crossover`, `n_model_stock` and `truncate_kronecker`.
//! `tests/fixtures/sd_mecha_methods_2.json` holds inputs and the outputs sd-mecha computed for
//! them in float64 (made offline by `tools/sd_mecha_methods_fixtures_2.py`); each case runs
//! through a real merge of safetensors files in f64. Also `fallback`, the randomized
//! `truncate_kronecker`, the whole-tensor methods' memory units, the methods sd-mecha has and
//! amalgam refuses, and each method read from a `.mecha` recipe and written back.

mod common;
use amalgam::io::dtype::OutputDtype;
use amalgam::method::ParamValue::{self, Number, Text};
use amalgam::real::ComputeDtype;
use amalgam::{merge, MergeOptions, NoProgress};
use common::*;
use std::path::{Path, PathBuf};

/// `got` agrees with `want` to `tol` relative to each value or the tensor's largest value.
fn assert_agrees(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        assert!(
            err <= tol * w.abs().max(scale),
            "{what}: element {i}: amalgam {g}, sd-mecha {w}\n got {got:?}\nwant {want:?}"
        );
    }
}

#[test]
fn every_method_agrees_with_sd_mecha() {
    let fx = json_fixture("sd_mecha_methods_2.json");
    assert_eq!(fx["sd_mecha_version"], "1.1.8");
    let dir = tempfile::tempdir().unwrap();
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for (n, case) in fx["cases"].as_array().unwrap().iter().enumerate() {
        let method = case["method"].as_str().unwrap();
        let inputs = json_tensors(&case["inputs"]);
        let params = json_params(&case["params"]);
        let (shape, want) = json_tensor(&case["output"]);
        let got = merge_f64(dir.path(), &shape, &inputs, method, &params);
        let what = format!("case {n}: {method} {} {shape:?}", case["params"]);
        if let Some(exact) = case.get("output_f64_filter") {
            // crossover: to rounding against sd-mecha with an f64 filter, to float32's
            // rounding of the filter against sd-mecha as it runs.
            assert_agrees(
                &got,
                &json_tensor(exact).1,
                1e-12,
                &format!("{what} (f64 filter)"),
            );
            assert_agrees(&got, &want, 1e-6, &what);
        } else {
            assert_agrees(&got, &want, 1e-12, &what);
        }
        // The randomized SVD (the default) agrees on these small matrices, whose range its
        // 11 columns span whole.
        if method == "truncate_kronecker" {
            let p: Vec<(&str, ParamValue)> = params
                .iter()
                .filter(|(k, _)| *k != "svd")
                .cloned()
                .collect();
            let r = merge_f64(dir.path(), &shape, &inputs, method, &p);
            assert_agrees(&r, &want, 1e-9, &format!("{what} randomized"));
        }
        *seen.entry(method.to_string()).or_default() += 1;
    }
    for m in [
        "tensor_sum",
        "top_k_tensor_sum",
        "copy_region",
        "crossover",
        "n_model_stock",
        "truncate_kronecker",
    ] {
        assert!(
            seen.get(m).is_some_and(|&c| c >= 5),
            "too few fixtures for {m}: {seen:?}"
        );
    }
}

#[test]
fn fallback_takes_each_key_from_a_else_default() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = write_file(
        &d.join("a.safetensors"),
        &[f64t("x", &[2], &[1.0, 2.0]), f64t("y", &[2], &[3.0, 4.0])],
        true,
    );
    let b = write_file(
        &d.join("b.safetensors"),
        &[f64t("y", &[2], &[-3.0, -4.0]), f64t("z", &[1], &[9.0])],
        true,
    );
    let g = one_node(&[&a, &b], "fallback", vec![vec![0], vec![1]], &[]);
    let out = d.join("out.safetensors");
    let mut o = MergeOptions::new(&out);
    o.output_dtype = OutputDtype::F64;
    merge(&g, &o, &NoProgress).unwrap();
    assert_eq!(read_f64(&out, "x"), vec![1.0, 2.0]);
    assert_eq!(read_f64(&out, "y"), vec![3.0, 4.0]);
    assert_eq!(read_f64(&out, "z"), vec![9.0]);
}

#[test]
fn randomized_kronecker_agrees_in_distribution_and_follows_the_seed() {
    // A 24x36 key whose rearranged matrix has a clear leading singular value (a Kronecker
    // product plus noise): the
    // randomized rank-1 (2 power iterations) is near the exact one whatever the seed, and the
    // same seed gives the same bytes.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (m, n) = (24usize, 36usize);
    let noise = lcg_values(7, m * n);
    // The factor shapes ratio 0.5 picks for 24x36; a = w1 ⊗ w2 plus small noise.
    let (m1, m2, n1, n2) = amalgam::methods::svd::truncate_kronecker::kron_dims(&[m, n], 0.5);
    let w1: Vec<f64> = (0..m1 * n1)
        .map(|i| 1.0 + (i as f64 * 0.37).sin())
        .collect();
    let w2: Vec<f64> = (0..m2 * n2).map(|i| (i as f64 * 0.11).cos()).collect();
    let mut a = vec![0.0; m * n];
    for i1 in 0..m1 {
        for j1 in 0..n1 {
            for i2 in 0..m2 {
                for j2 in 0..n2 {
                    let at = (i1 * m2 + i2) * n + j1 * n2 + j2;
                    a[at] = w1[i1 * n1 + j1] * w2[i2 * n2 + j2] + 0.01 * noise[at];
                }
            }
        }
    }
    let path = write_file(&d.join("a.safetensors"), &[f64t("w", &[m, n], &a)], true);
    let run = |seed: u64, params: &[(&str, ParamValue)], name: &str| {
        let g = one_node(&[&path], "truncate_kronecker", vec![vec![0]], params);
        let out = d.join(name);
        let mut o = MergeOptions::new(&out);
        o.output_dtype = OutputDtype::F64;
        o.compute_dtype = ComputeDtype::F64;
        o.seed = seed;
        merge(&g, &o, &NoProgress).unwrap();
        read_f64(&out, "w")
    };
    let exact = run(0, &[("svd", Text("exact".into()))], "exact.safetensors");
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    for seed in [1, 2, 3] {
        let r = run(seed, &[], &format!("r{seed}.safetensors"));
        let diff: Vec<f64> = r.iter().zip(&exact).map(|(x, y)| x - y).collect();
        assert!(
            norm(&diff) < 1e-6 * norm(&exact),
            "seed {seed}: {}",
            norm(&diff) / norm(&exact)
        );
        assert_eq!(
            r,
            run(seed, &[], &format!("r{seed}b.safetensors")),
            "seed {seed}"
        );
    }
    // The approximation is close to a (the noise aside).
    let diff: Vec<f64> = exact.iter().zip(&a).map(|(x, y)| x - y).collect();
    assert!(norm(&diff) < 0.05 * norm(&a));
}

#[test]
fn whole_tensor_methods_refuse_keys_over_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let v: Vec<f64> = lcg_values(3, 64 * 64);
    let a = write_file(
        &d.join("a.safetensors"),
        &[f64t("big", &[64, 64], &v)],
        true,
    );
    let b = write_file(
        &d.join("b.safetensors"),
        &[f64t("big", &[64, 64], &v)],
        true,
    );
    for (method, slots) in [
        ("crossover", vec![vec![0], vec![1]]),
        ("top_k_tensor_sum", vec![vec![0], vec![1]]),
        ("truncate_kronecker", vec![vec![0]]),
    ] {
        let g = one_node(&[&a, &b], method, slots, &[]);
        let mut o = MergeOptions::new(d.join("out.safetensors"));
        o.memory_budget = 64 * 1024;
        let err = merge(&g, &o, &NoProgress).unwrap_err().to_string();
        assert!(
            err.contains("big") && err.contains(method),
            "{method}: {err}"
        );
    }
}

#[test]
fn sd_mecha_methods_amalgam_does_not_run_say_why() {
    for (m, why) in [
        ("stack", "list slot"),
        ("pick_component", "[output.components]"),
    ] {
        let err = amalgam::methods::canonical_name(m).unwrap_err().to_string();
        assert!(err.contains(why), "{m}: {err}");
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_file(
        &d.join("a.safetensors"),
        &[f64t("w", &[2], &[1.0, 2.0])],
        true,
    );
    let models = "version 0.1.0\n\
        model \"a.safetensors\" model_config=null merge_space=\"weight\"\n";
    for (text, why) in [
        (format!("{models}merge \"stack\" &0 &0\n"), "list slot"),
        (
            format!(
                "{models}dict key=\"unet\"\n\
                 literal &1 model_config=\"singleton-mecha\" merge_space=null\n\
                 merge \"convert_singleton\" &2\n\
                 merge \"pick_component\" &0 &3\n\
                 merge \"weighted_sum\" &4 &0\n"
            ),
            "component routing",
        ),
    ] {
        let p = d.join("r.mecha");
        std::fs::write(&p, text).unwrap();
        match amalgam::recipe::mecha::load(&p, &[]) {
            Err(e) => assert!(e.to_string().contains(why), "{e}"),
            Ok(_) => panic!("accepted: {why}"),
        }
    }
}

#[test]
fn mecha_recipes_read_run_and_write_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (i, m) in ["a", "b", "c", "d"].iter().enumerate() {
        let v: Vec<f64> = lcg_values(i as u64 + 11, 24);
        write_file(
            &d.join(format!("{m}.safetensors")),
            &[f64t("w", &[4, 6], &v)],
            true,
        );
    }
    let models = "version 0.1.0\n\
        model \"a.safetensors\" model_config=null merge_space=\"weight\"\n\
        model \"b.safetensors\" model_config=null merge_space=\"weight\"\n\
        model \"c.safetensors\" model_config=null merge_space=\"delta\"\n\
        model \"d.safetensors\" model_config=null merge_space=\"weight\"\n";
    // (method, its arguments in the recipe, the parameters the node gets)
    type Case = (
        &'static str,
        &'static str,
        &'static [(&'static str, ParamValue)],
    );
    // truncate_kronecker takes a delta: the difference of two models (line &4).
    let delta = "merge \"subtract\" &0 &3\n";
    let cases: &[Case] = &[
        (
            "tensor_sum",
            "&0 &1 width=0.3 offset=0.25",
            &[("width", Number(0.3)), ("offset", Number(0.25))],
        ),
        (
            "top_k_tensor_sum",
            "&0 &1 width=0.5",
            &[("width", Number(0.5))],
        ),
        (
            "crossover",
            "&0 &1 alpha=0.3 tilt=0.5",
            &[("alpha", Number(0.3)), ("tilt", Number(0.5))],
        ),
        (
            "truncate_kronecker",
            "&4 kronecker_ratio=0.3 use_approximate_basis=false",
            &[("kronecker_ratio", Number(0.3))],
        ),
        ("fallback", "&0 &1", &[]),
    ];
    for (method, args, params) in cases {
        let text = format!("{models}{delta}merge \"{method}\" {args}\n");
        let g = load_mecha_text(d, &format!("{method}.mecha"), &text);
        let node = g.nodes.last().unwrap();
        assert_eq!(node.method, *method);
        for (k, v) in *params {
            assert_eq!(node.params.get(*k), Some(v), "{method} {k}");
        }
        let got = run_graph_f64(d, &g, &format!("{method}.safetensors"));
        // Written back: the method under its name, read again to the same node and output.
        let written =
            amalgam::recipe::mecha::to_mecha(&g, &[None; 4], None, 0).expect("expressible");
        assert!(
            written.contains(&format!("merge \"{method}\"")),
            "{written}"
        );
        let back = load_mecha_text(d, &format!("{method}-again.mecha"), &written);
        let again = back.nodes.last().unwrap();
        assert_eq!(
            (again.method, &again.slots),
            (node.method, &node.slots),
            "{written}"
        );
        for (k, v) in *params {
            assert_eq!(again.params.get(*k), Some(v), "{written}");
        }
        let out = run_graph_f64(d, &back, &format!("{method}-again.safetensors"));
        assert_eq!(out, got, "{written}");
    }
    // The wrappers are written as the methods they build in sd-mecha; read back, the same output.
    let paths: Vec<PathBuf> = ["a", "b", "c", "d"]
        .iter()
        .map(|m| d.join(format!("{m}.safetensors")))
        .collect();
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    /// (method, slots, parameters, lines the written recipe has)
    type Wrapper<'a> = (
        &'a str,
        Vec<Vec<usize>>,
        Vec<(&'a str, ParamValue)>,
        &'a [&'a str],
    );
    let wrappers: &[Wrapper] = &[
        (
            "copy_region",
            vec![vec![0], vec![1], vec![3]],
            vec![("width", Number(0.5)), ("offset", Number(0.25))],
            &[
                "merge \"subtract\" &0 &3",
                "merge \"tensor_sum\"",
                "merge \"add_difference\" &3",
            ],
        ),
        (
            "copy_region",
            vec![vec![0], vec![1], vec![3]],
            vec![("top_k", ParamValue::Bool(true))],
            &["merge \"top_k_tensor_sum\""],
        ),
        (
            "n_model_stock",
            vec![vec![3], vec![0, 1]],
            vec![],
            &[
                "merge \"subtract\" &0 &3",
                "merge \"model_stock\"",
                "merge \"add_difference\" &3",
            ],
        ),
    ];
    for (i, (method, slots, params, lines)) in wrappers.iter().enumerate() {
        let native = one_node(&refs, method, slots.clone(), params);
        let want = run_graph_f64(d, &native, &format!("{method}-{i}-native.safetensors"));
        let written =
            amalgam::recipe::mecha::to_mecha(&native, &[None; 4], None, 0).expect("expressible");
        for line in *lines {
            assert!(written.contains(line), "{line}\n{written}");
        }
        let back = load_mecha_text(d, &format!("{method}-{i}.mecha"), &written);
        let got = run_graph_f64(d, &back, &format!("{method}-{i}-w.safetensors"));
        assert_agrees(&got, &want, 1e-15, &format!("{method} written back"));
    }
}
