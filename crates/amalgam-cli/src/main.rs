//! `amalgam`: the command line over the amalgam library.

mod bench;
mod demo;
mod progress;
mod signals;

use amalgam::dtype::{dtype_name, OutputDtype};
use amalgam::graph::Graph;
use amalgam::input::ModelFile;
use amalgam::method::ParamValue;
use amalgam::real::ComputeDtype;
use amalgam::recipe::{self, RecipeSettings};
use amalgam::size::{format_bytes, parse_bytes};
use amalgam::synth::{Layout, SynthOptions};
use amalgam::{MergeOptions, MergeReport};
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "amalgam",
    version,
    about = "Merge many safetensors checkpoints in bounded memory"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Merge models: from a recipe file (.toml or .mecha), or with --method and a list of models.
    Merge(Box<MergeArgs>),
    /// Show a safetensors file's keys, dtypes, shapes, parameter count and metadata.
    Inspect(InspectArgs),
    /// Write synthetic models with a real key layout (SD1, SDXL, SD3, FLUX, kohya, diffusers).
    Synth(SynthArgs),
    /// Synthesise a small model pool in a temporary folder and merge it (no files needed).
    Demo(DemoArgs),
    /// Complete a pruned model (e.g. one without its VAE) from a base model of its architecture.
    Repair(RepairArgs),
    /// Recipe tools: `recipe convert IN OUT` between amalgam's TOML and sd-mecha's .mecha.
    Recipe(RecipeArgs),
    /// List the merge methods and their parameters (presets as their overrides), or one whole.
    Methods(MethodsArgs),
    /// Measure merge speed and memory against simply reading the inputs.
    Bench(bench::BenchArgs),
}

#[derive(Args, Clone)]
pub struct EngineArgs {
    /// Output dtype of merged tensors: f16, bf16, f32 or f64 [default: f16, or the recipe's]
    #[arg(long)]
    dtype: Option<OutputDtype>,
    /// Accumulation precision: f32 or f64 [default: f32, or the recipe's]
    #[arg(long)]
    compute_dtype: Option<ComputeDtype>,
    /// Memory for the working set, whatever the number of models (e.g. 512MiB, 2GiB)
    #[arg(long, default_value = "2GiB", value_parser = parse_bytes)]
    memory_budget: u64,
    /// Worker threads (0 = one per core)
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[arg(long, help = seed_help())]
    seed: Option<u64>,
    /// Write the output in this key layout, e.g. sdxl-kohya or sd1-kohya [default: the original
    /// (ldm/sgm) layout, or the recipe's]
    #[arg(long)]
    layout: Option<amalgam::arch::Layout>,
    /// A model whose tensor for a key holds NaN or Inf: omit (leave it out of that key, like a
    /// missing key, and report it), error (stop, naming file, key and count) or keep (merge the
    /// values as they are) [default: omit, or the recipe's]
    #[arg(long)]
    non_finite: Option<amalgam::non_finite::NonFinite>,
}

#[derive(Args)]
struct MethodsArgs {
    /// One method (or alias) to show whole
    name: Option<String>,
}

