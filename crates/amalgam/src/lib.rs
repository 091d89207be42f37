//! amalgam: streaming N-way merging of safetensors checkpoints in bounded memory.
//!
//! The crate is the engine; the `amalgam` binary is a thin command line over it.
//!
//! - [`input`] and [`output`]: lazy safetensors reading, incremental writing; [`dest`]: the rules
//!   for every file written; [`resume`]: cancelling, and resuming killed merges.
//! - [`engine`]: planning (key policy, shapes) and chunked, parallel, deterministic execution.
//! - [`method`]: the trait methods implement; [`methods`]: the methods, one file each.
//! - [`graph`] and [`recipe`]: what to merge, from a recipe file or the command line; [`mecha`]:
//!   sd-mecha's `.mecha` recipe format.
//! - [`arch`]: the known key layouts (SD1, SDXL, SD3, FLUX in their tools' namings), detection,
//!   components and block ids.
//! - [`formats`]: reading kohya and diffusers key names as the ldm/sgm layout.
//! - [`synth`]: synthetic checkpoints with real SD key layouts, for demos, tests and benchmarks.

pub mod arch;
pub mod dest;
pub mod dtype;
pub mod engine;
pub mod error;
pub mod formats;
pub mod graph;
pub mod input;
pub mod mecha;
pub mod method;
pub mod methods;
pub mod non_finite;
pub mod options;
pub mod output;
pub mod real;
pub mod recipe;
pub mod report;
pub mod resume;
pub mod rng;
pub mod simd;
pub mod size;
pub mod synth;

pub use engine::{merge, MergeOptions, NoProgress, Progress};
pub use error::{Error, Result};
pub use graph::Graph;
pub use report::MergeReport;
pub use resume::Cancel;

/// The amalgam version written into every output's metadata.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
