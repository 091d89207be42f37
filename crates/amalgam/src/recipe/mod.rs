//! What to merge: the merge [`graph`] (models, method nodes, one output), read from the native
//! recipe format here or from sd-mecha's `.mecha` format ([`mecha`]).
//!
//! The native recipe format (TOML): named models (files, lists or globs), named method nodes, one
//! output. See `docs/recipes.md` for the format.
//!
//! Every error names the recipe file, the line and the model or node concerned, and is raised
//! before any tensor is read (paths are checked for existence, all at once).

pub mod graph;
pub mod mecha;
mod parse;
pub mod sweep;
mod values;
mod write;

pub use parse::parse;
pub use write::to_toml;

use crate::error::{Error, Result};
use crate::io::dtype::OutputDtype;
use crate::method::{ParamValue, Params, SlotKind};
use crate::methods;
use crate::real::ComputeDtype;
use crate::recipe::graph::{Graph, ModelInput, Node, Ref};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// Settings a recipe may carry in its `[output]` table (the command line overrides them).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RecipeSettings {
    /// The dtype of the merged tensors.
    pub dtype: Option<OutputDtype>,
    /// The accumulation precision.
    pub compute_dtype: Option<ComputeDtype>,
    /// The seed of the random masks.
    pub seed: Option<u64>,
    /// The key layout to write (`sdxl-kohya`, ...), when not the original one.
    pub layout: Option<crate::layout::arch::Layout>,
    /// What to do with inputs holding NaN or Inf (see [`crate::io::non_finite`]).
    pub non_finite: Option<crate::io::non_finite::NonFinite>,
}

impl RecipeSettings {
    /// `self` where it sets a value, else `under` (e.g. the command line over a recipe).
    pub fn over(&self, under: &RecipeSettings) -> RecipeSettings {
        RecipeSettings {
            dtype: self.dtype.or(under.dtype),
            compute_dtype: self.compute_dtype.or(under.compute_dtype),
            seed: self.seed.or(under.seed),
            layout: self.layout.or(under.layout),
            non_finite: self.non_finite.or(under.non_finite),
        }
    }

    /// Sets the options these settings give; the others keep their values (the defaults of
    /// [`MergeOptions::new`](crate::options::MergeOptions::new)).
    pub fn apply(&self, opts: &mut crate::options::MergeOptions) {
        if let Some(d) = self.dtype {
            opts.output_dtype = d;
        }
        if let Some(d) = self.compute_dtype {
            opts.compute_dtype = d;
        }
        if let Some(seed) = self.seed {
            opts.seed = seed;
        }
        if self.layout.is_some() {
            opts.output_layout = self.layout;
        }
        if let Some(p) = self.non_finite {
            opts.non_finite = p;
        }
    }

    /// The settings a merge ran with, as its embedded recipe records them.
    pub fn of(opts: &crate::options::MergeOptions) -> Self {
        RecipeSettings {
            dtype: Some(opts.output_dtype),
            compute_dtype: Some(opts.compute_dtype),
            seed: Some(opts.seed),
            layout: opts.output_layout,
            non_finite: Some(opts.non_finite),
        }
    }
}

/// A parsed recipe.
#[derive(Clone, Debug)]
pub struct Recipe {
    /// What to merge.
    pub graph: Graph,
    /// The settings of its `[output]` table.
    pub settings: RecipeSettings,
    /// Its `[sweep]` table: several outputs, one per combination of parameter values.
    pub sweep: Option<sweep::Sweep>,
}

/// Reads and parses a recipe file; relative model paths are relative to its folder.
pub fn load(path: &Path) -> Result<Recipe> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    parse(&text, &path.display().to_string(), dir)
}

/// Whether `path` names an sd-mecha recipe (`.mecha`) rather than a TOML one.
pub fn is_mecha(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "mecha")
}

/// A translated `.mecha` recipe as a recipe: it sets the seed only.
fn of_mecha(t: crate::recipe::mecha::Translated) -> Recipe {
    Recipe {
        graph: t.graph,
        settings: RecipeSettings {
            seed: t.seed,
            ..Default::default()
        },
        sweep: None,
    }
}

/// Parses recipe text of either format: `.mecha` when its first line that is not blank or a
/// comment starts with `version` (as sd-mecha writes it), TOML otherwise. `origin` names it in
/// errors, `dir` anchors relative paths; a `.mecha` recipe's models are also looked for in
/// `model_dirs`.
pub fn load_text(
    text: &str,
    origin: &str,
    dir: &Path,
    model_dirs: &[std::path::PathBuf],
) -> Result<Recipe> {
    let first = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'));
    if first.is_some_and(|l| l.starts_with("version")) {
        return crate::recipe::mecha::load_text(text, origin, dir, model_dirs, &[]).map(of_mecha);
    }
    parse(text, origin, dir)
}

/// Loads a recipe of either format, by its extension: a `.mecha` file's models are looked for
/// in `model_dirs` and renamed by `renames` first (see [`crate::recipe::mecha::load_with`]); it sets the
/// seed only.
pub fn load_any(
    path: &Path,
    model_dirs: &[std::path::PathBuf],
    renames: &[(String, String)],
) -> Result<Recipe> {
    if is_mecha(path) {
        return crate::recipe::mecha::load_with(path, model_dirs, renames).map(of_mecha);
    }
    load(path)
}

/// `recipe` as the text of a recipe file of the format `path`'s extension names; `None` when it
/// is a `.mecha` file and the recipe uses something sd-mecha lacks. The `.mecha` form records
/// each model's layout, detected from its header.
pub fn to_text_for(path: &Path, recipe: &Recipe) -> Result<Option<String>> {
    if !is_mecha(path) {
        return Ok(Some(to_toml(&recipe.graph, &recipe.settings)));
    }
    let layouts: Vec<Option<crate::layout::arch::Layout>> = recipe
        .graph
        .models
        .iter()
        .map(|m| Ok(crate::io::input::ModelFile::open(&m.path)?.detected_layout()))
        .collect::<Result<_>>()?;
    let arch = layouts.iter().flatten().next().map(|l| l.arch());
    Ok(crate::recipe::mecha::to_mecha(
        &recipe.graph,
        &layouts,
        arch,
        recipe.settings.seed.unwrap_or(0),
    ))
}
