//! `amalgam recipe convert`: between the TOML format and sd-mecha's `.mecha`.

use crate::*;

#[derive(Args)]
pub(crate) struct RecipeArgs {
    #[command(subcommand)]
    command: RecipeCommand,
}

#[derive(Subcommand)]
pub(crate) enum RecipeCommand {
    /// Convert a recipe between the native TOML format and sd-mecha's .mecha (by extension).
    Convert {
        /// The recipe to read (.toml or .mecha)
        input: PathBuf,
        /// The recipe to write (.mecha or .toml)
        output: PathBuf,
        #[command(flatten)]
        mecha: MechaModels,
        /// Replace the output file if it exists
        #[arg(long)]
        force: bool,
    },
}

pub(crate) fn cmd_recipe(a: RecipeArgs) -> Result<()> {
    let RecipeCommand::Convert {
        input,
        output,
        mecha,
        force,
    } = a.command;
    // The output rules (folder, not the input, existing file kept) before anything is read.
    amalgam::io::dest::check_output(&output, &[input.as_path()], force)?;
    let r = recipe::load_any(&input, &mecha.model_dirs, &mecha.renames)?;
    let text = recipe::to_text_for(&output, &r)?.ok_or_else(|| {
        anyhow::anyhow!(
            "{} uses a method or option sd-mecha does not have; it cannot be written as .mecha",
            input.display()
        )
    })?;
    let mut inputs: Vec<&Path> = vec![input.as_path()];
    inputs.extend(r.graph.models.iter().map(|m| m.path.as_path()));
    amalgam::io::dest::write_atomic(&output, text.as_bytes(), &inputs, force)?;
    eprintln!("wrote {}", output.display());
    Ok(())
}
