//! The `amalgam` binary end to end, on synthetic SD-layout models.

mod common;
use common::*;

use std::path::Path;
use std::process::Command;

#[test]
fn demo_runs() {
    let out = ok(&["demo"]);
    assert!(out.contains("demo merged 5 models"), "{out}");
    assert!(
        out.contains("lacks 248 keys"),
        "the pruned model is reported: {out}"
    );
}

#[test]
fn synth_merge_inspect_and_thread_invariance() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = ok(&[
        "synth",
        "-o",
        s(d),
        "--layout",
        "sdxl",
        "-n",
        "3",
        "--shrink",
        "16",
        "--prune-vae",
        "1",
        "--int-keys",
    ]);
    assert!(
        out.contains("m002.safetensors") && out.contains("wrote 4 models"),
        "{out}"
    );
    // Refuses to overwrite without --force.
    let e = fails(&[
        "synth",
        "-o",
        s(d),
        "--layout",
        "sdxl",
        "-n",
        "1",
        "--shrink",
        "16",
    ]);
    assert!(e.contains("already exists"), "{e}");

    let m: Vec<String> = (0..3)
        .map(|i| {
            d.join(format!("m{i:03}.safetensors"))
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let base = d.join("base.safetensors");
    let mut outs = Vec::new();
    for (threads, budget) in [("1", "2GiB"), ("2", "8MiB")] {
        let o = d.join(format!("ta-{threads}.safetensors"));
        let mut args = vec!["merge", "--method", "task_arithmetic", "--base", s(&base)];
        args.extend(m.iter().map(|x| x.as_str()));
        args.extend([
            "-o",
            s(&o),
            "--lambda",
            "0.7",
            "--threads",
            threads,
            "--memory-budget",
            budget,
            "--compute-dtype",
            "f64",
        ]);
        let text = ok(&args);
        assert!(
            text.contains("merged from the inputs that have them"),
            "{text}"
        );
        outs.push(std::fs::read(&o).unwrap());
    }
    assert!(
        outs[0] == outs[1],
        "threads/budget changed the output bytes"
    );

    let o = d.join("ta-1.safetensors");
    let text = ok(&["inspect", s(&o)]);
    assert!(
        text.contains("tensors:    2483"),
        "every key of the union is kept: {text}"
    );
    assert!(text.contains("F16") && text.contains("I64"), "{text}");
    assert!(text.contains("amalgam_version"), "{text}");
    let text = ok(&["inspect", "--metadata", s(&o)]);
    assert!(
        text.contains("method = \"task_arithmetic\"") && text.contains("\"lambda\" = 0.7"),
        "{text}"
    );
    let text = ok(&["inspect", "--keys", s(&o)]);
    assert!(
        text.contains("conditioner.embedders.1.model.token_embedding.weight"),
        "{text}"
    );
}

#[test]
fn merge_errors_are_clear_and_leave_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&[
        "synth",
        "-o",
        s(d),
        "--layout",
        "sd1",
        "-n",
        "2",
        "--shrink",
        "16",
        "--components",
        "clip_l",
    ]);
    let (a, b) = (d.join("m000.safetensors"), d.join("m001.safetensors"));
    let bad = d.join("bad.safetensors");
    let mut bytes = std::fs::read(&a).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&bad, bytes).unwrap();
    let out = d.join("out.safetensors");

    let e = fails(&["merge", "--method", "soup", s(&a), s(&bad), "-o", s(&out)]);
    assert!(
        e.contains("bad.safetensors") && e.contains("truncated"),
        "{e}"
    );
    assert!(!out.exists());

    let e = fails(&["merge", "--method", "soup", s(&a), s(&b), "-o", s(&a)]);
    assert!(e.contains("refusing to overwrite an input"), "{e}");

    let e = fails(&["merge", "--method", "knots", s(&a), s(&b), "-o", s(&out)]);
    assert!(
        e.contains("unknown method `knots`") && e.contains("task_arithmetic"),
        "{e}"
    );

    let e = fails(&[
        "merge",
        "--method",
        "task_arithmetic",
        s(&a),
        s(&b),
        "-o",
        s(&out),
    ]);
    assert!(e.contains("needs a base model"), "{e}");

    let e = fails(&[
        "merge",
        "--method",
        "weighted_sum",
        s(&a),
        s(&b),
        s(&a),
        "-o",
        s(&out),
    ]);
    assert!(e.contains("takes 2 model(s)"), "{e}");

    let e = fails(&[
        "merge",
        "--method",
        "soup",
        s(&a),
        "missing.safetensors",
        "-o",
        s(&out),
    ]);
    assert!(
        e.contains("missing model files: missing.safetensors"),
        "{e}"
    );

    let e = fails(&[
        "merge",
        "--method",
        "soup",
        s(&a),
        s(&b),
        "-o",
        s(&out),
        "--memory-budget",
        "lots",
    ]);
    assert!(e.contains("not a size"), "{e}");
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn recipe_file_via_cli() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&[
        "synth",
        "-o",
        s(d),
        "--layout",
        "sd1",
        "-n",
        "3",
        "--shrink",
        "16",
        "--components",
        "vae",
    ]);
    let recipe = d.join("r.toml");
    std::fs::write(
        &recipe,
        "[models]\nbase = \"base.safetensors\"\npool = \"m*.safetensors\"\n[nodes.avg]\nmethod = \"n_average\"\nmodels = [\"pool\"]\n[output]\nnode = \"avg\"\ndtype = \"bf16\"\n",
    )
    .unwrap();
    let out = d.join("out.safetensors");
    ok(&["merge", s(&recipe), "-o", s(&out), "--quiet"]);
    let text = ok(&["inspect", s(&out)]);
    assert!(text.contains("BF16"), "{text}");
    let e = fails(&["merge", s(&recipe), "-o", s(&out), "--alpha", "0.3"]);
    assert!(e.contains("go with --method"), "{e}");
    let e = fails(&["merge", s(&recipe), "-o", s(&out)]);
    assert!(e.contains("already exists"), "{e}");
    ok(&[
        "merge",
        s(&recipe),
        "-o",
        s(&out),
        "--force",
        "--dtype",
        "f32",
    ]);
    assert!(ok(&["inspect", s(&out)]).contains("F32"));
}

