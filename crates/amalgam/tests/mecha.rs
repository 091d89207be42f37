//! The `.mecha` recipes sd-mecha 1.1.8 writes (`tests/fixtures/mecha/`, copied from the project's
//! spec examples) parse, with the structure they have.

use amalgam::recipe::mecha::{parse, Kind, Value};
use std::path::Path;

fn example(name: &str) -> amalgam::recipe::mecha::Recipe {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/mecha")
        .join(name);
    parse(
        &std::fs::read_to_string(&p).unwrap(),
        &p.display().to_string(),
    )
    .unwrap()
}

#[test]
fn every_example_recipe_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mecha");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let text = std::fs::read_to_string(&p).unwrap();
        let r = parse(&text, &p.display().to_string()).unwrap();
        // The result is the last command, a merge; every model names a file.
        assert_eq!(
            r.commands.last().unwrap().kind,
            Kind::Merge,
            "{}",
            p.display()
        );
        for c in r.commands.iter().filter(|c| c.kind == Kind::Model) {
            assert!(
                matches!(c.positional().next(), Some(Value::Str(s)) if s.ends_with(".safetensors"))
            );
        }
        // sd-mecha writes no trailing newline; one (and blank lines) are accepted too.
        let relaxed = format!("\n{}\n\n", text.replace('\n', "\n\n"));
        assert_eq!(
            parse(&relaxed, "relaxed").unwrap().commands.len(),
            r.commands.len()
        );
        n += 1;
    }
    assert_eq!(n, 8);
}

#[test]
fn dgmla_recipe_has_the_published_parameters() {
    let r = example("dgmla.mecha");
    let merge = r
        .commands
        .iter()
        .find(|c| {
            c.kind == Kind::Merge
                && c.positional().next() == Some(&Value::Str("ties_sum_with_dropout".into()))
        })
        .unwrap();
    // Keyword values are references to `convert_singleton` merges of `literal`s of `dict`s.
    let scalar = |name: &str| -> Value {
        let Some(Value::Ref(m)) = merge.keyword(name) else {
            panic!("{name}")
        };
        let conv = &r.commands[*m];
        assert_eq!(
            conv.positional().next(),
            Some(&Value::Str("convert_singleton".into()))
        );
        let Some(Value::Ref(l)) = conv.positional().nth(1) else {
            panic!()
        };
        let Some(Value::Ref(d)) = r.commands[*l].positional().next() else {
            panic!()
        };
        r.commands[*d].keyword("key").unwrap().clone()
    };
    assert_eq!(scalar("probability"), Value::Float(0.1));
    assert_eq!(scalar("della_eps"), Value::Float(-0.1));
    // In sd-mecha 1.1.x `vote_sgn = false` is the count vote (the meaning flipped in 0.1.0; the
    // 2024 fork recipes wrote 1.0 for the same vote).
    assert_eq!(scalar("vote_sgn"), Value::Bool(false));
    assert_eq!(scalar("apply_median"), Value::Bool(true));
    assert_eq!(scalar("k"), Value::Float(1.0));
    assert_eq!(scalar("seed"), Value::Int(241011));
    // Five deltas, the last the base minus itself (the zero point of DGMLA).
    let deltas: Vec<&Value> = merge.positional().skip(1).collect();
    assert_eq!(deltas.len(), 5);
    let Value::Ref(z) = deltas[4] else { panic!() };
    let zero: Vec<&Value> = r.commands[*z].positional().collect();
    assert_eq!(
        zero,
        [
            &Value::Str("subtract".into()),
            &Value::Ref(0),
            &Value::Ref(0)
        ]
    );
}

mod common;
use amalgam::io::dtype::OutputDtype;
use amalgam::layout::arch::Layout;
use amalgam::{merge, recipe, MergeOptions, NoProgress};
use common::f32_pool;
use std::collections::BTreeMap;

/// Every tensor of a file: name → values.
fn tensors(p: &Path) -> BTreeMap<String, Vec<f32>> {
    common::all_f32(p)
}

