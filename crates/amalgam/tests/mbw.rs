//! Block weights (MBW): the supermerger block of every SD1 and SDXL key, and block-weighted merges
//! checked key by key against the hand formula.

mod common;
use amalgam::io::dtype::OutputDtype;
use amalgam::io::input::ModelFile;
use amalgam::layout::arch::{block_ids, block_of, expand_block_list, Arch, Layout};
use amalgam::{merge, recipe, MergeOptions, NoProgress};
use common::*;
use std::collections::BTreeMap;
use std::path::Path;

/// What the spec says block `id` holds, as a predicate on key names.
fn spec_block(layout: Layout, id: &str, key: &str) -> bool {
    let unet = key.strip_prefix("model.diffusion_model.");
    let last_out = if layout == Layout::Sd1Ldm {
        "OUT11"
    } else {
        "OUT08"
    };
    match (id, unet) {
        ("BASE", None) => !(layout == Layout::SdxlSgm && key.starts_with("first_stage_model.")),
        ("VAE", None) => layout == Layout::SdxlSgm && key.starts_with("first_stage_model."),
        ("M00", Some(k)) => k.starts_with("middle_block."),
        ("IN00", Some(k)) if k.starts_with("time_embed.") || k.starts_with("label_emb.") => true,
        (_, Some(k)) if id == last_out && k.starts_with("out.") => true,
        (id, Some(k)) if id.starts_with("IN") => k.starts_with(&format!(
            "input_blocks.{}.",
            id[2..].parse::<usize>().unwrap()
        )),
        (id, Some(k)) if id.starts_with("OUT") => k.starts_with(&format!(
            "output_blocks.{}.",
            id[3..].parse::<usize>().unwrap()
        )),
        _ => false,
    }
}

#[test]
fn every_block_id_holds_the_keys_the_spec_says() {
    for (layout, arch, count) in [
        (Layout::Sd1Ldm, Arch::Sd1, 26),
        (Layout::SdxlSgm, Arch::Sdxl, 21),
    ] {
        let ids = block_ids(arch).unwrap();
        assert_eq!(ids.len(), count);
        let mut per_id: BTreeMap<&str, usize> = BTreeMap::new();
        for k in layout.keys() {
            let id = block_of(layout, &k.key).expect("every key has a block");
            assert!(ids.contains(&id), "{layout}: {} → {id}", k.key);
            assert!(spec_block(layout, id, &k.key), "{layout}: {} → {id}", k.key);
            // No other id claims it.
            for other in ids.iter().filter(|o| **o != id) {
                assert!(
                    !spec_block(layout, other, &k.key),
                    "{layout}: {} also {other}",
                    k.key
                );
            }
            *per_id.entry(id).or_default() += 1;
        }
        for id in ids {
            assert!(
                per_id.get(id).copied().unwrap_or(0) > 0,
                "{layout}: {id} has no keys"
            );
        }
    }
    // Other layouts have no block ids.
    assert_eq!(block_of(Layout::SdxlKohya, "unet.conv_in.weight"), None);
}

#[test]
fn supermerger_lists_expand_to_block_ids() {
    let sd1: Vec<String> = (0..25).map(|i| format!("{}", i as f64 / 100.0)).collect();
    let e = expand_block_list(&sd1.join(",")).unwrap();
    assert_eq!(e[0], ("IN00", 0.0));
    assert_eq!(e[12], ("M00", 0.12));
    assert_eq!(e[24], ("OUT11", 0.24));
    let sdxl: Vec<String> = (0..20).map(|i| i.to_string()).collect();
    let e = expand_block_list(&sdxl.join(",")).unwrap();
    assert_eq!(e[0], ("BASE", 0.0));
    assert_eq!(e[10], ("M00", 10.0));
    assert_eq!(e[19], ("OUT08", 19.0));
    assert!(expand_block_list("1,2,3").unwrap_err().contains("got 3"));
    assert!(expand_block_list("1,x").is_err());
}

fn pair(dir: &Path, layout: Layout) {
    f32_pool(dir, layout, 1, 64);
}

