//! sd-mecha's structural methods, whose keys are written from other keys: `balance_attention`
//! against sd-mecha 1.1.8 itself (fixture by `tools/sd_mecha_structural_fixtures.py`) and by
//! its invariants (every logit kept; q's and k's Gram matrices exchanged, or made equal), and
//! `exchange_ema` on hand-made SD1 keys, as a model input and as a node's.

mod common;
use amalgam::io::dtype::OutputDtype;
use amalgam::method::ParamValue;
use amalgam::real::ComputeDtype;
use amalgam::{merge, Graph, MergeOptions, NoProgress};
use common::*;
use std::collections::BTreeMap;
use std::path::Path;

fn run(g: &Graph, out: &Path) -> Result<amalgam::report::MergeReport, String> {
    run_as(g, out, OutputDtype::F64)
}

fn run_as(
    g: &Graph,
    out: &Path,
    dtype: OutputDtype,
) -> Result<amalgam::report::MergeReport, String> {
    let mut o = MergeOptions::new(out);
    o.output_dtype = dtype;
    o.compute_dtype = ComputeDtype::F64;
    o.overwrite = true;
    merge(g, &o, &NoProgress).map_err(|e| e.to_string())
}

/// splitmix64's finaliser of counter `x` (the fixture script's `mix`).
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The fixture's model: each key's values from the counter hash, as the script makes them.
/// Per key: its shape and values.
type Keys = BTreeMap<String, (Vec<usize>, Vec<f64>)>;

fn fixture_model(dir: &Path) -> (std::path::PathBuf, Keys) {
    let fx = json_fixture("sd_mecha_structural.json");
    let mut keys: Keys = BTreeMap::new();
    for (i, k) in fx["keys"].as_array().unwrap().iter().enumerate() {
        let shape: Vec<usize> = k["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let scale = k["scale"].as_f64().unwrap();
        let n: usize = shape.iter().product();
        let values: Vec<f64> = (0..n as u64)
            .map(|e| {
                let u = (mix(((i as u64) << 32) + e) >> 44) as f64 / (1u64 << 20) as f64;
                (u - 0.5) * scale
            })
            .collect();
        keys.insert(k["name"].as_str().unwrap().to_string(), (shape, values));
    }
    let tensors: Vec<_> = keys.iter().map(|(k, (s, v))| f64t(k, s, v)).collect();
    (write_file(&dir.join("a.safetensors"), &tensors, true), keys)
}

fn single(method: &str, a: &Path, params: &[(&str, ParamValue)]) -> Graph {
    one_node(&[a], method, vec![vec![0]], params)
}

#[test]
fn balance_attention_is_sd_mechas() {
    let dir = tempfile::tempdir().unwrap();
    let (a, keys) = fixture_model(dir.path());
    let out = dir.path().join("out.safetensors");
    let report = run(&single("balance_attention", &a, &[]), &out).unwrap();
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("4 attention layers")),
        "{report}"
    );
    let fx = json_fixture("sd_mecha_structural.json");
    let every = fx["every"].as_u64().unwrap() as usize;
    let balanced = fx["balanced"].as_object().unwrap();
    assert_eq!(balanced.len(), 18);
    for (key, (_, input)) in &keys {
        let got = read_f64(&out, key);
        match balanced.get(key) {
            None => assert_eq!(&got, input, "{key} is kept"),
            Some(want) => {
                let want: Vec<f64> = want
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect();
                let sampled: Vec<f64> = got.iter().step_by(every).copied().collect();
                assert_eq!(sampled.len(), want.len(), "{key}");
                let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                for (i, (g, w)) in sampled.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-8 * scale,
                        "{key}[{}]: {g} vs sd-mecha's {w}",
                        i * every
                    );
                }
                assert_ne!(&got, input, "{key} changes");
            }
        }
    }
}

