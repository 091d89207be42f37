//! The `merge` shorthand's options (--base, --fallback, --repair, --seed) and the README's option
//! table against `amalgam merge --help`, with the real binary.

mod common;
use common::*;

use amalgam::io::input::ModelFile;
use std::collections::BTreeSet;
use std::path::Path;

fn read(path: &Path, key: &str) -> Vec<f32> {
    let m = ModelFile::open(path).unwrap();
    let n = m.tensor(key).unwrap().numel();
    let mut v = vec![0f32; n];
    m.read_chunk(key, 0, &mut v, &mut Vec::new()).unwrap();
    v
}

/// A small SD1 pool whose first fine-tune lacks the VAE.
fn pool(d: &Path) {
    ok(&[
        "synth",
        "-o",
        s(d),
        "--layout",
        "sd1",
        "-n",
        "2",
        "--shrink",
        "16",
        "--prune-vae",
        "1",
    ]);
}

const VAE_KEY: &str = "first_stage_model.decoder.conv_in.weight";
const UNET_KEY: &str = "model.diffusion_model.input_blocks.0.0.weight";

#[test]
fn soup_with_base_and_repair_completes_pruned_models_from_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pool(d);
    let (base, m0, m1) = (
        d.join("base.safetensors"),
        d.join("m000.safetensors"),
        d.join("m001.safetensors"),
    );
    assert!(ModelFile::open(&m0).unwrap().tensor(VAE_KEY).is_none());
    let out = d.join("soup.safetensors");
    let log = ok(&[
        "merge",
        "--method",
        "soup",
        "--base",
        s(&base),
        "--repair",
        s(&m0),
        s(&m1),
        "-o",
        s(&out),
        "--dtype",
        "f32",
    ]);
    assert!(log.contains("the base is not merged"), "{log}");
    // The VAE: m000 counts as the base there; the base itself is not one of the soup's models.
    let (b, x1, o) = (
        read(&base, VAE_KEY),
        read(&m1, VAE_KEY),
        read(&out, VAE_KEY),
    );
    for i in 0..o.len() {
        let want = b[i] + (x1[i] - b[i]) / 2.0;
        assert!((o[i] - want).abs() <= 1e-6, "{i}: {} vs {want}", o[i]);
    }
    // The UNet: the mean of the two fine-tunes only.
    let (x0, x1, o) = (
        read(&m0, UNET_KEY),
        read(&m1, UNET_KEY),
        read(&out, UNET_KEY),
    );
    for i in 0..o.len() {
        let want = x0[i] + (x1[i] - x0[i]) / 2.0;
        assert!((o[i] - want).abs() <= 1e-6, "{i}: {} vs {want}", o[i]);
    }
    // Without --repair the pruned model is left out of the VAE: the VAE is m001's.
    let plain = d.join("plain.safetensors");
    ok(&[
        "merge",
        "--method",
        "soup",
        "--base",
        s(&base),
        s(&m0),
        s(&m1),
        "-o",
        s(&plain),
        "--dtype",
        "f32",
    ]);
    assert_eq!(read(&plain, VAE_KEY), read(&m1, VAE_KEY));
}

#[test]
fn fallback_names_the_model_missing_keys_come_from() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pool(d);
    let (base, m0, m1) = (
        d.join("base.safetensors"),
        d.join("m000.safetensors"),
        d.join("m001.safetensors"),
    );
    // weighted_sum of m000 (no VAE) and m001: the VAE is passed through from m001 by default;
    // with --fallback BASE... still from m001 (the node has a value). A key neither has comes
    // from the fallback: merge m000 with itself, the VAE then comes from the fallback.
    let out = d.join("ws.safetensors");
    ok(&[
        "merge",
        "--method",
        "weighted_sum",
        s(&m0),
        s(&m0),
        "--fallback",
        s(&base),
        "-o",
        s(&out),
        "--dtype",
        "f32",
    ]);
    assert_eq!(read(&out, VAE_KEY), read(&base, VAE_KEY));
    let o = ModelFile::open(&out).unwrap();
    let recipe = &o.metadata()["amalgam_recipe"];
    assert!(recipe.contains("fallback = \"fallback\""), "{recipe}");
    // --fallback naming one of the models adds no input.
    let out2 = d.join("ws2.safetensors");
    ok(&[
        "merge",
        "--method",
        "soup",
        s(&m1),
        s(&m0),
        "--fallback",
        s(&m1),
        "-o",
        s(&out2),
    ]);
    let recipe = ModelFile::open(&out2).unwrap().metadata()["amalgam_recipe"].clone();
    assert!(recipe.contains("fallback = \"model0\""), "{recipe}");
    assert!(!recipe.contains("\"fallback\" ="), "{recipe}");
    // --repair needs a complete model to take keys from.
    let o = amalgam(&[
        "merge",
        "--method",
        "soup",
        "--repair",
        s(&m0),
        s(&m1),
        "-o",
        s(&out2),
        "--force",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--base FILE or --fallback FILE"), "{err}");
}

/// The long options of a table's first column or of a help text.
fn flags(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while i + 2 < b.len() {
        if b[i] == b'-' && b[i + 1] == b'-' && (i == 0 || !b[i - 1].is_ascii_alphanumeric()) {
            let mut j = i + 2;
            while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'-') {
                j += 1;
            }
            if j > i + 2 {
                out.insert(text[i..j].to_string());
            }
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn readme_option_table_lists_exactly_the_options_of_merge_help() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    let start = readme
        .find("`amalgam merge [RECIPE.toml")
        .expect("the README's merge synopsis");
    let table: Vec<&str> = readme[start..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .collect();
    assert!(table.len() > 5, "the option table: {table:?}");
    let mut documented = BTreeSet::new();
    for row in &table[2..] {
        let first = row.split('|').nth(1).unwrap();
        documented.extend(flags(first));
    }
    let help = ok(&["merge", "--help"]);
    let mut offered: BTreeSet<String> = help
        .lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .flat_map(|l| flags(l.split("  ").next().unwrap()))
        .collect();
    offered.remove("--help");
    assert_eq!(
        documented, offered,
        "README `amalgam merge` option table vs `amalgam merge --help`"
    );
}

#[test]
fn seed_help_lists_every_random_method() {
    let help = ok(&["merge", "--help"]);
    let line: String = help
        .split("--seed")
        .nth(1)
        .unwrap()
        .split("\n\n")
        .next()
        .unwrap()
        .to_string();
    for m in amalgam::methods::SEEDED {
        assert!(line.contains(m), "--seed help lacks {m}: {line}");
    }
}
