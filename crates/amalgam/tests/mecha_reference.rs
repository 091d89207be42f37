//! Differential test: the deterministic example `.mecha` recipes, run by amalgam, against the
//! outputs sd-mecha 1.1.8 wrote for the same synthetic inputs (`tests/fixtures/sd_mecha_recipes.json`,
//! made offline by `tools/sd_mecha_recipe_outputs.py`; the inputs are regenerated here by
//! `synth` and checked by their SHA-256).

mod common;
use amalgam::io::dtype::OutputDtype;
use amalgam::layout::arch::Layout;
use amalgam::real::ComputeDtype;
use amalgam::synth::{synthesize, SynthOptions};
use amalgam::{merge, MergeOptions, NoProgress};
use serde_json::Value;
use sha2::Digest;
use std::collections::BTreeMap;
use std::path::Path;

fn tensors(p: &Path) -> BTreeMap<String, Vec<f32>> {
    common::all_f32(p)
}

#[test]
fn example_recipes_match_sd_mecha_outputs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let f: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("sd_mecha_recipes.json")).unwrap())
            .unwrap();
    assert_eq!(f["sd_mecha_version"], "1.1.8");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // `amalgam synth --layout sdxl -n 4 --shrink 64 --dtype f32 --seed 0`.
    let mut o = SynthOptions::new(Layout::SdxlSgm, 4);
    o.shrink = 64;
    o.dtype = OutputDtype::F32;
    o.seed = 0;
    synthesize(d, &o).unwrap();
    for (file, hash) in f["inputs_sha256"].as_object().unwrap() {
        let digest = sha2::Sha256::digest(std::fs::read(d.join(file)).unwrap());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(&hex, hash.as_str().unwrap(), "{file}: synth output changed");
    }
    let mut compared = 0;
    for r in f["recipes"].as_array().unwrap() {
        let name = r["recipe"].as_str().unwrap();
        std::fs::copy(root.join("mecha").join(name), d.join(name)).unwrap();
        let t = amalgam::recipe::mecha::load(&d.join(name), &[]).unwrap();
        let out = d.join(format!("{name}.safetensors"));
        let mut opts = MergeOptions::new(&out);
        opts.output_dtype = OutputDtype::F32;
        opts.compute_dtype = ComputeDtype::F64;
        opts.seed = t.seed.unwrap_or(0);
        merge(&t.graph, &opts, &NoProgress).unwrap();
        let ours = tensors(&out);
        assert_eq!(
            ours.len() as u64,
            r["output"]["key_count"].as_u64().unwrap(),
            "{name}"
        );
        for s in r["samples"].as_array().unwrap() {
            let key = s["key"].as_str().unwrap();
            let want: Vec<f32> = s["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| match v {
                    Value::String(x) => x.parse().unwrap(),
                    x => x.as_f64().unwrap() as f32,
                })
                .collect();
            let got = &ours[key];
            assert_eq!(got.len(), want.len(), "{name} {key}");
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    g == w || (g - w).abs() <= 2e-6 * scale,
                    "{name}: {key}[{i}]: amalgam {g}, sd-mecha {w}"
                );
            }
            compared += 1;
        }
    }
    assert_eq!(compared, 6 * 7);
}
