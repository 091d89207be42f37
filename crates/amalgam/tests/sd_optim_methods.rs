//! sd-optim's `multi_domain_alignment` and its wiki presets (`methods::frequency`, issue #18)
//! against a reimplementation of sd-optim's published code (`ba47e65`):
//! `tests/fixtures/sd_optim_methods.json`, made offline by `tools/sd_optim_fixtures.py`. Each
//! case runs through a real f64 merge of safetensors files; also hand-computed properties.

mod common;
use amalgam::io::dtype::OutputDtype;
use amalgam::method::ParamValue::{self, Number, Text};
use amalgam::real::ComputeDtype;
use amalgam::{merge, MergeOptions, NoProgress};
use common::*;
use std::path::Path;

/// Merges f64 tensors `a`, `b`, `c` (key `key` of `shape`) with `method` in f64.
fn merge3(
    dir: &Path,
    key: &str,
    shape: &[usize],
    abc: [&[f64]; 3],
    method: &str,
    params: &[(&str, ParamValue)],
) -> Vec<f64> {
    let inputs: Vec<Vec<f64>> = abc.iter().map(|x| x.to_vec()).collect();
    merge_f64_key(dir, key, shape, &inputs, method, params)
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn multi_domain_alignment_agrees_with_sd_optim() {
    let fx = json_fixture("sd_optim_methods.json");
    let dir = tempfile::tempdir().unwrap();
    let mut worst = 0f64;
    let mut methods = std::collections::BTreeSet::new();
    for (n, case) in fx["cases"].as_array().unwrap().iter().enumerate() {
        let method = case["method"].as_str().unwrap();
        let key = case["key"].as_str().unwrap();
        let shape: Vec<usize> = case["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let params: Vec<(&str, ParamValue)> = case["params"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.as_str(), Number(v.as_f64().unwrap())))
            .collect();
        let (a, b, c) = (floats(&case["a"]), floats(&case["b"]), floats(&case["c"]));
        let want = floats(&case["expected"]);
        let got = merge3(dir.path(), key, &shape, [&a, &b, &c], method, &params);
        let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let err = (g - w).abs() / scale;
            worst = worst.max(err);
            assert!(
                err < 1e-12,
                "case {n} ({method}, {key} {shape:?}): element {i}: amalgam {g}, sd-optim {w}"
            );
        }
        assert_eq!(got.len(), want.len());
        methods.insert(method);
    }
    assert_eq!(methods.len(), 4, "every preset is covered: {methods:?}");
    eprintln!("worst relative error {worst:e}");
}

/// Hand-checked properties: with a = b = c and frequency_weight = 0, b* = b, so b* − c = 0 and
/// the slerp of a row with itself is the row (with frequency_weight > 0 it is not a fixed point:
/// the transition band's ramp changes b's spectrum even then); with alpha = 0 and beta = 0 the
/// output is a, whatever b and c.
#[test]
fn multi_domain_alignment_fixed_points() {
    let dir = tempfile::tempdir().unwrap();
    let a: Vec<f64> = (0..24).map(|i| ((i * 7 % 11) as f64 - 5.0) / 3.0).collect();
    let b: Vec<f64> = (0..24).map(|i| ((i * 5 % 13) as f64 - 6.0) / 4.0).collect();
    let c: Vec<f64> = (0..24).map(|i| ((i * 3 % 7) as f64 - 3.0) / 5.0).collect();
    let no_fft = [("frequency_weight", Number(0.0))];
    let same = merge3(
        dir.path(),
        "w",
        &[4, 6],
        [&a, &a, &a],
        "multi_domain_alignment",
        &no_fft,
    );
    for (x, y) in same.iter().zip(&a) {
        assert!((x - y).abs() < 1e-12 * y.abs().max(1.0), "{x} vs {y}");
    }
    let zero = [("alpha", Number(0.0)), ("beta", Number(0.0))];
    let only_a = merge3(
        dir.path(),
        "w",
        &[4, 6],
        [&a, &b, &c],
        "multi_domain_alignment",
        &zero,
    );
    assert_eq!(only_a, a);
    // beta = 0, frequency_weight = 0, alpha = 1: each row of b (the slerp's end point).
    let to_b = [
        ("alpha", Number(1.0)),
        ("beta", Number(0.0)),
        ("frequency_weight", Number(0.0)),
    ];
    let only_b = merge3(
        dir.path(),
        "w",
        &[4, 6],
        [&a, &b, &c],
        "multi_domain_alignment",
        &to_b,
    );
    for (x, y) in only_b.iter().zip(&b) {
        assert!((x - y).abs() < 1e-12, "{x} vs {y}");
    }
    // alpha and beta outside [0, 1] are refused, as sd-optim does.
    let err = std::panic::catch_unwind(|| {
        merge3(
            dir.path(),
            "w",
            &[4, 6],
            [&a, &b, &c],
            "multi_domain_alignment",
            &[("alpha", Number(1.5))],
        )
    });
    assert!(err.is_err());
}

/// sd-optim recipes call its methods through sd-mecha: a `.mecha` recipe naming
/// `multi_domain_alignment` reads to the node, runs to the same bytes as the node, and is
/// written back under that name.
#[test]
fn multi_domain_alignment_reads_and_writes_mecha() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut inputs = Vec::new();
    for (i, m) in ["a", "b", "c"].iter().enumerate() {
        let v = lcg_values(i as u64 + 7, 40);
        write_file(
            &d.join(format!("{m}.safetensors")),
            &[f64t("w", &[5, 8], &v)],
            true,
        );
        inputs.push(v);
    }
    let text = "version 0.1.0\n\
        model \"a.safetensors\" model_config=null merge_space=\"weight\"\n\
        model \"b.safetensors\" model_config=null merge_space=\"weight\"\n\
        model \"c.safetensors\" model_config=null merge_space=\"weight\"\n\
        merge \"multi_domain_alignment\" &0 &1 &2 alpha=0.3 frequency_weight=0.25 use_cross_attention=true\n";
    let p = d.join("mda.mecha");
    std::fs::write(&p, text).unwrap();
    let g = amalgam::recipe::mecha::load(&p, &[]).unwrap().graph;
    let node = g.nodes.last().unwrap();
    assert_eq!(node.method, "multi_domain_alignment");
    assert_eq!(node.params.get("alpha"), Some(&Number(0.3)));
    let run = |g: &amalgam::Graph, name: &str| {
        let out = d.join(name);
        let mut o = MergeOptions::new(&out);
        o.output_dtype = OutputDtype::F64;
        o.compute_dtype = ComputeDtype::F64;
        merge(g, &o, &NoProgress).unwrap();
        read_f64(&out, "w")
    };
    let got = run(&g, "from-mecha.safetensors");
    let sub = tempfile::tempdir().unwrap();
    let direct = merge3(
        sub.path(),
        "w",
        &[5, 8],
        [&inputs[0], &inputs[1], &inputs[2]],
        "multi_domain_alignment",
        &[("alpha", Number(0.3)), ("frequency_weight", Number(0.25))],
    );
    assert_eq!(got, direct);
    let written = amalgam::recipe::mecha::to_mecha(&g, &[None; 3], None, 0).expect("expressible");
    assert!(
        written.contains("merge \"multi_domain_alignment\""),
        "{written}"
    );
    std::fs::write(d.join("again.mecha"), &written).unwrap();
    let back = amalgam::recipe::mecha::load(&d.join("again.mecha"), &[])
        .unwrap()
        .graph;
    assert_eq!(run(&back, "again.safetensors"), got, "{written}");
}

