//! `amalgam extract-lora` end to end: extract, inspect the LoRA, bake it back with `merge`.

mod common;
use common::*;

#[test]
fn extract_inspect_and_bake() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    synth_sd1(d, 1, &[]);
    let (base, tuned) = (d.join("base.safetensors"), d.join("m000.safetensors"));
    let lora = d.join("lora.safetensors");
    let out = ok(&[
        "extract-lora",
        s(&tuned),
        "--base",
        s(&base),
        "--rank",
        "4",
        "--energy",
        "0.5",
        "-o",
        s(&lora),
    ]);
    assert!(
        out.contains("LoRA of ") && out.contains("(sd1-ldm), rank "),
        "{out}"
    );
    assert!(out.contains("energy kept: mean"), "{out}");
    assert!(out.contains("changed keys a LoRA cannot carry"), "{out}");
    // inspect sees a LoRA of the same architecture; merge bakes it.
    let info = ok(&["inspect", "--no-hash", s(&lora)]);
    assert!(info.contains("a kohya LoRA for sd1-ldm"), "{info}");
    let baked = d.join("baked.safetensors");
    let log = ok(&[
        "merge",
        "--method",
        "add",
        s(&base),
        s(&lora),
        "-o",
        s(&baked),
        "-q",
    ]);
    assert!(baked.is_file(), "{log}");
    // The output is refused over an input; a second run keeps the first file; a ratio must be a
    // fraction.
    let extract = |out: &std::path::Path, extra: &[&str]| {
        let mut args = vec!["extract-lora", s(&tuned), "--base", s(&base), "--rank", "4"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-o", s(out)]);
        fails(&args)
    };
    let e = extract(&base, &[]);
    assert!(e.contains("base.safetensors"), "{e}");
    let e = extract(&lora, &[]);
    assert!(e.contains("--force"), "{e}");
    let e = extract(&d.join("x.safetensors"), &["--ratio", "1.5"]);
    assert!(e.contains("(0, 1]"), "{e}");
}

/// Two LoRAs extracted from two fine-tunes, merged by `knots`, baked with `merge`.
#[test]
fn knots_of_extracted_loras() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    synth_sd1(d, 2, &[]);
    let base = d.join("base.safetensors");
    let mut loras = Vec::new();
    for m in ["m000", "m001"] {
        let lora = d.join(format!("{m}-lora.safetensors"));
        let tuned = d.join(format!("{m}.safetensors"));
        ok(&[
            "extract-lora",
            s(&tuned),
            "--base",
            s(&base),
            "--rank",
            "2",
            "-o",
            s(&lora),
        ]);
        loras.push(lora);
    }
    let merged = d.join("knots.safetensors");
    let out = ok(&[
        "knots",
        s(&loras[0]),
        s(&loras[1]),
        "--variant",
        "dare-ties",
        "--seed",
        "3",
        "-o",
        s(&merged),
    ]);
    assert!(out.contains("KnOTS of 2 LoRAs:"), "{out}");
    let info = ok(&["inspect", "--no-hash", s(&merged)]);
    assert!(info.contains("a kohya LoRA for sd1-ldm"), "{info}");
    let baked = d.join("baked.safetensors");
    ok(&[
        "merge",
        "--method",
        "add",
        s(&base),
        s(&merged),
        "-o",
        s(&baked),
        "-q",
    ]);
    assert!(baked.is_file());
    let e = fails(&[
        "knots",
        s(&loras[0]),
        "--k",
        "0",
        "-o",
        s(&d.join("x.safetensors")),
    ]);
    assert!(e.contains("(0, 1]"), "{e}");
}

#[test]
fn a_recipe_whose_output_is_a_lora() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    synth_sd1(d, 2, &[]);
    let recipe = d.join("lora.toml");
    std::fs::write(
        &recipe,
        r#"
[models]
base = "base.safetensors"
pool = ["m000.safetensors", "m001.safetensors"]

[nodes.ties]
method = "ties"
base = "base"
models = ["pool"]

[nodes.lora]
method = "extract_lora"
model = "ties"
base = "base"
rank = 4

[output]
node = "lora"
"#,
    )
    .unwrap();
    let lora = d.join("ties-lora.safetensors");
    let out = ok(&["merge", s(&recipe), "-o", s(&lora)]);
    assert!(out.contains("merged from all their inputs"), "{out}");
    assert!(out.contains("temporary f32 file"), "{out}");
    assert!(out.contains("LoRA of ") && out.contains("rank 4"), "{out}");
    assert_eq!(
        out.matches("wrote ").count(),
        2,
        "the merge's bytes and the LoRA: {out}"
    );
    let info = ok(&["inspect", "--no-hash", s(&lora)]);
    assert!(info.contains("a kohya LoRA for sd1-ldm"), "{info}");
    // `amalgam methods` lists it as an output stage.
    let m = ok(&["methods", "extract_lora"]);
    assert!(m.contains("output stage") && m.contains("rank = 64"), "{m}");
    // Not as an input of another node.
    std::fs::write(
        &recipe,
        std::fs::read_to_string(&recipe)
            .unwrap()
            .replace("node = \"lora\"", "node = \"again\"")
            + "[nodes.again]\nmethod = \"add\"\na = \"base\"\nb = \"lora\"\n",
    )
    .unwrap();
    let e = fails(&["merge", s(&recipe), "-o", s(&d.join("x.safetensors"))]);
    assert!(e.contains("only be the output"), "{e}");
}
