//! ISO-C, ISO-CTS and ISO-Z (spec §12-§13). ISO-C: hand-computed small matrices, the flat spectrum of its output on random
//! matrices (checked with an SVD of the output), the keys it averages, determinism, and the
//! budget error for a matrix that does not fit. ISO-Z: z = 1 is the delta, z = 0 is ISO-C of it,
//! other z shrink the spectrum as `m + z·(σ − m)`, one singular value gives no NaN.

mod common;
use amalgam::io::dtype::OutputDtype;
use amalgam::method::ParamValue::{self, Number, Text};
use amalgam::real::ComputeDtype;
use amalgam::{merge, MergeOptions, NoProgress};
use common::*;
use std::path::{Path, PathBuf};

/// A model: its tensors as (key, shape, values).
type Model = Vec<(&'static str, Vec<usize>, Vec<f64>)>;

/// Writes a base and fine-tunes (each a list of (key, shape, values)) and runs `iso_c`.
fn iso(
    dir: &Path,
    models: &[Model],
    params: &[(&str, ParamValue)],
    threads: usize,
    budget: u64,
) -> amalgam::Result<PathBuf> {
    run("iso_c", dir, models, params, threads, budget)
}

/// Writes the models and runs `method` (`iso_c`: base then fine-tunes; `iso_z`: one delta).
fn run(
    method: &str,
    dir: &Path,
    models: &[Model],
    params: &[(&str, ParamValue)],
    threads: usize,
    budget: u64,
) -> amalgam::Result<PathBuf> {
    let paths: Vec<PathBuf> = models
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let tensors: Vec<T> = m.iter().map(|(k, s, v)| f64t(k, s, v)).collect();
            write_file(&dir.join(format!("m{i}.safetensors")), &tensors, true)
        })
        .collect();
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let slots = match method {
        "iso_c" | "iso_cts" => vec![vec![0], (1..refs.len()).collect()],
        _ => vec![vec![0]],
    };
    let g = one_node(&refs, method, slots, params);
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out = dir.join(format!("out-{run}.safetensors"));
    let mut o = MergeOptions::new(&out);
    o.output_dtype = OutputDtype::F64;
    o.compute_dtype = ComputeDtype::F64;
    o.threads = threads;
    o.memory_budget = budget;
    merge(&g, &o, &NoProgress)?;
    Ok(out)
}

fn close(got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol,
            "element {i}: {g} != {w} (got {got:?})"
        );
    }
}

const GIB: u64 = 1 << 30;

