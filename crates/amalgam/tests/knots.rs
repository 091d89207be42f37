//! KnOTS on real LoRA files: one LoRA comes back as itself; LoRAs in disjoint subspaces add up; a
//! LoRA opposing another along the same direction is voted out by the mass election; the top-k
//! trim is global over each LoRA's vector; DARE's masks are seeded.

mod common;
use amalgam::io::dtype::OutputDtype;
use amalgam::lora::knots::{knots, KnotsOptions, Variant};
use common::*;
use std::path::{Path, PathBuf};

const Q: &str = "lora_te_text_model_encoder_layers_0_self_attn_q_proj";
const K: &str = "lora_te_text_model_encoder_layers_0_self_attn_k_proj";

/// A LoRA module: (name, up `[out, r]`, down `[r, in]`, alpha).
type Module<'a> = (&'a str, Vec<Vec<f64>>, Vec<Vec<f64>>, f64);

fn write_lora(path: &Path, modules: &[Module]) -> PathBuf {
    let mut tensors = Vec::new();
    for (name, up, down, alpha) in modules {
        let flat = |m: &Vec<Vec<f64>>| m.iter().flatten().map(|&x| x as f32).collect::<Vec<_>>();
        tensors.push(f32t(
            &format!("{name}.lora_up.weight"),
            &[up.len(), up[0].len()],
            &flat(up),
        ));
        tensors.push(f32t(
            &format!("{name}.lora_down.weight"),
            &[down.len(), down[0].len()],
            &flat(down),
        ));
        tensors.push(f32t(&format!("{name}.alpha"), &[], &[*alpha as f32]));
    }
    write_file(path, &tensors, true)
}

/// `(alpha / rank)·up·down` of module `name` of a LoRA file.
fn delta(path: &Path, name: &str) -> Vec<Vec<f64>> {
    let up = read_f32(path, &format!("{name}.lora_up.weight"));
    let down = read_f32(path, &format!("{name}.lora_down.weight"));
    let alpha = read_f32(path, &format!("{name}.alpha"))[0] as f64;
    let file = amalgam::io::input::ModelFile::open(path).unwrap();
    let shape = &file.tensors()[&format!("{name}.lora_up.weight")].shape;
    let (out, r) = (shape[0], shape[1]);
    let cols = down.len() / r;
    (0..out)
        .map(|i| {
            (0..cols)
                .map(|j| {
                    (0..r)
                        .map(|k| up[i * r + k] as f64 * down[k * cols + j] as f64)
                        .sum::<f64>()
                        * alpha
                        / r as f64
                })
                .collect()
        })
        .collect()
}

fn close(a: &[Vec<f64>], b: &[Vec<f64>], tol: f64) {
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        assert!((x - y).abs() <= tol, "{x} vs {y}\n{a:?}\n{b:?}");
    }
}

fn run(
    dir: &Path,
    loras: Vec<PathBuf>,
    variant: Variant,
    k: f64,
    lambda: f64,
    seed: u64,
) -> PathBuf {
    let out = dir.join(format!("knots-{variant:?}-{k}-{lambda}-{seed}.safetensors"));
    let mut o = KnotsOptions::new(loras, out.clone(), variant);
    o.k = k;
    o.lambda = lambda;
    o.seed = seed;
    o.dtype = OutputDtype::F32;
    o.overwrite = true;
    knots(&o).unwrap();
    out
}

fn lcg(seed: u64, rows: usize, cols: usize) -> Vec<Vec<f64>> {
    lcg_values(seed, rows * cols)
        .chunks(cols)
        .map(|c| c.to_vec())
        .collect()
}

#[test]
fn one_lora_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = write_lora(
        &d.join("a.safetensors"),
        &[
            (Q, lcg(1, 6, 2), lcg(2, 2, 5), 1.0),
            (K, lcg(3, 6, 3), lcg(4, 3, 5), 3.0),
        ],
    );
    let out = run(d, vec![a.clone()], Variant::Ties, 1.0, 1.0, 0);
    for m in [Q, K] {
        close(&delta(&out, m), &delta(&a, m), 1e-5);
    }
}

