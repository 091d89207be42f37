//! `amalgam rebasin`: a model's hidden units permuted towards a reference (Git Re-Basin weight
//! matching): the same function, weights aligned with the reference's.

use crate::*;

#[derive(Args)]
pub(crate) struct RebasinArgs {
    /// The model permuted (SD1 ldm or SDXL sgm)
    model: PathBuf,
    /// The model it is matched to
    #[arg(long = "ref")]
    reference: PathBuf,
    /// Output file
    #[arg(long, short)]
    output: PathBuf,
    /// Replace the output file if it exists
    #[arg(long)]
    force: bool,
    /// No progress bar and no summary
    #[arg(long, short)]
    quiet: bool,
    #[command(flatten)]
    engine: EngineArgs,
}

pub(crate) fn cmd_rebasin(a: RebasinArgs) -> Result<()> {
    let graph = Graph::single(
        "rebasin",
        None,
        vec![a.model.clone(), a.reference.clone()],
        BTreeMap::new(),
    )?;
    let mut opts = merge_options(&a.output, &a.engine, &RecipeSettings::default(), a.force);
    // A permutation keeps the values: the model's own dtype unless --dtype says otherwise.
    if a.engine.dtype.is_none() {
        opts.output_dtype = ModelFile::open(&a.model)?.main_dtype();
    }
    let report = run_merge(&graph, opts, a.quiet)?;
    if !a.quiet {
        eprintln!("{report}");
        eprintln!("wrote {}", a.output.display());
    }
    Ok(())
}
