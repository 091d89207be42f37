//! The rules every file amalgam writes follows (merge output, JSON report, converted recipe,
//! repaired model, synth and demo files): checked before any tensor is read, nothing it was not
//! asked to write is touched, permissions follow the umask.

mod common;
use common::*;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Two tiny SD1 text encoders in `d`.
fn pool(d: &Path) -> (PathBuf, PathBuf) {
    synth_sd1(d, 2, &["--components", "clip_l", "--no-base"]);
    (d.join("m000.safetensors"), d.join("m001.safetensors"))
}

/// No hidden temporary, probe or partial file is left in `d`.
fn no_leftovers(d: &Path) {
    let left: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".amalgam-"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn report_json_follows_the_output_rules() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b) = pool(d);
    let out = d.join("out.safetensors");
    let report = d.join("report.json");
    let merge = |extra: &[&str]| -> Vec<String> {
        let mut args = vec!["merge", "--method", "soup", s(&a), s(&b), "-o", s(&out)];
        args.extend_from_slice(extra);
        args.into_iter().map(String::from).collect()
    };

    // An existing report is kept without --force, and the merge does not start.
    std::fs::write(&report, "precious").unwrap();
    let e = fails(&strs(&merge(&["--report-json", s(&report)])));
    assert!(
        e.contains("report.json") && e.contains("already exists"),
        "{e}"
    );
    assert_eq!(std::fs::read_to_string(&report).unwrap(), "precious");
    assert!(
        !out.exists(),
        "the merge must not run when the report is refused"
    );

    // The report may not be an input, even with --force.
    let before = std::fs::read(&a).unwrap();
    let e = fails(&strs(&merge(&["--report-json", s(&a), "--force"])));
    assert!(e.contains("refusing to overwrite an input"), "{e}");
    assert_eq!(std::fs::read(&a).unwrap(), before);

    // Nor the merge output itself.
    let e = fails(&strs(&merge(&["--report-json", s(&out)])));
    assert!(e.contains("is also the output"), "{e}");

    // A missing folder fails before the merge, not after it.
    let e = fails(&strs(&merge(&[
        "--report-json",
        s(&d.join("nowhere/report.json")),
    ])));
    assert!(e.contains("nowhere"), "{e}");
    assert!(!out.exists());

    // With --force the report is replaced, atomically, and holds the per-key report.
    ok(&strs(&merge(&["--report-json", s(&report), "--force"])));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert!(json.is_object(), "{json}");
    no_leftovers(d);
}

#[test]
fn outputs_that_are_not_regular_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b) = pool(d);
    let merge = |out: &Path, force: bool| {
        let mut args = vec!["merge", "--method", "soup", s(&a), s(&b), "-o", s(out)];
        if force {
            args.push("--force");
        }
        fails(&args)
    };

    // A directory, with or without --force.
    let sub = d.join("sub");
    std::fs::create_dir(&sub).unwrap();
    for force in [false, true] {
        let e = merge(&sub, force);
        assert!(e.contains("is a directory"), "{e}");
    }
    assert!(sub.is_dir());

    // A FIFO: --force replaces only regular files (and nothing blocks on opening it).
    let fifo = d.join("fifo.safetensors");
    let st = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(st.success());
    let e = merge(&fifo, true);
    assert!(
        e.contains("fifo.safetensors") && e.contains("--force replaces only regular files"),
        "{e}"
    );
    let ft = std::fs::symlink_metadata(&fifo).unwrap().file_type();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&ft));

    // A symbolic link to a device node (as root, `-o /dev/null --force` once replaced the node).
    let link = d.join("null.safetensors");
    std::os::unix::fs::symlink("/dev/null", &link).unwrap();
    let e = merge(&link, true);
    assert!(e.contains("symbolic link to"), "{e}");
    let e = merge(Path::new("/dev/null"), true);
    assert!(e.contains("/dev/null"), "{e}");
    let dev = std::fs::metadata("/dev/null").unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &dev.file_type()
    ));

    // An output inside a regular file (its "folder" is not a folder).
    let e = merge(&a.join("out.safetensors"), false);
    assert!(e.contains("is not a folder"), "{e}");
    no_leftovers(d);
}