#[test]
fn disjoint_loras_add_up_and_an_opposing_one_is_voted_out() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Updates in disjoint row and column spaces: e0 ⊗ x and e1 ⊗ y.
    let e = |i: usize| -> Vec<Vec<f64>> { (0..4).map(|r| vec![f64::from(r == i)]).collect() };
    let a = write_lora(
        &d.join("a.safetensors"),
        &[(Q, e(0), vec![vec![1.0, 2.0, 0.0, 0.0]], 1.0)],
    );
    let b = write_lora(
        &d.join("b.safetensors"),
        &[(Q, e(1), vec![vec![0.0, 0.0, -3.0, 1.0]], 1.0)],
    );
    let out = run(d, vec![a.clone(), b.clone()], Variant::Ties, 1.0, 1.0, 0);
    let sum: Vec<Vec<f64>> = delta(&a, Q)
        .iter()
        .zip(delta(&b, Q))
        .map(|(x, y)| x.iter().zip(y).map(|(p, q)| p + q).collect())
        .collect();
    close(&delta(&out, Q), &sum, 1e-5);
    // c = −a/2: the same direction, the other sign, less mass: the election keeps a alone
    // (λ = 0.6 scales it).
    let c = write_lora(
        &d.join("c.safetensors"),
        &[(Q, e(0), vec![vec![-0.5, -1.0, 0.0, 0.0]], 1.0)],
    );
    let out = run(d, vec![a.clone(), c], Variant::Ties, 1.0, 0.6, 0);
    let want: Vec<Vec<f64>> = delta(&a, Q)
        .iter()
        .map(|r| r.iter().map(|x| 0.6 * x).collect())
        .collect();
    close(&delta(&out, Q), &want, 1e-5);
}

#[test]
fn top_k_is_global_and_dare_is_seeded() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = write_lora(
        &d.join("a.safetensors"),
        &[
            (Q, lcg(5, 8, 3), lcg(6, 3, 6), 3.0),
            (K, lcg(7, 8, 3), lcg(8, 3, 6), 3.0),
        ],
    );
    let b = write_lora(
        &d.join("b.safetensors"),
        &[
            (Q, lcg(9, 8, 3), lcg(10, 3, 6), 3.0),
            (K, lcg(11, 8, 3), lcg(12, 3, 6), 3.0),
        ],
    );
    let mut o = KnotsOptions::new(
        vec![a.clone(), b.clone()],
        d.join("t.safetensors"),
        Variant::Ties,
    );
    o.dtype = OutputDtype::F32;
    let report = knots(&o).unwrap();
    // One threshold per LoRA over both modules; k = 0.2 keeps about a fifth.
    assert_eq!(report.thresholds.len(), 2);
    assert!(report.thresholds.iter().all(|&t| t > 0.0), "{report:?}");
    assert_eq!(report.modules.len(), 2);
    assert!(
        report.to_string().contains("KnOTS of 2 LoRAs: 2 modules"),
        "{report}"
    );
    // DARE-TIES: the same seed, the same bytes; another seed, others.
    let s1 = run(
        d,
        vec![a.clone(), b.clone()],
        Variant::DareTies,
        1.0,
        0.7,
        1,
    );
    let again = std::fs::read(&s1).unwrap();
    let s1b = run(
        d,
        vec![a.clone(), b.clone()],
        Variant::DareTies,
        1.0,
        0.7,
        1,
    );
    assert_eq!(std::fs::read(&s1b).unwrap(), again);
    let s2 = run(d, vec![a, b], Variant::DareTies, 1.0, 0.7, 2);
    assert_ne!(std::fs::read(&s2).unwrap(), again);
}

