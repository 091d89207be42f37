//! sd-mecha's `rotate` and `truncate_rank` in `.mecha` recipes: read as amalgam's nodes (sd-mecha's
//! defaults where the recipe leaves a parameter out), refused where sd-mecha would refuse them,
//! and written back.

mod common;
use amalgam::io::dtype::OutputDtype;
use amalgam::layout::arch::Layout;
use amalgam::{merge, MergeOptions, NoProgress};
use common::*;
use std::path::Path;

const RECIPE: &str = r#"version 0.1.0
model "base.safetensors" model_config=null merge_space="weight"
model "m000.safetensors" model_config=null merge_space="weight"
dict key=0.5
literal &2 model_config="singleton-mecha" merge_space=null
merge "convert_singleton" &3
merge "rotate" &1 &0 alpha=&4
merge "subtract" &1 &0
dict key=4
literal &7 model_config="singleton-mecha" merge_space=null
merge "convert_singleton" &8
merge "truncate_rank" &6 rank=&9 use_approximate_basis=false
merge "add_difference" &5 &10 alpha=&4
"#;

const NATIVE: &str = r#"
[models]
base = "base.safetensors"
m = "m000.safetensors"

[nodes.rot]
method = "rotate"
a = "m"
b = "base"
alpha = 0.5

[nodes.delta]
method = "subtract"
a = "m"
b = "base"

[nodes.low]
method = "truncate_rank"
a = "delta"
rank = 4
svd = "exact"

[nodes.out]
method = "add"
a = "rot"
b = "low"
alpha = 0.5

[output]
node = "out"
"#;

fn run(d: &Path, g: &amalgam::Graph, out: &str) -> std::collections::BTreeMap<String, Vec<f32>> {
    let mut o = MergeOptions::new(d.join(out));
    o.output_dtype = OutputDtype::F32;
    merge(g, &o, &NoProgress).unwrap();
    all_f32(&d.join(out))
}

#[test]
fn rotate_and_truncate_rank_read_run_and_write_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    f32_pool(d, Layout::Sd1Ldm, 1, 32);
    let p = d.join("r.mecha");
    std::fs::write(&p, RECIPE).unwrap();
    let mecha = amalgam::recipe::mecha::load(&p, &[]).unwrap();
    let native = amalgam::recipe::parse(NATIVE, "native.toml", d).unwrap();
    let a = run(d, &mecha.graph, "mecha.safetensors");
    assert_eq!(a, run(d, &native.graph, "native.safetensors"));
    // Written back, read again: the same merge.
    let text = amalgam::recipe::mecha::to_mecha(&mecha.graph, &[Some(Layout::Sd1Ldm); 2], None, 0)
        .expect("expressible in .mecha");
    assert!(
        text.contains("merge \"rotate\"") && text.contains("use_approximate_basis="),
        "{text}"
    );
    let again = d.join("again.mecha");
    std::fs::write(&again, &text).unwrap();
    let back = amalgam::recipe::mecha::load(&again, &[]).unwrap();
    assert_eq!(a, run(d, &back.graph, "again.safetensors"), "{text}");
}

#[test]
fn sd_mecha_defaults_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    f32_pool(d, Layout::Sd1Ldm, 1, 32);
    // truncate_rank without use_approximate_basis: sd-mecha's default, the randomized SVD.
    let text = RECIPE.replace(" use_approximate_basis=false", "");
    let p = d.join("default.mecha");
    std::fs::write(&p, text).unwrap();
    let g = amalgam::recipe::mecha::load(&p, &[]).unwrap().graph;
    let node = g
        .nodes
        .iter()
        .find(|n| n.method == "truncate_rank")
        .unwrap();
    assert_eq!(
        node.params.get("svd"),
        Some(&amalgam::method::ParamValue::Text("randomized".into()))
    );
    // truncate_rank of a weight model: sd-mecha declares a delta input.
    let text = RECIPE.replace("merge \"truncate_rank\" &6", "merge \"truncate_rank\" &1");
    let p = d.join("weight.mecha");
    std::fs::write(&p, text).unwrap();
    let e = amalgam::recipe::mecha::load(&p, &[])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("truncate_rank") && e.contains("delta"), "{e}");
    // An unknown keyword is refused, naming it.
    let text = RECIPE.replace(
        "alpha=&4\nmerge \"subtract\"",
        "alpha=&4 beta=&4\nmerge \"subtract\"",
    );
    let p = d.join("unknown.mecha");
    std::fs::write(&p, text).unwrap();
    let e = amalgam::recipe::mecha::load(&p, &[])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("beta"), "{e}");
}

