//! `amalgam`: the command line over the amalgam library.

mod bench;
mod commands;
mod demo;
mod progress;
mod signals;

use amalgam::io::dtype::{dtype_name, OutputDtype};
use amalgam::io::input::ModelFile;
use amalgam::method::ParamValue;
use amalgam::real::ComputeDtype;
use amalgam::recipe::graph::Graph;
use amalgam::recipe::sweep::{Combine, Sweep, SweepAxis};
use amalgam::recipe::{self, RecipeSettings};
use amalgam::size::{format_bytes, parse_bytes};
use amalgam::synth::{Layout, SynthOptions};
use amalgam::{MergeOptions, MergeReport};
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use commands::compare::*;
use commands::extract_lora::*;
use commands::inspect::*;
use commands::knots::*;
use commands::merge::*;
pub(crate) use commands::merge::{merge_options, run_merge};
use commands::methods::*;
use commands::rebasin::*;
use commands::recipe::*;
use commands::repair::*;
use commands::synth::*;

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
    /// Show a safetensors file's dtypes, metadata, architecture, hashes (AutoV2, AutoV3, legacy)
    /// and a report (EMA and junk keys, CLIP position_ids, precision, modelspec).
    Inspect(InspectArgs),
    /// Write synthetic models with a real key layout (SD1, SDXL, SD3, FLUX, kohya, diffusers).
    Synth(SynthArgs),
    /// Synthesise a small model pool in a temporary folder and merge it (no files needed).
    Demo(DemoArgs),
    /// Complete a pruned model (e.g. one without its VAE) from a base model of its architecture.
    Repair(RepairArgs),
    /// Extract a fine-tune's difference from its base as a kohya LoRA (LoCon for convolutions).
    ExtractLora(ExtractLoraArgs),
    /// Merge LoRAs in their shared singular basis (KnOTS), written as one LoRA.
    Knots(KnotsArgs),
    /// Permute a model's hidden units towards a reference (Git Re-Basin weight matching).
    Rebasin(RebasinArgs),
    /// Measure how far apart models are (per key, block, component), with charts and a report.
    Compare(CompareArgs),
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
    layout: Option<amalgam::layout::arch::Layout>,
    /// A model whose tensor for a key holds NaN or Inf: omit (leave it out of that key, like a
    /// missing key, and report it), error (stop, naming file, key and count) or keep (merge the
    /// values as they are) [default: omit, or the recipe's]
    #[arg(long)]
    non_finite: Option<amalgam::io::non_finite::NonFinite>,
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
        Command::ExtractLora(a) => cmd_extract_lora(a),
        Command::Knots(a) => cmd_knots(a),
        Command::Rebasin(a) => cmd_rebasin(a),
        Command::Compare(a) => cmd_compare(a),
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