/// `x` (rows × cols, row-major) times `y` transposed: `x yᵀ`.
fn xyt(x: &[f64], y: &[f64], rows_x: usize, rows_y: usize) -> Vec<f64> {
    let cols = x.len() / rows_x;
    let mut out = vec![0.0; rows_x * rows_y];
    for i in 0..rows_x {
        for j in 0..rows_y {
            out[i * rows_y + j] = (0..cols).map(|c| x[i * cols + c] * y[j * cols + c]).sum();
        }
    }
    out
}

/// The transpose of `x` (rows × cols).
fn t(x: &[f64], rows: usize) -> Vec<f64> {
    let cols = x.len() / rows;
    (0..cols)
        .flat_map(|j| (0..rows).map(move |i| x[i * cols + j]))
        .collect()
}

fn assert_near(got: &[f64], want: &[f64], rel: f64, what: &str) {
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let worst = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (g, w)| m.max((g - w).abs()));
    assert!(
        worst <= rel * scale,
        "{what}: off by {worst:e} of {scale:e}"
    );
}

/// Both variants keep every logit (`qᵀk` and `o v`, per head summed); `swap` gives q the Gram
/// matrix k had, `equalize` gives q and k the same one (on heads whose Gram matrices are well
/// conditioned: 64 rows of 192 inputs, so that no eigenvalue is clamped at eps).
#[test]
fn balance_attention_keeps_the_function_and_moves_the_energy() {
    let dir = tempfile::tempdir().unwrap();
    let unet = "model.diffusion_model.output_blocks.3.1.transformer_blocks.1.attn2.";
    let (dim, ctx) = (128, 192);
    let scaled = |seed: u64, n: usize, s: f64| -> Vec<f64> {
        lcg_values(seed, n).iter().map(|x| x * s).collect()
    };
    let (q, k, v, o) = (
        scaled(1, dim * dim, 1.0),
        scaled(2, dim * ctx, 0.125),
        scaled(3, dim * ctx, 0.5),
        scaled(4, 16 * dim, 0.5),
    );
    let a = write_file(
        &dir.path().join("a.safetensors"),
        &[
            f64t(&format!("{unet}to_q.weight"), &[dim, dim], &q),
            f64t(&format!("{unet}to_k.weight"), &[dim, ctx], &k),
            f64t(&format!("{unet}to_v.weight"), &[dim, ctx], &v),
            f64t(&format!("{unet}to_out.0.weight"), &[16, dim], &o),
        ],
        true,
    );
    let head = |x: &[f64], h: usize| x[h * x.len() / 2..(h + 1) * x.len() / 2].to_vec();
    for balance in ["swap", "equalize"] {
        for eps_at in ["sd_mecha", "diagonal"] {
            let what = format!("{balance}, eps at {eps_at}");
            let out = dir.path().join(format!("{balance}{eps_at}.safetensors"));
            let p = [
                ("balance", ParamValue::Text(balance.into())),
                ("eps_at", ParamValue::Text(eps_at.into())),
            ];
            run(&single("balance_attention", &a, &p), &out).unwrap();
            let read = |k: &str| read_f64(&out, &format!("{unet}{k}"));
            let (q2, k2, v2, o2) = (
                read("to_q.weight"),
                read("to_k.weight"),
                read("to_v.weight"),
                read("to_out.0.weight"),
            );
            // qᵀk over every head (dim × ctx inputs) and o v (16 × ctx).
            let logits = |q: &[f64], k: &[f64]| xyt(&t(q, dim), &t(k, dim), dim, ctx);
            assert_near(
                &logits(&q2, &k2),
                &logits(&q, &k),
                1e-9,
                &format!("{what}: qᵀk"),
            );
            let ov = |o: &[f64], v: &[f64]| xyt(o, &t(v, dim), 16, ctx);
            assert_near(&ov(&o2, &v2), &ov(&o, &v), 1e-9, &format!("{what}: o v"));
            for h in 0..2 {
                let (qh, kh) = (head(&q2, h), head(&k2, h));
                let want = match balance {
                    "swap" => xyt(&head(&k, h), &head(&k, h), 64, 64),
                    _ => xyt(&kh, &kh, 64, 64),
                };
                // Up to eps (1e-6) on the Gram matrices.
                assert_near(
                    &xyt(&qh, &qh, 64, 64),
                    &want,
                    1e-5,
                    &format!("{what}: head {h}'s Gram matrices"),
                );
            }
            assert_ne!(q2, q);
        }
    }
}

