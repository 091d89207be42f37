//! `--non-finite omit|error|keep` and `[output] non_finite` from the command line: what the
//! summary, the JSON report and the errors say about NaN and Inf.
mod common;
use common::*;
use std::path::{Path, PathBuf};

/// A safetensors file with one f32 tensor `w` of `v`.
fn model(dir: &Path, name: &str, v: &[f32]) -> PathBuf {
    let header = format!(
        r#"{{"w":{{"dtype":"F32","shape":[{}],"data_offsets":[0,{}]}}}}"#,
        v.len(),
        v.len() * 4
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(v.iter().flat_map(|x| x.to_le_bytes()));
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn pool(d: &Path) -> Vec<PathBuf> {
    vec![
        model(d, "a.safetensors", &[1.0, 2.0, 3.0, 4.0]),
        model(d, "bad.safetensors", &[f32::NAN, 2.0, f32::INFINITY, 4.0]),
        model(d, "c.safetensors", &[3.0, 4.0, 5.0, 6.0]),
    ]
}

/// `merge -m soup` of the pool into `out`, then `extra`.
fn soup<'a>(p: &'a [PathBuf], out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "merge",
        "-m",
        "soup",
        s(&p[0]),
        s(&p[1]),
        s(&p[2]),
        "-o",
        s(out),
    ];
    args.extend_from_slice(extra);
    args
}

#[test]
fn omit_is_the_default_and_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = pool(d);
    let out = d.join("out.safetensors");
    let json = d.join("report.json");
    let text = ok(&soup(
        &p,
        &out,
        &["--dtype", "f32", "--report-json", s(&json)],
    ));
    assert!(
        text.contains(
            "bad.safetensors) holds NaN/Inf values in 1 keys, left out of those keys: w (2)"
        ),
        "{text}"
    );
    assert!(!text.contains("warning: the output"), "{text}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(
        report["inputs_non_finite"],
        serde_json::json!([{"key": "w", "model": 1, "count": 2, "omitted": true}])
    );
    // The mean of a and c only.
    let bytes = std::fs::read(&out).unwrap();
    let tail: Vec<f32> = bytes[bytes.len() - 16..]
        .chunks(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(tail, [2.0, 3.0, 4.0, 5.0]);
}

#[test]
fn error_names_file_key_and_count() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = pool(d);
    let out = d.join("out.safetensors");
    let err = fails(&soup(&p, &out, &["--non-finite", "error"]));
    assert!(
        err.contains("bad.safetensors: tensor `w` holds 2 NaN/Inf values"),
        "{err}"
    );
    assert!(!out.exists());
    let err = fails(&[
        "merge",
        "-m",
        "soup",
        s(&p[0]),
        "-o",
        s(&out),
        "--non-finite",
        "drop",
    ]);
    assert!(err.contains("omit, error or keep"), "{err}");
}

#[test]
fn keep_from_a_recipe_warns_about_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = pool(d);
    let recipe = d.join("r.toml");
    std::fs::write(
        &recipe,
        format!(
            "[models]\na = {:?}\nbad = {:?}\n\n[nodes.m]\nmethod = \"soup\"\nmodels = [\"a\", \"bad\"]\n\n[output]\nnode = \"m\"\nnon_finite = \"keep\"\n",
            p[0], p[1]
        ),
    )
    .unwrap();
    let out = d.join("out.safetensors");
    let text = ok(&["merge", s(&recipe), "-o", s(&out)]);
    assert!(
        text.contains("holds NaN/Inf values in 1 keys, merged as they are"),
        "{text}"
    );
    assert!(
        text.contains("warning: the output holds 2 NaN/Inf values in 1 keys: w (2)"),
        "{text}"
    );
    // The recipe embedded in the output records the policy, so a rerun gives the same bytes.
    let inspect = ok(&["inspect", "--metadata", s(&out)]);
    assert!(inspect.contains("non_finite = \"keep\""), "{inspect}");
    // The command line wins over the recipe.
    let out2 = d.join("out2.safetensors");
    let text = ok(&["merge", s(&recipe), "-o", s(&out2), "--non-finite", "omit"]);
    assert!(text.contains("left out of those keys"), "{text}");
    let bad = d.join("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&recipe)
            .unwrap()
            .replace("\"keep\"", "\"zero\""),
    )
    .unwrap();
    let err = fails(&["merge", s(&bad), "-o", s(&d.join("x.safetensors"))]);
    assert!(err.contains("`zero` is not a non-finite policy"), "{err}");
}
