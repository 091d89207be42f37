//! LoRA extraction: a LoRA extracted at rank R and baked back into the base (amalgam's own LoRA
//! baking, by the kohya module names) gives the fine-tune's best rank-≤R approximation of each
//! module's delta: rank ≤ R, and the energy the report says it kept (Eckart–Young).

mod common;
use amalgam::io::dtype::OutputDtype;
use amalgam::io::input::ModelFile;
use amalgam::layout::arch::Layout;
use amalgam::lora::extract::{extract_lora, rank_for, ExtractOptions, RankRule};
use amalgam::method::ParamValue;
use amalgam::{merge, Graph, MergeOptions, NoProgress};
use common::*;
use std::collections::BTreeMap;
use std::path::Path;

fn options(dir: &Path, pool: &[std::path::PathBuf], rank: usize, rule: RankRule) -> ExtractOptions {
    ExtractOptions {
        rule,
        dtype: OutputDtype::F32,
        overwrite: true,
        ..ExtractOptions::new(&pool[1], &pool[0], dir.join("lora.safetensors"), rank)
    }
}

fn singular_values(a: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    faer::MatRef::from_row_major_slice(a, rows, cols)
        .singular_values()
        .unwrap()
}

fn f64s(path: &Path, key: &str) -> Vec<f64> {
    read_f32(path, key).into_iter().map(f64::from).collect()
}

#[test]
fn extracted_then_baked_is_the_best_low_rank_delta() {
    for (layout, shrink) in [(Layout::Sd1Ldm, 16), (Layout::SdxlSgm, 32)] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let pool = f32_pool(d, layout, 1, shrink);
        let rank = 3;
        let report = extract_lora(&options(d, &pool, rank, RankRule::Fixed), &NoProgress).unwrap();
        assert!(report.modules.len() > 50, "{report}");
        // Bake it: base + 1.0 · LoRA.
        let mut params = BTreeMap::new();
        params.insert("alpha".to_string(), ParamValue::Number(1.0));
        let g = Graph::single(
            "add",
            None,
            vec![pool[0].clone(), report.output.clone()],
            params,
        )
        .unwrap();
        let out = d.join("baked.safetensors");
        let mut o = MergeOptions::new(&out);
        o.output_dtype = OutputDtype::F32;
        o.compute_dtype = amalgam::real::ComputeDtype::F64;
        let merged = merge(&g, &o, &NoProgress).unwrap();
        let notes = merged.notes.join("\n");
        assert!(
            !notes.contains("left out"),
            "every module is known: {notes}"
        );
        let shapes = ModelFile::open(&pool[0]).unwrap();
        let mut fused = 0;
        for m in &report.modules {
            let key = &m.key;
            let (base, tuned, baked) = (f64s(&pool[0], key), f64s(&pool[1], key), f64s(&out, key));
            let (rows, cols) = m.shape;
            let parts = shapes.tensors()[key].shape[0] / rows;
            fused += usize::from(parts > 1);
            // The module's part of the key (CLIP-G's fused q/k/v are three modules).
            let part = m.part.0;
            let at = part * rows * cols..(part + 1) * rows * cols;
            let delta: Vec<f64> = baked[at.clone()]
                .iter()
                .zip(&base[at.clone()])
                .map(|(b, a)| b - a)
                .collect();
            let full: Vec<f64> = tuned[at.clone()]
                .iter()
                .zip(&base[at.clone()])
                .map(|(t, a)| t - a)
                .collect();
            let sigma = singular_values(&delta, rows, cols);
            let top = sigma[0];
            assert!(m.rank <= rank);
            for s in &sigma[m.rank..] {
                assert!(
                    *s <= 1e-5 * top,
                    "{}: rank > {}: {sigma:?}",
                    m.module,
                    m.rank
                );
            }
            // What is left is the energy the report says was not kept.
            let total: f64 = full.iter().map(|x| x * x).sum();
            let left: f64 = full
                .iter()
                .zip(&delta)
                .map(|(f, x)| (f - x) * (f - x))
                .sum();
            let want = 1.0 - m.energy;
            assert!(
                (left / total - want).abs() <= 1e-4 * want.max(1e-3),
                "{}: residual {} vs {want}",
                m.module,
                left / total
            );
        }
        if layout == Layout::SdxlSgm {
            assert!(fused > 0, "CLIP-G's q/k/v modules");
        }
        // Keys without a module are the base's (a LoRA cannot carry them).
        let bias = report
            .not_carried
            .iter()
            .find(|k| k.ends_with(".bias"))
            .unwrap();
        assert_eq!(read_f32(&out, bias), read_f32(&pool[0], bias));
    }
}

#[test]
fn rank_rules() {
    let sigma = [4.0, 2.0, 1.0, 1.0];
    // Energies 16, 4, 1, 1 of 22.
    assert_eq!(rank_for(&sigma, 8, RankRule::Fixed), 4);
    assert_eq!(rank_for(&sigma, 2, RankRule::Fixed), 2);
    assert_eq!(rank_for(&sigma, 8, RankRule::Energy(0.7)), 1);
    assert_eq!(rank_for(&sigma, 8, RankRule::Energy(0.8)), 2);
    assert_eq!(rank_for(&sigma, 1, RankRule::Energy(0.8)), 1);
    assert_eq!(rank_for(&sigma, 8, RankRule::Ratio(0.5)), 2);
    assert_eq!(rank_for(&sigma, 8, RankRule::Ratio(0.01)), 1);
}

#[test]
fn refuses_its_inputs_as_output_and_other_architectures() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pool = f32_pool(d, Layout::Sd1Ldm, 1, 32);
    let mut o = options(d, &pool, 2, RankRule::Fixed);
    o.output = pool[1].clone();
    let e = extract_lora(&o, &NoProgress).unwrap_err().to_string();
    assert!(e.contains("m000.safetensors"), "{e}");
    let other = tempfile::tempdir().unwrap();
    let flux = f32_pool(other.path(), Layout::Flux, 1, 64);
    // A base of another architecture.
    let third = tempfile::tempdir().unwrap();
    let sdxl = f32_pool(third.path(), Layout::SdxlSgm, 0, 64).remove(0);
    let mut o = options(d, &pool, 2, RankRule::Fixed);
    o.base = sdxl;
    let e = extract_lora(&o, &NoProgress).unwrap_err().to_string();
    assert!(
        e.contains("`sd1-ldm` but its base") && e.contains("`sdxl-sgm`"),
        "{e}"
    );
    let e = extract_lora(&options(d, &flux, 2, RankRule::Fixed), &NoProgress)
        .unwrap_err()
        .to_string();
    assert!(e.contains("SD1 (ldm) or SDXL (sgm)"), "{e}");
}
