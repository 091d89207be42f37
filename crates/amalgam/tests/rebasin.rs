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

fn with_params(method: &str, models: &[&PathBuf], params: &[(&str, f64)]) -> Graph {
    Graph::single(
        method,
        None,
        models.iter().map(|p| (*p).clone()).collect(),
        params
            .iter()
            .map(|(k, v)| (k.to_string(), amalgam::method::ParamValue::Number(*v)))
            .collect(),
    )
    .unwrap()
}

/// The SD driver: alpha 0 gives a; keys no group touches are the weighted sum (1 − α)a + αb
/// (walked keys) or a; basin_sum mixes the walk back with the weighted sum; deterministic.
#[test]
fn the_sd_driver_and_basin_sum() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pool = f32_pool(d, Layout::SdxlSgm, 1, 32);
    let (a, b) = (&pool[0], &pool[1]);
    let out = d.join("zero.safetensors");
    run(
        &with_params("rebasin_merge", &[a, b], &[("alpha", 0.0)]),
        &out,
        0,
        1 << 30,
    );
    assert_eq!(all_f32(&out), all_f32(a), "alpha 0");

    let walked = d.join("walked.safetensors");
    let report = run(
        &with_params(
            "rebasin_merge",
            &[a, b],
            &[("alpha", 0.4), ("iterations", 5.0)],
        ),
        &walked,
        0,
        1 << 30,
    );
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("5 steps to alpha 0.4")),
        "{report}"
    );
    let basin = d.join("basin.safetensors");
    run(
        &with_params("basin_sum", &[a, b], &[("alpha", 0.4), ("iterations", 5.0)]),
        &basin,
        0,
        1 << 30,
    );
    let (va, vb, vw, vs) = (all_f32(a), all_f32(b), all_f32(&walked), all_f32(&basin));
    let spec = amalgam::layout::perms::perm_groups(Layout::SdxlSgm, |k| {
        Some(
            amalgam::io::input::ModelFile::open(a)
                .ok()?
                .tensors()
                .get(k)?
                .shape
                .clone(),
        )
    })
    .unwrap();
    let touched: std::collections::BTreeSet<&str> = spec
        .iter()
        .flat_map(|g| g.windows.iter().map(|w| w.key))
        .collect();
    for (k, x) in &va {
        let y = &vb[k];
        let walks = amalgam::rebasin::driver::walks(k);
        if !touched.contains(k.as_str()) {
            let want: Vec<f32> = x
                .iter()
                .zip(y)
                .map(|(&p, &q)| if walks { 0.6 * p + 0.4 * q } else { p })
                .collect();
            assert_close(&vw[k], &want, 1e-7);
        }
        // basin_sum = α(αa + (1 − α)b) + (1 − α)·walk, on every key.
        let want: Vec<f32> = x
            .iter()
            .zip(y)
            .zip(&vw[k])
            .map(|((&p, &q), &t)| 0.4 * (0.4 * p + 0.6 * q) + 0.6 * t)
            .collect();
        assert_close(&vs[k], &want, 1e-7);
    }
    // CLIP-G is not walked: a's.
    let g = "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.bias";
    assert_eq!(vw[g], va[g]);
    let again = d.join("again.safetensors");
    run(
        &with_params(
            "rebasin_merge",
            &[a, b],
            &[("alpha", 0.4), ("iterations", 5.0)],
        ),
        &again,
        1,
        64 << 20,
    );
    assert_eq!(
        std::fs::read(&walked).unwrap(),
        std::fs::read(&again).unwrap()
    );
}

