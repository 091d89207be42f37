//! Bad inputs, as real files: float formats that cannot be merged are refused naming file and
//! key, FP8 FNUZ formats are decoded, odd paths are named as what they are, a header naming a
//! tensor twice is refused, offset errors name the tensor, and SD1 and SDXL in one merge are
//! named as different architectures.
mod common;
use amalgam::io::input::ModelFile;
use amalgam::{merge, MergeOptions, NoProgress};
use common::*;
use std::path::Path;

fn soup_error(models: &[&Path], out: &Path) -> String {
    let g = one_node(models, "soup", vec![(0..models.len()).collect()], &[]);
    let e = merge(&g, &MergeOptions::new(out), &NoProgress)
        .expect_err("the merge must fail")
        .to_string();
    assert!(!out.exists(), "nothing is written: {e}");
    e
}

#[test]
fn fp8_fnuz_is_decoded() {
    let dir = tempfile::tempdir().unwrap();
    // 0x40: exponent 8 (E4M3FNUZ, bias 8) or 16 (E5M2FNUZ, bias 16), so 1.0 in both.
    let p = write_file(
        &dir.path().join("fnuz.safetensors"),
        &[
            raw("a", "F8_E4M3FNUZ", &[3], vec![0x40, 0xC4, 0x01]),
            raw("b", "F8_E5M2FNUZ", &[3], vec![0x40, 0xC5, 0x01]),
        ],
        true,
    );
    let a = read_f32(&p, "a");
    // E4M3FNUZ: 0xC4 = sign 1, exponent 1000 (8), mantissa 100: -(1 + 4/8) * 2^0 = -1.5;
    // 0x01 = subnormal 1/8 * 2^(1-8) = 2^-10.
    assert_eq!(a, vec![1.0, -1.5, 2f32.powi(-10)]);
    let b = read_f32(&p, "b");
    // E5M2FNUZ: 0xC5 = sign 1, exponent 10001 (17), mantissa 01: -(1 + 1/4) * 2 = -2.5;
    // 0x01 = subnormal 1/4 * 2^(1-16) = 2^-17.
    assert_eq!(b, vec![1.0, -2.5, 2f32.powi(-17)]);
}

#[test]
fn block_scaled_and_packed_floats_are_refused_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out.safetensors");
    for (dtype, what) in [
        ("F8_E8M0", "block scale"),
        ("F4", "MXFP4"),
        ("F6_E2M3", "MXFP6"),
        ("F6_E3M2", "MXFP6"),
    ] {
        let good = write_file(
            &d.join("good.safetensors"),
            &[f32t("w", &[4], &[1.0, 2.0, 3.0, 4.0])],
            true,
        );
        // Sizes that are valid for each packing (4 elements: 4, 2 or 3 bytes).
        let bytes = match dtype {
            "F4" => 2,
            "F6_E2M3" | "F6_E3M2" => 3,
            _ => 4,
        };
        let bad = write_file(
            &d.join(format!("{dtype}.safetensors")),
            &[
                raw("w", "F32", &[4], vec![0; 16]),
                raw("scales", dtype, &[4], vec![0x7f; bytes]),
            ],
            true,
        );
        let e = soup_error(&[&good, &bad], &out);
        assert!(
            e.contains(&format!("{dtype}.safetensors")) && e.contains("scales") && e.contains(what),
            "{dtype}: {e}"
        );
    }
}

#[test]
fn duplicate_keys_and_bad_offsets_are_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = [0u8; 8];
    let dup = write_raw(
        &d.join("dup.safetensors"),
        br#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
        &data,
    );
    let e = ModelFile::open(&dup).err().unwrap().to_string();
    assert!(
        e.contains("dup.safetensors") && e.contains("duplicate key `w`"),
        "{e}"
    );

    let meta = write_raw(
        &d.join("meta.safetensors"),
        br#"{"__metadata__":{"a":"1","a":"2"},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
        &data[..4],
    );
    let e = ModelFile::open(&meta).err().unwrap().to_string();
    assert!(e.contains("duplicate key `a` in __metadata__"), "{e}");

    let overlap = write_raw(
        &d.join("overlap.safetensors"),
        br#"{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"y":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}}"#,
        &data[..6],
    );
    let e = ModelFile::open(&overlap).err().unwrap().to_string();
    assert!(
        e.contains("overlap.safetensors") && e.contains("tensor `y`") && e.contains("`x`"),
        "{e}"
    );

    let reversed = write_raw(
        &d.join("reversed.safetensors"),
        br#"{"z":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#,
        &data[..4],
    );
    let e = ModelFile::open(&reversed).err().unwrap().to_string();
    assert!(
        e.contains("tensor `z`") && e.contains("end before they start"),
        "{e}"
    );
}

#[test]
fn odd_paths_are_named_as_what_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let e = ModelFile::open(d).err().unwrap().to_string();
    assert!(e.contains("is a directory"), "{e}");

    let link = d.join("gone.safetensors");
    std::os::unix::fs::symlink(d.join("nowhere.safetensors"), &link).unwrap();
    let e = ModelFile::open(&link).err().unwrap().to_string();
    assert!(
        e.contains("is a symlink to") && e.contains("nowhere.safetensors"),
        "{e}"
    );

    // A FIFO is refused at once: opening it for reading would block until a writer comes.
    let fifo = d.join("pipe.safetensors");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let (tx, rx) = std::sync::mpsc::channel();
    let f = fifo.clone();
    std::thread::spawn(move || tx.send(ModelFile::open(&f).err().map(|e| e.to_string())));
    let e = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("opening a FIFO must not hang")
        .expect("a FIFO is not a model");
    assert!(e.contains("pipe.safetensors") && e.contains("FIFO"), "{e}");
}

#[test]
fn sd1_and_sdxl_in_one_merge_are_named_as_different_architectures() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (layout, sub) in [
        (amalgam::synth::Layout::Sd1Ldm, "sd1"),
        (amalgam::synth::Layout::SdxlSgm, "sdxl"),
    ] {
        let mut o = amalgam::synth::SynthOptions::new(layout, 1);
        o.shrink = 16;
        o.base = false;
        o.components = vec!["diffuser".into()];
        amalgam::synth::synthesize(&d.join(sub), &o).unwrap();
    }
    let (a, b) = (
        d.join("sd1/m000.safetensors"),
        d.join("sdxl/m000.safetensors"),
    );
    let e = soup_error(&[&a, &b], &d.join("out.safetensors"));
    assert!(
        e.contains("is SD1") && e.contains("is SDXL") && e.contains("different architectures"),
        "{e}"
    );
}
