//! supermerger's modes in the engine: per-block (MBW) values for every new method, the cosine
//! modes' model-wide range over a node input, and smooth_add's whole-tensor budget.

mod common;
use amalgam::io::dtype::OutputDtype;
use amalgam::io::input::ModelFile;
use amalgam::layout::arch::{block_of, Layout};
use amalgam::{merge, recipe, MergeOptions, NoProgress};
use common::*;
use std::path::{Path, PathBuf};

/// supermerger's block weights: every new method takes a per-block `alpha` (a table), and each
/// key is the method run with its block's value.
#[test]
fn per_block_values_apply_per_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    f32_pool(d, Layout::Sd1Ldm, 2, 64);
    let table = "{ IN04 = 0.1, M00 = 0.7, OUT05 = 0.9, default = 0.3 }";
    for (method, c) in [
        ("triple_sum", true),
        ("sum_twice", true),
        ("train_difference", true),
        ("smooth_add", true),
        ("extract_features", true),
        ("tensor_swap", false),
        ("tensor_swap_dim1", false),
        ("scale", false),
        ("cosine_b", false),
    ] {
        let slots = if c {
            "a = \"a\"\nb = \"b\"\nc = \"c\"\n"
        } else if method == "scale" {
            "a = \"a\"\n"
        } else {
            "a = \"a\"\nb = \"b\"\n"
        };
        let merged = |alpha: &str, name: &str| {
            let text = format!(
                "[models]\na = \"m000.safetensors\"\nb = \"m001.safetensors\"\nc = \"base.safetensors\"\n\n[nodes.n]\nmethod = \"{method}\"\n{slots}alpha = {alpha}\n\n[output]\nnode = \"n\"\ndtype = \"f32\"\n"
            );
            let path = d.join(format!("{name}.toml"));
            std::fs::write(&path, text).unwrap();
            let r = recipe::load(&path).unwrap();
            let out = d.join(format!("{name}.safetensors"));
            merge(&r.graph, &MergeOptions::new(&out), &NoProgress).unwrap();
            out
        };
        let blocks = merged(table, &format!("{method}_blocks"));
        let scalar: Vec<(f64, PathBuf)> = [0.1, 0.7, 0.9, 0.3]
            .iter()
            .map(|&x| (x, merged(&x.to_string(), &format!("{method}_{x}"))))
            .collect();
        let m = ModelFile::open(&blocks).unwrap();
        let mut checked = std::collections::BTreeSet::new();
        for key in m.tensors().keys() {
            let alpha = match block_of(Layout::Sd1Ldm, key).unwrap() {
                "IN04" => 0.1,
                "M00" => 0.7,
                "OUT05" => 0.9,
                _ => 0.3,
            };
            let want = &scalar.iter().find(|(x, _)| *x == alpha).unwrap().1;
            assert_eq!(
                read_f32(&blocks, key),
                read_f32(want, key),
                "{method}: {key} (alpha {alpha})"
            );
            checked.insert(alpha.to_bits());
        }
        assert_eq!(checked.len(), 4, "{method}: every block value used");
    }
}

/// A cosine mode over a node's output: the range pass merges the node to a temporary file first,
/// and the result equals the same merge over a file holding that output.
#[test]
fn cosine_range_over_a_node_input() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let keys = [
        (
            "model.diffusion_model.input_blocks.1.1.proj_in.weight",
            vec![8usize, 6],
        ),
        (
            "model.diffusion_model.middle_block.0.in_layers.2.weight",
            vec![4, 3, 2, 2],
        ),
        (
            "cond_stage_model.transformer.text_model.final_layer_norm.weight",
            vec![10],
        ),
        ("first_stage_model.decoder.conv_in.weight", vec![3, 5]),
    ];
    let model = |name: &str, seed: u64| {
        let tensors: Vec<_> = keys
            .iter()
            .enumerate()
            .map(|(i, (k, shape))| {
                let n = shape.iter().product();
                let v: Vec<f32> = lcg_values(seed * 10 + i as u64, n)
                    .iter()
                    .map(|&x| x as f32)
                    .collect();
                f32t(k, shape, &v)
            })
            .collect();
        write_file(&d.join(name), &tensors, true)
    };
    model("a.safetensors", 1);
    model("b.safetensors", 2);
    model("c.safetensors", 3);
    let run = |nodes: &str, name: &str| {
        let text = format!(
            "[models]\na = \"a.safetensors\"\nb = \"b.safetensors\"\nc = \"c.safetensors\"\n\n{nodes}\n[output]\nnode = \"cos\"\ndtype = \"f32\"\n"
        );
        let path = d.join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        let r = recipe::load(&path).unwrap();
        let out = d.join(format!("{name}.safetensors"));
        let mut o = MergeOptions::new(&out);
        o.output_dtype = OutputDtype::F32;
        let report = merge(&r.graph, &o, &NoProgress).unwrap();
        (out, report)
    };
    // The second input of the cosine is a node: a weighted sum of a and c.
    let mixed = "[nodes.mix]\nmethod = \"weighted_sum\"\na = \"a\"\nb = \"c\"\nalpha = 0.25\n";
    let (via_node, report) = run(
        &format!(
            "{mixed}\n[nodes.cos]\nmethod = \"cosineB\"\na = \"b\"\nb = \"mix\"\nalpha = 0.1\n"
        ),
        "via_node",
    );
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("(cosine_b): similarities of")),
        "{:?}",
        report.notes
    );
    // The same node written to a file first.
    let (mix_file, _) = run(&mixed.replace("[nodes.mix]", "[nodes.cos]"), "mix_file");
    std::fs::copy(&mix_file, d.join("c.safetensors")).unwrap();
    let (direct, _) = run(
        "[nodes.cos]\nmethod = \"cosine_b\"\na = \"b\"\nb = \"c\"\nalpha = 0.1\n",
        "direct",
    );
    for (k, _) in &keys {
        assert_eq!(read_f32(&via_node, k), read_f32(&direct, k), "{k}");
    }
    // The VAE is b's (model a of the cosine).
    let vae = keys[3].0;
    assert_eq!(
        read_f32(&direct, vae),
        read_f32(&d.join("b.safetensors"), vae)
    );
}

/// smooth_add needs each tensor whole: a key whose filters exceed a quarter of the memory budget
/// is refused by name, before any output is written; a larger budget merges it.
#[test]
fn smooth_add_refuses_a_key_over_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = "model.diffusion_model.middle_block.1.proj_in.weight";
    let n = 1000 * 1000;
    let paths: Vec<PathBuf> = (0..3)
        .map(|i| {
            let v: Vec<f32> = lcg_values(i, n).iter().map(|&x| x as f32).collect();
            write_file(
                &d.join(format!("m{i}.safetensors")),
                &[f32t(key, &[1000, 1000], &v)],
                true,
            )
        })
        .collect();
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let g = one_node(&refs, "smoothAdd", vec![vec![0], vec![1], vec![2]], &[]);
    let out = d.join("out.safetensors");
    let mut o = MergeOptions::new(&out);
    // Two f64 copies of 1e6 elements: 16 MB, over a quarter of 48 MiB.
    o.memory_budget = 48 << 20;
    let e = merge(&g, &o, &NoProgress).unwrap_err().to_string();
    assert!(e.contains(key) && e.contains("smooth_add"), "{e}");
    assert!(!out.exists());
    o.memory_budget = 256 << 20;
    merge(&g, &o, &NoProgress).unwrap();
    assert_eq!(read_f32(&out, key).len(), n);
}
