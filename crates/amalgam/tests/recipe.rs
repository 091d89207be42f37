//! The TOML recipe format: a DAG run end to end, the recorded recipe, and errors with lines.

mod common;
use amalgam::io::dtype::OutputDtype;
use amalgam::recipe;
use amalgam::{merge, MergeOptions, NoProgress};
use common::*;
use std::path::Path;

fn models(dir: &Path) {
    write_file(
        &dir.join("base.safetensors"),
        &[f32t("w", &[2], &[1.0, 1.0])],
        true,
    );
    std::fs::create_dir(dir.join("pool")).unwrap();
    write_file(
        &dir.join("pool/a.safetensors"),
        &[f32t("w", &[2], &[3.0, 1.0])],
        true,
    );
    write_file(
        &dir.join("pool/b.safetensors"),
        &[f32t("w", &[2], &[1.0, 5.0])],
        true,
    );
    write_file(
        &dir.join("pool/c.safetensors"),
        &[f32t("w", &[2], &[2.0, 3.0])],
        true,
    );
}

const DAG: &str = r#"
# a soup of the pool, blended with the base plus the pool's task vectors
[models]
base = "base.safetensors"
pool = "pool/*.safetensors"

[nodes.blend]
method = "weighted_sum"
a = "soup"
b = "tuned"
alpha = 0.25

[nodes.soup]
method = "soup"
models = ["pool"]

[nodes.tuned]
method = "task_arithmetic"
base = "base"
models = ["pool"]
weights = [1.0, 0.5, 1.0]
lambda = 0.5

[output]
node = "blend"
dtype = "f32"
compute_dtype = "f64"
seed = 7
"#;

#[test]
fn recipe_dag_runs_and_records_itself() {
    let dir = tempfile::tempdir().unwrap();
    models(dir.path());
    std::fs::write(dir.path().join("r.toml"), DAG).unwrap();
    let r = recipe::load(&dir.path().join("r.toml")).unwrap();
    assert_eq!(r.graph.models.len(), 4);
    assert_eq!(r.graph.models[1].name, "pool[0]");
    assert!(r.graph.models[3].path.ends_with("pool/c.safetensors"));
    assert_eq!(r.settings.dtype, Some(OutputDtype::F32));
    assert_eq!(r.settings.seed, Some(7));

    let out = dir.path().join("out.safetensors");
    let mut o = MergeOptions::new(&out);
    o.output_dtype = OutputDtype::F32;
    let text = recipe::to_toml(&r.graph, &r.settings);
    o.metadata.insert("amalgam_recipe".into(), text.clone());
    merge(&r.graph, &o, &NoProgress).unwrap();
    // soup = (2, 3); tuned = 1 + 0.5 * ((2,0) + 0.5 (0,4) + (1,2)) = (2.5, 3); blend = 0.75 soup + 0.25 tuned
    assert_close(&read_f32(&out, "w"), &[2.125, 3.0], 1e-6);

    // The recorded recipe alone reproduces the output byte for byte.
    let recorded = amalgam::io::input::ModelFile::open(&out)
        .unwrap()
        .metadata()["amalgam_recipe"]
        .clone();
    assert_eq!(recorded, text);
    let again = recipe::parse(&recorded, "recorded", Path::new("/")).unwrap();
    assert_eq!(again.settings, r.settings);
    let out2 = dir.path().join("out2.safetensors");
    let mut o2 = MergeOptions::new(&out2);
    o2.output_dtype = OutputDtype::F32;
    o2.metadata.insert(
        "amalgam_recipe".into(),
        recipe::to_toml(&again.graph, &again.settings),
    );
    merge(&again.graph, &o2, &NoProgress).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&out2).unwrap());
}

fn err(text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    models(dir.path());
    recipe::parse(text, "r.toml", dir.path())
        .unwrap_err()
        .to_string()
}

