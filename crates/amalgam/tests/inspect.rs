//! `amalgam::inspect` on real safetensors files written here: hashes against SHA-256 computed
//! over the file's bytes, the toolkit-style report (EMA, junk and unknown keys, CLIP
//! `position_ids`, bytes wasted on precision, `modelspec.*`).

mod common;
use common::*;

use amalgam::inspect::{inspect, InspectOptions, WrongPosition};
use amalgam::layout::arch::Layout;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

const SD1_POS: &str = "cond_stage_model.transformer.text_model.embeddings.position_ids";
const SDXL_POS: &str = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids";

fn hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// Writes `tensors` with `metadata` in the header's `__metadata__`, header padded to 8 bytes.
fn write_with_metadata(path: &Path, tensors: &[T], metadata: &[(&str, &str)]) -> PathBuf {
    let (header, data) = encode(tensors);
    let meta: Vec<String> = metadata
        .iter()
        .map(|(k, v)| format!("{k:?}:{v:?}"))
        .collect();
    let mut header = format!("{{\"__metadata__\":{{{}}},{}", meta.join(","), &header[1..]);
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    write_raw(path, header.as_bytes(), &data)
}

/// Every required key of `layout`, as 2-element F16 tensors (a shrunk model of that layout).
fn required_keys(layout: Layout) -> Vec<T> {
    layout
        .keys()
        .iter()
        .filter(|k| !k.optional)
        .map(|k| f16t(&k.key, &[2], &[0.5, -0.25]))
        .collect()
}

fn i64t(name: &str, v: &[i64]) -> T {
    raw(
        name,
        "I64",
        &[1, v.len()],
        v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    )
}

fn ids(n: usize) -> Vec<i64> {
    (0..n as i64).collect()
}

#[test]
fn hashes_match_sha256_of_the_bytes_and_autov3_ignores_metadata() {
    let dir = tempfile::tempdir().unwrap();
    // 1.2 MiB of tensor data: the legacy hash's 64 KiB at 1 MiB are all there.
    let big: Vec<f32> = (0..640 * 1024).map(|i| (i % 977) as f32 / 977.0).collect();
    let t = || {
        [
            f16t("w", &[big.len()], &big),
            f32t("b", &[3], &[1.0, 2.0, 3.0]),
        ]
    };
    let a = write_with_metadata(&dir.path().join("a.safetensors"), &t(), &[("x", "1")]);
    let b = write_with_metadata(
        &dir.path().join("b.safetensors"),
        &t(),
        &[
            ("x", "a longer value, so the header changes size"),
            ("y", "2"),
        ],
    );
    let mut autov3 = Vec::new();
    for p in [&a, &b] {
        let bytes = std::fs::read(p).unwrap();
        assert!(bytes.len() > 0x110000);
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let h = inspect(p, InspectOptions { hashes: true })
            .unwrap()
            .hashes
            .unwrap();
        let whole = hex(&bytes);
        let data = hex(&bytes[8 + n..]);
        assert_eq!(h.sha256, whole);
        assert_eq!(h.autov2, whole[..10]);
        assert_eq!(h.autov3_sha256, data);
        assert_eq!(h.autov3, data[..12]);
        assert_eq!(
            h.legacy.as_deref(),
            Some(&hex(&bytes[0x100000..0x110000])[..8])
        );
        autov3.push(h);
    }
    // Only the metadata differs: AutoV3 is the same, the whole-file hashes are not.
    assert_eq!(autov3[0].autov3_sha256, autov3[1].autov3_sha256);
    assert_ne!(autov3[0].sha256, autov3[1].sha256);
    assert_ne!(autov3[0].legacy, autov3[1].legacy);

    // A file ending within the legacy window hashes what there is (as webui reads it).
    let mid: Vec<f32> = vec![0.25; 0x100000 / 2 + 100];
    let p = write_file(
        &dir.path().join("mid.safetensors"),
        &[f16t("w", &[mid.len()], &mid)],
        true,
    );
    let bytes = std::fs::read(&p).unwrap();
    assert!(bytes.len() > 0x100000 && bytes.len() < 0x110000);
    let h = inspect(&p, InspectOptions { hashes: true }).unwrap().hashes;
    assert_eq!(
        h.unwrap().legacy.as_deref(),
        Some(&hex(&bytes[0x100000..])[..8])
    );

    // Too small for the legacy hash: no legacy hash, the others as usual.
    let p = write_file(
        &dir.path().join("small.safetensors"),
        &[f32t("b", &[3], &[1.0, 2.0, 3.0])],
        true,
    );
    let h = inspect(&p, InspectOptions { hashes: true })
        .unwrap()
        .hashes
        .unwrap();
    assert_eq!(h.legacy, None);
    assert_eq!(h.sha256, hex(&std::fs::read(&p).unwrap()));
    // Without hashes, none are computed.
    let i = inspect(&p, InspectOptions { hashes: false }).unwrap();
    assert!(i.hashes.is_none());
    assert_eq!(
        (i.tensors, i.parameters, i.size),
        (1, 3, i.header_bytes + 12)
    );
}

