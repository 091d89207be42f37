//! Helpers shared by the binary's end-to-end tests: run `amalgam`, expect success or failure.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Runs the `amalgam` binary built for these tests.
pub fn amalgam(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_amalgam"))
        .args(args)
        .output()
        .expect("run amalgam")
}

/// Runs `amalgam`, expects success, returns stdout and stderr together.
pub fn ok(args: &[&str]) -> String {
    let o = amalgam(args);
    assert!(
        o.status.success(),
        "amalgam {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `amalgam`, expects failure, returns stderr.
pub fn fails(args: &[&str]) -> String {
    let o = amalgam(args);
    assert!(!o.status.success(), "amalgam {args:?} should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `amalgam synth -o DIR --layout sd1 --shrink 16 -n N` plus `extra` flags.
pub fn synth_sd1(dir: &Path, n: usize, extra: &[&str]) {
    let n = n.to_string();
    let mut args = vec![
        "synth",
        "-o",
        s(dir),
        "--layout",
        "sd1",
        "-n",
        &n,
        "--shrink",
        "16",
    ];
    args.extend_from_slice(extra);
    ok(&args);
}