#[derive(Args)]
struct MergeArgs {
    /// A recipe file (.toml, or an sd-mecha .mecha), or with --method the models to merge
    inputs: Vec<PathBuf>,
    /// Merge method for the shorthand form (see `amalgam methods`)
    #[arg(long, short)]
    method: Option<String>,
    /// Base model: fills the `base` input of methods that have one (task_arithmetic, the TIES
    /// family, model_stock, ...); for the others it is not merged but is the fallback and the
    /// --repair source
    #[arg(long)]
    base: Option<PathBuf>,
    /// The model keys the merge has no value for are taken from (one of the models or another
    /// file) [default: --base, else the first model that has the key]
    #[arg(long)]
    fallback: Option<PathBuf>,
    /// Output file
    #[arg(long, short)]
    output: PathBuf,
    /// `alpha` parameter (weighted_sum, add_difference)
    #[arg(long)]
    alpha: Option<f64>,
    /// `lambda` parameter (task_arithmetic)
    #[arg(long)]
    lambda: Option<f64>,
    /// Per-model weights, comma-separated (linear, task_arithmetic)
    #[arg(long, value_delimiter = ',')]
    weights: Option<Vec<f64>>,
    /// Any parameter as NAME=VALUE (number, true/false, comma list); repeatable
    #[arg(long = "param", short = 'p')]
    params: Vec<String>,
    /// Complete models that lack keys (pruned files) from --base (else --fallback), instead of
    /// leaving them out of those keys
    #[arg(long)]
    repair: bool,
    /// Folders where the models of a `.mecha` recipe are looked for (by relative path, or by
    /// file name for absolute paths written on another machine); repeatable
    #[arg(long = "model-dir")]
    model_dirs: Vec<PathBuf>,
    /// Rename a model of a `.mecha` recipe (a whole path or a file name) before looking for it,
    /// as OLD=NEW; repeatable
    #[arg(long = "rename", value_parser = parse_rename)]
    renames: Vec<(String, String)>,
    /// Replace the output file if it exists
    #[arg(long)]
    force: bool,
    /// Write the full per-key report as JSON here (checked with the output before the merge
    /// starts; an existing file is kept unless --force)
    #[arg(long)]
    report_json: Option<PathBuf>,
    /// Start afresh even if an interrupted run of this same merge left a partial file to resume
    #[arg(long)]
    no_resume: bool,
    /// On Ctrl-C, SIGTERM or an error, keep the partial file so that rerunning the same command
    /// resumes it (a killed run always leaves it)
    #[arg(long)]
    keep_partial: bool,
    /// No progress bar and no summary
    #[arg(long, short)]
    quiet: bool,
    /// Chunk length in elements instead of the one derived from the budget (for testing)
    #[arg(long, hide = true)]
    chunk: Option<usize>,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Args)]
struct RecipeArgs {
    #[command(subcommand)]
    command: RecipeCommand,
}

#[derive(Subcommand)]
enum RecipeCommand {
    /// Convert a recipe between the native TOML format and sd-mecha's .mecha (by extension).
    Convert {
        /// The recipe to read (.toml or .mecha)
        input: PathBuf,
        /// The recipe to write (.mecha or .toml)
        output: PathBuf,
        /// Folders where a .mecha recipe's models are looked for; repeatable
        #[arg(long = "model-dir")]
        model_dirs: Vec<PathBuf>,
        /// Rename a model of a .mecha recipe, OLD=NEW; repeatable
        #[arg(long = "rename", value_parser = parse_rename)]
        renames: Vec<(String, String)>,
        /// Replace the output file if it exists
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args)]
struct RepairArgs {
    /// The pruned model
    model: PathBuf,
    /// A complete model of the same architecture (e.g. the SDXL 1.0 base)
    #[arg(long)]
    base: PathBuf,
    /// Output file
    #[arg(long, short)]
    output: PathBuf,
    /// Replace the output file if it exists
    #[arg(long)]
    force: bool,
    /// Output dtype [default: the pruned model's most common float dtype]
    #[arg(long)]
    dtype: Option<OutputDtype>,
}

#[derive(Args)]
struct InspectArgs {
    file: PathBuf,
    /// List every key with dtype and shape
    #[arg(long)]
    keys: bool,
    /// Print the `__metadata__` values in full (e.g. the recipe an amalgam output was made with)
    #[arg(long)]
    metadata: bool,
    /// Skip the AutoV2 hash (it reads the whole file)
    #[arg(long)]
    no_hash: bool,
}

