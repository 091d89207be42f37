//! Interrupted merges, with a real child process and real signals: SIGTERM and SIGINT remove the
//! partial file and exit with a clear message; after SIGKILL the same command resumes from the
//! tensors already written and writes the same bytes as an uninterrupted run; a partial file of
//! another run is named and replaced.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn run(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_amalgam"))
        .args(args)
        .output()
        .expect("run amalgam")
}

fn spawn(args: &[String]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_amalgam"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn amalgam")
}

fn hidden(out: &Path, what: &str) -> PathBuf {
    let name = out.file_name().unwrap().to_string_lossy();
    out.with_file_name(format!(".{name}.amalgam-{what}"))
}

/// Waits until the journal of `out` records at least `keys` finished keys (the first line is the
/// fingerprint), so the signal lands in the middle of the merge. Panics if the merge ends first.
fn wait_for_keys(child: &mut Child, out: &Path, keys: usize) {
    let journal = hidden(out, "journal");
    let start = Instant::now();
    loop {
        let n = std::fs::read_to_string(&journal)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if n > keys {
            return;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("the merge ended ({st}) before {keys} keys were journaled: make it slower");
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, sig: &str) {
    let st = Command::new("kill")
        .args([format!("-{sig}"), child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn signals_clean_up_and_a_killed_merge_resumes_to_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = run(&[
        "synth".into(),
        "-o".into(),
        s(d).into(),
        "--layout".into(),
        "sd1".into(),
        "-n".into(),
        "3".into(),
        "--shrink".into(),
        "2".into(),
        "--components".into(),
        "diffuser".into(),
    ]);
    assert!(o.status.success());
    // DGMLA on one thread: multi-pass and slow enough to be stopped in the middle. The journal
    // is written at most once a second, so the merge must last several seconds (at shrink 4 it
    // took 0.8 s on an idle machine and ended before any key was journaled).
    let merge = |out: &Path, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["merge", "--method", "dgmla", "--threads", "1", "--base"]
            .iter()
            .map(|a| a.to_string())
            .collect();
        v.push(s(&d.join("base.safetensors")).into());
        for i in 0..3 {
            v.push(s(&d.join(format!("m00{i}.safetensors"))).into());
        }
        v.extend(["-o".into(), s(out).into(), "--seed".into(), "7".into()]);
        v.extend(extra.iter().map(|a| a.to_string()));
        v
    };

    let reference = d.join("reference.safetensors");
    let o = run(&merge(&reference, &["--quiet"]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let expected = std::fs::read(&reference).unwrap();

    // SIGTERM and SIGINT: partial file and journal removed, output not written, 128 + signal.
    let out = d.join("out.safetensors");
    for (sig, code) in [("TERM", 143), ("INT", 130)] {
        let mut child = spawn(&merge(&out, &[]));
        wait_for_keys(&mut child, &out, 2);
        signal(&child, sig);
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(code), "SIG{sig}: {err}");
        assert!(
            err.contains(&format!("SIG{sig}")) && err.contains("removed its partial file"),
            "SIG{sig}: {err}"
        );
        assert!(!out.exists());
        assert!(
            !hidden(&out, "partial").exists(),
            "SIG{sig} left the partial file"
        );
        assert!(
            !hidden(&out, "journal").exists(),
            "SIG{sig} left the journal"
        );
    }

    // SIGKILL: nothing can clean up; the same command resumes and writes the same bytes.
    let mut child = spawn(&merge(&out, &[]));
    wait_for_keys(&mut child, &out, 2);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(hidden(&out, "partial").exists());
    assert!(!out.exists());
    let o = run(&merge(&out, &[]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("resuming: "), "{err}");
    assert!(
        std::fs::read(&out).unwrap() == expected,
        "a resumed merge must write the bytes of an uninterrupted one"
    );
    assert!(!hidden(&out, "partial").exists() && !hidden(&out, "journal").exists());

    // A partial file left by a run with other options is named, removed and replaced.
    let out2 = d.join("out2.safetensors");
    let mut child = spawn(&merge(&out2, &["-p", "p=0.2"]));
    wait_for_keys(&mut child, &out2, 2);
    child.kill().unwrap();
    child.wait().unwrap();
    let o = run(&merge(&out2, &[]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("removing stale partial file")
            && err.contains(".out2.safetensors.amalgam-partial"),
        "{err}"
    );
    assert!(!err.contains("resuming: "), "{err}");
    assert!(std::fs::read(&out2).unwrap() == expected);

    // --no-resume starts afresh even when the partial file is this run's.
    let out3 = d.join("out3.safetensors");
    let mut child = spawn(&merge(&out3, &[]));
    wait_for_keys(&mut child, &out3, 2);
    child.kill().unwrap();
    child.wait().unwrap();
    let o = run(&merge(&out3, &["--no-resume"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("removing stale partial file") && !err.contains("resuming: "),
        "{err}"
    );
    assert!(std::fs::read(&out3).unwrap() == expected);
}
