//! Merges with more worker threads than cores, in a real child process: they must end, and
//! write the bytes of a one-thread run.
//!
//! DGMLA ranks the deltas of small tensors exactly, the models in parallel. While a worker
//! waited for that parallel work, rayon let it take another key's task, which asked for the
//! worker's scratch buffers, locked by the same thread: the merge hung for good (on an SD1 pool,
//! most runs with 3 to 8 threads). This test runs such merges under a watchdog.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs a DGMLA merge of the pool in `dir` with `threads` workers into `out`; kills it and fails
/// if it has not ended within `limit` (an unhung run takes about a second).
fn dgmla(dir: &Path, threads: usize, out: &Path, limit: Duration) {
    let mut args: Vec<String> = ["merge", "--method", "dgmla", "--quiet", "--threads"]
        .iter()
        .map(|a| a.to_string())
        .collect();
    args.push(threads.to_string());
    args.push("--base".into());
    args.push(s(&dir.join("base.safetensors")).into());
    for m in 0..8 {
        args.push(s(&dir.join(format!("m{m:03}.safetensors"))).into());
    }
    args.push("-o".into());
    args.push(s(out).into());
    let mut child = Command::new(env!("CARGO_BIN_EXE_amalgam"))
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn amalgam");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "DGMLA with {threads} threads: {status}");
            return;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("DGMLA with {threads} threads did not end within {limit:?}: it hangs");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn dgmla_with_more_threads_than_cores_ends_and_writes_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    // 9 SD1-layout files of 8 MiB: many keys small enough to be ranked exactly.
    synth_sd1(&pool, 8, &[]);
    let limit = Duration::from_secs(120);
    let one = dir.path().join("one.safetensors");
    dgmla(&pool, 1, &one, limit);
    let want = std::fs::read(&one).unwrap();
    // Before the fix, about two runs in three with 8 threads hung.
    for (i, threads) in [8, 8, 8, 4, 3].into_iter().enumerate() {
        let out = dir.path().join(format!("t{i}.safetensors"));
        dgmla(&pool, threads, &out, limit);
        assert!(
            std::fs::read(&out).unwrap() == want,
            "{threads} threads wrote other bytes than one thread"
        );
    }
}