/// Runs example recipe `name` and the native recipe `native` on the same synthetic SDXL pool;
/// their outputs agree to `tol` relative (0 = bit for bit).
fn same_as_native(name: &str, native: &str, tol: f32) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    f32_pool(d, Layout::SdxlSgm, 4, 64);
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/mecha")
        .join(name);
    let m = d.join(name);
    std::fs::copy(&src, &m).unwrap();
    let t = amalgam::recipe::mecha::load(&m, &[]).unwrap();
    let mut opts = MergeOptions::new(d.join("mecha.safetensors"));
    opts.output_dtype = OutputDtype::F32;
    opts.seed = t.seed.unwrap_or(0);
    merge(&t.graph, &opts, &NoProgress).unwrap();
    let n = d.join("native.toml");
    std::fs::write(&n, native).unwrap();
    let r = recipe::load(&n).unwrap();
    let mut opts = MergeOptions::new(d.join("native.safetensors"));
    opts.output_dtype = OutputDtype::F32;
    opts.seed = r.settings.seed.unwrap_or(0);
    merge(&r.graph, &opts, &NoProgress).unwrap();
    let (a, b) = (
        tensors(&d.join("mecha.safetensors")),
        tensors(&d.join("native.safetensors")),
    );
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{name}"
    );
    for (k, x) in &a {
        let y = &b[k];
        let scale = y
            .iter()
            .filter(|v| v.is_finite())
            .fold(0f32, |m, v| m.max(v.abs()))
            .max(1e-6);
        for (i, (p, q)) in x.iter().zip(y).enumerate() {
            // (Equal infinities too: model stock's factor is infinite where cos θ = −1/(N−1).)
            assert!(
                p == q || (p - q).abs() <= tol * scale,
                "{name}: {k}[{i}]: {p} vs {q}"
            );
        }
    }
}

const POOL: &str = "[models]\nbase = \"base.safetensors\"\npool = [\"m000.safetensors\", \"m001.safetensors\", \"m002.safetensors\", \"m003.safetensors\"]\n";

#[test]
fn soup_vae_from_base_and_mbw_run_as_their_native_equivalents() {
    same_as_native(
        "soup.mecha",
        &format!(
            "{POOL}[nodes.s]\nmethod = \"soup\"\nmodels = [\"pool\"]\n[output]\nnode = \"s\"\n"
        ),
        0.0,
    );
    same_as_native(
        "vae_from_base.mecha",
        &format!("{POOL}[nodes.s]\nmethod = \"soup\"\nmodels = [\"pool\"]\n[output]\nnode = \"s\"\n[output.components]\nvae = \"base\"\n"),
        0.0,
    );
    same_as_native(
        "mbw_weighted_sum.mecha",
        "[models]\na = \"m000.safetensors\"\nb = \"m001.safetensors\"\n[nodes.w]\nmethod = \"weighted_sum\"\na = \"a\"\nb = \"b\"\nalpha = { IN00 = 0.2, IN04 = 0.5, M00 = 0.8, OUT08 = 1.0, default = 0.5 }\nblocks = \"sd_mecha\"\n[output]\nnode = \"w\"\n",
        0.0,
    );
    same_as_native(
        "geometric_median.mecha",
        &format!("{POOL}[nodes.g]\nmethod = \"geometric_median\"\nmodels = [\"pool\"]\n[output]\nnode = \"g\"\n"),
        0.0,
    );
}

#[test]
fn ties_family_recipes_run_as_their_native_presets() {
    same_as_native(
        "ties_soup.mecha",
        &format!("{POOL}[nodes.t]\nmethod = \"ties_soup\"\nbase = \"base\"\nmodels = [\"pool\"]\n[output]\nnode = \"t\"\n"),
        0.0,
    );
    same_as_native(
        "tgmd.mecha",
        &format!("{POOL}[nodes.t]\nmethod = \"tgmd\"\nbase = \"base\"\nmodels = [\"pool\"]\n[output]\nnode = \"t\"\nseed = 240603\n"),
        0.0,
    );
    // The base as a fifth, zero delta (sd-mecha) or as base_point (amalgam): the same median,
    // through differently centred Gram matrices.
    same_as_native(
        "dgmla.mecha",
        &format!("{POOL}[nodes.t]\nmethod = \"dgmla\"\nbase = \"base\"\nmodels = [\"pool\"]\n[output]\nnode = \"t\"\nseed = 241011\n"),
        1e-5,
    );
    same_as_native(
        "model_stock_gm.mecha",
        &format!("{POOL}[nodes.t]\nmethod = \"model_stock\"\nbase = \"base\"\nmodels = [\"pool\"]\npairs = \"adjacent\"\nunit = \"row\"\n[output]\nnode = \"t\"\n"),
        1e-6,
    );
}