#[test]
fn methods_lists_every_method() {
    let text = ok(&["methods"]);
    for m in [
        "weighted_sum",
        "soup",
        "linear",
        "add_difference",
        "subtract",
        "task_arithmetic",
    ] {
        assert!(text.contains(m), "{m} missing from:\n{text}");
    }
    // Presets are shown as the defaults they change in `ties`, once; `methods NAME` shows one
    // method whole (aliases too).
    assert!(
        text.contains(
            "`ties` with k = 1.0, election = count (`amalgam methods ties_soup` shows it whole)"
        ),
        "{text}"
    );
    // The pipeline's parameters are listed by the methods that are not presets (`ties`, and
    // `dgmiz`, which adds ISO-Z to it), never by a preset.
    let whole = amalgam::methods::ALL
        .iter()
        .filter(|i| amalgam::methods::preset_of(i).is_none())
        .filter(|i| i.params.iter().any(|p| p.name == "sign_tie"))
        .count();
    assert_eq!(whole, 2);
    assert_eq!(text.matches("  sign_tie = zero").count(), whole, "{text}");
    let one = ok(&["methods", "ties_soup"]);
    assert!(
        one.starts_with("ties_soup  [community]\n")
            && one.contains("  k = 1.0 (a number in (0, 1]): "),
        "{one}"
    );
    assert!(!one.contains("\nsoup\n"), "{one}");
    let della = ok(&["methods", "magprune"]);
    assert!(
        della.starts_with("della  [paper, mergekit, sd-mecha; also known as magprune (paper)]\n"),
        "{della}"
    );
    // The index of docs/methods.md.
    let index = ok(&["methods", "--markdown"]);
    assert!(
        index.contains("| **`della`** | paper, mergekit, sd-mecha | `magprune` (paper) |"),
        "{index}"
    );
    let err = fails(&["methods", "nope"]);
    assert!(err.contains("unknown method `nope`"), "{err}");
}