#[test]
fn hand_computed_matrices() {
    let dir = tempfile::tempdir().unwrap();
    let m = |v: [f64; 4]| vec![("w", vec![2, 2], v.to_vec())];
    // Σ τ = diag(2, 4): σ = (4, 2), mean 3, U Vᵀ = I.
    let pool = [
        m([0.0; 4]),
        m([2.0, 0.0, 0.0, 0.0]),
        m([0.0, 0.0, 0.0, 4.0]),
    ];
    let out = iso(dir.path(), &pool, &[], 0, GIB).unwrap();
    close(&read_f64(&out, "w"), &[3.0, 0.0, 0.0, 3.0], 1e-12);
    // alpha and the geometric mean: 0.5 · √8.
    let params = [("alpha", Number(0.5)), ("mean", Text("geometric".into()))];
    let out = iso(dir.path(), &pool, &params, 0, GIB).unwrap();
    let g = 0.5 * 8f64.sqrt();
    close(&read_f64(&out, "w"), &[g, 0.0, 0.0, g], 1e-12);
    // Σ τ = [[0, −2], [4, 0]] = R·diag(4, 2) with R a quarter turn: Δ = 3·R, around a base of 1s.
    let pool = [m([1.0; 4]), m([1.0, -1.0, 5.0, 1.0]), m([1.0; 4])];
    let out = iso(dir.path(), &pool, &[], 0, GIB).unwrap();
    close(&read_f64(&out, "w"), &[1.0, -2.0, 4.0, 1.0], 1e-12);
    // A wide matrix: Σ τ = [[3, 0, 0], [0, 0, 4]]: σ = (4, 3), mean 3.5.
    let w = |v: [f64; 6]| vec![("w", vec![2, 3], v.to_vec())];
    let pool = [
        w([1.0; 6]),
        w([4.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
        w([1.0, 1.0, 1.0, 1.0, 1.0, 5.0]),
    ];
    let out = iso(dir.path(), &pool, &[], 0, GIB).unwrap();
    close(&read_f64(&out, "w"), &[4.5, 1.0, 1.0, 1.0, 1.0, 4.5], 1e-12);
}

#[test]
fn vectors_and_text_projection_take_the_mean_task_vector() {
    let dir = tempfile::tempdir().unwrap();
    let m = |b: [f64; 3], p: [f64; 4]| {
        vec![
            ("b", vec![3], b.to_vec()),
            ("cond.text_projection", vec![2, 2], p.to_vec()),
        ]
    };
    let pool = [
        m([1.0, 1.0, 1.0], [0.0; 4]),
        m([3.0, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0]),
        m([1.0, 5.0, 0.0], [0.0, 0.0, 0.0, 4.0]),
    ];
    let out = iso(dir.path(), &pool, &[("alpha", Number(2.0))], 0, GIB).unwrap();
    // 1 + 2 · mean(τ)
    close(&read_f64(&out, "b"), &[3.0, 5.0, -1.0], 1e-12);
    close(
        &read_f64(&out, "cond.text_projection"),
        &[2.0, 0.0, 0.0, 4.0],
        1e-12,
    );
}

fn values(seed: u64, n: usize) -> Vec<f64> {
    lcg_values(seed, n)
}

fn singular_values(a: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    faer::MatRef::from_row_major_slice(a, rows, cols)
        .singular_values()
        .unwrap()
}

#[test]
fn random_matrices_get_a_flat_spectrum_of_the_mean_singular_value() {
    let dir = tempfile::tempdir().unwrap();
    // A 12×7 matrix and a conv [6, 2, 2, 2] flattened to 6×8, over 4 fine-tunes.
    let shapes = [("w", vec![12, 7]), ("conv", vec![6, 2, 2, 2])];
    let pool: Vec<Model> = (0..5)
        .map(|m| {
            shapes
                .iter()
                .enumerate()
                .map(|(k, (name, s))| {
                    (
                        *name,
                        s.clone(),
                        values(10 * m + k as u64, s.iter().product()),
                    )
                })
                .collect()
        })
        .collect();
    let params = [("high_dim", Text("flatten".into()))];
    let out = iso(dir.path(), &pool, &params, 0, GIB).unwrap();
    for (k, (name, s)) in shapes.iter().enumerate() {
        let (rows, cols) = (s[0], s[1..].iter().product::<usize>());
        let base = &pool[0][k].2;
        let sum: Vec<f64> = (0..rows * cols)
            .map(|i| pool[1..].iter().map(|m| m[k].2[i] - base[i]).sum())
            .collect();
        let sigma = singular_values(&sum, rows, cols);
        let mean = sigma.iter().sum::<f64>() / sigma.len() as f64;
        let delta: Vec<f64> = read_f64(&out, name)
            .iter()
            .zip(base)
            .map(|(o, b)| o - b)
            .collect();
        let flat = singular_values(&delta, rows, cols);
        close(&flat, &vec![mean; flat.len()], 1e-9 * mean);
    }
    // Without `flatten`, the conv takes the mean task vector.
    let out = iso(dir.path(), &pool, &[], 0, GIB).unwrap();
    let base = &pool[0][1].2;
    let want: Vec<f64> = (0..base.len())
        .map(|i| base[i] + pool[1..].iter().map(|m| m[1].2[i] - base[i]).sum::<f64>() / 4.0)
        .collect();
    close(&read_f64(&out, "conv"), &want, 1e-12);
}

#[test]
fn same_bytes_for_any_thread_count_and_budget_and_an_error_naming_the_key_when_it_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let pool: Vec<Model> = (0..4)
        .map(|m| vec![("big", vec![96, 80], values(m, 96 * 80))])
        .collect();
    let one = iso(dir.path(), &pool, &[], 1, GIB).unwrap();
    let two = iso(dir.path(), &pool, &[], 2, 8 << 20).unwrap();
    assert_eq!(std::fs::read(&one).unwrap(), std::fs::read(&two).unwrap());
    let e = iso(dir.path(), &pool, &[], 0, 256 << 10)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`big`") && e.contains("ISO-C") && e.contains("needs a memory budget of"),
        "{e}"
    );
}

