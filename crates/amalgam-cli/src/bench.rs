//! `amalgam bench`: merge speed and memory against simply reading the inputs.
//!
//! For each N it synthesises (once, then reuses) SDXL-layout models, times a warm read of every
//! input the merge reads, then runs each merge in a child process and reads its wall time and peak
//! RSS, and times writing a file of the output's size. Reports the merge/read ratio, and the
//! ratio to reading the inputs and writing the output (what any merge must do at least), and the
//! bytes the merge process read (its own I/O counters) as a multiple of the input size. With
//! `--baseline OLD_BINARY` the same merge by another build runs in the same rounds, alternated,
//! and the table gives the ratio of the two. `compare` among the methods times `amalgam compare`
//! of the models and their base (no report files); `--sweep` also times, in the same rounds, each
//! merge as a sweep (all its points written from one read) and each of its points merged alone,
//! and gives the sweep's time in units of one point alone (their mean).

use amalgam::size::{format_bytes, parse_bytes};
use amalgam::synth::{Layout, SynthOptions};
use anyhow::{bail, Context, Result};
use clap::Args;
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    /// Folder for the synthetic models (kept and reused between runs)
    #[arg(long, default_value = "bench-data")]
    dir: PathBuf,
    /// Model counts to measure, comma-separated
    #[arg(long, value_delimiter = ',', default_value = "8,32")]
    n: Vec<usize>,
    /// Shrink factor of the synthetic SDXL models (4 = 1/16 of the parameters)
    #[arg(long, default_value_t = 4)]
    shrink: usize,
    /// Methods to run, comma-separated (any of `amalgam methods`; those with a base get
    /// base.safetensors; a method with one-model slots only gets that many models, not N),
    /// `all` for every method, and `compare` for `amalgam compare` of the models and their base
    #[arg(long, value_delimiter = ',', default_value = "soup,task_arithmetic")]
    methods: Vec<String>,
    /// Worker threads for the merges and the read baseline (0 = one per core)
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    memory_budget: u64,
    /// Accumulation precision passed to the merges
    #[arg(long, default_value = "f32")]
    compute_dtype: String,
    /// Rounds per measurement; the best time of each kind is reported
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Another amalgam binary (an older build) to run the same merges with, in the same rounds
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Also run each merge as a sweep with these axes (NAME=V1,V2,...; repeatable; every
    /// combination), and each point alone, in the same rounds; report the sweep's time in units
    /// of one point merged alone
    #[arg(long = "sweep", value_name = "NAME=V1,V2,...")]
    sweeps: Vec<String>,
}

/// What one merge process took.
struct Measured {
    wall: f64,
    /// Bytes it read through read() and pread() (`rchar` of /proc/PID/io; 0 where unknown).
    read: u64,
    /// Its peak resident set size.
    rss: u64,
}

/// Runs `cmd` and measures its wall time (bytes read and peak RSS are not known here).
#[cfg(not(unix))]
fn measure(cmd: &mut std::process::Command) -> Result<Measured> {
    let t = Instant::now();
    if !cmd.status()?.success() {
        bail!("merge failed: {cmd:?}");
    }
    Ok(Measured {
        wall: t.elapsed().as_secs_f64(),
        read: 0,
        rss: 0,
    })
}

/// Runs `cmd` and measures it: wall time, bytes read and peak RSS from the kernel's accounting
/// of the process (read after it exits and before it is reaped).
#[cfg(unix)]
fn measure(cmd: &mut std::process::Command) -> Result<Measured> {
    let t = Instant::now();
    let child = cmd.spawn()?;
    let pid = child.id() as libc::pid_t;
    // SAFETY: plain system calls on our own child; `info` and `usage` are written by the kernel.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        if libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOWAIT,
        ) != 0
        {
            bail!("waiting for {cmd:?}: {}", std::io::Error::last_os_error());
        }
        let wall = t.elapsed().as_secs_f64();
        let read = std::fs::read_to_string(format!("/proc/{pid}/io"))
            .ok()
            .and_then(|io| {
                io.lines()
                    .find_map(|l| l.strip_prefix("rchar:"))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0);
        let mut status = 0;
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::wait4(pid, &mut status, 0, &mut usage) != pid {
            bail!("reaping {cmd:?}: {}", std::io::Error::last_os_error());
        }
        if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
            bail!("merge failed: {cmd:?}");
        }
        Ok(Measured {
            wall,
            read,
            rss: usage.ru_maxrss as u64 * 1024,
        })
    }
}