#[test]
fn recipe_errors_name_the_line_and_node() {
    let e = err("[models]\nbase = \"base.safetensors\"\n\n[nodes.x]\nmethod = \"tie\"\nmodels = [\"base\"]\n\n[output]\nnode = \"x\"\n");
    assert!(
        e.contains("r.toml:5 (node `x`)")
            && e.contains("unknown method `tie`")
            && e.contains("soup"),
        "{e}"
    );

    let e = err("[models]\nbase = \"base.safetensors\"\n[nodes.x]\nmethod = \"soup\"\nmodels = [\"base\", \"nope\"]\n[output]\nnode = \"x\"\n");
    assert!(
        e.contains("r.toml:5 (node `x`)") && e.contains("`nope`"),
        "{e}"
    );

    let e = err("[models]\nbase = \"base.safetensors\"\n[nodes.x]\nmethod = \"weighted_sum\"\na = \"base\"\n[output]\nnode = \"x\"\n");
    assert!(
        e.contains("r.toml:3 (node `x`)") && e.contains("needs `b`"),
        "{e}"
    );

    let e = err("[models]\nbase = \"base.safetensors\"\n[nodes.x]\nmethod = \"soup\"\nmodels = [\"base\"]\nalpha = 0.5\n[output]\nnode = \"x\"\n");
    assert!(
        e.contains("(node `x`)") && e.contains("unknown parameter `alpha`"),
        "{e}"
    );

    let e = err("[models]\nbase = \"base.safetensors\"\n[nodes.x]\nmethod = \"soup\"\nmodels = [\"y\"]\n[nodes.y]\nmethod = \"soup\"\nmodels = [\"x\"]\n[output]\nnode = \"x\"\n");
    assert!(e.contains("cycle"), "{e}");

    let e = err("[models]\nbase = \"base.safetensors\"\npool = \"pool/*.safetensors\"\n[nodes.x]\nmethod = \"weighted_sum\"\na = \"pool\"\nb = \"base\"\n[output]\nnode = \"x\"\n");
    assert!(e.contains("r.toml:6") && e.contains("exactly one"), "{e}");

    let e = err("[models]\nbase = \"base.safetensors\"\n[output]\nnode = \"missing\"\n");
    assert!(
        e.contains("r.toml:4 (output)") && e.contains("`missing`"),
        "{e}"
    );

    let e =
        err("[models]\nbase = \"base.safetensors\"\n[output]\nnode = \"base\"\ndtype = \"f8\"\n");
    assert!(
        e.contains("r.toml:5") && e.contains("unknown output dtype"),
        "{e}"
    );

    // TOML syntax errors carry the line too.
    let e = err("[models]\nbase = \"base.safetensors\n[output]\nnode = \"base\"\n");
    assert!(e.contains("r.toml:2"), "{e}");

    let e = err("[models]\nbase = \"base.safetensors\"\n[output]\nnode = \"base\"\nspeed = 3\n");
    assert!(e.contains("unknown field `speed`"), "{e}");
}

#[test]
fn missing_models_are_all_reported_up_front() {
    let e = err("[models]\na = \"nope1.safetensors\"\nb = \"nope2.safetensors\"\nc = \"none/*.safetensors\"\n[output]\nnode = \"a\"\n");
    assert!(e.contains("missing model files"), "{e}");
    assert!(
        e.contains("line 2") && e.contains("nope1.safetensors"),
        "{e}"
    );
    assert!(
        e.contains("line 3") && e.contains("nope2.safetensors"),
        "{e}"
    );
    assert!(e.contains("line 4") && e.contains("matches no file"), "{e}");
}

#[test]
fn lists_and_globs_name_their_members_from_zero() {
    let dir = tempfile::tempdir().unwrap();
    models(dir.path());
    let r = recipe::parse(
        "[models]\nlist = [\"pool/a.safetensors\", \"pool/b.safetensors\"]\nglob = \"pool/*.safetensors\"\n[nodes.s]\nmethod = \"soup\"\nmodels = [\"list\", \"glob\"]\n[output]\nnode = \"s\"\n",
        "r.toml",
        dir.path(),
    )
    .unwrap();
    let names: Vec<&str> = r.graph.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        ["glob[0]", "glob[1]", "glob[2]", "list[0]", "list[1]"]
    );
    assert_eq!(r.graph.nodes[0].slots[0].len(), 5);
}
