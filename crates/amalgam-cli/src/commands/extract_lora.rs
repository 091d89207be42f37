//! `amalgam extract-lora`: a fine-tune's difference from its base as a kohya LoRA.

use crate::*;
use amalgam::lora::extract::{extract_lora, ExtractOptions, RankRule};

#[derive(Args)]
pub(crate) struct ExtractLoraArgs {
    /// The fine-tuned model (SD1 ldm or SDXL sgm layout)
    tuned: PathBuf,
    /// Its base model
    #[arg(long)]
    base: PathBuf,
    /// The largest rank of a module (alpha = rank, so the scale is 1)
    #[arg(long)]
    rank: usize,
    /// Rank of each module: round(F * min(out, in)), at most --rank
    #[arg(long, conflicts_with = "energy")]
    ratio: Option<f64>,
    /// Rank of each module: the smallest keeping this fraction of its delta's energy (sum of
    /// squared singular values), at most --rank
    #[arg(long)]
    energy: Option<f64>,
    /// The LoRA file written
    #[arg(long, short)]
    output: PathBuf,
    /// Dtype of the factors: f16, bf16, f32 or f64
    #[arg(long, default_value = "f16")]
    dtype: OutputDtype,
    /// Worker threads (0 = one per core); the bytes written do not depend on it
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Replace the output file if it exists
    #[arg(long)]
    force: bool,
}

pub(crate) fn cmd_extract_lora(a: ExtractLoraArgs) -> Result<()> {
    let rule = match (a.ratio, a.energy) {
        (Some(f), _) if f > 0.0 && f <= 1.0 => RankRule::Ratio(f),
        (_, Some(f)) if f > 0.0 && f <= 1.0 => RankRule::Energy(f),
        (None, None) => RankRule::Fixed,
        _ => bail!("--ratio and --energy take a fraction in (0, 1]"),
    };
    let bar = crate::progress::Bar::new(false);
    let opts = ExtractOptions {
        rule,
        dtype: a.dtype,
        threads: a.threads,
        overwrite: a.force,
        ..ExtractOptions::new(a.tuned, a.base, a.output, a.rank)
    };
    crate::signals::watch(&opts.cancel);
    match extract_lora(&opts, &bar) {
        Err(amalgam::Error::Cancelled) => {
            amalgam::Progress::finish(&bar);
            let (sig, code) = crate::signals::received().unwrap_or(("cancelled", 130));
            eprintln!(
                "{sig}: extraction stopped; {} was not written",
                opts.output.display()
            );
            std::process::exit(code);
        }
        r => eprintln!("{}", r?),
    }
    Ok(())
}
