//! sd-mecha 1.1.8's element-wise and per-tensor methods (`methods::mecha`, issue #18) against
//! sd-mecha itself: `tests/fixtures/sd_mecha_methods.json` holds inputs and the outputs sd-mecha
//! computed for them in float64 (made offline by `tools/sd_mecha_methods_fixtures.py`). Each case
//! runs through a real merge of safetensors files in f64. Also hand-computed cases, and each
//! method read from a `.mecha` recipe and written back.

mod common;
use amalgam::method::ParamValue::{self, Number};
use common::*;

/// `got` agrees with `want` to 1e-12 relative to each value, or to the tensor's largest value
/// where a value is a cancellation: sd-mecha's complex powers give `cos(π/2)·r ≈ 6e-17·r` for a
/// real part that is 0 exactly, and its ‖a‖-scaled projection sums round differently from the
/// streamed `⟨a, b⟩/‖a‖²` (the same sum to rounding), so a value near 0 agrees to the scale only.
fn assert_agrees(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        if std::env::var_os("SHOW_ERR").is_some() && err > 0.0 {
            eprintln!("{what} [{i}]: {:e} of {:e}", err, w.abs().max(scale));
        }
        assert!(
            err <= 1e-12 * w.abs().max(scale),
            "{what}: element {i}: amalgam {g}, sd-mecha {w}\n got {got:?}\nwant {want:?}"
        );
    }
}

#[test]
fn every_method_agrees_with_sd_mecha() {
    let fx = json_fixture("sd_mecha_methods.json");
    assert_eq!(fx["sd_mecha_version"], "1.1.8");
    let dir = tempfile::tempdir().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let cases = fx["cases"].as_array().unwrap();
    for (n, case) in cases.iter().enumerate() {
        let method = case["method"].as_str().unwrap();
        let values = json_tensors(&case["inputs"]);
        let params = json_params(&case["params"]);
        let (shape, want) = json_tensor(&case["output"]);
        let got = merge_f64(dir.path(), &shape, &values, method, &params);
        assert_agrees(
            &got,
            &want,
            &format!("case {n}: {method} {:?} {shape:?}", case["params"]),
        );
        seen.insert(method.to_string());
    }
    for m in [
        "geometric_sum",
        "multiply_quotient",
        "train_difference_mask",
        "add_opposite_mask",
        "add_strict_opposite_mask",
        "clamp",
        "perpendicular_component",
        "add_perpendicular",
        "add_cosine_a",
        "add_cosine_b",
    ] {
        assert!(seen.contains(m), "no fixture for {m}");
    }
}

#[test]
fn hand_computed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = |method: &str, inputs: &[Vec<f64>], params: &[(&str, ParamValue)]| {
        merge_f64(d, &[4], inputs, method, params)
    };
    // geometric_sum at 1/2: √(ab) for a, b > 0; √|a|·√|b|·cos(π/2) = 0 for opposite signs;
    // −√(ab) for both negative; 0 where one is 0.
    let g = run(
        "geometric_sum",
        &[vec![4.0, -4.0, -4.0, 0.0], vec![9.0, 9.0, -9.0, 5.0]],
        &[("alpha", Number(0.5))],
    );
    assert_agrees(&g, &[6.0, 0.0, -6.0, 0.0], "geometric_sum");
    // train_difference_mask: 1.8·|b − a| / (|b − a| + |b − c|), 0 where a = b = c.
    let m = run(
        "train_difference_mask",
        &[
            vec![0.0, 1.0, 2.0, 1.0],
            vec![1.0, 1.0, 2.0, 3.0],
            vec![1.0, 2.0, 2.0, 0.0],
        ],
        &[],
    );
    assert_agrees(
        &m,
        &[1.8, 0.0, 0.0, 1.8 * 2.0 / 5.0],
        "train_difference_mask",
    );
    // clamp of a between the min and max of two bounds.
    let c = run(
        "clamp",
        &[
            vec![-5.0, 0.5, 5.0, 2.0],
            vec![0.0, 0.0, 0.0, 2.0],
            vec![1.0, 1.0, 1.0, 2.0],
        ],
        &[],
    );
    assert_eq!(c, vec![0.0, 0.5, 1.0, 2.0]);
    // perpendicular_component: b minus its projection on a: a = (1, 0, 0, 0) leaves b's other
    // components; a = 0 gives zeros.
    let p = run(
        "perpendicular_component",
        &[vec![2.0, 0.0, 0.0, 0.0], vec![3.0, 4.0, -1.0, 0.5]],
        &[],
    );
    assert_eq!(p, vec![0.0, 4.0, -1.0, 0.5]);
    let z = run(
        "perpendicular_component",
        &[vec![0.0; 4], vec![3.0, 4.0, -1.0, 0.5]],
        &[],
    );
    assert_eq!(z, vec![0.0; 4]);
    // add_cosine_a of a 1-D tensor: one cosine; parallel b (cos 1) at alpha 0.5 takes k = 0.5.
    let k = run(
        "add_cosine_a",
        &[vec![1.0, 2.0, 3.0, 4.0], vec![2.0, 4.0, 6.0, 8.0]],
        &[("alpha", Number(0.5))],
    );
    assert_agrees(&k, &[1.5, 3.0, 4.5, 6.0], "add_cosine_a");
}

