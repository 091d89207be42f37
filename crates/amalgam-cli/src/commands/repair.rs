//! `amalgam repair`: a pruned model completed from a base model.

use crate::*;

#[derive(Args)]
pub(crate) struct RepairArgs {
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

pub(crate) fn cmd_repair(a: RepairArgs) -> Result<()> {
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
