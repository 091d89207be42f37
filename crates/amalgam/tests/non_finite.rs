//! NaN and Inf in the inputs (`--non-finite omit|error|keep`): a model whose tensor for a key holds
//! them is left out of that key exactly as if it lacked the key, the merge stops naming file, key
//! and count, or the values are kept; the output's non-finite values are always reported.
mod common;
use amalgam::io::dtype::OutputDtype;
use amalgam::io::non_finite::{InputNonFinite, NonFinite};
use amalgam::{merge, Error, MergeOptions, MergeReport, NoProgress, Progress};
use common::*;
use std::path::{Path, PathBuf};

/// Elements of key `a`: several blocks, so that it is cut into several tasks.
const A: usize = 40_000;

fn values(n: usize, m: usize, salt: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7 + m * 3 + salt) % 11) as f32 * 0.1 - 0.5 + m as f32 * 0.05)
        .collect()
}

/// Model `m`: keys `a` (holding `bad` values at the given indices, or lacking `a` when `None`),
/// `b` and `c` (a matrix).
fn model(dir: &Path, name: &str, m: usize, a: Option<&[(usize, f32)]>) -> PathBuf {
    let mut tensors = Vec::new();
    if let Some(bad) = a {
        let mut v = values(A, m, 0);
        for &(i, x) in bad {
            v[i] = x;
        }
        tensors.push(f32t("a", &[A], &v));
    }
    tensors.push(f32t("b", &[1000], &values(1000, m, 1)));
    tensors.push(f32t("c", &[6, 5], &values(30, m, 2)));
    write_file(&dir.join(format!("{name}.safetensors")), &tensors, true)
}

const BAD: &[(usize, f32)] = &[
    (100, f32::INFINITY),
    (35_000, f32::NAN),
    (39_999, -f32::INFINITY),
];

/// The slots of `method` over four models: one-model slots take model 0, lists models 1-3.
fn slots(method: &str) -> Vec<Vec<usize>> {
    slots_for(method, 1..4)
}

fn opts(out: &Path, policy: NonFinite) -> MergeOptions {
    let mut o = MergeOptions::new(out);
    o.output_dtype = OutputDtype::F32;
    o.non_finite = policy;
    o.chunk_override = Some(amalgam::engine::BLOCK);
    o
}

fn bits(path: &Path, key: &str) -> Vec<u32> {
    read_f32(path, key).iter().map(|x| x.to_bits()).collect()
}

