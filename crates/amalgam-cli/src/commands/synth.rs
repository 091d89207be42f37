//! `amalgam synth`: synthetic models with a real key layout.

use crate::*;

#[derive(Args)]
pub(crate) struct SynthArgs {
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

pub(crate) fn cmd_synth(a: SynthArgs) -> Result<()> {
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