#[test]
fn inspect_reports_architecture_components_and_hash() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&[
        "synth",
        "-o",
        s(d),
        "--layout",
        "sdxl",
        "-n",
        "1",
        "--shrink",
        "32",
        "--prune-vae",
        "1",
    ]);
    let out = ok(&["inspect", s(&d.join("m000.safetensors"))]);
    assert!(out.contains("architecture: sdxl-sgm (Sdxl;"), "{out}");
    let line = |name: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("no {name} line: {out}"))
            .to_string()
    };
    assert!(line("vae").contains("0/248") && line("vae").contains("MISSING (pruned)"));
    assert!(line("diffuser").contains("complete"), "{out}");
    assert!(line("clip_g").contains("complete"), "{out}");
    // AutoV2: 10 hex digits, the same as sha256sum's first 10 where the tool exists.
    let hash = line("AutoV2:")
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    assert_eq!(hash.len(), 10);
    assert!(hash.chars().all(|c| c.is_ascii_hexdigit()));
    if let Ok(o) = Command::new("sha256sum")
        .arg(d.join("m000.safetensors"))
        .output()
    {
        assert!(String::from_utf8_lossy(&o.stdout).starts_with(&hash));
    }
    let base = ok(&["inspect", "--no-hash", s(&d.join("base.safetensors"))]);
    assert!(line_of(&base, "vae").contains("complete"), "{base}");
    assert!(!base.contains("AutoV2"));
    // A file of another kind is "unknown" but still inspected.
    let llm = d.join("llm.safetensors");
    let header =
        br#"{"model.embed_tokens.weight":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 8]);
    std::fs::write(&llm, bytes).unwrap();
    assert!(ok(&["inspect", "--no-hash", s(&llm)]).contains("architecture: unknown"));
}

#[test]
fn inspect_json_has_the_hashes_and_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    synth_sd1(d, 1, &["--int-keys"]);
    let file = d.join("m000.safetensors");
    let out = ok(&["inspect", "--json", s(&file)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let h = &v["hashes"];
    let hex = |k: &str, n: usize| {
        let x = h[k].as_str().unwrap_or_else(|| panic!("no {k}: {h}"));
        assert!(
            x.len() == n && x.chars().all(|c| c.is_ascii_hexdigit()),
            "{k}: {x}"
        );
        x.to_string()
    };
    let sha = hex("sha256", 64);
    assert!(sha.starts_with(&hex("autov2", 10)));
    assert!(hex("autov3_sha256", 64).starts_with(&hex("autov3", 12)));
    hex("legacy", 8); // the synthetic SD1 file is over 1.1 MiB
    assert_eq!(v["detection"]["layout"], "sd1-ldm");
    assert!(v["report"]["position_ids"].is_array());
    // The text output shows the same hashes; --no-hash leaves them out of the JSON.
    let text = ok(&["inspect", s(&file)]);
    assert!(text.contains("Hashes:") && text.contains(&sha), "{text}");
    assert!(text.contains("Report:"), "{text}");
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", "--json", "--no-hash", s(&file)])).unwrap();
    assert!(v["hashes"].is_null());
}

fn line_of(out: &str, name: &str) -> String {
    out.lines()
        .find(|l| l.trim_start().starts_with(name))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn repair_completes_a_pruned_model_from_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&[
        "synth",
        "-o",
        s(d),
        "--layout",
        "sdxl",
        "-n",
        "1",
        "--shrink",
        "32",
        "--prune-vae",
        "1",
    ]);
    let pruned = d.join("m000.safetensors");
    let out = d.join("repaired.safetensors");
    let log = ok(&[
        "repair",
        s(&pruned),
        "--base",
        s(&d.join("base.safetensors")),
        "-o",
        s(&out),
    ]);
    assert!(log.contains("repaired: 248 completed from base"), "{log}");
    let inspected = ok(&["inspect", "--no-hash", s(&out)]);
    assert!(
        line_of(&inspected, "vae").contains("complete"),
        "{inspected}"
    );
    assert!(inspected.contains("amalgam_repair"), "{inspected}");
    // Nothing is overwritten without --force.
    let e = fails(&[
        "repair",
        s(&pruned),
        "--base",
        s(&d.join("base.safetensors")),
        "-o",
        s(&out),
    ]);
    assert!(e.contains("already exists"), "{e}");
}

#[test]
fn inspect_recognises_a_lora() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("lora.safetensors");
    let m = "lora_te_text_model_encoder_layers_0_self_attn_q_proj";
    let header = format!(
        r#"{{"{m}.lora_down.weight":{{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]}},"{m}.lora_up.weight":{{"dtype":"F32","shape":[2,1],"data_offsets":[8,16]}}}}"#
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0u8; 16]);
    std::fs::write(&p, bytes).unwrap();
    let out = ok(&["inspect", "--no-hash", s(&p)]);
    assert!(
        out.contains("architecture: a kohya LoRA for sd1-ldm: 1 modules map to its keys"),
        "{out}"
    );
}