#[test]
fn balance_attention_refuses_what_it_cannot_balance() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // CLIP-G's fused projection of 40-row heads.
    let key = "conditioner.embedders.1.model.transformer.resblocks.0.attn.";
    let ts = vec![
        f32t(
            &format!("{key}in_proj_weight"),
            &[120, 40],
            &vec![0.5; 4800],
        ),
        f32t(&format!("{key}in_proj_bias"), &[120], &vec![0.5; 120]),
        f32t(
            &format!("{key}out_proj.weight"),
            &[40, 40],
            &vec![0.5; 1600],
        ),
    ];
    let a = write_file(&d.join("a.safetensors"), &ts, true);
    let e = run(
        &single("balance_attention", &a, &[]),
        &d.join("o.safetensors"),
    )
    .unwrap_err();
    assert!(
        e.contains("in_proj_weight") && e.contains("heads of 64"),
        "{e}"
    );
    assert!(!d.join("o.safetensors").exists());
    // An SD1 checkpoint: SDXL only.
    let pool = f32_pool(d, amalgam::layout::arch::Layout::Sd1Ldm, 0, 4);
    let e = run(
        &single("balance_attention", &pool[0], &[]),
        &d.join("o.safetensors"),
    )
    .unwrap_err();
    assert!(e.contains("SDXL") && e.contains("sd1-ldm"), "{e}");
    // sgm key names only: another SDXL key format is refused, and so is a file without attention.
    let kohya = d.join("kohya");
    std::fs::create_dir(&kohya).unwrap();
    let pool = f32_pool(&kohya, amalgam::layout::arch::Layout::SdxlKohya, 0, 32);
    let e = run(
        &single("balance_attention", &pool[0], &[]),
        &d.join("o.safetensors"),
    )
    .unwrap_err();
    assert!(e.contains("sdxl-kohya") && e.contains("sgm"), "{e}");
    let plain = write_file(
        &d.join("plain.safetensors"),
        &[f32t("w", &[2], &[1.0, 2.0])],
        true,
    );
    let e = run(
        &single("balance_attention", &plain, &[]),
        &d.join("o.safetensors"),
    )
    .unwrap_err();
    assert!(e.contains("no attention layer"), "{e}");
}

/// An SD1-like checkpoint with two UNet keys, their EMA copies (one of another shape in `bad`),
/// a text-encoder key and `model_ema.decay`.
fn ema_model(path: &Path, scale: f32, bad: bool) -> std::path::PathBuf {
    let w = "model.diffusion_model.input_blocks.0.0.weight";
    let b = "model.diffusion_model.out.2.bias";
    let s = |x: &[f32]| x.iter().map(|v| v * scale).collect::<Vec<f32>>();
    write_file(
        path,
        &[
            f32t(w, &[2, 2], &s(&[1.0, 2.0, 3.0, 4.0])),
            f32t(b, &[2], &s(&[5.0, 6.0])),
            f32t(
                "model_ema.diffusion_modelinput_blocks00weight",
                &[2, 2],
                &s(&[10.0, 20.0, 30.0, 40.0]),
            ),
            if bad {
                f32t(
                    "model_ema.diffusion_modelout2bias",
                    &[1, 2],
                    &s(&[50.0, 60.0]),
                )
            } else {
                f32t("model_ema.diffusion_modelout2bias", &[2], &s(&[50.0, 60.0]))
            },
            f32t(
                "model.diffusion_model.time_embed.0.bias",
                &[2],
                &s(&[7.0, 8.0]),
            ),
            f32t("cond_stage_model.transformer.x", &[1], &s(&[9.0])),
            f32t("model_ema.decay", &[], &[0.9999]),
        ],
        true,
    )
}

