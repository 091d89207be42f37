//! Degenerate tensors never panic: every method and preset over zero-element (`[0]`, `[3, 0]`),
//! scalar (`[]`), one-element, 1×n and n×1 tensors, in both compute dtypes, gives an output tensor
//! of the same shape with finite values.
mod common;
use amalgam::io::dtype::OutputDtype;
use amalgam::method::SlotKind;
use amalgam::real::ComputeDtype;
use amalgam::{merge, MergeOptions, NoProgress};
use common::*;
use std::path::{Path, PathBuf};

const SHAPES: &[(&str, &[usize])] = &[
    ("empty", &[0]),
    ("empty_rows", &[3, 0]),
    ("empty_cols", &[0, 4]),
    ("scalar", &[]),
    ("one", &[1]),
    ("row", &[1, 5]),
    ("column", &[5, 1]),
    ("one_by_one", &[1, 1]),
];

/// Model `m`'s tensors: distinct, signed values, so masks, votes and medians have work to do.
fn model(dir: &Path, m: usize) -> PathBuf {
    let tensors: Vec<T> = SHAPES
        .iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|i| ((i * 7 + m * 3) % 5) as f32 * 0.25 - 0.5 + m as f32 * 0.1)
                .collect();
            f32t(name, shape, &v)
        })
        .collect();
    write_file(&dir.join(format!("m{m}.safetensors")), &tensors, true)
}

#[test]
fn every_method_survives_degenerate_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<PathBuf> = (0..4).map(|m| model(dir.path(), m)).collect();
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let mut failures = Vec::new();
    for info in amalgam::methods::ALL {
        // One-model slots take model 0 (the base, where there is one), list slots models 1-3.
        let slots = slots_for(info.name, 1..4);
        for compute in [ComputeDtype::F32, ComputeDtype::F64] {
            let g = one_node(&refs, info.name, slots.clone(), &[]);
            let out = dir
                .path()
                .join(format!("{}-{compute:?}.safetensors", info.name));
            let mut o = MergeOptions::new(&out);
            o.output_dtype = OutputDtype::F32;
            o.compute_dtype = compute;
            let result = std::panic::catch_unwind(|| merge(&g, &o, &NoProgress));
            match result {
                Err(_) => failures.push(format!("{} ({compute:?}) panicked", info.name)),
                Ok(Err(e)) => failures.push(format!("{} ({compute:?}) failed: {e}", info.name)),
                Ok(Ok(_)) => {
                    let f = amalgam::io::input::ModelFile::open(&out).unwrap();
                    for (name, shape) in SHAPES {
                        let t = f.tensor(name).unwrap_or_else(|| panic!("{name} missing"));
                        assert_eq!(&t.shape, shape, "{} {name}", info.name);
                        let v = read_f32(&out, name);
                        if v.iter().any(|x| !x.is_finite()) {
                            failures.push(format!(
                                "{} ({compute:?}) {name}: non-finite {v:?}",
                                info.name
                            ));
                        }
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The same models given to every list slot: a soup-like method of identical models is that
/// model, even for one-element and empty tensors.
#[test]
fn averages_of_identical_degenerate_tensors_are_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let p = model(dir.path(), 1);
    let refs: Vec<&Path> = vec![&p, &p, &p];
    for method in [
        "soup",
        "geometric_median",
        "karcher",
        "model_stock",
        "ties_soup",
    ] {
        let info = amalgam::methods::info(method).unwrap();
        let slots: Vec<Vec<usize>> = info
            .slots
            .iter()
            .map(|s| match s.kind {
                SlotKind::One => vec![0],
                SlotKind::Many => vec![0, 1, 2],
            })
            .collect();
        let g = one_node(&refs, method, slots, &[]);
        let out = dir.path().join(format!("{method}.safetensors"));
        let mut o = MergeOptions::new(&out);
        o.output_dtype = OutputDtype::F32;
        merge(&g, &o, &NoProgress).unwrap_or_else(|e| panic!("{method}: {e}"));
        for (name, _) in SHAPES {
            assert_close(&read_f32(&out, name), &read_f32(&p, name), 1e-6);
        }
    }
}