#[test]
fn mecha_recipes_read_run_and_write_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (i, m) in ["a", "b", "c", "d"].iter().enumerate() {
        let v: Vec<f64> = lcg_values(i as u64 + 1, 24);
        write_file(
            &d.join(format!("{m}.safetensors")),
            &[f64t("w", &[4, 6], &v)],
            true,
        );
    }
    let models = "version 0.1.0\n\
        model \"a.safetensors\" model_config=null merge_space=\"weight\"\n\
        model \"b.safetensors\" model_config=null merge_space=\"weight\"\n\
        model \"c.safetensors\" model_config=null merge_space=\"weight\"\n\
        model \"d.safetensors\" model_config=null merge_space=\"weight\"\n";
    // (method, its arguments in the recipe, the parameters the node gets)
    type Case = (&'static str, &'static str, &'static [(&'static str, f64)]);
    let cases: &[Case] = &[
        ("geometric_sum", "&0 &1 alpha=0.3", &[("alpha", 0.3)]),
        ("multiply_quotient", "&0 &1 &2 alpha=0.5", &[("alpha", 0.5)]),
        (
            "train_difference_mask",
            "&0 &1 &2 alpha=0.7",
            &[("alpha", 0.7)],
        ),
        ("add_opposite_mask", "&0 &1 &2", &[]),
        (
            "add_strict_opposite_mask",
            "&0 &1 &2 alpha=2.0",
            &[("alpha", 2.0)],
        ),
        ("clamp", "&0 &1 &2 &3 stiffness=0.5", &[("stiffness", 0.5)]),
        ("perpendicular_component", "&0 &1", &[]),
        ("add_cosine_a", "&0 &1 alpha=0.2", &[("alpha", 0.2)]),
        ("add_cosine_b", "&0 &1 alpha=-0.3", &[("alpha", -0.3)]),
    ];
    for (method, args, params) in cases {
        let text = format!("{models}merge \"{method}\" {args}\n");
        let g = load_mecha_text(d, &format!("{method}.mecha"), &text);
        let node = g.nodes.last().unwrap();
        assert_eq!(node.method, *method);
        for (k, v) in *params {
            assert_eq!(node.params.get(*k), Some(&Number(*v)), "{method} {k}");
        }
        if *method == "clamp" {
            assert_eq!(node.slots[1].len(), 3, "clamp's bounds");
        }
        let got = run_graph_f64(d, &g, &format!("{method}.safetensors"));
        // The same as the node run directly.
        let inputs: Vec<Vec<f64>> = ["a", "b", "c", "d"]
            .iter()
            .map(|m| read_f64(&d.join(format!("{m}.safetensors")), "w"))
            .collect();
        let n = node.slots.iter().map(|s| s.len()).sum::<usize>();
        let sub = tempfile::tempdir().unwrap();
        let p: Vec<(&str, ParamValue)> = params.iter().map(|(k, v)| (*k, Number(*v))).collect();
        let direct = merge_f64(sub.path(), &[4, 6], &inputs[..n], method, &p);
        assert_eq!(got, direct, "{method}");
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
            assert_eq!(again.params.get(*k), Some(&Number(*v)), "{written}");
        }
        let out = run_graph_f64(d, &back, &format!("{method}-again.safetensors"));
        assert_eq!(out, got, "{written}");
    }
    // add_perpendicular, a wrapper in sd-mecha, is written as the methods it builds there.
    let native = one_node(
        &[
            &d.join("a.safetensors"),
            &d.join("b.safetensors"),
            &d.join("c.safetensors"),
        ],
        "add_perpendicular",
        vec![vec![0], vec![1], vec![2]],
        &[("alpha", Number(0.5))],
    );
    let want = run_graph_f64(d, &native, "add_perpendicular.safetensors");
    let written =
        amalgam::recipe::mecha::to_mecha(&native, &[None; 3], None, 0).expect("expressible");
    for line in [
        "merge \"subtract\" &0 &2",
        "merge \"subtract\" &1 &2",
        "merge \"perpendicular_component\"",
        "merge \"add_difference\" &0",
    ] {
        assert!(written.contains(line), "{line}\n{written}");
    }
    let back = load_mecha_text(d, "add_perpendicular.mecha", &written);
    let got = run_graph_f64(d, &back, "add_perpendicular-again.safetensors");
    assert_agrees(&got, &want, "add_perpendicular written back");
}

#[test]
fn masks_are_params_in_mecha_and_cosines_take_weights() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for m in ["a", "b"] {
        write_file(
            &d.join(format!("{m}.safetensors")),
            &[f64t("w", &[2], &[1.0, 2.0])],
            true,
        );
    }
    let text = "version 0.1.0\n\
        model \"a.safetensors\" model_config=null merge_space=\"weight\"\n\
        model \"b.safetensors\" model_config=null merge_space=\"delta\"\n\
        merge \"add_cosine_a\" &0 &1\n";
    let p = d.join("bad.mecha");
    std::fs::write(&p, text).unwrap();
    let err = match amalgam::recipe::mecha::load(&p, &[]) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a delta given to add_cosine_a is accepted"),
    };
    assert!(
        err.contains("`add_cosine_a` takes inputs in merge space `weight`"),
        "{err}"
    );
    // A mask's result is a parameter: not an input of a weight-space method.
    let text = "version 0.1.0\n\
        model \"a.safetensors\" model_config=null merge_space=\"weight\"\n\
        model \"b.safetensors\" model_config=null merge_space=\"weight\"\n\
        merge \"train_difference_mask\" &0 &1 &1 alpha=0.5\n";
    let g = load_mecha_text(d, "mask.mecha", text);
    assert_eq!(g.nodes.last().unwrap().method, "train_difference_mask");
    // As the per-element alpha of an add-difference (sd-mecha's use): refused, not misread.
    let text = format!("{text}merge \"subtract\" &1 &0\nmerge \"add_difference\" &0 &3 alpha=&2\n");
    let p = d.join("mask_alpha.mecha");
    std::fs::write(&p, text).unwrap();
    match amalgam::recipe::mecha::load(&p, &[]) {
        Err(e) => assert!(e.to_string().contains("is not a parameter value"), "{e}"),
        Ok(_) => panic!("a mask as alpha is accepted"),
    }
}