fn merged(dir: &Path, alpha: &str, name: &str) -> Result<(), String> {
    let text = format!(
        "[models]\na = \"base.safetensors\"\nb = \"m000.safetensors\"\n\n[nodes.mbw]\nmethod = \"weighted_sum\"\na = \"a\"\nb = \"b\"\nalpha = {alpha}\n\n[output]\nnode = \"mbw\"\ndtype = \"f32\"\n"
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    let r = recipe::load(&path).map_err(|e| e.to_string())?;
    let mut o = MergeOptions::new(dir.join(format!("{name}.safetensors")));
    o.output_dtype = OutputDtype::F32;
    merge(&r.graph, &o, &NoProgress).map_err(|e| e.to_string())?;
    Ok(())
}

/// Checks the first three keys of every block against `(1 − α_b)·a + α_b·b`.
fn check(dir: &Path, layout: Layout, name: &str, alpha_of: impl Fn(&str) -> f32) {
    let out = dir.join(format!("{name}.safetensors"));
    let m = ModelFile::open(&out).unwrap();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for key in m.tensors().keys() {
        let block = block_of(layout, key).unwrap();
        let n = seen.entry(block).or_default();
        *n += 1;
        if *n > 3 {
            continue;
        }
        let alpha = alpha_of(block);
        let a = read_f32(&dir.join("base.safetensors"), key);
        let b = read_f32(&dir.join("m000.safetensors"), key);
        let got = read_f32(&out, key);
        for i in 0..a.len() {
            let want = (1.0 - alpha) * a[i] + alpha * b[i];
            assert!(
                (got[i] - want).abs() <= 1e-6 * want.abs().max(1e-3),
                "{key} ({block}, α {alpha})[{i}]: {} vs {want}",
                got[i]
            );
        }
    }
    assert_eq!(seen.len(), block_ids(layout.arch()).unwrap().len());
}

#[test]
fn block_weighted_weighted_sum_sd1_from_a_supermerger_list() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pair(d, Layout::Sd1Ldm);
    let list: Vec<String> = (0..25)
        .map(|i| format!("{}", (i + 1) as f64 / 40.0))
        .collect();
    merged(
        d,
        &format!("{{ list = \"{}\", BASE = 0.5 }}", list.join(",")),
        "sd1",
    )
    .unwrap();
    let ids = block_ids(Arch::Sd1).unwrap();
    check(d, Layout::Sd1Ldm, "sd1", |b| {
        if b == "BASE" {
            0.5
        } else {
            let i = ids.iter().position(|x| *x == b).unwrap();
            i as f32 / 40.0
        }
    });
}

#[test]
fn block_weighted_weighted_sum_sdxl_from_a_table() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pair(d, Layout::SdxlSgm);
    merged(
        d,
        "{ IN00 = 0.1, M00 = 0.7, OUT08 = 0.9, VAE = 0.0, default = 0.3 }",
        "sdxl",
    )
    .unwrap();
    check(d, Layout::SdxlSgm, "sdxl", |b| match b {
        "IN00" => 0.1,
        "M00" => 0.7,
        "OUT08" => 0.9,
        "VAE" => 0.0,
        _ => 0.3,
    });
    // Errors: a block SDXL does not have; a list of the wrong length.
    let e = merged(d, "{ IN11 = 0.5 }", "bad1").unwrap_err();
    assert!(e.contains("block `IN11` does not exist in sdxl-sgm"), "{e}");
    let e = merged(d, "{ list = \"0.1,0.2\" }", "bad2").unwrap_err();
    assert!(
        e.contains("25 or 26 values") && e.contains("bad2.toml:"),
        "{e}"
    );
    let e = merged(d, "{ IN99 = 0.5 }", "bad3").unwrap_err();
    assert!(e.contains("`IN99` is not a block id"), "{e}");
}

#[test]
fn time_embed_and_label_emb_follow_the_chosen_mapping() {
    use amalgam::layout::arch::{block_of_with, BlockMapping};
    for key in [
        "model.diffusion_model.time_embed.0.weight",
        "model.diffusion_model.label_emb.0.0.weight",
    ] {
        assert_eq!(
            block_of_with(Layout::SdxlSgm, key, BlockMapping::Supermerger),
            Some("IN00")
        );
        assert_eq!(
            block_of_with(Layout::SdxlSgm, key, BlockMapping::SdMecha),
            Some("BASE")
        );
    }
    // A recipe picks it per node with `blocks`; the table form then gives time_embed BASE's
    // value (here the default) instead of IN00's.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pair(d, Layout::SdxlSgm);
    merged(
        d,
        "{ IN00 = 0.9, default = 0.1 }\nblocks = \"sd_mecha\"",
        "mecha",
    )
    .unwrap();
    for (key, alpha) in [
        ("model.diffusion_model.time_embed.0.weight", 0.1f32),
        ("model.diffusion_model.label_emb.0.0.bias", 0.1),
        ("model.diffusion_model.input_blocks.0.0.weight", 0.9),
    ] {
        let a = read_f32(&d.join("base.safetensors"), key);
        let b = read_f32(&d.join("m000.safetensors"), key);
        let got = read_f32(&d.join("mecha.safetensors"), key);
        for i in 0..a.len() {
            let want = (1.0 - alpha) * a[i] + alpha * b[i];
            assert!(
                (got[i] - want).abs() <= 1e-6 * want.abs().max(1e-3),
                "{key}"
            );
        }
    }
    let e = merged(d, "{ IN00 = 0.9 }\nblocks = \"other\"", "bad").unwrap_err();
    assert!(e.contains("`blocks` is `supermerger` or `sd_mecha`"), "{e}");
}
