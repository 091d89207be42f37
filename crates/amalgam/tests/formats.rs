//! Checkpoints saved in kohya / diffusers key names merge as the original (ldm/sgm) layout.

mod common;
use amalgam::io::dtype::OutputDtype;
use amalgam::io::input::ModelFile;
use amalgam::layout::arch::Layout;
use amalgam::layout::formats::{to_canonical, Source};
use amalgam::synth::{synthesize, SynthOptions};
use amalgam::{merge, Graph, MergeOptions, NoProgress};
use common::*;
use std::path::{Path, PathBuf};

/// Writes the twin of the original-layout file `orig` in the key names of `kohya`: q/k/v split,
/// projections transposed, 1×1 convolutions as linear layers, everything renamed.
fn kohya_twin(orig: &Path, kohya: Layout, out: &Path) -> PathBuf {
    let m = ModelFile::open(orig).unwrap();
    let all = all_tensors(orig);
    let read = |k: &str| -> Vec<f32> {
        all[k]
            .1
            .chunks(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    };
    let names: Vec<&str> = kohya.keys().iter().map(|k| k.key.as_str()).collect();
    let map = to_canonical(kohya, &names);
    let mut tensors = Vec::new();
    let mut covered = std::collections::HashSet::new();
    for (canon, src) in &map {
        let Some(e) = m.tensors().get(canon) else {
            continue;
        };
        covered.insert(canon.clone());
        let v = read(canon);
        match src {
            Source::Rename(k) => {
                // The kohya layout's number of dimensions (1×1 convolutions are linear there).
                let ndim = kohya.get(k).unwrap().shape.len();
                let mut shape = e.shape.clone();
                while shape.len() > ndim && shape.last() == Some(&1) {
                    shape.pop();
                }
                tensors.push(f32t(k, &shape, &v));
            }
            Source::Concat(ks) => {
                let part = v.len() / 3;
                let mut shape = e.shape.clone();
                shape[0] /= 3;
                for (i, k) in ks.iter().enumerate() {
                    tensors.push(f32t(k, &shape, &v[i * part..(i + 1) * part]));
                }
            }
            Source::Transpose(k) => {
                let (r, c) = (e.shape[0], e.shape[1]);
                let mut t = vec![0.0; v.len()];
                for i in 0..r {
                    for j in 0..c {
                        t[j * r + i] = v[i * c + j];
                    }
                }
                tensors.push(f32t(k, &[c, r], &t));
            }
        }
    }
    for (k, e) in m.tensors() {
        if !covered.contains(k) && e.float_dtype().is_some() {
            tensors.push(f32t(k, &e.shape, &read(k)));
        }
    }
    write_file(out, &tensors, true)
}

fn original(dir: &Path, layout: Layout) -> PathBuf {
    let mut o = SynthOptions::new(layout, 1);
    o.shrink = 32;
    o.dtype = OutputDtype::F32;
    o.base = false;
    synthesize(dir, &o).unwrap().remove(0)
}

fn merge_to(
    out: &Path,
    method: &str,
    models: Vec<PathBuf>,
    alpha: Option<f64>,
) -> amalgam::MergeReport {
    merge_as(out, method, models, alpha, None)
}

fn merge_as(
    out: &Path,
    method: &str,
    models: Vec<PathBuf>,
    alpha: Option<f64>,
    layout: Option<Layout>,
) -> amalgam::MergeReport {
    let mut params = std::collections::BTreeMap::new();
    if let Some(a) = alpha {
        params.insert("alpha".to_string(), amalgam::method::ParamValue::Number(a));
    }
    let g = Graph::single(method, None, models, params).unwrap();
    let mut o = MergeOptions::new(out);
    o.output_dtype = OutputDtype::F32;
    o.output_layout = layout;
    merge(&g, &o, &NoProgress).unwrap()
}

/// Every tensor of a file: name → (shape, raw bytes).
fn all_tensors(p: &Path) -> std::collections::BTreeMap<String, (Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| (k, (v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

fn assert_same_tensors(a: &Path, b: &Path) {
    let (ta, tb) = (all_tensors(a), all_tensors(b));
    assert_eq!(
        ta.keys().collect::<Vec<_>>(),
        tb.keys().collect::<Vec<_>>(),
        "the same keys"
    );
    for (k, v) in &ta {
        assert!(v == &tb[k], "{k}: shape or bytes differ");
    }
}

#[test]
fn kohya_files_read_back_as_the_original_layout_losslessly() {
    for (orig_layout, kohya) in [
        (Layout::SdxlSgm, Layout::SdxlKohya),
        (Layout::Sd1Ldm, Layout::Sd1Kohya),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let orig = original(d, orig_layout);
        let twin = kohya_twin(&orig, kohya, &d.join("twin.safetensors"));
        let twin_keys = ModelFile::open(&twin).unwrap();
        assert!(
            twin_keys.tensors().keys().any(|k| k.starts_with("te")),
            "{kohya}: renamed"
        );
        // A soup of one model is that model: read through the kohya names, written in the
        // original ones, every tensor is bit for bit the original.
        let out = d.join("out.safetensors");
        let report = merge_to(&out, "soup", vec![twin.clone()], None);
        assert_eq!(report.layouts[0].as_deref(), Some(kohya.name()));
        assert_eq!(report.architecture.as_deref(), Some(orig_layout.name()));
        let float_only = d.join("orig_float.safetensors");
        merge_to(&float_only, "soup", vec![orig.clone()], None);
        assert_same_tensors(&out, &float_only);
        // Mixed with the original-layout file, key by key: (1 − α)x + αx = x.
        let mixed = d.join("mixed.safetensors");
        let r = merge_to(&mixed, "weighted_sum", vec![orig.clone(), twin], Some(0.5));
        assert!(
            r.lacking.iter().all(|l| l.is_empty()),
            "{kohya}: both have every key"
        );
        assert_same_tensors(&mixed, &float_only);
    }
}

#[test]
fn kohya_to_original_to_kohya_round_trip_is_lossless() {
    for (orig_layout, kohya) in [
        (Layout::SdxlSgm, Layout::SdxlKohya),
        (Layout::Sd1Ldm, Layout::Sd1Kohya),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let orig = original(d, orig_layout);
        let twin = kohya_twin(&orig, kohya, &d.join("twin.safetensors"));
        // Read as the original layout, merged, written back in kohya names: the same file
        // content, tensor for tensor (q/k/v split again, the projection transposed back).
        let back = d.join("back.safetensors");
        merge_as(&back, "soup", vec![twin.clone()], None, Some(kohya));
        assert_same_tensors(&back, &twin);
        // And the original written as kohya is the twin too.
        let converted = d.join("converted.safetensors");
        merge_as(&converted, "soup", vec![orig.clone()], None, Some(kohya));
        assert_same_tensors(&converted, &twin);
    }
    // Another architecture's layout is refused before anything is written.
    let dir = tempfile::tempdir().unwrap();
    let orig = original(dir.path(), Layout::Sd1Ldm);
    let g = Graph::single("soup", None, vec![orig], Default::default()).unwrap();
    let mut o = MergeOptions::new(dir.path().join("x.safetensors"));
    o.output_layout = Some(Layout::SdxlKohya);
    let e = merge(&g, &o, &NoProgress).unwrap_err().to_string();
    assert!(
        e.contains("cannot write the output as sdxl-kohya: the merge is sd1-ldm"),
        "{e}"
    );
    assert!(!dir.path().join("x.safetensors").exists());
}
