//! sd-mecha's `.mecha` recipe format (version 0.1.0): [`parse`] reads the text, [`translate`]
//! makes an amalgam graph of it (checking each method's declared parameters and merge spaces:
//! [`check`]), [`to_mecha`] writes a graph back the way sd-mecha does. Each sd-mecha method
//! amalgam reads is declared once, in `table.rs` (in `dialect.rs`'s terms): its parameters with
//! sd-mecha's defaults, its merge spaces, and its translation (one node, `direct.rs`, or its
//! own, `special.rs` and `delta.rs`).
//!
//! A recipe is a version line, then one command per line; each command's result can be referred
//! to by later lines as `&N` (N counts the commands from 0, comments excluded), and the last
//! command is the recipe:
//!
//! ```text
//! version 0.1.0
//! model "base.safetensors" model_config=null merge_space="weight"
//! dict key=0.5
//! literal &1 model_config="singleton-mecha" merge_space=null
//! merge "weighted_sum" &0 &0 alpha=&2
//! ```
//!
//! The parser accepts what sd-mecha writes and more: blank lines, a trailing newline, comment
//! lines (`#`), `inf` and `nan`. Errors name the file, the line and the token.

pub mod check;
mod delta;
mod dialect;
mod direct;
mod models;
mod parse;
mod special;
mod table;
mod translate;
mod write;

pub use dialect::SUPPORTED;
pub use parse::{parse, Arg, Command, Kind, Recipe, Value, VERSION_LINE};
pub use translate::{translate, Translated};
pub use write::to_mecha;

use crate::error::{Error, Result};

fn err(origin: &str, line: usize, message: String) -> Error {
    Error::Recipe {
        origin: format!("{origin}:{line}"),
        message,
    }
}

/// Reads and translates a `.mecha` file.
pub fn load(path: &std::path::Path, model_dirs: &[std::path::PathBuf]) -> Result<Translated> {
    load_with(path, model_dirs, &[])
}

/// [`load`], with model paths or file names renamed first (`(old, new)` pairs).
pub fn load_with(
    path: &std::path::Path,
    model_dirs: &[std::path::PathBuf],
    renames: &[(String, String)],
) -> Result<Translated> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let origin = path.display().to_string();
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    load_text(&text, &origin, dir, model_dirs, renames)
}

/// Parses and translates `.mecha` text; `origin` names it in errors, `dir` anchors relative
/// model paths.
pub fn load_text(
    text: &str,
    origin: &str,
    dir: &std::path::Path,
    model_dirs: &[std::path::PathBuf],
    renames: &[(String, String)],
) -> Result<Translated> {
    let recipe = parse(text, origin)?;
    let t = translate(&recipe, origin, dir, model_dirs, renames)?;
    let paths: Vec<std::path::PathBuf> = t.graph.models.iter().map(|m| m.path.clone()).collect();
    check::check_model_configs(&t.model_configs, &paths, origin)?;
    Ok(t)
}
