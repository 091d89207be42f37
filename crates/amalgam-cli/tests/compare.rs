//! `amalgam compare` and `amalgam merge --sweep` end to end: the files they write, what they
//! refuse, and the sweep's outputs each carrying its own recipe.

mod common;
use common::*;

#[test]
fn compare_writes_its_report_and_keeps_a_folder_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    synth_sd1(d, 3, &["--prune-vae", "1"]);
    let m: Vec<String> = (0..3)
        .map(|i| s(&d.join(format!("m{i:03}.safetensors"))).to_string())
        .collect();
    let base = d.join("base.safetensors");
    let out = d.join("report");
    let text = ok(&[
        "compare",
        &m[0],
        &m[1],
        &m[2],
        "--base",
        s(&base),
        "-o",
        s(&out),
    ]);
    assert!(
        text.contains("L2 to base") && text.contains("m002"),
        "{text}"
    );
    for f in [
        "compare.json",
        "models.csv",
        "keys.csv",
        "pairwise_l2.csv",
        "bars_total.svg",
        "bars_total.png",
        "heatmap_l2.svg",
        "map_all.png",
        "report.html",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).unwrap()).unwrap();
    assert_eq!(json["models"].as_array().unwrap().len(), 3);
    assert_eq!(json["layout"], "sd1-ldm");
    // m000 has no VAE: it is compared on the keys it has, and has no VAE figures.
    let vae = json["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "vae")
        .unwrap();
    assert!(vae["stats"]["models"][0]["dist_base"].is_null());
    assert!(vae["stats"]["models"][1]["dist_base"].as_f64().unwrap() > 0.0);
    assert!(vae["stats"]["l2"][0][1].is_null());
    assert!(json["total"]["models"][0]["dist_base"].as_f64().unwrap() > 0.0);
    // A folder holding files is refused and left as it was.
    let before = std::fs::read(out.join("compare.json")).unwrap();
    let err = fails(&["compare", &m[0], &m[1], "-o", s(&out)]);
    assert!(
        err.contains("holds files already") && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(std::fs::read(out.join("compare.json")).unwrap(), before);
    ok(&["compare", &m[0], &m[1], "-o", s(&out), "--overwrite", "-q"]);
    assert_ne!(std::fs::read(out.join("compare.json")).unwrap(), before);
    let err = fails(&["compare", &m[0]]);
    assert!(err.contains("two models, or one model and a base"), "{err}");
}

#[test]
fn a_sweep_writes_one_output_per_point_each_with_its_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    synth_sd1(d, 2, &[]);
    let base = d.join("base.safetensors");
    let (m0, m1) = (d.join("m000.safetensors"), d.join("m001.safetensors"));
    std::fs::create_dir(d.join("out")).unwrap();
    let template = d.join("out/ta_l{lambda}.safetensors");
    let text = ok(&[
        "merge",
        "--method",
        "task_arithmetic",
        "--base",
        s(&base),
        s(&m0),
        s(&m1),
        "--sweep",
        "lambda=0.5,1.5",
        "-o",
        s(&template),
        "--compare",
    ]);
    assert!(text.contains("2 outputs from one read"), "{text}");
    assert!(text.contains("L2 to base"), "{text}");
    for v in ["0.5", "1.5"] {
        let out = d.join(format!("out/ta_l{v}.safetensors"));
        let meta = ok(&["inspect", "--metadata", "--no-hash", s(&out)]);
        assert!(meta.contains(&format!("\"lambda\" = {v}")), "{meta}");
        // The same merge alone gives the same bytes.
        let alone = d.join(format!("alone_{v}.safetensors"));
        ok(&[
            "merge",
            "--method",
            "task_arithmetic",
            "--base",
            s(&base),
            s(&m0),
            s(&m1),
            "--param",
            &format!("lambda={v}"),
            "-o",
            s(&alone),
            "-q",
        ]);
        assert!(std::fs::read(&out).unwrap() == std::fs::read(&alone).unwrap());
    }
    let table: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("out/sweep.json")).unwrap()).unwrap();
    assert_eq!(table["rows"].as_array().unwrap().len(), 2);
    assert_eq!(table["rows"][1]["values"][0][1], "1.5");
    assert!(table["rows"][1]["dist_base"].as_f64().unwrap() > 0.0);
    // The table is not replaced without --force; names two points share are refused.
    let sweep = |values: &str, out: &std::path::Path| {
        fails(&[
            "merge",
            "--method",
            "task_arithmetic",
            "--base",
            s(&base),
            s(&m0),
            s(&m1),
            "--sweep",
            values,
            "-o",
            s(out),
        ])
    };
    let again = sweep("lambda=0.7", &template);
    assert!(again.contains("sweep.json"), "{again}");
    let same = sweep("lambda=0.7,0.8", &d.join("one.safetensors"));
    assert!(same.contains("would both write"), "{same}");
    let unknown = sweep("p=0.7,0.8", &d.join("p{p}.safetensors"));
    assert!(
        unknown.contains("no node of the recipe has a parameter `p`"),
        "{unknown}"
    );
}