#[test]
fn position_ids_float_dtype_and_wrong_values_are_reported_with_their_index() {
    let dir = tempfile::tempdir().unwrap();
    // SD1 with float position ids (values right): a dtype problem only.
    let mut t = required_keys(Layout::Sd1Ldm);
    let v: Vec<f32> = (0..77).map(|i| i as f32).collect();
    t.push(f32t(SD1_POS, &[1, 77], &v));
    let p = write_file(&dir.path().join("f32.safetensors"), &t, true);
    let i = inspect(&p, InspectOptions { hashes: false }).unwrap();
    assert_eq!(i.detection.layout, Some(Layout::Sd1Ldm));
    let [pos] = i.report.position_ids.as_slice() else {
        panic!("{:?}", i.report.position_ids)
    };
    assert_eq!((pos.key.as_str(), pos.dtype.as_str()), (SD1_POS, "F32"));
    assert!(!pos.dtype_ok && pos.wrong.is_empty() && !pos.is_ok());
    assert!(!i.report.is_clean());

    // SD1 with int64 ids, one off by rounding (a float merge truncated 40 to 39).
    let mut t = required_keys(Layout::Sd1Ldm);
    let mut v = ids(77);
    v[40] = 39;
    t.push(i64t(SD1_POS, &v));
    let p = write_file(&dir.path().join("off.safetensors"), &t, true);
    let r = inspect(&p, InspectOptions { hashes: false })
        .unwrap()
        .report;
    assert!(r.position_ids[0].dtype_ok);
    assert_eq!(
        r.position_ids[0].wrong,
        vec![WrongPosition {
            index: 40,
            value: 39.0
        }]
    );

    // F16 ids with values off by a fraction: every wrong index is named.
    let mut t = required_keys(Layout::Sd1Ldm);
    let mut v: Vec<f32> = (0..77).map(|i| i as f32).collect();
    v[3] = 2.5;
    v[70] = 70.5;
    t.push(f16t(SD1_POS, &[1, 77], &v));
    let p = write_file(&dir.path().join("f16.safetensors"), &t, true);
    let r = inspect(&p, InspectOptions { hashes: false })
        .unwrap()
        .report;
    let idx: Vec<usize> = r.position_ids[0].wrong.iter().map(|w| w.index).collect();
    assert_eq!((idx, r.position_ids[0].dtype_ok), (vec![3, 70], false));

    // SDXL: the CLIP-L ids are checked (the OpenCLIP encoder has none); correct ones are clean.
    let mut t = required_keys(Layout::SdxlSgm);
    t.push(i64t(SDXL_POS, &ids(77)));
    let p = write_file(&dir.path().join("xl.safetensors"), &t, true);
    let i = inspect(&p, InspectOptions { hashes: false }).unwrap();
    assert_eq!(i.detection.layout, Some(Layout::SdxlSgm));
    assert_eq!(i.report.position_ids.len(), 1);
    assert_eq!(i.report.position_ids[0].key, SDXL_POS);
    assert!(i.report.position_ids[0].is_ok());
    assert!(i.report.is_clean(), "{:?}", i.report);
}