#[test]
fn unsupported_methods_and_missing_models_are_reported_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let p = d.join("r.mecha");
    std::fs::write(&p, "version 0.1.0\nmodel \"a.safetensors\" model_config=null merge_space=\"weight\"\nmodel \"b.safetensors\" model_config=null merge_space=\"weight\"\nmerge \"omit_non_finite\" &0").unwrap();
    let e = amalgam::recipe::mecha::load(&p, &[])
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("r.mecha:4")
            && e.contains("method `omit_non_finite` is not supported")
            && e.contains("ties_sum_with_dropout"),
        "{e}"
    );
    std::fs::write(&p, "version 0.1.0\nmodel \"/nowhere/a.safetensors\" model_config=null merge_space=\"weight\"\nmodel \"b.safetensors\" model_config=null merge_space=\"weight\"\nmerge \"n_average\" &0 &1").unwrap();
    let elsewhere = d.join("models");
    let e = amalgam::recipe::mecha::load(&p, std::slice::from_ref(&elsewhere))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("missing models")
            && e.contains("/nowhere/a.safetensors")
            && e.contains("b.safetensors"),
        "{e}"
    );
    assert!(
        e.contains(&elsewhere.join("a.safetensors").display().to_string()),
        "the paths tried: {e}"
    );
}

#[test]
fn dropout_and_slerp_recipes_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    f32_pool(d, Layout::Sd1Ldm, 2, 64);
    let run = |name: &str, text: &str| -> BTreeMap<String, Vec<f32>> {
        let p = d.join(format!("{name}.mecha"));
        std::fs::write(&p, text).unwrap();
        let t = amalgam::recipe::mecha::load(&p, &[]).unwrap();
        let out = d.join(format!("{name}.safetensors"));
        let mut opts = MergeOptions::new(&out);
        opts.output_dtype = OutputDtype::F32;
        opts.seed = t.seed.unwrap_or(0);
        merge(&t.graph, &opts, &NoProgress).unwrap();
        tensors(&out)
    };
    let models = "version 0.1.0\nmodel \"base.safetensors\" model_config=null merge_space=\"weight\"\nmodel \"m000.safetensors\" model_config=null merge_space=\"weight\"\nmerge \"subtract\" &1 &0\nmodel \"m001.safetensors\" model_config=null merge_space=\"weight\"\nmerge \"subtract\" &3 &0\n";
    // Nothing dropped: base + the mean of the deltas, the average of the two models.
    let none = run("dropout", &format!("{models}merge \"dropout\" &2 &4 probability=0.0 rescale=1.0 overlap=1.0 seed=7\nmerge \"add_difference\" &0 &5 alpha=1.0"));
    let base = tensors(&d.join("base.safetensors"));
    let m0 = tensors(&d.join("m000.safetensors"));
    let m1 = tensors(&d.join("m001.safetensors"));
    for (k, x) in &none {
        for i in 0..x.len() {
            let want = base[k][i] + ((m0[k][i] - base[k][i]) + (m1[k][i] - base[k][i])) / 2.0;
            assert!((x[i] - want).abs() <= 1e-6, "{k}[{i}]");
        }
    }
    // slerp at 0 is the first model.
    let s = run("slerp", "version 0.1.0\nmodel \"m000.safetensors\" model_config=null merge_space=\"weight\"\nmodel \"m001.safetensors\" model_config=null merge_space=\"weight\"\nmerge \"slerp\" &0 &1 alpha=0.0");
    for (k, x) in &s {
        assert_eq!(x, &m0[k], "{k}");
    }
}

