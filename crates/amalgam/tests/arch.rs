//! Architecture detection, components and the AutoV2 hash, on synthetic files built from every
//! embedded layout.

mod common;
use amalgam::io::input::ModelFile;
use amalgam::layout::arch::{autov2_hash, detect, Detection, Layout};
use amalgam::synth::{synthesize, SynthOptions};
use common::*;
use std::path::Path;

fn detect_file(p: &Path) -> Detection {
    let m = ModelFile::open(p).unwrap();
    detect(
        m.tensors()
            .iter()
            .map(|(k, t)| (k.as_str(), t.shape.as_slice(), t.numel())),
    )
}

fn synth_one(dir: &Path, layout: Layout, prune_vae: bool) -> std::path::PathBuf {
    let dir = dir.join(layout.name());
    let mut o = SynthOptions::new(layout, 1);
    o.shrink = 64;
    o.base = false;
    o.prune_vae = usize::from(prune_vae);
    o.int_keys = true;
    synthesize(&dir, &o).unwrap().remove(0)
}

#[test]
fn every_layout_is_detected_with_its_components() {
    for layout in Layout::ALL {
        let dir = tempfile::tempdir().unwrap();
        let p = synth_one(dir.path(), layout, false);
        let d = detect_file(&p);
        assert_eq!(d.layout, Some(layout), "{layout}");
        assert!(
            d.extra.is_empty(),
            "{layout}: {:?}",
            &d.extra[..3.min(d.extra.len())]
        );
        for c in &d.components {
            if c.name != "scheduler" && c.name != "ema" {
                assert!(c.missing.is_empty(), "{layout} {}: {:?}", c.name, c.missing);
                assert!(c.present > 0 && c.parameters > 0, "{layout} {}", c.name);
            }
        }
        // The components each architecture is known by.
        let names: Vec<&str> = d.components.iter().map(|c| c.name.as_str()).collect();
        let want: &[&str] = match layout.arch() {
            amalgam::layout::arch::Arch::Sd1 => &["diffuser"],
            amalgam::layout::arch::Arch::Sdxl => &["diffuser"],
            amalgam::layout::arch::Arch::Sd3 => &["diffuser", "clip_l", "clip_g", "t5xxl", "vae"],
            amalgam::layout::arch::Arch::Flux => &["diffuser", "clip_l", "t5xxl", "vae"],
        };
        for w in want {
            assert!(names.contains(w), "{layout}: {names:?}");
        }
    }
    // The full SD layouts have their text encoders and VAE.
    let c = Layout::SdxlSgm.components();
    for w in ["clip_l", "clip_g", "vae", "diffuser"] {
        assert!(c.contains(&w), "{c:?}");
    }
    let c = Layout::Sd1Kohya.components();
    for w in ["clip_l", "vae", "diffuser"] {
        assert!(c.contains(&w), "{c:?}");
    }
}

#[test]
fn a_pruned_model_lacks_its_vae() {
    let dir = tempfile::tempdir().unwrap();
    let p = synth_one(dir.path(), Layout::SdxlSgm, true);
    let d = detect_file(&p);
    assert_eq!(d.layout, Some(Layout::SdxlSgm));
    let vae = d.component("vae").unwrap();
    assert!(vae.is_absent());
    assert_eq!(vae.missing.len(), vae.required);
    assert!(vae
        .missing
        .iter()
        .all(|k| k.starts_with("first_stage_model.")));
    assert!(!d.component("diffuser").unwrap().is_absent());
}

#[test]
fn renamed_and_foreign_keys() {
    let dir = tempfile::tempdir().unwrap();
    // An SD1 checkpoint with a few extra keys is still SD1; the extra keys are listed.
    let p = synth_one(dir.path(), Layout::Sd1Ldm, false);
    let m = ModelFile::open(&p).unwrap();
    let mut keys: Vec<(String, Vec<usize>, usize)> = m
        .tensors()
        .iter()
        .map(|(k, t)| (k.clone(), t.shape.clone(), t.numel()))
        .collect();
    keys.push(("my_extra.weight".into(), vec![4], 4));
    let d = detect(keys.iter().map(|(k, s, n)| (k.as_str(), s.as_slice(), *n)));
    assert_eq!(d.layout, Some(Layout::Sd1Ldm));
    assert_eq!(d.extra, vec!["my_extra.weight".to_string()]);
    // With every key renamed, nothing matches: unknown, and every key is extra.
    let renamed: Vec<(String, Vec<usize>, usize)> = keys
        .iter()
        .map(|(k, s, n)| (format!("model.{k}"), s.clone(), *n))
        .collect();
    let d = detect(
        renamed
            .iter()
            .map(|(k, s, n)| (k.as_str(), s.as_slice(), *n)),
    );
    assert_eq!(d.layout, None);
    assert_eq!(d.extra.len(), renamed.len());
    // A language model: unknown.
    let llm = write_file(
        &dir.path().join("llm.safetensors"),
        &[
            f32t(
                "model.layers.0.self_attn.q_proj.weight",
                &[4, 4],
                &[0.0; 16],
            ),
            f32t("model.embed_tokens.weight", &[8, 4], &[0.0; 32]),
        ],
        true,
    );
    assert_eq!(detect_file(&llm).layout, None);
    // The diffusers UNet alone is told apart from the full kohya file.
    let p = synth_one(dir.path(), Layout::Sd1DiffusersUnet, false);
    assert_eq!(detect_file(&p).layout, Some(Layout::Sd1DiffusersUnet));
}

#[test]
fn autov2_is_the_start_of_the_sha256_of_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("abc.bin");
    std::fs::write(&p, b"abc").unwrap();
    // SHA-256("abc") = ba7816bf8f01cfea... (FIPS 180-2 test vector).
    assert_eq!(autov2_hash(&p).unwrap(), "ba7816bf8f");
}
