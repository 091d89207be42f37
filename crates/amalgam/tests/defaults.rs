//! Every documented default is the default: for each method and each parameter `amalgam methods`
//! lists with a default, a merge given that default explicitly writes the same bytes as one that
//! does not give it. (Defaults written as prose, like `weights`' "1 for every model", are named
//! here and skipped.)
mod common;
use amalgam::dtype::OutputDtype;
use amalgam::method::ParamValue;
use amalgam::{merge, MergeOptions, NoProgress};
use common::*;
use std::path::{Path, PathBuf};

const PROSE: &[&str] = &["1 for every model"];

fn value(default: &str) -> ParamValue {
    match default {
        "true" => ParamValue::Bool(true),
        "false" => ParamValue::Bool(false),
        d => d
            .parse::<f64>()
            .map(ParamValue::Number)
            .unwrap_or_else(|_| ParamValue::Text(d.to_string())),
    }
}

#[test]
fn documented_defaults_are_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let paths: Vec<PathBuf> = (0..4)
        .map(|m| {
            let v: Vec<f32> = (0..600)
                .map(|i| ((i * 7 + m * 13) % 17) as f32 * 0.03 - 0.25 + m as f32 * 0.02)
                .collect();
            write_file(
                &d.join(format!("m{m}.safetensors")),
                &[f32t("w", &[20, 30], &v), f32t("v", &[600], &v)],
                true,
            )
        })
        .collect();
    let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
    let mut checked = 0;
    let mut failures = Vec::new();
    for info in amalgam::methods::ALL {
        let plain_graph = one_node(&refs, info.name, slots_for(info.name, 1..4), &[]);
        let run = |params: &[(&str, ParamValue)], tag: &str| {
            let mut g = plain_graph.clone();
            for (k, v) in params {
                g.nodes[0].params.insert(k.to_string(), v.clone());
            }
            let out = d.join(format!("{}-{tag}.safetensors", info.name));
            let mut o = MergeOptions::new(&out);
            o.output_dtype = OutputDtype::F32;
            o.seed = 11;
            merge(&g, &o, &NoProgress).map(|_| all_f32(&out))
        };
        let plain = run(&[], "plain").unwrap_or_else(|e| panic!("{}: {e}", info.name));
        for p in info.params {
            let Some(default) = p.default else { continue };
            if PROSE.contains(&default) {
                continue;
            }
            checked += 1;
            match run(&[(p.name, value(default))], p.name) {
                Ok(given) if given == plain => {}
                Ok(_) => failures.push(format!(
                    "{}: `{} = {default}` changes the output",
                    info.name, p.name
                )),
                // A parameter of another stage than the preset's (e.g. `della_eps` without
                // `drop = "della"`) is refused as such: its default is that stage's.
                Err(e) if e.to_string().contains("only apply") => checked -= 1,
                Err(e) => failures.push(format!(
                    "{}: `{} = {default}` is refused: {e}",
                    info.name, p.name
                )),
            }
        }
    }
    assert!(checked > 50, "{checked} defaults checked");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
