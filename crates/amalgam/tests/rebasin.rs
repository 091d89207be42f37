//! Re-basin: `rebasin(randperm(A), ref = A)` gives A back bit for bit (SD1 and SDXL, as two runs
//! and as one recipe whose input is a node); the permuted model differs from A exactly on the
//! permuted keys; the bytes do not depend on the thread count or the budget.

mod common;
use amalgam::io::dtype::OutputDtype;
use amalgam::layout::arch::Layout;
use amalgam::{merge, Graph, MergeOptions, NoProgress};
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn run(g: &Graph, out: &Path, threads: usize, budget: u64) -> amalgam::report::MergeReport {
    let mut o = MergeOptions::new(out);
    o.output_dtype = OutputDtype::F32;
    o.seed = 7;
    o.threads = threads;
    o.memory_budget = budget;
    o.overwrite = true;
    merge(g, &o, &NoProgress).unwrap()
}

fn single(method: &str, models: &[&PathBuf]) -> Graph {
    Graph::single(
        method,
        None,
        models.iter().map(|p| (*p).clone()).collect(),
        BTreeMap::new(),
    )
    .unwrap()
}

#[test]
fn rebasin_of_a_permuted_model_is_the_model() {
    for (layout, shrink) in [(Layout::Sd1Ldm, 8), (Layout::SdxlSgm, 32)] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let pool = f32_pool(d, layout, 0, shrink);
        let a = &pool[0];
        let permuted = d.join("permuted.safetensors");
        let report = run(&single("randperm", &[a]), &permuted, 0, 1 << 30);
        assert!(
            report
                .notes
                .iter()
                .any(|n| n.contains("permuted at random")),
            "{report}"
        );
        let (orig, perm) = (all_f32(a), all_f32(&permuted));
        let moved: Vec<&String> = orig.keys().filter(|k| orig[*k] != perm[*k]).collect();
        assert!(moved.len() > 100, "{layout}: {} keys moved", moved.len());
        for k in &moved {
            // A permutation: the same values, in another order.
            let (mut x, mut y) = (orig[*k].clone(), perm[*k].clone());
            x.sort_by(f32::total_cmp);
            y.sort_by(f32::total_cmp);
            assert_eq!(x, y, "{k}");
        }
        assert!(moved
            .iter()
            .all(|k| !k.contains("norm") && !k.contains("first_stage")));

        let back = d.join("back.safetensors");
        let report = run(&single("rebasin", &[&permuted, a]), &back, 0, 1 << 30);
        let note = report
            .notes
            .iter()
            .find(|n| n.contains("(rebasin)"))
            .unwrap();
        assert!(note.contains("groups permuted"), "{note}");
        assert_eq!(all_f32(&back), orig, "{layout}: {note}");

        // One recipe: rebasin(randperm(A), A), the node merged to a temporary file first; the
        // same bytes for 1 or 2 threads and a small budget.
        let text = format!(
            "[models]\na = \"{}\"\n[nodes.p]\nmethod = \"randperm\"\na = \"a\"\n\
             [nodes.r]\nmethod = \"rebasin\"\na = \"p\"\nref = \"a\"\n[output]\nnode = \"r\"\n",
            a.display()
        );
        let g = amalgam::recipe::parse(&text, "r.toml", d).unwrap().graph;
        let one = d.join("one.safetensors");
        run(&g, &one, 1, 1 << 30);
        assert_eq!(all_f32(&one), orig, "{layout}: one recipe");
        let two = d.join("two.safetensors");
        run(&g, &two, 2, 64 << 20);
        assert_eq!(
            std::fs::read(&one).unwrap(),
            std::fs::read(&two).unwrap(),
            "threads and budget"
        );
        let left: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("amalgam"))
            .collect();
        assert!(left.is_empty(), "temporary files left: {left:?}");
    }
}

#[test]
fn other_architectures_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = write_file(
        &d.join("a.safetensors"),
        &[f32t("w", &[2, 2], &[1.0, 2.0, 3.0, 4.0])],
        false,
    );
    let mut o = MergeOptions::new(d.join("o.safetensors"));
    o.output_dtype = OutputDtype::F32;
    let e = merge(&single("randperm", &[&a]), &o, &NoProgress)
        .unwrap_err()
        .to_string();
    assert!(e.contains("randperm") && e.contains("SD1"), "{e}");
}

