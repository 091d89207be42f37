//! One read of each input per key: multi-pass methods (DGMLA, TGMD, TIES-SOUP, model stock)
//! read their inputs once when a key fits the memory budget, the report says what was really
//! read, and a budget too small to hold a key streams it (several reads) with the same bytes.
mod common;
use amalgam::io::dtype::OutputDtype;
use amalgam::{merge, MergeOptions, NoProgress};
use common::*;
use std::path::{Path, PathBuf};

fn run(
    pool: &[PathBuf],
    base: &Path,
    method: &str,
    out: &Path,
    budget: u64,
) -> amalgam::MergeReport {
    let mut paths: Vec<&Path> = vec![base];
    paths.extend(pool.iter().map(|p| p.as_path()));
    let g = one_node(
        &paths,
        method,
        vec![vec![0], (1..paths.len()).collect()],
        &[],
    );
    let mut o = MergeOptions::new(out);
    o.output_dtype = OutputDtype::F16;
    o.memory_budget = budget;
    o.seed = 3;
    merge(&g, &o, &NoProgress).unwrap_or_else(|e| panic!("{method}: {e}"))
}

#[test]
fn multi_pass_methods_read_each_input_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let all = f32_pool(d, amalgam::layout::arch::Layout::SdxlSgm, 6, 32);
    let base = d.join("base.safetensors");
    let pool: Vec<PathBuf> = all.into_iter().filter(|p| *p != base).collect();
    for method in ["dgmla", "tgmd", "ties_soup", "model_stock", "della"] {
        let out = d.join(format!("{method}.safetensors"));
        let r = run(&pool, &base, method, &out, 2 << 30);
        let ratio = r.bytes_read as f64 / r.input_bytes as f64;
        assert!(
            (0.999..1.001).contains(&ratio),
            "{method}: read {} of {} input bytes ({ratio:.3}x)",
            r.bytes_read,
            r.input_bytes
        );
        assert!(
            !r.notes.iter().any(|n| n.contains("read once per pass")),
            "{method}: {:?}",
            r.notes
        );
        assert!(r.to_string().contains("(1.00x the inputs'"), "{r}");
    }
}

#[test]
fn keys_too_large_for_the_budget_are_streamed_with_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let all = f32_pool(d, amalgam::layout::arch::Layout::SdxlSgm, 4, 16);
    let base = d.join("base.safetensors");
    let pool: Vec<PathBuf> = all.into_iter().filter(|p| *p != base).collect();
    // (DGMLA's exact DELLA ranks of the largest tensors need more than this budget: they are
    // refused rather than streamed, see tests/ties.rs.)
    for method in ["tgmd", "model_stock"] {
        let held = d.join(format!("{method}-held.safetensors"));
        let streamed = d.join(format!("{method}-streamed.safetensors"));
        let a = run(&pool, &base, method, &held, 2 << 30);
        // 8 MiB: the largest keys (5 inputs of up to 6.5 MB in f32) exceed half the budget.
        let b = run(&pool, &base, method, &streamed, 8 << 20);
        assert_eq!(
            std::fs::read(&held).unwrap(),
            std::fs::read(&streamed).unwrap(),
            "{method}"
        );
        assert!(a.bytes_read <= a.input_bytes, "{method}");
        assert!(
            b.bytes_read > b.input_bytes,
            "{method}: {} {}",
            b.bytes_read,
            b.input_bytes
        );
        let note = b
            .notes
            .iter()
            .find(|n| n.contains("read once per pass"))
            .unwrap_or_else(|| panic!("{method}: {:?}", b.notes));
        // The largest tensor of the pool (49408 tokens × width) is the one streamed.
        assert!(note.contains("token_embedding.weight"), "{note}");
    }
}
