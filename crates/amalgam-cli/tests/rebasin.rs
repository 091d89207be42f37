//! `amalgam rebasin` end to end: a randomly permuted model matched back to its original, the
//! summary, and the errors a user meets.

mod common;
use common::*;

#[test]
fn rebasin_recovers_a_permuted_model() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&[
        "synth",
        "-o",
        s(d),
        "--layout",
        "sd1",
        "-n",
        "0",
        "--shrink",
        "8",
    ]);
    let base = d.join("base.safetensors");
    let permuted = d.join("permuted.safetensors");
    let out = ok(&[
        "merge",
        "--method",
        "randperm",
        s(&base),
        "-o",
        s(&permuted),
        "--seed",
        "3",
    ]);
    assert!(out.contains("permuted at random"), "{out}");
    let back = d.join("back.safetensors");
    let out = ok(&["rebasin", s(&permuted), "--ref", s(&base), "-o", s(&back)]);
    assert!(
        out.contains("(rebasin)") && out.contains("groups permuted"),
        "{out}"
    );
    // The same tensors as the original (metadata aside): compare every key's bytes.
    let info = |p: &std::path::Path| ok(&["inspect", "--no-hash", "--keys", s(p)]);
    assert_eq!(
        info(&back).lines().filter(|l| l.contains("f16")).count(),
        info(&base).lines().filter(|l| l.contains("f16")).count()
    );
    let a = amalgam::io::input::ModelFile::open(&base).unwrap();
    let b = amalgam::io::input::ModelFile::open(&back).unwrap();
    for k in a.tensors().keys() {
        if a.tensors()[k].float_dtype().is_some() {
            assert_eq!(
                a.read_tensor::<f32>(k).unwrap(),
                b.read_tensor::<f32>(k).unwrap(),
                "{k}"
            );
        }
    }
    // `amalgam methods` lists it.
    let m = ok(&["methods", "rebasin"]);
    assert!(m.contains("ref"), "{m}");
}

#[test]
fn rebasin_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // SD1 shrunk by 16: 20 channels are not 8 attention heads.
    synth_sd1(d, 1, &[]);
    let (base, m) = (d.join("base.safetensors"), d.join("m000.safetensors"));
    let e = fails(&[
        "rebasin",
        s(&m),
        "--ref",
        s(&base),
        "-o",
        s(&d.join("o.safetensors")),
    ]);
    assert!(
        e.contains("attention heads") && e.contains("to_q.weight"),
        "{e}"
    );
    assert!(!d.join("o.safetensors").exists());
}
