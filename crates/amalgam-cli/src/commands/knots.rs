//! `amalgam knots`: LoRAs merged in their shared singular basis, written as one LoRA.

use crate::*;
use amalgam::lora::knots::{knots, KnotsOptions, Variant};

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum VariantArg {
    /// KnOTS-TIES: top-k 0.2, mass election, disjoint mean, lambda 0.6
    Ties,
    /// KnOTS-DARE-TIES: DARE p 0.1 with rescale, election, disjoint mean, lambda 0.7
    DareTies,
}

#[derive(Args)]
pub(crate) struct KnotsArgs {
    /// The LoRA files (kohya names, SD1 or SDXL)
    #[arg(required = true)]
    loras: Vec<PathBuf>,
    /// The merged LoRA written (bake it with `merge --method add MODEL LORA`)
    #[arg(long, short)]
    output: PathBuf,
    /// The merge in the shared basis
    #[arg(long, value_enum, default_value = "ties")]
    variant: VariantArg,
    /// Fraction of each LoRA's values kept by magnitude, over all its modules [default: the
    /// variant's]
    #[arg(long)]
    k: Option<f64>,
    /// DARE's drop probability [default: the variant's]
    #[arg(long)]
    p: Option<f64>,
    /// Scaling coefficient [default: the variant's]
    #[arg(long)]
    lambda: Option<f64>,
    /// Seed of DARE's masks
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Dtype of the factors: f16, bf16, f32 or f64
    #[arg(long, default_value = "f16")]
    dtype: OutputDtype,
    /// Replace the output file if it exists
    #[arg(long)]
    force: bool,
}

pub(crate) fn cmd_knots(a: KnotsArgs) -> Result<()> {
    let variant = match a.variant {
        VariantArg::Ties => Variant::Ties,
        VariantArg::DareTies => Variant::DareTies,
    };
    let mut o = KnotsOptions::new(a.loras, a.output, variant);
    if let Some(k) = a.k {
        if !(k > 0.0 && k <= 1.0) {
            bail!("--k is a fraction in (0, 1]");
        }
        o.k = k;
    }
    if let Some(p) = a.p {
        if !(0.0..1.0).contains(&p) {
            bail!("--p is a probability in [0, 1)");
        }
        o.p = p;
    }
    if let Some(l) = a.lambda {
        if !l.is_finite() {
            bail!("--lambda must be a finite number");
        }
        o.lambda = l;
    }
    o.seed = a.seed;
    o.dtype = a.dtype;
    o.overwrite = a.force;
    eprintln!("{}", knots(&o)?);
    Ok(())
}