/// A noisy fine-tune of the base (the synthetic fine-tune's difference times `k`), permuted,
/// matched back to the base: the matching's objective is at least the identity's, and the
/// planted permutation is recovered for all but a small fraction of the elements.
#[test]
fn a_permuted_noisy_fine_tune_is_matched_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pool = f32_pool(d, Layout::Sd1Ldm, 1, 8);
    // Noise of 0.5%, 50% and 100% of the weights' spread (the base is N(0, 0.02²)).
    for (k, bound) in [(1.0, 0.0), (10.0, 1e-3), (20.0, 1e-2)] {
        let noisy = d.join("noisy.safetensors");
        let mut g = Graph::single(
            "task_arithmetic",
            Some(pool[0].clone()),
            vec![pool[1].clone()],
            [("lambda".to_string(), amalgam::method::ParamValue::Number(k))].into(),
        )
        .unwrap();
        g.fallback = None;
        run(&g, &noisy, 0, 1 << 30);
        let permuted = d.join("permuted.safetensors");
        run(&single("randperm", &[&noisy]), &permuted, 0, 1 << 30);
        let back = d.join("back.safetensors");
        let report = run(
            &single("rebasin", &[&permuted, &pool[0]]),
            &back,
            0,
            1 << 30,
        );
        let note = report
            .notes
            .iter()
            .find(|n| n.contains("(rebasin)"))
            .unwrap();
        let values: Vec<f64> = note
            .rsplit("reference ")
            .next()
            .unwrap()
            .split(" -> ")
            .map(|x| x.parse().unwrap())
            .collect();
        assert!(values[1] >= values[0], "{note}");
        let (want, got, perm) = (all_f32(&noisy), all_f32(&back), all_f32(&permuted));
        let (mut total, mut wrong) = (0usize, 0usize);
        for (key, v) in &want {
            if v == &perm[key] {
                continue; // not permuted
            }
            total += v.len();
            wrong += v.iter().zip(&got[key]).filter(|(x, y)| x != y).count();
        }
        let fraction = wrong as f64 / total as f64;
        eprintln!(
            "k = {k}: {note}; {wrong} of {total} permuted elements not recovered ({fraction:.2e})"
        );
        assert!(fraction <= bound, "k = {k}: {fraction}");
    }
}

/// MergeMany of a base and two of its fine-tunes, each permuted at random: the mean of the
/// unpermuted models (their soup), in the base's unit order.
#[test]
fn merge_many_of_permuted_copies_is_their_soup() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pool = f32_pool(d, Layout::Sd1Ldm, 2, 8);
    let mut copies = vec![pool[0].clone()];
    for (i, m) in pool[1..].iter().enumerate() {
        let p = d.join(format!("p{i}.safetensors"));
        let mut o = MergeOptions::new(&p);
        o.output_dtype = OutputDtype::F32;
        o.seed = 100 + i as u64;
        merge(&single("randperm", &[m]), &o, &NoProgress).unwrap();
        assert_ne!(all_f32(&p), all_f32(m));
        copies.push(p);
    }
    let refs: Vec<&PathBuf> = copies.iter().collect();
    let merged = d.join("merged.safetensors");
    let report = run(&single("merge_many", &refs), &merged, 0, 1 << 30);
    let note = report
        .notes
        .iter()
        .find(|n| n.contains("(merge_many)"))
        .unwrap();
    let soup = d.join("soup.safetensors");
    run(
        &single("soup", &pool.iter().collect::<Vec<_>>()),
        &soup,
        0,
        1 << 30,
    );
    let (got, want) = (all_f32(&merged), all_f32(&soup));
    eprintln!("{note}");
    let bad: Vec<&String> = want
        .iter()
        .filter(|(k, v)| v.iter().zip(&got[*k]).any(|(x, y)| (x - y).abs() > 1e-6))
        .map(|(k, _)| k)
        .collect();
    assert!(
        bad.is_empty(),
        "{} keys differ, e.g. {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    // The same bytes for 1 and 2 threads.
    let again = d.join("again.safetensors");
    run(&single("merge_many", &refs), &again, 1, 64 << 20);
    assert_eq!(
        std::fs::read(&merged).unwrap(),
        std::fs::read(&again).unwrap()
    );
}

/// MergeMany of a model and two copies permuted at random: the model, bit for bit.
#[test]
fn merge_many_of_permuted_copies_of_one_model_is_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pool = f32_pool(d, Layout::Sd1Ldm, 0, 8);
    let p = d.join("p.safetensors");
    run(&single("randperm", &[&pool[0]]), &p, 0, 1 << 30);
    let q = d.join("q.safetensors");
    let mut o = MergeOptions::new(&q);
    o.output_dtype = OutputDtype::F32;
    o.seed = 99;
    merge(&single("randperm", &[&pool[0]]), &o, &NoProgress).unwrap();
    let merged = d.join("merged.safetensors");
    run(
        &single("merge_many", &[&pool[0], &p, &q]),
        &merged,
        0,
        1 << 30,
    );
    let (got, want) = (all_f32(&merged), all_f32(&pool[0]));
    let bad: Vec<&String> = want
        .iter()
        .filter(|(k, v)| *v != &got[*k])
        .map(|(k, _)| k)
        .collect();
    assert!(
        bad.is_empty(),
        "{} {:?}",
        bad.len(),
        &bad[..bad.len().min(3)]
    );
}