/// The 215c recipe of docs/recipes.md (DGMLA X, amp = 2X − base, basin_sum(X, amp)) runs, its
/// DGMLA node merged once (for X; amp reads X's file), and equals the same basin_sum over the
/// two nodes merged first to files; the `fermat` preset (re-based from the base) is
/// `0.5·X + 0.5·rebasin_merge(base, amp, 0.5)`.
#[test]
fn the_fermat_recipe_merges_its_dgmla_node_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pool = f32_pool(d, Layout::Sd1Ldm, 2, 8);
    let models = |extra: &str| {
        format!(
            "[models]\nbase = \"{}\"\npool = [\"{}\", \"{}\"]\n\
             [nodes.x]\nmethod = \"dgmla\"\nbase = \"base\"\nmodels = [\"pool\"]\n\
             [nodes.delta]\nmethod = \"subtract\"\na = \"x\"\nb = \"base\"\n\
             [nodes.amp]\nmethod = \"add\"\na = \"base\"\nb = \"delta\"\nalpha = 2.0\n{extra}",
            pool[0].display(),
            pool[1].display(),
            pool[2].display()
        )
    };
    let recipe = models(
        "[nodes.c]\nmethod = \"basin_sum\"\na = \"x\"\nb = \"amp\"\niterations = 3\n\
         [output]\nnode = \"c\"\n",
    );
    let g = amalgam::recipe::parse(&recipe, "c.toml", d).unwrap().graph;
    let out = d.join("c215.safetensors");
    let report = run(&g, &out, 0, 1 << 30);
    let amp = report
        .notes
        .iter()
        .find(|n| n.starts_with("node `amp` merged once"))
        .unwrap();
    assert!(amp.contains("x (merged)"), "{amp}");
    // The same from the two nodes written first.
    let (x, amp) = (d.join("x.safetensors"), d.join("amp.safetensors"));
    for (node, file) in [("x", &x), ("amp", &amp)] {
        let g = amalgam::recipe::parse(
            &models(&format!("[output]\nnode = \"{node}\"\n")),
            "n.toml",
            d,
        )
        .unwrap()
        .graph;
        run(&g, file, 0, 1 << 30);
    }
    let two = d.join("two.safetensors");
    run(
        &with_params("basin_sum", &[&x, &amp], &[("iterations", 3.0)]),
        &two,
        0,
        1 << 30,
    );
    assert_eq!(all_f32(&out), all_f32(&two));
}

/// sd-mecha's `randperm` and `rebasin` in a `.mecha` recipe: read as amalgam's nodes (the recipe's
/// seed the run's; `iters` accepted), and the re-basin of the permuted model is the model.
#[test]
fn mecha_rebasin_and_randperm() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pool = f32_pool(d, Layout::SdxlSgm, 0, 32);
    let text = format!(
        "version 0.1.0\nmodel \"{}\" model_config=\"sdxl-sgm\" merge_space=\"weight\"\n\
         merge \"randperm\" &0 seed=5\nmerge \"rebasin\" &1 &0 iters=10\n",
        pool[0].display()
    );
    let p = d.join("r.mecha");
    std::fs::write(&p, text).unwrap();
    let r = amalgam::recipe::mecha::load(&p, &[]).unwrap();
    assert_eq!(r.seed, Some(5));
    let methods: Vec<&str> = r.graph.nodes.iter().map(|n| n.method).collect();
    assert_eq!(methods, ["randperm", "rebasin"]);
    let out = d.join("out.safetensors");
    run(&r.graph, &out, 0, 1 << 30);
    assert_eq!(all_f32(&out), all_f32(&pool[0]));
}

/// The driver walked all the way (alpha 1) to a permuted copy of a ends at a: the last step is b
/// itself, matched back to a's order.
#[test]
fn the_sd_driver_to_a_permuted_copy_ends_at_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pool = f32_pool(d, Layout::Sd1Ldm, 0, 8);
    let p = d.join("p.safetensors");
    run(&single("randperm", &[&pool[0]]), &p, 0, 1 << 30);
    for iterations in [1.0, 4.0] {
        let out = d.join("out.safetensors");
        let report = run(
            &with_params(
                "rebasin_merge",
                &[&pool[0], &p],
                &[("alpha", 1.0), ("iterations", iterations)],
            ),
            &out,
            0,
            1 << 30,
        );
        let note = report
            .notes
            .iter()
            .find(|n| n.contains("steps to alpha"))
            .unwrap();
        let (got, want) = (all_f32(&out), all_f32(&pool[0]));
        for (k, v) in &want {
            assert_close(&got[k], v, 1e-6);
        }
        eprintln!("{note}");
    }
}