fn read_all(files: &[PathBuf], threads: usize) -> Result<(f64, u64)> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let t = Instant::now();
    let total: u64 = pool.install(|| {
        files
            .par_iter()
            .map(|p| -> Result<u64> {
                use std::io::Read;
                let mut f = std::fs::File::open(p)?;
                // Placed as the merge places its buffers (reads start at multiples of 8 MiB):
                // where malloc puts a buffer would otherwise decide whether the kernel's copy
                // runs at full speed.
                let mut words = Vec::new();
                let buf = amalgam::io::input::line_matched_bytes(&mut words, 8 << 20, 0, 1);
                let mut n = 0u64;
                loop {
                    let k = f.read(buf)?;
                    if k == 0 {
                        break;
                    }
                    n += k as u64;
                }
                Ok(n)
            })
            .sum::<Result<u64>>()
    })?;
    Ok((t.elapsed().as_secs_f64(), total))
}

/// Seconds to write `len` bytes to a new file in `dir` on one thread (8 MiB at a time, as
/// `read_all` reads), the file removed afterwards: what writing a merge's output costs at least.
fn write_new(dir: &Path, len: u64) -> Result<f64> {
    use std::io::Write;
    let path = dir.join("bench-write.tmp");
    let mut words = Vec::new();
    let buf = amalgam::io::input::line_matched_bytes(&mut words, 8 << 20, 0, 1);
    buf.fill(1);
    let t = Instant::now();
    let mut f = std::fs::File::create(&path)?;
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    drop(f);
    let s = t.elapsed().as_secs_f64();
    std::fs::remove_file(&path)?;
    Ok(s)
}

/// Every combination of the sweep axes' values, each as `NAME=VALUE` parameters.
fn sweep_points(specs: &[String]) -> Result<Vec<Vec<String>>> {
    let mut points = vec![Vec::new()];
    for spec in specs {
        let (name, values) = spec
            .split_once('=')
            .with_context(|| format!("--sweep `{spec}`: expected NAME=V1,V2,..."))?;
        points = points
            .into_iter()
            .flat_map(|p| {
                values.split(',').map(move |v| {
                    let mut q = p.clone();
                    q.push(format!("{name}={}", v.trim()));
                    q
                })
            })
            .collect();
    }
    Ok(points)
}

/// Removes the outputs and the table a bench sweep wrote.
fn remove_sweep_outputs(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        if name.is_some_and(|n| n.starts_with("bench-sweep")) {
            std::fs::remove_file(&p)?;
        }
    }
    Ok(())
}

fn ensure_models(dir: &Path, n: usize, shrink: usize) -> Result<Vec<PathBuf>> {
    let paths: Vec<PathBuf> = std::iter::once(dir.join("base.safetensors"))
        .chain((0..n).map(|i| dir.join(format!("m{i:03}.safetensors"))))
        .collect();
    let stamp = dir.join(format!("synth-shrink{shrink}-n{n}.ok"));
    if stamp.exists() && paths.iter().all(|p| p.is_file()) {
        return Ok(paths);
    }
    eprintln!(
        "synthesising {} SDXL-layout models (shrink {shrink}) in {}",
        n + 1,
        dir.display()
    );
    let mut o = SynthOptions::new(Layout::SdxlSgm, n);
    o.shrink = shrink;
    o.overwrite = true;
    let t = Instant::now();
    let written = amalgam::synth::synthesize(dir, &o)?;
    eprintln!("  done in {:.1} s", t.elapsed().as_secs_f64());
    std::fs::write(&stamp, "")?;
    Ok(written)
}

/// Whether `method`'s first slot is a base (it then gets base.safetensors).
fn takes_base(method: &str) -> Result<bool> {
    Ok(amalgam::methods::info(method)?
        .slots
        .first()
        .is_some_and(|s| s.name == "base"))
}

/// The files `method` merges from a pool of N (`all` is the base then the fine-tunes): the base
/// when its first slot is one, then one fine-tune per one-model slot and, when it has a list
/// slot, the rest of the N. A two-model method merges two of them, whatever N.
fn bench_inputs(method: &str, all: &[PathBuf], n: usize) -> Result<Vec<PathBuf>> {
    if method == "compare" {
        return Ok(all[..=n].to_vec());
    }
    let info = amalgam::methods::info(method)?;
    let base = usize::from(takes_base(method)?);
    let ones = info
        .slots
        .iter()
        .filter(|s| s.kind == amalgam::method::SlotKind::One)
        .count()
        - base;
    let listed = info
        .slots
        .iter()
        .any(|s| s.kind == amalgam::method::SlotKind::Many);
    let models = if listed { n.max(ones + 1) } else { ones };
    if models > n {
        bail!("`{method}` takes {models} models; --n {n} is too few");
    }
    Ok(all[1 - base..=models].to_vec())
}