#[test]
fn permissions_follow_the_umask() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b) = pool(d);
    for (umask, mode) in [("022", 0o644), ("027", 0o640)] {
        let out = d.join(format!("out{umask}.safetensors"));
        let report = d.join(format!("report{umask}.json"));
        let st = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "umask {umask}; exec \"$0\" merge --method soup \"$1\" \"$2\" -o \"$3\" \
                 --report-json \"$4\" --quiet"
            ))
            .arg(env!("CARGO_BIN_EXE_amalgam"))
            .args([&a, &b, &out, &report])
            .status()
            .unwrap();
        assert!(st.success());
        for p in [&out, &report] {
            let m = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(m, mode, "{} under umask {umask}", p.display());
        }
    }
}

#[test]
fn recipe_convert_and_demo_follow_the_output_rules() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b) = pool(d);
    let recipe = d.join("r.toml");
    std::fs::write(
        &recipe,
        format!(
            "[models]\na = {:?}\nb = {:?}\n[nodes.m]\nmethod = \"soup\"\nmodels = [\"a\", \"b\"]\n\
             [output]\nnode = \"m\"\n",
            s(&a),
            s(&b)
        ),
    )
    .unwrap();
    let text = std::fs::read_to_string(&recipe).unwrap();

    // Converting a recipe onto itself, or onto one of its models, is refused.
    let e = fails(&["recipe", "convert", s(&recipe), s(&recipe), "--force"]);
    assert!(e.contains("refusing to overwrite an input"), "{e}");
    assert_eq!(std::fs::read_to_string(&recipe).unwrap(), text);
    let e = fails(&["recipe", "convert", s(&recipe), s(&a), "--force"]);
    assert!(e.contains("refusing to overwrite an input"), "{e}");

    // An existing file is kept unless --force; a missing folder is named.
    let out = d.join("out.mecha");
    std::fs::write(&out, "keep me").unwrap();
    let e = fails(&["recipe", "convert", s(&recipe), s(&out)]);
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "keep me");
    ok(&["recipe", "convert", s(&recipe), s(&out), "--force"]);
    assert!(std::fs::read_to_string(&out).unwrap().contains("merge"));
    let e = fails(&["recipe", "convert", s(&recipe), s(&d.join("no/x.mecha"))]);
    assert!(e.contains("no"), "{e}");

    // The demo keeps the files already in its --keep folder unless --force.
    let keep = d.join("demo");
    std::fs::create_dir(&keep).unwrap();
    std::fs::write(keep.join("base.safetensors"), "mine").unwrap();
    let e = fails(&["demo", "--keep", s(&keep)]);
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(
        std::fs::read_to_string(keep.join("base.safetensors")).unwrap(),
        "mine"
    );
    no_leftovers(d);
    no_leftovers(&keep);
}

#[test]
fn the_demo_suggests_a_command_that_works() {
    let o = amalgam(&["demo"]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    // The temporary folder is gone: the suggestion must not point into it.
    assert!(out.contains("amalgam demo --keep DIR"), "{out}");
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.path().join("d");
    let o = amalgam(&["demo", "--keep", s(&keep)]);
    let out = String::from_utf8_lossy(&o.stdout);
    let cmd = out
        .lines()
        .find_map(|l| {
            l.split(": ")
                .nth(1)
                .filter(|c| c.starts_with("amalgam inspect"))
        })
        .unwrap_or_else(|| panic!("no inspect suggestion in {out}"));
    let args: Vec<&str> = cmd.split_whitespace().skip(1).collect();
    let o = amalgam(&args);
    assert!(o.status.success(), "{cmd}");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("amalgam_recipe"),
        "the suggested command shows the recipe"
    );
}
