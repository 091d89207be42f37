//! The random example recipes (TGMD, DGMLA): amalgam's masks come from another random stream than
//! sd-mecha's, so outputs are compared by statistics: over every key, the fraction of elements
//! changed from the base, the size of the merged delta relative to the mean task vector, and its
//! cosine to it, against sd-mecha 1.1.8's values over four seeds
//! (`tests/fixtures/sd_mecha_random_stats.json`, from `tools/sd_mecha_random_stats.py`).

mod common;
use amalgam::io::dtype::OutputDtype;
use amalgam::layout::arch::Layout;
use amalgam::real::ComputeDtype;
use amalgam::{merge, MergeOptions, NoProgress};
use common::f32_pool;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

fn tensors(p: &Path) -> BTreeMap<String, Vec<f32>> {
    common::all_f32(p)
}

/// (mean changed fraction, median |δ| ratio, mean cosine to the mean task vector) over all keys.
fn aggregates(
    out: &BTreeMap<String, Vec<f32>>,
    base: &BTreeMap<String, Vec<f32>>,
    models: &[BTreeMap<String, Vec<f32>>],
) -> (f64, f64, f64) {
    let (mut changed, mut ratios, mut cos) = (Vec::new(), Vec::new(), Vec::new());
    for (k, o) in out {
        let b = &base[k];
        let n = o.len();
        changed.push(o.iter().zip(b).filter(|(x, y)| x != y).count() as f64 / n as f64);
        let delta: Vec<f64> = o
            .iter()
            .zip(b)
            .map(|(&x, &y)| x as f64 - y as f64)
            .collect();
        let mean: Vec<f64> = (0..n)
            .map(|i| {
                models
                    .iter()
                    .map(|m| m[k][i] as f64 - b[i] as f64)
                    .sum::<f64>()
                    / models.len() as f64
            })
            .collect();
        let abs = |v: &[f64]| v.iter().map(|x| x.abs()).sum::<f64>() / n as f64;
        let (ad, am) = (abs(&delta), abs(&mean));
        if am > 0.0 {
            ratios.push(ad / am);
        }
        let dot: f64 = delta.iter().zip(&mean).map(|(x, y)| x * y).sum();
        let (nd, nm) = (
            delta.iter().map(|x| x * x).sum::<f64>().sqrt(),
            mean.iter().map(|x| x * x).sum::<f64>().sqrt(),
        );
        if nd > 0.0 && nm > 0.0 {
            cos.push(dot / (nd * nm));
        }
    }
    ratios.sort_by(f64::total_cmp);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    (mean(&changed), ratios[ratios.len() / 2], mean(&cos))
}

#[test]
fn random_recipes_agree_with_sd_mecha_in_their_statistics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let f: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("sd_mecha_random_stats.json")).unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    f32_pool(d, Layout::SdxlSgm, 4, 64);
    let base = tensors(&d.join("base.safetensors"));
    let models: Vec<_> = (0..4)
        .map(|i| tensors(&d.join(format!("m00{i}.safetensors"))))
        .collect();
    for r in f["recipes"].as_array().unwrap() {
        let name = r["recipe"].as_str().unwrap();
        std::fs::copy(root.join("mecha").join(name), d.join(name)).unwrap();
        let t = amalgam::recipe::mecha::load(&d.join(name), &[]).unwrap();
        let out = d.join(format!("{name}.safetensors"));
        let mut opts = MergeOptions::new(&out);
        opts.output_dtype = OutputDtype::F32;
        opts.compute_dtype = ComputeDtype::F64;
        opts.seed = t.seed.unwrap();
        merge(&t.graph, &opts, &NoProgress).unwrap();
        let (changed, ratio, cos) = aggregates(&tensors(&out), &base, &models);
        let theirs = &r["aggregate_by_min_numel"]["1"]["across_seeds"];
        for (what, ours, tol) in [
            ("mean_changed_fraction", changed, 0.02f64),
            ("median_abs_ratio", ratio, 0.03),
            ("mean_cos_to_mean_delta", cos, 0.03),
        ] {
            let (m, sd) = (
                theirs[what]["mean"].as_f64().unwrap(),
                theirs[what]["std"].as_f64().unwrap(),
            );
            eprintln!("{name} {what}: amalgam {ours:.4}, sd-mecha {m:.4} ± {sd:.4}");
            assert!(
                (ours - m).abs() <= tol.max(5.0 * sd),
                "{name} {what}: amalgam {ours:.4}, sd-mecha {m:.4} ± {sd:.4} over seeds"
            );
        }
    }
}
