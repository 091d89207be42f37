//! The bytes of every method's and every example recipe's output on a fixed synthetic pool,
//! pinned by SHA-256: a restructuring must not change a single output bit. An output that changes
//! on purpose is re-pinned (`AMALGAM_PIN=1 cargo test --test pinned`) in the commit that says why.
//!
//! The hash covers each tensor's name, dtype, shape and bytes, in name order; not the metadata,
//! which holds the pool's (temporary) paths.
mod common;
use amalgam::io::dtype::OutputDtype;
use amalgam::{merge, MergeOptions, NoProgress};
use common::*;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const PINS: &str = "tests/fixtures/pinned_outputs.txt";

fn tensor_hash(path: &Path) -> String {
    let f = amalgam::io::input::ModelFile::open(path).unwrap();
    let mut h = Sha256::new();
    for (name, t) in f.tensors() {
        h.update(format!("{name} {:?} {:?}\n", t.dtype, t.shape).as_bytes());
        let mut bytes = vec![0u8; t.len as usize];
        f.read_raw(name, 0, &mut bytes).unwrap();
        h.update(&bytes);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn outputs_are_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // base.safetensors and m000..m003: SDXL keys, 1/1024 of the parameters, f32.
    let pool = f32_pool(d, amalgam::layout::arch::Layout::SdxlSgm, 4, 32);
    let base = d.join("base.safetensors");
    let models: Vec<PathBuf> = pool.iter().filter(|p| **p != base).cloned().collect();
    let mut got: BTreeMap<String, String> = BTreeMap::new();

    let mut paths: Vec<&Path> = vec![&base];
    paths.extend(models.iter().map(|p| p.as_path()));
    for info in amalgam::methods::ALL {
        // The base and the fine-tunes; two-model methods (weighted_sum, slerp, ...) take base
        // and m000.
        // nuslerp takes two models or a base and two: the base, m000 and m001.
        let many = if info.name == "nuslerp" {
            0..3
        } else {
            1..paths.len()
        };
        let slots = slots_for(info.name, many);
        let g = one_node(&paths, info.name, slots, &[]);
        let out = d.join(format!("method-{}.safetensors", info.name));
        let mut o = MergeOptions::new(&out);
        o.output_dtype = OutputDtype::F16;
        o.seed = 7;
        merge(&g, &o, &NoProgress).unwrap_or_else(|e| panic!("{}: {e}", info.name));
        got.insert(format!("method {}", info.name), tensor_hash(&out));
    }
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mecha");
    let mut recipes: Vec<PathBuf> = std::fs::read_dir(&fixtures)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    recipes.sort();
    for src in recipes {
        let name = src.file_name().unwrap().to_str().unwrap().to_string();
        let p = d.join(&name);
        std::fs::copy(&src, &p).unwrap();
        let t = amalgam::recipe::mecha::load(&p, &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
        let out = d.join(format!("recipe-{name}.safetensors"));
        let mut o = MergeOptions::new(&out);
        o.output_dtype = OutputDtype::F16;
        o.seed = t.seed.unwrap_or(0);
        merge(&t.graph, &o, &NoProgress).unwrap_or_else(|e| panic!("{name}: {e}"));
        got.insert(format!("recipe {name}"), tensor_hash(&out));
    }

    let text: String = got.iter().map(|(k, v)| format!("{k} {v}\n")).collect();
    let pins = Path::new(env!("CARGO_MANIFEST_DIR")).join(PINS);
    if std::env::var_os("AMALGAM_PIN").is_some() {
        std::fs::write(&pins, &text).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&pins).expect("pinned hashes (AMALGAM_PIN=1 writes them)");
    let want: BTreeMap<&str, &str> = want.lines().filter_map(|l| l.rsplit_once(' ')).collect();
    let mut changed = Vec::new();
    for (k, v) in &got {
        match want.get(k.as_str()) {
            Some(w) if w == v => {}
            Some(_) => changed.push(format!("{k}: output changed")),
            None => changed.push(format!("{k}: not pinned")),
        }
    }
    for k in want.keys() {
        if !got.contains_key(*k) {
            changed.push(format!("{k}: pinned but not run"));
        }
    }
    assert!(changed.is_empty(), "{}", changed.join("\n"));
}
