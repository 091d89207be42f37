//! `amalgam demo`: synthesise a small SD1-layout pool and merge it, end to end.

use amalgam::io::input::ModelFile;
use amalgam::recipe;
use amalgam::size::format_bytes;
use amalgam::synth::{Layout, SynthOptions};
use anyhow::{Context, Result};
use std::path::PathBuf;

const RECIPE: &str = r#"# amalgam demo recipe: the average of four fine-tunes, blended with their task-arithmetic sum.
[models]
base = "base.safetensors"
pool = "m*.safetensors"          # a glob: every fine-tune in the folder

[nodes.soup]
method = "soup"
models = ["pool"]

[nodes.tuned]
method = "task_arithmetic"
base = "base"
models = ["pool"]
lambda = 0.5

[nodes.blend]
method = "weighted_sum"
a = "soup"
b = "tuned"
alpha = 0.3

[output]
node = "blend"
fallback = "base"                # keys the pruned model lacks come from here
dtype = "f16"
"#;

pub fn run(keep: Option<PathBuf>, force: bool) -> Result<()> {
    let temp;
    let kept = keep.is_some();
    // In a temporary folder nothing can be in the way; in a --keep folder existing files are
    // kept unless --force, like every file amalgam writes.
    let force = force || !kept;
    let dir = match keep {
        Some(d) => d,
        None => {
            temp = tempfile::tempdir().context("creating a temporary folder")?;
            temp.path().to_path_buf()
        }
    };
    eprintln!(
        "== synthesising 1 base + 4 fine-tuned SD1-layout models (1/64 size) in {}",
        dir.display()
    );
    let mut o = SynthOptions::new(Layout::Sd1Ldm, 4);
    o.shrink = 8;
    o.prune_vae = 1;
    o.int_keys = true;
    o.overwrite = force;
    let paths = amalgam::synth::synthesize(&dir, &o)?;
    for p in &paths {
        let m = ModelFile::open(p)?;
        eprintln!(
            "   {} ({} tensors, {})",
            p.display(),
            m.tensors().len(),
            format_bytes(m.file_size())
        );
    }

    eprintln!("\n== shorthand: amalgam merge --method soup m000 ... m003 -o soup.safetensors");
    let soup_out = dir.join("soup.safetensors");
    let graph = amalgam::Graph::single("soup", None, paths[1..].to_vec(), Default::default())?;
    let engine = crate::EngineArgs {
        dtype: None,
        compute_dtype: None,
        memory_budget: 256 << 20,
        threads: 0,
        seed: None,
        layout: None,
        non_finite: None,
    };
    let opts = crate::merge_options(&soup_out, &engine, &Default::default(), force);
    let report = crate::run_merge(&graph, opts, false)?;
    eprintln!("{report}");

    eprintln!(
        "\n== shorthand: amalgam merge --method dgmla --base base m000 ... m003 -o dgmla.safetensors"
    );
    eprintln!(
        "   (DELLA drop by magnitude rank, p = 0.1, della_eps = -0.1; TIES-SOUP vote; geometric median\n    of the filtered task vectors with the base as a zero point: the AstolfoMix x215a recipe)"
    );
    let dgmla_out = dir.join("dgmla.safetensors");
    let graph = amalgam::Graph::single(
        "dgmla",
        Some(paths[0].clone()),
        paths[1..].to_vec(),
        Default::default(),
    )?;
    let opts = crate::merge_options(&dgmla_out, &engine, &Default::default(), force);
    let report = crate::run_merge(&graph, opts.clone(), false)?;
    eprintln!("{report}");

    eprintln!(
        "\n== amalgam compare m000 ... m003 --base base -o compare   (distances per block and \
         component, charts, report.html)"
    );
    let compare_dir = dir.join("compare");
    let c = amalgam::analysis::compare(
        &paths[1..],
        Some(&paths[0]),
        &Default::default(),
        &amalgam::NoProgress,
    )?;
    eprint!("{}", amalgam::analysis::summary_table(&c));
    let files = amalgam::analysis::write_report(&c, &compare_dir, force)?;
    eprintln!(
        "   wrote {} files, among them {}",
        files.len(),
        compare_dir.join("report.html").display()
    );

    eprintln!(
        "\n== sweep: amalgam merge --method dgmla ... --sweep p=0.1,0.3 -o 'dgmla_p{{p}}.safetensors' \
         --compare   (both outputs from one read)"
    );
    let sweep = amalgam::recipe::sweep::Sweep {
        axes: vec![amalgam::recipe::sweep::SweepAxis::parse("p=0.1,0.3")?],
        combine: Default::default(),
    };
    let template = dir.join("dgmla_p{p}.safetensors");
    let (table, _) = amalgam::sweep::run_sweep(
        &graph,
        &sweep,
        &template.to_string_lossy(),
        &opts,
        Some(Some(&paths[0])),
        &amalgam::NoProgress,
    )?;
    eprint!("{}", table.to_text());

    let recipe_path = dir.join("demo.toml");
    amalgam::io::dest::write_atomic(&recipe_path, RECIPE.as_bytes(), &[], force)
        .context("writing the demo recipe")?;
    eprintln!("\n== recipe {}:\n{RECIPE}", recipe_path.display());
    let out = dir.join("blend.safetensors");
    let r = recipe::load(&recipe_path)?;
    let opts = crate::merge_options(&out, &engine, &r.settings, force);
    let report = crate::run_merge(&r.graph, opts, false)?;
    eprintln!("{report}");

    let m = ModelFile::open(&out)?;
    let params: usize = m.tensors().values().map(|t| t.numel()).sum();
    println!(
        "demo merged {} models into {} ({} tensors, {} parameters, {})",
        paths.len(),
        out.display(),
        m.tensors().len(),
        params,
        format_bytes(m.file_size())
    );
    if kept {
        println!(
            "the recipe that made it is in its metadata: amalgam inspect --metadata {}",
            out.display()
        );
    } else {
        println!(
            "the demo files were in a temporary folder, now removed; to look at them, run \
             `amalgam demo --keep DIR`, then `amalgam inspect --metadata DIR/blend.safetensors`"
        );
    }
    Ok(())
}
