//! Every documented default is the default: for each method and each parameter `amalgam methods`
//! lists with a default (its declaration's `default_text`), a merge given that default explicitly,
//! as a recipe writes it, writes the same bytes as one that does not give it.
mod common;
use amalgam::io::dtype::OutputDtype;
use amalgam::method::ParamValue;
use amalgam::{merge, MergeOptions, NoProgress};
use common::*;
use std::path::{Path, PathBuf};

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
            let Some(default) = p.default_text() else {
                continue;
            };
            let default = default.as_str();
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

/// docs/methods.md states every declared parameter and default: a method's table row names each of
/// its parameters and shows its default; the TIES family's table names every parameter of the
/// pipeline, and each preset's row shows the defaults it overrides.
#[test]
fn docs_show_the_declared_parameters_and_defaults() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/methods.md"
    ))
    .unwrap()
    .replace('−', "-");
    let row = |name: &str| -> &str {
        doc.lines()
            .find(|l| l.starts_with(&format!("| `{name}`")))
            .unwrap_or_else(|| panic!("docs/methods.md has no row for `{name}`"))
    };
    let mut problems = Vec::new();
    for info in amalgam::methods::ALL {
        let line = row(info.name);
        match amalgam::methods::preset_of(info) {
            Some(preset) => {
                for (param, default) in preset.overrides {
                    let default = default.unwrap_or_default();
                    if !line.contains(&default) {
                        problems.push(format!(
                            "{}: `{param}` = {default} not in its row",
                            info.name
                        ));
                    }
                }
            }
            None if info.name == "ties" => {
                for p in info.params {
                    if !doc.contains(&format!("`{}`", p.name)) {
                        problems.push(format!("ties: `{}` is not documented", p.name));
                    }
                }
            }
            None => {
                for p in info.params {
                    let default = p.default_text().unwrap_or_default();
                    let at = line.rfind(&format!("`{}`", p.name));
                    match at {
                        None => {
                            problems.push(format!("{}: `{}` not in its row", info.name, p.name))
                        }
                        // The default follows the name closely: `alpha` (0.5), `unit`: `tensor`.
                        Some(at)
                            if !line[at..]
                                .chars()
                                .take(40)
                                .collect::<String>()
                                .contains(&default) =>
                        {
                            problems.push(format!(
                                "{}: `{}`'s default {default} not in its row",
                                info.name, p.name
                            ))
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// docs/methods.md's index lists every method with the sources and aliases it is declared with.
#[test]
fn docs_index_matches_the_declarations() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/methods.md"
    ))
    .unwrap();
    let index = amalgam::methods::markdown_index();
    assert!(
        doc.contains(&index),
        "docs/methods.md's index is out of date; `amalgam methods --markdown` prints it:\n{index}"
    );
    // Every method has a source, and every alias names a registered method.
    for info in amalgam::methods::all_infos() {
        assert!(!info.origins.is_empty(), "{} has no source", info.name);
    }
    for (alias, to, _) in amalgam::methods::ALIASES {
        assert_eq!(amalgam::methods::canonical_name(alias).unwrap(), *to);
        assert!(amalgam::methods::info(to).is_ok(), "{alias} -> {to}");
    }
}