/// The `ties_sum_extended` preset, and the options it brings to the TIES pipeline
/// (`min_agreement`, `weight_decay`), against sd-optim's code (`0bbd82a`): `vote_sgn = 1` is
/// `election = count`, `apply_median = 0` `fuse = disjoint_mean`, `apply_stock = 1`
/// `stock = positive_pairs`.
#[test]
fn ties_sum_extended_agrees_with_sd_optim() {
    let fx = json_fixture("sd_optim_methods.json");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases = fx["ties_sum_extended"].as_array().unwrap();
    assert_eq!(cases.len(), 7);
    for (n, case) in cases.iter().enumerate() {
        let shape: Vec<usize> = case["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let base = write_file(
            &d.join("base.safetensors"),
            &[f64t("w", &shape, &floats(&case["base"]))],
            true,
        );
        let models: Vec<_> = case["models"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, m)| {
                write_file(
                    &d.join(format!("m{i}.safetensors")),
                    &[f64t("w", &shape, &floats(m))],
                    true,
                )
            })
            .collect();
        let mut params: Vec<(&str, ParamValue)> = Vec::new();
        for (k, v) in case["params"].as_object().unwrap() {
            let v = v.as_f64().unwrap();
            match k.as_str() {
                "vote_sgn" if v > 0.0 => params.push(("election", Text("count".into()))),
                "apply_median" if v <= 0.0 => params.push(("fuse", Text("disjoint_mean".into()))),
                "apply_stock" if v > 0.0 => params.push(("stock", Text("positive_pairs".into()))),
                "k" | "min_agreement" | "weight_decay" => params.push((k.as_str(), Number(v))),
                other => panic!("unmapped {other}"),
            }
        }
        let mut paths: Vec<&Path> = vec![&base];
        paths.extend(models.iter().map(|p| p.as_path()));
        let slots = vec![vec![0], (1..paths.len()).collect()];
        let g = one_node(&paths, "ties_sum_extended", slots, &params);
        let out = d.join(format!("out{n}.safetensors"));
        let mut o = MergeOptions::new(&out);
        o.output_dtype = OutputDtype::F64;
        o.compute_dtype = ComputeDtype::F64;
        merge(&g, &o, &NoProgress).unwrap();
        let got = read_f64(&out, "w");
        let want = floats(&case["expected"]);
        let base = floats(&case["base"]);
        let mut kept = 0;
        for (i, ((g, w), b)) in got.iter().zip(&want).zip(&base).enumerate() {
            assert!(
                (g - w).abs() <= 1e-12 * w.abs().max(1.0),
                "case {n} {:?}: element {i}: amalgam {g}, sd-optim {w}",
                case["params"]
            );
            kept += usize::from(g != b);
        }
        // The agreement and the trim leave some elements at the base, and move others.
        assert!(
            kept > 0 && kept < got.len(),
            "case {n}: {kept} of {}",
            got.len()
        );
    }
}

