//! `amalgam merge`: a recipe or the shorthand, merged with a progress bar and a summary.

use crate::*;

#[derive(Args)]
pub(crate) struct MergeArgs {
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
    #[command(flatten)]
    mecha: MechaModels,
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
    /// Sweep a parameter: NAME=V1,V2,... (or NODE.NAME=V1,... for one node of a recipe);
    /// repeatable. Writes one output per combination from one read of the inputs; -o is then a
    /// template where {NAME} becomes the point's value and {i} its number
    #[arg(long = "sweep", value_name = "NAME=V1,V2,...")]
    sweeps: Vec<String>,
    /// Pair the --sweep lists value by value instead of taking every combination
    #[arg(long)]
    sweep_zip: bool,
    /// After a sweep, measure each output's distance to the base (--base, or the recipe's model
    /// named `base`) and to the other outputs, in the sweep table
    #[arg(long)]
    compare: bool,
    /// Where to write the sweep table (JSON) [default: sweep.json beside the first output]
    #[arg(long)]
    sweep_table: Option<PathBuf>,
    /// Chunk length in elements instead of the one derived from the budget (for testing)
    #[arg(long, hide = true)]
    chunk: Option<usize>,
    #[command(flatten)]
    engine: EngineArgs,
}

pub(crate) fn parse_param(s: &str) -> Result<(String, ParamValue)> {
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
pub(crate) fn seed_help() -> String {
    format!(
        "Seed of the random masks ({}, and any `drop` = dare or della) [default: 0, or the recipe's]",
        amalgam::methods::SEEDED.join(", ")
    )
}

/// A merge's graph, its settings, notes on the shorthand and the recipe's sweep.
pub(crate) type MergeGraph = (Graph, RecipeSettings, Vec<String>, Option<Sweep>);

/// The sweep to run: the command line's axes over the recipe's (same parameter: the command
/// line's values), or none.
fn sweep_of(a: &MergeArgs, recipe: Option<Sweep>) -> Result<Option<Sweep>> {
    let mut sweep = recipe.unwrap_or_default();
    for spec in &a.sweeps {
        let axis = SweepAxis::parse(spec)?;
        sweep.axes.retain(|x| x.target != axis.target);
        sweep.axes.push(axis);
    }
    if a.sweep_zip {
        sweep.combine = Combine::Zip;
    }
    if sweep.axes.is_empty() {
        if a.sweep_zip || a.sweep_table.is_some() {
            bail!("--sweep-zip and --sweep-table go with --sweep");
        }
        return Ok(None);
    }
    Ok(Some(sweep))
}

/// Runs a sweep with a progress bar, prints and writes its table.
fn run_sweep(a: &MergeArgs, graph: &Graph, sweep: &Sweep, opts: MergeOptions) -> Result<()> {
    let template = a.output.to_string_lossy().into_owned();
    let first = sweep.points(graph, &template)?[0].output.clone();
    let table_path = a
        .sweep_table
        .clone()
        .unwrap_or_else(|| amalgam::io::dest::folder_of(&first).join("sweep.json"));
    let inputs: Vec<&Path> = graph.models.iter().map(|m| m.path.as_path()).collect();
    amalgam::io::dest::check_output(&table_path, &inputs, a.force)?;
    let base = a.base.clone().or_else(|| {
        graph
            .models
            .iter()
            .find(|m| m.name == "base")
            .map(|m| m.path.clone())
    });
    let compare = a.compare.then_some(base.as_deref());
    let bar = progress::Bar::new(a.quiet);
    signals::watch(&opts.cancel);
    let (table, _) = match amalgam::sweep::run_sweep(graph, sweep, &template, &opts, compare, &bar)
    {
        Err(amalgam::Error::Cancelled) => {
            amalgam::Progress::finish(&bar);
            let (sig, code) = signals::received().unwrap_or(("cancelled", 130));
            eprintln!(
                "{sig}: sweep stopped; its partial files were removed, no output was written"
            );
            std::process::exit(code);
        }
        r => r?,
    };
    print!("{}", table.to_text());
    let json = serde_json::to_string_pretty(&table)?;
    amalgam::io::dest::write_atomic(&table_path, json.as_bytes(), &inputs, a.force)?;
    if !a.quiet {
        eprintln!("wrote the sweep table {}", table_path.display());
    }
    Ok(())
}

/// Builds the graph and settings the merge command describes, and notes on how the shorthand's
/// options were read.
pub(crate) fn merge_graph(a: &MergeArgs) -> Result<MergeGraph> {
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
            use amalgam::io::input::{path_problem, PathProblem};
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
            let (graph, notes) = amalgam::recipe::graph::Shorthand {
                method: method.clone(),
                models: a.inputs.clone(),
                base: a.base.clone(),
                fallback: a.fallback.clone(),
                repair: a.repair,
                params,
            }
            .build()?;
            Ok((graph, RecipeSettings::default(), notes, None))
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
            let r = recipe::load_any(recipe_path, &a.mecha.model_dirs, &a.mecha.renames)?;
            Ok((r.graph, r.settings, Vec::new(), r.sweep))
        }
    }
}

/// Merge options from the command line over the recipe's settings.
pub(crate) fn merge_options(
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
pub(crate) fn run_merge(graph: &Graph, opts: MergeOptions, quiet: bool) -> Result<MergeReport> {
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

pub(crate) fn cmd_merge(a: MergeArgs) -> Result<()> {
    let (graph, settings, notes, recipe_sweep) = merge_graph(&a)?;
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
    if let Some(sweep) = sweep_of(&a, recipe_sweep)? {
        return run_sweep(&a, &graph, &sweep, opts);
    }
    if a.compare {
        bail!("--compare goes with --sweep (or a recipe's [sweep] table); `amalgam compare` compares any models");
    }
    let report = run_merge(&graph, opts, a.quiet)?;
    if !a.quiet {
        eprintln!("{report}");
        if report.lora.is_none() {
            eprintln!("wrote {}", a.output.display());
        }
    }
    Ok(())
}

/// Where the models of a `.mecha` recipe are looked for (`merge` and `recipe convert`).
#[derive(Args)]
pub(crate) struct MechaModels {
    /// Folders where the models of a `.mecha` recipe are looked for (by relative path, or by
    /// file name for absolute paths written on another machine); repeatable
    #[arg(long = "model-dir")]
    pub(crate) model_dirs: Vec<PathBuf>,
    /// Rename a model of a `.mecha` recipe (a whole path or a file name) before looking for it,
    /// as OLD=NEW; repeatable
    #[arg(long = "rename", value_parser = parse_rename)]
    pub(crate) renames: Vec<(String, String)>,
}

pub(crate) fn parse_rename(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((old, new)) if !old.is_empty() && !new.is_empty() => {
            Ok((old.to_string(), new.to_string()))
        }
        _ => Err(format!("`{s}`: expected OLD=NEW")),
    }
}
