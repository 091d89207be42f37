//! amalgam: streaming N-way merging of safetensors checkpoints in bounded memory.
//!
//! The crate is the engine; the `amalgam` binary is a thin command line over it.
//!
//! - [`io`]: lazy safetensors reading, incremental writing, the rules for every file written,
//!   dtypes and non-finite values; [`resume`]: cancelling, and resuming killed merges.
//! - [`engine`]: planning (key policy, shapes) and chunked, parallel, deterministic execution.
//! - [`method`]: the trait methods implement, their declared parameters and statistic passes;
//!   [`methods`]: the methods by family, one file each.
//! - [`recipe`]: what to merge (the graph), from a TOML recipe, sd-mecha's `.mecha` format or the
//!   command line.
//! - [`layout`]: the known key layouts (SD1, SDXL, SD3, FLUX in their tools' namings), detection,
//!   components, block ids, and the kohya and diffusers key names.
//! - [`inspect`]: what `amalgam inspect` reports about a file: header facts, architecture, the
//!   AutoV2/AutoV3/legacy hashes, and a toolkit-style report (EMA and junk keys, CLIP
//!   `position_ids`, precision, `modelspec.*`).
//! - [`synth`]: synthetic checkpoints with real SD key layouts, for demos, tests and benchmarks.
//! - [`options`], [`report`]: what a merge is asked and what it reports; [`real`], `rng`,
//!   [`size`]: the compute types, the counter-based random streams, byte sizes.

#![warn(missing_docs)]

pub mod analysis;
pub mod engine;
pub mod error;
pub mod inspect;
pub mod io;
pub mod layout;
pub mod lora;
pub mod method;
pub mod methods;
pub mod options;
pub mod real;
pub mod rebasin;
pub mod recipe;
pub mod report;
pub mod resume;
pub(crate) mod rng;
pub mod size;
pub mod sweep;
pub mod synth;

pub use engine::{merge, merge_outputs, MergeOptions, NoProgress, OutputPoint, Progress};
pub use error::{Error, Result};
pub use recipe::graph::Graph;
pub use report::MergeReport;
pub use resume::Cancel;

/// The amalgam version written into every output's metadata.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
