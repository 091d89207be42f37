//! `amalgam compare`: how far apart a pool of models is, per key, block and component, with
//! charts and an HTML report.

use crate::*;
use amalgam::analysis::{self, CompareOptions, OutlierRule};

#[derive(Args)]
pub(crate) struct CompareArgs {
    /// The models (safetensors files)
    #[arg(required = true)]
    models: Vec<PathBuf>,
    /// The base their task vectors are taken from (distances and cosines to the base)
    #[arg(long)]
    base: Option<PathBuf>,
    /// Folder for compare.json, the CSV tables, the charts and report.html (made if missing;
    /// it must be empty unless --overwrite)
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Replace the report's files in an output folder that holds files
    #[arg(long)]
    overwrite: bool,
    /// Flag models whose distance is above median + K x 1.4826 x MAD of the pool's
    #[arg(long, default_value_t = 3.0)]
    outlier_k: f64,
    /// Worker threads (0 = one per core)
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// No progress bar
    #[arg(long, short)]
    quiet: bool,
}

pub(crate) fn cmd_compare(a: CompareArgs) -> Result<()> {
    if !(a.outlier_k.is_finite() && a.outlier_k >= 0.0) {
        bail!("--outlier-k must be a number >= 0 (got {})", a.outlier_k);
    }
    let opts = CompareOptions {
        threads: a.threads,
        outliers: OutlierRule { k: a.outlier_k },
        ..CompareOptions::default()
    };
    signals::watch(&opts.cancel);
    let bar = progress::Bar::new(a.quiet);
    let c = match analysis::compare(&a.models, a.base.as_deref(), &opts, &bar) {
        Err(amalgam::Error::Cancelled) => {
            amalgam::Progress::finish(&bar);
            let (sig, code) = signals::received().unwrap_or(("cancelled", 130));
            eprintln!("{sig}: compare stopped; nothing was written");
            std::process::exit(code);
        }
        r => r?,
    };
    print!("{}", analysis::summary_table(&c));
    if !a.quiet {
        eprintln!(
            "read {} of {} in {:.1} s; {} keys compared, {} left out",
            format_bytes(c.bytes_read),
            format_bytes(c.input_bytes),
            c.seconds,
            c.keys.len(),
            c.skipped.len()
        );
        for n in &c.notes {
            eprintln!("note: {n}");
        }
    }
    if let Some(dir) = &a.output {
        let files = analysis::write_report(&c, dir, a.overwrite)?;
        if !a.quiet {
            eprintln!("wrote {} files to {}", files.len(), dir.display());
        }
    }
    Ok(())
}