#[test]
fn a_mecha_recipe_with_someone_elses_paths_runs_with_model_dir() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&[
        "synth",
        "-o",
        s(d),
        "--layout",
        "sd1",
        "-n",
        "2",
        "--shrink",
        "32",
    ]);
    let recipe = d.join("soup.mecha");
    std::fs::write(
        &recipe,
        "version 0.1.0\n\
         model \"/home/someone/models/m000.safetensors\" model_config=\"sd1-ldm\" merge_space=\"weight\"\n\
         model \"/home/someone/models/m001.safetensors\" model_config=\"sd1-ldm\" merge_space=\"weight\"\n\
         merge \"n_average\" &0 &1\n",
    )
    .unwrap();
    let out = d.join("out.safetensors");
    let e = fails(&["merge", s(&recipe), "-o", s(&out)]);
    assert!(
        e.contains("missing models")
            && e.contains("/home/someone/models/m000.safetensors")
            && e.contains("m001"),
        "{e}"
    );
    assert!(!out.exists());
    let log = ok(&["merge", s(&recipe), "--model-dir", s(d), "-o", s(&out)]);
    assert!(log.contains("wrote"), "{log}");
    // A model saved under another name: --rename.
    std::fs::rename(d.join("m001.safetensors"), d.join("mine.safetensors")).unwrap();
    let renamed = d.join("renamed.safetensors");
    let e = fails(&["merge", s(&recipe), "--model-dir", s(d), "-o", s(&renamed)]);
    assert!(e.contains("m001.safetensors"), "{e}");
    ok(&[
        "merge",
        s(&recipe),
        "--model-dir",
        s(d),
        "--rename",
        "m001.safetensors=mine.safetensors",
        "-o",
        s(&renamed),
    ]);
    std::fs::rename(d.join("mine.safetensors"), d.join("m001.safetensors")).unwrap();
    let native = d.join("native.safetensors");
    ok(&[
        "merge",
        "--method",
        "soup",
        s(&d.join("m000.safetensors")),
        s(&d.join("m001.safetensors")),
        "-o",
        s(&native),
    ]);
    // The same tensors as the native soup (the metadata differ: each records its recipe).
    let strip = |p: &Path| {
        let b = std::fs::read(p).unwrap();
        let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        b[8 + n..].to_vec()
    };
    assert_eq!(strip(&out), strip(&native));
}

#[test]
fn recipe_convert_both_ways_and_outputs_embed_both_recipes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&[
        "synth",
        "-o",
        s(d),
        "--layout",
        "sd1",
        "-n",
        "2",
        "--shrink",
        "32",
    ]);
    let toml = d.join("r.toml");
    std::fs::write(
        &toml,
        "[models]\nbase = \"base.safetensors\"\npool = \"m*.safetensors\"\n\n[nodes.t]\nmethod = \"tgmd\"\nbase = \"base\"\nmodels = [\"pool\"]\n\n[output]\nnode = \"t\"\nseed = 5\n",
    )
    .unwrap();
    let mecha = d.join("r.mecha");
    ok(&["recipe", "convert", s(&toml), s(&mecha)]);
    let text = std::fs::read_to_string(&mecha).unwrap();
    assert!(
        text.starts_with("version 0.1.0\n") && text.contains("\"ties_sum_with_dropout\""),
        "{text}"
    );
    let back = d.join("back.toml");
    ok(&["recipe", "convert", s(&mecha), s(&back)]);
    // All three merge to the same tensors.
    let strip = |p: &Path| {
        let b = std::fs::read(p).unwrap();
        let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        b[8 + n..].to_vec()
    };
    let mut outs = Vec::new();
    for (i, r) in [&toml, &mecha, &back].iter().enumerate() {
        let out = d.join(format!("out{i}.safetensors"));
        ok(&["merge", s(r), "-o", s(&out)]);
        outs.push(strip(&out));
    }
    assert!(outs[0] == outs[1] && outs[1] == outs[2]);
    let info = ok(&["inspect", "--no-hash", s(&d.join("out0.safetensors"))]);
    assert!(
        info.contains("embedded as amalgam (TOML) and sd-mecha (.mecha)"),
        "{info}"
    );
    // A method sd-mecha lacks cannot be written as .mecha.
    std::fs::write(
        &toml,
        "[models]\nbase = \"base.safetensors\"\npool = \"m*.safetensors\"\n\n[nodes.t]\nmethod = \"karcher\"\nmodels = [\"pool\"]\n\n[output]\nnode = \"t\"\n",
    )
    .unwrap();
    let e = fails(&["recipe", "convert", s(&toml), s(&d.join("k.mecha"))]);
    assert!(e.contains("cannot be written as .mecha"), "{e}");
    // Nothing is overwritten without --force.
    let e = fails(&["recipe", "convert", s(&mecha), s(&back)]);
    assert!(e.contains("already exists"), "{e}");
}
