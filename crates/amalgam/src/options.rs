//! The options of a merge run, how it reports progress, and how it is cancelled: what the engine,
//! the resume journal and the recipes' settings share.

use crate::io::dtype::OutputDtype;
use crate::io::non_finite::NonFinite;
use crate::layout::arch::Layout;
use crate::real::ComputeDtype;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Chunks are multiples of this many elements (and statistic passes work on blocks of it), so the
/// statistics a method computes do not depend on the chunk size.
pub const BLOCK: usize = 1 << 14;

/// Options of one merge run.
#[derive(Clone, Debug)]
pub struct MergeOptions {
    /// The output file.
    pub output: PathBuf,
    /// The dtype of the merged tensors.
    pub output_dtype: OutputDtype,
    /// The accumulation precision.
    pub compute_dtype: ComputeDtype,
    /// Bytes the working set may use (buffers for inputs, intermediate nodes and output chunks).
    pub memory_budget: u64,
    /// Worker threads; 0 = one per core.
    pub threads: usize,
    /// The seed of the random masks.
    pub seed: u64,
    /// Replace an existing output file (and report file); only regular files are replaced.
    pub overwrite: bool,
    /// Also write the report as JSON here, after the output (checked with it, before any
    /// tensor is read, by the same rules: see [`crate::io::dest`]).
    pub report_json: Option<PathBuf>,
    /// Resume an interrupted merge into the same output, when its partial file's fingerprint
    /// matches (see [`crate::resume`]).
    pub resume: bool,
    /// Keep the partial file when the merge fails or is cancelled, for a later resume.
    pub keep_partial: bool,
    /// Stops the merge from another thread (a signal handler, a UI).
    pub cancel: Cancel,
    /// Extra `__metadata__` entries (the recipe, for instance).
    pub metadata: BTreeMap<String, String>,
    /// Force this chunk length (elements, rounded to [`BLOCK`]) instead of deriving it from the
    /// budget. For tests of chunk-size invariance.
    pub chunk_override: Option<usize>,
    /// Write the output in this layout (e.g. `sdxl-kohya`) instead of the original one the
    /// merge is computed in.
    pub output_layout: Option<Layout>,
    /// What to do with an input whose tensor for a key holds NaN or Inf.
    pub non_finite: NonFinite,
}

impl MergeOptions {
    /// The default options for writing `output`.
    pub fn new(output: impl Into<PathBuf>) -> Self {
        MergeOptions {
            output: output.into(),
            output_dtype: OutputDtype::F16,
            compute_dtype: ComputeDtype::F32,
            memory_budget: 2 << 30,
            threads: 0,
            seed: 0,
            overwrite: false,
            report_json: None,
            resume: true,
            keep_partial: false,
            cancel: Cancel::default(),
            metadata: BTreeMap::new(),
            chunk_override: None,
            output_layout: None,
            non_finite: NonFinite::Omit,
        }
    }
}

/// Receives progress of a merge, from any of its threads.
pub trait Progress: Sync {
    /// Called once when planning is done.
    fn start(&self, _total_bytes: u64, _keys: usize) {}
    /// `bytes` more output bytes were written; `key` is the last key touched.
    fn advance(&self, _bytes: u64, _keys_done: usize, _key: &str) {}
    /// Called once when the merge is done.
    fn finish(&self) {}
    /// A message for the log (resuming, stale partial files removed).
    fn note(&self, _message: &str) {}
}

/// A progress sink that ignores everything.
pub struct NoProgress;
impl Progress for NoProgress {}

/// A cancellation token: clones share one flag. A merge whose token is cancelled stops between
/// tasks and returns [`crate::Error::Cancelled`]; its partial file is removed (or kept, with
/// `keep_partial`).
#[derive(Clone, Debug, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// A token not cancelled.
    pub fn new() -> Self {
        Self::default()
    }
    /// Asks the merges holding this token to stop. Safe from any thread.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    /// Whether the merge was asked to stop.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    /// The shared flag itself, for code that can only set a flag (a signal handler).
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }
}