/// `(alpha / rank)·up·down` of module `name` of an f64 LoRA file, row-major.
fn delta64(path: &Path, name: &str) -> Vec<f64> {
    let up = read_f64(path, &format!("{name}.lora_up.weight"));
    let down = read_f64(path, &format!("{name}.lora_down.weight"));
    let alpha = read_f64(path, &format!("{name}.alpha"))[0];
    let file = amalgam::io::input::ModelFile::open(path).unwrap();
    let (out, r) = {
        let s = &file.tensors()[&format!("{name}.lora_up.weight")].shape;
        (s[0], s[1])
    };
    let cols = down.len() / r;
    let mut d = vec![0.0; out * cols];
    for i in 0..out {
        for j in 0..cols {
            d[i * cols + j] = (0..r)
                .map(|k| up[i * r + k] * down[k * cols + j])
                .sum::<f64>()
                * alpha
                / r as f64;
        }
    }
    d
}

/// Differential: KnOTS-TIES against numpy written from the spec (`tools/svd_fixtures.py`, whose
/// SVD is taken of the concatenated updates directly), three cases, one with a LoRA lacking a
/// module. amalgam holds the `R_t` in f32: agreement to f32 rounding.
#[test]
fn knots_ties_equals_the_numpy_reference() {
    let f = json_fixture("svd.json");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut ran = 0;
    for case in f["cases"].as_array().unwrap() {
        if case["method"] != "knots" {
            continue;
        }
        let mut paths = Vec::new();
        for (t, lora) in case["inputs"]["loras"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let mut tensors = Vec::new();
            for (name, m) in lora.as_object().unwrap() {
                let (us, uv) = json_tensor(&m["up"]);
                let (ds, dv) = json_tensor(&m["down"]);
                tensors.push(f64t(&format!("{name}.lora_up.weight"), &us, &uv));
                tensors.push(f64t(&format!("{name}.lora_down.weight"), &ds, &dv));
                let alpha = m["alpha"].as_f64().unwrap();
                tensors.push(f64t(&format!("{name}.alpha"), &[], &[alpha]));
            }
            paths.push(write_file(
                &d.join(format!("l{t}.safetensors")),
                &tensors,
                true,
            ));
        }
        let out = d.join("out.safetensors");
        let mut o = KnotsOptions::new(paths, out.clone(), Variant::Ties);
        o.k = case["params"]["k"].as_f64().unwrap();
        o.lambda = case["params"]["lambda"].as_f64().unwrap();
        o.dtype = OutputDtype::F64;
        o.overwrite = true;
        knots(&o).unwrap();
        for (name, want) in case["expected"].as_object().unwrap() {
            let (_, want) = json_tensor(want);
            let got = delta64(&out, name);
            let scale = want.iter().fold(1f64, |m, x| m.max(x.abs()));
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-6 * scale,
                    "{}: {name}: {g} vs {w}",
                    case["name"]
                );
            }
        }
        ran += 1;
    }
    assert_eq!(ran, 3);
}

/// A LoRA whose up and down do not share a rank, or whose module changes a tensor of another
/// shape than the other LoRAs', is refused naming the file and the module; nothing is written.
#[test]
fn inconsistent_loras_are_refused_naming_file_and_module() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = write_lora(
        &d.join("good.safetensors"),
        &[(Q, lcg(1, 6, 2), lcg(2, 2, 5), 2.0)],
    );
    let bad_rank = write_lora(
        &d.join("bad_rank.safetensors"),
        &[(Q, lcg(3, 6, 3), lcg(4, 2, 5), 2.0)],
    );
    let other = write_lora(
        &d.join("other.safetensors"),
        &[(Q, lcg(5, 6, 2), lcg(6, 2, 7), 2.0)],
    );
    for (bad, what) in [
        (bad_rank, "do not share a rank"),
        (other, "the other LoRAs'"),
    ] {
        let out = d.join("out.safetensors");
        let o = KnotsOptions::new(vec![good.clone(), bad.clone()], out.clone(), Variant::Ties);
        let e = knots(&o).unwrap_err().to_string();
        assert!(
            e.contains(bad.file_name().unwrap().to_str().unwrap())
                && e.contains(Q)
                && e.contains(what),
            "{e}"
        );
        assert!(!out.exists());
    }
}