/// With `omit`, every method's output for a key where one model holds NaN/Inf is, bit for bit,
/// the output of the same merge where that model lacks the key; the other keys are as without
/// the bad values; the report names the model, key and count.
#[test]
fn omit_is_exactly_a_missing_key_for_every_method() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut failures = Vec::new();
    for info in amalgam::methods::ALL {
        for bad_model in [0, 2] {
            if !slots(info.name).iter().flatten().any(|&m| m == bad_model) {
                continue;
            }
            let with_bad: Vec<PathBuf> = (0..4)
                .map(|m| {
                    let a = if m == bad_model { BAD } else { &[] };
                    model(d, &format!("bad{bad_model}-{m}"), m, Some(a))
                })
                .collect();
            let without: Vec<PathBuf> = (0..4)
                .map(|m| {
                    let a = if m == bad_model { None } else { Some(&[][..]) };
                    model(d, &format!("lack{bad_model}-{m}"), m, a)
                })
                .collect();
            let run = |inputs: &[PathBuf], tag: &str| -> (PathBuf, MergeReport) {
                let refs: Vec<&Path> = inputs.iter().map(|p| p.as_path()).collect();
                let g = one_node(&refs, info.name, slots(info.name), &[]);
                let out = d.join(format!("{}-{bad_model}-{tag}.safetensors", info.name));
                let r = merge(&g, &opts(&out, NonFinite::Omit), &NoProgress)
                    .unwrap_or_else(|e| panic!("{} {tag}: {e}", info.name));
                (out, r)
            };
            let (got, report) = run(&with_bad, "omit");
            let (want, _) = run(&without, "lacking");
            for key in ["a", "b", "c"] {
                if bits(&got, key) != bits(&want, key) {
                    failures.push(format!(
                        "{} (bad model {bad_model}): key {key} differs from the merge without it",
                        info.name
                    ));
                }
            }
            if !read_f32(&got, "a").iter().all(|x| x.is_finite()) {
                failures.push(format!("{}: the output holds NaN/Inf", info.name));
            }
            let expected = vec![InputNonFinite {
                key: "a".into(),
                model: bad_model,
                count: BAD.len() as u64,
                omitted: true,
            }];
            if report.inputs_non_finite != expected || !report.outputs_non_finite.is_empty() {
                failures.push(format!(
                    "{}: report {:?} / {:?}",
                    info.name, report.inputs_non_finite, report.outputs_non_finite
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// One NaN used to turn karcher's and model_stock's whole tensor into NaN.
#[test]
fn one_nan_no_longer_poisons_karcher_or_model_stock() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let paths: Vec<PathBuf> = (0..4)
        .map(|m| {
            let a: &[(usize, f32)] = if m == 3 { &[(7, f32::NAN)] } else { &[] };
            model(d, &format!("m{m}"), m, Some(a))
        })
        .collect();
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    for method in ["karcher", "model_stock"] {
        for policy in [NonFinite::Keep, NonFinite::Omit] {
            let g = one_node(&refs, method, slots(method), &[]);
            let out = d.join(format!("{method}-{policy}.safetensors"));
            let report = merge(&g, &opts(&out, policy), &NoProgress).unwrap();
            let a = read_f32(&out, "a");
            let bad = a.iter().filter(|x| !x.is_finite()).count() as u64;
            match policy {
                // Kept, and the report says so.
                NonFinite::Keep => {
                    assert!(bad >= 1, "{method} keep");
                    assert_eq!(report.outputs_non_finite, vec![("a".to_string(), bad)]);
                    assert!(!report.inputs_non_finite[0].omitted);
                }
                _ => {
                    assert_eq!(bad, 0, "{method} omit");
                    assert!(report.outputs_non_finite.is_empty());
                    assert_eq!(report.inputs_non_finite[0].model, 3);
                    assert_eq!(report.inputs_non_finite[0].count, 1);
                }
            }
        }
    }
}

/// Three models, the second holding [`BAD`] in key `a`.
fn soup_pool(d: &Path) -> Vec<PathBuf> {
    (0..3)
        .map(|m| model(d, &format!("m{m}"), m, Some(if m == 1 { BAD } else { &[] })))
        .collect()
}

/// `error` stops the merge naming file, key and count, and leaves nothing behind.
#[test]
fn error_names_file_key_and_count_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let paths = soup_pool(d);
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let out = d.join("out.safetensors");
    let g = one_node(&refs, "soup", vec![vec![0, 1, 2]], &[]);
    match merge(&g, &opts(&out, NonFinite::Error), &NoProgress) {
        Err(Error::NonFinite { path, key, count }) => {
            assert_eq!(path, std::fs::canonicalize(&paths[1]).unwrap());
            assert_eq!((key.as_str(), count), ("a", BAD.len() as u64));
        }
        other => panic!("expected a non-finite error, got {other:?}"),
    }
    assert!(!out.exists());
    assert_eq!(files_containing(d, "out.safetensors"), Vec::<String>::new());
}

/// When no other model has the key, it is merged as it is (NaN kept, not zeroed) and reported.
#[test]
fn a_key_only_bad_models_have_is_kept_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let paths: Vec<PathBuf> = (0..3)
        .map(|m| {
            model(
                d,
                &format!("m{m}"),
                m,
                if m == 1 { Some(BAD) } else { None },
            )
        })
        .collect();
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let out = d.join("out.safetensors");
    let g = one_node(&refs, "soup", vec![vec![0, 1, 2]], &[]);
    let report = merge(&g, &opts(&out, NonFinite::Omit), &NoProgress).unwrap();
    assert_eq!(bits(&out, "a"), bits(&paths[1], "a"));
    assert_eq!(
        report.outputs_non_finite,
        vec![("a".into(), BAD.len() as u64)]
    );
    assert!(!report.inputs_non_finite[0].omitted);
    let text = report.to_string();
    assert!(
        text.contains("holds NaN/Inf values in 1 keys, merged as they are"),
        "{text}"
    );
    assert!(
        text.contains("warning: the output holds 3 NaN/Inf values"),
        "{text}"
    );
}

/// An f16 output that overflows is reported, whatever the inputs.
#[test]
fn output_overflow_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = write_file(
        &d.join("big.safetensors"),
        &[f32t("x", &[4], &[1.0, 70000.0, -1e6, 2.0])],
        true,
    );
    let out = d.join("out.safetensors");
    let g = one_node(&[&p, &p], "soup", vec![vec![0, 1]], &[]);
    let mut o = opts(&out, NonFinite::Omit);
    o.output_dtype = OutputDtype::F16;
    let report = merge(&g, &o, &NoProgress).unwrap();
    assert!(report.inputs_non_finite.is_empty());
    assert_eq!(report.outputs_non_finite, vec![("x".into(), 2)]);
}

/// Cancels the merge once key `a` is written the second time (computed again without the bad
/// model), so that the run stops after journaling it, before the output is moved into place.
struct CancelOnRedo {
    cancel: amalgam::Cancel,
    seen: std::sync::atomic::AtomicUsize,
    tasks: usize,
}
impl Progress for CancelOnRedo {
    fn advance(&self, _bytes: u64, _keys: usize, key: &str) {
        if key != "a" {
            return;
        }
        let seen = self.seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if seen == 2 * self.tasks {
            self.cancel.cancel();
        }
    }
}

/// A resumed run reports the non-finite values of the keys the interrupted run wrote, and writes
/// the same bytes.
#[test]
fn a_resumed_run_reports_what_the_first_found() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let paths = soup_pool(d);
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let g = one_node(&refs, "soup", vec![vec![0, 1, 2]], &[]);
    let plain = d.join("plain.safetensors");
    let want = merge(&g, &opts(&plain, NonFinite::Omit), &NoProgress).unwrap();

    let out = d.join("out.safetensors");
    let mut o = opts(&out, NonFinite::Omit);
    o.keep_partial = true;
    let progress = CancelOnRedo {
        cancel: o.cancel.clone(),
        seen: Default::default(),
        tasks: A.div_ceil(amalgam::engine::BLOCK),
    };
    assert!(matches!(merge(&g, &o, &progress), Err(Error::Cancelled)));
    assert!(!out.exists());
    let o = opts(&out, NonFinite::Omit);
    let got = merge(&g, &o, &NoProgress).unwrap();
    assert!(
        got.notes
            .iter()
            .any(|n| n.starts_with("resumed: 3 of 3 keys")),
        "{:?}",
        got.notes
    );
    assert_eq!(got.inputs_non_finite, want.inputs_non_finite);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&plain).unwrap());
}