/// `min_agreement` by hand: three models, one element where only one takes part (1/3 < 0.5: the
/// base), one where two do (kept); `agreement = elected` counts only the elected sign's.
#[test]
fn min_agreement_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = write_file(
        &d.join("base.safetensors"),
        &[f64t("w", &[3], &[0.0; 3])],
        true,
    );
    let ms: Vec<_> = [[1.0, 1.0, 2.0], [0.0, 3.0, -1.0], [0.0, 0.0, -1.5]]
        .iter()
        .enumerate()
        .map(|(i, v)| {
            write_file(
                &d.join(format!("m{i}.safetensors")),
                &[f64t("w", &[3], v)],
                true,
            )
        })
        .collect();
    let run = |params: &[(&str, ParamValue)]| {
        let paths: Vec<&Path> = std::iter::once(base.as_path())
            .chain(ms.iter().map(|p| p.as_path()))
            .collect();
        let g = one_node(&paths, "ties", vec![vec![0], vec![1, 2, 3]], params);
        let out = d.join("out.safetensors");
        let _ = std::fs::remove_file(&out);
        let mut o = MergeOptions::new(&out);
        o.output_dtype = OutputDtype::F64;
        o.compute_dtype = ComputeDtype::F64;
        merge(&g, &o, &NoProgress).unwrap();
        read_f64(&out, "w")
    };
    let common = [("k", Number(1.0)), ("min_agreement", Number(0.5))];
    // Element 0: one of three takes part; element 1: two (+1, +3: mean 2); element 2: all three,
    // mass -0.5 elects −, mean of −1 and −1.5.
    assert_eq!(run(&common), vec![0.0, 2.0, -1.25]);
    // Elected: element 2 has two of three on the elected side (kept); with 0.7 it is not.
    let elected = [("agreement", Text("elected".into()))];
    let mut p = common.to_vec();
    p.extend(elected.iter().cloned());
    assert_eq!(run(&p), vec![0.0, 2.0, -1.25]);
    p[1] = ("min_agreement", Number(0.7));
    assert_eq!(run(&p), vec![0.0, 0.0, 0.0]);
    // weight_decay shrinks the result.
    let wd = [("k", Number(1.0)), ("weight_decay", Number(0.5))];
    assert_eq!(run(&wd), vec![0.5, 1.0, -0.625]);
}