#[test]
fn exchange_ema_swaps_each_weight_with_its_copy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = ema_model(&d.join("a.safetensors"), 1.0, false);
    let b = ema_model(&d.join("b.safetensors"), 3.0, false);
    let out = d.join("out.safetensors");
    let report = run_as(&single("exchange_ema", &a, &[]), &out, OutputDtype::F32).unwrap();
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("EMA copies exchanged")),
        "{report}"
    );
    let got = all_f32(&out);
    let want: BTreeMap<String, Vec<f32>> = [
        (
            "model.diffusion_model.input_blocks.0.0.weight",
            vec![10.0, 20.0, 30.0, 40.0],
        ),
        ("model.diffusion_model.out.2.bias", vec![50.0, 60.0]),
        (
            "model_ema.diffusion_modelinput_blocks00weight",
            vec![1.0, 2.0, 3.0, 4.0],
        ),
        ("model_ema.diffusion_modelout2bias", vec![5.0, 6.0]),
        ("model.diffusion_model.time_embed.0.bias", vec![7.0, 8.0]),
        ("cond_stage_model.transformer.x", vec![9.0]),
        ("model_ema.decay", vec![0.9999]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(got, want);

    // A node input, merged to a temporary file first, and the result an argument of another
    // node: 0.5·(a + b) exchanged, averaged with a.
    let text = format!(
        "[models]\na = \"{}\"\nb = \"{}\"\n\
         [nodes.mix]\nmethod = \"weighted_sum\"\na = \"a\"\nb = \"b\"\nalpha = 0.5\n\
         [nodes.ema]\nmethod = \"exchange_ema\"\nmodel = \"mix\"\n\
         [nodes.out]\nmethod = \"weighted_sum\"\na = \"a\"\nb = \"ema\"\nalpha = 0.5\n\
         [output]\nnode = \"out\"\n",
        a.display(),
        b.display()
    );
    let g = amalgam::recipe::parse(&text, "r.toml", d).unwrap().graph;
    let out2 = d.join("out2.safetensors");
    run_as(&g, &out2, OutputDtype::F32).unwrap();
    let got = all_f32(&out2);
    // mix = 2a; exchanged: the weight is 2·(its copy); out = (a + 2·exchanged a) / 2.
    assert_eq!(
        got["model.diffusion_model.input_blocks.0.0.weight"],
        vec![10.5, 21.0, 31.5, 42.0]
    );
    assert_eq!(got["model_ema.diffusion_modelout2bias"], vec![30.0, 36.0]);
    assert_eq!(
        got["model.diffusion_model.time_embed.0.bias"],
        vec![10.5, 12.0]
    );
    let left = files_containing(d, "amalgam");
    assert!(left.is_empty(), "temporary files left: {left:?}");

    // The output embeds its sd-mecha form, and a `.mecha` recipe naming the method runs it.
    let written = amalgam::io::input::ModelFile::open(&out).unwrap();
    let mecha = written.metadata()["mecha_recipe"].clone();
    assert!(mecha.contains("merge \"exchange_ema\" &0"), "{mecha}");
    let p = d.join("r.mecha");
    std::fs::write(
        &p,
        format!(
            "version 0.1.0\nmodel \"{}\" model_config=\"sd1-ldm\" merge_space=\"weight\"\n\
             merge \"exchange_ema\" &0\n",
            a.display()
        ),
    )
    .unwrap();
    let g = amalgam::recipe::mecha::load(&p, &[]).unwrap().graph;
    let out3 = d.join("out3.safetensors");
    run_as(&g, &out3, OutputDtype::F32).unwrap();
    assert_eq!(all_f32(&out3), want);

    let bad = ema_model(&d.join("bad.safetensors"), 1.0, true);
    let e = run(&single("exchange_ema", &bad, &[]), &d.join("o.safetensors")).unwrap_err();
    assert!(
        e.contains("bad.safetensors")
            && e.contains("`model.diffusion_model.out.2.bias`")
            && e.contains("model_ema.diffusion_modelout2bias"),
        "{e}"
    );
}
