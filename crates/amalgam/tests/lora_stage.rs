//! `extract_lora` as a recipe's output node: a merge's result extracted as a LoRA in one run.

mod common;

use amalgam::io::dtype::OutputDtype;
use amalgam::layout::arch::Layout;
use amalgam::lora::extract::{extract_lora, ExtractOptions, RankRule};
use amalgam::recipe::parse;
use amalgam::{merge, MergeOptions, NoProgress};
use common::*;
use std::path::{Path, PathBuf};

/// A recipe over `pool` (base, a, b) whose output is `output_node`, with `extra` appended.
fn recipe(d: &Path, pool: &[PathBuf], extra: &str) -> amalgam::recipe::Recipe {
    let text = format!(
        r#"
[models]
base = "{}"
a = "{}"
b = "{}"

[nodes.mix]
method = "weighted_sum"
a = "a"
b = "b"
alpha = 0.25
{extra}
"#,
        pool[0].display(),
        pool[1].display(),
        pool[2].display()
    );
    parse(&text, "test.toml", d).unwrap()
}

const LORA: &str = r#"
[nodes.lora]
method = "extract_lora"
model = "mix"
base = "base"
rank = 3

[output]
node = "lora"
"#;

fn files(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_merge_extracted_in_one_run_equals_merge_then_extract() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pool = f32_pool(d, Layout::Sd1Ldm, 2, 16);
    let before = files(d);

    // In one run.
    let r = recipe(d, &pool, LORA);
    let out = d.join("lora.safetensors");
    let mut o = MergeOptions::new(&out);
    o.output_dtype = OutputDtype::F32;
    o.report_json = Some(d.join("report.json"));
    let report = merge(&r.graph, &o, &NoProgress).unwrap();
    let lora = report.lora.as_ref().expect("a LoRA report");
    assert!(lora.modules.len() > 50, "{report}");
    assert!(lora.modules.iter().all(|m| m.rank <= 3));
    // The merge of `mix` was done (and reported), and its temporary file removed.
    assert!(report.counts().0 > 0, "{report}");
    let text = report.to_string();
    assert!(text.contains("temporary f32 file"), "{text}");
    assert!(text.contains("LoRA of"), "{text}");
    let mut want = before.clone();
    want.extend(["lora.safetensors".to_string(), "report.json".to_string()]);
    want.sort();
    assert_eq!(
        files(d),
        want,
        "nothing but the LoRA and the report is left"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("report.json")).unwrap()).unwrap();
    assert_eq!(
        json["lora"]["modules"].as_array().unwrap().len(),
        lora.modules.len()
    );

    // The same in two steps: the merge to an f32 file, then the extraction.
    let mix = d.join("mix.safetensors");
    let two = recipe(d, &pool, "[output]\nnode = \"mix\"\n");
    let mut o2 = MergeOptions::new(&mix);
    o2.output_dtype = OutputDtype::F32;
    merge(&two.graph, &o2, &NoProgress).unwrap();
    let direct = d.join("direct.safetensors");
    extract_lora(
        &ExtractOptions {
            dtype: OutputDtype::F32,
            ..ExtractOptions::new(&mix, &pool[0], &direct, 3)
        },
        &NoProgress,
    )
    .unwrap();
    let (a, b) = (all_f32(&out), all_f32(&direct));
    assert_eq!(a.len(), b.len());
    for (k, v) in &a {
        assert_eq!(v, &b[k], "{k}");
    }
    // The recipe is recorded in the LoRA.
    let meta = amalgam::io::input::ModelFile::open(&out)
        .unwrap()
        .metadata()
        .clone();
    assert!(meta["amalgam_recipe"].contains("extract_lora"));
}

#[test]
fn a_model_input_is_extracted_without_a_merge() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pool = f32_pool(d, Layout::Sd1Ldm, 2, 16);
    let extra = r#"
[nodes.lora]
method = "extract_lora"
model = "a"
base = "base"
rank = 8
energy = 0.5

[output]
node = "lora"
"#;
    let out = d.join("lora.safetensors");
    let report = merge(
        &recipe(d, &pool, extra).graph,
        &MergeOptions::new(&out),
        &NoProgress,
    )
    .unwrap();
    let direct = d.join("direct.safetensors");
    extract_lora(
        &ExtractOptions {
            rule: RankRule::Energy(0.5),
            ..ExtractOptions::new(&pool[1], &pool[0], &direct, 8)
        },
        &NoProgress,
    )
    .unwrap();
    assert_eq!(report.counts(), (0, 0, 0, 0), "nothing merged");
    let (a, b) = (all_f32(&out), all_f32(&direct));
    assert_eq!(a, b);
}

#[test]
fn a_stage_only_as_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pool = f32_pool(d, Layout::Sd1Ldm, 2, 32);
    let err = |extra: &str| {
        let text = format!(
            "[models]\nbase = \"{}\"\na = \"{}\"\nb = \"{}\"\n{extra}",
            pool[0].display(),
            pool[1].display(),
            pool[2].display()
        );
        match parse(&text, "t.toml", d) {
            Err(e) => e.to_string(),
            Ok(r) => merge(
                &r.graph,
                &MergeOptions::new(d.join("o.safetensors")),
                &NoProgress,
            )
            .expect_err("an error")
            .to_string(),
        }
    };
    let used = err(
        "[nodes.lora]\nmethod = \"extract_lora\"\nmodel = \"a\"\nbase = \"base\"\n\
         [nodes.mix]\nmethod = \"weighted_sum\"\na = \"lora\"\nb = \"b\"\n[output]\nnode = \"mix\"\n",
    );
    assert!(
        used.contains("`lora`") && used.contains("only be the output"),
        "{used}"
    );
    let both = err(
        "[nodes.lora]\nmethod = \"extract_lora\"\nmodel = \"a\"\nbase = \"base\"\nratio = 0.5\n\
         energy = 0.5\n[output]\nnode = \"lora\"\n",
    );
    assert!(both.contains("not both"), "{both}");
    let zero = err(
        "[nodes.lora]\nmethod = \"extract_lora\"\nmodel = \"a\"\nbase = \"base\"\nrank = 0\n\
         [output]\nnode = \"lora\"\n",
    );
    assert!(zero.contains("at least 1"), "{zero}");
    assert!(files_containing(d, "o.safetensors").is_empty());
}

#[test]
fn cancelled_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pool = f32_pool(d, Layout::Sd1Ldm, 2, 16);
    let before = files(d);
    let o = MergeOptions::new(d.join("lora.safetensors"));
    o.cancel.cancel();
    let e = merge(&recipe(d, &pool, LORA).graph, &o, &NoProgress).unwrap_err();
    assert!(matches!(e, amalgam::Error::Cancelled), "{e}");
    assert_eq!(files(d), before);
}