#[test]
fn iso_z_shrinks_the_spectrum_towards_its_mean() {
    let dir = tempfile::tempdir().unwrap();
    let (rows, cols) = (9, 6);
    let d = values(7, rows * cols);
    let delta: Model = vec![
        ("w", vec![rows, cols], d.clone()),
        ("row", vec![1, 5], vec![1.0, -2.0, 3.0, 0.5, 0.0]),
        ("b", vec![3], vec![1.0, 2.0, 3.0]),
    ];
    let z = |z: f64| {
        let out = run(
            "iso_z",
            dir.path(),
            std::slice::from_ref(&delta),
            &[("z", Number(z))],
            0,
            GIB,
        )
        .unwrap();
        (
            read_f64(&out, "w"),
            read_f64(&out, "row"),
            read_f64(&out, "b"),
        )
    };
    // z = 1: the delta itself; vectors and single-singular-value rows unchanged, for any z.
    let (w, row, b) = z(1.0);
    close(&w, &d, 1e-12);
    for zz in [0.0, 0.8, 2.0] {
        let (_, r, bb) = z(zz);
        close(&r, &row, 1e-12);
        close(&bb, &b, 0.0);
    }
    // z = 0: ISO-C of the delta (from a zero base).
    let (w0, _, _) = z(0.0);
    let zero: Model = vec![("w", vec![rows, cols], vec![0.0; rows * cols])];
    let one: Model = vec![("w", vec![rows, cols], d.clone())];
    let c = iso(dir.path(), &[zero, one], &[], 0, GIB).unwrap();
    close(&w0, &read_f64(&c, "w"), 1e-12);
    // z = 0.8: σ' = m + 0.8·(σ − m).
    let sigma = singular_values(&d, rows, cols);
    let m = sigma.iter().sum::<f64>() / sigma.len() as f64;
    let want: Vec<f64> = sigma.iter().map(|s| m + 0.8 * (s - m)).collect();
    let (w8, _, _) = z(0.8);
    close(&singular_values(&w8, rows, cols), &want, 1e-12);
}

/// The DGMIZ pipeline of docs/recipes.md (DGMLA deltas → ISO-Z → base + delta) as one recipe
/// gives the same bytes as its four steps run one by one through f32 files.
#[test]
fn the_dgmiz_recipe_equals_its_steps() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pool = f32_pool(d, amalgam::layout::arch::Layout::SdxlSgm, 3, 32);
    let base = d.join("base.safetensors");
    let recipe = r#"
[models]
base = "base.safetensors"
pool = "m*.safetensors"

[nodes.dgmla]
method = "dgmla"
base = "base"
models = ["pool"]

[nodes.delta]
method = "subtract"
a = "dgmla"
b = "base"

[nodes.iso]
method = "iso_z"
delta = "delta"
z = 0.8
high_dim = "flatten"

[nodes.dgmiz]
method = "add"
a = "base"
b = "iso"

[output]
node = "dgmiz"
"#;
    let r = amalgam::recipe::parse(recipe, "dgmiz.toml", d).unwrap();
    let opts = |out: &Path| {
        let mut o = MergeOptions::new(out);
        o.output_dtype = OutputDtype::F32;
        o.seed = 3;
        o
    };
    let whole = d.join("whole.safetensors");
    merge(&r.graph, &opts(&whole), &NoProgress).unwrap();
    let step =
        |name: &str, inputs: &[&Path], method: &str, slots, params: &[(&str, ParamValue)]| {
            let out = d.join(format!("step-{name}.safetensors"));
            merge(
                &one_node(inputs, method, slots, params),
                &opts(&out),
                &NoProgress,
            )
            .unwrap();
            out
        };
    let mut all: Vec<&Path> = vec![&base];
    let models: Vec<PathBuf> = pool.iter().filter(|p| **p != base).cloned().collect();
    all.extend(models.iter().map(|p| p.as_path()));
    let dgmla = step("dgmla", &all, "dgmla", vec![vec![0], vec![1, 2, 3]], &[]);
    let delta = step(
        "delta",
        &[&dgmla, &base],
        "subtract",
        vec![vec![0], vec![1]],
        &[],
    );
    let params = [("z", Number(0.8)), ("high_dim", Text("flatten".into()))];
    let iso = step("iso", &[&delta], "iso_z", vec![vec![0]], &params);
    let dgmiz = step("dgmiz", &[&base, &iso], "add", vec![vec![0], vec![1]], &[]);
    let (a, b) = (all_f32(&whole), all_f32(&dgmiz));
    assert_eq!(a.len(), b.len());
    for (k, v) in &a {
        assert_eq!(v, &b[k], "{k}");
    }
}

