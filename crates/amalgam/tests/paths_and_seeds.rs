//! Which methods depend on the seed (the list the CLI's `--seed` help is made from), and the
//! bytes of an output not depending on how its model paths were written.

mod common;
use amalgam::recipe::graph::Shorthand;
use amalgam::{merge, MergeOptions, NoProgress};
use common::*;
use std::path::{Path, PathBuf};

/// A base and three models of one 64x64 key with distinct values.
fn pool(dir: &Path) -> (PathBuf, Vec<PathBuf>) {
    let write = |name: &str, salt: u32| {
        let v: Vec<f32> = (0..64 * 64u32)
            .map(|i| {
                let x = (i.wrapping_mul(2654435761) ^ salt.wrapping_mul(0x85EB_CA6B)) >> 8;
                (x % 2001) as f32 / 1000.0 - 1.0
            })
            .collect();
        write_file(&dir.join(name), &[f32t("w", &[64, 64], &v)], true)
    };
    let base = write("base.safetensors", 0);
    let models = (1..=3)
        .map(|i| write(&format!("m{i}.safetensors"), i))
        .collect();
    (base, models)
}

fn data_of(path: &Path) -> Vec<u8> {
    let m = amalgam::io::input::ModelFile::open(path).unwrap();
    let mut v = vec![0u8; 64 * 64 * 2];
    m.read_raw("w", 0, &mut v).unwrap();
    v
}

#[test]
fn the_seeded_list_is_exactly_the_methods_whose_output_depends_on_the_seed() {
    let dir = tempfile::tempdir().unwrap();
    let (base, models) = pool(dir.path());
    let mut seeded = Vec::new();
    for info in amalgam::methods::ALL {
        let has_base = info.slots.first().map(|s| s.name) == Some("base");
        let ones = info
            .slots
            .iter()
            .filter(|s| s.kind == amalgam::method::SlotKind::One)
            .count()
            - usize::from(has_base);
        let many = info
            .slots
            .iter()
            .any(|s| s.kind == amalgam::method::SlotKind::Many);
        let n = if many { 3 } else { ones };
        let graph = Shorthand {
            method: info.name.to_string(),
            models: models[..n].to_vec(),
            base: has_base.then(|| base.clone()),
            ..Default::default()
        }
        .build()
        .unwrap_or_else(|e| panic!("{}: {e}", info.name))
        .0;
        let outs: Vec<Vec<u8>> = [0u64, 1]
            .iter()
            .map(|&seed| {
                let out = dir.path().join(format!("{}-{seed}.safetensors", info.name));
                let mut o = MergeOptions::new(&out);
                o.seed = seed;
                merge(&graph, &o, &NoProgress).unwrap();
                data_of(&out)
            })
            .collect();
        if outs[0] != outs[1] {
            seeded.push(info.name);
        }
    }
    assert_eq!(seeded, amalgam::methods::SEEDED);
}

#[cfg(unix)]
#[test]
fn an_output_is_the_same_whether_its_models_were_named_relatively_through_links_or_absolutely() {
    let dir = tempfile::tempdir().unwrap();
    let d = std::fs::canonicalize(dir.path()).unwrap();
    let (_, models) = pool(&d);
    std::os::unix::fs::symlink(&models[0], d.join("link.safetensors")).unwrap();
    let run = |paths: Vec<PathBuf>, out: &Path| {
        let g = amalgam::Graph::single("soup", None, paths, Default::default()).unwrap();
        merge(&g, &MergeOptions::new(out), &NoProgress).unwrap();
        std::fs::read(out).unwrap()
    };
    let absolute = run(models[..2].to_vec(), &d.join("abs.safetensors"));
    // Relative paths (from the pool's folder) and a link to the first model.
    let cwd = std::env::current_dir().unwrap();
    let rel = |p: &Path| -> PathBuf {
        let up = cwd.components().count() - 1;
        let mut r = PathBuf::new();
        for _ in 0..up {
            r.push("..");
        }
        r.join(p.strip_prefix("/").unwrap())
    };
    let linked = run(
        vec![rel(&d.join("link.safetensors")), rel(&models[1])],
        &d.join("rel.safetensors"),
    );
    assert!(
        absolute == linked,
        "the output's bytes depend on how its models were named"
    );
    // Its embedded recipe runs again to the same bytes.
    let recipe = amalgam::io::input::ModelFile::open(d.join("rel.safetensors"))
        .unwrap()
        .metadata()["amalgam_recipe"]
        .clone();
    std::fs::write(d.join("again.toml"), &recipe).unwrap();
    let r = amalgam::recipe::load(&d.join("again.toml")).unwrap();
    let mut o = MergeOptions::new(d.join("again.safetensors"));
    r.settings.apply(&mut o);
    merge(&r.graph, &o, &NoProgress).unwrap();
    assert!(std::fs::read(d.join("again.safetensors")).unwrap() == absolute);
}