#[test]
fn recipes_written_back_as_mecha_run_the_same_and_outputs_carry_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    f32_pool(d, Layout::SdxlSgm, 4, 64);
    let layouts = [Some(Layout::SdxlSgm); 5];
    for name in [
        "soup.mecha",
        "ties_soup.mecha",
        "tgmd.mecha",
        "dgmla.mecha",
        "geometric_median.mecha",
        "model_stock_gm.mecha",
        "mbw_weighted_sum.mecha",
        "vae_from_base.mecha",
    ] {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/mecha")
            .join(name);
        let p = d.join(name);
        std::fs::copy(&src, &p).unwrap();
        let first = amalgam::recipe::mecha::load(&p, &[]).unwrap();
        let seed = first.seed.unwrap_or(0);
        let text = amalgam::recipe::mecha::to_mecha(
            &first.graph,
            &layouts[..first.graph.models.len()],
            Some(amalgam::layout::arch::Arch::Sdxl),
            seed,
        )
        .unwrap_or_else(|| panic!("{name} is expressible in .mecha"));
        let again = d.join(format!("again-{name}"));
        std::fs::write(&again, &text).unwrap();
        let second = amalgam::recipe::mecha::load(&again, &[]).unwrap();
        assert_eq!(second.seed.unwrap_or(0), seed, "{name}");
        let run = |g: &amalgam::Graph, out: &str| {
            let mut opts = MergeOptions::new(d.join(out));
            opts.output_dtype = OutputDtype::F32;
            opts.seed = seed;
            merge(g, &opts, &NoProgress).unwrap();
            tensors(&d.join(out))
        };
        let a = run(&first.graph, &format!("{name}.1.safetensors"));
        let b = run(&second.graph, &format!("{name}.2.safetensors"));
        assert!(
            a == b,
            "{name}: the written-back recipe merges differently\n{text}"
        );
        // The output records the recipe in sd-mecha's format; it parses and means the same.
        let bytes = std::fs::read(d.join(format!("{name}.1.safetensors"))).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let recorded = meta.metadata().as_ref().unwrap()["mecha_recipe"].clone();
        assert!(
            amalgam::recipe::mecha::parse(&recorded, "recorded").is_ok(),
            "{recorded}"
        );
    }
}

#[test]
fn omit_component_and_cast_run() {
    // Everything but the VAE from the soup, the VAE from the base, then a cast: the same as
    // the example `vae_from_base` recipe.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    f32_pool(d, Layout::SdxlSgm, 4, 64);
    let text = "version 0.1.0\n\
        model \"base.safetensors\" model_config=null merge_space=\"weight\"\n\
        model \"m000.safetensors\" model_config=null merge_space=\"weight\"\n\
        model \"m001.safetensors\" model_config=null merge_space=\"weight\"\n\
        model \"m002.safetensors\" model_config=null merge_space=\"weight\"\n\
        model \"m003.safetensors\" model_config=null merge_space=\"weight\"\n\
        merge \"n_average\" &1 &2 &3 &4\n\
        merge \"omit_component\" &5 component=\"vae\"\n\
        merge \"fallback\" &6 &0\n\
        merge \"cast\" &7 device=null dtype=\"float16\"";
    let run = |name: &str, text: &str| {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        let t = amalgam::recipe::mecha::load(&p, &[]).unwrap();
        let out = d.join(format!("{name}.safetensors"));
        let mut opts = MergeOptions::new(&out);
        opts.output_dtype = OutputDtype::F32;
        merge(&t.graph, &opts, &NoProgress).unwrap();
        tensors(&out)
    };
    let a = run("omit.mecha", text);
    let src =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mecha/vae_from_base.mecha");
    let b = run("pick.mecha", &std::fs::read_to_string(src).unwrap());
    assert!(a == b);
}

#[test]
fn the_inverted_apply_stock_round_trips() {
    // sd-mecha's default (apply_stock = false): the TIES mean times the model-stock factor.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    f32_pool(d, Layout::Sd1Ldm, 3, 64);
    let text = "version 0.1.0\n\
        model \"base.safetensors\" model_config=null merge_space=\"weight\"\n\
        model \"m000.safetensors\" model_config=null merge_space=\"weight\"\n\
        merge \"subtract\" &1 &0\n\
        model \"m001.safetensors\" model_config=null merge_space=\"weight\"\n\
        merge \"subtract\" &3 &0\n\
        model \"m002.safetensors\" model_config=null merge_space=\"weight\"\n\
        merge \"subtract\" &5 &0\n\
        merge \"ties_sum_extended\" &2 &4 &6 k=1.0 vote_sgn=false apply_stock=false apply_median=false\n\
        merge \"add_difference\" &0 &7 alpha=1.0";
    let p = d.join("stock.mecha");
    std::fs::write(&p, text).unwrap();
    let t = amalgam::recipe::mecha::load(&p, &[]).unwrap();
    let node = t.graph.nodes.iter().find(|n| n.method == "ties").unwrap();
    assert_eq!(
        node.params.get("stock"),
        Some(&amalgam::method::ParamValue::Text("adjacent_rows".into()))
    );
    let back =
        amalgam::recipe::mecha::to_mecha(&t.graph, &[Some(Layout::Sd1Ldm); 4], None, 0).unwrap();
    assert!(back.contains("apply_stock=&"), "{back}");
    let again = amalgam::recipe::mecha::parse(&back, "back").unwrap();
    let p2 = d.join("back.mecha");
    std::fs::write(&p2, &back).unwrap();
    let t2 = amalgam::recipe::mecha::load(&p2, &[]).unwrap();
    let node2 = t2.graph.nodes.iter().find(|n| n.method == "ties").unwrap();
    assert_eq!(node.params.get("stock"), node2.params.get("stock"));
    assert!(!again.commands.is_empty());
}

