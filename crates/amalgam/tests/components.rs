//! Per-component recipes (methods, model subsets, a VAE from the base) and pruned-model repair,
//! on synthetic SDXL-layout files.

mod common;
use amalgam::io::dtype::OutputDtype;
use amalgam::io::input::ModelFile;
use amalgam::layout::arch::Layout;
use amalgam::synth::{synthesize, SynthOptions};
use amalgam::{merge, recipe, MergeOptions, NoProgress};
use common::*;
use std::path::Path;

/// base + m000 (without its VAE), m001, m002, in f32.
fn pool(dir: &Path) {
    let mut o = SynthOptions::new(Layout::SdxlSgm, 3);
    o.shrink = 64;
    o.dtype = OutputDtype::F32;
    o.prune_vae = 1;
    synthesize(dir, &o).unwrap();
}

fn run_recipe(dir: &Path, text: &str, out: &str) -> amalgam::MergeReport {
    let path = dir.join(format!("{out}.toml"));
    std::fs::write(&path, text).unwrap();
    let r = recipe::load(&path).unwrap();
    let mut o = MergeOptions::new(dir.join(format!("{out}.safetensors")));
    o.output_dtype = OutputDtype::F32;
    merge(&r.graph, &o, &NoProgress).unwrap()
}

/// One key of every component: (component, key).
fn sample_keys(dir: &Path) -> Vec<(&'static str, String)> {
    let m = ModelFile::open(dir.join("base.safetensors")).unwrap();
    ["diffuser", "clip_l", "clip_g", "vae"]
        .into_iter()
        .map(|c| {
            let key = m
                .tensors()
                .keys()
                .find(|k| Layout::SdxlSgm.component_of(k) == Some(c))
                .unwrap()
                .clone();
            (c, key)
        })
        .collect()
}

const RECIPE: &str = r#"
[models]
base = "base.safetensors"
pool = "m*.safetensors"
te_pool = ["m001.safetensors", "m002.safetensors"]

[nodes.unet]
method = "soup"
models = ["pool"]

# The text encoders merge only m001 and m002, with another method.
[nodes.te]
method = "task_arithmetic"
base = "base"
models = ["te_pool"]
lambda = 0.5

[output]
node = "unet"

[output.components]
vae = "base"
clip_l = "te"
clip_g = "te"
"#;

#[test]
fn each_component_gets_its_own_method_models_or_source() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pool(d);
    let report = run_recipe(d, RECIPE, "out");
    assert_eq!(report.architecture.as_deref(), Some("sdxl-sgm"));
    let out = d.join("out.safetensors");
    let read = |file: &str, key: &str| read_f32(&d.join(file), key);
    for (component, key) in sample_keys(d) {
        let got = read_f32(&out, &key);
        let base = read("base.safetensors", &key);
        let m: Vec<Vec<f32>> = (0..3)
            .map(|i| {
                let p = d.join(format!("m00{i}.safetensors"));
                if ModelFile::open(&p).unwrap().tensors().contains_key(&key) {
                    read_f32(&p, &key)
                } else {
                    Vec::new()
                }
            })
            .collect();
        match component {
            "vae" => assert_eq!(got, base, "{key}: the base's VAE, bit for bit"),
            "diffuser" => {
                for i in 0..got.len() {
                    let mut mean = m[0][i];
                    mean += (m[1][i] - mean) / 2.0;
                    mean += (m[2][i] - mean) * (1.0 / 3.0);
                    assert_eq!(got[i], mean, "{key}[{i}]: soup of the three");
                }
            }
            _ => {
                for i in 0..got.len() {
                    let want = base[i] + 0.5 * ((m[1][i] - base[i]) + (m[2][i] - base[i]));
                    assert!(
                        (got[i] - want).abs() <= 1e-6 * want.abs().max(1e-3),
                        "{key}[{i}]: {} vs {want}",
                        got[i]
                    );
                    // m000 is not part of this component's merge.
                    let with_m0 = base[i]
                        + 0.5 * ((m[0][i] - base[i]) + (m[1][i] - base[i]) + (m[2][i] - base[i]));
                    assert!(got[i] != with_m0 || m[0][i] == base[i]);
                }
            }
        }
    }
}

#[test]
fn pruned_models_are_completed_from_the_base_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pool(d);
    let soup = |repair: &str| {
        format!(
            "[models]\nbase = \"base.safetensors\"\npool = \"m*.safetensors\"\n\n[nodes.s]\nmethod = \"soup\"\nmodels = [\"pool\"]\n\n[output]\nnode = \"s\"\n{repair}"
        )
    };
    let plain = run_recipe(d, &soup(""), "plain");
    let repaired = run_recipe(d, &soup("repair = \"base\"\n"), "repaired");
    let vae_keys = plain.lacking[1].len();
    assert_eq!(vae_keys, 248, "m000 lacks the VAE");
    assert_eq!(plain.repaired[1], 0);
    assert_eq!(repaired.repaired[1], 248);
    let text = repaired.to_string();
    assert!(
        text.contains("lacks 248 keys") && text.contains("repaired: 248 completed from base"),
        "{text}"
    );
    let (_, vae) = sample_keys(d)
        .into_iter()
        .find(|(c, _)| *c == "vae")
        .unwrap();
    let base = read_f32(&d.join("base.safetensors"), &vae);
    let m1 = read_f32(&d.join("m001.safetensors"), &vae);
    let m2 = read_f32(&d.join("m002.safetensors"), &vae);
    let got_plain = read_f32(&d.join("plain.safetensors"), &vae);
    let got_repaired = read_f32(&d.join("repaired.safetensors"), &vae);
    for i in 0..base.len() {
        // Without repair m000 is left out of its VAE keys; with repair it counts as the base.
        let mut two = m1[i];
        two += (m2[i] - two) / 2.0;
        assert_eq!(got_plain[i], two);
        let mut three = base[i];
        three += (m1[i] - three) / 2.0;
        three += (m2[i] - three) * (1.0 / 3.0);
        assert_eq!(got_repaired[i], three);
    }
}

#[test]
fn unknown_components_are_an_error_naming_the_known_ones() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pool(d);
    let text = RECIPE.replace("vae = \"base\"", "unet = \"base\"");
    let path = d.join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let r = recipe::load(&path).unwrap();
    let err = merge(
        &r.graph,
        &MergeOptions::new(d.join("x.safetensors")),
        &NoProgress,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("component `unet` is not a component of sdxl-sgm")
            && err.contains("diffuser")
            && err.contains("vae"),
        "{err}"
    );
    assert!(!d.join("x.safetensors").exists());
}