/// The 6DammK9 fork's methods, as the published x10a AstolfoKarmix recipes write them
/// (`isotropic_overrided` with positional parameters): read as `iso_z` / `iso_c` nodes, the same
/// merge as the native recipe.
#[test]
fn the_forks_isotropic_methods() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    f32_pool(d, Layout::Sd1Ldm, 2, 32);
    let x10a = r#"version 0.1.0
model "base.safetensors" model_config="sd1-ldm" merge_space="weight"
model "m000.safetensors" model_config="sd1-ldm" merge_space="weight"
merge "subtract" &1 &0
model "m001.safetensors" model_config="sd1-ldm" merge_space="weight"
merge "subtract" &3 &0
merge "isotropic" &2 &4 apply_high_dim=true
merge "isotropic_overrided" &5 0.5 false true
merge "add_difference" &0 &6 1.0
"#;
    let p = d.join("x10a.mecha");
    std::fs::write(&p, x10a).unwrap();
    let g = amalgam::recipe::mecha::load(&p, &[]).unwrap().graph;
    use amalgam::method::ParamValue::{Number, Text};
    let iso_z = g.nodes.iter().find(|n| n.method == "iso_z").unwrap();
    assert_eq!(iso_z.params.get("z"), Some(&Number(0.5)));
    assert_eq!(iso_z.params.get("high_dim"), Some(&Text("flatten".into())));
    assert_eq!(iso_z.params.get("mean"), Some(&Text("arithmetic".into())));
    let iso_c = g.nodes.iter().find(|n| n.method == "iso_c").unwrap();
    assert_eq!(iso_c.params.get("high_dim"), Some(&Text("flatten".into())));
    let native = amalgam::recipe::parse(
        r#"
[models]
base = "base.safetensors"
pool = ["m000.safetensors", "m001.safetensors"]

[nodes.c]
method = "iso_c"
base = "base"
models = ["pool"]
high_dim = "flatten"

[nodes.delta]
method = "subtract"
a = "c"
b = "base"

[nodes.z]
method = "iso_z"
delta = "delta"
z = 0.5
high_dim = "flatten"

[nodes.out]
method = "add"
a = "base"
b = "z"

[output]
node = "out"
"#,
        "native.toml",
        d,
    )
    .unwrap();
    let (a, b) = (
        run(d, &g, "mecha.safetensors"),
        run(d, &native.graph, "native.safetensors"),
    );
    for (k, v) in &a {
        assert_close(v, &b[k], 1e-5);
    }
    // iso_z is written back under the fork's name (iso_c of a base and models is not an sd-mecha
    // method: the native graph has no .mecha form).
    let z_only = amalgam::recipe::parse(
        "[models]\nbase = \"base.safetensors\"\nm = \"m000.safetensors\"\n\
         [nodes.d]\nmethod = \"subtract\"\na = \"m\"\nb = \"base\"\n\
         [nodes.z]\nmethod = \"iso_z\"\ndelta = \"d\"\nhigh_dim = \"flatten\"\n\
         [output]\nnode = \"z\"\n",
        "z.toml",
        d,
    )
    .unwrap()
    .graph;
    assert!(
        amalgam::recipe::mecha::to_mecha(&native.graph, &[Some(Layout::Sd1Ldm); 3], None, 0)
            .is_none()
    );
    let text = amalgam::recipe::mecha::to_mecha(&z_only, &[Some(Layout::Sd1Ldm); 3], None, 0);
    let text = text.expect("expressible");
    assert!(text.contains("merge \"isotropic_overrided\""), "{text}");
    let again = d.join("again.mecha");
    std::fs::write(&again, &text).unwrap();
    let back = amalgam::recipe::mecha::load(&again, &[]).unwrap().graph;
    let z = back.nodes.iter().find(|n| n.method == "iso_z").unwrap();
    assert_eq!(z.params.get("z"), Some(&Number(0.8)), "{text}");
    assert_eq!(
        z.params.get("high_dim"),
        Some(&Text("flatten".into())),
        "{text}"
    );
}