#[derive(Args)]
struct SynthArgs {
    /// Folder to write base.safetensors and m000.safetensors, ...
    #[arg(long, short)]
    output: PathBuf,
    /// Key layout: sd1, sdxl, sd3, flux, sd1-kohya, sdxl-kohya, sd1-diffusers_unet, sdxl-diffusers_unet
    #[arg(long, default_value = "sdxl")]
    layout: Layout,
    /// Number of fine-tuned models
    #[arg(long, short, default_value_t = 4)]
    n: usize,
    /// Divide every dimension above 16 by this (4 = 1/16 of the parameters)
    #[arg(long, default_value_t = 1)]
    shrink: usize,
    /// Storage dtype: f16, bf16, f32
    #[arg(long, default_value = "f16")]
    dtype: OutputDtype,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Do not write base.safetensors
    #[arg(long)]
    no_base: bool,
    /// Only these components, comma-separated (clip_l, clip_g, diffuser, vae)
    #[arg(long, value_delimiter = ',')]
    components: Vec<String>,
    /// The first K fine-tunes lack the VAE (pruned files)
    #[arg(long, default_value_t = 0)]
    prune_vae: usize,
    /// Include the integer keys (position_ids)
    #[arg(long)]
    int_keys: bool,
    /// Replace existing files
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct DemoArgs {
    /// Keep the demo files in this folder instead of a temporary one
    #[arg(long)]
    keep: Option<PathBuf>,
    /// Replace demo files already in the --keep folder (kept otherwise)
    #[arg(long)]
    force: bool,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Merge(a) => cmd_merge(*a),
        Command::Inspect(a) => {
            signals::default_sigpipe();
            cmd_inspect(a)
        }
        Command::Synth(a) => cmd_synth(a),
        Command::Demo(a) => demo::run(a.keep, a.force),
        Command::Repair(a) => cmd_repair(a),
        Command::Recipe(a) => cmd_recipe(a),
        Command::Methods(a) => {
            signals::default_sigpipe();
            cmd_methods(a)
        }
        Command::Bench(a) => bench::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn parse_param(s: &str) -> Result<(String, ParamValue)> {
    let (k, v) = s
        .split_once('=')
        .with_context(|| format!("--param `{s}`: expected NAME=VALUE"))?;
    let value = match v {
        "true" => ParamValue::Bool(true),
        "false" => ParamValue::Bool(false),
        _ if v.contains(',') => ParamValue::List(
            v.split(',')
                .map(|x| x.trim().parse::<f64>())
                .collect::<Result<_, _>>()
                .with_context(|| format!("--param `{s}`: not a list of numbers"))?,
        ),
        _ => match v.parse::<f64>() {
            Ok(x) => ParamValue::Number(x),
            Err(_) => ParamValue::Text(v.to_string()),
        },
    };
    Ok((k.to_string(), value))
}

/// The help of `--seed`, from the library's list of random methods.
fn seed_help() -> String {
    format!(
        "Seed of the random masks ({}, and any `drop` = dare or della) [default: 0, or the recipe's]",
        amalgam::methods::SEEDED.join(", ")
    )
}

/// Builds the graph and settings the merge command describes, and notes on how the shorthand's
/// options were read.
fn merge_graph(a: &MergeArgs) -> Result<(Graph, RecipeSettings, Vec<String>)> {
    match &a.method {
        Some(method) => {
            let mut params = BTreeMap::new();
            if let Some(x) = a.alpha {
                params.insert("alpha".into(), ParamValue::Number(x));
            }
            if let Some(x) = a.lambda {
                params.insert("lambda".into(), ParamValue::Number(x));
            }
            if let Some(w) = &a.weights {
                params.insert("weights".into(), ParamValue::List(w.clone()));
            }
            for p in &a.params {
                let (k, v) = parse_param(p)?;
                params.insert(k, v);
            }
            if a.inputs.is_empty() {
                bail!("no models given: amalgam merge --method {method} A.safetensors B.safetensors ... -o OUT.safetensors");
            }
            use amalgam::input::{path_problem, PathProblem};
            let mut missing = Vec::new();
            let mut other = Vec::new();
            for p in a
                .inputs
                .iter()
                .chain(a.base.iter())
                .chain(a.fallback.iter())
            {
                match path_problem(p) {
                    None => {}
                    Some(PathProblem::Missing) => missing.push(p.display().to_string()),
                    Some(why) => other.push(format!("{} {why}", p.display())),
                }
            }
            if !missing.is_empty() {
                other.insert(0, format!("missing model files: {}", missing.join(", ")));
            }
            if !other.is_empty() {
                bail!("{}", other.join("; "));
            }
            let (graph, notes) = amalgam::graph::Shorthand {
                method: method.clone(),
                models: a.inputs.clone(),
                base: a.base.clone(),
                fallback: a.fallback.clone(),
                repair: a.repair,
                params,
            }
            .build()?;
            Ok((graph, RecipeSettings::default(), notes))
        }
        None => {
            let [recipe_path] = a.inputs.as_slice() else {
                bail!("give one recipe file, or --method METHOD with the models to merge (see `amalgam merge --help`)");
            };
            if a.alpha.is_some()
                || a.lambda.is_some()
                || a.weights.is_some()
                || !a.params.is_empty()
                || a.base.is_some()
                || a.fallback.is_some()
                || a.repair
            {
                bail!("--alpha, --lambda, --weights, --param, --base, --fallback and --repair go with --method; a recipe sets parameters per node and `fallback` / `repair` in its [output] table");
            }
            let r = recipe::load_any(recipe_path, &a.model_dirs, &a.renames)?;
            Ok((r.graph, r.settings, Vec::new()))
        }
    }
}

/// Merge options from the command line over the recipe's settings.
pub fn merge_options(
    output: &Path,
    engine: &EngineArgs,
    settings: &RecipeSettings,
    force: bool,
) -> MergeOptions {
    let mut opts = MergeOptions::new(output);
    let cli = RecipeSettings {
        dtype: engine.dtype,
        compute_dtype: engine.compute_dtype,
        seed: engine.seed,
        layout: engine.layout,
        non_finite: engine.non_finite,
    };
    cli.over(settings).apply(&mut opts);
    opts.memory_budget = engine.memory_budget;
    opts.threads = engine.threads;
    opts.overwrite = force;
    opts
}

/// Runs a merge with a progress bar; returns the report. SIGINT and SIGTERM stop it cleanly
/// (see [`signals`]).
pub fn run_merge(graph: &Graph, opts: MergeOptions, quiet: bool) -> Result<MergeReport> {
    let bar = progress::Bar::new(quiet);
    signals::watch(&opts.cancel);
    match amalgam::merge(graph, &opts, &bar) {
        Err(amalgam::Error::Cancelled) => {
            amalgam::Progress::finish(&bar);
            let (sig, code) = signals::received().unwrap_or(("cancelled", 130));
            let partial = amalgam::resume::partial_path(&opts.output);
            if opts.keep_partial {
                eprintln!(
                    "{sig}: merge stopped; kept the partial file {}: run the same command to resume",
                    partial.display()
                );
            } else {
                eprintln!(
                    "{sig}: merge stopped; removed its partial file, {} was not written",
                    opts.output.display()
                );
            }
            std::process::exit(code);
        }
        r => Ok(r?),
    }
}

fn cmd_merge(a: MergeArgs) -> Result<()> {
    let (graph, settings, notes) = merge_graph(&a)?;
    if !a.quiet {
        for n in &notes {
            eprintln!("note: {n}");
        }
    }
    let mut opts = merge_options(&a.output, &a.engine, &settings, a.force);
    opts.chunk_override = a.chunk;
    opts.report_json = a.report_json.clone();
    opts.resume = !a.no_resume;
    opts.keep_partial = a.keep_partial;
    let report = run_merge(&graph, opts, a.quiet)?;
    if !a.quiet {
        eprintln!("{report}");
        eprintln!("wrote {}", a.output.display());
    }
    Ok(())
}

fn parse_rename(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((old, new)) if !old.is_empty() && !new.is_empty() => {
            Ok((old.to_string(), new.to_string()))
        }
        _ => Err(format!("`{s}`: expected OLD=NEW")),
    }
}

fn cmd_recipe(a: RecipeArgs) -> Result<()> {
    let RecipeCommand::Convert {
        input,
        output,
        model_dirs,
        renames,
        force,
    } = a.command;
    // The output rules (folder, not the input, existing file kept) before anything is read.
    amalgam::dest::check_output(&output, &[input.as_path()], force)?;
    let r = recipe::load_any(&input, &model_dirs, &renames)?;
    let text = recipe::to_text_for(&output, &r)?.ok_or_else(|| {
        anyhow::anyhow!(
            "{} uses a method or option sd-mecha does not have; it cannot be written as .mecha",
            input.display()
        )
    })?;
    let mut inputs: Vec<&Path> = vec![input.as_path()];
    inputs.extend(r.graph.models.iter().map(|m| m.path.as_path()));
    amalgam::dest::write_atomic(&output, text.as_bytes(), &inputs, force)?;
    eprintln!("wrote {}", output.display());
    Ok(())
}

fn cmd_repair(a: RepairArgs) -> Result<()> {
    let dtype = match a.dtype {
        Some(d) => d,
        None => ModelFile::open(&a.model)?.main_dtype(),
    };
    let graph = Graph::repair(&a.model, &a.base);
    let mut opts = MergeOptions::new(&a.output);
    opts.output_dtype = dtype;
    opts.overwrite = a.force;
    opts.metadata.insert(
        "amalgam_repair".into(),
        format!("{} completed from {}", a.model.display(), a.base.display()),
    );
    let report = run_merge(&graph, opts, false)?;
    eprintln!("{report}");
    eprintln!("wrote {}", a.output.display());
    Ok(())
}

fn cmd_inspect(a: InspectArgs) -> Result<()> {
    let m = ModelFile::open(&a.file)?;
    let mut params = 0usize;
    let mut by_dtype: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for t in m.tensors().values() {
        params += t.numel();
        let e = by_dtype.entry(dtype_name(t.dtype)).or_default();
        e.0 += 1;
        e.1 += t.numel();
    }
    println!("file:       {}", a.file.display());
    println!(
        "size:       {} ({} bytes)",
        format_bytes(m.file_size()),
        m.file_size()
    );
    println!("tensors:    {}", m.tensors().len());
    println!("parameters: {params}");
    for (d, (n, p)) in &by_dtype {
        println!("  {d:<8} {n} tensors, {p} parameters");
    }
    let recipes: Vec<&str> = [
        ("amalgam_recipe", "amalgam (TOML)"),
        ("mecha_recipe", "sd-mecha (.mecha)"),
    ]
    .iter()
    .filter(|(k, _)| m.metadata().contains_key(*k))
    .map(|(_, what)| *what)
    .collect();
    if !recipes.is_empty() {
        println!(
            "recipe:     embedded as {} (--metadata prints it; `amalgam merge` runs it once saved to a file)",
            recipes.join(" and ")
        );
    }
    if !m.metadata().is_empty() {
        println!("metadata:");
        for (k, v) in m.metadata() {
            if a.metadata || v.len() <= 80 && !v.contains('\n') {
                println!("  {k}: {v}");
            } else {
                println!("  {k}: ({} bytes; --metadata shows it)", v.len());
            }
        }
    }
    let detection = amalgam::arch::detect(
        m.tensors()
            .iter()
            .map(|(k, t)| (k.as_str(), t.shape.as_slice(), t.numel())),
    );
    let names: Vec<&str> = m.tensors().keys().map(String::as_str).collect();
    if amalgam::formats::is_lora(&names) {
        let (layout, modules, unknown) = amalgam::formats::lora_modules(&names);
        match layout {
            Some(l) => println!(
                "architecture: a kohya LoRA for {l}: {} modules map to its keys{}",
                modules.len(),
                if unknown.is_empty() {
                    String::new()
                } else {
                    format!(", {} do not (e.g. {})", unknown.len(), unknown[0])
                }
            ),
            None => println!("architecture: a kohya LoRA whose modules name no SD1 or SDXL key"),
        }
    } else {
        print_detection(&detection, m.tensors().len());
    }
    if !a.no_hash {
        println!("AutoV2:     {}", amalgam::arch::autov2_hash(&a.file)?);
    }
    if a.keys {
        println!("keys:");
        for (k, t) in m.tensors() {
            println!("  {k}\t{}\t{:?}", dtype_name(t.dtype), t.shape);
        }
    }
    Ok(())
}

/// The architecture part of `inspect`.
fn print_detection(d: &amalgam::arch::Detection, keys: usize) {
    let Some(layout) = d.layout else {
        println!(
            "architecture: unknown (no known layout has most of its keys; it merges key by key)"
        );
        return;
    };
    println!(
        "architecture: {layout} ({:?}; {} of its {keys} keys are in the layout)",
        layout.arch(),
        d.matched
    );
    println!("components:");
    for c in &d.components {
        if c.required == 0 {
            // All-optional components (EMA, scheduler buffers): shown when present.
            if c.optional_present > 0 {
                println!(
                    "  {:<10} {:>5} optional keys {:>10} parameters",
                    c.name, c.optional_present, c.parameters
                );
            }
            continue;
        }
        let state = if c.is_absent() {
            "MISSING (pruned)".to_string()
        } else if c.missing.is_empty() {
            "complete".to_string()
        } else {
            format!("{} keys missing, e.g. {}", c.missing.len(), c.missing[0])
        };
        println!(
            "  {:<10} {:>5}/{:<5} keys {:>14} parameters  {state}",
            c.name, c.present, c.required, c.parameters
        );
    }
    if d.missing_optional > 0 {
        println!(
            "optional keys missing: {} (EMA, position ids, scheduler buffers and the like)",
            d.missing_optional
        );
    }
    if d.reshaped > 0 {
        println!("keys with other shapes than the layout's: {}", d.reshaped);
    }
    if !d.extra.is_empty() {
        println!(
            "keys not in the layout: {} (e.g. {})",
            d.extra.len(),
            d.extra[0]
        );
    }
}

fn cmd_synth(a: SynthArgs) -> Result<()> {
    let mut o = SynthOptions::new(a.layout, a.n);
    o.shrink = a.shrink.max(1);
    o.dtype = a.dtype;
    o.seed = a.seed;
    o.base = !a.no_base;
    o.components = a.components;
    o.prune_vae = a.prune_vae;
    o.int_keys = a.int_keys;
    o.overwrite = a.force;
    let t = std::time::Instant::now();
    let paths = amalgam::synth::synthesize(&a.output, &o)?;
    let bytes: u64 = paths
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    for p in &paths {
        println!("{}", p.display());
    }
    eprintln!(
        "wrote {} models, {} in {:.1} s",
        paths.len(),
        format_bytes(bytes),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn cmd_methods(a: MethodsArgs) -> Result<()> {
    let one = a.name.as_deref().map(amalgam::methods::info).transpose()?;
    for info in amalgam::methods::ALL {
        if one.is_some_and(|o| o.name != info.name) {
            continue;
        }
        println!("{}\n  {}", info.name, info.summary);
        // A preset is shown as its overrides, unless it is asked for by name.
        if let Some(p) = amalgam::methods::preset_of(info).filter(|_| one.is_none()) {
            let o: Vec<String> = p
                .overrides
                .iter()
                .map(|(k, v)| format!("{k} = {}", v.unwrap_or("(required)")))
                .collect();
            println!(
                "  `{}` with {} (`amalgam methods {}` shows it whole)\n",
                p.of.name,
                o.join(", "),
                info.name
            );
            continue;
        }
        println!("  {}", info.formula);
        let slots: Vec<String> = info
            .slots
            .iter()
            .map(|s| match s.kind {
                amalgam::method::SlotKind::One => format!("{} ({})", s.name, s.doc),
                amalgam::method::SlotKind::Many => format!("{} = [...] ({})", s.name, s.doc),
            })
            .collect();
        println!("  inputs: {}", slots.join("; "));
        for p in info.params {
            println!(
                "  {} = {}: {}",
                p.name,
                p.default.unwrap_or("(required)"),
                p.doc
            );
        }
        println!();
    }
    Ok(())
}