#[test]
fn ema_junk_unknown_precision_and_modelspec() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = required_keys(Layout::Sd1Ldm);
    t.push(i64t(SD1_POS, &ids(77)));
    // EMA: three F32 weights of 1000 elements (4000 bytes each) and the int32 counter (4 bytes).
    // With the scheduler buffer they hold more parameters (F32) than the model's keys (F16): the
    // main dtype is still the model keys' F16.
    for k in [
        "model_ema.diffusion_modelinput_blocks00bias",
        "model_ema.diffusion_modelout2bias",
        "model_ema.decay",
    ] {
        t.push(f32t(k, &[1000], &[0.1; 1000]));
    }
    t.push(raw("model_ema.num_updates", "I32", &[], vec![0; 4]));
    // Junk: a scheduler buffer (F32, 4000 bytes) and a key no layout has (F16, 6 bytes).
    t.push(f32t("alphas_cumprod", &[1000], &[0.5; 1000]));
    t.push(f16t("some.stray.key", &[3], &[1.0; 3]));
    // Precision: two VAE keys and one CLIP key widened to F32 in an otherwise F16 file.
    let widen = [
        ("first_stage_model.decoder.conv_in.bias", 2),
        ("first_stage_model.decoder.conv_in.weight", 2),
        (
            "cond_stage_model.transformer.text_model.final_layer_norm.weight",
            100,
        ),
    ];
    for (k, n) in widen {
        let i = t.iter().position(|x| x.name == k).expect(k);
        t[i] = f32t(k, &[n], &vec![0.5; n]);
    }
    let meta = [
        ("modelspec.title", "a test"),
        ("modelspec.architecture", "stable-diffusion-v1"),
        ("other", "x"),
    ];
    let p = write_with_metadata(&dir.path().join("m.safetensors"), &t, &meta);
    let i = inspect(&p, InspectOptions { hashes: false }).unwrap();
    assert_eq!(i.detection.layout, Some(Layout::Sd1Ldm));
    let r = &i.report;
    assert_eq!((r.ema.keys, r.ema.bytes), (4, 3 * 4000 + 4));
    assert_eq!((r.junk.keys, r.junk.bytes), (2, 4000 + 6));
    assert_eq!((r.unknown.keys, r.unknown.bytes), (1, 6));
    assert_eq!(r.unknown.examples, vec!["some.stray.key".to_string()]);
    let pr = r.precision.as_ref().expect("precision");
    assert_eq!(pr.main_dtype, "F16");
    // F32 → F16 saves 2 bytes an element: 2 + 2 + 100 elements. EMA and junk are not counted.
    assert_eq!(
        (pr.tensors, pr.bytes, pr.wasted_bytes),
        (3, 4 * 104, 2 * 104)
    );
    assert_eq!(pr.by_component["vae"], (2, 8));
    assert_eq!(pr.by_component["clip_l"], (1, 200));
    assert_eq!(r.modelspec.len(), 2);
    assert_eq!(r.modelspec["modelspec.title"], "a test");
    assert!(r.position_ids[0].is_ok());
    assert!(!r.is_clean());
    assert_eq!(i.metadata.len(), 3);
    assert_eq!(i.dtypes["F32"].tensors, 3 + 3 + 1);

    // An all-F32 file wastes nothing on precision (there is no narrower main dtype).
    let t: Vec<T> = Layout::Sd1Ldm
        .keys()
        .iter()
        .filter(|k| !k.optional)
        .map(|k| f32t(&k.key, &[2], &[0.5, 0.25]))
        .collect();
    let p = write_file(&dir.path().join("f32.safetensors"), &t, true);
    let r = inspect(&p, InspectOptions { hashes: false })
        .unwrap()
        .report;
    assert!(r.precision.is_none() && r.is_clean(), "{r:?}");
}