/// ISO-CTS: with the whole rank common (f = 1) it is ISO-C; otherwise its delta still has a
/// flat spectrum (the mean of the kept singular values), of full rank; the same bytes for any
/// thread count and budget.
#[test]
fn iso_cts_is_iso_c_with_a_common_fraction_of_one_and_flat_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let (rows, cols) = (14, 10);
    let pool: Vec<Model> = (0..4)
        .map(|m| vec![("w", vec![rows, cols], values(20 + m, rows * cols))])
        .collect();
    let cts = |f: f64, threads: usize, budget: u64| {
        let params = [("common_space_fraction", Number(f))];
        let out = run("iso_cts", dir.path(), &pool, &params, threads, budget).unwrap();
        read_f64(&out, "w")
    };
    let c = read_f64(&iso(dir.path(), &pool, &[], 0, GIB).unwrap(), "w");
    close(&cts(1.0, 0, GIB), &c, 1e-12);
    // f = 0.5, three tasks: r = 10, k = 5, s = round(5/3) = 2, k = 10 - 6 = 4.
    let out = cts(0.5, 1, GIB);
    assert_ne!(out, c);
    let base = &pool[0][0].2;
    let delta: Vec<f64> = out.iter().zip(base).map(|(o, b)| o - b).collect();
    let sigma = singular_values(&delta, rows, cols);
    assert_eq!(sigma.len(), cols);
    close(&sigma, &vec![sigma[0]; cols], 1e-9 * sigma[0]);
    assert_eq!(cts(0.5, 2, 8 << 20), out);
}

/// The `dgmiz` and `dgmia` methods write the same bytes as the recipe of their four nodes
/// (DGMLA with the mass election → subtract → iso_z, conv kernels flattened → add).
#[test]
fn dgmiz_and_dgmia_equal_their_recipe() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pool = f32_pool(d, amalgam::layout::arch::Layout::SdxlSgm, 3, 32);
    let opts = |out: &Path| {
        let mut o = MergeOptions::new(out);
        o.output_dtype = OutputDtype::F32;
        o.seed = 5;
        o
    };
    for (method, z) in [("dgmiz", "0.8"), ("dgmia", "0.0")] {
        let recipe = format!(
            r#"
[models]
base = "base.safetensors"
pool = "m*.safetensors"

[nodes.dgmla]
method = "dgmla"
base = "base"
models = ["pool"]
election = "mass"

[nodes.delta]
method = "subtract"
a = "dgmla"
b = "base"

[nodes.iso]
method = "iso_z"
delta = "delta"
z = {z}
high_dim = "flatten"

[nodes.out]
method = "add"
a = "base"
b = "iso"

[output]
node = "out"
"#
        );
        let r = amalgam::recipe::parse(&recipe, "r.toml", d).unwrap();
        let whole = d.join(format!("recipe-{method}.safetensors"));
        merge(&r.graph, &opts(&whole), &NoProgress).unwrap();
        let refs: Vec<&Path> = pool.iter().map(|p| p.as_path()).collect();
        let one = d.join(format!("{method}.safetensors"));
        let g = one_node(&refs, method, vec![vec![0], vec![1, 2, 3]], &[]);
        merge(&g, &opts(&one), &NoProgress).unwrap();
        let (a, b) = (all_f32(&whole), all_f32(&one));
        assert_eq!(a.len(), b.len());
        for (k, v) in &a {
            assert_eq!(v, &b[k], "{method}: {k}");
        }
    }
}