/// sd-optim's `ties_sum_extended` (its `weight_decay` or `min_agreement` given) reads its
/// `apply_stock` as it means it: above 0 the positive pairs' factor, 0 none (not inverted).
#[test]
fn sd_optims_apply_stock_is_not_inverted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    f32_pool(d, Layout::Sd1Ldm, 2, 64);
    for (flag, want) in [("1.0", Some("positive_pairs")), ("0.0", None)] {
        let text = format!(
            "version 0.1.0\n\
             model \"base.safetensors\" model_config=null merge_space=\"weight\"\n\
             model \"m000.safetensors\" model_config=null merge_space=\"weight\"\n\
             merge \"subtract\" &1 &0\n\
             model \"m001.safetensors\" model_config=null merge_space=\"weight\"\n\
             merge \"subtract\" &3 &0\n\
             merge \"ties_sum_extended\" &2 &4 k=0.218 apply_stock={flag} apply_median=0.0 weight_decay=0.0218 min_agreement=0.3\n\
             merge \"add_difference\" &0 &5 alpha=1.0"
        );
        let p = d.join("optim.mecha");
        std::fs::write(&p, text).unwrap();
        let t = amalgam::recipe::mecha::load(&p, &[]).unwrap();
        let node = t.graph.nodes.iter().find(|n| n.method == "ties").unwrap();
        let want = want.map(|w| amalgam::method::ParamValue::Text(w.into()));
        assert_eq!(
            node.params.get("stock"),
            want.as_ref(),
            "apply_stock={flag}"
        );
    }
}

/// A `model_config` that is not the file's, an unknown parameter and a weight model given to a
/// delta method are refused naming the line, before any tensor is read.
#[test]
fn recipes_contradicting_their_files_or_sd_mecha_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let models = f32_pool(d, Layout::SdxlSgm, 2, 64);
    let p = d.join("r.mecha");
    let name = |i: usize| models[i].file_name().unwrap().to_str().unwrap().to_string();
    let write = |config: &str, merge: &str| {
        std::fs::write(
            &p,
            format!(
                "version 0.1.0\nmodel \"{}\" model_config={config} merge_space=\"weight\"\nmodel \"{}\" model_config={config} merge_space=\"weight\"\n{merge}\n",
                name(0),
                name(1)
            ),
        )
        .unwrap();
    };
    write("\"sdxl-sgm\"", "merge \"n_average\" &0 &1");
    amalgam::recipe::mecha::load(&p, &[]).unwrap();
    write("null", "merge \"n_average\" &0 &1");
    amalgam::recipe::mecha::load(&p, &[]).unwrap();
    write("\"sd1-ldm\"", "merge \"n_average\" &0 &1");
    let e = amalgam::recipe::mecha::load(&p, &[])
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("r.mecha:2")
            && e.contains("declares model_config `sd1-ldm`, but the file is sdxl-sgm"),
        "{e}"
    );
    write("null", "merge \"weighted_sum\" &0 &1 alpha=0.3 beta=0.2");
    let e = amalgam::recipe::mecha::load(&p, &[])
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("r.mecha:4") && e.contains("no parameter `beta`"),
        "{e}"
    );
    write("null", "merge \"model_stock\" &0 &1");
    let e = amalgam::recipe::mecha::load(&p, &[])
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("`model_stock` takes inputs in merge space `delta`"),
        "{e}"
    );
}
