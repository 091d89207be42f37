//! The streaming merge engine.
//!
//! 1. **Plan** (headers only): open every input, take the union of their keys, check shapes, and
//!    resolve for each key the expression that computes it: which node applies to which inputs,
//!    with the inputs lacking the key left out or the key taken from a fallback model (the key
//!    policy, see [`KeyAction`]). Every error here comes before any tensor is read.
//! 2. **Statistics** (only for methods that declare passes): per key, every fixed-size block
//!    ([`BLOCK`], rounded up to whole units when a method declares a unit) is fed to the method
//!    and the per-block results are folded in block order.
//! 3. **Execute**: keys in name order are cut into tasks (a run of elements whose encoded output
//!    fits one buffer) and tasks into sub-chunks whose buffers, one per input and per node, fit in
//!    the CPU cache; both sizes follow from the memory budget, the number of inputs and the thread
//!    count, so memory does not grow with the number of models or the size of a tensor. Tasks run
//!    in parallel; each reads its inputs with positioned reads into reused buffers, evaluates the
//!    node expression, encodes the output dtype and writes the result at its fixed offset in the
//!    output. Per element the summation order over models is fixed by the methods, so the bytes
//!    do not depend on threads, task or sub-chunk size.

mod cache;
mod exec;
mod expr;
mod inputs;
mod keys;
mod out_view;
mod plan;
mod schedule;
#[cfg(test)]
mod tests;
mod views;

use cache::*;
use exec::*;
use expr::*;
use inputs::*;
use keys::*;
use out_view::*;
use plan::*;
use schedule::*;
use views::*;

use crate::arch::Layout;
use crate::dtype::{dtype_name, FloatDtype, OutputDtype};
use crate::error::{Error, Result};
use crate::graph::{Graph, Ref};
use crate::input::ModelFile;
use crate::method::{KeyCtx, KeyMerge, Method, OnMissing, Params};
use crate::methods;
use crate::non_finite::{InputNonFinite, NonFinite};
use crate::output::{OutputFile, OutputTensor};
use crate::real::{ComputeDtype, Real};
use crate::report::{KeyAction, MergeReport, TakenBecause};
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Chunks are multiples of this many elements (and statistic passes work on blocks of it), so the
/// statistics a method computes do not depend on the chunk size.
pub const BLOCK: usize = 1 << 14;

/// Options of one merge run.
#[derive(Clone, Debug)]
pub struct MergeOptions {
    pub output: PathBuf,
    pub output_dtype: OutputDtype,
    pub compute_dtype: ComputeDtype,
    /// Bytes the working set may use (buffers for inputs, intermediate nodes and output chunks).
    pub memory_budget: u64,
    /// Worker threads; 0 = one per core.
    pub threads: usize,
    pub seed: u64,
    /// Replace an existing output file (and report file); only regular files are replaced.
    pub overwrite: bool,
    /// Also write the report as JSON here, after the output (checked with it, before any
    /// tensor is read, by the same rules: see [`crate::dest`]).
    pub report_json: Option<PathBuf>,
    /// Resume an interrupted merge into the same output, when its partial file's fingerprint
    /// matches (see [`crate::resume`]).
    pub resume: bool,
    /// Keep the partial file when the merge fails or is cancelled, for a later resume.
    pub keep_partial: bool,
    /// Stops the merge from another thread (a signal handler, a UI).
    pub cancel: crate::resume::Cancel,
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
            cancel: crate::resume::Cancel::default(),
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
    fn finish(&self) {}
    /// A message for the log (resuming, stale partial files removed).
    fn note(&self, _message: &str) {}
}

/// A progress sink that ignores everything.
pub struct NoProgress;
impl Progress for NoProgress {}

/// Merges the graph's inputs into `opts.output`.
///
/// Model paths are made absolute (links resolved) first, so that the recipe embedded in the
/// output, and so the output's bytes, do not depend on the folder the merge was started from or
/// on the links it was given.
pub fn merge(graph: &Graph, opts: &MergeOptions, progress: &dyn Progress) -> Result<MergeReport> {
    graph.validate()?;
    let input_paths: Vec<&Path> = graph.models.iter().map(|m| m.path.as_path()).collect();
    let mut outputs = vec![opts.output.as_path()];
    outputs.extend(opts.report_json.as_deref());
    crate::dest::check_outputs(&outputs, &input_paths, opts.overwrite)?;
    let graph = &canonical_paths(graph);
    let (models, rows, layouts, notes) = open_inputs(graph, &opts.output)?;
    let layout = graph_layout(graph, &layouts)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads)
        .build()
        .map_err(|e| Error::Invalid(format!("cannot start worker threads: {e}")))?;
    let inputs = RunInputs {
        models: &models,
        rows: &rows,
        layouts: &layouts,
        layout,
        notes: &notes,
    };
    let report = pool.install(|| match opts.compute_dtype {
        ComputeDtype::F32 => run::<f32>(graph, &inputs, opts, progress),
        ComputeDtype::F64 => run::<f64>(graph, &inputs, opts, progress),
    })?;
    if let Some(path) = &opts.report_json {
        let json = serde_json::to_string_pretty(&report).map_err(|e| Error::Output {
            path: path.clone(),
            message: format!("cannot encode the report: {e}"),
        })?;
        crate::dest::write_atomic(path, json.as_bytes(), &input_paths, opts.overwrite)?;
    }
    Ok(report)
}

/// `graph` with every model path that exists made canonical (the others are kept, for the error
/// that names them).
fn canonical_paths(graph: &Graph) -> Graph {
    let mut g = graph.clone();
    for m in &mut g.models {
        if let Ok(p) = std::fs::canonicalize(&m.path) {
            m.path = p;
        }
    }
    g
}
