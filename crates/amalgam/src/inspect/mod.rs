//! Inspecting one safetensors file: what `amalgam inspect` prints (and `--json` writes), for the
//! command line and other front ends alike. [`inspect`] reads the header, the few small tensors
//! the checks need (CLIP `position_ids`) and, when asked, the whole file once for its hashes.
//!
//! - [`hashes`]: SHA-256, AutoV2, AutoV3 and the legacy webui hash, with their definitions;
//! - [`report`]: the toolkit-style report (EMA and junk keys, `position_ids`, precision,
//!   `modelspec.*`).

pub mod hashes;
pub mod report;

pub use hashes::{hash_file, Hashes};
pub use report::{KeyGroup, PositionIds, Precision, Report, WrongPosition};

use crate::error::Result;
use crate::io::dtype::dtype_name;
use crate::io::input::ModelFile;
use crate::layout::arch::Detection;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What to compute besides the header facts.
#[derive(Clone, Copy, Debug)]
pub struct InspectOptions {
    /// Compute the [`Hashes`] (reads the whole file once).
    pub hashes: bool,
}

impl Default for InspectOptions {
    fn default() -> Self {
        InspectOptions { hashes: true }
    }
}

/// Tensors and parameters of one dtype.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DtypeCount {
    /// Tensors stored in the dtype.
    pub tensors: usize,
    /// Their elements.
    pub parameters: usize,
    /// Their bytes.
    pub bytes: u64,
}

/// What a kohya LoRA file's modules map to.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LoraSummary {
    /// The layout (ldm/sgm naming) whose keys its modules change, if any.
    pub layout: Option<String>,
    /// Modules that map to a key of that layout.
    pub modules: usize,
    /// Modules that map to none.
    pub unknown: Vec<String>,
}

/// Everything `inspect` says about a file.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Inspection {
    /// The file inspected.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// Bytes before the tensor data: the 8-byte header length and the JSON header.
    pub header_bytes: u64,
    /// How many tensors it holds.
    pub tensors: usize,
    /// Their elements, all dtypes together.
    pub parameters: usize,
    /// Tensors, parameters and bytes per stored dtype (safetensors spelling: `F16`, `I64`, ...).
    pub dtypes: BTreeMap<String, DtypeCount>,
    /// The header's `__metadata__` map.
    pub metadata: BTreeMap<String, String>,
    /// The recipes embedded in the metadata: `amalgam (TOML)` (key `amalgam_recipe`) and
    /// `sd-mecha (.mecha)` (key `mecha_recipe`).
    pub recipes: Vec<String>,
    /// The architecture detected from the keys and shapes (see
    /// [`detect`](crate::layout::arch::detect)).
    pub detection: Detection,
    /// Set when the file is a kohya LoRA (its keys are then not a checkpoint layout's).
    pub lora: Option<LoraSummary>,
    /// The file's hashes; `None` when not asked for.
    pub hashes: Option<Hashes>,
    /// The toolkit-style report.
    pub report: Report,
}

/// Inspects the safetensors file at `path`.
pub fn inspect(path: impl AsRef<Path>, opts: InspectOptions) -> Result<Inspection> {
    let path = path.as_ref();
    let m = ModelFile::open(path)?;
    let mut parameters = 0usize;
    let mut dtypes: BTreeMap<String, DtypeCount> = BTreeMap::new();
    for t in m.tensors().values() {
        parameters += t.numel();
        let e = dtypes.entry(dtype_name(t.dtype)).or_default();
        e.tensors += 1;
        e.parameters += t.numel();
        e.bytes += t.len;
    }
    let data_bytes: u64 = m.tensors().values().map(|t| t.len).sum();
    let recipes = [
        ("amalgam_recipe", "amalgam (TOML)"),
        ("mecha_recipe", "sd-mecha (.mecha)"),
    ]
    .iter()
    .filter(|(k, _)| m.metadata().contains_key(*k))
    .map(|(_, what)| what.to_string())
    .collect();
    let detection = crate::layout::arch::detect(
        m.tensors()
            .iter()
            .map(|(k, t)| (k.as_str(), t.shape.as_slice(), t.numel())),
    );
    let names: Vec<&str> = m.tensors().keys().map(String::as_str).collect();
    let lora = crate::layout::lora::is_lora(&names).then(|| {
        let (layout, modules, unknown) = crate::layout::lora::lora_modules(&names);
        LoraSummary {
            layout: layout.map(|l| l.name().to_string()),
            modules: modules.len(),
            unknown,
        }
    });
    let report = report::report(&m, &detection)?;
    let hashes = if opts.hashes {
        Some(hash_file(path)?)
    } else {
        None
    };
    Ok(Inspection {
        path: path.to_path_buf(),
        size: m.file_size(),
        header_bytes: m.file_size() - data_bytes,
        tensors: m.tensors().len(),
        parameters,
        dtypes,
        metadata: m.metadata().clone(),
        recipes,
        detection,
        lora,
        hashes,
        report,
    })
}