/// `--methods` with `all` expanded to every method that merges models (presets included; the
/// whole-model methods and output stages are not in it).
fn expand_methods(methods: &[String]) -> Vec<String> {
    methods
        .iter()
        .flat_map(|m| {
            if m == "all" {
                amalgam::methods::ALL
                    .iter()
                    .map(|i| i.name.to_string())
                    .collect()
            } else {
                vec![m.clone()]
            }
        })
        .collect()
}

pub fn run(a: BenchArgs) -> Result<()> {
    let max_n = *a.n.iter().max().context("--n is empty")?;
    let all = ensure_models(&a.dir, max_n, a.shrink)?;
    let exe = std::env::current_exe()?;
    let out = a.dir.join("bench-out.safetensors");
    let mut rows = Vec::new();
    for &n in &a.n {
        for method in &expand_methods(&a.methods) {
            // A method that fails (a two-model method given a list, a budget too small)
            // is a row saying so; the others still run.
            let measured = (|| -> Result<String> {
                let compare = method == "compare";
                let files = bench_inputs(method, &all, n)?;
                let with_base = compare || takes_base(method)?;
                // The models merged (the base aside): N, or fewer for a method with fixed slots.
                let merged = files.len() - usize::from(with_base);
                let merge_cmd = |exe: &Path, out: &Path| {
                    let mut cmd = std::process::Command::new(exe);
                    if compare {
                        cmd.arg("compare")
                            .arg("--base")
                            .arg(&files[0])
                            .args(&files[1..]);
                        cmd.arg("--quiet")
                            .arg("--threads")
                            .arg(a.threads.to_string());
                        return cmd;
                    }
                    cmd.arg("merge").arg("--method").arg(method);
                    if with_base {
                        cmd.arg("--base").arg(&files[0]).args(&files[1..]);
                    } else {
                        cmd.args(&files);
                    }
                    cmd.arg("-o").arg(out).arg("--force").arg("--quiet");
                    cmd.arg("--threads").arg(a.threads.to_string());
                    cmd.arg("--memory-budget").arg(a.memory_budget.to_string());
                    cmd.arg("--compute-dtype").arg(&a.compute_dtype);
                    cmd
                };
                let mut cmd = merge_cmd(&exe, &out);
                let sweep_out = a.dir.join("bench-sweep-{i}.safetensors");
                let mut sweep_cmd = (!a.sweeps.is_empty() && !compare).then(|| {
                    let mut c = merge_cmd(&exe, &sweep_out);
                    for s in &a.sweeps {
                        c.arg("--sweep").arg(s);
                    }
                    c.arg("--sweep-table").arg(a.dir.join("bench-sweep.json"));
                    c
                });
                let (mut sweep_s, mut sweep_read) = (f64::MAX, 0u64);
                // Each point of the sweep merged alone (its values as --param).
                let points = sweep_points(&a.sweeps)?;
                let mut alone_s = vec![f64::MAX; points.len()];
                let mut base_cmd = a.baseline.as_deref().map(|b| merge_cmd(b, &out));
                let (mut base_s, mut base_read, mut base_rss) = (f64::MAX, 0u64, 0u64);
                let mut merge_read = 0u64;
                // Best of `repeat` rounds; each round warms the page cache, then times one read of
                // every input on one thread and on all threads, then the merge. The machine's page
                // cache is not guaranteed to keep the inputs between rounds, hence the warm-up.
                let (mut read_s, mut pread_s, mut merge_s, mut rss, mut bytes) =
                    (f64::MAX, f64::MAX, f64::MAX, 0u64, 0u64);
                let mut write_s = f64::MAX;
                for _ in 0..a.repeat.max(1) {
                    // A new file, not a replacement (ext4 flushes a file renamed over another at
                    // once), and earlier outputs flushed first so their writeback does not overlap.
                    let _ = std::fs::remove_file(&out);
                    let _ = std::process::Command::new("sync").status();
                    read_all(&files, a.threads)?;
                    let (r, b) = read_all(&files, 1)?;
                    let (pr, _) = read_all(&files, a.threads)?;
                    let run = measure(&mut cmd)?;
                    let m = run.wall;
                    merge_read = run.read;
                    rss = rss.max(run.rss);
                    // Writing a file of the output's size, as the merge just did.
                    let out_len = if compare {
                        0
                    } else {
                        std::fs::metadata(&out)?.len()
                    };
                    let _ = std::process::Command::new("sync").status();
                    write_s = write_s.min(write_new(&a.dir, out_len)?);
                    // The sweep in the same round, its outputs removed afterwards.
                    if let Some(sc) = sweep_cmd.as_mut() {
                        let _ = std::process::Command::new("sync").status();
                        let run = measure(sc)?;
                        sweep_s = sweep_s.min(run.wall);
                        sweep_read = run.read;
                        remove_sweep_outputs(&a.dir)?;
                        for (p, best) in points.iter().zip(alone_s.iter_mut()) {
                            let mut c = merge_cmd(&exe, &out);
                            for v in p {
                                c.arg("--param").arg(v);
                            }
                            let _ = std::fs::remove_file(&out);
                            let _ = std::process::Command::new("sync").status();
                            *best = best.min(measure(&mut c)?.wall);
                        }
                    }
                    (read_s, pread_s, merge_s, bytes) =
                        (read_s.min(r), pread_s.min(pr), merge_s.min(m), b);
                    // The baseline in the same round, on the same warm cache.
                    if let Some(bc) = base_cmd.as_mut() {
                        let _ = std::fs::remove_file(&out);
                        let _ = std::process::Command::new("sync").status();
                        let run = measure(bc)?;
                        base_s = base_s.min(run.wall);
                        base_read = run.read;
                        base_rss = base_rss.max(run.rss);
                    }
                }
                let baseline = if a.baseline.is_some() {
                    format!(
                        " {base_s:.2} s | {:.2}x | {:.2}x | {} |",
                        merge_s / base_s,
                        base_read as f64 / bytes as f64,
                        format_bytes(base_rss)
                    )
                } else {
                    String::new()
                };
                let sweep = if sweep_cmd.is_some() {
                    let mean = alone_s.iter().sum::<f64>() / alone_s.len() as f64;
                    format!(
                        " {} | {sweep_s:.2} s | {mean:.2} s | {:.2} | {:.2}x |",
                        points.len(),
                        sweep_s / mean,
                        sweep_read as f64 / bytes as f64
                    )
                } else if a.sweeps.is_empty() {
                    String::new()
                } else {
                    " - | - | - | - | - |".to_string()
                };
                let row = format!(
                    "| {method} | {merged} | {} | {read_s:.2} s ({:.1} GB/s) | {pread_s:.2} s | {write_s:.2} s | {merge_s:.2} s ({:.1} GB/s) | {:.2}x | {:.2}x | {:.2}x | {:.2}x | {} |{baseline}",
                    format_bytes(bytes),
                    bytes as f64 / read_s / 1e9,
                    bytes as f64 / merge_s / 1e9,
                    merge_s / read_s,
                    merge_s / pread_s,
                    merge_s / (read_s + write_s),
                    merge_read as f64 / bytes as f64,
                    format_bytes(rss)
                ) + &sweep;
                Ok(row)
            })();
            let row = match measured {
                Ok(row) => row,
                Err(e) => format!(
                    "| {method} | {n} | failed: {} |",
                    e.to_string().lines().next().unwrap_or("")
                ),
            };
            eprintln!("{row}");
            rows.push(row);
        }
    }
    let _ = std::fs::remove_file(&out);
    let extra = if a.baseline.is_some() {
        (
            " baseline (wall) | merge / baseline | baseline read / input | baseline peak RSS |",
            "---|---|---|---|",
        )
    } else {
        ("", "")
    };
    let sweep = if a.sweeps.is_empty() {
        ("", "")
    } else {
        (
            " sweep points K | sweep (wall) | one point alone (mean wall) | sweep / one point | sweep read / input |",
            "---|---|---|---|---|",
        )
    };
    println!("| method | N | input | warm read, 1 thread | warm read, all threads | write output, 1 thread | merge (wall) | merge / read 1T | merge / read all | merge / (read + write) 1T | read / input | peak RSS |{}{}", extra.0, sweep.0);
    println!(
        "|---|---|---|---|---|---|---|---|---|---|---|---|{}{}",
        extra.1, sweep.1
    );
    for r in rows {
        println!("{r}");
    }
    Ok(())
}
