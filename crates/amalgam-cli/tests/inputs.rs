//! Odd inputs at the command line: `inspect` into a closed pipe, `inspect` of a FIFO, and merge
//! inputs that are directories or dangling symlinks, each named as what it is.

mod common;
use common::*;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn synth(d: &Path) {
    synth_sd1(d, 1, &[]);
}

#[test]
fn inspect_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    synth(dir.path());
    // `amalgam inspect --keys M | head -1`: the reader goes away after one line.
    let mut child = Command::new(env!("CARGO_BIN_EXE_amalgam"))
        .args([
            "inspect",
            "--keys",
            "--no-hash",
            s(&dir.path().join("m000.safetensors")),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("file:"), "{line}");
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_ne!(o.status.code(), Some(101), "{err}");
}

#[test]
fn inspect_of_a_fifo_does_not_hang() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe.safetensors");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let mut child = Command::new(env!("CARGO_BIN_EXE_amalgam"))
        .args(["inspect", s(&fifo)])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(20) {
            child.kill().unwrap();
            panic!("inspect of a FIFO hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("FIFO"), "{err}");
}

#[test]
fn directories_and_dangling_symlinks_are_not_called_missing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    synth(d);
    let link = d.join("gone.safetensors");
    std::os::unix::fs::symlink(d.join("deleted.safetensors"), &link).unwrap();
    let sub = d.join("models");
    std::fs::create_dir(&sub).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_amalgam"))
        .args(["merge", "--method", "soup", s(&d.join("m000.safetensors"))])
        .args([
            s(&sub),
            s(&link),
            "nothere.safetensors",
            "-o",
            s(&d.join("o.safetensors")),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("missing model files: nothere.safetensors"),
        "{err}"
    );
    assert!(err.contains("models is a directory"), "{err}");
    assert!(
        err.contains("gone.safetensors is a symlink to") && err.contains("deleted.safetensors"),
        "{err}"
    );
}
